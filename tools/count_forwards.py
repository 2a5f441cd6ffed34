"""Network forwards per sample of a recipe's training step, counted, next to the arithmetic.

    python -m tools.count_forwards recipes/flux_dev_8xh100.yaml [--steps 8]

Runs the recipe's objective (its time sampling, z_t construction, discrete solver, alignment and
micro-batching) on a tiny FLUX in one CPU process and counts, by wrapping the trainer's
`NetworkRunner`, how many batch rows each network evaluates: a no-grad forward counts 1 per row,
with a tangent (JVP) 2, a training pass 3 (forward and backward), with a tangent 4. The counts do
not depend on the model's size, so they hold for the recipe's real model. Three regimes: the
warm-up (discrete target), the differential target, and the differential target with the
alignment term. The gap checks of the warm-up switch (every `meanflow.gap_interval` steps) are
left out: `--steps` consecutive ordinary steps are averaged.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

from mfmegatron.planner import forward_counts

# The regimes a run goes through: the warm-up, then the differential target, then alignment
# (named as mfmegatron.planner.STEP_KINDS).
REGIMES = {
    "warm-up (discrete target)": ["warmup.policy=fixed", "warmup.switch_step=null", "meanflow.align_start_step=1000000"],
    "differential target": ["warmup.policy=fixed", "warmup.switch_step=0", "meanflow.align_start_step=1000000"],
    "differential + alignment": ["warmup.policy=fixed", "warmup.switch_step=0", "meanflow.align_start_step=0"],
}
TINY = ["model.preset=tiny", "model.teacher_checkpoint=null", "model.dtype=fp32", "model.image_size=64",
        "model.text_tokens=8", "data.text_encoder=dummy", "parallel.tensor_parallel_size=1",
        "parallel.pipeline_parallel_size=1", "parallel.sequence_parallel=false",
        "parallel.use_distributed_optimizer=false", "logging.progress_bar=false", "logging.tensorboard=false",
        "train.export_at_end=false", "train.sample_interval=0", "train.resume=false", "meanflow.gap_interval=0",
        "meanflow.z_source=teacher_ode"]


def expected_forwards(config, regime: str, moving_fraction: float) -> dict[str, float]:
    """The arithmetic (``mfmegatron.planner.forward_counts``): forwards per sample of one step of
    ``regime``, with ``moving_fraction`` of the samples having r < t."""
    counts = forward_counts(config, regime, moving_fraction)
    return {name: calls.forward_equivalents for name, calls in counts.items()}


def _count(trainer, steps: int) -> tuple[dict[str, float], float]:
    from mfmegatron.training.runner import NetworkRunner

    names = {id(trainer.teacher_runner): "teacher", id(trainer.student_runner): "student"}
    if getattr(trainer, "fake_runner", None) is not None:
        names[id(trainer.fake_runner)] = "fake"
    rows = defaultdict(float)
    evaluate, run_pass = NetworkRunner._evaluate, NetworkRunner.run_pass

    def counted_evaluate(runner, z, r, t, cond, tangents):
        rows[names[id(runner)]] += z.shape[0] * (1 if tangents is None else 2)
        return evaluate(runner, z, r, t, cond, tangents)

    def counted_run_pass(runner, training_pass, cond):
        rows[names[id(runner)]] += training_pass.z.shape[0] * (3 if training_pass.tangents is None else 4)
        return run_pass(runner, training_pass, cond)

    NetworkRunner._evaluate, NetworkRunner.run_pass = counted_evaluate, counted_run_pass
    moving, samples = 0.0, 0
    try:
        for _ in range(steps):
            stats = trainer.train_step()
            batch = trainer.config.data.micro_batch_size * trainer.config.parallel.num_microbatches
            samples += batch
            # Code before this stat existed set r < t on exactly round(0.25 B) samples: 0.25 for B = 4.
            moving += stats.get("time_r_below_t_fraction", 0.25) * batch
    finally:
        NetworkRunner._evaluate, NetworkRunner.run_pass = evaluate, run_pass
    return {name: rows[name] / samples for name in ("teacher", "student", "fake")}, moving / samples


def count_forwards(recipe: str, steps: int = 8) -> list[dict]:
    """Counted and expected forwards per sample for each regime of `recipe`."""
    from mfmegatron.config import load_config
    from mfmegatron.data import build_prompt_shards
    from mfmegatron.training.config import TrainConfig
    from mfmegatron.training.trainer import Trainer

    results = []
    with tempfile.TemporaryDirectory() as folder:
        prompts = Path(folder) / "prompts.txt"
        prompts.write_text("\n".join(f"prompt {i}" for i in range(64)) + "\n")
        build_prompt_shards([prompts], Path(folder) / "shards", samples_per_shard=16)
        for regime, overrides in REGIMES.items():
            config = load_config(
                TrainConfig, recipe,
                [*TINY, *overrides, f"data.shards={folder}/shards", f"train.output_dir={folder}/run"],
            )
            counted, moving = _count(Trainer(config), steps)
            results.append({"regime": regime, "counted": counted, "moving_fraction": moving,
                            "expected": expected_forwards(config, regime, moving)})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--steps", type=int, default=8, help="training steps averaged per regime")
    args = parser.parse_args(argv)
    from mfmegatron.warnings_filter import quiet_expected_warnings

    quiet_expected_warnings()
    print(f"network forwards per sample and step ({args.recipe}; JVP = 2, training pass = 3, with tangent 4)")
    print(f"{'regime':28s} {'r<t':>5s}  {'teacher':>15s} {'student':>15s} {'fake':>15s}   (counted / arithmetic)")
    for result in count_forwards(args.recipe, args.steps):
        cells = [f"{result['counted'][n]:6.2f} / {result['expected'][n]:6.2f}" for n in ("teacher", "student", "fake")]
        print(f"{result['regime']:28s} {result['moving_fraction']:5.2f}  " + " ".join(f"{c:>15s}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
