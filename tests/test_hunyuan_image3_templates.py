"""HunyuanImage 3.0's sequence templates (``model.sequence_template``): the base model's
``pretrain`` and the Instruct models' ``instruct``, which puts role text around the prompt and the
image.

References: the layout the official Instruct-era tokenizer builds (each piece a section encoded on
its own: ``<bos> [system "\\n\\n"] "User: " prompt "\\n\\n" "Assistant: " <answer> <boi> <size>
<ratio> <timestep> <guidance> <timestep_r> <img>… <eoi> </answer> "\\n\\n"``), written out here
token by token by name; the dense rewrite of the official forward (``reference_velocity``) in
float64 on such a sequence; and the trainer family's conditioning, export and sampler CLI.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mfmegatron.parallel import parallel_context
from tests.test_hunyuan_image3_image import _randomise, _released_weights, reference_velocity
from tests.test_hunyuan_image3_student import _student_config, _tokens

BASE = 64
SYSTEM = "draw a cat"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from models.hunyuan_image3.tokenizer import write_word_level_tokenizer

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    write_word_level_tokenizer(["a red cat", "a blue boat", SYSTEM], path, BASE)
    return path


def _prompt_tokenizer(path, template, system_prompt=None):
    from models.hunyuan_image3.tokenizer import PromptTokenizer

    return PromptTokenizer(path, BASE, template, system_prompt)


def test_instruct_sequences_are_the_official_layout_and_cfg_replaces_only_the_prompt(tokenizer_file):
    from models.hunyuan_image3.sequence import PRETRAIN, build_image_sequences, unconditional_sequences
    from models.hunyuan_image3.tokenizer import ratio_index

    text = _prompt_tokenizer(tokenizer_file, "instruct", SYSTEM)
    tokens = text.image_tokens(BASE, BASE)
    prompts = text.encode(["a red cat", "a boat"], 40)
    seq = build_image_sequences(prompts, (2, 2), tokens, length=36, student_tokens=True, template=text.template)

    def named(*names):
        return [text.id(name) for name in names]

    ratio = f"<img_ratio_{ratio_index(BASE, BASE, BASE)}>"
    head = ["<|startoftext|>", "draw", "a", "cat", "\n\n", "User", ":"]
    middle = ["\n\n", "Assistant", ":", "<answer>", "<boi>", f"<img_size_{BASE}>", ratio, "<timestep>", "<guidance>",
              "<timestep_r>", *["<img>"] * 4, "<eoi>", "</answer>", "\n\n"]
    first = named(*head, "a", "red", "cat", *middle)
    second = named(*head, "a", "boat", *middle)
    assert seq.input_ids.tolist() == [first + named("<pad>") * (36 - len(first)),
                                      second + named("<pad>") * (36 - len(second))]
    assert seq.prompt_spans == [(7, 10), (7, 9)]
    assert seq.image_spans == [(20, 24), (19, 23)] and seq.lengths == [27, 26]
    assert seq.timestep_positions == [17, 16] and seq.guidance_positions == [18, 17]
    # Text before and after the image sits at its index (y = x = n), the image from its start.
    assert seq.positions_y[0, :20].tolist() == list(range(20)) and seq.positions_y[0, 24:27].tolist() == [24, 25, 26]
    assert seq.positions_y[0, 20:24].tolist() == [21, 21, 22, 22] and seq.positions_x[0, 20:24].tolist() == [21, 22] * 2

    # The unconditional sequence: <cfg> for the prompt's ids only; the system prompt, the role
    # text and <answer> stay (the official tokenizer marks only the user's text for <cfg>).
    uncond = unconditional_sequences(seq, tokens).input_ids
    changed = (uncond != seq.input_ids).nonzero().tolist()
    assert changed == [[0, 7], [0, 8], [0, 9], [1, 7], [1, 8]]
    assert (uncond[0, 7:10] == text.id("<cfg>")).all()

    # pretrain: no role text; a system prompt alone goes before the prompt; no template = the default.
    assert _prompt_tokenizer(tokenizer_file, "pretrain").template == PRETRAIN
    plain = build_image_sequences(prompts, (2, 2), tokens, template=_prompt_tokenizer(tokenizer_file, "pretrain", SYSTEM).template)
    assert plain.input_ids[1, :9].tolist() == named("<|startoftext|>", "draw", "a", "cat", "a", "boat", "<boi>",
                                                   f"<img_size_{BASE}>", ratio)
    assert plain.prompt_spans == [(4, 7), (4, 6)]
    assert torch.equal(build_image_sequences(prompts, (2, 2), tokens).input_ids,
                       build_image_sequences(prompts, (2, 2), tokens, template=PRETRAIN).input_ids)


def test_the_instruct_release_adds_four_fixed_buckets_after_the_stepped_ones(tokenizer_file, tmp_path):
    """The Instruct release's image processor appends 1024x768, 1280x720, 768x1024 and 720x1280
    (height x width) to the 33 buckets around the base: ``<img_ratio_33>`` to ``<img_ratio_36>``,
    and the nearest-ratio choice sees them."""
    from models.hunyuan_image3.tokenizer import PromptTokenizer, check_image_size, ratio_index, resolution_buckets

    stepped = resolution_buckets(1024)
    instruct = resolution_buckets(1024, "instruct")
    assert len(stepped) == 33 and instruct[:33] == stepped
    assert instruct[33:] == [(1024, 768), (1280, 720), (768, 1024), (720, 1280)]
    # A 4:3 portrait: its own bucket under instruct; the base model's nearest is 1152x896 (9:7).
    assert ratio_index(1024, 768, 1024, "instruct") == 33 and ratio_index(1024, 768, 1024) == 18
    assert stepped[18] == (1152, 896)
    assert [ratio_index(h, w, 1024, "instruct") for h, w in instruct[33:]] == [33, 34, 35, 36]
    assert ratio_index(1024, 1024, 1024, "instruct") == 16
    assert check_image_size(720, 1280, 1024, sequence_template="instruct") == (45, 80)
    with pytest.raises(ValueError, match="model.image_size 720x1280 is not one of"):
        check_image_size(720, 1280, 1024)

    # The stand-in tokenizer has the extra ratio tokens last (earlier files keep their ids).
    text = _prompt_tokenizer(tokenizer_file, "instruct")
    assert text.id("<img_ratio_33>") == text.vocab_size - 4 and text.id("<img_ratio_32>") < text.id("a")
    assert text.image_tokens(96, 72).ratio == text.id("<img_ratio_33>")  # 4:3 around base 64 as well
    assert _prompt_tokenizer(tokenizer_file, "pretrain").image_tokens(96, 72).ratio != text.id("<img_ratio_33>")
    # A tokenizer without them serves pretrain, and is one line under instruct.
    data = json.loads(tokenizer_file.read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<img_ratio_36>"]
    data["model"]["vocab"].pop("<img_ratio_36>")
    lacking = tmp_path / "lacking.json"
    lacking.write_text(json.dumps(data))
    PromptTokenizer(lacking, BASE, "pretrain")
    with pytest.raises(ValueError) as error:
        PromptTokenizer(lacking, BASE, "instruct")
    assert "lacks HunyuanImage 3.0's special tokens <img_ratio_36>" in str(error.value)


def test_the_model_reads_an_instruct_sequence_as_the_dense_official_forward():
    """float64 "tokens" student on an instruct-template batch (ids invented, the layout the
    official one): its velocity equals the dense rewrite of the official forward; the text after
    ``<eoi>`` cannot reach the image (causal), the role text before it does."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model, local_weights
    from models.hunyuan_image3.sequence import TextTemplate, build_image_sequences

    config = _student_config("tokens", params_dtype=torch.float64, moe_router_dtype="fp64")
    template = TextTemplate(before_prompt=(40, 41), before_image=(42, 43, 44), after_image=(45, 42))
    prompts = [[10, 11, 12], [13, 14, 15, 16, 17]]
    sequence = build_image_sequences(prompts, (2, 3), _tokens(), student_tokens=True, template=template)
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(2, config.latent_channels, 2, 3, generator=g, dtype=torch.float64)
    sigma, sigma_r = torch.tensor([0.9, 0.6], dtype=torch.float64), torch.tensor([0.3, 0.1], dtype=torch.float64)
    guidance = torch.tensor([2.5, 6.0], dtype=torch.float64)

    def rows_replaced(positions, value):
        ids = sequence.input_ids.clone()
        for sample, index in positions:
            ids[sample, index] = value
        return dataclasses.replace(sequence, input_ids=ids)

    after = [(i, end + k) for i, (_, end) in enumerate(sequence.image_spans) for k in (1, 2)]
    before = [(i, 1) for i in range(2)]  # the first role-text token
    with parallel_context():
        torch.manual_seed(0)
        model = build_hunyuan_model(config)
        _randomise(model, 12, scale=0.2)
        released = _released_weights({name: t.clone() for name, t in local_weights(model)}, config)
        with torch.no_grad():
            u = model.velocity(sequence, latents, sigma, sigma_r=sigma_r, guidance=guidance)
            u_after = model.velocity(rows_replaced(after, 0), latents, sigma, sigma_r=sigma_r, guidance=guidance)
            u_before = model.velocity(rows_replaced(before, 50), latents, sigma, sigma_r=sigma_r, guidance=guidance)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        expected = reference_velocity(released, config, sequence, latents, sigma, sigma_r=sigma_r, guidance=guidance)
    torch.testing.assert_close(u, expected, rtol=1e-6, atol=1e-7 * expected.abs().max().item())
    # Equal up to float64 round-off (the experts batch other rows when the suffix's ids change).
    torch.testing.assert_close(u_after, u, rtol=0, atol=1e-12 * u.abs().max().item())
    assert (u_before - u).abs().max() > 1e-3 * u.abs().max()


def test_the_family_builds_instruct_sequences_within_the_text_budget(tokenizer_file, tmp_path):
    """The trainer's conditioning under ``model.sequence_template=instruct``: teacher, student and
    unconditional sequences carry the role text; the sequence length is the pretrain one (the
    template's text counts in ``model.text_tokens``); too small a budget is one line."""
    from mfmegatron.config import load_config
    from mfmegatron.data import PromptBatch
    from mfmegatron.training.config import TrainConfig
    from models.hunyuan_image3.training import HunyuanImage3Family
    from tests.test_hunyuan_image3_training import RECIPE

    def recipe(*overrides):
        return load_config(TrainConfig, RECIPE, [f"data.text_tokenizer={tokenizer_file}", f"model.image_base_size={BASE}",
                                                 f"model.image_size={BASE}", *overrides])

    family, cpu = HunyuanImage3Family(), torch.device("cpu")
    batch = PromptBatch(keys=["a", "b"], prompts=["a red cat", "a blue boat"], meta=[None] * 2, shards=[""] * 2,
                        epochs=[0] * 2, positions=[0, 1])
    config = recipe("model.sequence_template=instruct", f"model.system_prompt={SYSTEM}", "model.text_tokens=16")
    pretrain = recipe("model.text_tokens=16")
    text = family.text_conditioning(config, cpu, torch.float32)
    cond = family.condition(batch, config, cpu, torch.float32, text=text, draw=(0, 0, 0))
    answer = text.id("<answer>")
    for sequence in (cond.sequence, cond.unconditional, cond.student_sequence):
        assert sequence.input_ids.shape[1] == family.sequence_length(config) == family.sequence_length(pretrain)
        assert ((sequence.input_ids == answer).sum(1) == 1).all()
    assert cond.sequence.prompt_spans == [(7, 10), (7, 10)]
    assert cond.student_sequence.guidance_positions is not None
    # The student's config records the template (exported students carry it into config.json).
    student = family.model_config(config, student=True)
    assert (student.sequence_template, student.system_prompt) == ("instruct", SYSTEM)

    with pytest.raises(ValueError) as error:
        family.text_conditioning(recipe("model.sequence_template=instruct", "model.text_tokens=8"), cpu, torch.float32)
    assert str(error.value) == ("model.text_tokens 8 leaves no room for a prompt: the instruct template's text (with "
                                "the system prompt) is 8 tokens")
    tight = recipe("model.sequence_template=instruct", "model.text_tokens=10")
    with pytest.raises(ValueError) as error:
        family.condition(batch, tight, cpu, torch.float32, text=family.text_conditioning(tight, cpu, torch.float32))
    assert str(error.value) == ("the prompt 'a red cat' is 3 tokens; model.text_tokens allows 10 (8 of them are the "
                                "template's text)")
    no_answer = tmp_path / "no_answer.json"
    data = json.loads(tokenizer_file.read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "</answer>"]
    data["model"]["vocab"].pop("</answer>")
    no_answer.write_text(json.dumps(data))
    with pytest.raises(ValueError) as error:
        family.text_conditioning(recipe("model.sequence_template=instruct", f"data.text_tokenizer={no_answer}"), cpu,
                                 torch.float32)
    assert "lacks HunyuanImage 3.0's special tokens </answer>" in str(error.value)


def test_an_exported_instruct_student_records_its_template_and_the_sampler_uses_it(tokenizer_file, tmp_path, capsys):
    """config.json carries ``mfmegatron_sequence_template`` / ``mfmegatron_system_prompt``; the
    sampler CLI builds that template by default (the same latents as the in-memory student on the
    instruct sequence), and ``--sequence-template pretrain`` gives other latents."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model, local_weights
    from models.hunyuan_image3.sampling import load_exported_student, sample_student
    from models.hunyuan_image3.sequence import build_image_sequences
    from models.hunyuan_image3.state_dict_adapter import from_megatron, hf_config_from_config
    from tests.test_hunyuan_image3_conversion import _write_hf_folder
    from tests.test_hunyuan_image3_sampling import _config
    from tools.sample_hunyuan_image3 import main

    config = _config(sequence_template="instruct", system_prompt=SYSTEM)
    folder = tmp_path / "hf"
    with parallel_context():
        torch.manual_seed(0)
        model = build_hunyuan_model(config)
        _randomise(model, 21, scale=0.2)
        full = {name: t.clone() for name, t in local_weights(model)}
        hf_config = hf_config_from_config(config)
        _write_hf_folder(folder, from_megatron(full, config, image_head=True), hf_config)
        assert hf_config["mfmegatron_sequence_template"] == "instruct"
        assert hf_config["mfmegatron_system_prompt"] == SYSTEM
        loaded = load_exported_student(folder, torch.float32)
        assert (loaded.config.sequence_template, loaded.config.system_prompt) == ("instruct", SYSTEM)

        text = _prompt_tokenizer(tokenizer_file, "instruct", SYSTEM)
        common = [str(folder), "--tokenizer", str(tokenizer_file), "--prompt", "a red cat", "--base-size", str(BASE),
                  "--steps", "1", "--guidance", "3", "--latent-hw", "2x2", "--quiet"]
        assert main([*common, "--out", str(tmp_path / "default.pt")]) == 0
        assert main([*common, "--sequence-template", "pretrain", "--system-prompt", "",
                     "--out", str(tmp_path / "pretrain.pt")]) == 0
        sequence = build_image_sequences(text.encode(["a red cat"], 40), (2, 2), text.image_tokens(BASE, BASE),
                                         student_tokens=True, template=text.template)
        noise = torch.randn(1, config.latent_channels, 2, 2, generator=torch.Generator().manual_seed(0))
        expected = sample_student(model.eval(), sequence, noise, 1, 3.0)
    default = torch.load(tmp_path / "default.pt")["latents"]
    torch.testing.assert_close(default, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(torch.load(tmp_path / "pretrain.pt")["latents"], default)
    # A 4:3 grid under the instruct template: the Instruct release's <img_ratio_33>, not the
    # stepped buckets' nearest (18).
    portrait = [*common[:-3], "--latent-hw", "4x3", "--quiet"]
    for name, extra in (("auto", []), ("r33", ["--ratio-index", "33"]), ("r18", ["--ratio-index", "18"])):
        assert main([*portrait, *extra, "--out", str(tmp_path / f"{name}.pt")]) == 0
    auto = torch.load(tmp_path / "auto.pt")["latents"]
    assert auto.shape[-2:] == (4, 3)
    assert torch.equal(auto, torch.load(tmp_path / "r33.pt")["latents"])
    assert not torch.equal(auto, torch.load(tmp_path / "r18.pt")["latents"])

    # A released folder: no fields of ours in config.json; its generation_config.json names the
    # template (and an official system prompt, whose text the sampler does not have: it says so).
    released = tmp_path / "released"
    shutil.copytree(folder, released)
    fields = json.loads((released / "config.json").read_text())
    del fields["mfmegatron_sequence_template"], fields["mfmegatron_system_prompt"]
    (released / "config.json").write_text(json.dumps(fields))
    (released / "generation_config.json").write_text(json.dumps({"sequence_template": "instruct",
                                                                  "use_system_prompt": "en_vanilla"}))
    plain = [str(released), *common[1:]]
    capsys.readouterr()
    assert main([*plain[:-1], "--out", str(tmp_path / "released.pt")]) == 0
    said = capsys.readouterr().err
    assert "the instruct template, as generation_config.json names it" in said
    assert "official system prompt 'en_vanilla'" in said
    assert main([*plain, "--sequence-template", "instruct", "--system-prompt", "",
                 "--out", str(tmp_path / "instruct_bare.pt")]) == 0
    assert torch.equal(torch.load(tmp_path / "released.pt")["latents"], torch.load(tmp_path / "instruct_bare.pt")["latents"])
    # An instruct template without a tokenizer to encode its text: one line.
    special = tmp_path / "special.json"
    special.write_text(json.dumps(dataclasses.asdict(_tokens())))
    capsys.readouterr()
    assert main([str(folder), "--prompt-ids", "13,14", "--special-tokens", str(special), "--latent-hw", "2x2",
                 "--out", str(tmp_path / "x.pt"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == ("sample_hunyuan_image3: error: the instruct template and the system "
                                               "prompt need --tokenizer to encode their text")
