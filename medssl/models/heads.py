"""Heads shared by the objectives: the crop embedding's grid pooling and the projection MLP."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


def grid_pool(feat: torch.Tensor, cells: int = 2) -> torch.Tensor:
    """Average over a cells^3 grid and flatten: (B, C, D, H, W) -> (B, C * cells^3).

    A crop embedding for encoders whose last layer is instance-normalised (BasicUNet, SegResNet):
    there every channel's spatial mean is ~0 whatever the input, so a global average would give all
    crops the same embedding, while the coarse layout survives the normalisation.
    """
    return torch.nn.functional.adaptive_avg_pool3d(feat, cells).flatten(1)


class ProjectionHead(nn.Module):
    """MLP Linear -> norm -> GELU -> Linear: (N, in_dim) -> (N, out_dim).

    `norm="batch"` is the SimCLR/BYOL choice and the pretraining default (`heads.norm`): it centres the
    embeddings of a step, which kept the crop embeddings from collapsing (needs N > 1 in training);
    `norm="layer"` works for any batch size.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, *, norm: Literal["layer", "batch"]) -> None:
        super().__init__()
        norm_layer = {"layer": nn.LayerNorm, "batch": nn.BatchNorm1d}[norm]
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), norm_layer(hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
