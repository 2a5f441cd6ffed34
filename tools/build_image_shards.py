"""Build WebDataset image shards (image + prompt per sample) for ``z_source="data"`` training.

    python -m tools.build_image_shards photos/ --out data/images              # img + same-stem .txt
    python -m tools.build_image_shards captions.jsonl --image-field path --field text --out data/i
    python -m tools.build_image_shards list.csv --column caption --samples-per-shard 500 --out d
    python -m tools.build_image_shards photos/ --vae /models/FLUX.1-dev/vae --size 1024 --out d

Inputs: directories (each image file with a caption in a ``.txt`` file of the same stem, searched
recursively) and list files (``.jsonl`` / ``.csv`` / ``.tsv`` rows with the image path, relative
to the list file, in ``--image-field`` and the prompt in ``--field`` / ``--column``; other keys
become ``.json`` metadata unless ``--no-meta``). JPEG / PNG / WebP are stored as they are, other
formats Pillow reads are converted to PNG, unreadable files are dropped and counted.

Output: ``OUT/shard-000000.tar ...`` (``KEY.txt``, ``KEY.jpg|png|webp``, optional ``KEY.json``)
and ``OUT/manifest.json``; the shards are also prompt shards (format:
``mfmegatron/data/images/reader.py``). Read them with
``mfmegatron.data.images.build_image_loader``.

``--vae`` (a diffusers AutoencoderKL folder: FLUX.1's ``vae``) also stores each image's FLUX
latents, ``KEY.latent.npy`` ``[16, size/8, size/8]``: the VAE posterior's mean of the image
resized to cover ``--size`` and centre-cropped, shifted and scaled as diffusers' FLUX pipelines
do. The trainer reads them with ``data.image_latents=precomputed`` (``model.image_size`` must be
``--size``); posterior samples and random crops need on-the-fly encoding instead.
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
    p.add_argument("--vae", default=None,
                   help="diffusers AutoencoderKL folder: also store each image's FLUX latents")  # fmt: skip
    p.add_argument("--size", type=int, default=None,
                   help="with --vae: pixels per side of the encoded centre crop (model.image_size)")  # fmt: skip
    p.add_argument("--latent-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="with --vae: storage dtype of the latents")  # fmt: skip
    p.add_argument("--device", default="cpu", help="with --vae: where the VAE runs (cpu, cuda)")
    p.add_argument("--vae-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="with --vae: the VAE's weights and compute dtype")  # fmt: skip
    return p


def _latent_encoding(args, parser):
    """--vae: FLUX's VAE (posterior mean) as the builder's latent encoder."""
    if args.vae is None:
        if args.size is not None:
            parser.error("--size is for --vae")
        return None
    if args.size is None:
        parser.error("--vae needs --size (the training recipe's model.image_size)")
    import torch

    from mfmegatron.data.images import LatentEncoding
    from models.flux.vae import FluxImageEncoder

    dtype = torch.bfloat16 if args.vae_dtype == "bf16" else torch.float32
    encoder = FluxImageEncoder.from_pretrained(args.vae, args.device, dtype, latent="mean")
    info = {"vae": args.vae, "latent": "mean"}
    return LatentEncoding(lambda images: encoder.latents(images).float().cpu(), args.size, args.latent_dtype, info)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from mfmegatron.data.images import build_image_shards

    latents = _latent_encoding(args, parser)
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
            latents=latents,
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
        + (f"; latents {summary.manifest.fields['latent']['shape']} per image" if latents else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
