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


def test_under_torchrun_rank_0_reports_a_user_error_at_once_and_the_others_after_a_wait(monkeypatch, capsys):
    # torchrun stops every rank when one exits with an error: the ranks that do not print must
    # not exit before rank 0 has printed.
    from mfmegatron import config as config_module

    sleeps = []
    monkeypatch.setattr(config_module.time, "sleep", sleeps.append)
    monkeypatch.setenv("RANK", "0")
    assert config_module.report_user_error("prog", ValueError("bad key")) == 2
    assert capsys.readouterr().err == "prog: error: bad key\n" and sleeps == []
    monkeypatch.setenv("RANK", "1")
    assert config_module.report_user_error("prog", ValueError("only mine")) == 2
    assert sleeps == [config_module.USER_ERROR_WAIT_SECONDS] and sleeps[0] >= 10
    # Still running after the wait: rank 0 did not meet the error, so this rank says it.
    assert capsys.readouterr().err == "prog: error: (rank 1) only mine\n"
