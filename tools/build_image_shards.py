"""Build WebDataset image shards (image + prompt per sample) for ``z_source="data"`` training.

    python -m tools.build_image_shards photos/ --out data/images              # img + same-stem .txt
    python -m tools.build_image_shards captions.jsonl --image-field path --field text --out data/i
    python -m tools.build_image_shards list.csv --column caption --samples-per-shard 500 --out d

Inputs: directories (each image file with a caption in a ``.txt`` file of the same stem, searched
recursively) and list files (``.jsonl`` / ``.csv`` / ``.tsv`` rows with the image path, relative
to the list file, in ``--image-field`` and the prompt in ``--field`` / ``--column``; other keys
become ``.json`` metadata unless ``--no-meta``). JPEG / PNG / WebP are stored as they are, other
formats Pillow reads are converted to PNG, unreadable files are dropped and counted.

Output: ``OUT/shard-000000.tar ...`` (``KEY.txt``, ``KEY.jpg|png|webp``, optional ``KEY.json``)
and ``OUT/manifest.json``; the shards are also prompt shards (format:
``mfmegatron/data/images/reader.py``). Read them with
``mfmegatron.data.images.build_image_loader``.
"""

from __future__ import annotations

import argparse
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.build_image_shards",
        description="Build WebDataset image shards (image + prompt per sample).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="directories of images + .txt captions, or "
                   ".jsonl/.csv/.tsv lists")  # fmt: skip
    p.add_argument("--out", required=True,
                   help="output directory (must be empty unless --overwrite)")  # fmt: skip
    p.add_argument("--format", default="auto", choices=["auto", "csv", "tsv", "jsonl"],
                   help="list file format; auto: from each file's suffix")  # fmt: skip
    p.add_argument("--image-field", default="image",
                   help="list files: the key/column holding the image path")  # fmt: skip
    p.add_argument("--column", default="prompt", help="CSV/TSV column holding the prompt")
    p.add_argument("--field", default="prompt", help="JSONL key holding the prompt (dotted)")
    p.add_argument("--no-meta", action="store_true", help="write no .json metadata")
    p.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--prefix", default="shard", help="shard file name prefix")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--progress-interval", type=float, default=5.0,
                   help="seconds between progress lines")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from mfmegatron.data.images import build_image_shards

    last = [0.0]

    def progress(records: int, written: int, elapsed: float) -> None:
        now = time.monotonic()
        if args.quiet or now - last[0] < args.progress_interval:
            return
        last[0] = now
        rate = written / max(elapsed, 1e-9)
        print(f"[build_image_shards] {records} inputs  {written} samples  {rate:.1f} samples/s",
              file=sys.stderr, flush=True)  # fmt: skip

    try:
        summary = build_image_shards(
            args.inputs,
            args.out,
            samples_per_shard=args.samples_per_shard,
            input_format=None if args.format == "auto" else args.format,
            image_field=args.image_field,
            column=args.column,
            field=args.field,
            keep_meta=not args.no_meta,
            limit=args.limit,
            prefix=args.prefix,
            overwrite=args.overwrite,
            progress=progress,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        parser.error(str(error))  # one line and exit status 2, no traceback
    s = summary.stats
    formats = ", ".join(f"{n} {ext}" for ext, n in sorted(summary.formats.items())) or "none"
    print(
        f"wrote {summary.samples} samples ({formats}) in {len(summary.manifest.shards)} shards "
        f"to {summary.manifest_path.parent} in {summary.seconds:.1f} s (read {s.records} inputs; "
        f"dropped {s.no_caption} without a prompt, {s.missing_image} without an image file, "
        f"{s.bad_image} unreadable; converted {s.converted} to PNG)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
