"""HunyuanImage 3.0's cost model (``models/hunyuan_image3/cost.py``) against measurements.

- FLOPs: ``network_flops`` against ``torch.utils.flop_counter.FlopCounterMode`` (told the CPU
  fused attention's FLOPs, as ``tests/test_planner.py``) on the tiny image model and a wider one:
  teacher forward, CFG teacher forward, student forward, with its tangent, forward + backward,
  and the LoRA fake network's forward + backward.
- Communication: one two-rank gloo spawn runs the student's forward with tangent and backward,
  megatron's gradient reduction and optimizer step at EP=2 with DP=2 (with and without the
  distributed optimizer), TP=2 with and without SP with EP=2, TP=2 without SP with EP=2 and
  activation recompute (backward repeats the layers' forward collectives), TP=2 without SP nor EP,
  DP=2 without EP, TP=2 with and without SP at expert TP=2 (the experts' weights split: tokens
  all-gathered and outputs reduce-scattered over the expert-TP ranks; gloo, lacking an uneven
  reduce-scatter, all-reduces the same payload), and PP=2 (the student's pass through megatron's
  schedule as the trainer's ``NetworkRunner`` runs it: each stage's send and receive of the
  activation with its tangent, against ``pass_traffic(..., stage)``), and at the TP=2 layouts the
  LoRA fake network's forward and backward, with torch.distributed's collectives wrapped to count
  each call's payload. The deterministic collectives must equal ``pass_traffic`` +
  ``gradient_traffic`` exactly; the MoE all-to-all's per-rank volume depends on routing: its sum
  over the ranks must equal the plan's, and each rank's ratio to the balanced-routing expectation is
  printed.
"""

from __future__ import annotations

import pytest
import torch

from mfmegatron.config import load_config
from mfmegatron.parallel import initialize_parallel, run_on_ranks
from mfmegatron.parallel.collective_counter import CollectiveCounter
from mfmegatron.training.config import TrainConfig
from tests.test_planner import _counted

SEQUENCE_TOKENS = dict(bos=1, pad=0, boi=2, eoi=3, img=4, timestep=5, size=6, ratio=7, cfg=8, guidance=9,
                       timestep_r=20)
SIZES = {
    "tiny": dict(overrides={}, image_size=48, text_tokens=3),  # 3x3 latent grid
    "wide": dict(overrides=dict(hidden_size=128, num_attention_heads=8, num_query_groups=4, kv_channels=16,
                                num_moe_experts=16, moe_router_topk=4, moe_ffn_hidden_size=48,
                                moe_shared_expert_intermediate_size=64, patch_embed_hidden_dim=64,
                                latent_channels=8), image_size=64, text_tokens=10),
}
LORA_RANK = 4


def _architecture(size, **layout):
    from models.hunyuan_image3.config import tiny_hunyuan_image3_config

    return tiny_hunyuan_image3_config(image_path=True, **SIZES[size]["overrides"], **layout)


def _train_config(size, *extra):
    return load_config(TrainConfig, None, [
        f"model.image_size={SIZES[size]['image_size']}", f"model.text_tokens={SIZES[size]['text_tokens']}",
        "model.dtype=fp32", "alignment.enabled=true", "alignment.fake_network=lora",
        f"alignment.lora_rank={LORA_RANK}", "optim.grad_reduce_in_fp32=true", *extra])


def _inputs(architecture, config, batch, student, seed=0, length=None):
    """sequence, latents, σ, σ_r, w, tangents of latents, σ, σ_r for ``batch`` prompts."""
    from models.hunyuan_image3.sequence import ImageTokens, build_image_sequences

    generator = torch.Generator().manual_seed(seed)
    side = config.model.image_size // 16
    prompts = [[10 + (i + j) % 50 for j in range(config.model.text_tokens)] for i in range(batch)]
    sequence = build_image_sequences(prompts, (side, side), ImageTokens(**SEQUENCE_TOKENS),
                                     length=length, student_tokens=student)
    latents = torch.randn(batch, architecture.latent_channels, side, side, generator=generator)
    sigma = 0.2 + 0.8 * torch.rand(batch, generator=generator)
    return dict(sequence=sequence, latents=latents, sigma=sigma, sigma_r=sigma * 0.5,
                guidance=torch.full((batch,), 4.0), tlatents=torch.randn(latents.shape, generator=generator),
                tsigma=torch.ones(batch), tsigma_r=torch.zeros(batch))


def _velocity(model, inputs, student, with_tangent):
    extra = dict(sigma_r=inputs["sigma_r"], guidance=inputs["guidance"]) if student else {}
    if with_tangent:
        extra.update(tlatents=inputs["tlatents"], tsigma=inputs["tsigma"])
        if student:
            extra["tsigma_r"] = inputs["tsigma_r"]
    return model.velocity_jvp(inputs["sequence"], inputs["latents"], inputs["sigma"], **extra)


# --------------------------------------------------------------------------- FLOPs


def _flops_checks(size) -> list[tuple[str, float, float]]:
    """(what, counted, planned) for a batch of 2."""
    from mfmegatron.jvp.lora import add_lora
    from models.hunyuan_image3.meanflow import lora_covers
    from models.hunyuan_image3 import cost
    from models.hunyuan_image3.parallelize import build_hunyuan_model
    from models.hunyuan_image3.sequence import cfg_batch, unconditional_sequences, ImageTokens

    from models.hunyuan_image3.memory import sequence_length

    initialize_parallel()
    batch = 2
    config = _train_config(size)
    architecture = _architecture(size)
    torch.manual_seed(0)
    teacher = build_hunyuan_model(architecture)
    student = build_hunyuan_model(cost.network_architecture(architecture, "student"))
    fake = build_hunyuan_model(architecture)
    fake.requires_grad_(False)  # the teacher's frozen weights (the trainer shares them)
    add_lora(fake, LORA_RANK, alpha=1.0, include=lora_covers)
    # Every network's sequences at the trainer's one length (HunyuanImage3Family.sequence_length:
    # the student's token slots are padding in the teacher's and the fake network's).
    length = sequence_length(config, (config.model.image_size // 16) ** 2)
    teacher_inputs = _inputs(architecture, config, batch, student=False, length=length)
    guided = dict(teacher_inputs)
    guided["sequence"] = cfg_batch(teacher_inputs["sequence"],
                                   unconditional_sequences(teacher_inputs["sequence"], ImageTokens(**SEQUENCE_TOKENS)))
    for key in ("latents", "sigma"):
        guided[key] = torch.cat([teacher_inputs[key]] * 2)
    student_inputs = _inputs(architecture, config, batch, student=True, length=length)

    def run(model, inputs, is_student, with_tangent, backward):
        def step():
            velocity, _ = _velocity(model, inputs, is_student, with_tangent)
            if backward:
                velocity.square().mean().backward()
        if backward:
            step()
        else:
            with torch.no_grad():
                step()

    planned = {name: cost.network_flops(architecture, config, name) for name in ("teacher", "student", "fake")}
    single = cost.network_flops(architecture, config, "teacher", cfg=False)
    s = planned["student"]
    checks = [
        ("teacher forward", _counted(lambda: run(teacher, teacher_inputs, False, False, False)), single.forward),
        ("CFG teacher forward", _counted(lambda: run(teacher, guided, False, False, False)), planned["teacher"].forward),
        ("student forward", _counted(lambda: run(student, student_inputs, True, False, False)), s.forward),
        ("student forward with tangent", _counted(lambda: run(student, student_inputs, True, True, False)),
         s.forward + s.tangent),
        ("student forward + backward", _counted(lambda: run(student, student_inputs, True, False, True)),
         s.forward + s.backward),
        ("student forward with tangent + backward", _counted(lambda: run(student, student_inputs, True, True, True)),
         s.forward + s.tangent + s.backward),
        ("LoRA fake forward + backward", _counted(lambda: run(fake, teacher_inputs, False, False, True)),
         planned["fake"].forward + planned["fake"].backward),
    ]
    return [(what, counted, batch * per_sample) for what, counted, per_sample in checks]


@pytest.mark.parametrize("size", list(SIZES))
def test_flops_match_torch_flop_counter(size):
    for what, counted, planned in _flops_checks(size):
        print(f"{size} {what}: counted {counted:.6g}, planned {planned:.6g}")
        assert planned == counted, f"{size} {what}: counted {counted}, planned {planned}"


# --------------------------------------------------------------------------- communication

# name -> TrainConfig overrides; expert TP 1 unless the layout says otherwise.
LAYOUTS = {
    "EP=2, DP=2": ["parallel.expert_parallel_size=2"],
    "TP=2 + SP, EP=2": ["parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true",
                        "parallel.expert_parallel_size=2"],
    "TP=2, EP=2": ["parallel.tensor_parallel_size=2", "parallel.expert_parallel_size=2"],
    "TP=2": ["parallel.tensor_parallel_size=2"],
    "TP=2, EP=2, recompute": ["parallel.tensor_parallel_size=2", "parallel.expert_parallel_size=2",
                              "model.recompute=true"],
    "DP=2": [],
    "EP=2, DP=2, distributed optimizer": ["parallel.expert_parallel_size=2", "parallel.use_distributed_optimizer=true"],
    # The experts' weights split over the TP ranks: tokens all-gathered and outputs
    # reduce-scattered over the expert-TP group, no all-to-all.
    "TP=2 + SP, expert TP=2": ["parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true",
                               "parallel.expert_tensor_parallel_size=2"],
    "TP=2, expert TP=2": ["parallel.tensor_parallel_size=2", "parallel.expert_tensor_parallel_size=2"],
    # Two stages: the student's pass through megatron's schedule (the trainer's NetworkRunner).
    "PP=2": ["parallel.pipeline_parallel_size=2"],
}
# Four ranks: expert TP and EP together (the dispatcher's group is expert-TP x EP, tokens
# all-to-all over EP and gathered over expert TP), and two pipeline stages with EP, TP or DP.
LAYOUTS_ON_FOUR_RANKS = {
    "TP=2, EP=2, expert TP=2": ["parallel.tensor_parallel_size=2", "parallel.expert_parallel_size=2",
                                "parallel.expert_tensor_parallel_size=2"],
    "TP=2 + SP, EP=2, expert TP=2": ["parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true",
                                     "parallel.expert_parallel_size=2", "parallel.expert_tensor_parallel_size=2"],
    "PP=2, EP=2": ["parallel.pipeline_parallel_size=2", "parallel.expert_parallel_size=2"],
    "PP=2, TP=2": ["parallel.pipeline_parallel_size=2", "parallel.tensor_parallel_size=2"],
    "PP=2, DP=2": ["parallel.pipeline_parallel_size=2"],
}
MICRO_BATCH = 2
EXPERT_TP_KEYS = {"etp all_gather", "etp all_reduce", "etp reduce_scatter"}


def _pipelined_pass(ddp, inputs) -> None:
    """The student's forward with tangent and backward of one micro-batch through this rank's
    pipeline stage, as the trainer runs it (``NetworkRunner.run_pass``, megatron's schedule)."""
    from mfmegatron.meanflow.passes import TrainingPass
    from mfmegatron.training.runner import NetworkRunner
    from models.hunyuan_image3.training import HunyuanCondition, HunyuanImage3Family

    # The student's sequence stands for the teacher's too: the schedule sizes the stage exchange by it.
    sequence = inputs["sequence"]
    cond = HunyuanCondition(sequence=sequence, unconditional=sequence, student_sequence=sequence,
                            guidance=inputs["guidance"])
    tangents = (inputs["tlatents"], inputs["tsigma_r"], inputs["tsigma"])  # (z, r, t), as the runner's

    def loss(u, du, rows):
        return u.square().mean(), {}

    NetworkRunner(HunyuanImage3Family(), ddp, 1).run_pass(
        TrainingPass("meanflow", "student", inputs["latents"], inputs["sigma_r"], inputs["sigma"], loss, tangents),
        cond)


def _pass_on_ranks(layouts: dict[str, list[str]]) -> dict:
    """For each layout, the student's forward with tangent and backward of one micro-batch, then
    megatron's gradient reduction and optimizer step, its collectives counted; at TP > 1 also the
    LoRA fake network's forward and backward (its TP reductions differ with and without SP)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mfmegatron.jvp.lora import add_lora
    from models.hunyuan_image3 import cost
    from models.hunyuan_image3.meanflow import lora_covers
    from models.hunyuan_image3.parallelize import build_hunyuan_model, mark_routed_experts

    results = {}
    for layout, extra in layouts.items():
        config = _train_config("tiny", "parallel.expert_tensor_parallel_size=1", *extra)
        parallel = config.parallel
        tp, ep, sp = parallel.tensor_parallel_size, parallel.expert_parallel_size, parallel.sequence_parallel
        etp, pp = parallel.expert_tensor_parallel_size, parallel.pipeline_parallel_size
        initialize_parallel(tensor_parallel_size=tp, expert_parallel_size=ep, expert_tensor_parallel_size=etp,
                            pipeline_parallel_size=pp, seed=3)
        # As the family builds it (models/hunyuan_image3/training.py).
        recompute = (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
                     if config.model.recompute else {})
        architecture = _architecture("tiny", tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                     expert_tensor_parallel_size=etp, sequence_parallel=sp,
                                     pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32, **recompute)
        model = mark_routed_experts(build_hunyuan_model(cost.network_architecture(architecture, "student")))
        distributed = parallel.use_distributed_optimizer
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed), model)
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-4, bf16=False, params_dtype=torch.float32, clip_grad=1.0,
            use_distributed_optimizer=distributed), [ddp])
        length = cost.sequence_layout(architecture, config, "student").tokens
        inputs = _inputs(architecture, config, MICRO_BATCH, student=True, length=length,
                         seed=parallel_state.get_data_parallel_rank())
        groups = [(parallel_state.get_tensor_model_parallel_group(), "tp"),
                  (parallel_state.get_expert_model_parallel_group(), "ep"),
                  (parallel_state.get_expert_tensor_and_model_parallel_group(), "ep"),
                  (parallel_state.get_expert_tensor_parallel_group(), "etp"),
                  (parallel_state.get_pipeline_model_parallel_group(), "pp"),
                  (parallel_state.get_data_parallel_group(), "dp"),
                  (parallel_state.get_data_parallel_group(with_context_parallel=True), "dp"),  # DDP's
                  (parallel_state.get_expert_data_parallel_group(), "edp")]
        # By the group object: at two ranks the TP, EP and DP groups hold the same ranks.
        names = {}
        for group, name in groups:
            names.setdefault(group, name)
        with CollectiveCounter(names) as counter:
            counter.phase = "pass"
            if pp == 1:
                velocity, _ = _velocity(ddp.module, inputs, student=True, with_tangent=True)
                velocity.square().mean().backward()
            else:
                _pipelined_pass(ddp, inputs)
            counter.phase = "update"
            finalize_model_grads([ddp])
            optimizer.step()
        results[layout] = {"bytes": counter.bytes, "calls": counter.calls,
                           "data_parallel_size": parallel_state.get_data_parallel_world_size(),
                           "stage": parallel_state.get_pipeline_model_parallel_rank()}
        if tp > 1 and pp == 1:  # the LoRA fake network, whole (its TP reductions)
            fake = build_hunyuan_model(architecture)
            fake.requires_grad_(False)  # the teacher's frozen weights (the trainer shares them)
            add_lora(fake, LORA_RANK, alpha=1.0, include=lora_covers)
            fake_inputs = _inputs(architecture, config, MICRO_BATCH, student=False,
                                  length=cost.sequence_layout(architecture, config, "fake").tokens,
                                  seed=parallel_state.get_data_parallel_rank())
            with CollectiveCounter(names) as counter:
                velocity, _ = _velocity(fake, fake_inputs, student=False, with_tangent=False)
                velocity.square().mean().backward()
            results[layout]["fake"] = {"bytes": counter.bytes, "calls": counter.calls}
    return results


def test_communication_bytes_equal_the_collectives_sent():
    _check_against_the_plan(run_on_ranks(_pass_on_ranks, 2, LAYOUTS, timeout=600), LAYOUTS)


def test_communication_bytes_equal_the_collectives_sent_on_four_ranks():
    _check_against_the_plan(run_on_ranks(_pass_on_ranks, 4, LAYOUTS_ON_FOUR_RANKS, timeout=900),
                            LAYOUTS_ON_FOUR_RANKS)


def _check_against_the_plan(ranks: list[dict], layouts: dict[str, list[str]]) -> None:
    """Each rank's counted bytes and calls equal the cost model's for its stage, but the
    routing-dependent bytes (the all-to-all; with EP, the expert-TP collectives too), which are
    compared summed over the ranks (``_check_routed_sum``)."""
    from mfmegatron.parallel.collective_counter import routing_dependent
    from models.hunyuan_image3 import cost

    initialize_parallel()
    architecture = _architecture("tiny")
    for layout, extra in layouts.items():
        config = _train_config("tiny", "parallel.expert_tensor_parallel_size=1", *extra)
        counted = [rank[layout] for rank in ranks]
        # Routing-dependent per rank: the tokens a rank sends, and with EP the tokens it
        # received, which expert TP gathers and combines.
        routed = {key for key in {"ep all_to_all", *EXPERT_TP_KEYS}
                  if routing_dependent(key, config.parallel.expert_parallel_size)}
        planned_routed = []
        for rank, result in enumerate(counted):
            stage = result["stage"]
            planned = (
                cost.pass_traffic(architecture, config, "student", "forward_jvp", MICRO_BATCH, stage,
                                  with_backward=True)
                + cost.gradient_traffic(architecture, config, "student", stage, result["data_parallel_size"])
            ).as_sent_on("gloo")
            planned_bytes = {key: value for key, value in planned.bytes.items() if value}
            print(f"{layout} rank {rank} (stage {stage}): counted {result['bytes']} calls {result['calls']}")
            print(f"{layout} rank {rank} (stage {stage}): planned {planned_bytes} calls {planned.calls}")
            exact = {key: value for key, value in result["bytes"].items() if key not in routed}
            assert exact == {key: value for key, value in planned_bytes.items() if key not in routed}, (layout, rank)
            assert result["calls"] == {key: calls for key, calls in planned.calls.items() if planned.bytes[key]}
            planned_routed.append(planned_bytes)
        for key in routed & set(planned_bytes):
            ratios = [result["bytes"][key] / plan[key] for result, plan in zip(counted, planned_routed)]
            print(f"{layout} {key} bytes / balanced-routing expectation per rank: {ratios}")
            _check_routed_sum(layout, key, sum(result["bytes"][key] for result in counted),
                              sum(plan[key] for plan in planned_routed))
        if "fake" in counted[0]:
            planned = cost.pass_traffic(architecture, config, "fake", "forward", MICRO_BATCH, 0,
                                        with_backward=True).as_sent_on("gloo")
            planned_bytes = {key: value for key, value in planned.bytes.items() if value}
            print(f"{layout} LoRA fake planned {planned_bytes} calls {planned.calls}")
            for rank, result in enumerate(counted):
                fake = result["fake"]
                print(f"{layout} LoRA fake rank {rank}: counted {fake['bytes']} calls {fake['calls']}")
                exact = {key: value for key, value in fake["bytes"].items() if key not in routed}
                assert exact == {key: value for key, value in planned_bytes.items() if key not in routed}, (layout, rank)
                assert fake["calls"] == {key: calls for key, calls in planned.calls.items() if planned.bytes[key]}
            for key in routed & set(planned_bytes):
                _check_routed_sum(layout, key, sum(result["fake"]["bytes"][key] for result in counted),
                                  len(counted) * planned_bytes[key])


def _check_routed_sum(layout: str, key: str, sent: float, planned: float) -> None:
    from mfmegatron.parallel.collective_counter import routed_sum_matches

    assert routed_sum_matches(key, sent, planned, backend="gloo"), (layout, key, sent, planned)


def test_layout_problem_is_one_line_or_none():
    from models.hunyuan_image3 import cost

    architecture = _architecture("tiny")
    assert cost.layout_problem(architecture, _train_config("tiny", "parallel.expert_parallel_size=2")) is None
    problem = cost.layout_problem(architecture, _train_config("tiny", "parallel.expert_parallel_size=3"))
    assert "does not divide the 8 experts" in problem and "\n" not in problem
    assert cost.layout_problem(architecture, _train_config("tiny", "parallel.tensor_parallel_size=2")) is None
