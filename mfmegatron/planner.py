"""The planner: what a recipe costs per training step at a layout, and which layouts fit a cluster.

For a recipe (``TrainConfig``) and a world size it counts, from the model's shapes alone:

- network forwards per sample of each step kind (``forward_counts``: the objective's own
  arithmetic, checked against the trainer by ``tools/count_forwards.py``) and the FLOPs they
  make (the family's ``network_flops``: forward, the tangent of a JVP forward, backward);
- the bytes of every collective one rank takes part in per step, by group and kind (the
  family's ``pass_traffic`` / ``gradient_traffic`` per micro-batch and per step, plus the
  runner's broadcast of no-grad outputs to every pipeline stage);
- memory per rank (``mfmegatron/training/memory.py``'s ``rank_memory``);
- a step time and MFU on a ``Cluster`` (GEMMs at a measured fraction of peak, collectives at
  the bus bandwidth of the link their group spans, no overlap, a 1F1B bubble);

and searches layouts (TP, PP, SP, distributed optimizer, recompute) for those that fit, best
predicted step time first. ``python -m tools.plan`` prints all of it.

Bytes are the payload of one call as its caller holds it whole: an all-reduce's tensor, an
all-gather's gathered output, a reduce-scatter's input, a point-to-point send's or receive's
tensor, a broadcast's tensor; calls within groups of one rank move nothing and are not counted.
Scalar control collectives (gradient norms, finiteness flags, loss statistics, pickled objects)
are left out. ``tests/test_planner.py`` checks FLOPs against ``torch.utils.flop_counter`` and
bytes against the collectives a gloo run actually issues.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

from mfmegatron.training.memory import GB, rank_memory

# What rank_memory leaves out (CUDA context, NCCL buffers, fragmentation): kept free of the budget.
UNCOUNTED_RESERVE_GB = 5.0

# The step kinds, as the trainer runs them. "flow matching" is train.objective=flow_matching.
STEP_KINDS = ("warm-up (discrete target)", "differential target", "differential + alignment", "flow matching")


# --------------------------------------------------------------------------- collectives


@dataclass
class CollectiveVolume:
    """Bytes and calls by ``"<group> <kind>"`` (group tp, pp or dp; kind all_reduce, all_gather,
    reduce_scatter, send, recv or broadcast)."""

    bytes: dict[str, float] = field(default_factory=dict)
    calls: dict[str, float] = field(default_factory=dict)

    def add(self, group: str, kind: str, nbytes: float, calls: float = 1) -> None:
        key = f"{group} {kind}"
        self.bytes[key] = self.bytes.get(key, 0) + nbytes
        self.calls[key] = self.calls.get(key, 0) + calls

    def __add__(self, other: CollectiveVolume) -> CollectiveVolume:
        total = CollectiveVolume(dict(self.bytes), dict(self.calls))
        for key in other.bytes:
            group, kind = key.split(" ")
            total.add(group, kind, other.bytes[key], other.calls[key])
        return total

    def scaled(self, factor: float) -> CollectiveVolume:
        return CollectiveVolume({k: v * factor for k, v in self.bytes.items()},
                                {k: v * factor for k, v in self.calls.items()})

    def as_sent_on(self, backend: str) -> CollectiveVolume:
        """This plan as ``backend`` sends it: gloo has no reduce-scatter of uneven row counts, so
        the MoE's expert-TP combine (and its gather's gradient) runs there as an all-reduce of the
        same payload, the whole input, on every rank (``parallel/cpu_platform.py``); NCCL
        reduce-scatters it."""
        sent = CollectiveVolume(dict(self.bytes), dict(self.calls))
        uneven = "etp reduce_scatter"
        if backend == "gloo" and sent.bytes.get(uneven):
            sent.add("etp", "all_reduce", sent.bytes.pop(uneven), sent.calls.pop(uneven))
        return sent

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    def add_stage_exchange(self, nbytes: float, stage: int, stages: int, with_backward: bool) -> None:
        """Pipeline ``stage``'s point-to-point traffic for one micro-batch whose stage activation
        is ``nbytes``: sent downstream and received from upstream forward; its gradient (the same
        shape) the other way backward."""
        if stage < stages - 1:
            self.add("pp", "send", nbytes)
            if with_backward:
                self.add("pp", "recv", nbytes)
        if stage > 0:
            self.add("pp", "recv", nbytes)
            if with_backward:
                self.add("pp", "send", nbytes)


# --------------------------------------------------------------------------- forwards per step


@dataclass
class NetworkCalls:
    """Rows per sample a network evaluates in one step, by the kind of evaluation."""

    no_grad: float = 0.0
    no_grad_jvp: float = 0.0
    training: float = 0.0
    """Training passes: forward and backward."""
    training_jvp: float = 0.0
    """Training passes with a tangent: the JVP forward and backward."""
    no_grad_evaluations: tuple[tuple[float, float], ...] | None = None
    """The no-grad evaluations behind ``no_grad`` as (how many, the fraction of the batch's rows
    each takes): each is a call of the runner over those rows, in micro-batches of
    ``parallel.no_grad_memory_gb``. What a call sends whatever its rows (HunyuanImage's
    per-expert token counts) is counted per call. None: ``no_grad`` evaluations of the whole
    batch."""

    @property
    def forward_equivalents(self) -> float:
        """The runner's count (``NetworkRunner.sample_forwards``): a no-grad forward 1, with a
        tangent 2, a training pass 3, with a tangent 4."""
        return self.no_grad + 2 * self.no_grad_jvp + 3 * self.training + 4 * self.training_jvp


def moving_fraction(config) -> float:
    """The expected fraction of samples with r < t."""
    return 1.0 - config.meanflow.time_sampling.equal_fraction


def forward_counts(config, kind: str, moving: float | None = None) -> dict[str, NetworkCalls]:
    """Rows per sample each network (teacher, student, fake; ``flow`` for flow matching) evaluates
    in one step of ``kind`` (one of ``STEP_KINDS``), with ``moving`` (default: the expected
    fraction) of the samples having r < t. The warm-up switch's gap checks (every
    ``meanflow.gap_interval`` steps) are left out."""
    if kind not in STEP_KINDS:
        raise ValueError(f"unknown step kind {kind!r}; known: {', '.join(STEP_KINDS)}")
    if kind == "flow matching":
        return {"flow": NetworkCalls(training=1.0)}
    meanflow = config.meanflow
    moving = moving_fraction(config) if moving is None else moving
    teacher, student, fake = NetworkCalls(), NetworkCalls(), NetworkCalls()
    # z_t: the teacher ODE from noise (Heun: two forwards a step), then v_T(z_t, t).
    solver_forwards = 1 if meanflow.z_ode_solver == "euler" else 2
    ode = solver_forwards * meanflow.z_ode_steps if meanflow.z_source == "teacher_ode" else 0
    teacher.no_grad = ode + 1.0
    teacher.no_grad_evaluations = ((ode + 1.0, 1.0),)
    if kind.startswith("warm-up"):
        discrete = meanflow.discrete
        per_step = 2 if discrete.solver == "heun" else 1
        # The r < t rows only; the first evaluation is v_T, already counted (fixed step counts).
        teacher.no_grad += moving * (per_step * discrete.num_steps - 1)
        if moving > 0:
            teacher.no_grad_evaluations += ((per_step * discrete.num_steps - 1, moving),)
        student.training = 1.0
    else:
        student.training_jvp = 1.0
    if kind.endswith("alignment"):
        grid = config.alignment.config.time_grid
        segments = len(grid) - 1 if grid else config.alignment.config.num_rollout_steps
        student.no_grad += segments  # the rollout's jumps
        student.no_grad_evaluations = ((segments, 1.0),)
        student.training += 1.0  # the generator pass
        teacher.no_grad += 1.0
        teacher.no_grad_evaluations += ((1.0, 1.0),)
        fake.no_grad += 1.0
        fake.no_grad_evaluations = ((1.0, 1.0),)
        fake.training += config.alignment.fake_updates_per_step
    return {"teacher": teacher, "student": student, "fake": fake}


def network_training(config, network: str) -> str:
    """How a network trains: "frozen" (the teacher), "full" or "lora" (the fake network)."""
    if network == "teacher":
        return "frozen"
    if network == "fake" and config.alignment.fake_network == "lora":
        return "lora"
    return "full"


# --------------------------------------------------------------------------- the cluster


@dataclass
class Cluster:
    """What the planner needs to know of the machines."""

    gpu_memory_gb: float = 80.0
    peak_bf16_tflops: float = 989.0
    """Dense bf16 tensor-core peak of one GPU."""
    intra_node_gb_per_s: float = 450.0
    """Per GPU, one direction (NVLink)."""
    inter_node_gb_per_s: float = 50.0
    """Per GPU, one direction (e.g. one 400 Gb/s NIC per GPU)."""
    gpus_per_node: int = 8
    peak_fp8_tflops: float = 1979.0
    """Not used by the step-time model yet (the trainer runs bf16)."""
    gemm_efficiency: float = 0.425
    """The fraction of peak a step's FLOPs run at. Measured once: the flow-matching step of
    ``tools/bench_flux_meanflow`` on one H200 (a no-grad teacher forward, the student's forward
    and backward; width 3072, 2 double + 4 single blocks, 4096 image + 512 text tokens, batch 2;
    README) took 152.8 ms for 64.3 TFLOP by ``network_flops``: 421 TFLOP/s, 42.5% of 989. At
    that efficiency the differential step's 84.7 TFLOP predict 201 ms; it took 191.6 ms (+5%).
    One GPU, one shape: not measured at scale."""


CLUSTERS = {
    "h100": Cluster(gpu_memory_gb=80.0),
    "h200": Cluster(gpu_memory_gb=141.0),
}

_BUS_FACTOR = {  # bytes over the busiest link per payload byte, ring algorithms on n ranks
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "send": lambda n: 1.0,
    "recv": lambda n: 0.0,  # a receive is the peer's send, counted there
    "broadcast": lambda n: 1.0,
    "all_to_all": lambda n: (n - 1) / n,
}


# --------------------------------------------------------------------------- the plan


@dataclass
class StepCost:
    kind: str
    forwards: dict[str, NetworkCalls]
    flops: float
    """Model FLOPs of the whole step (every sample of the global batch)."""
    flops_by_network: dict[str, float]
    traffic: CollectiveVolume
    """Per rank (the busiest pipeline stage's)."""
    hardware_flops: float = 0.0
    """``flops`` plus what activation recompute repeats (the blocks' primal forward in each
    training pass's backward)."""
    seconds: float = 0.0
    mfu: float = 0.0
    time_parts: dict[str, float] = field(default_factory=dict)


@dataclass
class Plan:
    layout: str
    world_size: int
    parameters: dict[str, float]
    """Whole-network parameters (teacher, student, LoRA factors)."""
    memory: object
    """``RankMemory``."""
    fits: bool
    steps: dict[str, StepCost]


def for_planning(config):
    """A copy of the recipe to plan with: while its teacher checkpoint does not exist yet, the
    preset's architecture stands for it."""
    planning = copy.deepcopy(config)
    checkpoint = planning.model.teacher_checkpoint
    if checkpoint is not None and not Path(checkpoint).exists():
        planning.model.teacher_checkpoint = None
    return planning


def layout_sizes(config, world_size: int) -> tuple[int, int, int]:
    parallel = config.parallel
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    if world_size % (tp * pp):
        raise ValueError(f"{world_size} GPUs do not split into TP={tp} x PP={pp}")
    return tp, pp, world_size // (tp * pp)


def step_traffic(config, family, forwards: dict[str, NetworkCalls], stage: int,
                 data_parallel_size: int) -> CollectiveVolume:
    """Collectives of one rank of pipeline ``stage`` in one step with these forwards. A no-grad
    evaluation's bytes are linear in its rows plus what each of the runner's calls sends
    whatever its rows; the calls are the runner's no-grad micro-batches
    (``training.runner.no_grad_slices``) of the rows each evaluation takes."""
    from mfmegatron.training.runner import no_grad_max_rows, no_grad_slices

    parallel = config.parallel
    batch = config.data.micro_batch_size * parallel.num_microbatches  # rows per replica
    micro = config.data.micro_batch_size
    max_rows = dict(zip(("forward", "forward_jvp"), no_grad_max_rows(config, family)))

    def runner_calls(evaluations, phase):
        return sum(count * len(no_grad_slices(max(1, math.ceil(fraction * batch - 1e-9)), max_rows[phase],
                                              parallel.num_microbatches, parallel.pipeline_parallel_size))
                   for count, fraction in evaluations)

    total = CollectiveVolume()
    for network, calls in forwards.items():
        evaluations = ((calls.no_grad, 1.0),) if calls.no_grad_evaluations is None else calls.no_grad_evaluations
        for phase, rows, phase_evaluations in (("forward", calls.no_grad, evaluations),
                                               ("forward_jvp", calls.no_grad_jvp, ((calls.no_grad_jvp, 1.0),))):
            if rows:
                per_call, per_row = _per_call_and_per_row(family, config, network, phase, stage)
                total = total + per_row.scaled(batch * rows) + per_call.scaled(runner_calls(phase_evaluations, phase))
        if parallel.pipeline_parallel_size > 1 and calls.no_grad + calls.no_grad_jvp:
            # The runner hands the last stage's float32 outputs (and tangents) to every stage.
            velocity = math.prod(family.latent_shape(config)) * 4
            total.add("pp", "broadcast", velocity * batch * (calls.no_grad + 2 * calls.no_grad_jvp))
        for phase, rows in (("forward", calls.training), ("forward_jvp", calls.training_jvp)):
            if rows:
                per_micro_batch = family.pass_traffic(config, network, phase, micro, stage, with_backward=True)
                total = total + per_micro_batch.scaled(batch * rows / micro)
        if calls.training or calls.training_jvp:
            updates = calls.training if network == "fake" else 1  # each fake update is a step of its own
            total = total + family.gradient_traffic(config, network, stage, data_parallel_size).scaled(updates)
    return total


def _per_call_and_per_row(family, config, network: str, phase: str, stage: int):
    """A no-grad pass's traffic as (what one call sends whatever its rows, what each row adds):
    the families' ``pass_traffic`` is affine in the rows."""
    one = family.pass_traffic(config, network, phase, 1, stage, with_backward=False)
    two = family.pass_traffic(config, network, phase, 2, stage, with_backward=False)
    per_row = two + one.scaled(-1)
    per_call = one + per_row.scaled(-1)
    return per_call, per_row


def step_cost(config, world_size: int, kind: str, cluster: Cluster | None = None,
              moving: float | None = None) -> StepCost:
    """FLOPs, collectives, predicted time and MFU of one step of ``kind`` (``moving``: the
    fraction of samples with r < t, default the expected one)."""
    from mfmegatron.training.family import get_family

    config = for_planning(config)
    family = get_family(config.model.family)
    if not hasattr(family, "network_flops"):
        raise ValueError(f"the {config.model.family} family does not describe its costs to the planner yet")
    tp, pp, dp = layout_sizes(config, world_size)
    forwards = forward_counts(config, kind, moving)
    global_batch = config.data.micro_batch_size * config.parallel.num_microbatches * dp
    flops_by_network, recomputed = {}, 0.0
    for network, calls in forwards.items():
        cost = family.network_flops(config, network)
        per_sample = (calls.no_grad * cost.forward + calls.no_grad_jvp * (cost.forward + cost.tangent)
                      + calls.training * (cost.forward + cost.backward)
                      + calls.training_jvp * (cost.forward + cost.tangent + cost.backward))
        flops_by_network[network] = per_sample * global_batch
        if config.model.recompute:  # backward re-runs each block's primal (jvp/recompute.py)
            recomputed += (calls.training + calls.training_jvp) * cost.recomputed * global_batch
    traffic = max((step_traffic(config, family, forwards, stage, dp) for stage in range(pp)),
                  key=lambda volume: volume.total_bytes)
    flops = sum(flops_by_network.values())
    step = StepCost(kind, forwards, flops, flops_by_network, traffic, hardware_flops=flops + recomputed)
    if cluster is not None:
        predict_time(step, config, world_size, cluster)
    return step


def _group_span(group: str, config, tp: int, pp: int, dp: int) -> tuple[int, int]:
    """(ranks in the group, consecutive ranks it spans): megatron orders ranks TP fastest, then
    DP, then PP; the experts' mesh expert-TP fastest, then EP, then expert-DP, then PP (``ep`` is
    the dispatcher's expert-TP x EP group, ``edp`` the routed experts' data-parallel group)."""
    etp = config.parallel.expert_tensor_parallel_size or tp
    ep = config.parallel.expert_parallel_size
    return {
        "tp": (tp, tp), "dp": (dp, tp * dp), "pp": (pp, tp * dp * pp),
        "etp": (etp, etp), "ep": (etp * ep, etp * ep), "edp": (tp * dp // (etp * ep), tp * dp),
    }[group]


def predict_time(step: StepCost, config, world_size: int, cluster: Cluster) -> None:
    """Fills ``step.seconds``, ``step.mfu`` (of the model FLOPs: recompute not counted) and
    ``step.time_parts``: the hardware FLOPs at ``cluster.gemm_efficiency`` of peak, the 1F1B
    bubble ((PP - 1) / micro-batches of the compute), and every collective's bus bytes at the
    bandwidth of the link its group spans, none overlapped. The FLOPs are split evenly over the
    GPUs: what every TP rank repeats (FLUX's embedders and final projection, under 1% at
    FLUX.1-dev's sizes) and unequal pipeline stages are not modelled."""
    tp, pp, dp = layout_sizes(config, world_size)
    compute = step.hardware_flops / world_size / (cluster.peak_bf16_tflops * 1e12 * cluster.gemm_efficiency)
    bubble = compute * (pp - 1) / config.parallel.num_microbatches if pp > 1 else 0.0
    parts = {"compute": compute, "pipeline bubble": bubble}
    for key, nbytes in step.traffic.bytes.items():
        group, kind = key.split(" ")
        size, span = _group_span(group, config, tp, pp, dp)
        if group == "pp":  # neighbouring stages: one stage apart
            span = tp * dp * 2
        bandwidth = cluster.intra_node_gb_per_s if span <= cluster.gpus_per_node else cluster.inter_node_gb_per_s
        name = f"{group} communication"
        parts[name] = parts.get(name, 0.0) + nbytes * _BUS_FACTOR[kind](size) / (bandwidth * GB)
    step.time_parts = parts
    step.seconds = sum(parts.values())
    step.mfu = step.flops / (step.seconds * world_size * cluster.peak_bf16_tflops * 1e12)


def plan(config, world_size: int, cluster: Cluster | None = None) -> Plan:
    """Every step kind's cost at the recipe's layout, its memory, and whether it fits."""
    from mfmegatron.training.family import get_family

    cluster = cluster or CLUSTERS["h100"]
    config = for_planning(config)
    layout_sizes(config, world_size)
    memory = rank_memory(config, world_size)
    fits = memory.total / GB <= cluster.gpu_memory_gb - UNCOUNTED_RESERVE_GB
    kinds = STEP_KINDS[:3] if config.train.objective == "meanflow_distillation" else STEP_KINDS[3:]
    if not config.alignment.enabled:
        kinds = tuple(k for k in kinds if not k.endswith("alignment"))
    steps = {kind: step_cost(config, world_size, kind, cluster) for kind in kinds}
    whole = copy.deepcopy(config)
    whole.parallel.tensor_parallel_size = whole.parallel.pipeline_parallel_size = 1
    parameters = get_family(config.model.family).rank_parameter_counts(whole)
    return Plan(memory.layout, world_size, parameters, memory, fits, steps)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(config, world_size: int):
    """Recipe copies at every layout to search: TP in {1, 2, 4, 8}, PP dividing the rest, SP on or
    off (TP > 1), the distributed optimizer on or off (DP > 1), recompute on or off. The global
    batch is kept: micro-batches per replica = global batch / (micro-batch x DP)."""
    from mfmegatron.training.family import get_family

    config = for_planning(config)
    family = get_family(config.model.family)
    dp_now = layout_sizes(config, world_size)[2]
    global_rows = config.parallel.num_microbatches * dp_now
    for tp in (1, 2, 4, 8):
        if world_size % tp:
            continue
        for pp in _divisors(world_size // tp):
            dp = world_size // (tp * pp)
            if global_rows % dp:
                continue
            for sp, distributed, recompute in itertools.product((False, True), repeat=3):
                if (sp and tp == 1) or (distributed and dp == 1):
                    continue
                candidate = copy.deepcopy(config)
                parallel = candidate.parallel
                parallel.tensor_parallel_size, parallel.pipeline_parallel_size = tp, pp
                parallel.sequence_parallel, parallel.use_distributed_optimizer = sp, distributed
                parallel.num_microbatches = global_rows // dp
                candidate.model.recompute = recompute
                # megatron's expert mesh (expert TP x EP x expert-DP) must tile each pipeline
                # stage's TP x DP ranks: with the recipe's EP a deep pipeline can leave too few.
                expert_tp = parallel.expert_tensor_parallel_size or tp
                if (tp * dp) % (expert_tp * parallel.expert_parallel_size):
                    continue
                if family.layout_problem(candidate) is None:
                    yield candidate


def search_layouts(config, world_size: int, cluster: Cluster, kind: str | None = None) -> list[tuple]:
    """(predicted seconds of a ``kind`` step, MFU, layout, per-rank GB, fits) of every candidate:
    those that fit first, then fastest, then smallest. ``kind`` defaults to the recipe's most
    frequent step (the differential one; flow matching for flow-matching recipes)."""
    if kind is None:
        kind = "differential target" if config.train.objective == "meanflow_distillation" else "flow matching"
    rows = []
    for candidate in candidate_layouts(config, world_size):
        memory = rank_memory(candidate, world_size)
        fits = memory.total / GB <= cluster.gpu_memory_gb - UNCOUNTED_RESERVE_GB
        step = step_cost(candidate, world_size, kind, cluster)
        layout = memory.layout + (", recompute" if candidate.model.recompute else "")
        rows.append((step.seconds, step.mfu, layout, memory.total / GB, fits))
    rows.sort(key=lambda row: (not row[4], row[0], row[3]))  # ties: less memory first
    return rows


def weak_scaling(config, gpu_counts: list[int], cluster: Cluster, kind: str | None = None) -> list[tuple]:
    """(GPUs, predicted seconds of a ``kind`` step, MFU, samples per second, efficiency against
    the first count) at each of ``gpu_counts`` with the recipe's layout and per-replica batch
    kept: only data parallelism grows (its collectives cross nodes once TP x DP exceeds a node).
    A prediction of the time model, not a measurement."""
    kind = kind or ("differential target" if config.train.objective == "meanflow_distillation" else "flow matching")
    rows, first = [], None
    for gpus in gpu_counts:
        step = step_cost(config, gpus, kind, cluster)
        dp = layout_sizes(config, gpus)[2]
        samples = config.data.micro_batch_size * config.parallel.num_microbatches * dp / step.seconds
        first = first or samples / gpus
        rows.append((gpus, step.seconds, step.mfu, samples, samples / gpus / first))
    return rows
