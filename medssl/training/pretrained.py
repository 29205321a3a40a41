"""Pretrained 3D encoders and networks in checkpoints (../shared/DESIGN.md 3.3): export and load.

`export_encoder` writes kind "volume-encoder" with the encoder's
state dict; `export_network` writes kind "volume-network" with the whole network's (a pretraining with a
whole-network objective, e.g. masked reconstruction). `load_pretrained` loads the encoder part or the
whole network (all but an output layer of another shape) from either, and from kind "pretrain-volume",
the pretraining task's full checkpoint, by this convention: the pretraining model keeps its
`VolumeEncoder` as attribute `encoder` (so its encoder weights are the keys starting with "encoder."),
its whole network, when it has one, as attribute `network` (keys "network."), and its checkpoint `arch`
is either the `VolumeEncoderConfig` dump itself or a dict whose "encoder" entry is that dump.
Weights saved from a DDP-wrapped model (every key starting with "module.") are accepted: the
prefix is stripped. Every load reports loaded / missing / unexpected / shape-mismatched keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from torch import nn

from medssl.errors import UserError
from medssl.models.volume_encoders import (BACKBONES, VolumeEncoder, VolumeEncoderConfig, encoder_state,
                                          network_encoder)
from medssl.training.checkpoint import (
    ENCODER_PREFIX,
    Kind,
    LoadReport,
    arch_differences,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    with_prefix,
)

NETWORK_PREFIX = "network."  # attribute name of the whole network there (whole-network objectives)
DDP_PREFIX = "module."


def export_encoder(path: str | Path, encoder: VolumeEncoder, cfg: VolumeEncoderConfig, preprocessing: dict,
                   config: dict, step: int) -> None:
    """Atomically write a "volume-encoder" checkpoint: weights, `arch` = cfg, preprocessing, config, and `monai`
    (`monai_network_spec`: the MONAI class and constructor arguments, for loading without medssl)."""
    if cfg != encoder.cfg:
        raise ValueError(f"export_encoder: cfg {cfg} is not the encoder's {encoder.cfg}")
    save_checkpoint(path, kind=Kind.VOLUME_ENCODER, step=step, model=encoder_state(encoder),
                    arch=cfg.model_dump(mode="json"), preprocessing=preprocessing, config=config,
                    extra={"monai": monai_network_spec(cfg, 1)})


def export_network(path: str | Path, network: nn.Module, cfg: VolumeEncoderConfig, out_channels: int,
                   preprocessing: dict, config: dict, step: int) -> None:
    """Atomically write a "volume-network" checkpoint: the whole MONAI network of
    `build_segmentation_network(cfg, out_channels)` with its own key names; `arch` = {"encoder": cfg,
    "out_channels": out_channels}."""
    if not isinstance(network, BACKBONES[cfg.name].network_class):
        raise ValueError(f"export_network: a {type(network).__name__} is not the network of {cfg.name}")
    save_checkpoint(path, kind=Kind.VOLUME_NETWORK, step=step, model=network.state_dict(),
                    arch={"encoder": cfg.model_dump(mode="json"), "out_channels": int(out_channels)},
                    preprocessing=preprocessing, config=config, extra={"monai": monai_network_spec(cfg, out_channels)})


def monai_network_spec(cfg: VolumeEncoderConfig, out_channels: int) -> dict[str, Any]:
    """{"class": "monai.networks.nets.<Name>", "kwargs": {...}}: the MONAI network whose (encoder) weights an
    exported file holds; `out_channels` is the caller's choice for an encoder-only file (1 stored)."""
    backbone = BACKBONES[cfg.name]
    return {"class": f"monai.networks.nets.{backbone.network_class.__name__}",
            "kwargs": backbone.monai_arguments(cfg, out_channels)}


@dataclass
class EncoderLoadReport(LoadReport):
    """A LoadReport over the tensors that were meant to load (the encoder's, or the whole network's), plus
    what the checkpoint says about its data. `parts`: "encoder" or "network"; `encoder_fraction`: share of
    the encoder's tensors loaded; `output_left`: output-layer tensors left at their initialisation because
    their shape differs (another number of classes)."""

    kind: str = ""
    step: int = 0
    preprocessing: dict = field(default_factory=dict)
    parts: str = "encoder"
    encoder_fraction: float = 0.0
    output_left: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"{self.parts}: {super().__str__()}"
        return text + (f"; output layer left random ({', '.join(self.output_left)})" if self.output_left else "")


PretrainedParts = Literal["auto", "encoder", "network"]


def read_encoder_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint that holds a volume encoder ("volume-encoder", "volume-network" or "pretrain-volume"); any
    other kind is a UserError naming the file."""
    payload = load_checkpoint(path)
    if payload["kind"] not in (Kind.VOLUME_ENCODER, Kind.VOLUME_NETWORK, Kind.PRETRAIN_VOLUME):
        raise UserError(f"{path}: a '{payload['kind']}' checkpoint holds no volume encoder (expected "
                        f"'{Kind.VOLUME_ENCODER}', '{Kind.VOLUME_NETWORK}' or '{Kind.PRETRAIN_VOLUME}')")
    return payload


def load_pretrained(network: nn.Module, checkpoint_path: str | Path, *, arch: VolumeEncoderConfig,
                    parts: PretrainedParts = "auto", min_fraction: float = 1.0,
                    field_name: str = "pretrained_parts") -> EncoderLoadReport:
    """Load a pretrained checkpoint into `network`, the MONAI network of `build_segmentation_network(arch, K)`.

    parts "encoder": the encoder's tensors only, from any of the three kinds ("volume-encoder",
    "volume-network", "pretrain-volume"), as `load_pretrained_encoder`; "network": every tensor of the
    network from a whole-network checkpoint ("volume-network", or "pretrain-volume" of a pretraining with
    a whole-network objective, whose network weights start with "network."), except output-layer tensors of
    another shape (they stay as initialised and are listed); "auto": the network when the checkpoint holds
    one, else the encoder. Fewer than `min_fraction` of the tensors meant to load (the encoder's; the
    network's outside the output layer) is a UserError that leaves `network` unchanged; so is asking for the
    network from an encoder-only checkpoint (the message names `field_name`).
    """
    source = str(checkpoint_path)
    payload = read_encoder_checkpoint(checkpoint_path)
    kind = payload["kind"]
    stored = _stored_arch(payload["arch"], kind, source)
    if stored != arch:
        raise UserError(f"{source}: the checkpoint's encoder differs from the config's: " + arch_differences(
            stored.model_dump(mode="json"), arch.model_dump(mode="json"), prefix="model"))
    weights = _strip_prefix(payload["model"], DDP_PREFIX)
    whole: dict[str, torch.Tensor] | None = weights if kind == Kind.VOLUME_NETWORK else None
    if kind == Kind.PRETRAIN_VOLUME:
        whole = with_prefix(weights, NETWORK_PREFIX) or None
        weights = with_prefix(weights, ENCODER_PREFIX)
    if parts == "network" and whole is None:
        raise UserError(f"{field_name}: 'network' asks for the whole network, but {source} is a '{kind}' "
                        "checkpoint with the encoder only (use the network.pt of a whole-network pretraining)")
    encoder = network if isinstance(network, VolumeEncoder) else network_encoder(network, arch)
    extra = {"kind": kind, "step": payload["step"], "preprocessing": payload["preprocessing"]}
    if whole is None or parts == "encoder":
        report = load_weights(encoder, weights, min_fraction=min_fraction, source=source)
        return EncoderLoadReport(**vars(report), **extra, parts="encoder", encoder_fraction=report.fraction)
    return _load_network(network, whole, BACKBONES[arch.name].output_parts, set(encoder.state_dict()),
                         min_fraction=min_fraction, source=source, extra=extra)


def load_pretrained_encoder(network: nn.Module, checkpoint_path: str | Path, *, arch: VolumeEncoderConfig,
                            min_fraction: float = 1.0) -> EncoderLoadReport:
    """Load the encoder part of a "volume-encoder", "volume-network" or "pretrain-volume" checkpoint into
    `network` (the MONAI network of `build_segmentation_network(arch, ...)`, or a VolumeEncoder).

    Only encoder tensors count: the fraction is over the encoder's keys, the decoder stays as it
    is. A checkpoint of another architecture, or fewer than `min_fraction` of the encoder's tensors
    loading, is a UserError and leaves `network` unchanged.
    """
    return load_pretrained(network, checkpoint_path, arch=arch, parts="encoder", min_fraction=min_fraction)


def _load_network(network: nn.Module, weights: dict[str, torch.Tensor], output_parts: tuple[str, ...],
                  encoder_keys: set[str], *, min_fraction: float, source: str, extra: dict) -> EncoderLoadReport:
    """Every tensor outside the output layer must load (`min_fraction` of them); output-layer tensors load
    where their shape matches. Views that share the network's children keep the key names."""
    body, head = nn.Module(), nn.Module()
    for name, child in network.named_children():
        (head if name in output_parts else body).add_module(name, child)
    is_head = {k: k.split(".", 1)[0] in output_parts for k in weights}
    report = load_weights(body, {k: v for k, v in weights.items() if not is_head[k]}, min_fraction=min_fraction,
                          source=source)
    top = load_weights(head, {k: v for k, v in weights.items() if is_head[k]}, min_fraction=0.0, source=source)
    loaded = set(report.loaded + top.loaded)
    return EncoderLoadReport(loaded=report.loaded + top.loaded, missing=report.missing + top.missing,
                             unexpected=report.unexpected + top.unexpected,
                             mismatched=report.mismatched + top.mismatched, **extra, parts="network",
                             encoder_fraction=len(encoder_keys & loaded) / max(1, len(encoder_keys)),
                             output_left=top.missing + top.mismatched)


def _stored_arch(arch: Any, kind: str, source: str) -> VolumeEncoderConfig:
    if kind in (Kind.PRETRAIN_VOLUME, Kind.VOLUME_NETWORK) and isinstance(arch, dict) and isinstance(
            arch.get("encoder"), dict):
        arch = arch["encoder"]
    try:
        return VolumeEncoderConfig.model_validate(arch)
    except ValidationError as err:
        raise UserError(f"{source}: checkpoint arch {arch!r} is not a volume encoder "
                        f"({err.error_count()} validation errors)") from None


def _strip_prefix(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove `prefix` when every key has it (a state dict saved from a DDP-wrapped model)."""
    if weights and all(k.startswith(prefix) for k in weights):
        return {k[len(prefix):]: v for k, v in weights.items()}
    return weights
