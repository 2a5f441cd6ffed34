"""Per-GPU memory of a recipe, item by item (``mfmegatron/training/memory.py``), without a GPU.

  python -m tools.memory_plan recipes/flux_dev_8xh100.yaml --gpus 8
  python -m tools.memory_plan recipes/flux_dev_8xh100.yaml --gpus 8 alignment.fake_network=full

Overrides are the trainer's ``key=value``. Parameter counts come from the recipe's preset built on
the meta device (no weights are allocated; the teacher checkpoint need not exist). GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import sys

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.memory_plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job (the world size)")
    parser.add_argument("--budget-gb", type=float, default=80.0, help="memory of one GPU (default: H100 80 GB)")
    args = parser.parse_intermixed_args(argv)

    from mfmegatron.config import load_config
    from mfmegatron.planner import UNCOUNTED_RESERVE_GB
    from mfmegatron.training.config import TrainConfig
    from mfmegatron.training.memory import GB, rank_memory

    config = load_config(TrainConfig, args.recipe, args.overrides)
    memory = rank_memory(config, args.gpus)
    print(f"{args.recipe}{' ' + ' '.join(args.overrides) if args.overrides else ''} on {args.gpus} GPUs: "
          f"{memory.layout}")
    for line in memory.lines():
        print("  " + line)
    spare = args.budget_gb - UNCOUNTED_RESERVE_GB - memory.total / GB
    verdict = f"fits, {spare:.1f} GB to spare" if spare >= 0 else f"does NOT fit, {-spare:.1f} GB over"
    print(f"  {args.budget_gb:g} GB GPU, {UNCOUNTED_RESERVE_GB:g} GB kept for what is not counted: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
