"""Every shipped recipe is a valid TrainConfig and the Slurm launchers are valid bash."""

import subprocess
from pathlib import Path

import pytest

from mfmegatron.config import load_config
from mfmegatron.parallel import validate_parallel_sizes, ParallelConfig
from mfmegatron.training.config import TrainConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
GPUS = {"flux_dev_8xh100.yaml": 8, "flux_dev_64xh100.yaml": 64, "flux_tiny_cpu.yaml": 2,
        "shapes_teacher_cpu.yaml": 2, "shapes_distill_cpu.yaml": 2, "hunyuan_image3_64xh100.yaml": 64,
        "hunyuan_image3_256xh100.yaml": 256, "hunyuan_image3_64xh200.yaml": 64,
        "hunyuan_image3_tiny_cpu.yaml": 2, "shapes_hunyuan_image3_teacher_cpu.yaml": 2,
        "shapes_hunyuan_image3_distill_cpu.yaml": 2}


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipe_loads_and_fits_its_world(recipe):
    config = load_config(TrainConfig, RECIPES / recipe)
    parallel = config.parallel
    layout = ParallelConfig(
        tensor_parallel_size=parallel.tensor_parallel_size,
        pipeline_parallel_size=parallel.pipeline_parallel_size,
        expert_parallel_size=parallel.expert_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
    )
    assert validate_parallel_sizes(layout, GPUS[recipe]) >= 1


@pytest.mark.parametrize("launcher", sorted(p.name for p in (RECIPES / "slurm").glob("*.sbatch")))
def test_slurm_launcher_is_valid_bash(launcher):
    subprocess.run(["bash", "-n", str(RECIPES / "slurm" / launcher)], check=True)


def _forward_counts(recipe: str) -> list[dict]:
    from tools.count_forwards import count_forwards

    return count_forwards(recipe, steps=3)


def test_forward_counts_of_a_recipe_match_the_arithmetic():
    # The instrumented count of network forwards per sample (tools/count_forwards) against the
    # formula, for the 8xH100 recipe's objective: the discrete target solves only r < t rows,
    # one student rollout serves the generator term and the fake network's update.
    from mfmegatron.parallel import run_on_ranks

    results = run_on_ranks(_forward_counts, 1, str(RECIPES / "flux_dev_8xh100.yaml"), timeout=600)[0]
    assert [r["regime"] for r in results] == ["warm-up (discrete target)", "differential target",
                                              "differential + alignment"]
    for result in results:
        for network in ("teacher", "student", "fake"):
            assert result["counted"][network] == pytest.approx(result["expected"][network]), (result, network)
    warmup, differential, aligned = results
    assert warmup["moving_fraction"] > 0 and warmup["counted"]["teacher"] < 4 + 1 + 2 * 4 - 1
    assert aligned["counted"]["student"] == 4 + 2 + 3 and aligned["counted"]["fake"] == 1 + 3
