"""Cost of a differential MeanFlow step against a flow-matching step on HunyuanImage 3.0.

    python -m tools.bench_hunyuan_image3_meanflow            # CPU: 64 experts top-8, small width
    python -m tools.bench_hunyuan_image3_meanflow --recompute
    OMP_NUM_THREADS=1 python -m tools.bench_hunyuan_image3_meanflow --repeats 15  # cores shared

The network is the real model, ``models.hunyuan_image3.model.HunyuanImage3Model`` with its image
path, at a width 2 CPU cores can run and with the released structure: pre-norm GQA attention (4
query heads per KV group, q/k RMSNorm after 2-D RoPE, causal text and a bidirectional image block),
64 routed SwiGLU experts top-8 through megatron's alltoall dispatcher plus a shared expert, and the
image path (``patch_embed``, the three timestep embedders, ``final_layer``) with GroupNorm(32).
Each sample is the generation sequence of ``models.hunyuan_image3.sequence``: ``<bos>``, the
prompt tokens, ``<boi> <img_size> <img_ratio> <timestep>``, the latent grid's ``<img>`` tokens,
``<eoi>``. Measured side by side, same batch:

- ``flow_matching``: teacher velocity (no grad), student ``velocity`` with grad, MSE, backward.
- ``meanflow_differential``: teacher velocity (no grad); the student's primal (with graph) and its
  tangent along (v_teacher in the latents, 1 in σ) in one forward-mode pass (``velocity_jvp``:
  ``decoder_forward_jvp``, the MoE's ``moe_forward_jvp``); the target ``u_tgt = v − (t − r)·du``
  with r < t; adaptive loss; backward.

Teacher and student are the same architecture: the MeanFlow student's r (interval) embedding does
not exist for this model yet. Its tangent would be zero (the tangent of r is 0), so the step's cost
is the same to within one timestep embedder on [b] inputs.

Reported as in ``tools.bench_flux_meanflow``: median step time, bytes autograd saves for backward,
and peak memory above the step's start (CPU: from the profiler's allocation events), with ratios
to the flow-matching step.
"""

from __future__ import annotations

import argparse
import json

import torch

from mfmegatron.warnings_filter import quiet_expected_warnings
from tools.bench_attention_jvp import peak_bytes
from tools.bench_flux_meanflow import measure

PRESETS = {
    # The released structure (64 experts top-8, 4 query heads per KV group, expert width 3/4 of
    # the model width, a shared expert, 32 latent channels, GroupNorm(32) in the image path) at a
    # width 2 CPU cores can run; a 16x16 latent grid (256 image tokens).
    "cpu": dict(hidden=128, heads=8, groups=2, layers=2, experts=64, topk=8, expert_width=96,
                latent_side=16, prompt_tokens=32, batch=1, latent_channels=32, patch_width=64,
                timestep_dim=256, norm_groups=32),
}

# Special token ids of the sequences; the prompt tokens are drawn from the ids above them.
TOKENS = dict(bos=1, pad=0, boi=2, eoi=3, img=4, timestep=5, size=6, ratio=7)
VOCAB = 256

NO_INTERVAL_EMBEDDING = (
    "teacher and student: the same architecture (the MeanFlow student's r-embedding does not exist "
    "for this model yet; its tangent would be zero, so the cost is the same to within one embedder)"
)


class Teacher:
    """``mfmegatron.meanflow``'s teacher protocol over ``HunyuanImage3Model.velocity``."""

    def __init__(self, model):
        self.model = model

    def velocity(self, z, t, sequence):
        return self.model.velocity(sequence, z, t)


class Student:
    """The student protocol; r is not an input of the model (no r-embedding yet, see the module
    docstring), so its tangent is dropped: it is zero in the MeanFlow tangents."""

    def __init__(self, model):
        self.model = model

    def mean_velocity(self, z, r, t, sequence):
        return self.model.velocity(sequence, z, t)

    def mean_velocity_jvp(self, z, r, t, sequence, tangents):
        tz, _, tt = tangents
        return self.model.velocity_jvp(sequence, z, t, tz, tt)


def _config(args, recompute: bool):
    from models.hunyuan_image3.config import tiny_hunyuan_image3_config

    settings = dict(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.groups, kv_channels=args.hidden // args.heads, ffn_hidden_size=args.expert_width,
        num_moe_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.expert_width,
        moe_shared_expert_intermediate_size=args.expert_width, vocab_size=VOCAB, image_path=True,
        latent_channels=args.latent_channels, patch_embed_hidden_dim=args.patch_width,
        timestep_embedding_dim=args.timestep_dim, image_norm_groups=args.norm_groups,
    )
    if recompute:
        settings.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return tiny_hunyuan_image3_config(**settings)


def _randomise(model, generator):
    """Weights large enough that routing, the norms and the image path all matter (megatron's
    init is 0.02): norm scales near 1, biases small, matrices and kernels ~ 1/sqrt(fan-in)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim > 1:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(1 + 0.1 * noise)


def build(args):
    """(teacher, student, the student's module): two models of one architecture, different weights."""
    from mfmegatron.parallel import initialize_parallel
    from models.hunyuan_image3.parallelize import build_hunyuan_model

    initialize_parallel()
    teacher = build_hunyuan_model(_config(args, False))
    student = build_hunyuan_model(_config(args, args.recompute))
    generator = torch.Generator().manual_seed(0)
    _randomise(teacher, generator)
    _randomise(student, generator)
    teacher.requires_grad_(False)
    return Teacher(teacher), Student(student), student


def batch(args):
    """(z_t [b, C, h, w], r, t, sequence): ``args.batch`` random prompts of equal length."""
    from models.hunyuan_image3.sequence import ImageTokens, build_image_sequences

    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(len(TOKENS), VOCAB, (args.batch, args.prompt_tokens), generator=generator)
    side = args.latent_side
    sequence = build_image_sequences(prompts.tolist(), (side, side), ImageTokens(**TOKENS))
    z_t = torch.randn(args.batch, args.latent_channels, side, side, generator=generator)
    t = torch.full((args.batch,), 0.8)
    r = torch.full((args.batch,), 0.3)
    return z_t, r, t, sequence


def steps(teacher, student):
    from mfmegatron.meanflow import AdaptiveLossConfig, adaptive_weighted_loss, differential_target

    loss_config = AdaptiveLossConfig()

    def flow_matching(z_t, r, t, sequence):
        with torch.no_grad():
            v = teacher.velocity(z_t, t, sequence)
        u = student.mean_velocity(z_t, t, t, sequence)
        (u - v).square().mean().backward()

    def meanflow_differential(z_t, r, t, sequence):
        target = differential_target(teacher, student, z_t, r, t, sequence)
        adaptive_weighted_loss(target.student_mean_velocity, target.target, loss_config).loss.backward()

    return [flow_matching, meanflow_differential]


def describe(args, sequence) -> str:
    side = args.latent_side
    return (
        f"HunyuanImage 3.0, scaled: width {args.hidden}, {args.heads} heads in {args.groups} KV groups "
        f"({args.heads // args.groups} query heads per group), {args.layers} layers, {args.experts} experts "
        f"top-{args.topk} of width {args.expert_width} + a shared expert; image path: "
        f"{args.latent_channels} latent channels, patch embedding width {args.patch_width}, "
        f"GroupNorm({args.norm_groups}), timestep sinusoid {args.timestep_dim}; "
        f"sequence: {args.prompt_tokens} prompt tokens + <timestep> + {side}x{side} latent tokens "
        f"({sequence.input_ids.shape[1]} tokens with the special ones), batch {args.batch}, float32, "
        f"cpu{', recompute' if args.recompute else ''}\n{NO_INTERVAL_EMBEDDING}"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.bench_hunyuan_image3_meanflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for name in ("hidden", "heads", "groups", "layers", "experts", "topk", "expert-width", "latent-side",
                 "prompt-tokens", "batch", "latent-channels", "patch-width", "timestep-dim", "norm-groups"):
        parser.add_argument(f"--{name}", type=int, default=None, help="override the preset")
    parser.add_argument("--recompute", action="store_true", help="activation recompute of every student layer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_expected_warnings()
    device = torch.device("cpu")
    torch.manual_seed(0)
    teacher, student, student_module = build(args)
    inputs = batch(args)
    print(describe(args, inputs[3]))
    step_fns = steps(teacher, student)
    results = [measure(step, inputs, student_module, device, args.warmup, args.repeats) for step in step_fns]
    # The profiler's allocation events, in untimed calls after every timing (as bench_flux_meanflow).
    for step, result in zip(step_fns, results):
        result.peak_bytes = peak_bytes(lambda: step(*inputs), device)
        student_module.zero_grad(set_to_none=True)
    base = results[0]
    print(f"{'step':<26}{'median ms':>11}{'x FM':>7}{'saved MiB':>11}{'x FM':>7}{'peak MiB':>10}{'x FM':>7}")
    rows = []
    for result in results:
        row = dict(
            name=result.name, median_s=result.median, time_ratio=result.median / base.median,
            saved_bytes=result.saved_bytes, saved_ratio=result.saved_bytes / base.saved_bytes,
            peak_bytes=result.peak_bytes, peak_ratio=result.peak_bytes / base.peak_bytes,
        )
        rows.append(row)
        print(
            f"{result.name:<26}{result.median * 1e3:11.1f}{row['time_ratio']:7.2f}"
            f"{result.saved_bytes / 2**20:11.1f}{row['saved_ratio']:7.2f}"
            f"{result.peak_bytes / 2**20:10.1f}{row['peak_ratio']:7.2f}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": vars(args), "results": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
