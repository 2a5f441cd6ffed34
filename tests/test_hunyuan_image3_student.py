"""The HunyuanImage 3.0 few-step student (``cfg_distilled`` / ``use_meanflow``), the CFG teacher's
sequences and guidance arithmetic.

References: the dense rewrite of the official forward (``tests/test_hunyuan_image3_image.py``'s
``reference_velocity``, extended with the student's ``<guidance>`` / ``<timestep_r>`` rows or the
embeddings added to ``<timestep>``'s row) under ``torch.func.jvp`` in float64, and the teacher
itself (two separate calls vs one [cond; uncond] batch; the student at init vs the teacher).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mfmegatron.parallel import parallel_context
from tests.test_hunyuan_image3_image import (
    LATENT_HW,
    PROMPTS,
    TOKENS,
    _randomise,
    _released_weights,
    _tiny_config,
    image_rope_positions_independent,
    reference_velocity,
)

STUDENT_TOKENS = {**TOKENS, "cfg": 8, "guidance": 9, "timestep_r": 20}
VARIANTS = ["tokens", "embedding"]


def _tokens(**overrides):
    from models.hunyuan_image3.sequence import ImageTokens

    return ImageTokens(**{**STUDENT_TOKENS, **overrides})


def _student_config(conditioning, **overrides):
    return _tiny_config(cfg_distilled=True, use_meanflow=True, student_conditioning=conditioning, **overrides)


def _inputs(config, seed, dtype=torch.float32, student_tokens=False, prompts=PROMPTS):
    """sequence, latents, σ, σ_r (< σ), w (different per sample)."""
    from models.hunyuan_image3.sequence import build_image_sequences

    g = torch.Generator().manual_seed(seed)
    sequence = build_image_sequences(prompts, LATENT_HW, _tokens(), student_tokens=student_tokens)
    b = len(prompts)
    latents = torch.randn(b, config.latent_channels, *LATENT_HW, generator=g, dtype=torch.float64).to(dtype)
    sigma = (0.5 + 0.5 * torch.rand(b, generator=g, dtype=torch.float64)).to(dtype)
    sigma_r = (sigma * torch.rand(b, generator=g, dtype=torch.float64)).to(dtype)
    guidance = torch.tensor([2.5, 6.0][:b], dtype=dtype)
    return sequence, latents, sigma, sigma_r, guidance


# --------------------------------------------------------------------------- sequences


def test_student_sequences_put_guidance_then_timestep_r_after_timestep_and_shift_the_image():
    from models.hunyuan_image3.sequence import build_image_sequences

    plain = build_image_sequences([[10, 11, 12], [13, 14, 15, 16, 17]], (2, 3), _tokens())
    seq = build_image_sequences([[10, 11, 12], [13, 14, 15, 16, 17]], (2, 3), _tokens(), student_tokens=True)
    assert seq.input_ids.tolist() == [
        [1, 10, 11, 12, 2, 6, 7, 5, 9, 20, 4, 4, 4, 4, 4, 4, 3, 0, 0],
        [1, 13, 14, 15, 16, 17, 2, 6, 7, 5, 9, 20, 4, 4, 4, 4, 4, 4, 3],
    ]
    assert seq.timestep_positions == [7, 9] and seq.guidance_positions == [8, 10]
    assert seq.timestep_r_positions == [9, 11] and seq.image_spans == [(10, 16), (12, 18)]
    assert seq.prompt_spans == plain.prompt_spans == [(1, 4), (1, 6)]
    assert seq.lengths == [17, 19] and plain.guidance_positions is None and plain.timestep_r_positions is None
    # The two tokens are text positions (y = x = index); the image grid is centred from its new start.
    for sample, (start, _) in enumerate(seq.image_spans):
        y, x = image_rope_positions_independent(19, start, 2, 3)
        assert torch.equal(seq.positions_y[sample], y) and torch.equal(seq.positions_x[sample], x)
    assert seq.positions_y[0, 8:10].tolist() == [8, 9] and seq.positions_x[0, 8:10].tolist() == [8, 9]
    assert seq.positions_y[0, 10:16].tolist() == [12, 12, 12, 13, 13, 13]  # 10 + (6 − 2)/2 + i
    assert seq.positions_x[0, 10:16].tolist() == [11, 12, 13, 11, 12, 13]  # 10 + (6 − 3)//2 + j
    one = seq.sample(1)
    assert one.guidance_positions == [10] and one.timestep_r_positions == [11] and one.prompt_spans == [(1, 6)]
    moved = seq.to("cpu")
    assert moved.guidance_positions == seq.guidance_positions and moved.prompt_spans == seq.prompt_spans


def test_unconditional_sequences_replace_exactly_the_prompt_tokens_with_cfg():
    from models.hunyuan_image3.sequence import build_image_sequences, cfg_batch, unconditional_sequences

    for student in (False, True):
        cond = build_image_sequences(PROMPTS, LATENT_HW, _tokens(), student_tokens=student)
        uncond = unconditional_sequences(cond, _tokens())
        assert uncond.input_ids.shape == cond.input_ids.shape
        is_prompt = torch.zeros_like(cond.input_ids, dtype=torch.bool)
        for sample, (start, end) in enumerate(cond.prompt_spans):
            is_prompt[sample, start:end] = True
        assert (uncond.input_ids[is_prompt] == 8).all() and is_prompt.sum() == sum(map(len, PROMPTS))
        assert torch.equal(uncond.input_ids[~is_prompt], cond.input_ids[~is_prompt])
        for field in ("image_spans", "timestep_positions", "lengths", "guidance_positions", "timestep_r_positions"):
            assert getattr(uncond, field) == getattr(cond, field)
        assert torch.equal(uncond.positions_y, cond.positions_y) and torch.equal(uncond.positions_x, cond.positions_x)
        both = cfg_batch(cond, uncond)
        assert torch.equal(both.input_ids, torch.cat([cond.input_ids, uncond.input_ids]))
        assert both.image_spans == cond.image_spans * 2 and both.prompt_spans == cond.prompt_spans * 2


# --------------------------------------------------------------------------- the student's JVP


@pytest.mark.parametrize("conditioning", VARIANTS)
def test_student_velocity_jvp_matches_torch_func_jvp_of_the_dense_forward(conditioning):
    """float64, tangents in the latents, σ and σ_r (w has none): ``velocity_jvp`` equals
    ``torch.func.jvp`` of the dense official-order forward with the student's rows; the student's
    embeddings are randomised (non-zero), so w and σ_r matter."""
    config = _student_config(conditioning, params_dtype=torch.float64, moe_router_dtype="fp64")
    sequence, latents, sigma, sigma_r, guidance = _inputs(config, 90, torch.float64, conditioning == "tokens")
    g = torch.Generator().manual_seed(91)
    tangents = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (latents, sigma, sigma_r)]
    from models.hunyuan_image3.parallelize import build_hunyuan_model, local_weights

    with parallel_context():
        torch.manual_seed(0)
        model = build_hunyuan_model(config)
        _randomise(model, 11, scale=0.2)
        released = _released_weights({name: t.clone() for name, t in local_weights(model)}, config)
        u, tu = model.velocity_jvp(sequence, latents, sigma, tangents[0], tangents[1], sigma_r=sigma_r,
                                   tsigma_r=tangents[2], guidance=guidance)
        plain = model.velocity(sequence, latents, sigma, sigma_r=sigma_r, guidance=guidance)
        other_w = model.velocity(sequence, latents, sigma, sigma_r=sigma_r, guidance=guidance + 1)
        _, only_r = model.velocity_jvp(sequence, latents, sigma, sigma_r=sigma_r, tsigma_r=tangents[2],
                                       guidance=guidance)
    with sdpa_kernel(SDPBackend.MATH):
        expected, expected_tangent = torch.func.jvp(
            lambda lat, sig, sig_r: reference_velocity(released, config, sequence, lat, sig, sigma_r=sig_r,
                                                       guidance=guidance),
            (latents, sigma, sigma_r), tuple(tangents),
        )
    for got, want in ((u, expected), (tu, expected_tangent)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7 * want.abs().max().item())
    torch.testing.assert_close(plain, u, rtol=0, atol=0)
    assert u.requires_grad and not tu.requires_grad and tu.grad_fn is None
    # The mechanism is engaged: w and σ_r both move the output.
    assert (other_w - u).abs().max() > 1e-3 * u.abs().max()
    assert only_r.abs().max() > 1e-3 * tu.abs().max()


@pytest.mark.parametrize("conditioning", VARIANTS)
def test_student_forward_jvp_saves_nothing_tangent_related(conditioning):
    from models.hunyuan_image3.parallelize import build_hunyuan_model
    from tests.test_hunyuan_image3_jvp import saved_for_backward

    config = _student_config(conditioning)
    sequence, latents, sigma, sigma_r, guidance = _inputs(config, 95, student_tokens=conditioning == "tokens")
    g = torch.Generator().manual_seed(96)
    tangents = [torch.randn(t.shape, generator=g) for t in (latents, sigma, sigma_r)]
    with parallel_context():
        torch.manual_seed(0)
        model = build_hunyuan_model(config)
        _randomise(model, 12, scale=0.2)
        primal_only, _ = saved_for_backward(
            lambda: model.velocity(sequence, latents, sigma, sigma_r=sigma_r, guidance=guidance))
        with_tangent, (u, tu) = saved_for_backward(
            lambda: model.velocity_jvp(sequence, latents, sigma, tangents[0], tangents[1], sigma_r=sigma_r,
                                       tsigma_r=tangents[2], guidance=guidance))
        u.sum().backward()
    assert with_tangent == primal_only and sum(primal_only.values()) > 0
    assert not tu.requires_grad
    assert model.timestep_r_emb.mlp[2].weight.grad is not None and model.guidance_emb.mlp[0].weight.grad is not None


# --------------------------------------------------------------------------- initialisation


def _teacher_and_students(seed, dtype=torch.float32, **overrides):
    """A randomised teacher and both students initialised from it (their new embedders at init)."""
    from models.hunyuan_image3.meanflow import init_student_from_teacher
    from models.hunyuan_image3.parallelize import build_hunyuan_model

    teacher = build_hunyuan_model(_tiny_config(params_dtype=dtype, **overrides))
    _randomise(teacher, seed, scale=0.2)
    students = {}
    for conditioning in VARIANTS:
        torch.manual_seed(seed)
        student = build_hunyuan_model(_student_config(conditioning, params_dtype=dtype, **overrides))
        init_student_from_teacher(student, teacher)
        for name in ("guidance_emb", "timestep_r_emb"):
            last = getattr(student, name).mlp[2]
            assert not last.weight.any() and not last.bias.any() and getattr(student, name).mlp[0].weight.any()
        students[conditioning] = student
    return teacher, students


def _tokens_distance(teacher, student, config, seed):
    sequence, latents, sigma, sigma_r, guidance = _inputs(config, seed, student_tokens=False)
    student_sequence = _inputs(config, seed, student_tokens=True)[0]
    with torch.no_grad():
        v = teacher.velocity(sequence, latents, sigma)
        u = student.velocity(student_sequence, latents, sigma, sigma_r=sigma_r, guidance=guidance)
    return ((u - v).norm() / v.norm()).item()


WIDER = dict(hidden_size=256, num_attention_heads=8, num_query_groups=2, kv_channels=32,
             moe_ffn_hidden_size=128, moe_shared_expert_intermediate_size=128, ffn_hidden_size=128)


def test_embedding_student_at_init_is_the_conditional_teacher_and_tokens_student_is_close():
    """The new embedders end in a zero linear: the "embedding" student equals the teacher bit for
    bit (float32) for any w and σ_r; the "tokens" student differs only by the two extra (zero-row)
    tokens' attention: its relative distance is measured on the tiny and a wider tiny model."""
    distances = {}
    with parallel_context():
        torch.manual_seed(0)
        teacher, students = _teacher_and_students(13)
        config = _tiny_config()
        sequence, latents, sigma, sigma_r, guidance = _inputs(config, 97)
        with torch.no_grad():
            v = teacher.velocity(sequence, latents, sigma)
            for w, r in ((guidance, sigma_r), (torch.tensor([1.0, 9.0]), torch.zeros(2)), (guidance * 3, sigma)):
                u = students["embedding"].velocity(sequence, latents, sigma, sigma_r=r, guidance=w)
                assert torch.equal(u, v)
        distances["tiny"] = _tokens_distance(teacher, students["tokens"], config, 97)
        torch.manual_seed(0)
        teacher, students = _teacher_and_students(14, **WIDER)
        distances["wider"] = _tokens_distance(teacher, students["tokens"], _tiny_config(**WIDER), 98)
        # float64: the "embedding" student's difference is exactly 0.
        torch.manual_seed(0)
        teacher, students = _teacher_and_students(15, dtype=torch.float64, moe_router_dtype="fp64")
        sequence, latents, sigma, sigma_r, guidance = _inputs(config, 99, torch.float64)
        with torch.no_grad():
            difference = (students["embedding"].velocity(sequence, latents, sigma, sigma_r=sigma_r, guidance=guidance)
                          - teacher.velocity(sequence, latents, sigma)).abs().max()
    assert difference == 0
    print(f"tokens student at init, relative distance to the teacher: {distances}")
    for name, distance in distances.items():
        assert 1e-5 < distance < 0.2, f"{name}: {distance}"


def test_init_student_from_teacher_refuses_a_mismatched_teacher():
    from models.hunyuan_image3.meanflow import init_student_from_teacher
    from models.hunyuan_image3.parallelize import build_hunyuan_model

    with parallel_context():
        student = build_hunyuan_model(_student_config("tokens"))
        wider = build_hunyuan_model(_tiny_config(patch_embed_hidden_dim=64))
        with pytest.raises(ValueError, match="does not match the teacher"):
            init_student_from_teacher(student, wider)
        text_only = build_hunyuan_model(_tiny_config(image_path=False, cfg_distilled=True))
        with pytest.raises(ValueError, match="lacks teacher parameters"):
            init_student_from_teacher(text_only, build_hunyuan_model(_tiny_config()))


# --------------------------------------------------------------------------- classifier-free guidance


def test_combine_guidance_of_one_cfg_batch_equals_two_separate_calls():
    """float64 teacher: one [cond; uncond] call then ``combine_guidance`` with per-sample w equals
    ``uncond + w·(cond − uncond)`` from two separate calls."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model
    from mfmegatron.training.guidance import combine_guidance
    from models.hunyuan_image3.sequence import cfg_batch, unconditional_sequences

    config = _tiny_config(params_dtype=torch.float64, moe_router_dtype="fp64")
    cond, latents, sigma, _, _ = _inputs(config, 100, torch.float64)
    uncond = unconditional_sequences(cond, _tokens())
    w = torch.tensor([1.5, 7.0], dtype=torch.float64)
    with parallel_context():
        torch.manual_seed(0)
        model = build_hunyuan_model(config)
        _randomise(model, 16, scale=0.2)
        with torch.no_grad():
            v_cond = model.velocity(cond, latents, sigma)
            v_uncond = model.velocity(uncond, latents, sigma)
            both = model.velocity(cfg_batch(cond, uncond), torch.cat([latents, latents]), torch.cat([sigma, sigma]))
    expected = v_uncond + w[:, None, None, None] * (v_cond - v_uncond)
    guided = combine_guidance(both, w)
    assert guided.dtype == torch.float64 and guided.shape == latents.shape
    torch.testing.assert_close(guided, expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item())
    assert (v_cond - v_uncond).abs().max() > 1e-2 * v_cond.abs().max()  # the prompt matters
    low = combine_guidance(both.to(torch.bfloat16), 2.0)
    assert low.dtype == torch.float32


# --------------------------------------------------------------------------- bad inputs


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text and text
    return text


def test_bad_inputs_raise_one_clear_line():
    from models.hunyuan_image3.parallelize import build_hunyuan_model
    from models.hunyuan_image3.sequence import build_image_sequences, unconditional_sequences

    with pytest.raises(ValueError) as error:
        _tiny_config(student_conditioning="adaln")
    assert "student_conditioning must be one of 'tokens', 'embedding'" in _one_line(error)
    with pytest.raises(ValueError) as error:
        unconditional_sequences(build_image_sequences(PROMPTS, LATENT_HW, _tokens()), _tokens(cfg=None))
    assert "<cfg>" in _one_line(error)
    with pytest.raises(ValueError) as error:
        build_image_sequences(PROMPTS, LATENT_HW, _tokens(timestep_r=None), student_tokens=True)
    assert "<timestep_r>" in _one_line(error)
    with parallel_context():
        torch.manual_seed(0)
        teacher = build_hunyuan_model(_tiny_config())
        tokens_student = build_hunyuan_model(_student_config("tokens"))
        embedding_student = build_hunyuan_model(_student_config("embedding"))
        sequence, latents, sigma, sigma_r, guidance = _inputs(_tiny_config(), 101)
        student_sequence = _inputs(_tiny_config(), 101, student_tokens=True)[0]
        cases = [
            (lambda: tokens_student.velocity(student_sequence, latents, sigma, guidance=guidance), "needs sigma_r"),
            (lambda: tokens_student.velocity(student_sequence, latents, sigma, sigma_r=sigma_r), "needs guidance"),
            (lambda: teacher.velocity(sequence, latents, sigma, sigma_r=sigma_r), "built without use_meanflow"),
            (lambda: teacher.velocity(sequence, latents, sigma, guidance=guidance), "built without cfg_distilled"),
            (lambda: tokens_student.velocity(sequence, latents, sigma, sigma_r=sigma_r, guidance=guidance),
             "student_tokens=True"),
            (lambda: embedding_student.velocity(student_sequence, latents, sigma, sigma_r=sigma_r, guidance=guidance),
             "has no <guidance> token embedding"),
            (lambda: teacher.velocity(student_sequence, latents, sigma), "has no <guidance> token embedding"),
        ]
        for call, expected in cases:
            with pytest.raises(ValueError) as error:
                call()
            assert expected in _one_line(error), (expected, str(error.value))


@pytest.mark.parametrize("conditioning", VARIANTS)
def test_meanflow_only_and_cfg_only_students_build_and_run(conditioning):
    """Each flag alone: the model has just its embedder and needs just its input; a "tokens"
    student's sequence has just its token (right before the image)."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model
    from models.hunyuan_image3.sequence import build_image_sequences

    tokens = conditioning == "tokens"
    with parallel_context():
        torch.manual_seed(0)
        meanflow = build_hunyuan_model(_tiny_config(use_meanflow=True, student_conditioning=conditioning))
        guided = build_hunyuan_model(_tiny_config(cfg_distilled=True, student_conditioning=conditioning))
        assert hasattr(meanflow, "timestep_r_emb") and not hasattr(meanflow, "guidance_emb")
        assert hasattr(guided, "guidance_emb") and not hasattr(guided, "timestep_r_emb")
        _, latents, sigma, sigma_r, guidance = _inputs(_tiny_config(), 102)
        r_only = build_image_sequences(PROMPTS, LATENT_HW, _tokens(), student_tokens=("timestep_r",) if tokens else False)
        g_only = build_image_sequences(PROMPTS, LATENT_HW, _tokens(guidance=None if not tokens else 9),
                                       student_tokens="guidance" if tokens else False)
        if tokens:
            assert r_only.timestep_r_positions == [8, 10] and r_only.guidance_positions is None
            assert r_only.image_spans == [(9, 15), (11, 17)] and r_only.input_ids[0, 7:10].tolist() == [5, 20, 4]
            assert g_only.guidance_positions == [8, 10] and g_only.timestep_r_positions is None
        assert meanflow.velocity(r_only, latents, sigma, sigma_r=sigma_r).shape == latents.shape
        assert guided.velocity(g_only, latents, sigma, guidance=guidance).shape == latents.shape
        assert dataclasses.replace(meanflow.config).use_meanflow
        with pytest.raises(ValueError) as error:
            build_image_sequences(PROMPTS, LATENT_HW, _tokens(), student_tokens=("cfg",))
        assert "student_tokens must be True, False or names" in _one_line(error)


# --------------------------------------------------------------------------- two ranks

TP_LENGTH = 20  # the longest student sample (19) padded to a multiple of TP


def _student_batch(config, seed, length=None):
    from models.hunyuan_image3.sequence import build_image_sequences

    sequence, latents, sigma, sigma_r, guidance = _inputs(config, seed, student_tokens=True)
    if length is not None:
        sequence = build_image_sequences(PROMPTS, LATENT_HW, _tokens(), length=length, student_tokens=True)
    g = torch.Generator().manual_seed(seed + 1)
    tangents = [torch.randn(t.shape, generator=g) for t in (latents, sigma, sigma_r)]
    return sequence, latents, sigma, sigma_r, guidance, tangents


def _student_jvp(model, batch):
    sequence, latents, sigma, sigma_r, guidance, (tl, ts, tr) = batch
    return model.velocity_jvp(sequence, latents, sigma, tl, ts, sigma_r=sigma_r, tsigma_r=tr, guidance=guidance)


def _two_rank_student_checks(full: dict) -> dict:
    """PP=2 (a JVP step through megatron's schedule: the last stage gets σ_r and w but only the
    activation from the first) and TP=2 + SP, the "tokens" student."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mfmegatron.parallel import initialize_parallel
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights, local_weights

    result = {}
    initialize_parallel(pipeline_parallel_size=2)
    model = build_hunyuan_model(_student_config("tokens", pipeline_model_parallel_size=2, pipeline_dtype=torch.float32))
    load_full_weights(model, full)
    batch = _student_batch(model.config, 110)
    tangents = []

    def jvp_step(data_iterator, model):
        velocity, tangent = _student_jvp(model, batch)

        def loss(output):
            tangents.append(tangent)
            return (output * torch.linspace(-1, 1, output.numel()).view(output.shape)).sum(), {}

        return velocity, loss

    get_forward_backward_func()(
        forward_step_func=jvp_step, data_iterator=None, model=[model], num_microbatches=1,
        seq_length=2 * batch[0].input_ids.shape[1], micro_batch_size=len(PROMPTS), forward_only=False,
    )
    result["pp_tangent"] = tangents[0] if tangents else None
    result["pp_grads"] = {n: p.grad.clone() for (n, _), p in zip(local_weights(model), model.parameters())
                          if p.grad is not None}
    result["pp_modules"] = {name for name, _ in model.named_children()}
    initialize_parallel(tensor_parallel_size=2)
    model = build_hunyuan_model(_student_config("tokens", tensor_model_parallel_size=2, sequence_parallel=True))
    load_full_weights(model, full)
    velocity, tangent = _student_jvp(model, _student_batch(model.config, 120, length=TP_LENGTH))
    result["tp_velocity"], result["tp_tangent"] = velocity.detach(), tangent
    return result


def student_weights() -> dict:
    """A randomised "tokens" student's full weights (for the two-rank checks, which share the
    image-path tests' spawn: ``tests/test_hunyuan_image3_image.py``)."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model, local_weights

    with parallel_context():
        torch.manual_seed(0)
        model = build_hunyuan_model(_student_config("tokens"))
        _randomise(model, 17, scale=0.2)
        return {name: t.clone() for name, t in local_weights(model)}


def check_two_rank_student(full: dict, ranks: list[dict]) -> None:
    """The ranks' ``_two_rank_student_checks`` results against the one-rank student."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights

    config = _student_config("tokens")
    with parallel_context():
        model = build_hunyuan_model(config)
        load_full_weights(model, full)
        u, pp_tangent = _student_jvp(model, _student_batch(config, 110))
        (u * torch.linspace(-1, 1, u.numel()).view(u.shape)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        tp_velocity, tp_tangent = _student_jvp(model, _student_batch(config, 120, length=TP_LENGTH))
    first, last = ranks[0], ranks[1]
    assert {"guidance_emb", "timestep_r_emb", "timestep_emb"} <= first["pp_modules"]
    assert not {"guidance_emb", "timestep_r_emb"} & last["pp_modules"] and first["pp_tangent"] is None
    torch.testing.assert_close(last["pp_tangent"], pp_tangent, rtol=1e-5, atol=1e-5)
    pp_grads = {**first["pp_grads"], **last["pp_grads"]}
    assert set(pp_grads) == set(grads) and any(n.startswith("timestep_r_emb.") for n in pp_grads)
    for name, grad in pp_grads.items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-4, atol=1e-5 * max(1.0, grads[name].abs().max().item()),
                                   msg=lambda m, name=name: f"{name}: {m}")
    for rank in ranks:
        torch.testing.assert_close(rank["tp_velocity"], tp_velocity.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rank["tp_tangent"], tp_tangent, rtol=1e-5, atol=1e-5)
