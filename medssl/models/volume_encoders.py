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

Export to and loading from checkpoints (`encoder.pt`, `network.pt`, the pretraining checkpoint) live in
`medssl.training.pretrained`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from monai.networks.nets import BasicUNet, SegResNet, SwinUNETR
from pydantic import PositiveInt, field_validator, model_validator
from torch import nn

from medssl.config import StrictModel
from medssl.errors import UserError



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
