"""What one rank of a training job holds in device memory, counted from the recipe.

``rank_memory(config)`` adds up, per GPU: the frozen teacher's weights; the student's weights,
gradient buffers, float32 main parameters and Adam moments (the last two sharded over data-parallel
ranks with the distributed optimizer) and its EMA (sharded or replicated, ``optim.ema_sharding``);
the fake network of the alignment loss (a full copy: everything the student has but the EMA;
LoRA: the same for its factors only); and the activations of a training pass (the model family's
formula, or a no-grad evaluation's when larger). A mixture-of-experts family's routed experts
keep their fp32 state and sharded EMA over expert-data-parallel ranks (world / (expert TP x EP x
PP)) instead of data-parallel ones (world / (TP x PP)). Recipes quote its figures
(``python -m tools.memory_plan RECIPE``) and ``tests/test_memory.py`` fails when a recipe's
comment and this count disagree.

Left out: the CUDA context and library workspaces (cuBLAS, cuDNN: about 0.5-1 GB), NCCL's
communication buffers, megatron's bucket padding, the caching allocator's fragmentation and the text
embeddings. Activations are the larger of a training pass's and a no-grad evaluation's (those
run in micro-batches of up to ``parallel.no_grad_memory_gb``, one block at a time). The budget
check keeps 5 GB of an 80 GB (decimal) H100 for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GB = 1e9
FP32 = 4
ADAM_MOMENTS = 2 * FP32


@dataclass
class MemoryItem:
    label: str
    bytes: float
    how: str
    """The arithmetic, in words and numbers."""


@dataclass
class RankMemory:
    """One rank's memory, item by item (``label -> bytes`` through ``by_label``)."""

    layout: str
    items: list[MemoryItem] = field(default_factory=list)

    def add(self, label: str, count: float, how: str) -> None:
        self.items.append(MemoryItem(label, count, how))

    @property
    def total(self) -> float:
        return sum(item.bytes for item in self.items)

    def by_label(self) -> dict[str, float]:
        return {item.label: item.bytes for item in self.items}

    def lines(self) -> list[str]:
        """The breakdown as recipes quote it: one item per line, GB to one decimal."""
        width = max(len(item.label) for item in self.items)
        out = [f"{item.label:<{width}}  {item.bytes / GB:5.1f} GB   {item.how}" for item in self.items]
        out.append(f"{'total':<{width}}  {self.total / GB:5.1f} GB")
        return out


def data_parallel_size(config, world_size: int) -> int:
    parallel = config.parallel
    return world_size // (parallel.tensor_parallel_size * parallel.pipeline_parallel_size)


def expert_data_parallel_size(config, world_size: int) -> int:
    """Ranks holding the same routed experts: world / (expert TP x EP x PP) (megatron's expert
    data-parallel group, over which expert gradients are reduced and their optimizer state and
    EMA sharded)."""
    parallel = config.parallel
    expert_tp = parallel.expert_tensor_parallel_size or parallel.tensor_parallel_size
    return world_size // (expert_tp * parallel.expert_parallel_size * parallel.pipeline_parallel_size)


def _shards(group: str, shards: int, always: bool = False) -> str:
    return f" / {group}={shards}" if shards > 1 or always else ""


def _split_by_group(count: float, expert: float, per_parameter: float, unit: str, dense_shards: int,
                    expert_shards: int, always_show_shards: bool = False) -> tuple[float, str]:
    """Bytes and arithmetic of ``per_parameter`` bytes (written ``unit``) for ``count``
    parameters, ``expert`` of them routed experts: the dense part divided by ``dense_shards``
    (DP), the experts' by ``expert_shards`` (expert-DP). Without experts, one term, as for a dense
    model."""
    dense = count - expert
    show = always_show_shards
    if not expert:
        return count * per_parameter / dense_shards, f"{count / 1e9:.3f}e9 x {unit}{_shards('DP', dense_shards, show)}"
    return (
        dense * per_parameter / dense_shards + expert * per_parameter / expert_shards,
        f"{dense / 1e9:.3f}e9 x {unit}{_shards('DP', dense_shards, show)} + {expert / 1e9:.3f}e9 experts x "
        f"{unit}{_shards('expert-DP', expert_shards, show)}",
    )


def rank_memory(config, world_size: int, family=None) -> RankMemory:
    """Per-rank bytes of a recipe run on ``world_size`` GPUs (GB = 1e9 bytes). ``family``: the
    model family's object (default: the one ``model.family`` names in the registry).

    A mixture-of-experts family also returns ``teacher_expert``, ``student_expert`` and
    ``lora_expert``: the routed experts' part of each count. Their optimizer state and EMA shard
    over expert-data-parallel ranks, the rest over data-parallel ranks."""
    from mfmegatron.training.ema import resolve_sharding
    from mfmegatron.training.family import get_family

    family = family or get_family(config.model.family)
    parallel, optim, alignment = config.parallel, config.optim, config.alignment
    dp = data_parallel_size(config, world_size)
    counts = family.rank_parameter_counts(config)
    has_experts = "student_expert" in counts
    expert_dp = expert_data_parallel_size(config, world_size)
    weight = 2 if config.model.dtype == "bf16" else FP32
    grad = FP32 if optim.grad_reduce_in_fp32 else weight
    # Adam's state lives with float32 main parameters; bf16 weights get a float32 copy (fp32
    # weights are their own main parameters). The distributed optimizer shards both over DP
    # (routed experts: over expert-DP).
    main = FP32 if weight != FP32 else 0
    distributed = parallel.use_distributed_optimizer
    state_unit = f"({main} + {ADAM_MOMENTS}) B"

    def state(count: float, expert: float) -> tuple[float, str]:
        return _split_by_group(count, expert, main + ADAM_MOMENTS, state_unit, dp if distributed else 1,
                               expert_dp if distributed else 1)

    expert_layout = ""
    if has_experts:
        expert_tp = parallel.expert_tensor_parallel_size or parallel.tensor_parallel_size
        expert_layout = f" EP={parallel.expert_parallel_size}" + (
            f" ETP={expert_tp}" if expert_tp != parallel.tensor_parallel_size else "")
    memory = RankMemory(
        f"TP={parallel.tensor_parallel_size}{expert_layout} PP={parallel.pipeline_parallel_size} DP={dp}"
        f"{f' expert-DP={expert_dp}' if has_experts else ''}"
        f"{' SP' if parallel.sequence_parallel else ''}"
        f"{', distributed optimizer' if distributed else ''}"
    )
    teacher, student = counts["teacher"], counts["student"]
    student_expert = counts.get("student_expert", 0.0)
    memory.add("teacher weights", teacher * weight, f"{teacher / 1e9:.3f}e9 x {weight} B")
    memory.add("student weights", student * weight, f"{student / 1e9:.3f}e9 x {weight} B")
    memory.add("student gradients", student * grad, f"{student / 1e9:.3f}e9 x {grad} B")
    memory.add("student main params + Adam", *state(student, student_expert))
    if optim.ema_decay > 0:
        sharded = resolve_sharding(optim.ema_sharding, parallel.use_distributed_optimizer) == "data_parallel"
        if sharded:
            memory.add("student EMA", *_split_by_group(student, student_expert, FP32, f"{FP32} B", dp, expert_dp,
                                                        always_show_shards=True))
        else:
            memory.add("student EMA", student * FP32, f"{student / 1e9:.3f}e9 x {FP32} B (replicated)")
    if alignment.enabled:
        if alignment.fake_network == "lora":
            fake, fake_expert = counts["lora"], counts.get("lora_expert", 0.0)
            label = f"fake network (LoRA rank {alignment.lora_rank})"
        else:
            fake, fake_expert = teacher, counts.get("teacher_expert", 0.0)
            label = "fake network (full copy)"
        state_bytes, state_arithmetic = state(fake, fake_expert)
        if fake_expert:
            how = f"{fake / 1e9:.3f}e9 x ({weight} + {grad} B) + {state_arithmetic}"
        else:  # one line for a dense model: "n x (2 + 2 B + (4 + 8) B / DP=16)"
            how = f"{fake / 1e9:.3f}e9 x ({weight} + {grad} B + {state_arithmetic.split(' x ', 1)[1]})"
        memory.add(label, fake * (weight + grad) + state_bytes, how)
    # The training passes' activations and the no-grad evaluations' (teacher velocities, ODE
    # steps, rollouts, target JVPs: micro-batches of up to parallel.no_grad_memory_gb) never live
    # at the same time; the peak is the larger.
    activations, formula = family.activation_bytes(config)
    no_grad, no_grad_formula = no_grad_activation_bytes(config, family)
    if no_grad > activations:
        activations, formula = no_grad, no_grad_formula
    memory.add("activations", activations, formula)
    return memory


def no_grad_activation_bytes(config, family) -> tuple[float, str]:
    """Peak activations of a no-grad evaluation (with a tangent, the larger): the rank's batch
    in micro-batches of as many rows as ``parallel.no_grad_memory_gb`` holds, times the
    family's estimate per row (what ``Trainer._runner`` sizes them by)."""
    batch = config.data.micro_batch_size * config.parallel.num_microbatches
    per_row = family.no_grad_activation_bytes_per_sample(config, with_tangent=True)
    rows = min(batch, max(1, int(config.parallel.no_grad_memory_gb * GB // per_row)))
    return rows * per_row, f"no-grad JVP evaluation: {rows} rows x {per_row / GB:.2f} GB (peak of one block)"
