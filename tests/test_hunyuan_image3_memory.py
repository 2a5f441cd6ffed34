"""HunyuanImage 3.0's per-rank memory count (``models/hunyuan_image3/memory.py`` through
``mfmegatron/training/memory.py``): parameter counts against sizes worked out by hand from the
config and against the networks built on two ranks, the routed experts' optimizer state and EMA
sharded over expert-data-parallel ranks, the dispatch buffers in the activations, and every
figure the HunyuanImage 3.0 recipes quote."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mfmegatron.parallel import run_on_ranks
from tests.test_memory import RECIPES, _stated

HUNYUAN_RECIPES = ["hunyuan_image3_64xh100.yaml", "hunyuan_image3_256xh100.yaml", "hunyuan_image3_64xh200.yaml"]
LORA_RANK = 4


def _train_config(tp=1, ep=1, etp=None, pp=1, overrides=()):
    from mfmegatron.config import load_config
    from mfmegatron.training.config import TrainConfig

    return load_config(TrainConfig, None, [
        f"parallel.tensor_parallel_size={tp}", f"parallel.expert_parallel_size={ep}",
        f"parallel.pipeline_parallel_size={pp}", f"parallel.sequence_parallel={str(tp > 1).lower()}",
        f"alignment.lora_rank={LORA_RANK}", *([f"parallel.expert_tensor_parallel_size={etp}"] if etp else []),
        *overrides,
    ])


def _tiny(**overrides):
    from models.hunyuan_image3.config import tiny_hunyuan_image3_config

    return tiny_hunyuan_image3_config(image_path=True, **overrides)


def _by_hand(config, tp: int, ep: int, etp: int, pp: int) -> list[dict[str, float]]:
    """Per stage (the layers split evenly): parameters and LoRA factors of one rank, from the
    config's sizes. A linear [out, in] split over n ranks by rows (column-parallel) has LoRA
    factors r·(in + out/n); by columns (row-parallel) r·(in/n + out)."""
    h, d, r = config.hidden_size, config.kv_channels, LORA_RANK
    heads, groups, experts = config.num_attention_heads, config.num_query_groups, config.num_moe_experts
    width, shared, vocab = config.moe_ffn_hidden_size, config.moe_shared_expert_intermediate_size, config.vocab_size
    qkv = (heads + 2 * groups) * d
    layer_dense = 2 * h + 2 * d + qkv * h / tp + heads * d * h / tp + experts * h + 3 * h * shared / tp
    layer_experts = experts / ep * 3 * h * width / etp
    # The LoRA fake network adapts the attention projections only (meanflow.lora_covers).
    layer_lora = r * (h + qkv / tp) + r * (heads * d / tp + h)
    c, latent, sinusoid = config.patch_embed_hidden_dim, config.latent_channels, config.timestep_embedding_dim
    embedder = sinusoid * h + h + h * h + h

    def resblock(cin, cout):
        return 2 * cin + (cin * cout * 9 + cout) + (h * 2 * cout + 2 * cout) + 2 * cout + (cout * cout * 9 + cout) + (cin * cout + cout)

    first = vocab * h / tp + 2 * embedder + (latent * c * 9 + c) + resblock(c, h)
    last = h + vocab * h / tp + embedder + resblock(h, c) + 2 * c + (c * latent * 9 + latent)
    stages = []
    layers = config.num_layers // pp
    for stage in range(pp):
        teacher = layers * (layer_dense + layer_experts) + (first if stage == 0 else 0) + (last if stage == pp - 1 else 0)
        lora = layers * layer_lora
        stages.append({
            "teacher": teacher, "teacher_expert": layers * layer_experts,
            "student": teacher + (2 * embedder if stage == 0 else 0), "student_expert": layers * layer_experts,
            "lora": lora, "lora_expert": 0.0,
        })
    return stages


@pytest.mark.parametrize("tp, ep, etp, pp", [(2, 2, 2, 2), (1, 4, 1, 1), (2, 2, 1, 2)])
def test_counts_are_the_model_split_by_hand(tp, ep, etp, pp):
    from mfmegatron.parallel import parallel_context
    from models.hunyuan_image3.memory import rank_parameter_counts, stage_parameter_counts

    architecture = _tiny()
    config = _train_config(tp, ep, etp, pp)
    with parallel_context():
        stages = stage_parameter_counts(architecture, config)
        worst = rank_parameter_counts(architecture, config)
    expected = _by_hand(architecture, tp, ep, etp, pp)
    for stage, (counted, by_hand) in enumerate(zip(stages, expected, strict=True)):
        assert counted == pytest.approx(by_hand), stage
    assert worst == stages[0]  # wte, the image input path and the student's embedders


def _built_counts(layouts) -> list[dict]:
    """On each rank: the teacher network (and its LoRA factors) built at each layout, and what
    the count says for this rank's stage."""
    import torch
    from megatron.core import parallel_state

    from mfmegatron.jvp.lora import add_lora
    from models.hunyuan_image3.meanflow import lora_covers
    from mfmegatron.parallel import initialize_parallel
    from models.hunyuan_image3.memory import stage_parameter_counts
    from models.hunyuan_image3.parallelize import build_hunyuan_model

    results = []
    for tp, ep, etp, pp in layouts:
        initialize_parallel(tensor_parallel_size=tp, expert_parallel_size=ep, expert_tensor_parallel_size=etp,
                            pipeline_parallel_size=pp)
        stage = parallel_state.get_pipeline_model_parallel_rank()
        layout = dict(tensor_model_parallel_size=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                      pipeline_model_parallel_size=pp, sequence_parallel=tp > 1)
        if pp > 1:
            layout["pipeline_dtype"] = torch.float32
        model = build_hunyuan_model(_tiny(**layout))
        built = {
            "teacher": sum(p.numel() for p in model.parameters()),
            "teacher_expert": sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n),
        }
        add_lora(model, LORA_RANK, alpha=1.0, include=lora_covers)
        lora = {n: p.numel() for n, p in model.named_parameters() if ".lora." in n}
        built["lora"] = sum(lora.values())
        built["lora_expert"] = sum(count for n, count in lora.items() if ".mlp.experts." in n)
        counted = stage_parameter_counts(_tiny(), _train_config(tp, ep, etp, pp))[stage]
        results.append({"built": built, "counted": counted})
    return results


def test_counts_equal_the_networks_built_on_two_ranks():
    layouts = [(2, 2, 1, 1), (1, 1, 1, 2)]  # TP=2 SP with EP=2 (expert TP 1); two pipeline stages
    for rank in run_on_ranks(_built_counts, 2, layouts, timeout=600):
        for layout, result in zip(layouts, rank, strict=True):
            for key, built in result["built"].items():
                assert result["counted"][key] == built, (layout, key)


class _CountsOnly:
    """A family with given parameter counts and no activations."""

    def __init__(self, counts):
        self.counts = counts

    def rank_parameter_counts(self, config):
        return self.counts

    def activation_bytes(self, config):
        return 0.0, "none"

    def no_grad_activation_bytes_per_sample(self, config, with_tangent):
        return 1.0


def test_expert_state_and_ema_shard_over_expert_data_parallel_ranks():
    from mfmegatron.training.memory import rank_memory

    counts = {"teacher": 10e9, "teacher_expert": 8e9, "student": 10e9, "student_expert": 8e9,
              "lora": 1e9, "lora_expert": 0.5e9}
    config = _train_config(tp=1, ep=8, pp=4, overrides=[
        "model.dtype=bf16", "optim.grad_reduce_in_fp32=false", "parallel.use_distributed_optimizer=true",
        "optim.ema_decay=0.999", "alignment.enabled=true", "alignment.fake_network=full",
    ])
    memory = rank_memory(config, 64, family=_CountsOnly(counts))  # DP = 64/4 = 16, expert-DP = 64/(8*4) = 2
    items = memory.by_label()
    assert "EP=8" in memory.layout and "DP=16" in memory.layout and "expert-DP=2" in memory.layout
    assert items["student main params + Adam"] == pytest.approx(2e9 * 12 / 16 + 8e9 * 12 / 2)
    assert items["student EMA"] == pytest.approx(2e9 * 4 / 16 + 8e9 * 4 / 2)
    assert items["fake network (full copy)"] == pytest.approx(10e9 * 4 + 2e9 * 12 / 16 + 8e9 * 12 / 2)
    config.alignment.fake_network = "lora"
    lora = rank_memory(config, 64, family=_CountsOnly(counts)).by_label()[f"fake network (LoRA rank {LORA_RANK})"]
    assert lora == pytest.approx(1e9 * 4 + 0.5e9 * 12 / 16 + 0.5e9 * 12 / 2)
    # Without expert counts (a dense family) everything shards over DP, and the layout has no EP.
    dense = rank_memory(config, 64, family=_CountsOnly({"teacher": 10e9, "student": 10e9, "lora": 1e9}))
    assert dense.by_label()["student EMA"] == pytest.approx(10e9 * 4 / 16)
    assert "EP" not in dense.layout


def test_activations_hold_the_moe_dispatch_buffers():
    from models.hunyuan_image3.memory import activation_bytes, dispatch_buffer_bytes, sequence_tokens

    architecture = _tiny()
    config = _train_config(overrides=["model.image_size=256", "model.text_tokens=10", "model.dtype=bf16",
                                      "model.recompute=true"])
    image, tokens = sequence_tokens(architecture, config)
    assert (image, tokens) == (16 * 16, 16 * 16 + 10 + 6 + 2)
    # One rank (TP = ETP = 1): each token's k = 3 rows of width 64 in bf16. With a tangent: the
    # primal and tangent rows, the packed send and receive buffers; float32 probabilities sent
    # and received, primal and tangent.
    rows = tokens * 3
    assert dispatch_buffer_bytes(architecture, config, tokens, with_tangent=True) == 6 * rows * 64 * 2 + 2 * 2 * 2 * rows * 4
    assert dispatch_buffer_bytes(architecture, config, tokens, with_tangent=False) == 2 * rows * 64 * 2 + 2 * 2 * rows * 4
    total, formula = activation_bytes(architecture, config)
    assert "dispatch" in formula and total > dispatch_buffer_bytes(architecture, config, tokens, with_tangent=True)
    # Expert TP gathers the rows and reduce-scatters their outputs in float32: more buffers.
    sizes = ["model.image_size=256", "model.text_tokens=10"]
    gathered = _train_config(tp=2, etp=2, overrides=sizes)
    local = _train_config(tp=2, etp=1, overrides=sizes)
    extra = dispatch_buffer_bytes(architecture, gathered, tokens, True) - dispatch_buffer_bytes(architecture, local, tokens, True)
    # Each rank's tokens/2 x 3 rows, gathered from both ranks (twice as many), for primal and
    # tangent: the gather's output (bf16) and the combine's float32 input, and the gathered rows'
    # probabilities (float32, in and out) beyond the local rows'.
    sent = tokens / 2 * 3
    assert extra == 2 * (2 * sent) * 64 * (2 + 4) + 2 * 2 * sent * 4


def test_a_layers_saved_activations_are_what_the_estimate_says():
    """One decoder layer in bf16 at one rank (width 256, 8 heads in 2 KV groups, 16 experts top-4
    of width 192 and a shared expert, 512 tokens with an image block): the bytes autograd saves
    for backward, each storage once and the weights left out, against ``layer_saved_bytes``."""
    import torch

    from mfmegatron.parallel import parallel_context
    from models.hunyuan_image3.layer_specs import get_hunyuan_layer_spec
    from models.hunyuan_image3.memory import layer_saved_bytes
    from models.hunyuan_image3.model import DecoderLayer, rope_tables, text_rope_positions

    architecture = _tiny(
        hidden_size=256, num_attention_heads=8, num_query_groups=2, kv_channels=32, num_moe_experts=16,
        moe_router_topk=4, moe_ffn_hidden_size=192, moe_shared_expert_intermediate_size=192,
        params_dtype=torch.bfloat16, bf16=True,
    )
    tokens = 512
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with parallel_context():
        layer = DecoderLayer(architecture, get_hunyuan_layer_spec(), layer_number=1)
        x = torch.randn(tokens, 1, 256, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0),
                        requires_grad=True)
        rope = rope_tables(*text_rope_positions(tokens), 32, architecture.rope_theta)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            layer.forward_jvp(x, None, rope, [(8, tokens - 1)])
        weights = {param.untyped_storage().data_ptr() for param in layer.parameters()}
    measured = sum(size for pointer, size in storages.items() if pointer not in weights)
    estimate = layer_saved_bytes(architecture, _train_config(overrides=["model.dtype=bf16"]), tokens)
    assert 0.85 * measured < estimate < 1.15 * measured, (estimate, measured)


def _planning_family():
    """The registered family once ``models/hunyuan_image3/training.py`` exists; until then these
    functions, as it is to call them (architecture from the recipe's preset)."""
    from mfmegatron.training.family import FAMILIES, get_family
    from models.hunyuan_image3 import memory

    if "hunyuan_image3" in FAMILIES:
        return get_family("hunyuan_image3")
    return SimpleNamespace(
        rank_parameter_counts=lambda config: memory.rank_parameter_counts(memory.preset_architecture(config), config),
        activation_bytes=lambda config: memory.activation_bytes(memory.preset_architecture(config), config),
        no_grad_activation_bytes_per_sample=lambda config, with_tangent: memory.no_grad_activation_bytes_per_sample(
            memory.preset_architecture(config), config, with_tangent),
    )


def _plans(plans) -> dict:
    from mfmegatron.config import load_config
    from mfmegatron.training.config import TrainConfig
    from mfmegatron.training.memory import rank_memory

    family = _planning_family()
    result = {}
    for recipe, gpus, overrides in plans:
        memory = rank_memory(load_config(TrainConfig, RECIPES / recipe, overrides), gpus, family=family)
        result[(recipe, tuple(overrides))] = {"items": memory.by_label(), "total": memory.total}
    return result


@pytest.fixture(scope="module")
def planned() -> dict:
    from mfmegatron.parallel import parallel_context

    plans = []
    for name in HUNYUAN_RECIPES:
        gpus, _, alternatives = _stated(RECIPES / name)
        plans.append((name, gpus, []))
        plans += [(name, gpus, list(overrides)) for overrides in alternatives]
    with parallel_context():
        return _plans(plans)


@pytest.mark.parametrize("name", HUNYUAN_RECIPES)
def test_recipe_memory_comments_are_what_the_count_prints(name, planned):
    from mfmegatron.training.memory import GB

    def printed(count: float) -> str:
        return f"{count / GB:.1f}"

    _, items, alternatives = _stated(RECIPES / name)
    plan = planned[(name, ())]
    expected = {label: printed(count) for label, count in plan["items"].items()}
    expected["total"] = printed(plan["total"])
    assert items == expected
    for overrides, stated in alternatives.items():
        assert stated == printed(planned[(name, overrides)]["total"]), overrides
