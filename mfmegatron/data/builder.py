"""Building prompt shards: read prompts from text / CSV / JSONL, dedup, optionally precompute
embeddings with a :class:`~mfmegatron.data.encoders.TextEncoder`, write shards and a manifest.

``tools/build_prompt_shards.py`` is the command line around :func:`build_prompt_shards`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from mfmegatron.data import format as fmt
from mfmegatron.data.encoders import TextEncoder

INPUT_FORMATS = ("txt", "csv", "tsv", "jsonl")


@dataclass
class PromptRecord:
    prompt: str
    meta: dict[str, Any] | None = None


@dataclass
class InputStats:
    records: int = 0  # input records read (lines / rows)
    empty: int = 0  # records whose prompt is empty or whitespace
    missing: int = 0  # CSV rows / JSON objects without the prompt field
    invalid: int = 0  # JSONL lines that are not a JSON object


def detect_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    aliases = {"txt": "txt", "csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "ndjson": "jsonl"}
    if suffix not in aliases:
        raise ValueError(f"cannot tell the format of {path} from its suffix: pass the format")
    return aliases[suffix]


def _lookup(record: dict, dotted: str):
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def read_prompts(
    path: str | os.PathLike,
    input_format: str | None = None,
    *,
    column: str = "prompt",
    field: str = "prompt",
    keep_meta: bool = True,
    stats: InputStats | None = None,
) -> Iterator[PromptRecord]:
    """Prompts from one file, stripped; empty ones dropped (and counted in ``stats``).

    ``txt``: one prompt per line. ``csv`` / ``tsv``: a header row, the prompt in ``column``, the
    other columns become the metadata. ``jsonl``: one object per line, the prompt at ``field``
    (dotted for nested keys), the other top-level keys become the metadata.
    """
    input_format = input_format or detect_format(path)
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input format {input_format!r} is not one of {INPUT_FORMATS}")
    stats = stats if stats is not None else InputStats()

    def emit(prompt, meta) -> PromptRecord | None:
        if not isinstance(prompt, str):
            stats.missing += 1
            return None
        prompt = prompt.strip()
        if not prompt:
            stats.empty += 1
            return None
        return PromptRecord(prompt, (meta or None) if keep_meta else None)

    with open(path, encoding="utf-8", newline="" if input_format in ("csv", "tsv") else None) as f:
        if input_format == "txt":
            for line in f:
                stats.records += 1
                if (record := emit(line, None)) is not None:
                    yield record
        elif input_format in ("csv", "tsv"):
            reader = csv.DictReader(f, delimiter="," if input_format == "csv" else "\t")
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise ValueError(
                    f"{path}: no column {column!r}; the columns are {reader.fieldnames}"
                )
            for row in reader:
                stats.records += 1
                meta = {k: v for k, v in row.items() if k != column and k is not None}
                if (record := emit(row.get(column), meta)) is not None:
                    yield record
        else:
            for line in f:
                if not line.strip():
                    continue
                stats.records += 1
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict):
                    stats.invalid += 1
                    continue
                top = field.split(".")[0]
                meta = {k: v for k, v in obj.items() if k != top}
                if (record := emit(_lookup(obj, field), meta)) is not None:
                    yield record


def check_source(
    path: str | os.PathLike, input_format: str | None = None, *, column: str = "prompt"
) -> None:
    """Fails early (before any output is touched) on a missing file, unknown format or CSV column."""
    input_format = input_format or detect_format(path)
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input format {input_format!r} is not one of {INPUT_FORMATS}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such input file: {path}")
    if input_format in ("csv", "tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f, delimiter="," if input_format == "csv" else "\t"), [])
        if column not in header:
            raise ValueError(f"{path}: no column {column!r}; the columns are {header}")


def count_records(path: str | os.PathLike, input_format: str | None = None) -> int:
    """Input records in a file, cheaply (for progress and ETA): lines, or CSV rows."""
    input_format = input_format or detect_format(path)
    if input_format in ("csv", "tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            delimiter = "," if input_format == "csv" else "\t"
            return max(sum(1 for _ in csv.reader(f, delimiter=delimiter)) - 1, 0)
    with open(path, "rb") as f:
        if input_format == "jsonl":
            return sum(1 for line in f if line.strip())
        return sum(1 for _ in f)


def dedup_key(prompt: str) -> bytes:
    """Prompts equal after collapsing whitespace are duplicates (case is kept)."""
    return hashlib.blake2b(" ".join(prompt.split()).encode(), digest_size=16).digest()


@dataclass
class BuildProgress:
    records_done: int
    records_total: int | None
    samples_written: int
    shards_written: int
    elapsed_s: float
    finished: bool = False

    @property
    def eta_s(self) -> float | None:
        if not self.records_total or not self.records_done:
            return None
        rate = self.records_done / max(self.elapsed_s, 1e-9)
        return max(self.records_total - self.records_done, 0) / rate


@dataclass
class BuildSummary:
    manifest: fmt.Manifest
    manifest_path: Path
    input: InputStats
    duplicates: int = 0
    samples: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _sample_members(record: PromptRecord) -> dict[str, bytes]:
    members = {fmt.TXT: record.prompt.encode("utf-8")}
    if record.meta:
        members[fmt.JSON] = json.dumps(record.meta, ensure_ascii=False, sort_keys=True).encode()
    return members


def build_prompt_shards(
    sources: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    input_format: str | None = None,
    column: str = "prompt",
    field: str = "prompt",
    keep_meta: bool = True,
    dedup: bool = False,
    limit: int | None = None,
    encoder: TextEncoder | None = None,
    embed_dtype: str = "float16",
    t5_store: str = "full",
    encode_batch_size: int = 16,
    prefix: str = "shard",
    overwrite: bool = False,
    progress: Callable[[BuildProgress], None] | None = None,
) -> BuildSummary:
    """Writes ``out_dir/{prefix}-000000.tar, ...`` and ``out_dir/manifest.json``.

    Samples keep the input order (files in the given order); keys are running indices. With
    ``encoder``, each sample also gets ``.t5.npy`` / ``.t5mask.npy`` / ``.clip.npy`` in
    ``embed_dtype``; ``t5_store="full"`` keeps all ``max_length`` rows of the T5 states (what
    FLUX.1 attends to), ``"trim"`` only the real tokens' rows.
    """
    start = time.monotonic()
    sources = [Path(s) for s in sources]
    out_dir = Path(out_dir)
    embed_dtype = fmt.normalize_embed_dtype(embed_dtype)
    if t5_store not in ("full", "trim"):
        raise ValueError(f"t5_store must be 'full' or 'trim', not {t5_store!r}")
    for source in sources:
        check_source(source, input_format, column=column)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty (pass overwrite=True / --overwrite)")
        for old in list(out_dir.glob(f"{prefix}-*.tar")) + [out_dir / fmt.MANIFEST_NAME]:
            old.unlink(missing_ok=True)
    total = sum(count_records(s, input_format) for s in sources) if progress else None

    stats = InputStats()
    seen: set[bytes] = set()
    duplicates = 0
    written = 0
    pending: list[PromptRecord] = []
    writer = fmt.ShardWriter(out_dir, samples_per_shard, prefix)

    def report(finished: bool = False) -> None:
        if progress is not None:
            progress(BuildProgress(stats.records, total, written, len(writer.shards),
                                   time.monotonic() - start, finished))  # fmt: skip

    def flush() -> None:
        nonlocal written
        if not pending:
            return
        embeddings = encoder.encode([r.prompt for r in pending]) if encoder is not None else None
        for i, record in enumerate(pending):
            members = _sample_members(record)
            if embeddings is not None:
                t5, mask = embeddings.t5[i], embeddings.t5_mask[i]
                if t5_store == "trim":
                    n = int(mask.sum())
                    t5, mask = t5[:n], mask[:n]
                members[fmt.T5] = fmt.npy_bytes(fmt.tensor_to_storage(t5, embed_dtype))
                members[fmt.T5_MASK] = fmt.npy_bytes(mask.cpu().numpy().astype("uint8"))
                members[fmt.CLIP] = fmt.npy_bytes(
                    fmt.tensor_to_storage(embeddings.pooled[i], embed_dtype)
                )
            writer.write(f"{written:010d}", members)
            written += 1
        pending.clear()
        report()

    def records() -> Iterator[PromptRecord]:
        for source in sources:
            yield from read_prompts(source, input_format, column=column, field=field,
                                    keep_meta=keep_meta, stats=stats)  # fmt: skip

    with writer:
        for record in records():
            if limit is not None and written + len(pending) >= limit:
                break
            if dedup:
                key = dedup_key(record.prompt)
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
            pending.append(record)
            if len(pending) >= (encode_batch_size if encoder is not None else 256):
                flush()
        flush()

    fields: dict[str, Any] = {fmt.TXT: {}}
    if encoder is not None:
        fields["t5"] = {"dim": encoder.t5_dim, "dtype": embed_dtype, "store": t5_store,
                        "max_length": encoder.max_length}  # fmt: skip
        fields["clip"] = {"dim": encoder.pooled_dim, "dtype": embed_dtype}
    builder_info = {
        "sources": [s.name for s in sources],
        "dedup": dedup,
        "input_records": stats.records,
        "dropped": {"empty": stats.empty, "missing": stats.missing, "invalid": stats.invalid,
                    "duplicates": duplicates},  # fmt: skip
    }
    manifest = fmt.Manifest(
        shards=writer.shards,
        fields=fields,
        extra={"encoder": encoder.describe() if encoder is not None else None, "builder": builder_info},
    )
    manifest_path = out_dir / fmt.MANIFEST_NAME
    manifest.write(manifest_path)
    report(finished=True)
    return BuildSummary(manifest, manifest_path, stats, duplicates, written, time.monotonic() - start)


def write_manifest(
    paths: Iterable[str | os.PathLike], manifest_path: str | os.PathLike
) -> dict[str, str]:
    """Scans existing shards (e.g. made by another tool) and writes a manifest for them; returns
    ``{path: error}`` for damaged shards (their readable samples are what gets counted)."""
    manifest, errors = fmt.index_shards(paths)
    manifest.write(manifest_path)
    return errors
