"""Real images -> FLUX latents for ``meanflow.z_source=data``: the FLUX family's image encoder
against diffusers' own FLUX pipeline code (``retrieve_latents`` of the img2img pipeline, the VAE
factors, ``FluxPipeline._pack_latents``) on image shards built with the project's builder and
read by the image loader, with a tiny AutoencoderKL built here."""

from __future__ import annotations

import json

import pytest
import torch

from mfmegatron.data.images import build_image_loader, build_image_shards
from mfmegatron.training.config import TrainConfig
from models.flux.training import FluxFamily
from tests.flux_fixtures import diffusers_flux_latents, photo_folder, tiny_flux_vae

IMAGE_SIZE = 64  # 8 x 8 latent cells, 4 x 4 tokens


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    tiny_flux_vae().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> torch.Tensor:
    """One batch of 4 images from image shards, as the trainer's loader delivers them."""
    root = tmp_path_factory.mktemp("images")
    build_image_shards([photo_folder(root / "photos", 6)], root / "shards", samples_per_shard=3)
    loader = build_image_loader(root / "shards", 4, size=IMAGE_SIZE, backend="pil", rank=0, world_size=1,
                                seed=5, load_embeddings=False, prefetch=0)  # fmt: skip
    batch = next(loader)
    assert batch.images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    return batch.images


def _config(vae_folder, latent: str) -> TrainConfig:
    config = TrainConfig()
    config.model.preset, config.model.dtype, config.model.image_size = "tiny", "fp32", IMAGE_SIZE
    config.model.vae_path, config.model.vae_latent = str(vae_folder), latent
    return config


@pytest.mark.parametrize("latent,sample_mode", [("sample", "sample"), ("mean", "argmax")])
def test_latents_are_diffusers_flux_convention(vae_folder, images, latent, sample_mode):
    family = FluxFamily()
    config = _config(vae_folder, latent)
    encoder = family.image_encoder(config, torch.device("cpu"), torch.float32)
    x = encoder(images, torch.Generator().manual_seed(3))
    expected = diffusers_flux_latents(vae_folder, images, sample_mode, torch.Generator().manual_seed(3))
    assert x.shape == (4, *family.latent_shape(config)) == (4, 16, 16)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    if latent == "sample":  # the generator decides the sample
        other = encoder(images, torch.Generator().manual_seed(4))
        assert not torch.equal(other, x)


def test_packed_tokens_match_the_trainers_image_positions(vae_folder):
    # Token k of the packed latents is the patch at the row / column the trainer's img_ids give
    # it, as in diffusers' pipeline (_prepare_latent_image_ids).
    from diffusers import FluxPipeline

    family = FluxFamily()
    config = _config(vae_folder, "mean")
    config.model.text_tokens = 4
    batch = type("Batch", (), {"t5": torch.zeros(1, 4, 32), "pooled": torch.zeros(1, 24)})()
    cond = family.condition(batch, config, torch.device("cpu"), torch.float32)
    side = IMAGE_SIZE // 16
    expected = FluxPipeline._prepare_latent_image_ids(1, side, side, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(cond.img_ids, expected, rtol=0, atol=0)


def test_a_vae_that_does_not_fit_the_transformer_is_refused(tmp_path):
    tiny_flux_vae(latent_channels=8).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="8 latent channels; the transformer takes 4"):
        FluxFamily().image_encoder(_config(tmp_path / "wide", "sample"), torch.device("cpu"), torch.float32)


def test_latents_stored_by_the_builder_are_read_in_the_image_loaders_order(tmp_path, vae_folder):
    from mfmegatron.data.images import LatentBatchLoader
    from tools.build_image_shards import main as build_main

    photos = photo_folder(tmp_path / "photos", 6)
    out = tmp_path / "shards"
    with pytest.raises(SystemExit):  # --vae needs the size to encode at
        build_main([str(photos), "--out", str(out), "--vae", str(vae_folder), "--quiet"])
    assert build_main([str(photos), "--out", str(out), "--samples-per-shard", "3", "--vae", str(vae_folder),
                       "--size", str(IMAGE_SIZE), "--latent-dtype", "float32", "--quiet"]) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fields"]["latent"] == {"size": IMAGE_SIZE, "crop": "center", "shape": [4, 8, 8],
                                            "dtype": "float32", "vae": str(vae_folder), "latent": "mean"}  # fmt: skip

    options = dict(rank=0, world_size=1, seed=5, load_embeddings=False, prefetch=0)
    stored = LatentBatchLoader(out, 4, **options)
    pixels = build_image_loader(out, 4, size=IMAGE_SIZE, backend="pil", **options)
    latents, images = next(stored), next(pixels)
    assert latents.keys == images.keys and latents.images is None
    # The stored latents are the family's encoding (posterior mean) of the loader's images, to
    # rounding (the builder encodes one image at a time, here a batch of 4).
    family = FluxFamily()
    encoder = family.image_encoder(_config(vae_folder, "mean"), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(family.pack_latents(latents.latents), encoder(images.images), rtol=1e-5, atol=1e-5)
    # The two loaders' positions are interchangeable.
    assert stored.state_dict() == pixels.state_dict()
    resumed = LatentBatchLoader(out, 4, **options)
    resumed.load_state_dict(pixels.state_dict())
    assert next(resumed).keys == next(pixels).keys


def test_evaluation_decodes_latents_as_diffusers_flux_pipeline_does(vae_folder, images):
    """``FluxFamily.decode_images`` (the trainer's evaluation) against diffusers' own FLUX
    unpacking and VAE decoding: unscale and unshift, decode, map [-1, 1] to [0, 1]."""
    from diffusers import AutoencoderKL, FluxPipeline

    family = FluxFamily()
    config = _config(vae_folder, "mean")
    tokens = family.image_encoder(config, torch.device("cpu"), torch.float32)(images)
    decoded = family.decode_images(tokens, config)

    vae = AutoencoderKL.from_pretrained(vae_folder).eval()
    latents = FluxPipeline._unpack_latents(tokens, IMAGE_SIZE, IMAGE_SIZE, vae_scale_factor=8)
    with torch.no_grad():
        expected = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    expected = (expected / 2 + 0.5).clamp(0, 1)  # diffusers' VaeImageProcessor.postprocess("pt")
    assert decoded.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-6)
    # Pixel-space networks decode to their own pixels.
    config.model.latent_space, config.model.overrides = "pixels", {"in_channels": 12}
    family = FluxFamily()
    pixels = family.image_encoder(config, torch.device("cpu"), torch.float32)(images)
    torch.testing.assert_close(family.decode_images(pixels, config), (images / 2 + 0.5).clamp(0, 1))
