"""Distil a few-step MeanFlow student from a flow-matching teacher.

    torchrun --nproc-per-node 2 -m mfmegatron.train recipes/flux_tiny_cpu.yaml [key=value ...]

RECIPE is a YAML file of ``mfmegatron.training.config.TrainConfig``; ``key=value`` overrides any
field by its dotted name (``optim.lr=1e-5 train.steps=100``). A run resumes from
``train.output_dir/checkpoints/latest`` when it exists (``train.resume=false`` to start over).
Started without torchrun it runs as a single process.
"""

from __future__ import annotations

import argparse
import os
import sys

from mfmegatron.config import ConfigError, load_config, report_user_error
from mfmegatron.warnings_filter import quiet_expected_warnings

# Errors that are the user's to fix: reported as one line, not a stack of megatron internals.
# MFMEGATRON_TRACEBACK=1 shows the full traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, ValueError)


def _user_errors() -> tuple[type[BaseException], ...]:
    from mfmegatron.parallel import ParallelConfigError
    from mfmegatron.training.checkpoint import CheckpointError

    return USER_ERRORS + (ParallelConfigError, CheckpointError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mfmegatron-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    quiet_expected_warnings()
    try:
        from mfmegatron.training.config import TrainConfig

        config = load_config(TrainConfig, args.recipe, args.overrides)
        if args.print_config:
            import yaml

            from mfmegatron.config import to_dict

            print(yaml.safe_dump(to_dict(config), sort_keys=False))
            return 0
        from mfmegatron.training.trainer import run

        run(config)
    except _user_errors() as error:
        if os.environ.get("MFMEGATRON_TRACEBACK"):
            raise
        return report_user_error("mfmegatron-train", error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
