"""Heads shared by the objectives: global pooling and the projection MLP."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


def global_pool(feat: torch.Tensor) -> torch.Tensor:
    """Average over every spatial axis: (B, C, *spatial) -> (B, C)."""
    return feat.flatten(2).mean(dim=2)


def grid_pool(feat: torch.Tensor, cells: int = 2) -> torch.Tensor:
    """Average over a cells^3 grid and flatten: (B, C, D, H, W) -> (B, C * cells^3).

    A crop embedding for encoders whose last layer is instance-normalised (BasicUNet, SegResNet):
    there every channel's spatial mean is ~0 whatever the input, so `global_pool` would give all
    crops the same embedding, while the coarse layout survives the normalisation.
    """
    return torch.nn.functional.adaptive_avg_pool3d(feat, cells).flatten(1)


class ProjectionHead(nn.Module):
    """MLP Linear -> norm -> GELU -> Linear: (N, in_dim) -> (N, out_dim).

    `norm="layer"` (default) works for any batch size and needs no synchronisation under DDP;
    `norm="batch"` is the SimCLR/BYOL choice (needs N > 1 in training).
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, *, norm: Literal["layer", "batch"] = "layer") -> None:
        super().__init__()
        norm_layer = {"layer": nn.LayerNorm, "batch": nn.BatchNorm1d}[norm]
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), norm_layer(hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
