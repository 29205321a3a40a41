"""Crop-level instance contrast between the two views of each crop (NT-Xent, or DCL if decoupled).

Paper: SimCLR, Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
arXiv:2002.05709, eq. (1) (NT-Xent); decoupled variant: Yeh et al., "Decoupled Contrastive Learning",
arXiv:2110.06848, eq. (4) (the positive left out of the denominator).
"""

from __future__ import annotations

import torch

from medssl.losses.contrastive import pair_views
from medssl.losses.objective import ContrastConfig, VolumeObjective, VolumeStep


def crop_contrast(z_a: torch.Tensor, z_b: torch.Tensor, *, tau: float = 0.2, decoupled: bool = False) -> torch.Tensor:
    """Each embedding's positive is the other view of its crop; the other 2B - 2 embeddings are negatives.

    Shape: z_a, z_b (B, D) pooled embeddings of view a and view b of B crops -> scalar, float32.
    """
    if z_a.shape != z_b.shape or z_a.ndim != 2:
        raise ValueError(f"crop_contrast: expected two (B, D) tensors, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    return pair_views(z_a, z_b, tau=tau, decoupled=decoupled)


class CropConfig(ContrastConfig):
    """`objectives.crop`: instance contrast of the two overlapping crops a and b."""


class CropObjective(VolumeObjective):
    """{"crop": NT-Xent of views a and b}."""

    Config = CropConfig

    def forward(self, step: VolumeStep) -> dict[str, torch.Tensor]:
        return {"crop": crop_contrast(step.gather(step.view("a")), step.gather(step.view("b")), tau=self.config.tau,
                                      decoupled=self.config.decoupled)}
