"""Student export and the few-step MeanFlowFluxPipeline.

A tiny megatron MeanFlow student (random weights, and a random, non-zero interval embedding so
that its path matters) is saved as a dist checkpoint and exported with ``mfmegatron-convert-flux
export``; the pipeline loads that folder with tiny random VAE / CLIP / T5 components and locally
built tokenizers (a FLUX pipeline folder written here), and its final latents for 1, 2 and 4 steps
(and a custom grid) must equal the megatron student's own few-step sampling, run at TP=2 in spawned
gloo ranks from the same checkpoint on the pipeline's prompt embeddings and initial noise.

Two spawns: one rank (checkpoint, CLI export, import back, a teacher's import/export), then two
ranks (the checkpoint at TP=2: in-memory export and the megatron sampling). Comparisons happen here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mfmegatron.parallel import run_on_ranks
from tests.flux_fixtures import TINY, diffusers_flux

PROMPTS = ["a red cat riding a horse", "a blue astronaut on the moon"]
IMAGES_PER_PROMPT = 2
HEIGHT, WIDTH = 32, 48  # VAE factor 2, packed 2 x 2: 8 x 12 = 96 image tokens
MAX_SEQUENCE_LENGTH = 16
SEED = 7
GRIDS = {1: [1.0, 0.0], 2: [1.0, 0.5, 0.0], 4: [1.0, 0.75, 0.5, 0.25, 0.0], "custom": [1.0, 0.7, 0.2, 0.0]}
HIDDEN = TINY["num_attention_heads"] * TINY["attention_head_dim"]
SHARD = "150KB"


# --------------------------------------------------------------------------- tiny FLUX components


def _tokenizers():
    from transformers import CLIPTokenizer, T5TokenizerFast

    words = "a photo of cat dog red blue green astronaut riding horse on the moon".split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -1.0) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    t5 = T5TokenizerFast(vocab=pieces, extra_ids=0)  # a unigram model from these pieces, no files
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    return clip, t5


def save_base_pipeline(folder: Path) -> None:
    """A FLUX pipeline folder (vae, text_encoder(_2), tokenizer(_2)) with tiny random models whose
    widths fit the tiny transformer: T5 d_model = joint_attention_dim, CLIP width = pooled dim."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer, t5_tokenizer = _tokenizers()
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=TINY["pooled_projection_dim"], intermediate_size=48,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32, projection_dim=24,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))  # fmt: skip
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=TINY["joint_attention_dim"], d_kv=8, d_ff=64, num_layers=1,
        num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))  # fmt: skip
    # FLUX's VAE scaling / shift factors; 4 latent channels packed 2 x 2 = the transformer's 16.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=TINY["in_channels"] // 4, norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159,
    )  # fmt: skip
    for name, component in (("vae", vae), ("text_encoder", clip), ("tokenizer", clip_tokenizer),
                            ("text_encoder_2", t5), ("tokenizer_2", t5_tokenizer)):
        component.save_pretrained(str(folder / name))


def interval_weights(seed: int = 11) -> dict:
    """A trained-looking (non-zero) interval embedding, in our keys."""
    g = torch.Generator().manual_seed(seed)
    return {
        "interval_in.mlp.linear_1.weight": torch.randn(HIDDEN, 256, generator=g) * 0.1,
        "interval_in.mlp.linear_1.bias": torch.randn(HIDDEN, generator=g) * 0.1,
        "interval_in.mlp.linear_2.weight": torch.randn(HIDDEN, HIDDEN, generator=g) * 0.2,
        "interval_in.mlp.linear_2.bias": torch.randn(HIDDEN, generator=g) * 0.1,
    }


# --------------------------------------------------------------------------- rank functions


def _export_and_round_trip(work: str, teacher_state: dict, interval: dict) -> dict:
    """One rank: the student's dist checkpoint as training writes it, CLI export, import back,
    export again; and a teacher's import / export."""
    from megatron.core import dist_checkpointing

    from mfmegatron.parallel import initialize_parallel
    from models.flux.config import tiny_flux_config
    from models.flux.export import checkpoint_is_student
    from models.flux.parallelize import build_flux_model, load_full_weights, save_dist_checkpoint
    from models.flux.state_dict_adapter import diffusers_config_from_flux, to_megatron
    from tools.convert_flux import run

    work = Path(work)
    initialize_parallel()
    config = tiny_flux_config(mean_flow_student=True)
    model = build_flux_model(config)
    full = {**dict(to_megatron(teacher_state.__getitem__, config)), **interval}
    load_full_weights(model, full.__getitem__)
    save_dist_checkpoint(model, work / "student_ckpt", diffusers_config_from_flux(config))

    results = {}
    results["export"] = run(["export", "--checkpoint", str(work / "student_ckpt"), "--output",
                             str(work / "student_hf"), "--max-shard-size", SHARD, "--quiet"])
    results["import"] = run(["import", "--diffusers", str(work / "student_hf"), "--output",
                             str(work / "student_ckpt_rt"), "--dtype", "fp32", "--quiet"])
    run(["export", "--checkpoint", str(work / "student_ckpt_rt"), "--output", str(work / "student_hf_rt"),
         "--max-shard-size", SHARD, "--quiet"])
    results["dry_run"] = run(["export", "--checkpoint", str(work / "student_ckpt"), "--output",
                              str(work / "unused"), "--dry-run", "--quiet"])
    for name in ("student_ckpt", "student_ckpt_rt"):
        loaded = dist_checkpointing.load_plain_tensors(str(work / name))
        results[name] = {k: v for k, v in loaded.items() if torch.is_tensor(v)}

    results["teacher_import"] = run(["import", "--diffusers", str(work / "teacher_hf"), "--output",
                                      str(work / "teacher_ckpt"), "--dtype", "fp32", "--quiet"])
    results["teacher_export"] = run(["export", "--checkpoint", str(work / "teacher_ckpt"), "--output",
                                     str(work / "teacher_export"), "--max-shard-size", SHARD, "--quiet"])
    results["is_student"] = {name: checkpoint_is_student(work / name) for name in ("student_ckpt", "teacher_ckpt")}
    return results


def _sample_at_tp2(work: str, inputs: dict) -> dict:
    """Two ranks: the student checkpoint at TP=2; in-memory export; megatron few-step sampling."""
    from mfmegatron.parallel import initialize_parallel
    from models.flux.export import export_to_diffusers
    from models.flux.meanflow import FluxCondition, FluxMeanFlowStudent
    from models.flux.parallelize import build_flux_model, flux_config_from_checkpoint, load_dist_checkpoint

    work = Path(work)
    initialize_parallel(tensor_parallel_size=2)
    config = flux_config_from_checkpoint(
        work / "student_ckpt", tensor_model_parallel_size=2, use_cpu_initialization=True, mean_flow_student=True
    )
    model = build_flux_model(config)
    load_dist_checkpoint(model, work / "student_ckpt")
    written = export_to_diffusers(model, work / "student_hf_memory", max_shard_size=150_000)

    student = FluxMeanFlowStudent(model)
    noise = inputs["noise"]
    cond = FluxCondition(
        encoder_hidden_states=inputs["prompt_embeds"],
        pooled_projections=inputs["pooled_prompt_embeds"],
        img_ids=inputs["img_ids"],
        txt_ids=inputs["txt_ids"],
        guidance=torch.full((noise.shape[0],), inputs["guidance_scale"], dtype=torch.float32),
    )
    samples = {}
    with torch.no_grad():
        for name, grid in GRIDS.items():
            z = noise
            for t_now, t_next in zip(grid[:-1], grid[1:]):
                t = torch.full((z.shape[0],), t_now, dtype=z.dtype)
                r = torch.full((z.shape[0],), t_next, dtype=z.dtype)
                z = z - (t - r)[:, None, None] * student.mean_velocity(z, r, t, cond)
            samples[name] = z
    return {"samples": samples, "written": None if written is None else str(written)}


# --------------------------------------------------------------------------- fixtures


@torch.no_grad()
def _pipeline_inputs(pipe) -> dict:
    """The prompt embeddings and initial noise the pipeline uses for PROMPTS and SEED."""
    prompt_embeds, pooled, txt_ids = pipe.encode_prompt(
        PROMPTS, num_images_per_prompt=IMAGES_PER_PROMPT, max_sequence_length=MAX_SEQUENCE_LENGTH
    )
    noise, img_ids = pipe.prepare_latents(
        len(PROMPTS) * IMAGES_PER_PROMPT, TINY["in_channels"] // 4, HEIGHT, WIDTH, prompt_embeds.dtype,
        torch.device("cpu"), torch.Generator().manual_seed(SEED),
    )  # fmt: skip
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled, "txt_ids": txt_ids,
            "noise": noise, "img_ids": img_ids, "guidance_scale": 3.5}


def _generate(pipe, grid_name, **overrides):
    grid = GRIDS[grid_name]
    steps = {"num_inference_steps": grid_name} if isinstance(grid_name, int) else {"timesteps": grid}
    kwargs = dict(height=HEIGHT, width=WIDTH, num_images_per_prompt=IMAGES_PER_PROMPT, guidance_scale=3.5,
                  generator=torch.Generator().manual_seed(SEED), output_type="latent",
                  max_sequence_length=MAX_SEQUENCE_LENGTH, **steps)
    kwargs.update(overrides)
    return pipe(PROMPTS, **kwargs).images


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from models.flux.pipeline import MeanFlowFluxPipeline

    work = tmp_path_factory.mktemp("student")
    save_base_pipeline(work / "base")
    teacher = diffusers_flux()
    teacher.save_pretrained(str(work / "teacher_hf"), max_shard_size="200KB")
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    interval = interval_weights()
    one = run_on_ranks(_export_and_round_trip, 1, str(work), teacher_state, interval, timeout=300)[0]

    pipe = MeanFlowFluxPipeline.from_pretrained(work / "student_hf", base_pipeline=work / "base")
    pipe.set_progress_bar_config(disable=True)
    inputs = _pipeline_inputs(pipe)
    latents = {name: _generate(pipe, name) for name in GRIDS}
    two = run_on_ranks(_sample_at_tp2, 2, str(work), inputs, timeout=300)
    return {"work": work, "one": one, "two": two, "pipe": pipe, "inputs": inputs, "latents": latents,
            "teacher_state": teacher_state, "interval": interval}


# --------------------------------------------------------------------------- the pipeline


@pytest.mark.parametrize("grid", list(GRIDS))
def test_pipeline_latents_equal_the_megatron_students_sampling(exported, grid):
    ours = exported["latents"][grid]
    assert ours.shape == (len(PROMPTS) * IMAGES_PER_PROMPT, (HEIGHT // 4) * (WIDTH // 4), TINY["in_channels"])
    for rank in exported["two"]:
        torch.testing.assert_close(ours, rank["samples"][grid], rtol=1e-5, atol=1e-5)
    # Each jump moves the latents: more steps give other images than one step.
    if grid != 1:
        assert not torch.allclose(ours, exported["latents"][1], atol=1e-3)


def test_the_interval_embedding_is_applied(exported):
    from models.flux.pipeline import MeanFlowFluxPipeline

    work = exported["work"]
    without = MeanFlowFluxPipeline.from_pretrained(work / "student_hf", base_pipeline=work / "base",
                                                   interval_embedder=None)
    without.set_progress_bar_config(disable=True)
    for grid in (1, 2):
        difference = (_generate(without, grid) - exported["latents"][grid]).abs().max()
        assert difference > 1e-2, grid
    # The transformer of a student pipeline is not usable without the interval.
    pipe, inputs = exported["pipe"], exported["inputs"]
    with pytest.raises(RuntimeError, match="interval"):
        pipe.transformer(hidden_states=inputs["noise"], timestep=torch.ones(4), guidance=torch.ones(4),
                         pooled_projections=inputs["pooled_prompt_embeds"], encoder_hidden_states=inputs["prompt_embeds"],
                         txt_ids=inputs["txt_ids"], img_ids=inputs["img_ids"])


def test_pil_and_np_outputs_have_the_requested_size(exported):
    pipe = exported["pipe"]
    images = pipe(PROMPTS[0], height=HEIGHT, width=WIDTH, num_inference_steps=1, max_sequence_length=MAX_SEQUENCE_LENGTH,
                  generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 1 and images[0].size == (WIDTH, HEIGHT) and images[0].mode == "RGB"
    array = pipe(PROMPTS, height=16, width=24, num_inference_steps=2, num_images_per_prompt=2, output_type="np",
                 max_sequence_length=MAX_SEQUENCE_LENGTH).images
    assert array.shape == (4, 16, 24, 3) and 0.0 <= array.min() and array.max() <= 1.0
    with pytest.raises(ValueError, match="output_type"):
        pipe(PROMPTS[0], height=HEIGHT, width=WIDTH, output_type="png")


def test_seeded_generator_is_reproducible_and_images_per_prompt_differ(exported):
    again = _generate(exported["pipe"], 2)
    assert torch.equal(again, exported["latents"][2])
    other_seed = _generate(exported["pipe"], 2, generator=torch.Generator().manual_seed(SEED + 1))
    assert not torch.allclose(other_seed, again)
    latents = exported["latents"][2]
    assert not torch.allclose(latents[0], latents[1])  # two images of the first prompt
    # The guidance scale reaches the transformer's guidance embedding.
    assert not torch.allclose(_generate(exported["pipe"], 1, guidance_scale=1.0), exported["latents"][1])


def test_step_callback_sees_each_jump(exported):
    seen = []

    def callback(pipe, step, t, tensors):
        seen.append((step, t, tensors["latents"].shape))
        return {}

    latents = _generate(exported["pipe"], 4, callback_on_step_end=callback)
    assert [(step, t) for step, t, _ in seen] == [(0, 1.0), (1, 0.75), (2, 0.5), (3, 0.25)]
    assert all(shape == latents.shape for _, _, shape in seen)
    assert torch.equal(latents, exported["latents"][4])


def test_progress_bar_counts_the_steps(exported, monkeypatch):
    pipe = exported["pipe"]
    totals = []
    original = type(pipe).progress_bar

    def spy(self, iterable=None, total=None):
        totals.append(total)
        return original(self, iterable=iterable, total=total)

    monkeypatch.setattr(type(pipe), "progress_bar", spy)
    _generate(pipe, 4)
    _generate(pipe, "custom")
    assert totals == [4, 3]


def test_time_grids_and_flux_time_shift(exported):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from models.flux.pipeline import FLUX_TIME_SHIFT, flux_time_shift_mu

    pipe = exported["pipe"]
    assert pipe.time_grid(1) == [1.0, 0.0] and pipe.time_grid(4) == GRIDS[4]
    for bad in ([0.9, 0.0], [1.0, 0.5], [1.0, 0.5, 0.6, 0.0], [1.0]):
        with pytest.raises(ValueError):
            pipe.time_grid(timesteps=bad)
    with pytest.raises(ValueError):
        pipe.time_grid(0)
    # The shift is FLUX's own: diffusers' scheduler with FLUX.1's settings gives the same sigmas.
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **FLUX_TIME_SHIFT)
    for steps, tokens in ((4, 96), (2, 4096), (3, 1024)):
        mu = flux_time_shift_mu(tokens)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
        ours = pipe.time_grid(steps, time_shift=True, image_seq_len=tokens)
        np.testing.assert_allclose(ours, scheduler.sigmas.double().numpy(), rtol=1e-6, atol=1e-7)
    # In the pipeline: one step is the same either way; with more steps the grid moves.
    torch.testing.assert_close(_generate(pipe, 1, time_shift=True), exported["latents"][1], rtol=0, atol=0)
    shifted = pipe.time_grid(2, time_shift=True, image_seq_len=96)
    assert shifted[1] > 0.5
    torch.testing.assert_close(_generate(pipe, 2, time_shift=True), _generate(pipe, 2, num_inference_steps=None,
                                                                              timesteps=shifted), rtol=0, atol=0)


def test_from_pretrained_needs_a_student_folder_and_the_other_components(exported):
    from models.flux.interval_embedder import IntervalEmbedderFormatError
    from models.flux.pipeline import MeanFlowFluxPipeline

    work = exported["work"]
    with pytest.raises(IntervalEmbedderFormatError, match="not an exported MeanFlow student"):
        MeanFlowFluxPipeline.from_pretrained(work / "teacher_export", base_pipeline=work / "base")
    with pytest.raises(ValueError, match="base_pipeline"):
        MeanFlowFluxPipeline.from_pretrained(work / "student_hf")
    with pytest.raises(FileNotFoundError):
        MeanFlowFluxPipeline.from_pretrained(work / "nowhere", base_pipeline=work / "base")


def test_saved_pipeline_folder_loads_back(exported):
    from models.flux.pipeline import MeanFlowFluxPipeline

    folder = exported["work"] / "saved_pipeline"
    exported["pipe"].save_pretrained(folder)
    again = MeanFlowFluxPipeline.from_pretrained(folder)
    again.set_progress_bar_config(disable=True)
    assert torch.equal(_generate(again, 2), exported["latents"][2])


# --------------------------------------------------------------------------- the export


def _read_folder(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("diffusion_pytorch_model*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def test_student_export_is_the_teacher_folder_plus_the_interval_embedder(exported):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    work, interval = exported["work"], exported["interval"]
    folder = work / "student_hf"
    assert exported["one"]["export"]["mean_flow_student"]
    # The transformer part is the teacher architecture, bit-exact, and diffusers loads it.
    tensors = _read_folder(folder)
    assert tensors.keys() == exported["teacher_state"].keys()
    assert all(torch.equal(tensors[k], v) for k, v in exported["teacher_state"].items())
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()  # sharded
    model = FluxTransformer2DModel.from_pretrained(str(folder))
    assert all(torch.equal(p, exported["teacher_state"][k]) for k, p in model.state_dict().items())
    # The interval embedder: TimestepEmbedding keys, our weights, and a description.
    embedder = load_file(str(folder / "interval_embedder.safetensors"))
    assert sorted(embedder) == ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]
    for key, tensor in embedder.items():
        assert torch.equal(tensor, interval[f"interval_in.mlp.{key}"]), key
    record = json.loads((folder / "interval_embedder.json").read_text())
    assert record["embedding_dim"] == HIDDEN and record["num_channels"] == 256
    assert record["input_scale"] == 1000.0 and record["sinusoid"]["flip_sin_to_cos"] is True
    assert "temb" in record["applied"] and "1000 * (t - r)" in record["input"]
    # The pipeline's embedder is diffusers' TimestepEmbedding with these weights.
    loaded = exported["pipe"].interval_embedder.embedder.state_dict()
    assert all(torch.equal(loaded[k], embedder[k]) for k in embedder)


def test_student_checkpoint_round_trip_is_bit_exact(exported):
    one = exported["one"]
    original, back = one["student_ckpt"], one["student_ckpt_rt"]
    assert original.keys() == back.keys()
    assert {k for k in original if k.startswith("interval_in.")} == set(exported["interval"])
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    assert one["import"]["mean_flow_student"]
    record = json.loads((exported["work"] / "student_ckpt_rt" / "mfmegatron_flux.json").read_text())
    assert record["mean_flow_student"] is True
    first, second = exported["work"] / "student_hf", exported["work"] / "student_hf_rt"
    for name in ("interval_embedder.safetensors", "interval_embedder.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    a, b = _read_folder(first), _read_folder(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_in_memory_export_at_tp2_equals_the_checkpoint_export(exported):
    work = exported["work"]
    assert [rank["written"] for rank in exported["two"]] == [str(work / "student_hf_memory"), None]
    memory, cli = work / "student_hf_memory", work / "student_hf"
    a, b = _read_folder(memory), _read_folder(cli)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("interval_embedder.safetensors", "interval_embedder.json", "config.json",
                 "diffusion_pytorch_model.safetensors.index.json"):
        assert (memory / name).read_bytes() == (cli / name).read_bytes(), name


def test_export_dry_run_reports_a_student(exported):
    assert exported["one"]["dry_run"]["mean_flow_student"]
    assert not (exported["work"] / "unused").exists()


def test_a_teacher_checkpoint_still_exports_as_before(exported):
    work = exported["work"]
    one = exported["one"]
    assert not one["teacher_import"]["mean_flow_student"] and not one["teacher_export"]["mean_flow_student"]
    tensors = _read_folder(work / "teacher_export")
    assert tensors.keys() == exported["teacher_state"].keys()
    for key, tensor in exported["teacher_state"].items():
        assert tensors[key].dtype == tensor.dtype and torch.equal(tensors[key], tensor), key
    assert not (work / "teacher_export" / "interval_embedder.json").exists()
    assert not (work / "teacher_export" / "interval_embedder.safetensors").exists()
    record = json.loads((work / "teacher_ckpt" / "mfmegatron_flux.json").read_text())
    assert "mean_flow_student" not in record
    assert one["is_student"] == {"student_ckpt": True, "teacher_ckpt": False}
