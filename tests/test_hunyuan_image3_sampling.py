"""The HunyuanImage 3.0 few-step sampler, the exported-student loader and the sampling CLI.

A tiny "tokens" student (both embedders randomised, so w and σ_r matter) is exported as our
converter writes it (released key names, safetensors shards with an index, config.json with the
student's fields); the folder's model samples the same latents as the in-memory one at 1, 2, 4 and
8 steps, and the CLI writes them.
"""

from __future__ import annotations

import json

import pytest
import torch

from mfmegatron.parallel import parallel_context
from tests.test_hunyuan_image3_conversion import _write_hf_folder
from tests.test_hunyuan_image3_image import LATENT_HW, PROMPTS, _randomise
from tests.test_hunyuan_image3_student import STUDENT_TOKENS, _tokens


def _config(conditioning="tokens", **overrides):
    """Conversion-compatible tiny sizes (config.json does not carry the sinusoid width or the
    GroupNorm groups: the released 256 and 32)."""
    from models.hunyuan_image3.config import tiny_hunyuan_image3_config

    settings = dict(image_path=True, patch_embed_hidden_dim=32, timestep_embedding_dim=256, image_norm_groups=32,
                    cfg_distilled=True, use_meanflow=True, student_conditioning=conditioning)
    settings.update(overrides)
    return tiny_hunyuan_image3_config(**settings)


@pytest.fixture(scope="module")
def world():
    """One world of one for the module: the models are built once and shared."""
    with parallel_context():
        yield


@pytest.fixture(scope="module")
def exported(world, tmp_path_factory):
    """A randomised tiny "tokens" student written as our converter exports it, and the model."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model, local_weights
    from models.hunyuan_image3.state_dict_adapter import from_megatron, hf_config_from_config

    config = _config()
    folder = tmp_path_factory.mktemp("student") / "hf"
    torch.manual_seed(0)
    model = build_hunyuan_model(config)
    _randomise(model, 21, scale=0.2)
    full = {name: t.clone() for name, t in local_weights(model)}
    _write_hf_folder(folder, from_megatron(full, config, image_head=True), hf_config_from_config(config),
                     max_shard_size=60_000)
    return {"folder": folder, "full": full, "config": config, "model": model.eval()}


def _in_memory(exported):
    return exported["model"]


@pytest.fixture(scope="module")
def loaded(exported):
    from models.hunyuan_image3.sampling import load_exported_student

    return load_exported_student(exported["folder"], torch.float32)


def test_time_grids_uniform_custom_and_shifted():
    from models.hunyuan_image3.sampling import OFFICIAL_FLOW_SHIFT, student_time_grid

    assert student_time_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert student_time_grid(2, shift=OFFICIAL_FLOW_SHIFT) == [1.0, 0.75, 0.0]  # 3·½ / (1 + 2·½)
    assert student_time_grid(None, [1.0, 0.4, 0.0]) == [1.0, 0.4, 0.0]
    with pytest.raises(ValueError, match="exactly one"):
        student_time_grid(2, [1.0, 0.0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        student_time_grid(None, [1.0, 1.0, 0.0])


def test_one_step_is_the_average_velocity_jump_and_the_state_is_float32(exported):
    """1 step: z_0 = ε − 1·u(ε, σ_r = 0, σ = 1; w); 2 steps pass σ_r = the next grid point."""
    from models.hunyuan_image3.sampling import sample_student
    from models.hunyuan_image3.sequence import build_image_sequences

    sequence = build_image_sequences(PROMPTS, LATENT_HW, _tokens(), student_tokens=True)
    noise = torch.randn(2, 4, *LATENT_HW, generator=torch.Generator().manual_seed(3))
    w = torch.tensor([3.0, 5.0])
    model = _in_memory(exported)
    one = sample_student(model, sequence, noise, 1, w)
    with torch.no_grad():
        u = model.velocity(sequence, noise, torch.ones(2), sigma_r=torch.zeros(2), guidance=w)
        half = noise - 0.5 * model.velocity(sequence, noise, torch.ones(2), sigma_r=torch.full((2,), 0.5),
                                            guidance=w)
        two = half - 0.5 * model.velocity(sequence, half, torch.full((2,), 0.5), sigma_r=torch.zeros(2),
                                          guidance=w)
    assert one.dtype == torch.float32
    torch.testing.assert_close(one, noise - u, rtol=0, atol=0)
    torch.testing.assert_close(sample_student(model, sequence, noise, 2, w), two, rtol=1e-6, atol=1e-6)
    # w per sample is used: another w gives other latents.
    assert (sample_student(model, sequence, noise, 1, 9.0) - one).abs().max() > 1e-4
    with pytest.raises(ValueError, match="cfg_distilled: give the guidance"):
        sample_student(model, sequence, noise, 1, None)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_exported_folder_samples_like_the_in_memory_model(exported, loaded, steps):
    from models.hunyuan_image3.sampling import sample_student
    from models.hunyuan_image3.sequence import build_image_sequences

    sequence = build_image_sequences(PROMPTS, LATENT_HW, _tokens(), student_tokens=True)
    noise = torch.randn(2, 4, *LATENT_HW, generator=torch.Generator().manual_seed(steps))
    w = torch.tensor([2.0, 4.5])
    assert loaded.config.cfg_distilled and loaded.config.use_meanflow
    assert loaded.config.student_conditioning == "tokens"
    memory = _in_memory(exported)
    from_folder = sample_student(loaded, sequence, noise, steps, w)
    expected = sample_student(memory, sequence, noise, steps, w)
    torch.testing.assert_close(from_folder, expected, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(expected).all() and (expected - noise).abs().max() > 0.1


def test_sampling_cli_writes_the_latents_and_reports_errors_in_one_line(exported, tmp_path, capsys):
    from models.hunyuan_image3.sampling import sample_student
    from models.hunyuan_image3.sequence import build_image_sequences
    from tools.sample_hunyuan_image3 import main

    special = tmp_path / "special.json"
    special.write_text(json.dumps({k: v for k, v in STUDENT_TOKENS.items() if k != "cfg"}))
    out = tmp_path / "latents.pt"
    prompt = [13, 14, 15]
    code = main([str(exported["folder"]), "--special-tokens", str(special), "--prompt-ids", "13,14,15",
                 "--steps", "2", "--guidance", "4", "--latent-hw", "2x3", "--seed", "5", "--out", str(out)])
    assert code == 0
    noise = torch.randn(1, 4, 2, 3, generator=torch.Generator().manual_seed(5))
    sequence = build_image_sequences([prompt], (2, 3), _tokens(), student_tokens=True)
    expected = sample_student(_in_memory(exported), sequence, noise, 2, 4.0)
    saved = torch.load(out)
    torch.testing.assert_close(saved["latents"], expected, rtol=1e-6, atol=1e-6)
    err = capsys.readouterr().err
    assert "step 2/2" in err and "wrote" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"bos": 1}))
    assert main([str(exported["folder"]), "--special-tokens", str(bad), "--prompt-ids", "13",
                 "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sample_hunyuan_image3: error: special token ids missing: pad, boi")
    assert main([str(tmp_path / "nowhere"), "--prompt-ids", "1", "--out", str(tmp_path / "y.pt")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_sampling_cli_reads_the_prompt_and_special_tokens_from_a_tokenizer(exported, tmp_path):
    """--tokenizer: the prompt text and the special tokens by name (the ratio bucket from
    --ratio-index); the same latents as the ids given directly."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from models.hunyuan_image3.sampling import sample_student
    from models.hunyuan_image3.sequence import build_image_sequences
    from tools.sample_hunyuan_image3 import main

    vocab = {"<pad>": 0, "<|startoftext|>": 1, "<boi>": 2, "<eoi>": 3, "<img>": 4, "<timestep>": 5,
             "<img_size_1024>": 6, "<img_ratio_3>": 7, "<cfg>": 8, "<guidance>": 9, "<timestep_r>": 20,
             "a": 13, "cat": 14, "[UNK]": 30}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "latents.pt"
    code = main([str(exported["folder"]), "--tokenizer", str(tmp_path / "tokenizer.json"), "--prompt", "a cat",
                 "--ratio-index", "3", "--steps", "1", "--guidance", "3", "--latent-hw", "2x3", "--out", str(out),
                 "--quiet"])
    assert code == 0
    noise = torch.randn(1, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    sequence = build_image_sequences([[13, 14]], (2, 3), _tokens(), student_tokens=True)
    expected = sample_student(_in_memory(exported), sequence, noise, 1, 3.0)
    saved = torch.load(out)
    assert saved["prompt_ids"] == [13, 14]
    torch.testing.assert_close(saved["latents"], expected, rtol=1e-6, atol=1e-6)
    # Without --ratio-index the bucket is the one nearest to the latent grid's h / w, as the
    # official image processor picks it: 13 for 2x3 (not in this tokenizer: one line), 16 for a square.
    assert main([str(exported["folder"]), "--tokenizer", str(tmp_path / "tokenizer.json"), "--prompt", "a cat",
                 "--latent-hw", "2x3", "--out", str(tmp_path / "x.pt"), "--quiet"]) == 2
    vocab["<img_ratio_16>"] = 21
    square = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    square.pre_tokenizer = Whitespace()
    square.save(str(tmp_path / "square.json"))
    runs = {}
    for name, ratio in (("default", []), ("given", ["--ratio-index", "16"]), ("other", ["--ratio-index", "3"])):
        assert main([str(exported["folder"]), "--tokenizer", str(tmp_path / "square.json"), "--prompt", "a cat",
                     *ratio, "--steps", "1", "--latent-hw", "2x2", "--out", str(tmp_path / f"{name}.pt"), "--quiet"]) == 0
        runs[name] = torch.load(tmp_path / f"{name}.pt")["latents"]
    assert torch.equal(runs["default"], runs["given"])
    assert not torch.equal(runs["default"], runs["other"])
