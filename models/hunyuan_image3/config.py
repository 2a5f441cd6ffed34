"""HunyuanImage 3.0 configuration: megatron's TransformerConfig plus the model's own fields.

The trunk is a 32-layer decoder with GQA attention and a 64-expert MoE in every layer (top-8,
softmax over all experts then renormalised over the chosen 8, one always-on shared expert). The
megatron fields below express that exactly:

- ``moe_router_score_function="softmax"`` with ``moe_router_pre_softmax=False``: top-k on the
  logits, softmax over the k chosen. ``softmax(all)`` restricted to the top k and renormalised is
  ``exp(l_i) / sum_{j in top k} exp(l_j)``, the same numbers, and the chosen set is the same
  because softmax is monotonic.
- ``moe_router_dtype="fp32"``: router logits and softmax in float32 (the official code's casts).
- ``moe_expert_capacity_factor=None``: no capacity, nothing dropped (``moe_drop_tokens`` false).
- ``moe_router_load_balancing_type="none"``, ``moe_aux_loss_coeff=0``: no auxiliary loss term.
- ``moe_shared_expert_intermediate_size``: the shared expert, summed into the MoE output, no gate.

Image path (``model.py``): ``patch_embed`` (latent channels -> ``patch_embed_hidden_dim`` -> hidden),
``final_layer`` (hidden -> ``patch_embed_hidden_dim`` -> latent channels), three timestep embedders
(sinusoid of ``timestep_embedding_dim`` -> hidden -> hidden); their GroupNorms have
``image_norm_groups`` groups (the official ``normalization`` helper: 32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from models.hunyuan_image3.sequence import SEQUENCE_TEMPLATES


STUDENT_CONDITIONINGS = ("tokens", "embedding")


@dataclass
class HunyuanImage3Config(TransformerConfig):
    """Field names follow the released ``config.json`` where megatron has no own name."""

    vocab_size: int = 133120
    rope_theta: float = 10000.0
    # Image path: VAE latent channels, patch embedding width, the timestep sinusoid width, the
    # GroupNorm group count of the UNet blocks, the patch size on the latent grid (only 1, the
    # released model's, is built), the VAE scale.
    # Build the image path (False: the text trunk alone, e.g. to compare with a text-only LLM).
    image_path: bool = True
    latent_channels: int = 32
    patch_embed_hidden_dim: int = 1024
    timestep_embedding_dim: int = 256
    image_norm_groups: int = 32
    patch_size: int = 1
    vae_scaling_factor: float = 0.562679178327931
    # Layers per pipeline stage, e.g. (9, 8, 8, 7); None: an even split (the pipeline size must
    # then divide num_layers). See parallelize.pipeline_layer_range / check_layout.
    pipeline_layers: tuple[int, ...] | None = None
    # The few-step student (official names, HunyuanImage-3.0-Instruct-Distil): ``cfg_distilled``
    # builds ``guidance_emb`` (a TimestepEmbedder fed 1000·w, w the CFG scale it was distilled
    # from), ``use_meanflow`` builds ``timestep_r_emb`` (fed 1000·σ_r, σ_r ≤ σ the end of the
    # interval the average velocity spans). Both on the first pipeline stage, like timestep_emb.
    cfg_distilled: bool = False
    use_meanflow: bool = False
    # Where those embeddings enter (STUDENT_CONDITIONINGS): "tokens" = the official layout,
    # ``<guidance>`` and ``<timestep_r>`` tokens right after ``<timestep>`` whose input rows are the
    # embeddings; "embedding" = no extra tokens, the embeddings added to ``<timestep>``'s row (ours:
    # not loadable by the official code).
    student_conditioning: str = "tokens"
    # The router's weight dtype: float32 as released (and used in float32 either way,
    # ``moe_router_dtype``), or False for ``params_dtype``, megatron's convention. A network that
    # trains in bf16 needs the latter: megatron's mixed-precision optimizers pair model and main
    # parameters assuming one floating dtype, and a float32 parameter among bf16 ones breaks their
    # checkpoints (the plain optimizer's shapes mismatch, the distributed one's buffer copy fails).
    router_weight_fp32: bool = True
    # Not the network's shape: the text it was trained to read (``sequence.TextTemplate``), kept
    # with it as the official checkpoints keep theirs (generation_config.json's
    # ``sequence_template``), so an exported student says how to prompt it. The model never reads
    # them.
    sequence_template: str = "pretrain"
    system_prompt: str | None = None

    def __post_init__(self):
        if self.kv_channels is None and self.num_attention_heads:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        super().__post_init__()
        if self.num_attention_heads % (self.num_query_groups or self.num_attention_heads):
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_query_groups {self.num_query_groups}"
            )
        if self.kv_channels % 2:
            raise ValueError(f"the head dim {self.kv_channels} must be even (rotary pairs)")
        if self.patch_size != 1:
            raise ValueError(f"only patch_size 1 (the released model's) is built, got {self.patch_size}")
        for name in ("patch_embed_hidden_dim", "hidden_size"):
            if getattr(self, name) % self.image_norm_groups:
                raise ValueError(
                    f"{name} {getattr(self, name)} must be divisible by image_norm_groups {self.image_norm_groups}"
                )
        if self.moe_expert_capacity_factor is not None:
            raise ValueError("HunyuanImage 3.0 routes without capacity: moe_expert_capacity_factor must be None")
        if self.sequence_template not in SEQUENCE_TEMPLATES:
            raise ValueError(f"sequence_template must be one of {', '.join(map(repr, SEQUENCE_TEMPLATES))}, "
                             f"not {self.sequence_template!r}")
        if self.student_conditioning not in STUDENT_CONDITIONINGS:
            raise ValueError(
                f"student_conditioning must be one of {', '.join(map(repr, STUDENT_CONDITIONINGS))}, "
                f"not {self.student_conditioning!r}"
            )

    @property
    def is_student(self) -> bool:
        """Built with ``guidance_emb`` or ``timestep_r_emb``."""
        return self.cfg_distilled or self.use_meanflow

    @property
    def query_heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


def _hunyuan_defaults(**overrides) -> dict:
    settings = dict(
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_query_groups=8,
        kv_channels=128,
        ffn_hidden_size=3072,
        vocab_size=133120,
        num_moe_experts=64,
        moe_router_topk=8,
        moe_ffn_hidden_size=3072,
        moe_shared_expert_intermediate_size=3072,
        moe_shared_expert_gate=False,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_expert_capacity_factor=None,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        qk_layernorm=True,
        add_bias_linear=False,
        add_qkv_bias=False,
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


def hunyuan_image3_config(**overrides) -> HunyuanImage3Config:
    """The released HunyuanImage 3.0 (80B total, 13B activated): 32 MoE layers, width 4096."""
    return HunyuanImage3Config(**_hunyuan_defaults(**overrides))


def tiny_hunyuan_image3_config(**overrides) -> HunyuanImage3Config:
    """A small model for tests: 2 layers, width 64, 4 heads of 16 in 2 KV groups, 8 experts top-3.
    The text trunk alone unless ``image_path=True``: then 4 latent channels, patch embedding width
    32, sinusoid 32, GroupNorm 4 groups."""
    settings = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        ffn_hidden_size=32,
        vocab_size=128,
        num_moe_experts=8,
        moe_router_topk=3,
        moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=32,
        image_path=False,
        latent_channels=4,
        patch_embed_hidden_dim=32,
        timestep_embedding_dim=32,
        image_norm_groups=4,
        bf16=False,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
    )
    settings.update(overrides)
    return HunyuanImage3Config(**_hunyuan_defaults(**settings))


HUNYUAN_IMAGE3_CONFIGS = {"hunyuan-image3": hunyuan_image3_config, "tiny": tiny_hunyuan_image3_config}

__all__ = [
    "HunyuanImage3Config",
    "STUDENT_CONDITIONINGS",
    "hunyuan_image3_config",
    "tiny_hunyuan_image3_config",
    "HUNYUAN_IMAGE3_CONFIGS",
]
