"""The per-rank memory count (``mfmegatron/training/memory.py``): its parameter counts against the
networks the trainer really builds (TP=2, LoRA fake), the EMA's share when sharded, and every
figure the FLUX.1-dev recipes quote against what it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mfmegatron.parallel import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
PLANNED_RECIPES = ["flux_dev_8xh100.yaml", "flux_dev_64xh100.yaml"]
# "#   student EMA    6.0 GB   ..." (an item of the breakdown) and
# "#   alignment.fake_network=full optim.ema_sharding=replicated: 79.1 GB (...)" (an alternative).
ITEM = re.compile(r"^#\s+(?P<label>[a-zA-Z][^:=]*?)\s+(?P<gb>\d+\.\d) GB\b")
ALTERNATIVE = re.compile(r"^#\s+(?P<overrides>(?:[\w.]+=\S+\s*)+):\s+(?P<gb>\d+\.\d) GB\b")


def _stated(recipe: Path) -> tuple[int, dict[str, str], dict[tuple[str, ...], str]]:
    """The recipe comment's GPU count, breakdown (label -> GB as written) and alternatives."""
    text = recipe.read_text()
    gpus = re.search(rf"tools\.memory_plan recipes/{recipe.name} --gpus (\d+)", text)
    assert gpus, f"{recipe.name} does not quote `python -m tools.memory_plan` for its figures"
    items, alternatives = {}, {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if match := ALTERNATIVE.match(line):
            alternatives[tuple(match["overrides"].split())] = match["gb"]
        elif match := ITEM.match(line):
            items[match["label"]] = match["gb"]
    return int(gpus[1]), items, alternatives


def _counts_and_plans(plans: list[tuple[str, int, list[str]]]) -> dict:
    import torch

    from mfmegatron.config import load_config
    from mfmegatron.parallel import initialize_parallel
    from mfmegatron.training.config import TrainConfig
    from mfmegatron.training.family import get_family
    from mfmegatron.training.memory import rank_memory

    # The networks the trainer builds at TP=2 (tiny FLUX, LoRA fake network of rank 4).
    initialize_parallel(tensor_parallel_size=2)
    config = load_config(TrainConfig, RECIPES / "flux_tiny_cpu.yaml",
                         ["alignment.fake_network=lora", "alignment.lora_rank=4"])
    family = get_family("flux")
    networks = family.build_networks(config, torch.device("cpu"), with_fake=True)
    real = {
        "teacher": sum(p.numel() for p in networks.teacher.parameters()),
        "student": sum(p.numel() for p in networks.student.parameters()),
        "lora": sum(p.numel() for p in networks.fake.parameters() if p.requires_grad),
    }
    counted = family.rank_parameter_counts(config)  # rebuilds the groups at TP=1 (meta device)
    result = {"real": real, "counted": counted, "plans": {}}
    for recipe, gpus, overrides in plans:
        memory = rank_memory(load_config(TrainConfig, RECIPES / recipe, overrides), gpus)
        result["plans"][(recipe, tuple(overrides))] = {"items": memory.by_label(), "total": memory.total}
    return result


@pytest.fixture(scope="module")
def computed() -> dict:
    plans = []
    for name in PLANNED_RECIPES:
        gpus, _, alternatives = _stated(RECIPES / name)
        plans.append((name, gpus, []))
        plans += [(name, gpus, list(overrides)) for overrides in alternatives]
    for sharding in ("replicated", "data_parallel"):
        plans.append(("flux_dev_8xh100.yaml", 8, [f"optim.ema_sharding={sharding}"]))
    return run_on_ranks(_counts_and_plans, 2, plans)[0]


def test_parameter_counts_match_the_networks_the_trainer_builds(computed):
    for network in ("teacher", "student", "lora"):
        assert computed["counted"][network] == computed["real"][network], network


def test_a_sharded_ema_takes_one_data_parallel_share(computed):
    plans = computed["plans"]
    replicated = plans[("flux_dev_8xh100.yaml", ("optim.ema_sharding=replicated",))]["items"]["student EMA"]
    sharded = plans[("flux_dev_8xh100.yaml", ("optim.ema_sharding=data_parallel",))]["items"]["student EMA"]
    assert sharded * 2 == pytest.approx(replicated)  # DP=2
    # 4 bytes per student parameter a rank holds (FLUX.1-dev at TP=4: 3.02e9).
    assert replicated == pytest.approx(4 * 3.02e9, rel=1e-3)


@pytest.mark.parametrize("name", PLANNED_RECIPES)
def test_recipe_memory_comments_are_what_the_count_prints(name, computed):
    from mfmegatron.training.memory import GB

    def printed(count: float) -> str:
        return f"{count / GB:.1f}"

    _, items, alternatives = _stated(RECIPES / name)
    plan = computed["plans"][(name, ())]
    expected = {label: printed(count) for label, count in plan["items"].items()}
    expected["total"] = printed(plan["total"])
    assert items == expected
    for overrides, stated in alternatives.items():
        assert stated == printed(computed["plans"][(name, overrides)]["total"]), overrides


def test_memory_plan_prints_the_recipe_breakdown():
    result = subprocess.run(
        [sys.executable, "-m", "tools.memory_plan", "recipes/flux_dev_8xh100.yaml", "--gpus", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    )
    lines = [line.strip() for line in result.stdout.splitlines()]
    quoted = [line.lstrip("#").strip() for line in (RECIPES / "flux_dev_8xh100.yaml").read_text().splitlines()]
    # Every line of the breakdown appears in the recipe as printed.
    breakdown = lines[1:-1]
    assert breakdown and all(line in quoted for line in breakdown), breakdown
    assert lines[-1].endswith("to spare")
