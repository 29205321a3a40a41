"""Crop-level instance contrast between the two views of each crop (NT-Xent, or DCL if decoupled)."""

from __future__ import annotations

import torch

from medssl.losses.contrastive import pair_views


def crop_contrast(z_a: torch.Tensor, z_b: torch.Tensor, *, tau: float = 0.2, decoupled: bool = False) -> torch.Tensor:
    """z_a, z_b: (B, D) pooled embeddings of view a and view b of B crops. Scalar, float32.

    Each embedding's positive is the other view of its crop; the other 2B - 2 embeddings are negatives.
    """
    if z_a.shape != z_b.shape or z_a.ndim != 2:
        raise ValueError(f"crop_contrast: expected two (B, D) tensors, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    return pair_views(z_a, z_b, tau=tau, decoupled=decoupled)
