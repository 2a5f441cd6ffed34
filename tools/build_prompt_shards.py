"""Build WebDataset prompt shards (and optionally precomputed FLUX text embeddings).

    python -m tools.build_prompt_shards prompts.txt --out data/prompts
    python -m tools.build_prompt_shards prompts.csv --column caption --dedup --out data/p
    python -m tools.build_prompt_shards a.jsonl b.jsonl --field text --samples-per-shard 500 \\
        --out data/p --encoder hf --flux-path /models/FLUX.1-dev --device cuda --embed-dtype bf16
    python -m tools.build_prompt_shards --index data/other/*.tar --out data/other   # manifest only

Inputs: ``.txt`` (one prompt per line), ``.csv`` / ``.tsv`` (header row; ``--column``), ``.jsonl``
(one object per line; ``--field``, dotted for nested keys). The other CSV columns / JSON keys are
kept as each sample's ``.json`` metadata unless ``--no-meta``. Prompts are stripped; empty ones
are dropped; ``--dedup`` drops prompts equal to an earlier one after collapsing whitespace.

Output: ``OUT/shard-000000.tar ...`` with ``--samples-per-shard`` samples each, and
``OUT/manifest.json`` (shard list with counts, embedding fields, drop statistics). With
``--encoder``, each sample also stores ``.t5.npy`` [s, d_t5], ``.t5mask.npy`` [s] and
``.clip.npy`` [d_clip] (format: ``mfmegatron/data/format.py``).

Encoders: ``dummy`` is a deterministic pseudo-random stand-in (tests and pipeline checks only);
``hf`` loads T5 and CLIP with transformers from local directories (never downloads): either
``--flux-path`` (a diffusers-layout FLUX.1 directory) or ``--t5-path`` and ``--clip-path``.
Progress (records done, rate, ETA) goes to stderr every ``--progress-interval`` seconds.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.build_prompt_shards",
        description="Build WebDataset prompt shards (optionally with precomputed text embeddings).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "inputs", nargs="+",
        help="prompt files (.txt/.csv/.tsv/.jsonl); with --index: shard files or directories",
    )
    p.add_argument(
        "--out", required=True,
        help="output directory (must be empty unless --overwrite)",
    )
    g = p.add_argument_group("input")
    g.add_argument("--format", default="auto", choices=["auto", "txt", "csv", "tsv", "jsonl"],
                   help="input format; auto: from each file's suffix")
    g.add_argument("--column", default="prompt", help="CSV/TSV column holding the prompt")
    g.add_argument(
        "--field", default="prompt",
        help="JSONL key holding the prompt (dotted for nested)",
    )
    g.add_argument(
        "--no-meta", action="store_true",
        help="do not keep other columns/keys as .json metadata",
    )
    g.add_argument(
        "--dedup", action="store_true",
        help="drop prompts equal to an earlier one (whitespace-collapsed)",
    )
    g.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    g = p.add_argument_group("shards")
    g.add_argument("--samples-per-shard", type=int, default=1000,
                   help="samples per tar shard (with full FLUX T5 states a sample is ~4 MiB in fp16)")
    g.add_argument("--prefix", default="shard", help="shard file name prefix")
    g.add_argument(
        "--overwrite", action="store_true",
        help="replace shards and manifest already in --out",
    )
    g.add_argument("--index", action="store_true",
                   help="only write OUT/manifest.json for existing shards given as inputs")
    g = p.add_argument_group("embeddings")
    g.add_argument("--encoder", default="none", choices=["none", "dummy", "hf"],
                   help="precompute T5 + CLIP embeddings with this encoder")
    g.add_argument("--embed-dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="stored dtype (bf16 is stored as uint16 bit patterns)")
    g.add_argument("--t5-store", default="full", choices=["full", "trim"],
                   help="full: all --max-length rows (FLUX attends to all); trim: real tokens only")
    g.add_argument(
        "--max-length", type=int, default=512,
        help="T5 tokens (FLUX.1-dev 512, schnell 256)",
    )
    g.add_argument("--encode-batch-size", type=int, default=16, help="prompts per encoder call")
    g.add_argument("--dummy-t5-dim", type=int, default=4096, help="dummy encoder: T5 state width")
    g.add_argument("--dummy-pooled-dim", type=int, default=768, help="dummy encoder: pooled width")
    g.add_argument("--dummy-seed", type=int, default=0, help="dummy encoder: seed")
    g.add_argument("--dummy-position-scale", type=float, default=0.1,
                   help="dummy encoder: weight of the position row (data.text_position_scale)")
    g.add_argument("--dummy-context-scale", type=float, default=0.0,
                   help="dummy encoder: weight of the neighbour rows (data.text_context_scale)")
    g.add_argument(
        "--flux-path",
        default=None,
        help="hf encoder: diffusers-layout FLUX.1 directory (text_encoder[_2], tokenizer[_2])",
    )
    g.add_argument(
        "--t5-path", default=None,
        help="hf encoder: T5 encoder directory (with its tokenizer)",
    )
    g.add_argument(
        "--clip-path", default=None,
        help="hf encoder: CLIP text model directory (with its tokenizer)",
    )
    g.add_argument("--device", default="cpu", help="hf encoder: torch device")
    g.add_argument(
        "--model-dtype", default="bf16", choices=["fp16", "bf16", "fp32"],
        help="hf encoder: weights dtype",
    )
    g.add_argument("--t5-attention-mask", action="store_true",
                   help="hf encoder: pass the attention mask to T5 (FLUX's pipeline does not)")
    g = p.add_argument_group("output")
    g.add_argument(
        "--progress-interval", type=float, default=5.0,
        help="seconds between progress lines",
    )
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _encoder(args):
    if args.encoder == "none":
        return None
    from mfmegatron.data import build_text_encoder

    if args.encoder == "dummy":
        return build_text_encoder(
            "dummy", t5_dim=args.dummy_t5_dim, pooled_dim=args.dummy_pooled_dim,
            max_length=args.max_length, seed=args.dummy_seed, position_scale=args.dummy_position_scale,
            context_scale=args.dummy_context_scale,
        )  # fmt: skip
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.model_dtype]
    options = dict(max_length=args.max_length, device=args.device, dtype=dtype,
                   t5_attention_mask=args.t5_attention_mask)  # fmt: skip
    if args.flux_path:
        return build_text_encoder("hf", flux_path=args.flux_path, **options)
    if not (args.t5_path and args.clip_path):
        raise SystemExit("--encoder hf needs --flux-path, or both --t5-path and --clip-path")
    return build_text_encoder("hf", t5_path=args.t5_path, clip_path=args.clip_path, **options)


def _duration(seconds: float | None) -> str:
    return "?" if seconds is None else str(datetime.timedelta(seconds=round(seconds)))


def _index(args) -> int:
    from mfmegatron.data import write_manifest

    paths = []
    for item in args.inputs:
        path = Path(item)
        paths.extend(sorted(path.glob("*.tar")) if path.is_dir() else [path])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    errors = write_manifest(paths, out / "manifest.json")
    for path, error in errors.items():
        print(f"warning: {path}: {error}", file=sys.stderr)
    print(f"indexed {len(paths)} shards into {out / 'manifest.json'} ({len(errors)} damaged)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _index(args) if args.index else _build(args)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        parser.error(str(error))  # one line and exit status 2, no traceback


def _build(args) -> int:
    from mfmegatron.data import build_prompt_shards

    last = [0.0]

    def progress(p) -> None:
        now = time.monotonic()
        if args.quiet or (now - last[0] < args.progress_interval and not p.finished):
            return
        last[0] = now
        total = f"/{p.records_total}" if p.records_total else ""
        pct = f" ({100 * p.records_done / p.records_total:.1f}%)" if p.records_total else ""
        rate = p.records_done / max(p.elapsed_s, 1e-9)
        print(
            f"[build_prompt_shards] {p.records_done}{total} records{pct}  "
            f"{p.samples_written} samples  {p.shards_written} shards  {rate:.1f} rec/s  "
            f"ETA {_duration(p.eta_s)}",
            file=sys.stderr,
            flush=True,
        )

    summary = build_prompt_shards(
        args.inputs,
        args.out,
        samples_per_shard=args.samples_per_shard,
        input_format=None if args.format == "auto" else args.format,
        column=args.column,
        field=args.field,
        keep_meta=not args.no_meta,
        dedup=args.dedup,
        limit=args.limit,
        encoder=_encoder(args),
        embed_dtype=args.embed_dtype,
        t5_store=args.t5_store,
        encode_batch_size=args.encode_batch_size,
        prefix=args.prefix,
        overwrite=args.overwrite,
        progress=progress,
    )
    s = summary.input
    print(
        f"wrote {summary.samples} samples in {len(summary.manifest.shards)} shards to "
        f"{summary.manifest_path.parent} in {summary.seconds:.1f} s (read {s.records} records; "
        f"dropped {summary.duplicates} duplicates, {s.empty} empty, {s.missing} without the "
        f"prompt field, {s.invalid} invalid)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
