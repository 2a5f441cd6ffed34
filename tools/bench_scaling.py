"""The real distillation step of a recipe over a grid of layouts, measured under torchrun.

    python -m tools.bench_scaling recipes/flux_tiny_cpu.yaml --grid tp=1,2 pp=1,2 --nproc 2 \\
        --steps 3 --warmup 1 --out outputs/bench_scaling data.shards=outputs/tiny_prompts

Grid axes (``--grid AXIS=V,V,...``; the product is run): ``tp`` (parallel.tensor_parallel_size),
``sp`` (parallel.sequence_parallel), ``pp`` (parallel.pipeline_parallel_size), ``ep``
(parallel.expert_parallel_size), ``etp`` (parallel.expert_tensor_parallel_size), ``mb``
(parallel.num_microbatches), ``recompute`` (model.recompute), ``dopt``
(parallel.use_distributed_optimizer) and ``dp``: the world size is
tp x pp x dp, or ``--nproc`` when the grid has no ``dp``. Other ``key=value`` arguments are recipe
overrides for every layout. A grid point that cannot run (the world does not split, the family
refuses the layout, EP without routed experts) is skipped with a one-line reason.

Grid points of one world size run in one torchrun launch, one after the other, each with a fresh
``Trainer`` (the real one: its networks, runners, optimizers and ``train_step``). Each runs
``--warmup`` steps, then ``--steps`` measured steps in which every rank times the step's parts
(exclusive wall time, CUDA synchronised around each part; Python's garbage collector paused) by
wrapping the trainer's own calls:

- ``data``: the batch and its conditioning (``Trainer._batch``);
- ``teacher evaluations``: every no-grad teacher call (z_t's ODE, the velocity, the discrete
  target's ODE, the alignment's teacher velocity);
- ``student evaluations``: the student's no-grad calls (the alignment's rollout, a warm-up gap
  check's JVP);
- ``student pass``: the MeanFlow training pass, forward (with the tangent in the differential
  phase, whose loss forms the target from it) and backward;
- ``alignment generator pass``: the alignment's student pass with gradient;
- ``fake network``: the fake network's evaluations and its flow-matching passes;
- ``gradient reduction``: megatron's ``finalize_model_grads`` (DP reduction, TP sums);
- ``optimizer``: the guarded optimizer steps (student and fake network);
- ``EMA``: the EMA update;
- ``rest``: the step time left over (the objective's own arithmetic, noise and times).

Collectives are counted by ``mfmegatron.parallel.collective_counter`` (bytes, calls and seconds
by group and kind; their seconds lie inside the parts above). Groups: tp, pp, dp, ep (the MoE
dispatcher's expert TP x EP group), etp and edp (the routed experts' data-parallel group), named
as the planner's cost models name them. Peak memory is
``torch.cuda.max_memory_allocated`` on GPU, the process's peak resident set (VmHWM, reset before
the measured steps) on CPU. Beside each measured byte count is the planner's
(``planner.step_traffic`` for each measured step's kind and r < t fraction); steps with a
warm-up gap check, which the planner leaves out, make the comparison inexact (column
``planned_exact``). ``bytes_equal_planned`` says whether every rank's bytes equal the planner's,
the MoE's routing-dependent ones summed over the ranks (the token all-to-all, and with EP the
expert-TP collectives; on gloo the expert-TP gather at least the plan, as gloo pads uneven parts:
``collective_counter.routed_sum_matches``), against the plan as the backend sends it
(``CollectiveVolume.as_sent_on``: gloo all-reduces the uneven expert-TP reduce-scatter).

Writes ``DIR/scaling.csv`` (one row per layout; times and bytes per step, of the rank that moves
the most bytes; peak memory the largest of any rank) and ``DIR/scaling.png`` (matplotlib). On CPU
with gloo the numbers check correctness and overheads; step times are the GPU's only on GPUs.
"""

from __future__ import annotations

import argparse
import csv
import gc
import itertools
import json
import math
import os
import subprocess
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Grid axis -> recipe key.
AXES = {
    "tp": "parallel.tensor_parallel_size",
    "sp": "parallel.sequence_parallel",
    "pp": "parallel.pipeline_parallel_size",
    "ep": "parallel.expert_parallel_size",
    "etp": "parallel.expert_tensor_parallel_size",
    "mb": "parallel.num_microbatches",
    "recompute": "model.recompute",
    "dopt": "parallel.use_distributed_optimizer",
}
PHASES = ("data", "teacher evaluations", "student evaluations", "student pass", "alignment generator pass",
          "fake network", "gradient reduction", "optimizer", "EMA")


def _column(name: str) -> str:
    return name.replace(" ", "_")


# --------------------------------------------------------------------------- the grid


def grid_points(grid: dict[str, list[str]], nproc: int) -> list[tuple[dict[str, str], int]]:
    """(axis values, world size) of every grid point, in the grid's order."""
    axes = list(grid)
    points = []
    for values in itertools.product(*(grid[axis] for axis in axes)):
        point = dict(zip(axes, values))
        world = nproc
        if "dp" in point:
            world = int(point.get("tp", 1)) * int(point.get("pp", 1)) * int(point["dp"])
        points.append((point, world))
    return points


def layout_name(point: dict[str, str]) -> str:
    return " ".join(f"{axis}={value}" for axis, value in point.items())


def point_overrides(point: dict[str, str]) -> list[str]:
    return [f"{AXES[axis]}={value}" for axis, value in point.items() if axis != "dp"]


def layout_problem(config, world_size: int) -> str | None:
    """Why the recipe cannot run at its layout on ``world_size`` ranks, or None."""
    from mfmegatron.parallel import ParallelConfig
    from mfmegatron.parallel.state import validate_parallel_sizes
    from mfmegatron.planner import for_planning
    from mfmegatron.training.family import get_family

    parallel = config.parallel
    try:
        validate_parallel_sizes(ParallelConfig(
            tensor_parallel_size=parallel.tensor_parallel_size,
            pipeline_parallel_size=parallel.pipeline_parallel_size,
            expert_parallel_size=parallel.expert_parallel_size,
            expert_tensor_parallel_size=parallel.expert_tensor_parallel_size), world_size)
    except ValueError as error:
        return str(error)
    family = get_family(config.model.family)
    if parallel.expert_parallel_size > 1 and "student_expert" not in family.rank_parameter_counts(for_planning(config)):
        return f"EP > 1: the {config.model.family} family has no routed experts"
    # The planner's hooks are optional for a family (``ModelFamily`` does not list them yet).
    return family.layout_problem(config) if hasattr(family, "layout_problem") else None


# --------------------------------------------------------------------------- inside the trainer


class PhaseTimer:
    """Exclusive wall time by phase: a phase called inside another is taken out of the outer
    one's time, so the parts of a step add up to the time they span."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open phase, the time of the phases inside it
        self._patched: list[tuple[object, str, object]] = []

    @contextmanager
    def phase(self, name: str):
        from mfmegatron.parallel.collective_counter import synchronize_device

        synchronize_device()
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            synchronize_device()
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - self._inner.pop()
            if self._inner:
                self._inner[-1] += elapsed

    def wrap(self, owner, attribute: str, phase) -> None:
        """Times ``owner.attribute`` calls under ``phase`` (a name, or a function of the call's
        arguments that returns one) until ``restore``."""
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            with self.phase(phase(*args, **kwargs) if callable(phase) else phase):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)
        self._patched.append((owner, attribute, original))

    def restore(self) -> None:
        for owner, attribute, original in reversed(self._patched):
            if isinstance(owner, types.ModuleType):
                setattr(owner, attribute, original)
            else:
                delattr(owner, attribute)  # the instance's wrapper; the class's method shows again
        self._patched = []


def _instrument(trainer, timer: PhaseTimer) -> None:
    import mfmegatron.training.trainer as trainer_module

    timer.wrap(trainer, "_batch", "data")
    runners = {"teacher evaluations": trainer.teacher_runner, "student evaluations": trainer.student_runner,
               "fake network": trainer.fake_runner}
    for phase, runner in runners.items():
        if runner is None:
            continue
        for method in ("velocity", "mean_velocity", "mean_velocity_jvp"):
            timer.wrap(runner, method, phase)
    timer.wrap(trainer.student_runner, "run_pass",
               lambda training_pass, cond: "student pass" if training_pass.name != "alignment"
               else "alignment generator pass")
    if trainer.fake_runner is not None:
        timer.wrap(trainer.fake_runner, "run_pass", "fake network")
    timer.wrap(trainer_module, "finalize_model_grads", "gradient reduction")
    timer.wrap(trainer, "_guarded_step", "optimizer")
    if trainer.ema is not None:
        timer.wrap(trainer.ema, "update", "EMA")


def _step_kind(trainer, stats: dict) -> str:
    from mfmegatron.planner import STEP_KINDS

    if trainer.flow_matching:
        return STEP_KINDS[3]
    if not stats["phase_differential"]:
        return STEP_KINDS[0]
    return STEP_KINDS[2] if "fake_loss" in stats else STEP_KINDS[1]


def _peak_memory_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as handle:  # resets VmHWM (Linux)
            handle.write("5")


def _peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_layout(recipe: str, overrides: list[str], warmup: int, steps: int, name: str) -> dict:
    """One rank's measurement of ``steps`` trainer steps after ``warmup`` at the layout the
    overrides give."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from mfmegatron.config import load_config
    from mfmegatron.parallel.collective_counter import CollectiveCounter, synchronize_device
    from mfmegatron.planner import CollectiveVolume, forward_counts, step_traffic
    from mfmegatron.training.config import TrainConfig
    from mfmegatron.training.trainer import Trainer

    config = load_config(TrainConfig, recipe, overrides)
    trainer = Trainer(config)
    rank = dist.get_rank()
    for step in range(warmup):
        trainer.train_step()
        if rank == 0:
            print(f"  {name}: warm-up step {step + 1}/{warmup}", flush=True)

    def ranks(group):
        return tuple(dist.get_process_group_ranks(group))

    groups = [("tp", parallel_state.get_tensor_model_parallel_group()),
              ("pp", parallel_state.get_pipeline_model_parallel_group()),
              ("dp", parallel_state.get_data_parallel_group()),
              ("dp", parallel_state.get_data_parallel_group(with_context_parallel=True)),  # megatron DDP's
              ("ep", parallel_state.get_expert_model_parallel_group()),
              # The MoE token dispatcher's group: expert TP x EP (EP's ranks at expert TP = 1).
              ("ep", parallel_state.get_expert_tensor_and_model_parallel_group()),
              ("etp", parallel_state.get_expert_tensor_parallel_group()),
              ("edp", parallel_state.get_expert_data_parallel_group())]  # routed experts' gradients
    # By group object (DP and EP can be the same ranks), then by ranks for other groups of them.
    names = {}
    for group_name, group in groups:
        names.setdefault(group, group_name)
    for group_name, group in groups:
        names.setdefault(ranks(group), group_name)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    planned, planned_exact, kinds, step_seconds = CollectiveVolume(), True, [], []
    plannable = hasattr(trainer.family, "pass_traffic")  # a family the planner can count
    timer = PhaseTimer()
    dist.barrier()
    _peak_memory_reset()
    # Python's cyclic garbage collector is paused while measuring, as timeit does: a full
    # collection (the previous layouts' trainers) would land in whichever part it interrupts.
    gc.collect()
    gc.disable()
    with CollectiveCounter(names) as counter:
        _instrument(trainer, timer)
        try:
            for step in range(steps):
                synchronize_device()
                start = time.perf_counter()
                stats = trainer.train_step()
                synchronize_device()
                step_seconds.append(time.perf_counter() - start)
                kind = _step_kind(trainer, stats)
                kinds.append(kind)
                if plannable:
                    forwards = forward_counts(config, kind, moving=stats.get("time_r_below_t_fraction"))
                    planned = planned + step_traffic(config, trainer.family, forwards, stage, trainer.dp_size)
                # The planner leaves out warm-up gap checks.
                planned_exact = planned_exact and "target_gap" not in stats
                if rank == 0:
                    print(f"  {name}: step {step + 1}/{steps} ({kind}) {step_seconds[-1]:.3f} s", flush=True)
        finally:
            timer.restore()
            gc.enable()
    parts = {phase: seconds / steps for phase, seconds in timer.seconds.items()}
    step_time = sum(step_seconds) / steps
    backend = dist.get_backend()
    planned = planned.as_sent_on(backend)
    result = {
        "rank": rank, "world": dist.get_world_size(), "tp": trainer.info.tensor_parallel_size,
        "pp": trainer.info.pipeline_parallel_size, "dp": trainer.dp_size, "ep": trainer.info.expert_parallel_size,
        "global_batch": config.data.micro_batch_size * config.parallel.num_microbatches * trainer.dp_size,
        "step_kinds": sorted(set(kinds)), "step_seconds": step_time,
        "parts": {phase: parts.get(phase, 0.0) for phase in PHASES},
        "bytes": {key: value / steps for key, value in counter.bytes.items()},
        "calls": {key: value / steps for key, value in counter.calls.items()},
        "collective_seconds": {key: value / steps for key, value in counter.seconds.items()},
        "planned_bytes": {key: value / steps for key, value in planned.bytes.items() if value},
        "planned": plannable, "planned_exact": plannable and planned_exact,
        "peak_memory_bytes": _peak_memory_bytes(),
        "memory_measure": "cuda max allocated" if torch.cuda.is_available() else "cpu peak RSS",
        "backend": backend,
    }
    result["parts"]["rest"] = step_time - sum(result["parts"].values())
    del trainer
    gc.collect()
    return result


def worker(spec_path: str) -> int:
    """Under torchrun: every layout of the spec, in order; rank 0 writes each one's results."""
    import torch.distributed as dist

    from mfmegatron.warnings_filter import quiet_expected_warnings

    quiet_expected_warnings()
    spec = json.loads(Path(spec_path).read_text())
    for layout in spec["layouts"]:
        result = measure_layout(spec["recipe"], layout["overrides"], spec["warmup"], spec["steps"], layout["name"])
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        if dist.get_rank() == 0:
            Path(layout["result"]).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()
    return 0


# --------------------------------------------------------------------------- the launcher


def _launch(world: int, spec_path: Path, log: Path, timeout: float) -> int:
    """torchrun on ``world`` ranks of this machine, its output in ``log`` (progress lines echoed);
    past ``timeout`` seconds it and its ranks are killed."""
    import psutil

    from mfmegatron.parallel.spawn import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
               "--master-port", str(free_port()), "-m", "tools.bench_scaling", "--worker", str(spec_path)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    with open(log, "rb") as reader:
        while True:
            try:
                code = process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                code = None
            while (line := reader.readline()).endswith(b"\n"):
                if line.startswith(b"  "):  # the worker's progress lines
                    print(line.decode(errors="replace").rstrip(), flush=True)
            reader.seek(-len(line), os.SEEK_CUR)  # a line still being written: read it again
            if code is not None:
                return code
            if time.monotonic() > deadline:
                # torchrun starts each rank in a session of its own: kill them one by one.
                processes = psutil.Process(process.pid).children(recursive=True) + [psutil.Process(process.pid)]
                for child in processes:
                    child.kill()
                process.wait()
                print(f"torchrun on {world} ranks passed --timeout {timeout:g} s: killed", flush=True)
                return -9


def _row(name: str, point: dict[str, str], ranks: list[dict], reference: float | None) -> dict:
    """The CSV row of one layout from every rank's result: times and bytes of the rank that
    moves the most bytes, peak memory of any rank."""
    busiest = max(ranks, key=lambda result: (sum(result["bytes"].values()), -result["rank"]))
    per_rank = busiest["global_batch"] / busiest["world"] / busiest["step_seconds"]
    row = {
        "layout": name, "world": busiest["world"], "tp": busiest["tp"], "pp": busiest["pp"], "dp": busiest["dp"],
        "ep": busiest["ep"], **{axis: value for axis, value in point.items() if axis not in ("tp", "pp", "dp", "ep")},
        "step_kinds": "; ".join(busiest["step_kinds"]), "global_batch": busiest["global_batch"],
        "rank_reported": busiest["rank"],
        "step_seconds": busiest["step_seconds"], "samples_per_second_per_rank": per_rank,
        "efficiency": per_rank / reference if reference else 1.0,
    }
    row.update({f"seconds_{_column(phase)}": seconds for phase, seconds in busiest["parts"].items()})
    row["peak_memory_gb"] = max(result["peak_memory_bytes"] for result in ranks) / 1e9
    row["memory_measure"] = busiest["memory_measure"]
    row["bytes_equal_planned"] = _bytes_equal(ranks) if busiest["planned"] else ""
    row["planned_exact"] = all(result["planned_exact"] for result in ranks)
    keys = sorted(set(busiest["bytes"]) | set(busiest["planned_bytes"]))
    for key in keys:
        row[f"bytes_{_column(key)}"] = busiest["bytes"].get(key, 0)
        row[f"planned_bytes_{_column(key)}"] = busiest["planned_bytes"].get(key, 0) if busiest["planned"] else ""
        row[f"calls_{_column(key)}"] = busiest["calls"].get(key, 0)
        row[f"seconds_{_column(key)}"] = busiest["collective_seconds"].get(key, 0.0)
    return row


def _bytes_equal(ranks: list[dict]) -> bool:
    """Every rank's bytes equal the planner's, but for the MoE's routing-dependent ones (the token
    exchange; with EP, expert TP's), which are compared summed over the ranks, what the planner's
    balanced routing says (``collective_counter.routing_dependent``)."""
    from mfmegatron.parallel.collective_counter import routed_sum_matches, routing_dependent

    keys = set().union(*(set(result["bytes"]) | set(result["planned_bytes"]) for result in ranks))
    routed = {key for key in keys if routing_dependent(key, ranks[0]["ep"])}
    for result in ranks:
        for key in keys - routed:
            if not math.isclose(result["bytes"].get(key, 0), result["planned_bytes"].get(key, 0), rel_tol=1e-9):
                return False
    return all(routed_sum_matches(key, sum(result["bytes"].get(key, 0) for result in ranks),
                                  sum(result["planned_bytes"].get(key, 0) for result in ranks), ranks[0]["backend"],
                                  rel_tol=1e-9)  # per-step averages
               for key in routed)


def write_csv(rows: list[dict], path: Path) -> None:
    columns = []
    for row in rows:
        columns += [column for column in row if column not in columns]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: f"{value:.6g}" if isinstance(value, float) else value for key, value in row.items()})


def write_plot(rows: list[dict], path: Path) -> str | None:
    """Step-time breakdown and per-rank throughput by layout; returns why there is no plot, or None."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no plot"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["layout"] for row in rows]
    figure, (times, throughput) = plt.subplots(1, 2, figsize=(6 + 1.2 * len(rows), 4.5))
    bottom = [0.0] * len(rows)
    for phase in (*PHASES, "rest"):
        values = [row.get(f"seconds_{_column(phase)}", 0.0) * 1e3 for row in rows]
        if any(values):
            times.bar(names, values, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, values)]
    times.set_ylabel("ms per step")
    times.set_title("step time by part")
    times.legend(fontsize=7)
    bars = throughput.bar(names, [row["samples_per_second_per_rank"] for row in rows])
    throughput.bar_label(bars, labels=[f"{row['efficiency']:.0%}" for row in rows], fontsize=8)
    throughput.set_ylabel("samples/s per rank")
    throughput.set_title("throughput per rank (efficiency)")
    for axes in (times, throughput):
        axes.tick_params(axis="x", labelrotation=30, labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None


def _parse_grid(items: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Grid axes (``AXIS=V,V``) and recipe overrides (every other ``key=value``)."""
    grid, overrides = {}, []
    for item in items:
        key, _, values = item.partition("=")
        if key in AXES or key == "dp":
            grid[key] = [value for value in values.split(",") if value]
        else:
            overrides.append(item)
    return grid, overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides for every layout")
    parser.add_argument("--grid", nargs="+", default=[], metavar="AXIS=V,V",
                        help=f"layout axes: {', '.join([*AXES, 'dp'])}")
    parser.add_argument("--nproc", type=int, default=1, help="ranks when the grid has no dp axis (default 1)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per layout (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (default 1)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_scaling"))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per torchrun launch")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.recipe is None:
        parser.error("the recipe is required")

    from mfmegatron.config import ConfigError, load_config
    from mfmegatron.training.config import TrainConfig
    from mfmegatron.warnings_filter import quiet_expected_warnings

    quiet_expected_warnings()
    grid, grid_overrides = _parse_grid(args.grid)
    overrides = [*args.overrides, *grid_overrides]
    out = args.out.resolve()
    (out / "results").mkdir(parents=True, exist_ok=True)
    by_world: dict[int, list[dict]] = {}
    points = []
    for index, (point, world) in enumerate(grid_points(grid, args.nproc)):
        name = layout_name(point) or "recipe layout"
        layout_overrides = [*overrides, *point_overrides(point), f"train.output_dir={out / 'runs' / str(index)}"]
        try:
            problem = layout_problem(load_config(TrainConfig, args.recipe, layout_overrides), world)
        except (ConfigError, ValueError) as error:
            problem = str(error)
        if problem:
            print(f"skip {name} on {world} ranks: {problem}", flush=True)
            continue
        result = out / "results" / f"{index}.json"
        by_world.setdefault(world, []).append({"name": name, "overrides": layout_overrides, "result": str(result)})
        points.append((name, point, result))
    if not points:
        print("error: no layout of the grid can run", file=sys.stderr)
        return 2
    for world, layouts in sorted(by_world.items()):
        print(f"torchrun on {world} ranks: {', '.join(layout['name'] for layout in layouts)}", flush=True)
        spec = out / f"spec_{world}.json"
        spec.write_text(json.dumps({"recipe": str(Path(args.recipe).resolve()), "steps": args.steps,
                                    "warmup": args.warmup, "layouts": layouts}, indent=1))
        code = _launch(world, spec, out / f"torchrun_{world}.log", args.timeout)
        if code:
            print(f"torchrun on {world} ranks failed (exit {code}); see {out / f'torchrun_{world}.log'}", flush=True)
    rows, reference = [], None
    # The reference: the first layout of the smallest world that ran.
    measured = [(name, point, json.loads(result.read_text())) for name, point, result in points if result.exists()]
    if not measured:
        print("error: no layout was measured", file=sys.stderr)
        return 1
    smallest = min(ranks[0]["world"] for _, _, ranks in measured)
    first = next(ranks for _, _, ranks in measured if ranks[0]["world"] == smallest)
    reference = _row("", {}, first, None)["samples_per_second_per_rank"]
    for name, point, ranks in measured:
        rows.append(_row(name, point, ranks, reference))
        row = rows[-1]
        print(f"{name}: world {row['world']}, {row['step_seconds'] * 1e3:.1f} ms per step, "
              f"{row['samples_per_second_per_rank']:.3g} samples/s per rank, efficiency {row['efficiency']:.0%}, "
              + ({True: "bytes equal the planner's", False: "bytes differ from the planner's",
                  "": "no planner count for this family"}[row["bytes_equal_planned"]]), flush=True)
    write_csv(rows, out / "scaling.csv")
    print(f"wrote {out / 'scaling.csv'}", flush=True)
    why_not = write_plot(rows, out / "scaling.png")
    print(why_not or f"wrote {out / 'scaling.png'}", flush=True)
    return 0 if len(measured) == len(points) else 1


if __name__ == "__main__":
    sys.exit(main())
