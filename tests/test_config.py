"""YAML recipes with dotted overrides: unknown keys and bad values are one clear error."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from mfmegatron.config import ConfigError, load_config


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    schedule: Literal["constant", "cosine"] = "constant"


@dataclass
class Train:
    steps: int = 10
    name: str | None = None
    optim: Optim = field(default_factory=Optim)


def test_file_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 5\noptim:\n  lr: 3e-4\n  betas: [0.8, 0.9]\n")
    config = load_config(Train, recipe, ["optim.schedule=cosine", "name=run1", "optim.lr=1"])
    assert config.steps == 5 and config.name == "run1"
    assert config.optim == Optim(lr=1.0, betas=(0.8, 0.9), schedule="cosine")
    # YAML reads 1e-3 (no dot) as a string; a float field takes it as the number.
    assert load_config(Train, None, ["optim.lr=1e-3"]).optim.lr == 1e-3


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(did you mean optim.lr\?\)"):
        load_config(Train, None, ["optim.lrr=1e-3"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stepz: 5\n")
    with pytest.raises(ConfigError, match=r"'stepz' \(did you mean steps\?\)"):
        load_config(Train, recipe)


def test_bad_values_and_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="optim.lr: expected a number"):
        load_config(Train, None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        load_config(Train, None, ["steps=ten"])
    with pytest.raises(ConfigError, match=r"optim.schedule: 'linear' is not one of"):
        load_config(Train, None, ["optim.schedule=linear"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Train, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Train, None, ["steps"])
