"""Cost of a MeanFlow distillation step against a plain flow-matching distillation step, on FLUX.

    python -m tools.bench_flux_meanflow                      # CPU: a small FLUX-shaped model
    python -m tools.bench_flux_meanflow --device cuda --preset gpu
    python -m tools.bench_flux_meanflow --device cuda --tangent-passes logsumexp triton
    python -m tools.bench_flux_meanflow --device cuda --spec te --fp8 tensorwise --steps flow_matching meanflow_differential

Measured side by side in one run, same model, same batch, same z_t:

- ``flow_matching``: teacher velocity (no grad), student forward at r = t, MSE, backward.
- ``meanflow_discrete``: the warm-up target (teacher ODE t -> r, ``--discrete-steps`` Heun steps),
  student forward, adaptive loss, backward.
- ``meanflow_differential``: teacher velocity, the student's primal (with graph) and tangent (no
  graph) in one forward-mode pass, adaptive loss, backward. ``--tangent-passes`` times it once per
  attention tangent pass (``logsumexp``, ``triton``, ... as in ``attention_jvp``), one row each;
  ``--tangent-fusion both`` adds a row with the elementwise tangent rules run eagerly.

``--spec`` picks the linears (``local``: megatron's local layers; ``te``: megatron's Transformer
Engine layers; ``auto``: TE when it imports on CUDA), ``--fp8`` their FP8 recipe (TE only; with
tensorwise and blockwise the teacher's weights become FP8 tensors unless
``--no-fp8-teacher-weights``); ``--steps`` times a subset.

For each: median step time, bytes saved for backward (autograd's saved tensors: the activation
memory a step holds; comparable on any device), and peak memory: the most bytes allocated during
the step above its start (on CPU from torch's allocation events through ``torch.profiler``, in a
separate untimed call), and on CUDA also the most bytes allocated in all, weights included. Ratios
are against ``flow_matching``. ``--profile DIR`` adds, per step, the operators that took the time
and (CUDA) what is live at the step's peak memory, by source line.

``--mfu`` adds, for the flow-matching and differential steps, their model FLOPs (the planner's
count, ``models/flux/cost.py``: forward, the JVP's tangent, backward; what ``tests/test_planner.py``
checks against ``torch.utils.flop_counter``), model TFLOP/s, MFU against this device's matmul
peak measured in the same run (``--matmul-size`` cubed products, bf16 on CUDA, the mean of 10
after warm-up), and the planner's predicted step time for the same shapes on one GPU (the FLOPs at
``Cluster.gemm_efficiency`` of its bf16 peak: the compute term, nothing else).
``tools/gpu_checks.sh``'s ``mfu`` stage runs it at FLUX.1 width and 1024 px.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from dataclasses import dataclass

import torch

from mfmegatron.jvp.attention import TANGENT_PASSES
from mfmegatron.jvp.fp8 import FP8_RECIPES, megatron_fp8_settings, precision_problem, teacher_weights_in_fp8
from tools.bench_attention_jvp import peak_bytes, quiet_profiler_logs
from mfmegatron.warnings_filter import quiet_expected_warnings

PRESETS = {
    # FLUX-shaped, small enough for 2 CPU cores.
    "cpu": dict(hidden=256, heads=4, double=2, single=4, image_tokens=256, text_tokens=64, batch=2),
    # Full FLUX.1 width and head size, fewer blocks, 1024 image tokens (512x512 px) + 512 text.
    "gpu": dict(hidden=3072, heads=24, double=2, single=4, image_tokens=1024, text_tokens=512, batch=1),
}


@dataclass
class StepResult:
    name: str
    seconds: list[float]
    saved_bytes: int
    peak_bytes: int | None  # above the step's start: the step's own activations and temporaries
    peak_total_bytes: int | None = None  # CUDA: everything allocated, weights included

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _build(args, device, dtype):
    from mfmegatron.parallel import initialize_parallel
    from models.flux.config import FluxConfig, flux_dev_config
    from models.flux.meanflow import FluxMeanFlowStudent, FluxTeacher, init_student_from_teacher
    from models.flux.model import FluxModel
    from models.flux.parallelize import teacher_with_fp8_weights

    initialize_parallel()
    head_dim = args.hidden // args.heads
    axes = (head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8)
    settings = dict(
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        kv_channels=head_dim,
        ffn_hidden_size=4 * args.hidden,
        num_double_layers=args.double,
        num_single_layers=args.single,
        axes_dims_rope=axes,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=device.type == "cpu",
        use_transformer_engine={"local": False, "te": True, "auto": None}[args.spec],
        **megatron_fp8_settings(args.fp8),
    )
    if args.recompute:
        settings.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    teacher_config: FluxConfig = flux_dev_config(**settings)
    student_config: FluxConfig = flux_dev_config(mean_flow_student=True, **settings)
    teacher = FluxModel(teacher_config).to(device)
    student = FluxModel(student_config).to(device)
    init_student_from_teacher(student, teacher)
    teacher.requires_grad_(False)
    if teacher_weights_in_fp8(args.fp8, args.fp8_teacher_weights):
        teacher = teacher_with_fp8_weights(teacher, device)
    with torch.no_grad():  # a student that has moved away from the teacher
        for param in student.interval_in.parameters():
            param.normal_(std=0.02)
    return FluxTeacher(teacher), FluxMeanFlowStudent(student), student


def _batch(args, device, dtype):
    from models.flux.meanflow import FluxCondition

    g = torch.Generator().manual_seed(0)
    b, s_img, s_txt = args.batch, args.image_tokens, args.text_tokens
    side = int(s_img**0.5)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(s_img // side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(ys), ys, xs], dim=-1).flatten(0, 1).float()
    cond = FluxCondition(
        encoder_hidden_states=torch.randn(b, s_txt, 4096, generator=g).to(device, dtype),
        pooled_projections=torch.randn(b, 768, generator=g).to(device, dtype),
        img_ids=img_ids.to(device),
        txt_ids=torch.zeros(s_txt, 3, device=device),
        guidance=torch.full((b,), 3.5, device=device, dtype=dtype),
    )
    z_t = torch.randn(b, s_img, 64, generator=g).to(device, dtype)
    t = torch.full((b,), 0.8, device=device, dtype=dtype)
    r = torch.full((b,), 0.3, device=device, dtype=dtype)
    return z_t, r, t, cond


def _steps(teacher, student, student_module, discrete_steps, variants):
    from mfmegatron.jvp.functional import tangent_fusion
    from mfmegatron.meanflow import (
        AdaptiveLossConfig,
        DiscreteTargetConfig,
        adaptive_weighted_loss,
        differential_target,
        discrete_target,
    )

    loss_config = AdaptiveLossConfig()
    discrete_config = DiscreteTargetConfig(solver="heun", num_steps=discrete_steps)

    def flow_matching(z_t, r, t, cond):
        with torch.no_grad():
            v = teacher.velocity(z_t, t, cond)
        u = student.mean_velocity(z_t, t, t, cond)
        (u - v).square().mean().backward()

    def meanflow_discrete(z_t, r, t, cond):
        target = discrete_target(teacher, z_t, r, t, cond, discrete_config)
        u = student.mean_velocity(z_t, r, t, cond)
        adaptive_weighted_loss(u, target.target, loss_config).loss.backward()

    def differential_step(name, tangent_pass, fused):
        def meanflow_differential(z_t, r, t, cond):
            # Every block holds the model's one config object.
            student_module.config.attention_tangent_pass = tangent_pass
            with tangent_fusion(fused):
                target = differential_target(teacher, student, z_t, r, t, cond)
            adaptive_weighted_loss(target.student_mean_velocity, target.target, loss_config).loss.backward()

        meanflow_differential.__name__ = name
        return meanflow_differential

    return [flow_matching, meanflow_discrete] + [differential_step(*variant) for variant in variants]


MATMUL_REPEATS = 10


def matmul_peak_tflops(device, dtype, size: int, repeats: int = MATMUL_REPEATS) -> float:
    """TFLOP/s of ``size``-cubed matrix products on this device: 3 warm-up products, then the
    mean of ``repeats`` (2·size³ FLOPs each), the device synchronised around them."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device, dtype)
    b = torch.randn(size, size, generator=g).to(device, dtype)
    for _ in range(3):
        torch.mm(a, b)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    _synchronize(device)
    mean = (time.perf_counter() - start) / repeats
    return 2 * size**3 / mean / 1e12


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(student_config, args) -> dict[str, float]:
    """Model FLOPs of one call of the flow-matching and differential steps on the batch, by the
    planner's count: flow matching a no-grad teacher forward and the student's forward and
    backward; differential a no-grad teacher forward and the student's forward with its tangent
    and backward. The teacher is the student without the interval embedder (``student=False``)."""
    from models.flux.cost import network_flops

    shapes = (args.image_tokens, args.text_tokens)
    teacher = network_flops(student_config, *shapes, student=False, training="frozen")
    student = network_flops(student_config, *shapes, student=True, training="full")
    return {
        "flow_matching": args.batch * (teacher.forward + student.forward + student.backward),
        "meanflow_differential": args.batch * (teacher.forward + student.forward + student.tangent + student.backward),
    }


def predicted_seconds(flops: float, recompute_flops: float = 0.0) -> float:
    """The planner's step time for ``flops`` on one GPU (``mfmegatron.planner.Cluster``'s defaults:
    its bf16 peak at its gemm efficiency; no communication on one GPU)."""
    from mfmegatron.planner import Cluster

    cluster = Cluster()
    return (flops + recompute_flops) / (cluster.peak_bf16_tflops * 1e12 * cluster.gemm_efficiency)


def _differential_variants(tangent_passes, tangent_fusion_choice) -> list[tuple[str, str, bool]]:
    """(row name, attention tangent pass, tangent rules fused) for each differential step timed."""
    variants = []
    for tangent_pass in tangent_passes:
        for fused in {"on": [True], "off": [False], "both": [True, False]}[tangent_fusion_choice]:
            labels = ([] if tangent_passes == ["auto"] else [tangent_pass]) + ([] if fused else ["eager rules"])
            name = "meanflow_differential" + (f"[{', '.join(labels)}]" if labels else "")
            variants.append((name, tangent_pass, fused))
    return variants


def _saved_bytes(step, args) -> int:
    """Bytes autograd keeps for backward during one step (counted once per storage)."""
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(*args)
    return total


def measure(step, args, module, device, warmup: int, repeats: int) -> StepResult:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step(*args)
        module.zero_grad(set_to_none=True)
    saved = _saved_bytes(step, args)
    module.zero_grad(set_to_none=True)
    seconds, peak, peak_total = [], None, None
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        at_start = torch.cuda.memory_allocated()
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step(*args)
        sync()
        seconds.append(time.perf_counter() - start)
        module.zero_grad(set_to_none=True)
    if device.type == "cuda":
        peak_total = torch.cuda.max_memory_allocated()
        peak = peak_total - at_start
    return StepResult(step.__name__, seconds, saved, peak, peak_total)


def profile_step(step, args, module, device, out_dir: str) -> None:
    """One profiled call of ``step``: ``<step>.ops.txt``, the operators and kernels that took the
    most time; on CUDA also ``<step>.peak.txt``, the allocations live at the step's peak grouped by
    the project source line that made them (from the allocator's history)."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, re.sub(r"[^A-Za-z0-9_.-]+", "-", step.__name__).strip("-"))
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with quiet_profiler_logs(), profile(activities=activities) as prof:
        step(*args)
        if cuda:
            torch.cuda.synchronize()
    module.zero_grad(set_to_none=True)
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    with open(stem + ".ops.txt", "w") as handle:
        handle.write(prof.key_averages().table(sort_by=sort_by, row_limit=60, max_name_column_width=90))
    print(f"profile: {stem}.ops.txt")
    if not cuda:
        return
    torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
    step(*args)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    module.zero_grad(set_to_none=True)
    with open(stem + ".peak.txt", "w") as handle:
        handle.write(_peak_allocations(snapshot, torch.cuda.current_device()))
    print(f"profile: {stem}.peak.txt")


def _peak_allocations(snapshot, device_index: int) -> str:
    """Replays the allocator's alloc / free events: at the largest running total (bytes above the
    step's start), which allocations are live, summed by the innermost project frame."""
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in snapshot["device_traces"][device_index]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], event.get("frames", []))
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    by_origin: dict[str, int] = {}
    for size, frames in at_peak.values():
        # Frames run innermost first: name the allocation by the project line closest to it.
        origin = next((_project_frame(frame) for frame in frames if _project_frame(frame)), "(outside the project)")
        by_origin[origin] = by_origin.get(origin, 0) + size
    lines = [f"peak above the step's start: {peak / 2**20:.1f} MiB in {len(at_peak)} allocations"]
    for origin, size in sorted(by_origin.items(), key=lambda item: -item[1]):
        lines.append(f"{size / 2**20:10.1f} MiB  {origin}")
    return "\n".join(lines) + "\n"


def _project_frame(frame) -> str | None:
    match = re.search(r"(?:^|/)((?:mfmegatron|models|tools)/[^/].*)$", frame["filename"])
    return f"{match.group(1)}:{frame['line']} {frame['name']}" if match else None


def _target_agreement(teacher, student, student_module, inputs, variants) -> dict:
    """With several differential variants: each one's target against the first's, as the largest
    difference relative to the target's largest entry (printed and returned)."""
    from mfmegatron.jvp.functional import tangent_fusion
    from mfmegatron.meanflow import differential_target

    if len(variants) < 2:
        return {}
    targets = {}
    for name, tangent_pass, fused in variants:
        student_module.config.attention_tangent_pass = tangent_pass
        with torch.no_grad(), tangent_fusion(fused):
            targets[name] = differential_target(teacher, student, *inputs).target.float()
    first, reference = variants[0][0], targets[variants[0][0]]
    agreement = {}
    for name, _, _ in variants[1:]:
        gap = ((targets[name] - reference).abs().max() / reference.abs().max()).item()
        agreement[name] = gap
        print(f"differential target, {name} vs {first}: max |difference| / max |target| = {gap:.2e}")
    return agreement


def report_mfu(results, student_config, args, device, dtype) -> dict:
    """Prints and returns the matmul peak and, per flow-matching and differential row, model
    FLOPs, TFLOP/s, MFU and the planner's prediction (the recompute's repeated forward added to
    the prediction's FLOPs, not to the model FLOPs)."""
    from models.flux.cost import network_flops

    size = args.matmul_size or (8192 if device.type == "cuda" else 512)
    peak = matmul_peak_tflops(device, dtype, size)
    print(f"matmul peak: {size}^3 {str(dtype).removeprefix('torch.')} products, mean of {MATMUL_REPEATS}: "
          f"{peak:.1f} TFLOP/s")
    flops = step_flops(student_config, args)
    recomputed = 0.0
    if args.recompute:
        recomputed = args.batch * network_flops(student_config, args.image_tokens, args.text_tokens,
                                                student=True).recomputed
    print(f"{'step':<46}{'TFLOP':>10}{'TFLOP/s':>10}{'MFU':>8}{'planned ms':>12}{'measured/planned':>18}")
    rows = {"matmul_size": size, "matmul_peak_tflops": peak, "steps": []}
    for result in results:
        kind = result.name.split("[")[0]
        if kind not in flops:
            continue
        rate = flops[kind] / result.median / 1e12
        planned = predicted_seconds(flops[kind], recomputed)
        print(f"{result.name:<46}{flops[kind] / 1e12:10.4g}{rate:10.4g}{rate / peak:8.1%}{planned * 1e3:12.4g}"
              f"{result.median / planned:18.3g}")
        rows["steps"].append(dict(name=result.name, flops=flops[kind], tflops_per_s=rate, mfu=rate / peak,
                                  median_s=result.median, planned_s=planned))
    by_kind = {row["name"].split("[")[0]: row for row in rows["steps"]}
    if {"flow_matching", "meanflow_differential"} <= by_kind.keys():
        ratio = by_kind["meanflow_differential"]["median_s"] / by_kind["flow_matching"]["median_s"]
        rows["differential_over_flow_matching"] = ratio
        print(f"differential / flow-matching time: {ratio:.2f}x (first differential row)")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_flux_meanflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: cpu or gpu by device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    for name in ("hidden", "heads", "double", "single", "image-tokens", "text-tokens", "batch"):
        parser.add_argument(f"--{name}", type=int, default=None, help="override the preset")
    parser.add_argument("--discrete-steps", type=int, default=4, help="Heun steps of the discrete target")
    parser.add_argument("--recompute", action="store_true", help="activation recompute of every block")
    parser.add_argument("--tangent-passes", nargs="+", default=["auto"], choices=TANGENT_PASSES,
                        help="attention tangent pass(es) of the differential step, one row each")
    parser.add_argument("--tangent-fusion", choices=["on", "off", "both"], default="on",
                        help="the tangent rules fused by torch.compile on CUDA (on), eager (off), or a row each")
    parser.add_argument("--spec", choices=["local", "te", "auto"], default="local",
                        help="the linears: megatron's local layers, its Transformer Engine layers, or TE when available")
    parser.add_argument("--fp8", choices=FP8_RECIPES, default="off", help="FP8 recipe of the TE linears' primal GEMMs")
    parser.add_argument("--no-fp8-teacher-weights", dest="fp8_teacher_weights", action="store_false",
                        help="with --fp8: keep the teacher's weights in bf16 (default: FP8 tensors)")
    parser.add_argument("--steps", nargs="+", default=None, choices=["flow_matching", "meanflow_discrete", "meanflow_differential"],
                        help="time only these steps (default: all; flow_matching is always the ratios' base)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--mfu", action="store_true",
                        help="model FLOPs, TFLOP/s and MFU against a matmul peak measured here, and the "
                             "planner's predicted time, for the flow-matching and differential steps")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="side of the matrices of the peak measurement (default 8192 on CUDA, 512 on CPU)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after the timings, profile one call of each step: its top operators and kernels "
                             "by time, and on CUDA what is allocated at its peak, by source line (text files in DIR)")
    args = parser.parse_args(argv)
    quiet_expected_warnings()

    device = torch.device(args.device)
    problem = precision_problem(args.fp8, {"local": False, "te": True, "auto": None}[args.spec], device.type)
    if problem is not None:
        parser.error(f"cannot run --spec {args.spec} --fp8 {args.fp8} here ({problem})")
    preset = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    for key, value in preset.items():
        if getattr(args, key.replace("-", "_")) is None:
            setattr(args, key, value)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    ]
    torch.manual_seed(0)
    teacher, student, student_module = _build(args, device, dtype)
    inputs = _batch(args, device, dtype)
    print(
        f"FLUX-shaped model: width {args.hidden}, {args.heads} heads, {args.double} double + "
        f"{args.single} single blocks, {args.image_tokens} image + {args.text_tokens} text tokens, "
        f"batch {args.batch}, {dtype}, {device}{', recompute' if args.recompute else ''}, "
        f"{student_module.spec_name} linears, fp8 {args.fp8}"
    )
    variants = _differential_variants(args.tangent_passes, args.tangent_fusion)
    steps = _steps(teacher, student, student_module, args.discrete_steps, variants)
    if args.steps:
        wanted = set(args.steps) | {"flow_matching"}
        steps = [step for step in steps if step.__name__.split("[")[0] in wanted]
    results = [measure(step, inputs, student_module, device, args.warmup, args.repeats) for step in steps]
    if device.type == "cpu":
        # The profiler's allocation events, in untimed calls after every timing: a profiled call
        # slows the calls timed after it in the same process.
        for step, result in zip(steps, results):
            result.peak_bytes = peak_bytes(lambda: step(*inputs), device)
            student_module.zero_grad(set_to_none=True)
    base = results[0]
    total_column = base.peak_total_bytes is not None
    print(
        f"{'step':<46}{'median ms':>11}{'x FM':>7}{'saved MiB':>11}{'x FM':>7}{'peak MiB':>10}{'x FM':>7}"
        + (f"{'total MiB':>11}{'x FM':>7}" if total_column else "")
    )
    rows = []
    for result in results:
        peak = f"{result.peak_bytes / 2**20:10.1f}{result.peak_bytes / base.peak_bytes:7.2f}"
        total = f"{result.peak_total_bytes / 2**20:11.1f}{result.peak_total_bytes / base.peak_total_bytes:7.2f}" if total_column else ""
        print(
            f"{result.name:<46}{result.median * 1e3:11.1f}{result.median / base.median:7.2f}"
            f"{result.saved_bytes / 2**20:11.1f}{result.saved_bytes / base.saved_bytes:7.2f}{peak}{total}"
        )
        rows.append(
            dict(name=result.name, median_s=result.median, time_ratio=result.median / base.median,
                 saved_bytes=result.saved_bytes, saved_ratio=result.saved_bytes / base.saved_bytes,
                 peak_bytes=result.peak_bytes, peak_ratio=result.peak_bytes / base.peak_bytes,
                 peak_total_bytes=result.peak_total_bytes,
                 peak_total_ratio=(result.peak_total_bytes / base.peak_total_bytes) if total_column else None)
        )
    mfu_rows = report_mfu(results, student_module.config, args, device, dtype) if args.mfu else None
    if args.profile:
        for step in steps:
            profile_step(step, inputs, student_module, device, args.profile)
    agreement = _target_agreement(teacher, student, student_module, inputs, variants)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": vars(args), "results": rows, "target_agreement": agreement, "mfu": mfu_rows},
                      handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
