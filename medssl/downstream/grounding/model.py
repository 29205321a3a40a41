"""The grounding model: voxels and phrases embedded into one space; a phrase's map is their cosine.

Image side: the 3D encoder (a `VolumeEncoder`, optionally pretrained) on the intensity channel; its maps
of stride >= `feature_stride` are resized to that grid and concatenated with Fourier features of the
normalised body coordinates (the other 3 input channels), then the voxel head (1x1x1 conv,
`context_layers` 3x3x3 convs on `context_channels` for neighbourhood context, 1x1x1 conv) gives unit-length
voxel embeddings.
With a frozen encoder, training feeds the head precomputed encoder features (`forward({"features",
"coords"})`). Text side: a `medssl.text` encoder's pooled output, projected and normalised. A frozen copy
of the initial encoder (`graph_encoder`) gives the features the anatomy graph was clustered on.

Input layout: x (B, 4, D, H, W) = intensity in [0, 1] and the normalised RAS body coordinates
(`input_channels`), so sliding-window inference needs no global information."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from medssl.downstream.grounding.config import HeadConfig
from medssl.models.volume_encoders import VolumeEncoderConfig, build_volume_encoder
from medssl.text.encoders import TextEncoder
from medssl.text.statements import without_measurements


def fuse_maps(maps: list[torch.Tensor], strides: list[int], stride: int) -> torch.Tensor:
    """The encoder maps of stride >= `stride`, trilinearly resized to the first such map's grid and
    concatenated. Shape: maps[i] (B, C_i, D/s_i, ...) -> (B, sum C_i, D/stride, H/stride, W/stride)."""
    chosen = [m for m, s in zip(maps, strides) if s >= stride]
    size = chosen[0].shape[2:]
    return torch.cat([chosen[0]] + [F.interpolate(m, size=size, mode="trilinear", align_corners=False)
                                    for m in chosen[1:]], dim=1)


def fourier_coordinates(coords: torch.Tensor, frequencies: int) -> torch.Tensor:
    """coords (B, 3, ...) in about [0, 1] -> (B, 3 + 6 * frequencies, ...): the coordinates and their
    sin / cos at 2^k pi, k < frequencies."""
    parts = [coords]
    for k in range(frequencies):
        parts += [torch.sin(coords * math.pi * 2**k), torch.cos(coords * math.pi * 2**k)]
    return torch.cat(parts, dim=1)


def model_text(text: str, strip_measurements: bool) -> str:
    """The text as the grounding model reads it: sizes and numbers removed when `strip_measurements` (the text
    itself if nothing else is left), so the tokenizer's corpus and the model see the same words."""
    return (without_measurements(text) or text) if strip_measurements else text


class GroundingModel(nn.Module):
    """`forward(x (B, 4, D, H, W)) -> (B, E, d, h, w)` unit voxel embeddings at `feature_stride`;
    `forward(x, texts) -> (voxels, (N, E) unit text embeddings)` (one call, so DDP sees both sides);
    `embed_text(texts) -> (N, E)`."""

    input_channels = 4

    def __init__(self, encoder: VolumeEncoderConfig, head: HeadConfig, text: TextEncoder) -> None:
        super().__init__()
        self.head_config = head
        self.encoder = build_volume_encoder(encoder)
        if head.feature_stride not in self.encoder.strides:
            raise ValueError(f"grounding.feature_stride: {head.feature_stride} is not a stride of the "
                             f"{encoder.name} encoder ({self.encoder.strides})")
        fused = sum(c for c, s in zip(self.encoder.out_channels, self.encoder.strides) if s >= head.feature_stride)
        inputs = fused + 3 + 6 * head.coord_frequencies
        layers: list[nn.Module] = [nn.Conv3d(inputs, head.hidden, 1), nn.GELU()]
        width = head.hidden
        if head.context_layers:  # 3x3x3 neighbourhood context on a narrower bottleneck (CPU cost)
            layers.append(nn.Conv3d(head.hidden, head.context_channels, 1))
            width = head.context_channels
        for _ in range(head.context_layers):
            layers += [nn.Conv3d(width, width, 3, padding=1), nn.GELU()]
        self.voxel_head = nn.Sequential(*layers, nn.Conv3d(width, head.embed_dim, 1))
        self.text = text
        self.text_head = nn.Linear(text.output_dim, head.embed_dim)
        self.graph_encoder = build_volume_encoder(encoder)
        self.graph_encoder.requires_grad_(False)

    def freeze_graph_encoder_from_encoder(self) -> None:
        """The anatomy graph's features come from the encoder as it is now (after loading pretrained weights)."""
        self.graph_encoder.load_state_dict(copy.deepcopy(self.encoder.state_dict()))
        self.graph_encoder.requires_grad_(False)

    def forward(self, inputs: torch.Tensor | dict[str, torch.Tensor], texts: list[str] | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """inputs: x (B, 4, D, H, W), or {"features": (B, C, d, h, w) encoder features, "coords": (B, 3, d, h, w)
        body coordinates on the feature grid} (a frozen encoder's features, precomputed)."""
        if isinstance(inputs, dict):
            voxels = self.embed_features(inputs["features"].float(), inputs["coords"])
        else:
            voxels = self.embed_voxels(inputs)
        return voxels if texts is None else (voxels, self.embed_text(texts))

    def encoder_features(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 1, D, H, W) -> fused encoder maps (B, C, d, h, w) on the feature grid."""
        return fuse_maps(self.encoder(image), self.encoder.strides, self.head_config.feature_stride)

    def embed_features(self, fused: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """fused (B, C, d, h, w), coords (B, 3, d, h, w) -> (B, E, d, h, w) unit vectors."""
        features = torch.cat([fused, fourier_coordinates(coords, self.head_config.coord_frequencies)], dim=1)
        return F.normalize(self.voxel_head(features), dim=1)

    def embed_voxels(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 4, D, H, W) -> (B, E, d, h, w) unit vectors."""
        fused = self.encoder_features(x[:, :1])
        return self.embed_features(fused, F.adaptive_avg_pool3d(x[:, 1:4], fused.shape[2:]))

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """(N, E) unit vectors (sizes and numbers removed first with `strip_measurements`); an empty list
        gives (0, E)."""
        if not texts:
            return self.text_head.weight.new_zeros(0, self.head_config.embed_dim)
        texts = [model_text(t, self.head_config.strip_measurements) for t in texts]
        return F.normalize(self.text_head(self.text(texts).pooled), dim=-1)

    @torch.no_grad()
    def graph_features(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen features the anatomy graph clusters: x (B, 4, D, H, W) -> (B, C, d, h, w)."""
        self.graph_encoder.eval()
        maps = self.graph_encoder(x[:, :1])
        return fuse_maps(maps, self.graph_encoder.strides, self.head_config.feature_stride)

    @property
    def feature_stride(self) -> int:
        return self.head_config.feature_stride
