"""Every shipped recipe is a valid TrainConfig and the Slurm launchers are valid bash."""

import subprocess
from pathlib import Path

import pytest

from mfmegatron.config import load_config
from mfmegatron.parallel import validate_parallel_sizes, ParallelConfig
from mfmegatron.training.config import TrainConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
GPUS = {"flux_dev_8xh100.yaml": 8, "flux_dev_64xh100.yaml": 64, "flux_tiny_cpu.yaml": 2}


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipe_loads_and_fits_its_world(recipe):
    config = load_config(TrainConfig, RECIPES / recipe)
    parallel = config.parallel
    layout = ParallelConfig(
        tensor_parallel_size=parallel.tensor_parallel_size,
        pipeline_parallel_size=parallel.pipeline_parallel_size,
    )
    assert validate_parallel_sizes(layout, GPUS[recipe]) >= 1


@pytest.mark.parametrize("launcher", sorted(p.name for p in (RECIPES / "slurm").glob("*.sbatch")))
def test_slurm_launcher_is_valid_bash(launcher):
    subprocess.run(["bash", "-n", str(RECIPES / "slurm" / launcher)], check=True)
