"""Transformer Engine and FP8 on one Hopper GPU: the ``te`` stage of ``tools/gpu_checks.sh``.

    python -m tools.te_checks --out DIR                        # every check, on CUDA
    python -m tools.te_checks --checks equality fp8 --recipes tensorwise
    python -m tools.te_checks --device cpu --checks equality   # the plumbing only: local vs local

Checks (each prints ``PASS`` / ``FAIL`` / ``SKIP`` lines with its numbers):

- ``equality``: FLUX (a FLUX-width slice, same weights) built with the TE spec in bf16 against the
  local spec in bf16, both measured against the local spec in float32: the MeanFlow student's
  forward, its ``forward_jvp`` (output and tangent) and the differential MeanFlow target. PASS when
  the TE spec's error is within bf16's own (at most 1.5x the local bf16 error, plus 1e-3). Also
  (INFO lines) the alternative to bf16 tangents: every tangent GEMM in FP8 with its own current
  scales (``fp8_tangent_gemm``), its tangent and target errors against bf16 tangents'.
- ``fp8``: each FP8 recipe (teacher weights as FP8 tensors with tensorwise and blockwise) against
  TE bf16: relative error of the
  student's output, of the gradient of a fixed linear loss with respect to the input latents, and
  of the differential target; with how many primal GEMMs ran in FP8 and how many tangent GEMMs
  ran (all outside the FP8 region, by construction of ``mfmegatron/jvp/fp8.py``). Stated, with
  PASS when finite and FP8 was engaged.
- ``recompute``: delayed scaling with activation recompute against without: the student's
  gradients must agree (the recompute replays the first forward's FP8 scales: TE's
  activation-recompute context in ``mfmegatron/jvp/recompute.py``).
- ``bench``: ``tools.bench_flux_meanflow`` at 1024 px (4096 image + 512 text tokens), micro-batch
  1 and 2: flow-matching and differential steps with local bf16, TE bf16 and TE FP8 — time, peak
  memory, and the issue's aims (FP8 >= 1.2x faster than bf16 at micro-batch 2 for both steps, the
  differential / flow-matching ratio <= 1.3x).
- ``trainer``: the tiny recipe with FP8 and the distributed optimizer (megatron's TE fused Adam
  when TE imports): 24 steps uninterrupted, and 12 steps then resumed to 24; every tensor of the
  two final checkpoints compared. On CPU (``--device cpu``): 4 and 2 + 2 steps, local layers, no
  FP8 — the runs and the comparison themselves.

Relative errors are ``||a - b|| / ||b||`` over the whole tensor.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from mfmegatron.jvp import fp8 as fp8_state
from mfmegatron.jvp.fp8 import FP8_RECIPES

CHECKS = ("equality", "fp8", "recompute", "trainer", "bench")  # the longest last: a time-out cuts it only
REPO = Path(__file__).resolve().parents[1]

# A FLUX-width slice: FLUX.1's head size and MLP ratio, 1 double + 2 single blocks.
GPU_MODEL = dict(hidden=1536, heads=12, double=1, single=2, image_tokens=1024, text_tokens=256, batch=2)
CPU_MODEL = dict(hidden=64, heads=2, double=1, single=1, image_tokens=16, text_tokens=16, batch=2)


def report(status: str, name: str, detail: str) -> bool:
    print(f"{status:<4} {name}: {detail}", flush=True)
    return status != "FAIL"


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double(), reference.double()
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------- models


def _variant(shape: dict, spec: str, fp8: str = "off", dtype=torch.bfloat16, recompute=False,
             fp8_teacher_weights=True, device="cuda"):
    """(teacher, student, student module) of the bench's FLUX shape at this spec / precision."""
    from tools.bench_flux_meanflow import _build

    args = SimpleNamespace(**shape, spec=spec, fp8=fp8, recompute=recompute, fp8_teacher_weights=fp8_teacher_weights)
    return _build(args, torch.device(device), dtype)


def _copy_weights(target_teacher, target_student, source_teacher, source_student) -> None:
    """Same weights everywhere: every parameter copied (and cast, or quantized into an FP8
    parameter) from the reference networks, by name."""
    with torch.no_grad():
        for target, source in ((target_teacher.model, source_teacher.model), (target_student, source_student)):
            sources = dict(source.named_parameters())
            for name, param in target.named_parameters():
                param.copy_(sources[name].to(param.dtype) if param.dtype.is_floating_point else sources[name])


def _inputs(shape: dict, device, dtype):
    """The bench's batch drawn in bf16 and cast to ``dtype``: the float32 reference sees exactly
    the bf16 runs' values (t rounded to bf16 moves the time embedding's fastest sinusoids, and
    with them the tangent, by far more than the networks' own rounding)."""
    import dataclasses

    from tools.bench_flux_meanflow import _batch

    z_t, r, t, cond = _batch(SimpleNamespace(**shape), torch.device(device), torch.bfloat16)
    cond = dataclasses.replace(
        cond, encoder_hidden_states=cond.encoder_hidden_states.to(dtype),
        pooled_projections=cond.pooled_projections.to(dtype), guidance=cond.guidance.to(dtype))
    return z_t.to(dtype), r.to(dtype), t.to(dtype), cond


def _student_outputs(teacher, student, student_module, inputs, loss_weight):
    """u, du (the forward_jvp along (v, 0, 1)), the differential target, and the gradient of
    ``sum(u * loss_weight)`` with respect to the latents."""
    from mfmegatron.meanflow import differential_target
    from mfmegatron.meanflow.targets import meanflow_tangents

    z_t, r, t, cond = inputs
    with torch.no_grad():
        v = teacher.velocity(z_t, t, cond)
        u, du = student.mean_velocity_jvp(z_t, r, t, cond, meanflow_tangents(v.float(), r, t))
        target = differential_target(teacher, student, z_t, r, t, cond, teacher_velocity=v).target
    z = z_t.detach().clone().requires_grad_(True)
    out = student.mean_velocity(z, r, t, cond)
    (out.float() * loss_weight).sum().backward()
    student_module.zero_grad(set_to_none=True)
    return {"forward": out.detach(), "jvp_output": u, "jvp_tangent": du, "target": target, "input_grad": z.grad}


fp8_tangent_calls = {"fp8": 0, "bf16": 0}


def fp8_tangent_gemm(tx, weight):
    """A tangent GEMM in FP8 with its own current per-tensor scales (``torch._scaled_mm``, E4M3):
    the alternative to bf16 tangents, for measuring only. Shapes FP8 cannot take stay bf16."""
    import torch.nn.functional as F

    if tx is None:
        return None
    with torch.no_grad():
        if fp8_state._is_te_quantized(weight):
            weight = weight.dequantize()
        rows = tx.reshape(-1, tx.shape[-1])
        if rows.shape[0] % 16 or weight.shape[0] % 16 or weight.shape[1] % 16:
            fp8_tangent_calls["bf16"] += 1
            return F.linear(tx, weight)
        fp8_tangent_calls["fp8"] += 1
        largest = torch.finfo(torch.float8_e4m3fn).max
        scale_a = rows.abs().amax().float().clamp_min(1e-12) / largest
        scale_b = weight.abs().amax().float().clamp_min(1e-12) / largest
        a = (rows.float() / scale_a).to(torch.float8_e4m3fn)
        b = (weight.float() / scale_b).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=tx.dtype)
        return out.reshape(*tx.shape[:-1], weight.shape[0])


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_equality(args) -> bool:
    shape = args.model
    reference = _variant(shape, "local", dtype=torch.float32, device=args.device)
    inputs32 = _inputs(shape, args.device, torch.float32)
    weight = torch.randn(inputs32[0].shape, generator=torch.Generator().manual_seed(5)).to(args.device)
    expected = _student_outputs(*reference, inputs32, weight)
    spec = "local" if args.device == "cpu" else "te"  # on CPU: the plumbing, local against local
    results = {}
    for name in ("local", spec):
        variant = _variant(shape, name, device=args.device)
        _copy_weights(variant[0], variant[2], reference[0], reference[2])
        results[name] = _student_outputs(*variant, _inputs(shape, args.device, torch.bfloat16), weight)
        del variant
        _free()
    if True:
        # The alternative the issue asks to measure: the same bf16 networks (TE on CUDA) with every
        # tangent GEMM in FP8 (E4M3, its own current per-tensor scales: no shared scaling state).
        variant = _variant(shape, spec, device=args.device)
        _copy_weights(variant[0], variant[2], reference[0], reference[2])
        bf16_tangent = fp8_state.tangent_gemm
        fp8_state.tangent_gemm = fp8_tangent_gemm
        fp8_tangent_calls.update(fp8=0, bf16=0)
        try:
            results["fp8 tangents"] = _student_outputs(*variant, _inputs(shape, args.device, torch.bfloat16), weight)
        finally:
            fp8_state.tangent_gemm = bf16_tangent
        del variant
        _free()
        for key in ("jvp_tangent", "target"):
            bf16_error = relative_error(results[spec][key], expected[key])
            fp8_error = relative_error(results["fp8 tangents"][key], expected[key])
            verdict = "within" if fp8_error <= bf16_error * 1.5 + 1e-3 else "NOT within"
            report("INFO", f"tangent GEMMs in FP8 (current scaling), {key}",
                   f"vs local fp32: {fp8_error:.3e}, bf16 tangents {bf16_error:.3e}: {verdict} bf16's error "
                   f"({fp8_tangent_calls['fp8']} tangent GEMMs in FP8, {fp8_tangent_calls['bf16']} too small for it)")
    ok = True
    for key in ("forward", "jvp_output", "jvp_tangent", "target", "input_grad"):
        local_error = relative_error(results["local"][key], expected[key])
        spec_error = relative_error(results[spec][key], expected[key])
        direct = relative_error(results[spec][key], results["local"][key])
        passed = spec_error <= 1.5 * local_error + 1e-3
        ok &= report("PASS" if passed else "FAIL", f"equality {spec} bf16 vs local bf16, {key}",
                     f"vs local fp32: {spec} {spec_error:.3e}, local bf16 {local_error:.3e}; {spec} vs local bf16 {direct:.3e}")
    return ok


def check_fp8(args) -> bool:
    shape = args.model
    reference = _variant(shape, "te", device=args.device)
    inputs = _inputs(shape, args.device, torch.bfloat16)
    weight = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(5)).to(args.device)
    expected = _student_outputs(*reference, inputs, weight)
    ok = True
    for recipe in args.recipes:
        try:
            variant = _variant(shape, "te", fp8=recipe, device=args.device)
            _copy_weights(variant[0], variant[2], reference[0], reference[2])
            fp8_state.reset_counters()
            results = _student_outputs(*variant, inputs, weight)
            counts = dict(fp8_state.counters)
        except Exception as error:  # a recipe the GPU or the pruned TE library cannot run
            ok &= report("FAIL", f"fp8 {recipe}", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            continue
        finally:
            _free()
        errors = {key: relative_error(results[key], expected[key]) for key in ("forward", "input_grad", "target", "jvp_tangent")}
        finite = all(torch.isfinite(torch.tensor(e)) for e in errors.values())
        engaged = counts["fp8_primal_regions"] > 0
        teacher_fp8 = fp8_state.teacher_weights_in_fp8(recipe, True)
        ok &= report("PASS" if finite and engaged else "FAIL",
                     f"fp8 {recipe} vs TE bf16 (teacher weights {'FP8' if teacher_fp8 else 'bf16'})",
                     ", ".join(f"{k} {v:.3e}" for k, v in errors.items())
                     + f"; FP8 primal GEMMs {counts['fp8_primal_regions']} of {counts['primal_regions']}, "
                       f"tangent GEMMs {counts['tangent_gemms']} (bf16, outside FP8)")
    return ok


def check_recompute(args) -> bool:
    shape = args.model
    reference = _variant(shape, "te", device=args.device)
    grads = {}
    for recompute in (False, True):
        variant = _variant(shape, "te", fp8="delayed", recompute=recompute, device=args.device)
        _copy_weights(variant[0], variant[2], reference[0], reference[2])
        teacher, student, module = variant
        z_t, r, t, cond = _inputs(shape, args.device, torch.bfloat16)
        from mfmegatron.meanflow import differential_target

        for _ in range(2):  # a second step, so the amax history is not the initial one
            module.zero_grad(set_to_none=True)
            target = differential_target(teacher, student, z_t, r, t, cond)
            (target.student_mean_velocity.float() - target.target).square().mean().backward()
        grads[recompute] = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
        del variant, teacher, student, module
        _free()
    worst = max(relative_error(grads[True][n], grads[False][n]) for n in grads[False])
    return report("PASS" if worst <= 1e-3 else "FAIL", "recompute with delayed FP8",
                  f"largest relative gradient difference, recompute vs not: {worst:.3e} over {len(grads[False])} parameters")


def check_bench(args) -> bool:
    from tools import bench_flux_meanflow

    runs = [("local bf16", ["--spec", "local"]), ("TE bf16", ["--spec", "te"])]
    runs += [(f"TE fp8 {recipe}", ["--spec", "te", "--fp8", recipe]) for recipe in args.bench_recipes]
    table = {}
    for batch in (1, 2):
        for label, extra in runs:
            path = Path(args.out) / f"bench_{label.replace(' ', '_')}_mb{batch}.json"
            argv = ["--device", args.device, "--image-tokens", "4096", "--text-tokens", "512", "--batch", str(batch),
                    "--steps", "flow_matching", "meanflow_differential", "--tangent-passes", "triton",
                    "--warmup", "1", "--repeats", "3", "--json", str(path), *extra]
            try:
                bench_flux_meanflow.main(argv)
                rows = {row["name"].split("[")[0]: row for row in json.loads(path.read_text())["results"]}
                table[(label, batch)] = rows
            except (Exception, SystemExit) as error:  # SystemExit: the bench refused its arguments
                report("FAIL", f"bench {label} mb{batch}", f"{type(error).__name__}: {error}")
            _free()
    print(f"{'variant':<26}{'mb':>3}{'FM ms':>9}{'diff ms':>9}{'diff/FM':>8}{'FM peak GiB':>12}{'diff peak GiB':>14}")
    for (label, batch), rows in table.items():
        fm, diff = rows["flow_matching"], rows["meanflow_differential"]
        print(f"{label:<26}{batch:>3}{fm['median_s'] * 1e3:9.1f}{diff['median_s'] * 1e3:9.1f}"
              f"{diff['median_s'] / fm['median_s']:8.2f}{fm['peak_total_bytes'] / 2**30:12.2f}{diff['peak_total_bytes'] / 2**30:14.2f}")
    ok = bool(table)
    base = table.get(("local bf16", 2))
    for recipe in args.bench_recipes:
        rows = table.get((f"TE fp8 {recipe}", 2))
        if base is None or rows is None:
            continue
        fm_speedup = base["flow_matching"]["median_s"] / rows["flow_matching"]["median_s"]
        diff_speedup = base["meanflow_differential"]["median_s"] / rows["meanflow_differential"]["median_s"]
        ratio = rows["meanflow_differential"]["median_s"] / rows["flow_matching"]["median_s"]
        met = fm_speedup >= 1.2 and diff_speedup >= 1.2 and ratio <= 1.3
        report("PASS" if met else "MISS", f"bench aim, fp8 {recipe} vs local bf16 at mb2",
               f"flow matching {fm_speedup:.2f}x, differential {diff_speedup:.2f}x faster; differential/FM {ratio:.2f} "
               "(aim: >= 1.2x both, ratio <= 1.3)")
    return ok


def _checkpoint_tensors(directory: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = directory.parent / (directory.name + ".pt")
    dcp_to_torch_save(str(directory), str(target))
    state = torch.load(target, weights_only=False)

    def flatten(prefix, value, out):
        if isinstance(value, dict):
            for key, item in value.items():
                flatten(f"{prefix}{key}.", item, out)
        elif isinstance(value, torch.Tensor):
            out[prefix[:-1]] = value
        return out

    return flatten("", state, {})


def check_trainer(args) -> bool:
    from megatron.core import optimizer as megatron_optimizer

    adam = f"{megatron_optimizer.Adam.__module__}.{megatron_optimizer.Adam.__name__}"
    work = Path(args.out) / "trainer"
    python = sys.executable
    subprocess.run([python, "-m", "tools.build_prompt_shards", "examples/prompts.txt", "--out", str(work / "prompts"),
                    "--samples-per-shard", "16", "--overwrite"], cwd=REPO, check=True, capture_output=True)
    # On CPU (the test of this script): the same runs and comparison, local layers without FP8.
    cuda = args.device != "cpu"
    recipe = args.trainer_recipe if cuda else "off"
    steps = 24 if cuda else 4
    common = ["recipes/flux_tiny_cpu.yaml", "parallel.tensor_parallel_size=1", "parallel.use_distributed_optimizer=true",
              "model.dtype=bf16", f"model.fp8={recipe}", f"model.use_transformer_engine={str(cuda).lower()}",
              f"data.shards={work / 'prompts'}", "optim.lr_decay_style=constant", f"train.save_interval={steps // 2}",
              "train.sample_interval=0", "train.export_at_end=false", "logging.progress_bar=false",
              "logging.tensorboard=false"]

    def train(output, steps):
        command = [python, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "mfmegatron.train",
                   *common, f"train.output_dir={output}", f"train.steps={steps}"]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command[-2:])} failed:\n" + result.stderr[-3000:])

    start = time.time()
    try:
        train(work / "straight", steps)
        train(work / "resumed", steps // 2)
        train(work / "resumed", steps)
    except RuntimeError as error:
        print(error)
        return report("FAIL", "trainer fp8 + distributed optimizer", f"a run failed (optimizer {adam})")
    name = f"checkpoints/step_{steps:08d}"
    straight, resumed = _checkpoint_tensors(work / "straight" / name), _checkpoint_tensors(work / "resumed" / name)
    differing = [key for key in straight if key not in resumed or not torch.equal(straight[key], resumed[key])]
    weights = [key for key in straight if "optimizer" not in key]
    differing_weights = [key for key in differing if "optimizer" not in key]
    detail = (f"{len(weights)} weight tensors, {len(differing_weights)} differ; {len(straight)} tensors in all, "
              f"{len(differing)} differ{' (' + ', '.join(differing[:5]) + ')' if differing else ''}; optimizer {adam}; "
              f"fp8 {recipe}; {time.time() - start:.0f}s")
    return report("PASS" if not differing_weights else "FAIL", "trainer resume equals uninterrupted", detail)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.te_checks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--recipes", nargs="+", choices=FP8_RECIPES[1:], default=list(FP8_RECIPES[1:]),
                        help="FP8 recipes of the fp8 check")
    parser.add_argument("--bench-recipes", nargs="+", choices=FP8_RECIPES[1:], default=["tensorwise"],
                        help="FP8 recipes benchmarked")
    parser.add_argument("--trainer-recipe", choices=FP8_RECIPES[1:], default="tensorwise")
    parser.add_argument("--out", default=os.environ.get("OUT", "outputs/te_checks"))
    args = parser.parse_args(argv)
    from mfmegatron.warnings_filter import quiet_expected_warnings

    quiet_expected_warnings()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.model = CPU_MODEL if args.device == "cpu" else GPU_MODEL
    te_error = fp8_state.transformer_engine_import_error()
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()})" if args.device == "cuda" else "")
          + f"; Transformer Engine: {'imports' if te_error is None else te_error}", flush=True)
    ok = True
    for name in args.checks:
        needs_te = args.device == "cpu" or te_error is not None
        if name not in ("equality", "trainer") and needs_te:
            report("SKIP", name, "needs Transformer Engine on CUDA")
            continue
        if name in ("equality", "trainer") and args.device == "cuda" and te_error is not None:
            report("SKIP", name, f"Transformer Engine does not import ({te_error})")
            continue
        start = time.time()
        try:
            ok &= globals()[f"check_{name}"](args)
        except Exception as error:
            import traceback

            traceback.print_exc()
            ok &= report("FAIL", name, f"{type(error).__name__}: {error}")
        print(f"---- {name}: {time.time() - start:.0f}s", flush=True)
        _free()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
