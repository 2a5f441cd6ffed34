"""The prompt-shard format: WebDataset tar files plus a ``manifest.json``.

A shard is a plain (uncompressed) tar file in WebDataset layout: the members of one sample share a
key (the part of the member name before its first dot) and sit next to each other. Per sample:

=================  ==========================================================================
``KEY.txt``        the prompt, UTF-8. Required: a sample without it is skipped and counted.
``KEY.json``       optional metadata, one JSON object (passed through as ``sample.meta``).
``KEY.t5.npy``     optional T5 encoder states, ``[s_txt, d_t5]`` (4096 for T5-XXL).
``KEY.t5mask.npy`` with ``.t5.npy``: ``[s_txt]`` uint8, 1 where the row is a real token (EOS
                   included), 0 where it is a padding token's state.
``KEY.clip.npy``   optional pooled CLIP text embedding, ``[d_clip]`` (768 for CLIP-L).
=================  ==========================================================================

Embedding arrays are ``.npy`` (``numpy.save``, no pickles) in float16, float32, or bfloat16 stored
as its raw bit pattern in a ``uint16`` array (numpy has no bfloat16): a ``uint16`` embedding is
always read back as ``torch.bfloat16``. ``s_txt`` is the T5 length the builder stored: all
``max_length`` rows (``t5_store="full"``, the FLUX.1 convention: the transformer attends to all
512 positions, and padding positions carry T5's own outputs for the pad token) or only the real
tokens (``"trim"``, far smaller; the reader pads with zeros and a 0 mask).

Keys written by the builder are the sample's index in the dataset, zero-padded to 10 digits, so
they are unique across shards. ``manifest.json`` (next to the shards) lists the shards in order
with their sample counts and describes the embedding fields; the reader needs the counts to plan
an epoch without opening every shard (without a manifest it scans all shards' headers first).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mfmegatron-prompt-shards"
MANIFEST_VERSION = 1

TXT = "txt"
JSON = "json"
T5 = "t5.npy"
T5_MASK = "t5mask.npy"
CLIP = "clip.npy"

EMBED_DTYPES = ("float16", "bfloat16", "float32")


class ShardFormatError(ValueError):
    """A manifest or a shard does not follow the format (raised for manifests, not for samples)."""


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/KEY.ext.more`` -> (``dir/KEY``, ``ext.more``), as WebDataset groups members.

    Returns None for a name with no extension (such a member belongs to no sample).
    """
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    return name[:dot], name[dot + 1 :]


# ---------------------------------------------------------------------------------------------
# arrays


def normalize_embed_dtype(dtype: str | torch.dtype) -> str:
    aliases = {
        "fp16": "float16", "half": "float16", "float16": "float16", torch.float16: "float16",
        "bf16": "bfloat16", "bfloat16": "bfloat16", torch.bfloat16: "bfloat16",
        "fp32": "float32", "float": "float32", "float32": "float32", torch.float32: "float32",
    }  # fmt: skip
    if dtype not in aliases:
        raise ValueError(f"embedding dtype {dtype!r} is not one of {EMBED_DTYPES}")
    return aliases[dtype]


def tensor_to_storage(array: torch.Tensor | np.ndarray, dtype: str | torch.dtype) -> np.ndarray:
    """An embedding as the numpy array that is stored (bfloat16 as uint16 bits)."""
    dtype = normalize_embed_dtype(dtype)
    tensor = torch.as_tensor(array).detach().cpu()
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return tensor.to(getattr(torch, dtype)).numpy()


def storage_to_tensor(array: np.ndarray) -> torch.Tensor:
    """A stored embedding array as a tensor (uint16 is bfloat16's bit pattern)."""
    if array.dtype == np.uint16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    if array.dtype not in (np.float16, np.float32):
        raise ValueError(f"unsupported embedding dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# ---------------------------------------------------------------------------------------------
# manifest


@dataclass(frozen=True)
class ShardInfo:
    path: str  # absolute or as given
    samples: int

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass
class Manifest:
    """The shard list with sample counts, plus what the samples carry."""

    shards: list[ShardInfo]
    # Field descriptions, e.g. {"t5": {"dim": 4096, "dtype": "float16", "store": "full",
    # "max_length": 512}, "clip": {"dim": 768, "dtype": "float16"}}; absent fields: not stored.
    fields: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    def to_json(self, relative_to: str | os.PathLike | None = None) -> dict[str, Any]:
        def name(path: str) -> str:
            return os.path.relpath(path, relative_to) if relative_to is not None else path

        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "num_samples": self.num_samples,
            "shards": [{"name": name(s.path), "samples": s.samples} for s in self.shards],
            "fields": self.fields,
            **self.extra,
        }

    def write(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(relative_to=path.parent), indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Manifest":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ShardFormatError(f"cannot read manifest {path}: {error}") from error
        if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
            raise ShardFormatError(
                f"{path} is not a {MANIFEST_FORMAT} v{MANIFEST_VERSION} manifest "
                f"(format={data.get('format')!r}, version={data.get('version')!r})"
            )
        shards = [
            ShardInfo(str(path.parent / entry["name"]), int(entry["samples"]))
            for entry in data["shards"]
        ]
        known = {"format", "version", "num_samples", "shards", "fields"}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(shards=shards, fields=dict(data.get("fields") or {}), extra=extra)


# ---------------------------------------------------------------------------------------------
# scanning a shard


@dataclass
class ShardIndex:
    """Where each sample's members lie in one shard file.

    ``samples[i] = (key, {ext: (offset, size)})`` in file order. ``error`` is None for a clean
    shard; otherwise it says why the scan stopped (unreadable, truncated, corrupt) and ``samples``
    holds only the samples before the damage.
    """

    path: str
    samples: list[tuple[str, dict[str, tuple[int, int]]]]
    error: str | None = None


def scan_shard(path: str | os.PathLike) -> ShardIndex:
    """Reads a shard's tar headers (seeking over the data) and groups members into samples.

    Never raises for a damaged file: a file that cannot be opened or is not a tar gives no
    samples and an ``error``; a truncated or corrupt one gives the samples before the damage
    (the last sample seen before it is dropped too, as some of its members may be missing).
    """
    path = str(path)
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    by_key: dict[str, dict[str, tuple[int, int]]] = {}

    def add(member: tarfile.TarInfo) -> None:
        parts = split_member_name(member.name)
        if parts is None or not member.isfile():
            return
        key, ext = parts
        if key not in by_key:
            by_key[key] = {}
            samples.append((key, by_key[key]))
        by_key[key][ext] = (member.offset_data, member.size)

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            error = None
            try:
                with tarfile.open(fileobj=file, mode="r:") as archive:
                    for member in archive:
                        if member.offset_data + member.size > size:
                            error = f"truncated: member {member.name!r} ends past the end of the file"
                            break
                        add(member)
                    end = archive.offset
            except tarfile.ReadError as read_error:
                if not samples:
                    return ShardIndex(path, [], f"not a readable tar file ({read_error})")
                error = f"truncated or corrupt ({read_error})"
            if error is None:
                # tarfile ends quietly at a bad header after the first member: a clean archive
                # ends with zero blocks, so anything else where it stopped is damage.
                file.seek(end)
                tail = file.read(512)
                if len(tail) < 512:
                    error = f"truncated: no end-of-archive marker (file ends at byte {size})"
                elif tail.count(0) != 512:
                    error = f"corrupt: invalid tar header at byte {end}"
    except OSError as os_error:
        return ShardIndex(path, [], f"cannot open ({os_error})")
    if error is not None and samples:
        samples.pop()
    return ShardIndex(path, samples, error)


def index_shards(paths: Iterable[str | os.PathLike]) -> tuple[Manifest, dict[str, str]]:
    """Scans shards into a manifest (sample counts); also returns {path: error} for damaged ones."""
    shards, errors = [], {}
    for path in paths:
        index = scan_shard(path)
        shards.append(ShardInfo(str(path), len(index.samples)))
        if index.error is not None:
            errors[str(path)] = index.error
    return Manifest(shards=shards), errors


# ---------------------------------------------------------------------------------------------
# writing


class ShardWriter:
    """Writes samples into numbered tar shards of ``samples_per_shard`` samples each.

    Each shard is written to ``NAME.tmp`` and renamed when complete, so a crash never leaves a
    half-written file under a shard's name. Tar headers are fixed (mtime 0, uid 0, mode 0644), so
    the same input gives byte-identical shards.
    """

    def __init__(self, out_dir: str | os.PathLike, samples_per_shard: int, prefix: str = "shard"):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.prefix = prefix
        self.shards: list[ShardInfo] = []
        self._archive: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._final_path = self.out_dir / name
        self._tmp_path = self.out_dir / (name + ".tmp")
        self._archive = tarfile.open(self._tmp_path, mode="w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _close_current(self) -> None:
        if self._archive is None:
            return
        self._archive.close()
        os.replace(self._tmp_path, self._final_path)
        self.shards.append(ShardInfo(str(self._final_path), self._count))
        self._archive = None

    def write(self, key: str, members: Mapping[str, bytes]) -> None:
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
        if self._archive is None:
            self._open()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            self._archive.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._close_current()

    def close(self) -> list[ShardInfo]:
        self._close_current()
        return self.shards

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self._archive is not None:
            self._archive.close()
            self._tmp_path.unlink(missing_ok=True)
            self._archive = None
            return
        self.close()
