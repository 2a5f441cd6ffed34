"""The planner (``mfmegatron/planner.py``) against measurements.

- FLOPs: the family's ``network_flops`` against ``torch.utils.flop_counter.FlopCounterMode`` on
  real FLUX models built by ``models/flux`` (a tiny and a medium width), for the forward, the
  forward with its tangent and both with backward, and the LoRA fake network's training pass.
- Communication: one two-rank gloo spawn runs a training-like step (teacher evaluation, student
  JVP evaluation, student training pass with tangent, LoRA fake training pass, megatron's
  ``finalize_model_grads`` and optimizer steps, all through the trainer's ``NetworkRunner`` and
  ``FluxFamily.build_networks``) at TP=2 with and without SP, TP=2 with SP and activation
  recompute, PP=2 and DP=2 (with and without the distributed optimizer), with torch.distributed's
  collectives counted by ``mfmegatron.parallel.collective_counter``; the planner's
  ``step_traffic`` for the same forwards must equal the count exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mfmegatron.config import load_config
from mfmegatron.parallel import initialize_parallel, run_on_ranks
from mfmegatron.parallel.collective_counter import CollectiveCounter
from mfmegatron.planner import (
    CLUSTERS,
    STEP_KINDS,
    NetworkCalls,
    forward_counts,
    plan,
    search_layouts,
    step_cost,
    step_traffic,
)
from mfmegatron.training.config import TrainConfig

TINY = ["model.preset=tiny", "model.dtype=fp32", "model.image_size=64", "model.text_tokens=8",
        "alignment.enabled=true", "alignment.fake_network=lora", "alignment.lora_rank=4",
        "optim.grad_reduce_in_fp32=true"]
# A medium width: 256 wide, 4 heads of 64, 64 image + 16 text tokens.
MEDIUM = ["model.preset=tiny", "model.dtype=fp32", "model.image_size=128", "model.text_tokens=16",
          "alignment.enabled=true", "alignment.fake_network=lora", "alignment.lora_rank=8",
          "model.overrides={hidden_size: 256, num_attention_heads: 4, kv_channels: 64, "
          "ffn_hidden_size: 1024, axes_dims_rope: [16, 24, 24]}"]


def _config(settings, *extra):
    return load_config(TrainConfig, None, [*settings, *extra])


# --------------------------------------------------------------------------- FLOPs


def _flop_counter():
    """torch's counter, told the FLOPs of three ops it has no formula for: the CPU fused attention
    (forward and backward; torch's own formulas for the CUDA kernels) and the in-place
    ``baddbmm_`` the attention tangent accumulates with."""
    from torch.utils.flop_counter import FlopCounterMode, bmm_flop, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def attention(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def attention_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, q, k, v)

    def accumulate(acc, a, b, *args, out_shape=None, **kwargs):
        return bmm_flop(a, b)

    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: attention,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward,
        aten.baddbmm_: accumulate,
    })


def _counted(run) -> int:
    counter = _flop_counter()
    with counter:
        run()
    return counter.get_total_flops()


def _flux_inputs(family, config, rows: int, generator):
    """Random text embeddings (as precomputed ones), latents, t and r = t / 2 (every row r < t)."""
    image, channels = family.latent_shape(config)
    text_dim, pooled_dim = family.text_encoder_dims(config)
    prompts = SimpleNamespace(t5=torch.randn(rows, config.model.text_tokens, text_dim, generator=generator),
                              pooled=torch.randn(rows, pooled_dim, generator=generator))
    text = family.text_conditioning(config, torch.device("cpu"), torch.float32)  # the empty prompt, for CFG
    cond = family.condition(prompts, config, torch.device("cpu"), torch.float32, text=text)
    z = torch.randn(rows, image, channels, generator=generator)
    t = torch.rand(rows, generator=generator)
    return cond, z, t, t * 0.5


def _flops_checks(settings) -> list[tuple[str, float, float]]:
    """(what, counted, planned) for one model size, FLOPs of a batch of 2."""
    from models.flux.model import FluxTangents
    from models.flux.training import FluxFamily

    initialize_parallel()
    config = _config(settings)
    family = FluxFamily()
    networks = family.build_networks(config, torch.device("cpu"), with_fake=True)
    batch = 2
    generator = torch.Generator().manual_seed(0)
    cond, z, t, r = _flux_inputs(family, config, batch, generator)
    image, channels = family.latent_shape(config)
    tangents = FluxTangents(latents=torch.randn(batch, image, channels, generator=generator),
                            timestep=torch.ones(batch), timestep_r=torch.zeros(batch))

    def run(network, r_in, with_tangent, backward):
        def step():
            out, _ = network.forward_jvp(cond.inputs(z, t, r_in), tangents if with_tangent else None)
            if backward:
                out.square().mean().backward()
        if backward:
            step()
        else:
            with torch.no_grad():
                step()

    student, teacher, fake = networks.student, networks.teacher, networks.fake
    planned = {name: family.network_flops(config, name) for name in ("teacher", "student", "fake")}
    checks = [
        ("teacher forward", _counted(lambda: run(teacher, None, False, False)), planned["teacher"].forward),
        ("student forward", _counted(lambda: run(student, r, False, False)), planned["student"].forward),
        ("student forward with tangent", _counted(lambda: run(student, r, True, False)),
         planned["student"].forward + planned["student"].tangent),
        ("student forward + backward", _counted(lambda: run(student, r, False, True)),
         planned["student"].forward + planned["student"].backward),
        ("student forward with tangent + backward", _counted(lambda: run(student, r, True, True)),
         planned["student"].forward + planned["student"].tangent + planned["student"].backward),
        ("LoRA fake forward + backward", _counted(lambda: run(fake, None, False, True)),
         planned["fake"].forward + planned["fake"].backward),
    ]
    return [(what, counted, batch * per_sample) for what, counted, per_sample in checks]


@pytest.mark.parametrize("size", ["tiny", "medium"])
def test_flops_match_torch_flop_counter(size):
    # The aim was 2%; every term is modelled, so the count is exact (and kept so: a change to the
    # model's or the attention tangent's products must change network_flops with it).
    checks = _flops_checks(TINY if size == "tiny" else MEDIUM)
    for what, counted, planned in checks:
        print(f"{size} {what}: counted {counted:.6g}, planned {planned:.6g}")
        assert planned == counted, f"{size} {what}: counted {counted}, planned {planned}"


def test_a_cfg_teachers_flops_are_its_two_rows_per_sample():
    """A FLUX teacher without a guidance embedding run with classifier-free guidance (one
    [cond; uncond] call through the family's stage_forward) against ``network_flops``."""
    from models.flux.training import FluxFamily

    initialize_parallel()
    family = FluxFamily()
    batch = 2
    counted = {}
    for name, extra in (("plain", []), ("cfg", ["model.guidance_range=[3.0,3.0]"])):
        config = _config(MEDIUM, "model.overrides.guidance_embeds=false", "data.text_encoder=dummy", *extra)
        networks = family.build_networks(config, torch.device("cpu"), with_fake=False)
        cond, z, t, _ = _flux_inputs(family, config, batch, torch.Generator().manual_seed(0))
        with torch.no_grad():
            counted[name] = _counted(lambda: family.stage_forward(networks.teacher, z, None, t, cond, None))
        assert counted[name] == batch * family.network_flops(config, "teacher").forward, name
    assert counted["cfg"] == 2 * counted["plain"]


def test_step_flops_match_trainer_steps(tmp_path):
    """A warm-up, a differential and a differential + alignment step of the trainer itself (the
    8xH100 recipe's objective on the tiny FLUX, one process), each under the counter, against
    ``step_cost`` at the step's own fraction of r < t samples."""
    from mfmegatron.data import build_prompt_shards
    from mfmegatron.training.trainer import Trainer
    from tools.count_forwards import TINY as TINY_RECIPE

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(16)) + "\n")
    build_prompt_shards([prompts], tmp_path / "shards", samples_per_shard=16)
    config = load_config(TrainConfig, "recipes/flux_dev_8xh100.yaml", [
        *TINY_RECIPE, "warmup.policy=fixed", "warmup.switch_step=1", "meanflow.align_start_step=2",
        f"data.shards={tmp_path}/shards", f"train.output_dir={tmp_path}/run"])
    trainer = Trainer(config)
    kinds = []
    for _ in range(3):
        counter = _flop_counter()
        with counter:
            stats = trainer.train_step()
        kind = STEP_KINDS[0] if not stats["phase_differential"] else STEP_KINDS[2 if "fake_loss" in stats else 1]
        # The recipe recomputes activations: the counter sees the hardware FLOPs.
        planned = step_cost(config, 1, kind, moving=stats["time_r_below_t_fraction"]).hardware_flops
        counted = counter.get_total_flops()
        print(f"{kind}: counted {counted:.6g}, planned {planned:.6g}")
        assert planned == counted, kind
        kinds.append(kind)
    assert kinds == list(STEP_KINDS[:3])


def test_forward_counts_are_the_runners_arithmetic():
    config = _config(TINY, "meanflow.z_ode_steps=4", "meanflow.discrete.solver=heun", "meanflow.discrete.num_steps=4")
    warmup = forward_counts(config, STEP_KINDS[0], moving=0.25)
    assert warmup["teacher"].no_grad == 4 + 1 + 0.25 * 7 and warmup["student"].training == 1
    aligned = forward_counts(config, STEP_KINDS[2])
    assert aligned["student"].forward_equivalents == 4 + config.alignment.config.num_rollout_steps + 3
    assert aligned["fake"].forward_equivalents == 1 + 3 * config.alignment.fake_updates_per_step
    assert forward_counts(config, "flow matching")["flow"].forward_equivalents == 3


# --------------------------------------------------------------------------- communication


def _step_on_ranks(settings) -> dict:
    """One training-like step of the networks the trainer builds, its collectives counted."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mfmegatron.meanflow.passes import TrainingPass
    from mfmegatron.training.runner import NetworkRunner
    from models.flux.training import FluxFamily

    config = _config(settings)
    parallel = config.parallel
    initialize_parallel(tensor_parallel_size=parallel.tensor_parallel_size,
                        pipeline_parallel_size=parallel.pipeline_parallel_size, seed=3)
    family = FluxFamily()
    networks = family.build_networks(config, torch.device("cpu"), with_fake=True)

    def trained(module):
        ddp = DistributedDataParallel(module.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=config.optim.grad_reduce_in_fp32,
            use_distributed_optimizer=parallel.use_distributed_optimizer), module=module)
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-4, bf16=False, params_dtype=torch.float32, clip_grad=1.0,
            use_distributed_optimizer=parallel.use_distributed_optimizer), [ddp])
        return ddp, optimizer

    student, student_optimizer = trained(networks.student)
    fake, fake_optimizer = trained(networks.fake)
    runners = {name: NetworkRunner(family, model, parallel.num_microbatches)
               for name, model in (("teacher", networks.teacher), ("student", student), ("fake", fake))}

    rows = config.data.micro_batch_size * parallel.num_microbatches
    generator = torch.Generator().manual_seed(11 + parallel_state.get_data_parallel_rank())
    cond, z, t, r = _flux_inputs(family, config, rows, generator)
    image, channels = family.latent_shape(config)
    tangents = (torch.randn(rows, image, channels, generator=generator), torch.zeros(rows), torch.ones(rows))

    def loss(u, du, rows_slice):
        return u.square().mean(), {}

    ranks = lambda group: tuple(torch.distributed.get_process_group_ranks(group))  # noqa: E731
    names = {ranks(parallel_state.get_tensor_model_parallel_group()): "tp",
             ranks(parallel_state.get_pipeline_model_parallel_group()): "pp",
             ranks(parallel_state.get_data_parallel_group()): "dp"}
    phases = {
        "teacher evaluation": lambda: runners["teacher"].velocity(z, t, cond),
        "student JVP evaluation": lambda: runners["student"].mean_velocity_jvp(z, r, t, cond, tangents),
        "student pass": lambda: runners["student"].run_pass(
            TrainingPass("meanflow", "student", z, r, t, loss, tangents), cond),
        "student update": lambda: (finalize_model_grads([student]), student_optimizer.step()),
        "fake pass": lambda: runners["fake"].run_pass(TrainingPass("fake", "flow", z, None, t, loss), cond),
        "fake update": lambda: (finalize_model_grads([fake]), fake_optimizer.step()),
    }
    with CollectiveCounter(names) as counter:
        for phase, run in phases.items():
            counter.phase = phase
            run()
    return {"stage": parallel_state.get_pipeline_model_parallel_rank(),
            "data_parallel_size": parallel_state.get_data_parallel_world_size(),
            "bytes": counter.bytes, "calls": counter.calls, "by_phase": counter.by_phase}


CFG_TEACHER = ["model.overrides.guidance_embeds=false", "model.guidance_range=[3.0,3.0]", "data.text_encoder=dummy"]
LAYOUTS = {
    "TP=2 + SP": ["parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true"],
    "TP=2": ["parallel.tensor_parallel_size=2"],
    "TP=2 + SP, recompute": ["parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true",
                             "model.recompute=true"],
    "PP=2": ["parallel.pipeline_parallel_size=2"],
    "DP=2": [],
    # A teacher without a guidance embedding run with CFG: [cond; uncond] rows.
    "TP=2 + SP, CFG teacher": ["parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true", *CFG_TEACHER],
    "PP=2, CFG teacher": ["parallel.pipeline_parallel_size=2", *CFG_TEACHER],
    "DP=2, distributed optimizer": ["parallel.use_distributed_optimizer=true"],
}
# The step of the spawn, as rows per sample by network.
STEP = {"teacher": NetworkCalls(no_grad=1.0), "student": NetworkCalls(no_grad_jvp=1.0, training_jvp=1.0),
        "fake": NetworkCalls(training=1.0)}
COMMON = [*TINY, "parallel.num_microbatches=2", "data.micro_batch_size=2"]


def _all_layouts() -> dict:
    return {layout: _step_on_ranks([*COMMON, *extra]) for layout, extra in LAYOUTS.items()}


def test_communication_bytes_equal_the_collectives_sent():
    from models.flux.training import FluxFamily

    counted_by_layout = run_on_ranks(_all_layouts, 2, timeout=600)
    initialize_parallel()
    family = FluxFamily()
    for layout, extra in LAYOUTS.items():
        config = _config([*COMMON, *extra])
        for rank, counted in enumerate(result[layout] for result in counted_by_layout):
            planned = step_traffic(config, family, STEP, counted["stage"], counted["data_parallel_size"])
            planned_bytes = {key: value for key, value in planned.bytes.items() if value}
            print(f"{layout} rank {rank}: counted {counted['bytes']} planned {planned_bytes}")
            assert counted["bytes"] == planned_bytes, f"{layout}, rank {rank}; by phase {counted['by_phase']}"
            # Calls, per training pass (no-grad evaluations are sized by memory in the trainer).
            micro, passes = config.data.micro_batch_size, config.parallel.num_microbatches
            for phase, network, kind in (("student pass", "student", "forward_jvp"), ("fake pass", "fake", "forward")):
                one = family.pass_traffic(config, network, kind, micro, counted["stage"], with_backward=True)
                planned_calls = {key: calls for key, calls in one.scaled(passes).calls.items() if calls}
                counted_calls = {key: value[1] for key, value in counted["by_phase"].get(phase, {}).items()}
                assert counted_calls == planned_calls, f"{layout}, rank {rank}, {phase}"


# --------------------------------------------------------------------------- the plan


def test_plan_and_search_for_flux_dev():
    config = load_config(TrainConfig, "recipes/flux_dev_8xh100.yaml", [])
    result = plan(config, 8, CLUSTERS["h100"])
    assert result.fits and result.layout.startswith("TP=4 PP=1 DP=2")
    assert 11.8e9 < result.parameters["student"] < 12.0e9
    differential = result.steps["differential target"]
    assert 0 < differential.mfu < 1 and differential.seconds > 0
    rows = search_layouts(config, 8, CLUSTERS["h100"])
    fitting = [row for row in rows if row[4]]
    assert fitting and rows[: len(fitting)] == fitting
    assert [row[0] for row in fitting] == sorted(row[0] for row in fitting)


def test_plan_cli_prints_the_breakdown_and_one_line_errors(capsys):
    from tools.plan import main

    assert main(["recipes/flux_tiny_cpu.yaml", "--gpus", "4", "--gpu", "h200", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "141 GB" in out and "differential target:" in out and "tp all_gather" in out
    assert "MFU" in out and "memory per rank:" in out and "layouts (" in out
    assert main(["recipes/flux_tiny_cpu.yaml", "--gpus", "3"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: 3 GPUs do not split into TP=2")
    assert main(["recipes/flux_tiny_cpu.yaml", "--gpus", "2", "--no-search", "--weak-scaling", "2,4,8"]) == 0
    scaling = capsys.readouterr().out.split("weak scaling")[1].splitlines()[1:]
    assert [int(line.split()[0]) for line in scaling] == [2, 4, 8] and "100.0%" in scaling[0]
    assert main(["recipes/flux_tiny_cpu.yaml", "--gpus", "2", "--weak-scaling", "2,x"]) == 2
    assert capsys.readouterr().err.startswith("error: --weak-scaling takes GPU counts")


def test_weak_scaling_is_the_hand_calculation():
    """FLUX.1-dev's 8xH100 recipe (TP=4 x DP=2, distributed optimizer) from 8 to 64 GPUs by hand:
    compute and the TP collectives (inside a node) stay; only DP grows, whose reduce-scatter and
    all-gather each move (DP - 1) / DP of the bf16 gradient buffer over the busiest link: NVLink
    while TP x DP fits a node (8 GPUs), the inter-node link beyond. Per-GPU throughput is the
    per-replica batch over the step time, so the efficiency is the ratio of step times."""
    from mfmegatron.planner import weak_scaling
    from mfmegatron.training.memory import GB

    config = load_config(TrainConfig, "recipes/flux_dev_8xh100.yaml", [])
    cluster = CLUSTERS["h100"]
    step = step_cost(config, 8, "differential target", cluster)
    gradient_buffer = step.traffic.bytes["dp reduce_scatter"]
    assert step.traffic.bytes["dp all_gather"] == gradient_buffer
    assert gradient_buffer == pytest.approx(3.02e9 * 2, rel=1e-3)  # the student's rank share, bf16
    compute = step.hardware_flops / 8 / (cluster.peak_bf16_tflops * 1e12 * cluster.gemm_efficiency)
    tp = step.time_parts["tp communication"]

    def seconds(dp: int, link_gb_per_s: float) -> float:
        return compute + tp + 2 * gradient_buffer * (dp - 1) / dp / (link_gb_per_s * GB)

    by_hand = {8: seconds(2, cluster.intra_node_gb_per_s), 64: seconds(16, cluster.inter_node_gb_per_s)}
    rows = {row[0]: row for row in weak_scaling(config, [8, 64], cluster, "differential target")}
    for gpus, expected in by_hand.items():
        assert rows[gpus][1] == pytest.approx(expected, rel=1e-9)
        # samples/s: 4 rows per replica (micro-batch 1 x 4 micro-batches) x DP = GPUs / TP=4
        assert rows[gpus][3] == pytest.approx(4 * (gpus // 4) / expected, rel=1e-9)
    assert rows[64][4] == pytest.approx(by_hand[8] / by_hand[64], rel=1e-9)
    assert 0.90 < rows[64][4] < 0.92  # 90.8%: the DP collectives crossing nodes cost the rest


def test_layout_search_keeps_only_layouts_the_expert_mesh_tiles(tmp_path):
    """HunyuanImage's tiny recipe at EP=2 on 4 GPUs: TP=2 x PP=2 leaves 2 ranks per stage for an
    expert TP x EP mesh of 4, which megatron cannot build (the search divided by its zero-sized
    expert-DP group: ZeroDivisionError). Every layout listed has expert TP x EP dividing TP x DP."""
    from mfmegatron.training.family import FAMILIES

    if "hunyuan_image3" not in FAMILIES:
        pytest.skip("the HunyuanImage 3.0 trainer family is not registered")
    from models.hunyuan_image3.tokenizer import write_word_level_tokenizer

    write_word_level_tokenizer(["a red cat"], tmp_path / "tokenizer.json", 64)
    config = load_config(TrainConfig, "recipes/hunyuan_image3_tiny_cpu.yaml",
                         ["parallel.expert_parallel_size=2", f"data.text_tokenizer={tmp_path / 'tokenizer.json'}"])
    rows = search_layouts(config, 4, CLUSTERS["h100"])
    layouts = {row[2].split(",")[0] for row in rows}
    assert layouts == {"TP=1 EP=2 PP=2 DP=2 expert-DP=1", "TP=1 EP=2 PP=1 DP=4 expert-DP=2",
                       "TP=2 EP=2 PP=1 DP=2 expert-DP=1 SP", "TP=2 EP=2 PP=1 DP=2 expert-DP=1"}
    assert all(row[0] > 0 for row in rows)
