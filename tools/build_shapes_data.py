"""Build the shapes world's data: image shards, prompt shards, held-out prompts, a tokenizer.

    python -m tools.build_shapes_data --out data/shapes
    python -m tools.build_shapes_data --out data/shapes --images 20000 --seed 0

Writes, under ``--out``:

  images/        WebDataset image shards (``KEY.png`` + ``KEY.txt``): ``--images`` renders of
                 prompts drawn from the whole world (``models/shapes/world.py``), for training the
                 flow-matching teacher (``meanflow.z_source=data`` reads them too);
  prompts/       prompt shards of ``--prompts`` captions drawn from the prompts that are *not*
                 held out: what distillation trains on;
  heldout.txt    the held-out captions (about 10% of the world's 1,584, a fixed split by caption
                 hash), one per line: what evaluation scores;
  tokenizer.model  a sentencepiece word model trained on every caption (pad 0, eos 1, unk 2),
                 read by ``mfmegatron.data.tokenizers.SentencePieceTokenizer``.

Same arguments, same bytes: rendering uses one seeded generator; sentencepiece is trained on a
fixed, sorted caption list.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from models.shapes.world import all_prompts, is_held_out, render, sample_prompt


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.build_shapes_data",
        description="Build the shapes world's image shards, prompt shards, held-out prompts and tokenizer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory (must be empty unless --overwrite)")
    p.add_argument("--images", type=int, default=20000, help="rendered images for teacher training")
    p.add_argument("--prompts", type=int, default=4096, help="distillation prompts (not held out)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the rendering and prompt draws")
    p.add_argument("--samples-per-shard", type=int, default=2000, help="samples per tar shard")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    return p


def train_tokenizer(captions: list[str], path: Path) -> Path:
    """A word-level sentencepiece model over the captions' words (T5's ids: pad 0, eos 1, unk 2),
    trained from memory so that the model file records no temporary path (same bytes each time)."""
    import io

    import sentencepiece

    words = {w for caption in captions for w in caption.split()}
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sorted(set(captions))), model_writer=model, model_type="word",
        vocab_size=len(words) + 3, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, minloglevel=2, num_threads=1,
    )
    path.write_bytes(model.getvalue())
    return path


def build(out: Path, images: int, prompts: int, size: int, seed: int, samples_per_shard: int,
          overwrite: bool = False) -> dict:
    from PIL import Image

    from mfmegatron.data.builder import build_prompt_shards
    from mfmegatron.data.images.builder import build_image_shards

    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty (pass --overwrite)")
    start = time.monotonic()
    rng = np.random.default_rng(seed)
    world = all_prompts()
    held_out = [p.caption for p in world if is_held_out(p)]
    (out / "heldout.txt").write_text("\n".join(held_out) + "\n")
    train_tokenizer([p.caption for p in world], out / "tokenizer.model")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for index in range(images):
            prompt = sample_prompt(rng)
            Image.fromarray(render(prompt, rng, size)).save(folder / f"{index:07d}.png")
            (folder / f"{index:07d}.txt").write_text(prompt.caption)
            if (index + 1) % 5000 == 0:
                print(f"rendered {index + 1}/{images} images ({time.monotonic() - start:.0f} s)", flush=True)
        image_summary = build_image_shards([folder], out / "images", samples_per_shard=samples_per_shard,
                                           overwrite=overwrite)

        distill = []
        while len(distill) < prompts:
            prompt = sample_prompt(rng)
            if not is_held_out(prompt):
                distill.append(prompt.caption)
        listing = Path(tmp) / "prompts.txt"
        listing.write_text("\n".join(distill) + "\n")
        prompt_summary = build_prompt_shards([listing], out / "prompts", samples_per_shard=samples_per_shard,
                                             overwrite=overwrite)
    return {
        "images": image_summary.samples,
        "prompts": prompt_summary.samples,
        "held_out": len(held_out),
        "seconds": time.monotonic() - start,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = build(Path(args.out), args.images, args.prompts, args.size, args.seed,
                        args.samples_per_shard, args.overwrite)
    except (FileExistsError, ValueError) as error:
        print(f"build_shapes_data: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {summary['images']} images, {summary['prompts']} distillation prompts and "
          f"{summary['held_out']} held-out prompts to {args.out} in {summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
