"""Classifier-free guidance in the FLUX family: a teacher without a guidance embedding run as
``uncond + w (cond - uncond)`` against the empty prompt (whole, and across two pipeline stages),
prompt dropout in flow-matching training, and the one-line errors of settings that cannot work."""

from __future__ import annotations

from pathlib import Path
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "assets" / "shapes_teacher"  # the shapes world's pixel FLUX, no guidance embedding
PROMPTS = ["a red circle above a blue square", "two green triangles", "a yellow square", "three cyan circles"]


def _config(*overrides):
    from mfmegatron.config import load_config
    from mfmegatron.training.config import TrainConfig

    # The hashed-word dummy encoder (no tokenizer file needed), the shipped teacher.
    return load_config(TrainConfig, REPO / "recipes" / "shapes_distill_cpu.yaml",
                       ["data.text_tokenizer=null", f"model.teacher_checkpoint={TEACHER}", *overrides])  # fmt: skip


def _prompt_batch(prompts):
    from mfmegatron.data import PromptBatch

    count = len(prompts)
    return PromptBatch(keys=[f"p{i}" for i in range(count)], prompts=list(prompts), meta=[None] * count,
                       shards=[""] * count, epochs=[0] * count, positions=list(range(count)))


def _teacher_inputs(family, config):
    text = family.text_conditioning(config, torch.device("cpu"), torch.float32)
    cond = family.condition(_prompt_batch(PROMPTS), config, torch.device("cpu"), torch.float32, text=text,
                            draw=(0, 1, 0))
    generator = torch.Generator().manual_seed(3)
    z = torch.randn((len(PROMPTS), *family.latent_shape(config)), generator=generator)
    t = torch.tensor([0.9, 0.6, 0.35, 0.1])
    return z, t, cond, text


def _cfg_reference():
    from mfmegatron.parallel import initialize_parallel
    from mfmegatron.training.runner import NetworkRunner
    from models.flux.training import FluxFamily

    initialize_parallel()
    family = FluxFamily()
    config = _config("model.guidance_range=[2.0,6.0]")
    z, t, cond, text = _teacher_inputs(family, config)
    networks = family.build_networks(config, torch.device("cpu"), with_fake=False)
    teacher = networks.teacher.eval()
    guided = NetworkRunner(family, teacher, num_microbatches=2).velocity(z, t, cond)
    # The reference: two ordinary calls of the same network, the prompt's and the empty prompt's
    # encodings (straight from the text encoder), combined by hand.
    empty = text.encode([""])
    with torch.no_grad():
        v_cond = teacher(cond.inputs(z, t))
        unconditional = family.slice_condition(cond, slice(None), None)
        unconditional.encoder_hidden_states = family._text_states(empty.t5, config.model.text_tokens).expand_as(
            cond.encoder_hidden_states)
        unconditional.pooled_projections = empty.pooled.expand_as(cond.pooled_projections)
        v_uncond = teacher(unconditional.inputs(z, t))
    w = cond.guidance_scale.view(-1, 1, 1)
    # The student learns w through a guidance embedding of its own, zero at first: at r = t it is
    # the conditional teacher at every w, and the embedding's output layer gets a gradient.
    student = networks.student
    u, _ = family.stage_forward(student, z, t, t, cond, None)
    u.square().mean().backward()
    return {"guided": guided, "two_calls": v_uncond + w * (v_cond - v_uncond), "v_cond": v_cond,
            "guidance_scale": cond.guidance_scale, "is_guided": teacher.classifier_free_guidance,
            "student_guidance": student.config.guidance_embeds, "student_at_init": u.detach(),
            "guidance_gradient": float(student.guidance_in.mlp.linear_2.weight.grad.abs().sum())}


def _pipelined_teacher():
    from mfmegatron.parallel import initialize_parallel
    from mfmegatron.training.runner import NetworkRunner
    from models.flux.training import FluxFamily

    initialize_parallel(pipeline_parallel_size=2)
    family = FluxFamily()
    config = _config("model.guidance_range=[2.0,6.0]", "parallel.pipeline_parallel_size=2", "parallel.num_microbatches=2")
    z, t, cond, _ = _teacher_inputs(family, config)
    networks = family.build_networks(config, torch.device("cpu"), with_fake=False)
    runner = NetworkRunner(family, networks.teacher.eval(), num_microbatches=2, no_grad_rows=2)
    # As numbers: a tensor that a rank's collectives filled does not survive the rank's exit.
    return runner.velocity(z, t, cond).numpy().copy()


def test_the_cfg_teacher_is_uncond_plus_w_times_the_difference_whole_and_across_two_stages():
    from mfmegatron.parallel import run_on_ranks

    (reference,) = run_on_ranks(_cfg_reference, 1)
    # Per-sample scales in [2, 6], a different one per sample.
    w = reference["guidance_scale"]
    assert reference["is_guided"] and ((w >= 2) & (w <= 6)).all() and len(set(w.tolist())) == 4
    scale = reference["two_calls"].abs().max()
    torch.testing.assert_close(reference["guided"], reference["two_calls"], rtol=0, atol=1e-5 * scale)
    assert (reference["guided"] - reference["v_cond"]).abs().max() > 1e-2 * scale  # guidance did something
    assert reference["student_guidance"] and reference["guidance_gradient"] > 0
    torch.testing.assert_close(reference["student_at_init"], reference["v_cond"], rtol=0, atol=1e-6 * scale)
    # Across two pipeline stages (the [cond; uncond] activation travels as [2s, b, h]): the same.
    for through_pipeline in run_on_ranks(_pipelined_teacher, 2):
        torch.testing.assert_close(torch.from_numpy(through_pipeline), reference["two_calls"], rtol=0,
                                   atol=1e-5 * scale)


def test_prompt_dropout_in_flow_matching_gives_the_empty_prompt_keyed_by_global_sample():
    from mfmegatron.training.guidance import dropped_prompts
    from models.flux.training import FluxFamily

    family, cpu = FluxFamily(), torch.device("cpu")
    prompts = [f"a red circle above a blue square {i}" for i in range(16)]
    config = _config("train.objective=flow_matching", "model.prompt_dropout=0.5")
    text = family.text_conditioning(config, cpu, torch.float32)
    kept = family.condition(_prompt_batch(prompts), config, cpu, torch.float32, text=text)  # evaluation
    cond = family.condition(_prompt_batch(prompts), config, cpu, torch.float32, text=text, draw=(0, 3, 0))
    dropped = dropped_prompts(0.5, 16, (0, 3, 0))
    assert torch.equal(cond.dropped, dropped) and 0 < int(dropped.sum()) < 16
    assert not kept.dropped.any()
    empty = text.encode([""])
    empty_t5 = family._text_states(empty.t5, config.model.text_tokens)[0]
    for row in range(16):
        if dropped[row]:
            assert torch.equal(cond.encoder_hidden_states[row], empty_t5)
            assert torch.equal(cond.pooled_projections[row], empty.pooled[0])
        else:
            assert torch.equal(cond.encoder_hidden_states[row], kept.encoder_hidden_states[row])
    assert not torch.equal(kept.encoder_hidden_states[0], empty_t5)
    assert family.condition_stats(cond) == {"prompt_dropped": float(dropped.float().mean())}
    assert family.condition_stats(family.slice_condition(cond, slice(0, 8), 8))["prompt_dropped"] == float(
        dropped[:8].float().mean())
    # The same global sample gets the same draw however the batch is split over ranks.
    second_half = family.condition(_prompt_batch(prompts[8:]), config, cpu, torch.float32, text=text, draw=(0, 3, 8))
    assert torch.equal(second_half.dropped, dropped[8:])
    # Distillation keeps every prompt and carries no dropout.
    distil = _config("model.prompt_dropout=0.5")
    assert family.condition(_prompt_batch(prompts), distil, cpu, torch.float32, text=text,
                            draw=(0, 3, 0)).dropped is None  # fmt: skip


def test_guidance_settings_that_cannot_work_are_one_line_errors():
    from models.flux.training import FluxFamily

    family, cpu = FluxFamily(), torch.device("cpu")

    def error_of(*overrides) -> str:
        with pytest.raises(ValueError) as error:
            family.text_conditioning(_config(*overrides), cpu, torch.float32)
        assert "\n" not in str(error.value)
        return str(error.value)

    assert "must be [lo, hi] with 0 < lo <= hi" in error_of("model.guidance_range=[5.0,3.0]")
    assert "model.prompt_dropout 1.0 must be in [0, 1)" in error_of("model.prompt_dropout=1.0")
    assert "need the empty prompt's encodings" in error_of("model.guidance_range=[3.0,3.0]",
                                                          "data.text_encoder=precomputed")
    assert "need the empty prompt's encodings" in error_of("train.objective=flow_matching",
                                                          "data.text_encoder=precomputed")
    # A guidance-distilled teacher (an embedding of the scale, as FLUX.1-dev) runs without CFG.
    dev_like = ["model.teacher_checkpoint=null", "model.preset=tiny", "model.guidance_range=[3.0,3.0]"]
    assert "has a guidance embedding" in error_of(*dev_like)
    # Flow matching on precomputed embeddings without dropout is fine.
    assert family.text_conditioning(_config("train.objective=flow_matching", "data.text_encoder=precomputed",
                                            "model.prompt_dropout=0"), cpu, torch.float32) is None


def test_a_teacher_recipe_resumes_from_a_checkpoint_whose_architecture_its_overrides_repeat():
    """The teacher recipe's architecture overrides with ``model.teacher_checkpoint`` (fine-tuning
    a teacher): equal ones are accepted, a contradicting one is a one-line error."""
    from mfmegatron.config import load_config
    from mfmegatron.training.config import TrainConfig
    from models.flux.training import FluxFamily

    def config(*overrides):
        return load_config(TrainConfig, REPO / "recipes" / "shapes_teacher_cpu.yaml",
                           [f"model.teacher_checkpoint={TEACHER}", *overrides])  # fmt: skip

    flux = FluxFamily().model_config(config(), student=False)
    assert flux.hidden_size == 128 and not flux.guidance_embeds and list(flux.axes_dims_rope) == [8, 12, 12]
    with pytest.raises(ValueError) as error:
        FluxFamily().model_config(config("model.overrides.hidden_size=256"), student=False)
    assert "model.overrides.hidden_size=256 contradicts the teacher checkpoint" in str(error.value)
    assert "\n" not in str(error.value)
    # Fields that do not shape the weights apply over the checkpoint: a teacher fine-tuned into a
    # smooth time embedding, another attention tangent pass.
    smooth = FluxFamily().model_config(config("model.overrides.time_embedding_scale=1.0",
                                              "model.overrides.attention_tangent_pass=logsumexp"), student=False)
    assert smooth.time_embedding_scale == 1.0 and smooth.attention_tangent_pass == "logsumexp"
