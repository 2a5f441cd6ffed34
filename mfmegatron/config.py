"""Dataclass configs loaded from YAML with dotted ``key=value`` overrides.

    config = load_config(TrainConfig, "recipes/flux_tiny_cpu.yaml", ["optim.lr=1e-4", "train.steps=10"])

Every key must name a field: an unknown key (in the file or an override) raises ``ConfigError``
naming the full dotted key and the nearest valid one. Values are parsed as YAML scalars
(``1e-4``, ``true``, ``[2, 2]``) and checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that does not fit the config: one line saying which key and why."""


USER_ERROR_WAIT_SECONDS = 30.0
"""How long a rank other than 0 waits before exiting on a user error (see ``report_user_error``)."""


def report_user_error(prog: str, error: BaseException, exit_code: int = 2) -> int:
    """A command's one-line error under torchrun, where every rank usually meets the same error:
    rank 0 prints it; the others wait before exiting, because torchrun stops every rank as soon
    as one exits with an error, which could otherwise be before rank 0 has printed. torchrun ends
    the waiting ranks once rank 0 exits; a rank still running after the wait met an error of its
    own, and prints it."""
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        time.sleep(USER_ERROR_WAIT_SECONDS)
    print(f"{prog}: error: {'' if rank == 0 else f'(rank {rank}) '}{error}", file=sys.stderr, flush=True)
    return exit_code


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(path: str, key: str, valid: list[str]) -> ConfigError:
    dotted = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" (did you mean {f'{path}.' if path else ''}{close[0]}?)" if close else ""
    choices = ", ".join(sorted(valid))
    return ConfigError(f"unknown config key {dotted!r}{hint}; valid keys here: {choices}")


def _coerce(value: Any, annotation: Any, dotted: str) -> Any:
    """Check (and gently convert) a YAML value for a field of type ``annotation``."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, dotted)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{dotted}: invalid value {value!r}")
    if origin is typing.Literal:
        if isinstance(value, bool):
            # YAML 1.1 reads off / on / no / yes as booleans: back to the word the field takes.
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((w for w in words if w in typing.get_args(annotation)), value)
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{dotted}: {value!r} is not one of {list(typing.get_args(annotation))}")
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted}: expected a mapping, got {value!r}")
        return _build(annotation, value, dotted)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{dotted}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{dotted}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{dotted}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{dotted}: expected a number, got {value!r}")
        return float(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted}: expected true/false, got {value!r}")
        return value
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{dotted}: expected an integer, got {value!r}")
    if annotation is str and not isinstance(value, str):
        raise ConfigError(f"{dotted}: expected a string, got {value!r}")
    return value


def _build(cls: type[T], values: dict, path: str = "") -> T:
    types_by_name = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_by_name:
            raise _unknown_key(path, key, list(types_by_name))
        dotted = f"{path}.{key}" if path else key
        kwargs[key] = _coerce(value, types_by_name[key], dotted)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{path or cls.__name__}: {error}") from error


def to_dict(config: Any) -> dict:
    """The config as plain data (what is saved next to checkpoints and logs)."""
    return dataclasses.asdict(config)


def apply_override(values: dict, override: str) -> None:
    """``a.b.c=value`` into the nested dict (created as needed)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple = ()) -> T:
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"recipe {str(path)!r} must be a mapping at the top level")
        values = loaded or {}
    for override in overrides:
        apply_override(values, override)
    return _build(cls, values)
