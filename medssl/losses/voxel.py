"""Voxel-level dense contrast between corresponding points of two overlapping crops (PixPro-style).

Paper: PixPro, Xie et al., "Propagate Yourself: Exploring Pixel-Level Consistency for Unsupervised
Visual Representation Learning", arXiv:2011.10043, eq. (1)-(2) (pixel contrast of corresponding
positions); here the InfoNCE form with every other sampled point as a negative.

The view sampler knows the crop geometry, so it gives the feature-grid coordinates of the same
anatomical points in both views; features there are sampled trilinearly and contrasted with
`info_nce`: the same point in the other view is the positive, every other point of every crop in
the batch a negative, except the other points of the same crop lying closer than `min_separation`
to the anchor (near-duplicates, hence false negatives).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import NonNegativeFloat, PositiveFloat

from medssl.losses.contrastive import info_nce, same_id_mask
from medssl.losses.objective import ObjectiveConfig, VolumeObjective, VolumeStep


def sample_features(feat: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear feature sampling at continuous voxel coordinates, in float32.

    feat: (B, C, d, h, w); points: (B, N, 3) as (z, y, x) voxel coordinates along (d, h, w),
    0 = first voxel centre, size - 1 = last (align_corners=True). Returns (B, N, C).
    Points outside the grid are a caller error (ValueError).
    """
    if feat.ndim != 5 or points.ndim != 3 or points.shape[2] != 3 or points.shape[0] != feat.shape[0]:
        raise ValueError(f"sample_features: expected feat (B, C, d, h, w) and points (B, N, 3), got "
                         f"{tuple(feat.shape)} and {tuple(points.shape)}")
    batch, channels = feat.shape[:2]
    with torch.autocast(device_type=feat.device.type, enabled=False):
        last = torch.tensor(feat.shape[2:], dtype=torch.float32, device=feat.device) - 1
        points = points.float()
        if bool(((points < -1e-4) | (points > last + 1e-4)).any()):
            raise ValueError(f"sample_features: points outside the feature grid {tuple(feat.shape[2:])}")
        # grid_sample wants (x, y, z) in [-1, 1]; a size-1 axis maps every coordinate to its one voxel
        grid = (points / last.clamp_min(1) * 2 - 1).flip(-1)
        sampled = F.grid_sample(feat.float(), grid.view(batch, -1, 1, 1, 3), mode="bilinear",
                                padding_mode="border", align_corners=True)
    return sampled.view(batch, channels, -1).transpose(1, 2)


def voxel_contrast(feat_a: torch.Tensor, feat_b: torch.Tensor, points_a: torch.Tensor,
                   points_b: torch.Tensor, *, tau: float = 0.2, min_separation: float = 2.0) -> torch.Tensor:
    """Symmetric dense InfoNCE (a->b and b->a, averaged) over the B*N sampled points.

    Shape: feat_a (B, C, d, h, w), feat_b (B, C, d2, h2, w2), points_a, points_b (B, N, 3) -> scalar, float32.

    feat_a, feat_b: the two views' feature maps;
    points_a, points_b: (B, N, 3), (z, y, x) feature-grid coordinates of the same anatomical
    points in view a and view b. Candidates are the other view's B*N point features.
    min_separation: in feature voxels of view a; same-crop points closer than this to the anchor
    are excluded from the negatives (0 disables).
    """
    if points_a.shape != points_b.shape:
        raise ValueError(f"voxel_contrast: points_a {tuple(points_a.shape)} and points_b "
                         f"{tuple(points_b.shape)} differ")
    batch, n_points = points_a.shape[:2]
    za = sample_features(feat_a, points_a).reshape(batch * n_points, -1)
    zb = sample_features(feat_b, points_b).reshape(batch * n_points, -1)
    positives = torch.eye(batch * n_points, dtype=torch.bool, device=za.device)
    crop = torch.arange(batch, device=za.device).repeat_interleave(n_points)
    flat = points_a.float().reshape(batch * n_points, 3)
    exclude = same_id_mask(crop) & (torch.cdist(flat, flat) < min_separation) & ~positives
    return 0.5 * (info_nce(za, zb, positives, tau=tau, exclude=exclude)
                  + info_nce(zb, za, positives, tau=tau, exclude=exclude))


class VoxelConfig(ObjectiveConfig):
    """`objectives.voxel`: dense contrast of corresponding voxels of crops a and b."""

    tau: PositiveFloat = 0.2
    min_separation: NonNegativeFloat = 2.0  # feature voxels


class VoxelObjective(VolumeObjective):
    """{"voxel": dense contrast at the sampler's corresponding points of views a and b}."""

    Config = VoxelConfig
    needs_dense = True

    def forward(self, step: VolumeStep) -> dict[str, torch.Tensor]:
        return {"voxel": voxel_contrast(step.gather(step.dense("a")), step.gather(step.dense("b")),
                                        step.gather(step.batch["points_a"]), step.gather(step.batch["points_b"]),
                                        tau=self.config.tau,
                                        min_separation=self.config.min_separation)}
