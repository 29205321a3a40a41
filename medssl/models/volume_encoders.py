"""3D encoders that are exactly the encoder half of a MONAI segmentation network.

Each `VolumeEncoder` holds the encoder submodules of its MONAI network under the SAME attribute
names, so `encoder.state_dict()` keys are a subset of the network's keys and pretrained weights go
into the network without renaming:

| `name`      | MONAI network | encoder submodules (= key prefixes) | strides                  |
|-------------|---------------|-------------------------------------|--------------------------|
| `basicunet` | BasicUNet     | conv_0, down_1 .. down_4            | 1, 2, 4, 8, 16           |
| `segresnet` | SegResNet     | convInit, down_layers               | 1, 2, 4, ... (per stage) |
| `swinunetr` | SwinUNETR     | swinViT, encoder1 .. encoder4       | 1, 2, 4, 8, 16, 32       |

For SwinUNETR the encoder is the Swin-ViT plus the residual skip blocks `encoder1..4` that
SwinUNETR applies to the input and to Swin hidden states 0-2 (so its finest map has stride 1 like
the CNNs'). `encoder10`, the block on the stride-32 state, belongs to the decoder side (MONAI's
forward calls its output `dec4`): its instance norm fails on the 1x1x1 map of a 32^3 input, in
training and inference alike, so the full SwinUNETR (and a sliding-window ROI) needs sizes of at
least 64, while this encoder works from 32.
The decoders (`decoder1..5`, `out`; `upcat_*`, `final_conv`; `up_layers`, `up_samples`,
`conv_final`) are never part of an encoder.

Checkpoints (DESIGN.md 3.3): `export_encoder` writes kind "volume-encoder" with the encoder's
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

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from monai.networks.nets import BasicUNet, SegResNet, SwinUNETR
from pydantic import PositiveInt, ValidationError, field_validator, model_validator
from torch import nn

from medssl.config import StrictModel
from medssl.errors import UserError
from medssl.training.checkpoint import (Kind, LoadReport, arch_differences, load_checkpoint, load_weights,
                                       save_checkpoint)

PRETRAIN_PREFIX = "encoder."  # attribute name of the encoder in the pretraining model
NETWORK_PREFIX = "network."  # attribute name of the whole network there (whole-network objectives)
DDP_PREFIX = "module."


class VolumeEncoderConfig(StrictModel):
    """Which MONAI backbone and how big. Defaults are tiny (CPU).

    `width` is the first stage's channels (BasicUNet features[0], SegResNet init_filters,
    SwinUNETR feature_size); later stages double it. Left unset it is the backbone's default width
    (8, or 12 for swinunetr: MONAI requires a multiple of 12 there). Each backbone checks the rest
    (`VolumeEncoder.check_config`).
    """

    name: str = "basicunet"
    in_channels: PositiveInt = 1
    width: PositiveInt = 8
    segresnet_blocks: tuple[PositiveInt, ...] = (1, 2, 2, 4)  # residual blocks per stage (SegResNet blocks_down)
    swin_depths: tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt] = (1, 1, 1, 1)
    swin_heads: tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt] = (3, 6, 12, 24)
    swin_window: PositiveInt = 4  # MONAI's default 7 pads power-of-2 grids: ~5x slower on CPU

    @model_validator(mode="before")
    @classmethod
    def _default_width(cls, data: Any) -> Any:
        backbone = BACKBONES.get(data.get("name")) if isinstance(data, dict) else None
        if backbone is not None and "width" not in data:
            data = {**data, "width": backbone.default_width}
        return data

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in BACKBONES:
            raise ValueError(f"must be one of {', '.join(BACKBONES)}")
        return name

    @model_validator(mode="after")
    def _check_backbone(self) -> VolumeEncoderConfig:
        BACKBONES[self.name].check_config(self)
        return self


class VolumeEncoder(nn.Module):
    """Multi-scale encoder: `forward(x (B, C, D, H, W)) -> [maps fine to coarse]`.

    Map i has shape (B, out_channels[i], D / strides[i], H / strides[i], W / strides[i]); every
    spatial input size must be a multiple of `size_multiple`. The submodules are shared with the
    MONAI network given to `__init__` (same objects, same attribute names).
    """

    parts: ClassVar[tuple[str, ...]]
    network_class: ClassVar[type[nn.Module]]
    output_parts: ClassVar[tuple[str, ...]]  # the network's last layer: its shape depends on the classes
    min_coarse_voxels: ClassVar[int] = 1  # 2 where the coarsest map is instance-normalised
    default_width: ClassVar[int] = 8
    find_unused_parameters: ClassVar[bool] = False  # DDP: the network has blocks the encoder never reaches

    @classmethod
    def check_config(cls, cfg: VolumeEncoderConfig) -> None:
        """ValueError (for the config validator) when `cfg` does not fit this backbone."""

    @classmethod
    def monai_arguments(cls, cfg: VolumeEncoderConfig, out_channels: int) -> dict[str, Any]:
        """The MONAI constructor's keyword arguments for `network` (exported with the weights, so that plain
        MONAI rebuilds the network without medssl)."""
        raise NotImplementedError

    @classmethod
    def network(cls, cfg: VolumeEncoderConfig, out_channels: int) -> nn.Module:
        """The full MONAI network (3D) whose encoder this is."""
        return cls.network_class(**cls.monai_arguments(cfg, out_channels))

    @classmethod
    def decoder_maps(cls, cfg: VolumeEncoderConfig) -> list[tuple[str, int, int]]:
        """The decoder's intermediate maps, coarse to fine, without the full-resolution one: (submodule of
        the network whose output it is, channels, stride). Deep supervision puts its heads there."""
        raise NotImplementedError

    def __init__(self, network: nn.Module, cfg: VolumeEncoderConfig) -> None:
        super().__init__()
        if not isinstance(network, self.network_class):
            raise UserError(f"model.name: '{cfg.name}' needs a MONAI {self.network_class.__name__}, "
                            f"got a {type(network).__name__}")
        for part in self.parts:
            setattr(self, part, getattr(network, part))
        self.cfg = cfg
        self.out_channels, self.strides = self._layout(cfg)

    @staticmethod
    def _layout(cfg: VolumeEncoderConfig) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        """Channels of the coarsest map."""
        return self.out_channels[-1]

    @property
    def size_multiple(self) -> int:
        """Every spatial input size must be a multiple of this (the coarsest stride)."""
        return self.strides[-1]

    def check_input_size(self, spatial: tuple[int, ...] | torch.Size) -> None:
        """UserError unless each size in `spatial` (D, H, W) is a multiple of `size_multiple` and
        the coarsest map has at least `min_coarse_voxels` voxels."""
        spatial = tuple(int(s) for s in spatial)
        if any(s % self.size_multiple for s in spatial):
            raise UserError(f"model.name: {self.cfg.name} needs input sizes that are multiples of "
                            f"{self.size_multiple}, got {spatial} (change data.crop_size)")
        if math.prod(s // self.size_multiple for s in spatial) < self.min_coarse_voxels:
            raise UserError(f"model.name: {self.cfg.name} needs at least {self.min_coarse_voxels} voxels in its "
                            f"stride-{self.size_multiple} map (instance norm), input {spatial} gives fewer "
                            f"(make data.crop_size larger)")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input_size(x.shape[2:])
        return self._features(x)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError


class BasicUNetEncoder(VolumeEncoder):
    """BasicUNet's conv_0 and down_1..down_4: strides 1, 2, 4, 8, 16; channels w, w, 2w, 4w, 8w."""

    parts = ("conv_0", "down_1", "down_2", "down_3", "down_4")
    network_class = BasicUNet
    output_parts = ("final_conv",)
    min_coarse_voxels = 2

    @classmethod
    def decoder_maps(cls, cfg: VolumeEncoderConfig) -> list[tuple[str, int, int]]:
        w = cfg.width
        return [("upcat_4", 4 * w, 8), ("upcat_3", 2 * w, 4), ("upcat_2", w, 2)]

    @classmethod
    def monai_arguments(cls, cfg: VolumeEncoderConfig, out_channels: int) -> dict[str, Any]:
        return {"spatial_dims": 3, "in_channels": cfg.in_channels, "out_channels": out_channels,
                "features": list(_basicunet_features(cfg.width))}

    @staticmethod
    def _layout(cfg: VolumeEncoderConfig) -> tuple[list[int], list[int]]:
        return list(_basicunet_features(cfg.width)[:5]), [1, 2, 4, 8, 16]

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = [self.conv_0(x)]
        for part in self.parts[1:]:
            maps.append(getattr(self, part)(maps[-1]))
        return maps


class SegResNetEncoder(VolumeEncoder):
    """SegResNet's convInit and down_layers (its `encode` path); map i has stride 2^i, channels w 2^i."""

    parts = ("convInit", "down_layers")
    network_class = SegResNet
    output_parts = ("conv_final",)

    @classmethod
    def decoder_maps(cls, cfg: VolumeEncoderConfig) -> list[tuple[str, int, int]]:
        top = len(cfg.segresnet_blocks) - 2  # up_layers[j] works at stride 2^(top - j)
        return [(f"up_layers.{j}", cfg.width * 2 ** (top - j), 2 ** (top - j)) for j in range(top)]

    @classmethod
    def check_config(cls, cfg: VolumeEncoderConfig) -> None:
        if cfg.width % 8:
            raise ValueError(f"width {cfg.width}: segresnet needs a multiple of 8 (GroupNorm with 8 groups)")
        if len(cfg.segresnet_blocks) < 2:
            raise ValueError("segresnet_blocks: at least 2 stages are needed")

    @classmethod
    def monai_arguments(cls, cfg: VolumeEncoderConfig, out_channels: int) -> dict[str, Any]:
        return {"spatial_dims": 3, "init_filters": cfg.width, "in_channels": cfg.in_channels,
                "out_channels": out_channels, "blocks_down": list(cfg.segresnet_blocks),
                "blocks_up": [1] * (len(cfg.segresnet_blocks) - 1)}

    @staticmethod
    def _layout(cfg: VolumeEncoderConfig) -> tuple[list[int], list[int]]:
        stages = range(len(cfg.segresnet_blocks))
        return [cfg.width * 2**i for i in stages], [2**i for i in stages]

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.convInit(x)
        maps = []
        for down in self.down_layers:
            x = down(x)
            maps.append(x)
        return maps


class SwinUNETREncoder(VolumeEncoder):
    """SwinUNETR's swinViT plus encoder1..4, as SwinUNETR.forward uses them.

    Maps: encoder1(x) stride 1 (w), encoder2/3/4 of Swin states 0/1/2 at strides 2/4/8 (w, 2w, 4w),
    Swin states 3 and 4 at strides 16 and 32 (8w, 16w; layer-normalised, as SwinUNETR uses them).
    """

    parts = ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4")
    network_class = SwinUNETR
    output_parts = ("out",)
    default_width = 12
    find_unused_parameters = True  # encoder10 and the decoder are never reached by the encoder's outputs

    @classmethod
    def check_config(cls, cfg: VolumeEncoderConfig) -> None:
        if cfg.width % 12:
            raise ValueError(f"width {cfg.width}: swinunetr needs a multiple of 12 (MONAI SwinUNETR feature_size)")
        if any((cfg.width * 2**i) % h for i, h in enumerate(cfg.swin_heads)):
            raise ValueError(f"swin_heads {cfg.swin_heads}: stage channels {cfg.width} x 2^i must be "
                             "divisible by the stage's heads")

    @classmethod
    def decoder_maps(cls, cfg: VolumeEncoderConfig) -> list[tuple[str, int, int]]:
        w = cfg.width
        return [("decoder5", 8 * w, 16), ("decoder4", 4 * w, 8), ("decoder3", 2 * w, 4), ("decoder2", w, 2)]

    @classmethod
    def monai_arguments(cls, cfg: VolumeEncoderConfig, out_channels: int) -> dict[str, Any]:
        return {"in_channels": cfg.in_channels, "out_channels": out_channels, "feature_size": cfg.width,
                "depths": list(cfg.swin_depths), "num_heads": list(cfg.swin_heads),
                "window_size": cfg.swin_window,
                "spatial_dims": 3}

    @staticmethod
    def _layout(cfg: VolumeEncoderConfig) -> tuple[list[int], list[int]]:
        w = cfg.width
        return [w, w, 2 * w, 4 * w, 8 * w, 16 * w], [1, 2, 4, 8, 16, 32]

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        hidden = self.swinViT(x, True)  # normalize=True, SwinUNETR's default
        return [self.encoder1(x), self.encoder2(hidden[0]), self.encoder3(hidden[1]), self.encoder4(hidden[2]),
                hidden[3], hidden[4]]


BACKBONES: dict[str, type[VolumeEncoder]] = {
    "basicunet": BasicUNetEncoder, "segresnet": SegResNetEncoder, "swinunetr": SwinUNETREncoder}


def _basicunet_features(width: int) -> tuple[int, ...]:
    return (width, width, 2 * width, 4 * width, 8 * width, width)


def build_segmentation_network(cfg: VolumeEncoderConfig, out_channels: int) -> nn.Module:
    """The full MONAI network (3D) whose encoder `build_volume_encoder(cfg)` is."""
    return BACKBONES[cfg.name].network(cfg, out_channels)


def network_encoder(network: nn.Module, cfg: VolumeEncoderConfig) -> VolumeEncoder:
    """The encoder of a MONAI network built by `build_segmentation_network(cfg, ...)`.

    It shares its parameters with `network`: loading into it, or freezing it, acts on the network.
    """
    return BACKBONES[cfg.name](network, cfg)


def build_volume_encoder(cfg: VolumeEncoderConfig) -> VolumeEncoder:
    """A fresh encoder (the decoder of the MONAI network it comes from is dropped)."""
    return network_encoder(build_segmentation_network(cfg, out_channels=1), cfg)


def encoder_state(encoder: VolumeEncoder) -> dict[str, torch.Tensor]:
    """The encoder's state dict; its keys are the MONAI network's key names."""
    return encoder.state_dict()


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
    payload = load_checkpoint(checkpoint_path)
    kind = payload["kind"]
    if kind not in (Kind.VOLUME_ENCODER, Kind.VOLUME_NETWORK, Kind.PRETRAIN_VOLUME):
        raise UserError(f"{source}: a '{kind}' checkpoint holds no volume encoder (expected "
                        f"'{Kind.VOLUME_ENCODER}', '{Kind.VOLUME_NETWORK}' or '{Kind.PRETRAIN_VOLUME}')")
    stored = _stored_arch(payload["arch"], kind, source)
    if stored != arch:
        raise UserError(f"{source}: the checkpoint's encoder differs from the config's: " + arch_differences(
            stored.model_dump(mode="json"), arch.model_dump(mode="json"), prefix="model"))
    weights = _strip_prefix(payload["model"], DDP_PREFIX)
    whole: dict[str, torch.Tensor] | None = weights if kind == Kind.VOLUME_NETWORK else None
    if kind == Kind.PRETRAIN_VOLUME:
        whole = _with_prefix(weights, NETWORK_PREFIX) or None
        weights = _with_prefix(weights, PRETRAIN_PREFIX)
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


def _with_prefix(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries whose key starts with `prefix`, without it."""
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def _strip_prefix(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove `prefix` when every key has it (a state dict saved from a DDP-wrapped model)."""
    if weights and all(k.startswith(prefix) for k in weights):
        return {k[len(prefix):]: v for k, v in weights.items()}
    return weights
