"""2-D toy demonstration of MeanFlow distillation with the discrete-target warm-up and trajectory
distribution alignment (the setting of arXiv 2605.17834, Figure 1).

For each target distribution a flow-matching teacher is trained on data; then four students are
distilled from it, data-free (z_t by the teacher ODE from noise), over several seeds:

  a  differential target from step 0 (plain MeanFlow distillation)
  b  discrete target only (teacher ODE solution, no student term)
  c  discrete warm-up, then the differential target (automatic or fixed switch)
  d  c plus trajectory distribution alignment

Each student is evaluated at 1 and 2 sampling steps against the target distribution and against
the teacher's 50-step samples (sliced Wasserstein, MMD) and with mode coverage. A run is counted
as diverged when a training loss is non-finite, or its samples are non-finite or blow up (sliced
Wasserstein to the target larger than `--blowup-factor` times that of the untrained student,
which is the teacher's Euler sampler at the same number of steps).

Writes `metrics.json` (config, teacher metrics, every run with its loss/phase history and a
1-/2-step quality curve, and a per-variant summary) and `samples.png` to `--output-dir`.

    python -m tools.toy_meanflow_demo              # full run, ~4 CPU-minutes (1 thread)
    python -m tools.toy_meanflow_demo --quick      # ~20 s smoke run

Settings measured in the README (the defaults are the first):

    --time-scale 1000   FLUX-like time embedding (sin/cos of 1000 t): the student's d/dt is rippled,
                        the differential target is far from the ODE solution (gap 4-70), a fails
                        to learn the 1-step map, alignment helps most.
    --time-scale 1      smooth time embedding: all targets work, the automatic switch fires.
    --time-scale 1 --discrete-solver euler --discrete-steps 2
                        a cheap, biased discrete target: switching to the differential target
                        removes the solver bias that discrete-only training keeps.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from mfmegatron.flow_matching import interpolate
from mfmegatron.meanflow import (
    AdaptiveLossConfig,
    AlignmentConfig,
    AutomaticWarmup,
    AutomaticWarmupConfig,
    DiscreteTargetConfig,
    FixedStepWarmup,
    MeanFlowDistillation,
    MeanFlowDistillationConfig,
    ResidualNormalizationConfig,
    TimeSamplerConfig,
    TrajectoryAlignment,
)
from mfmegatron.sampling import sample_student, sample_teacher
from models.toy import TOY_TARGETS, RingOfGaussians, ToyFlowConfig, ToyFlowTeacher, ToyMeanFlowStudent
from models.toy.metrics import mmd_rbf, sliced_wasserstein

VARIANTS = {
    "a": "differential from step 0",
    "b": "discrete only",
    "c": "warm-up -> differential",
    "d": "warm-up -> differential + alignment",
}
EVAL_STEPS = (1, 2)
TEACHER_REFERENCE_STEPS = 50


@dataclass
class DemoConfig:
    targets: list[str] = field(default_factory=lambda: ["ring", "checkerboard"])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: int = 3
    ring_std: float = 0.1
    # models
    width: int = 64
    depth: int = 3
    time_scale: float = 1000.0
    """Sinusoidal time-embedding scale: 1000 is FLUX-like; 1 gives a smooth d/dt of the student."""
    # teacher
    teacher_steps: int = 2000
    teacher_lr: float = 2e-3
    teacher_batch_size: int = 512
    # student
    student_steps: int = 600
    student_lr: float = 1e-3
    batch_size: int = 256
    grad_clip: float = 0.0
    z_source: str = "teacher_ode"
    z_ode_steps: int = 4
    discrete_solver: str = "heun"
    discrete_steps: int = 4
    scale_discrete_steps: bool = False
    loss_c: float = 1e-3
    residual_normalization: bool = False
    # warm-up (variants c, d)
    warmup_policy: str = "auto"
    warmup_steps: int = 200
    """Switch step of the fixed policy (`--warmup-policy fixed`)."""
    auto_threshold: float = 0.1
    """Automatic policy: switch when the EMA of the discrete/differential relative gap < this."""
    auto_check_every: int = 20
    auto_max_steps: int = 300
    """Automatic policy: switch here whatever the gap (fallback)."""
    # alignment (variant d)
    align_weight: float = 1.0
    align_start: int = 200
    """First student step with the alignment loss (variant d)."""
    align_rollout_steps: int = 2
    fake_lr: float = 1e-3
    fake_updates: int = 1
    # evaluation
    num_eval: int = 4000
    eval_every: int = 100
    """Every this many student steps, record 1- and 2-step sliced W to the target (1000 samples)."""
    blowup_factor: float = 3.0
    num_threads: int = 1
    output_dir: str = "outputs/toy_meanflow"


def build_target(name: str, config: DemoConfig):
    if name == "ring":
        return RingOfGaussians(std=config.ring_std)
    return TOY_TARGETS[name]()


def model_config(config: DemoConfig) -> ToyFlowConfig:
    return ToyFlowConfig(width=config.width, depth=config.depth, time_scale=config.time_scale)


def train_teacher(target, config: DemoConfig, seed: int) -> ToyFlowTeacher:
    """Plain flow matching on data samples: `||v(z_t, t) - (ε - x)||²`, t ~ U(0, 1)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    teacher = ToyFlowTeacher(model_config(config))
    optimizer = torch.optim.Adam(teacher.parameters(), lr=config.teacher_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.teacher_steps)
    batch_size = config.teacher_batch_size
    for _ in range(config.teacher_steps):
        x = target.sample(batch_size, generator)
        noise = torch.randn(batch_size, 2, generator=generator)
        t = torch.rand(batch_size, generator=generator)
        loss = (teacher.velocity(interpolate(x, noise, t), t) - (noise - x)).square().sum(dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    teacher.requires_grad_(False)
    return teacher.eval()


def make_warmup(variant: str, config: DemoConfig):
    if variant == "a":
        return FixedStepWarmup(0)
    if variant == "b":
        return FixedStepWarmup(None)
    if config.warmup_policy == "fixed":
        return FixedStepWarmup(config.warmup_steps)
    return AutomaticWarmup(
        AutomaticWarmupConfig(
            threshold=config.auto_threshold,
            check_every=config.auto_check_every,
            max_steps=config.auto_max_steps,
        )
    )


def distill_student(
    teacher: ToyFlowTeacher, variant: str, config: DemoConfig, seed: int, target, probe: tuple | None = None
) -> dict:
    """Distill one student; returns the trained student and its training record.

    `probe = (noise, reference)` enables the periodic sample-quality curve (`eval_history`)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    student = ToyMeanFlowStudent.from_teacher(teacher)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.student_lr)

    alignment, fake_optimizer = None, None
    align_weight = 0.0
    if variant == "d":
        fake = copy.deepcopy(teacher).requires_grad_(True).train()
        fake_optimizer = torch.optim.Adam(fake.parameters(), lr=config.fake_lr)
        alignment = TrajectoryAlignment(teacher, fake, AlignmentConfig(num_rollout_steps=config.align_rollout_steps))
        align_weight = config.align_weight

    objective = MeanFlowDistillation(
        teacher,
        student,
        MeanFlowDistillationConfig(
            time_sampling=TimeSamplerConfig(),
            z_source=config.z_source,
            z_ode_steps=config.z_ode_steps,
            discrete=DiscreteTargetConfig(
                solver=config.discrete_solver,
                num_steps=config.discrete_steps,
                scale_steps_with_interval=config.scale_discrete_steps,
            ),
            residual_normalization=ResidualNormalizationConfig(enabled=config.residual_normalization),
            loss=AdaptiveLossConfig(c=config.loss_c),
            align_weight=align_weight,
            align_start_step=config.align_start,
        ),
        warmup=make_warmup(variant, config),
        alignment=alignment,
    )

    record = {"diverged": False, "divergence_reason": None, "switch_step": None, "loss_history": [], "eval_history": []}
    phases = []
    for step in range(config.student_steps):
        if probe is not None and config.eval_every > 0 and step % config.eval_every == 0:
            record["eval_history"].append(probe_quality(student, step, *probe))
        noise = torch.randn(config.batch_size, 2, generator=generator)
        # Only the "data" z_source reads x; the default distillation is data-free.
        x = target.sample(config.batch_size, generator) if config.z_source == "data" else None
        output = objective.generator_loss(step, noise, None, x=x, generator=generator)
        if not math.isfinite(output.stats["loss"]):
            record.update(diverged=True, divergence_reason=f"non-finite loss at step {step}")
            break
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
        optimizer.step()
        phases.append(output.phase)

        if objective.alignment_active(step):
            for _ in range(config.fake_updates):
                fake_noise = torch.randn(config.batch_size, 2, generator=generator)
                fake_output = objective.fake_loss(fake_noise, None, generator)
                fake_optimizer.zero_grad(set_to_none=True)
                fake_output.loss.backward()
                fake_optimizer.step()

        if step % 10 == 0 or step == config.student_steps - 1:
            entry = {"step": step, "phase": output.phase}
            entry.update({k: round(v, 6) for k, v in output.stats.items()})
            record["loss_history"].append(entry)

    if probe is not None and config.eval_every > 0 and not record["diverged"]:
        record["eval_history"].append(probe_quality(student, config.student_steps, *probe))
    if phases and "differential" in phases:
        record["switch_step"] = phases.index("differential")
    record["warmup_state"] = objective.state_dict()["warmup"]
    record["student"] = student
    return record


def probe_quality(student, step: int, noise: torch.Tensor, reference: torch.Tensor) -> dict:
    entry = {"step": step}
    for num_steps in EVAL_STEPS:
        samples = sample_student(student, noise, None, num_steps=num_steps)
        finite = bool(torch.isfinite(samples).all())
        entry[f"sw_nfe{num_steps}"] = round(sliced_wasserstein(samples, reference), 4) if finite else None
    return entry


def sample_metrics(samples: torch.Tensor, reference: torch.Tensor, teacher_samples: torch.Tensor, target) -> dict:
    if not torch.isfinite(samples).all():
        return {"finite": False}
    metrics = {
        "finite": True,
        "sw_to_target": sliced_wasserstein(samples, reference),
        "sw_to_teacher50": sliced_wasserstein(samples, teacher_samples),
        "mmd_to_target": mmd_rbf(samples, reference),
        "mmd_to_teacher50": mmd_rbf(samples, teacher_samples),
    }
    metrics.update(target.mode_stats(samples))
    return metrics


def summarize(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def run_demo(config: DemoConfig) -> dict:
    torch.set_num_threads(config.num_threads)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start_time = time.time()
    results = {"config": asdict(config), "variants": VARIANTS, "targets": {}}
    figure_samples = {}

    total_runs = len(config.targets) * config.seeds * len(config.variants)
    progress = tqdm(total=total_runs + len(config.targets), desc="toy meanflow", unit="run")
    for target_index, target_name in enumerate(config.targets):
        target = build_target(target_name, config)
        progress.set_postfix_str(f"{target_name}: teacher")
        teacher = train_teacher(target, config, seed=10_000 + target_index)
        progress.update(1)

        eval_generator = torch.Generator().manual_seed(12_345 + target_index)
        reference = target.sample(config.num_eval, eval_generator)
        eval_noise = torch.randn(config.num_eval, 2, generator=eval_generator)
        teacher_samples = sample_teacher(teacher, eval_noise, None, TEACHER_REFERENCE_STEPS, "euler")
        probe_noise, probe_reference = eval_noise[:1000], reference[:1000]
        teacher_record = {}
        for num_steps in (*EVAL_STEPS, TEACHER_REFERENCE_STEPS):
            samples = sample_teacher(teacher, eval_noise, None, num_steps, "euler")
            teacher_record[f"euler_{num_steps}"] = sample_metrics(samples, reference, teacher_samples, target)
        figure_samples[target_name] = {"data": reference, "teacher50": teacher_samples}
        for num_steps in EVAL_STEPS:
            figure_samples[target_name][f"teacher{num_steps}"] = sample_teacher(teacher, eval_noise, None, num_steps)

        runs = []
        for seed in range(config.seeds):
            for variant in config.variants:
                progress.set_postfix_str(f"{target_name}: seed {seed} variant {variant}")
                run_start = time.time()
                record = distill_student(
                    teacher, variant, config, seed=seed, target=target, probe=(probe_noise, probe_reference)
                )
                student = record.pop("student")
                run = {"variant": variant, "seed": seed, "train_seconds": round(time.time() - run_start, 2)}
                run.update(record)
                for num_steps in EVAL_STEPS:
                    samples = sample_student(student, eval_noise, None, num_steps=num_steps)
                    metrics = sample_metrics(samples, reference, teacher_samples, target)
                    if not metrics["finite"]:
                        run["diverged"] = True
                        run["divergence_reason"] = run["divergence_reason"] or f"non-finite {num_steps}-step samples"
                    else:
                        # The untrained student (= teacher weights, zero interval embedding)
                        # samples exactly like the teacher's Euler sampler at the same NFE.
                        untrained = teacher_record[f"euler_{num_steps}"]["sw_to_target"]
                        if metrics["sw_to_target"] > config.blowup_factor * untrained:
                            run["diverged"] = True
                            run["divergence_reason"] = run["divergence_reason"] or (
                                f"{num_steps}-step sliced W {metrics['sw_to_target']:.3f} > "
                                f"{config.blowup_factor} x untrained student ({untrained:.3f})"
                            )
                    run[f"nfe{num_steps}"] = metrics
                    if seed == 0:
                        figure_samples[target_name][f"{variant}_nfe{num_steps}"] = samples
                runs.append(run)
                progress.update(1)

        summary = {}
        for variant in config.variants:
            variant_runs = [run for run in runs if run["variant"] == variant]
            healthy = [run for run in variant_runs if not run["diverged"]]
            entry = {
                "description": VARIANTS[variant],
                "diverged": sum(run["diverged"] for run in variant_runs),
                "seeds": len(variant_runs),
                "switch_steps": [run["switch_step"] for run in variant_runs],
                "switch_reasons": [run["warmup_state"].get("switch_reason") for run in variant_runs],
            }
            for num_steps in EVAL_STEPS:
                key = f"nfe{num_steps}"
                entry[key] = {
                    metric: summarize([run[key][metric] for run in healthy])
                    for metric in ("sw_to_target", "sw_to_teacher50", "mmd_to_target", "mmd_to_teacher50",
                                   "modes_covered", "high_quality_fraction")
                }
            summary[variant] = entry
        results["targets"][target_name] = {"teacher": teacher_record, "runs": runs, "summary": summary}
    progress.close()

    results["wall_seconds"] = round(time.time() - start_time, 1)
    (output_dir / "metrics.json").write_text(json.dumps(results, indent=1))
    plot_samples(figure_samples, config, output_dir / "samples.png")
    return results


def plot_samples(figure_samples: dict, config: DemoConfig, path: Path) -> None:
    """Rows: target x NFE; columns: data, teacher 50-step, teacher at that NFE, each student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, num_steps) for name in figure_samples for num_steps in EVAL_STEPS]
    columns = ["data", "teacher50", "teacher"] + list(config.variants)
    titles = {"data": "target data", "teacher50": "teacher, 50 steps", "teacher": "teacher (Euler)"}
    titles.update({v: f"({v}) {VARIANTS[v]}" for v in config.variants})
    figure, axes = plt.subplots(len(rows), len(columns), figsize=(2.4 * len(columns), 2.4 * len(rows)), squeeze=False)
    for row_index, (name, num_steps) in enumerate(rows):
        for column_index, column in enumerate(columns):
            axis = axes[row_index][column_index]
            if column in ("data", "teacher50"):
                key = column
            elif column == "teacher":
                key = f"teacher{num_steps}"
            else:
                key = f"{column}_nfe{num_steps}"
            samples = figure_samples[name].get(key)
            if samples is not None and torch.isfinite(samples).all():
                points = samples[:2000].numpy()
                axis.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4, linewidths=0)
            axis.set_xlim(-3, 3)
            axis.set_ylim(-3, 3)
            axis.set_xticks([])
            axis.set_yticks([])
            if row_index == 0:
                axis.set_title(titles[column], fontsize=7)
            if column_index == 0:
                axis.set_ylabel(f"{name}, {num_steps} step{'s' if num_steps > 1 else ''}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def format_table(results: dict) -> str:
    """Markdown table of the summary (mean ± std over non-diverged seeds)."""
    lines = [
        "| target | student | NFE | SW→target | SW→teacher50 | MMD→target | modes | in-mode frac | diverged | switch step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(stat: dict, digits: int = 3) -> str:
        if stat["mean"] is None:
            return "–"
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"

    for target_name, target_result in results["targets"].items():
        teacher = target_result["teacher"]
        for num_steps in (*EVAL_STEPS, TEACHER_REFERENCE_STEPS):
            m = teacher[f"euler_{num_steps}"]
            lines.append(
                f"| {target_name} | teacher Euler | {num_steps} | {m['sw_to_target']:.3f} | {m['sw_to_teacher50']:.3f} "
                f"| {m['mmd_to_target']:.4f} | {m['modes_covered']}/{m['num_modes']} "
                f"| {m['high_quality_fraction']:.3f} | – | – |"
            )
        for variant, entry in target_result["summary"].items():
            switches = ", ".join("never" if step is None else str(step) for step in entry["switch_steps"])
            reasons = sorted({reason for reason in entry["switch_reasons"] if reason})
            if reasons:
                switches += f" ({', '.join(reasons)})"
            for num_steps in EVAL_STEPS:
                s = entry[f"nfe{num_steps}"]
                lines.append(
                    f"| {target_name} | ({variant}) {entry['description']} | {num_steps} | {cell(s['sw_to_target'])} "
                    f"| {cell(s['sw_to_teacher50'])} | {cell(s['mmd_to_target'], 4)} | {cell(s['modes_covered'], 1)} "
                    f"| {cell(s['high_quality_fraction'])} | {entry['diverged']}/{entry['seeds']} | {switches} |"
                )
    return "\n".join(lines)


FLAG_CHOICES = {
    "z_source": ["teacher_ode", "data"],
    "discrete_solver": ["euler", "heun"],
    "warmup_policy": ["auto", "fixed"],
}


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every DemoConfig field is a flag, e.g. --student-lr 3e-3 --ring-std 0.05 --warmup-policy fixed.",
    )
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run (tiny budgets, 1 seed)")
    parser.add_argument("--targets", nargs="+", choices=sorted(TOY_TARGETS), default=defaults.targets)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=defaults.variants)
    parser.add_argument("--output-dir", default=defaults.output_dir)
    for name, value in asdict(defaults).items():
        if name in ("targets", "variants", "output_dir"):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value, choices=FLAG_CHOICES.get(name))
    args = parser.parse_args(argv)
    config = DemoConfig(**{name: getattr(args, name) for name in asdict(defaults)})
    if args.quick:
        config.seeds = 1
        config.teacher_steps = min(config.teacher_steps, 300)
        config.student_steps = min(config.student_steps, 60)
        config.warmup_steps = min(config.warmup_steps, 20)
        config.auto_check_every = min(config.auto_check_every, 10)
        config.auto_max_steps = min(config.auto_max_steps, 30)
        config.align_start = min(config.align_start, 30)
        config.num_eval = min(config.num_eval, 1000)
    return config


def main(argv: list[str] | None = None) -> dict:
    config = parse_args(argv)
    results = run_demo(config)
    print(format_table(results))
    print(f"wrote {Path(config.output_dir) / 'metrics.json'} and {Path(config.output_dir) / 'samples.png'}")
    print(f"wall time {results['wall_seconds']} s")
    return results


if __name__ == "__main__":
    main()
