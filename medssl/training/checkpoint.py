"""Checkpoints (../shared/DESIGN.md 3.3): weights plus everything needed to use them.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that
`torch.load(weights_only=True)` reads it:
`{"format", "kind", "step", "model", "arch", "preprocessing", "config", "versions", "state"}`
where `model` is the state dict, `arch` the architecture arguments, `preprocessing` the data
settings (spacing, window, crop size, sampling rate ...), and `state` the optimiser, scheduler and
random-generator states needed by `--resume`.
"""

from __future__ import annotations

import pickle
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medssl.atomic import atomic_path
from medssl.errors import UserError

FORMAT = "medssl-checkpoint-v1"
ENCODER_PREFIX = "encoder."  # where a pretraining or classifier model keeps its encoder (`model.encoder`)


class Kind:
    """What a checkpoint holds (its "kind"): one name per producer, shared by producers and readers."""

    PRETRAIN_VOLUME = "pretrain-volume"  # the volume pretraining model (encoder under ENCODER_PREFIX)
    VOLUME_ENCODER = "volume-encoder"  # an exported encoder, MONAI key names
    VOLUME_NETWORK = "volume-network"  # an exported whole segmentation network (encoder + decoder), MONAI key names
    PRETRAIN_TIMESERIES = "pretrain-timeseries"  # the signal pretraining model (encoder under ENCODER_PREFIX)
    TIMESERIES_ENCODER = "timeseries-encoder"  # an exported signal encoder (its own key names)
    FINETUNE_SEG = "finetune-seg"
    FINETUNE_TIMESERIES = "finetune-timeseries"
    GROUNDING = "grounding"  # a grounding training run (--resume)
    GROUNDING_MODEL = "grounding-model"  # a trained grounding model with its calibrated threshold (ground infer)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the weights and preprocessing."""
    import monai
    import numpy

    import medssl

    versions = {"medssl": medssl.__version__, "torch": torch.__version__, "monai": monai.__version__,
                "numpy": numpy.__version__, "python": platform.python_version()}
    return {name: str(version) for name, version in versions.items()}  # TorchVersion is not weights_only-safe


def save_checkpoint(path: str | Path, *, kind: str, step: int, model: dict[str, torch.Tensor], arch: dict,
                    preprocessing: dict, config: dict, state: dict | None = None, extra: dict | None = None) -> None:
    """Atomically write a checkpoint; tensors are moved to the CPU. `extra`: more top-level keys (plain data)."""
    payload = {**(extra or {}), "format": FORMAT, "kind": kind, "step": int(step), "model": _to_cpu(model),
               "arch": arch, "preprocessing": preprocessing, "config": config, "versions": library_versions(),
               "state": _to_cpu(state or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, *, kind: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`; a missing, corrupt or foreign file, or one of another kind
    than `kind` (one kind or a tuple of accepted kinds), is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as err:
        empty = path.stat().st_size == 0
        raise UserError(f"{path}: not a readable checkpoint ({'empty file' if empty else 'corrupt or truncated'}"
                        f": {type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a medssl checkpoint (no '{FORMAT}' format tag)")
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and payload["kind"] not in kinds:
        expected = " or ".join(f"'{k}'" for k in kinds)
        raise UserError(f"{path}: checkpoint is a '{payload['kind']}' checkpoint, expected {expected}")
    return payload


def with_prefix(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries whose key starts with `prefix`, without it (e.g. the encoder of a whole model)."""
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
# top-level architecture entries and the config keys they come from (the rest are named as stored)
ARCH_CONFIG_KEYS = {"encoder": "model", "feature_stride": "views.feature_stride",
                    "network_out_channels": "model.in_channels"}


def arch_differences(theirs: dict[str, Any], ours: dict[str, Any], *, prefix: str | None = None,
                     config: dict[str, Any] | None = None, limit: int = 4) -> str:
    """The fields in which a checkpoint's architecture `theirs` differs from `ours`, each with both values, for a
    one-line message: "model.width: 8 in the checkpoint, 16 in the config; ...". Fields are named by their config
    keys: `prefix` + field when the architecture is one config section (e.g. "model"), else through
    ARCH_CONFIG_KEYS, or as "model.<key>" when the config's model section has that key; long values (a fitted
    tokenizer) are described, not printed; after `limit` fields, how many more."""
    def leaves(tree: Any, path: str) -> dict[str, Any]:
        if isinstance(tree, dict) and (tree or not path):  # an empty section is a value, an empty whole is nothing
            return {k: v for key, sub in tree.items() for k, v in leaves(sub, f"{path}.{key}" if path else key).items()}
        return {path: tree}

    def name(path: str) -> str:
        if prefix:
            return f"{prefix}.{path}"
        top, dot, rest = path.partition(".")
        if top in ARCH_CONFIG_KEYS:
            return ARCH_CONFIG_KEYS[top] + dot + rest
        return f"model.{path}" if top in ((config or {}).get("model") or {}) else path

    def show(value: Any) -> str:
        text = repr(value)
        if len(text) <= 40:
            return text
        unit = "characters" if isinstance(value, str) else "items"
        return f"<a {type(value).__name__} of {len(value)} {unit}>" if hasattr(value, "__len__") else text[:37] + "..."

    mine, stored = leaves(ours, ""), leaves(theirs, "")
    absent = object()
    differing = [path for path in sorted(set(mine) | set(stored)) if mine.get(path, absent) != stored.get(path, absent)]
    parts = [f"{name(path)}: {show(stored[path]) if path in stored else '(absent)'} in the checkpoint, "
             f"{show(mine[path]) if path in mine else '(absent)'} in the config" for path in differing[:limit]]
    more = f"; and {len(differing) - limit} more field(s)" if len(differing) > limit else ""
    return "; ".join(parts) + more


@dataclass
class LoadReport:
    """What happened when weights were put into a module."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the module, not in the weights
    unexpected: list[str] = field(default_factory=list)  # in the weights, not in the module
    mismatched: list[str] = field(default_factory=list)  # same name, other shape

    @property
    def fraction(self) -> float:
        """Share of the module's parameters and buffers that were loaded."""
        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        return len(self.loaded) / total if total else 0.0

    def __str__(self) -> str:
        return (f"loaded {len(self.loaded)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
                f"shape-mismatched {len(self.mismatched)} ({self.fraction:.0%} of the module)")


def load_weights(module: nn.Module, weights: dict[str, torch.Tensor], *, min_fraction: float = 1.0,
                 source: str = "weights") -> LoadReport:
    """Copy every matching tensor of `weights` into `module`; never a silent partial load.

    Raises UserError (naming `source`, and the first missing keys) when fewer than `min_fraction`
    of the module's tensors load. The module is only modified when the load is accepted.
    """
    own = module.state_dict()
    report = LoadReport()
    for name, tensor in own.items():
        if name not in weights:
            report.missing.append(name)
        elif weights[name].shape != tensor.shape:
            report.mismatched.append(name)
        else:
            report.loaded.append(name)
    report.unexpected = [name for name in weights if name not in own]
    if report.fraction < min_fraction:
        first = ", ".join((report.missing + report.mismatched)[:5])
        raise UserError(f"{source}: only {report.fraction:.0%} of the network's tensors load, "
                        f"{min_fraction:.0%} required ({report}; e.g. {first})")
    module.load_state_dict({name: weights[name] for name in report.loaded}, strict=False)
    return report


def _to_cpu(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree
