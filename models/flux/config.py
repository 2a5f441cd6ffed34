"""FLUX.1 configuration: megatron's TransformerConfig plus the MMDiT's own fields.

One config object carries the architecture (FLUX.1-dev / -schnell sizes), the parallel layout
(tensor / sequence / pipeline parallel from megatron's ModelParallelConfig) and recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from mfmegatron.jvp.attention import TANGENT_PASSES


@dataclass
class FluxConfig(TransformerConfig):
    """Field names follow diffusers' ``FluxTransformer2DModel`` config where one exists.

    ``num_layers`` (megatron's) is derived: double-stream plus single-stream blocks.
    """

    num_double_layers: int = 19
    num_single_layers: int = 38
    in_channels: int = 64
    out_channels: int | None = None
    patch_size: int = 1
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    rope_theta: int = 10000
    timestep_embedding_dim: int = 256
    # The time, guidance and interval embedders take the sinusoid of this scale times their input
    # (sigmas, the guidance value, t - r). FLUX uses 1000 (diffusers hard-codes it); a small scale
    # (1: "smooth") makes the network smooth in t, which the shapes world uses to test whether the
    # 1000·t embedding is what keeps the warm-up switch from firing (issue #13).
    time_embedding_scale: float = 1000.0
    # The MeanFlow student: a second, zero-initialised time embedding of h = t - r.
    mean_flow_student: bool = False
    # Blocks (double first, then single) per pipeline stage; None splits them evenly by count
    # (a double block and a single block cost about the same FLOPs per token).
    pipeline_stage_blocks: tuple[int, ...] | None = None
    # The attention JVP's tangent pass (mfmegatron.jvp.attention.attention_jvp): "auto",
    # "logsumexp", "triton" or "online". "auto" picks per device and dtype.
    attention_tangent_pass: str = "auto"
    # Which linears the model is built from (models/flux/layer_specs.py): True megatron's
    # Transformer Engine layers, False the local ones, None TE when it imports and CUDA is there.
    # FP8 (megatron's ``fp8`` / ``fp8_recipe``) needs TE; ``fp8_param`` builds the weights as FP8
    # tensors (the frozen teacher's).
    use_transformer_engine: bool | None = None

    def __post_init__(self):
        self.num_layers = self.num_double_layers + self.num_single_layers
        if self.kv_channels is None and self.num_attention_heads:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        self.out_channels = self.out_channels or self.in_channels
        super().__post_init__()
        if sum(self.axes_dims_rope) != self.kv_channels:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must sum to the head dim {self.kv_channels}"
            )
        if self.attention_tangent_pass not in TANGENT_PASSES:
            raise ValueError(f"attention_tangent_pass must be one of {', '.join(TANGENT_PASSES)}, "
                             f"got {self.attention_tangent_pass!r}")
        if self.pipeline_stage_blocks is not None:
            blocks = tuple(self.pipeline_stage_blocks)
            if len(blocks) != self.pipeline_model_parallel_size or sum(blocks) != self.num_layers:
                raise ValueError(
                    f"pipeline_stage_blocks {blocks} must have {self.pipeline_model_parallel_size} "
                    f"entries summing to {self.num_layers} blocks"
                )


def _flux_defaults(**overrides) -> dict:
    settings = dict(
        num_attention_heads=24,
        hidden_size=24 * 128,
        kv_channels=128,
        ffn_hidden_size=4 * 24 * 128,
        layernorm_epsilon=1e-6,
        qk_layernorm=True,  # megatron then sums the replicated QK-norm grads over TP
        add_bias_linear=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        bf16=True,
        params_dtype=torch.bfloat16,
    )
    settings.update(overrides)
    return settings


def flux_dev_config(**overrides) -> FluxConfig:
    """FLUX.1-dev: 19 double + 38 single blocks, width 3072, guidance-distilled (guidance embed)."""
    return FluxConfig(**_flux_defaults(guidance_embeds=True, **overrides))


def flux_schnell_config(**overrides) -> FluxConfig:
    """FLUX.1-schnell: as dev without the guidance embedding (timestep-distilled)."""
    return FluxConfig(**_flux_defaults(guidance_embeds=False, **overrides))


def tiny_flux_config(**overrides) -> FluxConfig:
    """A few-thousand-parameter FLUX for tests: 2 double + 2 single blocks, 4 heads of 16."""
    settings = dict(
        num_double_layers=2,
        num_single_layers=2,
        num_attention_heads=4,
        hidden_size=64,
        kv_channels=16,
        ffn_hidden_size=256,
        in_channels=16,
        joint_attention_dim=32,
        pooled_projection_dim=24,
        axes_dims_rope=(4, 6, 6),
        bf16=False,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
    )
    settings.update(overrides)
    return FluxConfig(**_flux_defaults(**settings))


FLUX_CONFIGS = {"flux1-dev": flux_dev_config, "flux1-schnell": flux_schnell_config, "tiny": tiny_flux_config}

__all__ = ["FluxConfig", "flux_dev_config", "flux_schnell_config", "tiny_flux_config", "FLUX_CONFIGS"]
