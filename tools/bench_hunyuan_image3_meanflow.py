"""Cost of a differential MeanFlow step against a flow-matching step on HunyuanImage 3.0's trunk.

    python -m tools.bench_hunyuan_image3_meanflow            # CPU: 64 experts top-8, small width
    python -m tools.bench_hunyuan_image3_meanflow --recompute

The network is the HunyuanImage 3.0 decoder trunk at a small width with the released structure
(pre-norm GQA attention with q/k RMSNorm after RoPE, 64 routed SwiGLU experts top-8 through
megatron's alltoall dispatcher, a shared expert, ``ln_f``) between a stand-in image head written
here: latents -> linear -> tokens, plus a sinusoidal embedding of t (teacher) or of t and t - r
(student); ``ln_f`` -> linear -> velocity. The released image path (patch embedding, timestep
embedders, final layer) is not in it. Measured side by side, same model, same batch:

- ``flow_matching``: teacher velocity (no grad), student forward at r = t, MSE, backward.
- ``meanflow_differential``: teacher velocity, the student's primal (with graph) and tangent along
  (v_T, 0, 1) in one forward-mode pass (``decoder_forward_jvp``, the MoE's ``moe_forward_jvp``),
  the MeanFlow target, adaptive loss, backward.

Reported as in ``tools.bench_flux_meanflow``: median step time, bytes autograd saves for backward,
and peak memory above the step's start (CPU: from the profiler's allocation events), with ratios
to the flow-matching step.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from mfmegatron.jvp import functional as jf
from mfmegatron.warnings_filter import quiet_expected_warnings
from tools.bench_attention_jvp import peak_bytes
from tools.bench_flux_meanflow import measure

PRESETS = {
    # The released structure (64 experts top-8, 4 query heads per KV group, expert width 3/4 of
    # the model width, a shared expert) at a width 2 CPU cores can run.
    "cpu": dict(hidden=128, heads=8, groups=2, layers=2, experts=64, topk=8, expert_width=96,
                image_tokens=256, text_tokens=32, batch=1, latent_channels=32),
}

_TIME_FREQUENCIES = 32


def _time_features(t, tt):
    """[sin ωt, cos ωt] per sample [B, 2F] and its tangent along tt [B] (None: primal only)."""
    omega = torch.exp(-math.log(1000.0) * torch.arange(_TIME_FREQUENCIES, dtype=t.dtype, device=t.device) / _TIME_FREQUENCIES) * 1000.0
    angle = t[:, None] * omega
    features = torch.cat([angle.sin(), angle.cos()], dim=-1)
    if tt is None:
        return features, None
    slope = torch.cat([angle.cos() * omega, -angle.sin() * omega], dim=-1)
    return features, slope * tt[:, None]


class ImageHeadTrunk(torch.nn.Module):
    """latents [B, N, C] -> tokens; + time embeddings; [text; image] through the trunk; -> [B, N, C]."""

    def __init__(self, trunk, latent_channels: int, text_tokens: int, intervals: bool):
        super().__init__()
        hidden = trunk.config.hidden_size
        dtype = trunk.config.params_dtype
        self.trunk = trunk
        self.text = torch.nn.Parameter(torch.randn(text_tokens, hidden, dtype=dtype) * 0.5)
        self.latent_in = torch.nn.Linear(latent_channels, hidden, dtype=dtype)
        self.time_in = torch.nn.Linear(2 * _TIME_FREQUENCIES, hidden, dtype=dtype)
        self.interval_in = torch.nn.Linear(2 * _TIME_FREQUENCIES, hidden, dtype=dtype) if intervals else None
        self.latent_out = torch.nn.Linear(hidden, latent_channels, dtype=dtype)

    def forward_jvp(self, z, tz, t, tt, interval=None, tinterval=None):
        from models.hunyuan_image3.model import rope_tables, text_rope_positions

        x, tx = jf.linear(z, tz, self.latent_in.weight, self.latent_in.bias)
        emb, temb = jf.linear(*_time_features(t, tt), self.time_in.weight, self.time_in.bias)
        if self.interval_in is not None:
            iemb, tiemb = jf.linear(*_time_features(interval, tinterval), self.interval_in.weight, self.interval_in.bias)
            emb, temb = jf.add(emb, temb, iemb, tiemb)
        x, tx = jf.add(x, tx, emb[:, None], temb[:, None] if temb is not None else None)
        text = self.text.expand(x.shape[0], -1, -1)
        x = torch.cat([text, x], dim=1).transpose(0, 1)  # [s, b, h], text first
        if tx is not None:
            tx = torch.cat([torch.zeros_like(text), tx], dim=1).transpose(0, 1)
        config = self.trunk.config
        rope = rope_tables(*text_rope_positions(x.shape[0], x.device), config.kv_channels, config.rope_theta)
        h, th = self.trunk.decoder_forward_jvp(x, tx, rope)
        h, th = self.trunk.final_layernorm.forward_jvp(h, th)
        text_tokens = text.shape[1]
        h = h[text_tokens:].transpose(0, 1)
        th = th[text_tokens:].transpose(0, 1) if th is not None else None
        return jf.linear(h, th, self.latent_out.weight, self.latent_out.bias)


class Teacher:
    def __init__(self, network):
        self.network = network

    def velocity(self, z, t, cond):
        return self.network.forward_jvp(z, None, t, None)[0]


class Student:
    def __init__(self, network):
        self.network = network

    def mean_velocity(self, z, r, t, cond):
        return self.network.forward_jvp(z, None, t, None, t - r, None)[0]

    def mean_velocity_jvp(self, z, r, t, cond, tangents):
        tz, tr, tt = tangents
        return self.network.forward_jvp(z, tz, t, tt, t - r, tt - tr)


def _config(args, recompute: bool):
    from models.hunyuan_image3.config import tiny_hunyuan_image3_config

    head_dim = args.hidden // args.heads
    settings = dict(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.groups, kv_channels=head_dim, ffn_hidden_size=args.expert_width,
        num_moe_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.expert_width,
        moe_shared_expert_intermediate_size=args.expert_width, vocab_size=128,
    )
    if recompute:
        settings.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return tiny_hunyuan_image3_config(**settings)


def _build(args):
    from mfmegatron.parallel import initialize_parallel
    from models.hunyuan_image3.parallelize import build_hunyuan_model

    initialize_parallel()
    teacher = ImageHeadTrunk(build_hunyuan_model(_config(args, False)), args.latent_channels, args.text_tokens, False)
    student = ImageHeadTrunk(build_hunyuan_model(_config(args, args.recompute)), args.latent_channels, args.text_tokens, True)
    # Weights large enough that routing and the norms matter (megatron's init is 0.02).
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in list(teacher.parameters()) + list(student.parameters()):
            if param.ndim == 1:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    teacher.requires_grad_(False)
    return Teacher(teacher), Student(student), student


def _batch(args):
    generator = torch.Generator().manual_seed(1)
    z_t = torch.randn(args.batch, args.image_tokens, args.latent_channels, generator=generator)
    t = torch.full((args.batch,), 0.8)
    r = torch.full((args.batch,), 0.3)
    return z_t, r, t, None


def _steps(teacher, student):
    from mfmegatron.meanflow import AdaptiveLossConfig, adaptive_weighted_loss, differential_target

    loss_config = AdaptiveLossConfig()

    def flow_matching(z_t, r, t, cond):
        with torch.no_grad():
            v = teacher.velocity(z_t, t, cond)
        u = student.mean_velocity(z_t, t, t, cond)
        (u - v).square().mean().backward()

    def meanflow_differential(z_t, r, t, cond):
        target = differential_target(teacher, student, z_t, r, t, cond)
        adaptive_weighted_loss(target.student_mean_velocity, target.target, loss_config).loss.backward()

    return [flow_matching, meanflow_differential]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_hunyuan_image3_meanflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for name in ("hidden", "heads", "groups", "layers", "experts", "topk", "expert-width", "image-tokens",
                 "text-tokens", "batch", "latent-channels"):
        parser.add_argument(f"--{name}", type=int, default=None, help="override the preset")
    parser.add_argument("--recompute", action="store_true", help="activation recompute of every student layer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    quiet_expected_warnings()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    device = torch.device("cpu")
    torch.manual_seed(0)
    teacher, student, student_module = _build(args)
    inputs = _batch(args)
    print(
        f"HunyuanImage 3.0 trunk, scaled: width {args.hidden}, {args.heads} heads in {args.groups} KV "
        f"groups, {args.layers} layers, {args.experts} experts top-{args.topk} of width "
        f"{args.expert_width} + a shared expert; {args.image_tokens} image + {args.text_tokens} text "
        f"tokens, batch {args.batch}, float32, cpu{', recompute' if args.recompute else ''}; "
        f"stand-in image head (not the released image path)"
    )
    steps = _steps(teacher, student)
    results = [measure(step, inputs, student_module, device, args.warmup, args.repeats) for step in steps]
    for step, result in zip(steps, results):
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
