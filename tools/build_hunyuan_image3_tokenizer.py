"""Write a small word-level ``tokenizer.json`` for tiny HunyuanImage 3.0 models (the tiny recipe,
tests): one id per word of the prompt files and of the instruct template's role text, plus
HunyuanImage 3.0's special tokens. Real runs use the model's own tokenizer.json instead.

  python -m tools.build_hunyuan_image3_tokenizer examples/prompts.txt --out outputs/hunyuan_tiny_tokenizer.json --image-base-size 64
  python -m tools.build_hunyuan_image3_tokenizer --shapes-world --out data/shapes/hunyuan_tokenizer.json --image-base-size 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from models.hunyuan_image3.tokenizer import write_word_level_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", nargs="*", help="text files, one prompt per line")
    parser.add_argument("--shapes-world", action="store_true",
                        help="also every caption of the shapes world (models/shapes/world.py)")
    parser.add_argument("--out", required=True, help="the tokenizer.json to write")
    parser.add_argument("--image-base-size", type=int, default=1024,
                        help="the resolution buckets' base (model.image_base_size; default 1024)")
    args = parser.parse_args(argv)
    texts = [line.strip() for path in args.prompts for line in Path(path).read_text().splitlines() if line.strip()]
    if args.shapes_world:
        from models.shapes.world import all_prompts

        texts += [prompt.caption for prompt in all_prompts()]
    if not texts:
        parser.error("no prompts: give text files or --shapes-world")
    size = write_word_level_tokenizer(texts, args.out, args.image_base_size)
    print(f"wrote {args.out}: {size} tokens (the model's vocab_size must be at least that)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
