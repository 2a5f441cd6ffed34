"""Tiny FLUX models and batches shared by the FLUX tests (importable by spawned ranks)."""

from __future__ import annotations

import torch

TINY = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
BATCH, IMAGE_TOKENS, TEXT_TOKENS = 2, 8, 6


def diffusers_flux(dtype=torch.float32, seed: int = 0):
    """A random diffusers FluxTransformer2DModel (the reference implementation)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**TINY)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make biases non-trivial
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.05)
    return model.to(dtype).eval()


def flux_batch(dtype=torch.float32, seed: int = 1) -> dict:
    """Keyword arguments for diffusers' forward (batch-first, timestep/guidance as sigmas)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(2), torch.arange(IMAGE_TOKENS // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(ys), ys, xs], dim=-1).flatten(0, 1).float()
    return dict(
        hidden_states=torch.randn(BATCH, IMAGE_TOKENS, 16, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(BATCH, TEXT_TOKENS, 32, generator=g).to(dtype),
        pooled_projections=torch.randn(BATCH, 24, generator=g).to(dtype),
        timestep=torch.rand(BATCH, generator=g).to(dtype),
        img_ids=img_ids,
        txt_ids=torch.zeros(TEXT_TOKENS, 3),
        guidance=torch.full((BATCH,), 3.5).to(dtype),
    )


def flux_inputs(batch: dict, timestep_r=None):
    from models.flux.model import FluxInputs

    return FluxInputs(
        latents=batch["hidden_states"],
        encoder_hidden_states=batch["encoder_hidden_states"],
        pooled_projections=batch["pooled_projections"],
        timestep=batch["timestep"],
        img_ids=batch["img_ids"],
        txt_ids=batch["txt_ids"],
        guidance=batch["guidance"],
        timestep_r=timestep_r,
    )


def megatron_flux(diffusers_state: dict, dtype=torch.float32, **config_overrides):
    """This rank's FLUX stage with the diffusers weights (parallel state must be initialised)."""
    from models.flux.config import tiny_flux_config
    from models.flux.parallelize import build_flux_model, load_full_weights
    from models.flux.state_dict_adapter import to_megatron

    config = tiny_flux_config(params_dtype=dtype, **config_overrides)
    model = build_flux_model(config)
    full = dict(to_megatron(diffusers_state.__getitem__, config))
    load_full_weights(model, full.__getitem__)
    return model


def tiny_flux_vae(latent_channels: int = TINY["in_channels"] // 4, seed: int = 0):
    """A random diffusers AutoencoderKL shaped like FLUX.1's VAE where it matters: 8x downsampling
    (four blocks), FLUX's shift and scaling factors, no quant convs; 4 latent channels, which the
    tiny transformer's 16 input channels unpack as 2 x 2 patches."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    return vae.eval()


def photo_folder(folder, count: int, seed: int = 0):
    """``count`` small images of assorted sizes and formats with same-stem ``.txt`` captions, the
    input of ``build_image_shards``."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    kinds = ["cat", "boat", "tree", "lamp"]
    for i in range(count):
        height, width = [(64, 64), (72, 96), (96, 64), (50, 70)][i % 4]
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([x * 255 // width, y * 255 // height, rng.integers(0, 256, (height, width))], axis=-1)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
        (folder / f"{i:03d}.txt").write_text(f"photo {i} of a {kinds[i % 4]}")
    return folder


def diffusers_flux_latents(vae_folder, images: torch.Tensor, sample_mode: str, generator=None) -> torch.Tensor:
    """Images -> packed FLUX latents by diffusers' own functions: the img2img pipeline's
    ``retrieve_latents`` ("sample" / "argmax"), the VAE's shift and scaling factors as its
    ``_encode_vae_image``, and ``FluxPipeline._pack_latents``."""
    from diffusers import AutoencoderKL, FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux_img2img import retrieve_latents

    vae = AutoencoderKL.from_pretrained(vae_folder)
    with torch.no_grad():
        latents = retrieve_latents(vae.encode(images), generator=generator, sample_mode=sample_mode)
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)
