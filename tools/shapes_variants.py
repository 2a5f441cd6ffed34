"""The shapes world's comparison of distillation variants, over seeds, as one table.

    python -m tools.shapes_variants --out outputs/shapes_variants
    python -m tools.shapes_variants --out outputs/shapes_variants --seeds 0 1 2 --variants a c --steps 300
    python -m tools.shapes_variants --out outputs/shapes_variants --table-only

Each variant is the README's main job (``recipes/shapes_distill_cpu.yaml``, the shipped teacher)
with one change, run under torchrun for every seed:

  a  differential target from step 0 (no warm-up)
  b  discrete target only (the warm-up never ends)
  c  warm-up on the discrete target, then the differential target (the recipe as it is)
  d  (c) plus the trajectory distribution alignment loss (a full fake network)
  e  (c) with the automatic switch (on the self-consistency gap; first check from 1/6 of the
     steps, fallback at 2/3). Not from step 0: the student starts as the teacher, and there the
     gap on the sampled intervals is already small (0.04 on the shipped teacher), so a check at
     step 0 would switch at once and (e) would be (a)
  f  (e) from a teacher with a smooth time embedding (``--smooth-teacher``: a teacher trained
     with ``model.overrides.time_embedding_scale=1``, sinusoid of t instead of FLUX's 1000·t),
     to see whether the 1000·t embedding is what keeps the automatic switch from firing

The table's "switch" column is the first step of the differential phase (mean over seeds; "never",
or "fallback" when every seed switched only at the fallback step).

Evaluation runs every ``--eval-interval`` steps on the recipe's held-out prompts; the log's
per-step teacher forwards are summed, so the table shows each variant twice: at equal training
steps (the last evaluation) and at equal teacher forward passes (each run's last evaluation whose
cumulative teacher forwards per sample stay within the smallest total any variant reached).
Scores are the shapes scorer's ``overall`` (mean ± standard deviation over seeds) and the paired
RMSE to the teacher's 50-step samples.

A run whose ``log.jsonl`` already holds its last evaluation is not run again (``--table-only``
runs nothing): an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RECIPE = "recipes/shapes_distill_cpu.yaml"

# variant -> (description, recipe overrides)
VARIANTS = {
    "a": ("differential from step 0", ["warmup.policy=fixed", "warmup.switch_step=0"]),
    "b": ("discrete only", ["warmup.policy=fixed", "warmup.switch_step=null"]),
    "c": ("warm-up, then differential", []),
    "d": ("(c) + alignment", ["alignment.enabled=true", "meanflow.align_weight=0.5", "alignment.fake_lr=3e-4"]),
    "e": ("(c), automatic switch", ["warmup.policy=auto", "warmup.auto.min_steps={first_check}",
                                    "warmup.auto.max_steps={fallback}"]),
    "f": ("(e), smooth time embedding", ["warmup.policy=auto", "warmup.auto.min_steps={first_check}",
                                         "warmup.auto.max_steps={fallback}",
                                         "model.teacher_checkpoint={smooth_teacher}"]),
}


def fallback_step(steps: int) -> int:
    """The automatic switch's fallback (``warmup.auto.max_steps``) in a run of ``steps``."""
    return 2 * steps // 3


def run_directory(out: Path, variant: str, seed: int) -> Path:
    return out / f"{variant}_seed{seed}"


def run_command(out: Path, variant: str, seed: int, steps: int, eval_interval: int, nproc: int,
                extra: list[str], smooth_teacher: str | None = None) -> list[str]:
    overrides = [
        f"train.seed={seed}",
        f"train.steps={steps}",
        f"train.eval_interval={eval_interval}",
        f"train.save_interval={steps}",
        f"train.output_dir={run_directory(out, variant, seed)}",
        "train.export_at_end=false",
        "logging.log_interval=1",  # every step's teacher forwards, for the equal-forwards column
        "logging.progress_bar=false",
        *(o.format(first_check=steps // 6, fallback=fallback_step(steps), smooth_teacher=smooth_teacher)
          for o in VARIANTS[variant][1]),
        *extra,
    ]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "-m", "mfmegatron.train", RECIPE, *overrides]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluations(rows: list[dict]) -> list[dict]:
    """The run's evaluations, each with ``teacher_forwards``: the teacher forward passes per
    sample summed over the steps before it (the log has one row per step, ``forwards_teacher``)."""
    total, evals = 0.0, []
    for row in sorted(rows, key=lambda r: r["step"]):
        total += row.get("forwards_teacher", 0.0)
        if any(key.startswith("eval_student_") for key in row):
            evals.append(dict(row, teacher_forwards=total))
    return evals


def finished(directory: Path, steps: int) -> bool:
    log = directory / "log.jsonl"
    if not log.exists():
        return False
    evals = evaluations(read_log(log))
    return bool(evals) and evals[-1]["step"] >= steps


def switch_step(rows: list[dict]) -> int | None:
    """The first step of the differential phase in a run's log (None: it never switched)."""
    return next((row["step"] for row in sorted(rows, key=lambda r: r["step"]) if row.get("phase_differential")), None)


def describe_switch(steps: list[int | None], fallback: int | None) -> str:
    if any(step is None for step in steps):
        return "never" if all(step is None for step in steps) else "/".join(str(s) if s else "never" for s in steps)
    if fallback is not None and all(step == fallback for step in steps):
        return "fallback"
    return f"{statistics.mean(steps):.0f}"


def summarise(runs: dict[str, dict[int, list[dict]]], student_steps: tuple[int, ...] = (1, 2, 4),
              switches: dict[str, list[int | None]] | None = None, fallback: int | None = None) -> str:
    """``runs``: variant -> seed -> that run's ``evaluations``. A markdown table: a row per
    variant and measure (equal steps; equal teacher forwards), a column per student step count."""
    budget = min(evals[-1]["teacher_forwards"] for seeds in runs.values() for evals in seeds.values())

    def cell(picked: list[dict], steps: int) -> str:
        scores = [row.get(f"eval_student_{steps}_overall") for row in picked]
        rmse = [row[f"eval_student_{steps}_paired_rmse"] for row in picked]
        spread = lambda values: statistics.stdev(values) if len(values) > 1 else 0.0  # noqa: E731
        text = ""
        if None not in scores:
            text = f"{statistics.mean(scores):.3f} ± {spread(scores):.3f}, "
        return text + f"rmse {statistics.mean(rmse):.3f}"

    switches = switches or {}
    header = "| variant | switch | compared at | seeds | step | teacher fwd/sample | " + " | ".join(
        f"student {s} step{'s' if s > 1 else ''}" for s in student_steps) + " |"
    lines = [header, "|" + "---|" * (6 + len(student_steps))]
    for variant, seeds in runs.items():
        at_steps = [evals[-1] for evals in seeds.values()]
        at_forwards = [[row for row in evals if row["teacher_forwards"] <= budget + 1e-9][-1]
                       if evals[0]["teacher_forwards"] <= budget + 1e-9 else evals[0]
                       for evals in seeds.values()]
        for label, picked in (("equal steps", at_steps), ("equal teacher forwards", at_forwards)):
            step = "/".join(sorted({str(row["step"]) for row in picked}))
            forwards = statistics.mean(row["teacher_forwards"] for row in picked)
            cells = " | ".join(cell(picked, s) for s in student_steps)
            switch = describe_switch(switches[variant], fallback) if variant in switches else "-"
            lines.append(f"| {variant} {VARIANTS[variant][0]} | {switch} | {label} | {len(picked)} | {step} | "
                         f"{forwards:.0f} | {cells} |")
    teacher = next(iter(next(iter(runs.values())).values()))[-1]
    reference = [f"teacher {s} steps {teacher[f'eval_teacher_{s}_overall']:.3f}"
                 for s in (50, 4, 2) if f"eval_teacher_{s}_overall" in teacher]
    lines.append("")
    lines.append("Teacher (same prompts and noise): " + ", ".join(reference) + f"; teacher-forward budget {budget:.0f}.")
    return "\n".join(lines)


def describe_teachers(out: Path, runs: dict[str, dict[int, list[dict]]]) -> str:
    """Which teacher checkpoint each variant's runs distilled, from their recorded config.json."""
    lines = []
    for variant, seeds in runs.items():
        used = {json.loads((run_directory(out, variant, seed) / "config.json").read_text())["model"]["teacher_checkpoint"]
                for seed in seeds}
        lines.append(f"Variant {variant}'s teacher: {', '.join(sorted(used))}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.shapes_variants", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="a folder per run (variant_seedN) and table.md")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--nproc", type=int, default=2, help="gloo ranks per run")
    parser.add_argument("--table-only", action="store_true", help="run nothing; tabulate finished runs")
    parser.add_argument("--smooth-teacher", metavar="DIST_CHECKPOINT",
                        help="variant f's teacher: trained with model.overrides.time_embedding_scale=1")
    parser.add_argument("overrides", nargs="*", help="key=value overrides given to every run")
    args = parser.parse_intermixed_args(argv)
    if args.steps % args.eval_interval:
        parser.error(f"--steps {args.steps} must be a multiple of --eval-interval {args.eval_interval}")
    if "f" in args.variants and not args.smooth_teacher:
        parser.error("variant f needs --smooth-teacher (a teacher trained with model.overrides.time_embedding_scale=1)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    runs: dict[str, dict[int, list[dict]]] = {}
    switches: dict[str, list[int | None]] = {}
    total = len(args.variants) * len(args.seeds)
    for index, (variant, seed) in enumerate(((v, s) for v in args.variants for s in args.seeds), start=1):
        directory = run_directory(out, variant, seed)
        if not args.table_only and not finished(directory, args.steps):
            command = run_command(out, variant, seed, args.steps, args.eval_interval, args.nproc, args.overrides,
                                  args.smooth_teacher)
            print(f"[{index}/{total}] variant {variant} ({VARIANTS[variant][0]}), seed {seed}: running", flush=True)
            start = time.time()
            directory.mkdir(parents=True, exist_ok=True)
            with open(directory / "train.out", "w") as log:
                result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
            if result.returncode:
                print(f"error: variant {variant} seed {seed} failed (exit {result.returncode}); see "
                      f"{directory / 'train.out'}", file=sys.stderr)
                return 1
            print(f"[{index}/{total}] done in {time.time() - start:.0f} s", flush=True)
        if finished(directory, args.steps):
            rows = read_log(directory / "log.jsonl")
            runs.setdefault(variant, {})[seed] = evaluations(rows)
            switches.setdefault(variant, []).append(switch_step(rows))
        else:
            print(f"[{index}/{total}] variant {variant} seed {seed}: no finished run in {directory}", flush=True)
    if not runs:
        print("error: no finished runs to tabulate", file=sys.stderr)
        return 1
    # The log counts steps from 1, so a switch at (0-based) step max_steps is logged one later.
    table = summarise(runs, switches=switches, fallback=fallback_step(args.steps) + 1)
    table += "\n" + describe_teachers(out, runs)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
