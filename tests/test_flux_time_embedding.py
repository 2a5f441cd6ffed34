"""FLUX's time-embedding scale (``FluxConfig.time_embedding_scale``): the time, guidance and
interval embedders take the sinusoid of s·t, FLUX's s = 1000 or a smooth s = 1 (the shapes world's
test of whether the 1000·t embedding keeps the automatic warm-up switch from firing).

References: diffusers' ``Timesteps`` + ``TimestepEmbedding`` (FLUX's own embedder) on s·t with the
same weights, and ``torch.func.jvp`` of it for the tangent; the scale's trip through the diffusers
config.json and the exported interval embedder, and the refusals of the diffusers-side loaders.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

from mfmegatron.parallel import parallel_context


def _diffusers_embedder(ours):
    reference = TimestepEmbedding(ours.frequency_dim, ours.config.hidden_size)
    reference.load_state_dict({f"linear_{i}.{p}": getattr(getattr(ours.mlp, f"linear_{i}"), p)
                               for i in (1, 2) for p in ("weight", "bias")})
    sinusoid = Timesteps(ours.frequency_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    return lambda scaled: reference(sinusoid(scaled))


@pytest.mark.parametrize("scale", [1000.0, 1.0])
def test_the_embedders_take_the_sinusoid_of_scale_times_t_as_diffusers_does(scale):
    from models.flux.config import tiny_flux_config
    from models.flux.model import FluxModel

    t = torch.tensor([0.05, 0.4, 0.93])
    tt = torch.tensor([1.0, -0.5, 2.0])
    with parallel_context():
        torch.manual_seed(0)
        model = FluxModel(tiny_flux_config(guidance_embeds=True, mean_flow_student=True, time_embedding_scale=scale))
        for embedder in (model.time_in, model.guidance_in, model.interval_in):
            torch.nn.init.normal_(embedder.mlp.linear_2.weight, std=0.2)  # interval_in starts at zero
            reference = _diffusers_embedder(embedder)
            y, ty = embedder.forward_jvp(t, tt)
            with torch.no_grad():
                expected, expected_tangent = torch.func.jvp(lambda x: reference(scale * x), (t,), (tt,))
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ty, expected_tangent, rtol=1e-4, atol=1e-4 * expected_tangent.abs().max().item())
        # The scale is engaged: the same weights at FLUX's 1000 give another embedding.
        reference = _diffusers_embedder(model.time_in)
        other = 1.0 if scale == 1000.0 else 1000.0
        with torch.no_grad():
            assert (model.time_in.forward_jvp(t)[0] - reference(other * t)).abs().max() > 1e-3


def test_the_scale_travels_through_config_json_and_diffusers_loaders_refuse_it(tmp_path, capsys):
    from models.flux import interval_embedder
    from models.flux.config import tiny_flux_config
    from models.flux.export import write_config
    from models.flux.pipeline import MeanFlowFluxPipeline, MeanFlowIntervalEmbedder
    from models.flux.state_dict_adapter import diffusers_config_from_flux, flux_config_from_diffusers

    field = interval_embedder.TIME_EMBEDDING_SCALE_FIELD
    released = diffusers_config_from_flux(tiny_flux_config())
    assert field not in released  # FLUX's own scale: the released config.json, unchanged
    assert flux_config_from_diffusers(released).time_embedding_scale == 1000.0
    smooth = diffusers_config_from_flux(tiny_flux_config(time_embedding_scale=1.0))
    assert smooth[field] == 1.0 and flux_config_from_diffusers(smooth).time_embedding_scale == 1.0

    folder = tmp_path / "transformer"
    folder.mkdir()
    capsys.readouterr()
    write_config(folder, smooth)
    warning = capsys.readouterr().err.strip()
    assert warning.startswith(f"warning: {folder} embeds time as sinusoid(1·t), not FLUX's 1000·t")
    assert json.loads((folder / "config.json").read_text())[field] == 1.0
    with pytest.raises(ValueError, match=f"{field} — this transformer embeds time with another scale"):
        MeanFlowFluxPipeline.from_pretrained(folder)

    # The interval embedder's record says which scale it was trained with; diffusers' side loads
    # only FLUX's 1000.
    d = 32
    tensors = {"linear_1.weight": torch.zeros(d, 256), "linear_1.bias": torch.zeros(d),
               "linear_2.weight": torch.zeros(d, d), "linear_2.bias": torch.zeros(d)}
    interval_embedder.save(folder, tensors, input_scale=1.0)
    record = interval_embedder.read_config(folder)
    assert record["input_scale"] == 1.0 and record["input"].startswith("1 * (t - r)")
    with pytest.raises(interval_embedder.IntervalEmbedderFormatError, match="input_scale=1.0 is not supported"):
        MeanFlowIntervalEmbedder.from_pretrained(folder)
    interval_embedder.save(folder, tensors)
    assert MeanFlowIntervalEmbedder.from_pretrained(folder).input_scale == 1000.0
