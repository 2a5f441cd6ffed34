"""Per-rank memory of the trainer's real step, measured on CPU, beside the planner's count.

    python -m tools.measure_memory recipes/flux_tiny_cpu.yaml --nproc 2 --steps 2 \\
        data.shards=outputs/tiny_prompts parallel.tensor_parallel_size=2 model.recompute=true

Every rank (gloo, spawned processes) builds the real ``Trainer`` of the recipe, runs ``--warmup``
steps (Adam's moments exist after the first), then measures:

- what it holds between steps, component by component, as the tensor storages reachable from the
  trainer's own objects (deduplicated by storage, whole storages: megatron's padded gradient
  buffers count whole): teacher weights; student weights; student gradients (the parameters'
  ``main_grad`` buffers); the student optimizer's state (float32 main parameters, Adam moments);
  the EMA; the fake network (its weights, gradients and optimizer state). Everything else alive
  (every tensor storage the garbage collector finds, less those) is ``other``: the data loader's
  prompts, RoPE tables, RNG states, the text conditioning;
- the activations: the peak of live tensor bytes during each measured ``train_step`` above the
  bytes live at its start, from the profiler's CPU allocation events (``profile_memory``: every
  allocation and free of the CPU allocator, run in time order; ``tools.bench_attention_jvp``'s
  ``peak_bytes``). Everything the step allocates counts: saved-for-backward tensors, a block's
  temporaries, the no-grad evaluations' batches, the gradients' and optimizer's temporaries.

Beside each component is ``rank_memory``'s count (``mfmegatron/training/memory.py``, what
``tools.memory_plan`` prints) and their ratio. Counts are bytes (no GB rounding). CPU only: the
peak is of tensor bytes, not of the process (whose resident set is mostly library code), and on
a GPU ``torch.cuda.max_memory_allocated`` (``tools/bench_scaling``) is the measurement to use.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

# rank_memory's labels, in order; the fake network's label carries its kind ("fake network (...)").
COMPONENTS = ("teacher weights", "student weights", "student gradients", "student main params + Adam",
              "student EMA", "fake network", "activations")


def _storage(tensor) -> tuple[int, int] | None:
    """(data pointer, bytes) of a tensor's whole storage; None for a meta or empty one."""
    import torch

    if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
        return None
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        return None
    return storage.data_ptr(), storage.nbytes()


def _reachable_tensors(root, stop: set[int]) -> list:
    """Tensors reachable from ``root`` through containers and plain objects' attributes (not
    through modules, functions, classes or ids in ``stop``): an optimizer's state, an EMA's
    copies."""
    import types

    import torch

    found, seen, queue = [], set(stop), [root]
    skip = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, type,
            types.CodeType, types.FrameType, torch.nn.Module, str, bytes)
    while queue:
        obj = queue.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            continue
        if isinstance(obj, skip) and obj is not root:
            continue
        queue.extend(gc.get_referents(obj))
    return found


def _module_tensors(module) -> list:
    """A module's weights and buffers (``nn.Module``'s own methods: megatron's DDP wrapper names
    its gradient buffers ``buffers``)."""
    import torch

    return [*torch.nn.Module.parameters(module), *torch.nn.Module.buffers(module)]


def _gradient_tensors(module) -> list:
    """The gradient buffers megatron's DDP gives each parameter (``main_grad``), or ``.grad``."""
    out = []
    for param in module.parameters():
        grad = getattr(param, "main_grad", None)
        out.append(grad if grad is not None else param.grad)
    return [g for g in out if g is not None]


def held_bytes(trainer) -> dict[str, int]:
    """Bytes of the storages the trainer holds between steps, by component (``COMPONENTS``
    without the activations, plus ``other``); each storage counted once, in the first
    component that reaches it."""
    assigned: dict[int, int] = {}
    result: dict[str, int] = {}

    def take(label: str, tensors) -> None:
        total = 0
        for tensor in tensors:
            key = _storage(tensor)
            if key is not None and key[0] not in assigned:
                assigned[key[0]] = key[1]
                total += key[1]
        result[label] = result.get(label, 0) + total

    models = [m for m in (trainer.teacher, trainer.student, getattr(trainer, "fake", None)) if m is not None]
    stop = {id(m) for m in models}
    if trainer.teacher is not None:
        take("teacher weights", _module_tensors(trainer.teacher))
    take("student weights", _module_tensors(trainer.student))
    take("student gradients", _gradient_tensors(trainer.student))
    fake = getattr(trainer, "fake", None)
    if fake is not None:
        # A LoRA fake network shares the teacher's frozen weights (already counted there).
        take("fake network", _module_tensors(fake))
        take("fake network", _gradient_tensors(fake))
    take("student main params + Adam", _reachable_tensors(trainer.optimizer, stop))
    if trainer.ema is not None:
        take("student EMA", _reachable_tensors(trainer.ema, stop))
    if fake is not None:
        take("fake network", _reachable_tensors(trainer.fake_optimizer, stop))
    gc.collect()
    import torch

    everything = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    take("other", everything)
    return result


def step_peak_bytes(step) -> int:
    """Peak live tensor bytes during ``step()`` above those live at its start (CPU)."""
    import torch

    from tools.bench_attention_jvp import peak_bytes

    return peak_bytes(step, torch.device("cpu"))


def measure_layouts(recipe: str | None, override_sets: list[list[str]], warmup: int, steps: int) -> list[dict]:
    """One rank: ``measure_rank`` for each set of overrides in turn (one process: the imports and
    process groups are paid once)."""
    return [measure_rank(recipe, overrides, warmup, steps) for overrides in override_sets]


def measure_rank(recipe: str | None, overrides: list[str], warmup: int, steps: int) -> dict:
    """One rank: held bytes by component, each measured step's kind and activation peak, and the
    planner's count for the same recipe and world."""
    import torch.distributed as dist

    from mfmegatron.config import load_config
    from mfmegatron.training.config import TrainConfig
    from mfmegatron.training.memory import rank_memory
    from mfmegatron.training.trainer import Trainer
    from mfmegatron.warnings_filter import quiet_expected_warnings
    from tools.bench_scaling import _step_kind

    quiet_expected_warnings()
    config = load_config(TrainConfig, recipe, overrides)
    trainer = Trainer(config)
    for _ in range(warmup):
        trainer.train_step()
    gc.collect()
    held = held_bytes(trainer)
    measured = []
    for _ in range(steps):
        gc.collect()
        box = {}

        def step():
            box["stats"] = trainer.train_step()

        peak = step_peak_bytes(step)
        measured.append({"kind": _step_kind(trainer, box["stats"]), "activations": peak})
    planned = rank_memory(config, dist.get_world_size())
    planned_items = {}
    for item in planned.items:
        label = "fake network" if item.label.startswith("fake network") else item.label
        planned_items[label] = item.bytes
    result = {"rank": dist.get_rank(), "layout": planned.layout + (", recompute" if config.model.recompute else ""),
            "held": held, "steps": measured, "planned": planned_items,
            "planned_activations_formula": next(i.how for i in planned.items if i.label == "activations")}
    del trainer
    gc.collect()
    return result


def compare(result: dict) -> dict[str, tuple[float, float]]:
    """(measured, planned) bytes by component; activations: the largest step peak."""
    out = {}
    for label in COMPONENTS:
        if label == "activations":
            measured = max(step["activations"] for step in result["steps"])
        else:
            measured = result["held"].get(label, 0)
        planned = result["planned"].get(label, 0.0)
        if measured or planned:
            out[label] = (float(measured), float(planned))
    counted = [label for label in out]
    out["total (counted components)"] = (sum(out[label][0] for label in counted),
                                        sum(out[label][1] for label in counted))
    return out


def measure(recipe: str | None, override_sets: list[list[str]], nproc: int, warmup: int = 1,
            steps: int = 1) -> list[list[dict]]:
    """Results by rank, then by override set."""
    from mfmegatron.parallel import run_on_ranks

    return run_on_ranks(measure_layouts, nproc, recipe, override_sets, warmup, steps)


def report(results: list[dict]) -> list[str]:
    lines = []
    for result in results:
        lines.append(f"rank {result['rank']}: {result['layout']}; steps: "
                     + ", ".join(f"{s['kind']} {s['activations'] / 2**20:.2f} MiB" for s in result["steps"]))
        lines.append(f"  {'component':<30}{'measured MiB':>14}{'planned MiB':>13}{'planned/measured':>18}")
        for label, (measured, planned) in compare(result).items():
            ratio = f"{planned / measured:.3f}" if measured else "-"
            lines.append(f"  {label:<30}{measured / 2**20:14.3f}{planned / 2**20:13.3f}{ratio:>18}")
        other = result["held"].get("other", 0)
        lines.append(f"  {'not counted (other storages)':<30}{other / 2**20:14.3f}")
        lines.append(f"  planned activations: {result['planned_activations_formula']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.measure_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    parser.add_argument("--nproc", type=int, default=2, help="gloo ranks (the world size)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--steps", type=int, default=1, help="measured steps")
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_intermixed_args(argv)
    results = [by_rank[0] for by_rank in measure(args.recipe, [args.overrides], args.nproc, args.warmup, args.steps)]
    print("\n".join(report(results)))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
