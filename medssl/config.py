"""YAML configs with dotted `key=value` overrides, validated into typed pydantic objects.

Every training config has `data.manifest`, `train.steps`, `train.batch_size` and `train.seed`
(`data` sections are defined with the preprocessing they carry, in `medssl.data.preprocessing`).
Unknown keys and wrong types are user errors that name the dotted key.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
)

from medssl.errors import UserError, one_line, validation_message


class StrictModel(BaseModel):
    """A config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainConfig(StrictModel):
    """The shared optimisation settings."""

    steps: PositiveInt
    batch_size: PositiveInt
    seed: NonNegativeInt = 0
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.05
    warmup_steps: NonNegativeInt = 0
    grad_accum: PositiveInt = 1
    amp: bool = True  # bf16 autocast on GPU; ignored on CPU
    clip_grad: PositiveFloat | None = 1.0
    log_every: PositiveInt = 10
    checkpoint_every: PositiveInt = 100
    num_workers: NonNegativeInt = 2  # DataLoader processes drawing micro-batches ahead of the step (0: in this one)


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn `["train.steps=20", "model.width=16"]` into `{"train.steps": 20, "model.width": 16}`.

    Values are parsed as YAML, so `20` is an int, `[1, 2]` a list and `null` is None.
    """
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override {item!r}: expected key=value with a dotted key, e.g. train.steps=20")
        try:
            parsed[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise UserError(f"override {key}: value {raw!r} is not valid YAML ({one_line(err)})") from None
    return parsed


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `tree` with each dotted key set; missing sections are created (and then
    rejected by validation if the schema does not know them)."""
    tree = _deep_copy(tree)
    for dotted, value in overrides.items():
        node = tree
        parts = dotted.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {dotted}: {'.'.join(parts[:depth + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return tree


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, bad YAML or a non-mapping is a UserError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read config ({type(err).__name__})") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid YAML ({one_line(err)})") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a config must be a YAML mapping, got {type(tree).__name__}")
    return tree


def validate_config(tree: dict[str, Any], schema: type[ConfigT], *, source: str = "config") -> ConfigT:
    """Validate a nested dict into `schema`; errors name every offending dotted key on one line."""
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise UserError(f"{source}: {validation_message(err)}") from None


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    """Names of the configs installed with medssl (`-c NAME`, `medssl config show NAME`)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def resolve_config(path: str | os.PathLike) -> Path:
    """`path` if it exists, else the shipped config it names: `pretrain_volume`, `pretrain_volume.yaml` or
    `configs/pretrain_volume.yaml` (run from any folder). An unknown name is a UserError listing the shipped
    configs."""
    path = Path(path)
    if path.exists() or (len(path.parts) > 1 and path.parent.name != "configs"):
        return path
    shipped = SHIPPED_CONFIGS / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.suffix in ("", ".yaml") and shipped.is_file():
        return shipped
    raise UserError(f"{path}: config file not found, and not the name of a shipped config "
                    f"({', '.join(shipped_configs())}; `medssl config show NAME` prints one)")


def load_config(path: str | os.PathLike, schema: type[ConfigT] | str, overrides: list[str] | None = None) -> ConfigT:
    """Read the YAML at `path` (or the shipped config it names, `resolve_config`), apply `key=value`
    overrides, validate into `schema`: a class, or "module:Class", imported only once the file and the
    overrides have been read (the CLI's commands: a missing file or a malformed override is refused before
    the task's modules, and torch, are imported)."""
    path = resolve_config(path)
    tree = apply_overrides(read_yaml(path), parse_overrides(overrides or []))
    if isinstance(schema, str):
        module, _, name = schema.partition(":")
        schema = getattr(importlib.import_module(module), name)
    return validate_config(tree, schema, source=str(path))


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML (paths as strings, tuples as lists)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)




def _deep_copy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}
