"""Region-level anatomical consistency: pooled features of the same anatomical region are positives.

Papers: Alice, Jiang et al., "Anatomical Invariance Modeling and Semantic Alignment for
Self-supervised Learning in 3D Medical Image Analysis", arXiv:2302.05615 (the same anatomy across
patients is a positive; sec. 3.2), with the multi-positive InfoNCE of Khosla et al., arXiv:2004.11362,
eq. (2), and false-negative masking of near-identical anatomy (Huynh et al., "Boosting Contrastive
Self-Supervised Learning with False Negative Cancellation", arXiv:2011.11765, sec. 3.2, elimination).

Regions come from the view sampler (e.g. cells of normalised body coordinates or a matcher's
correspondence), never from label maps. Positives: the other embeddings with the same region id,
in any patient (across patients is what teaches invariance; the same region of the same patient
also counts, self excluded). Negatives: other regions, minus those whose body position lies within
`fn_radius` of the anchor's (same anatomy under another id: a false negative).
"""

from __future__ import annotations

import torch
from pydantic import NonNegativeFloat, PositiveFloat

from medssl.losses.contrastive import info_nce, same_id_mask
from medssl.losses.objective import ObjectiveConfig, VolumeObjective, VolumeStep


def pool_regions(feat: torch.Tensor, region_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean feature per (batch element, region id), in float32.

    Shape: feat (B, C, d, h, w), region_map (B, d, h, w) -> (M, C), (M,), (M,).

    region_map: long, region id per voxel, -1 = outside.
    Returns embeddings (M, C), region_ids (M,) and batch_index (M,), one row per region present,
    sorted by (batch element, region id).
    """
    if feat.ndim != 5 or region_map.shape != (feat.shape[0], *feat.shape[2:]):
        raise ValueError(f"pool_regions: expected feat (B, C, d, h, w) and region_map (B, d, h, w), got "
                         f"{tuple(feat.shape)} and {tuple(region_map.shape)}")
    batch, channels = feat.shape[:2]
    regions = region_map.reshape(batch, -1)
    inside = regions >= 0
    n_ids = int(regions.max().clamp_min(0)) + 1
    element = torch.arange(batch, device=feat.device)[:, None].expand_as(regions)
    keys, group = torch.unique((element * n_ids + regions)[inside], return_inverse=True)
    with torch.autocast(device_type=feat.device.type, enabled=False):
        voxels = feat.float().flatten(2).transpose(1, 2)[inside]  # (V_inside, C)
        sums = voxels.new_zeros(keys.shape[0], channels).index_add(0, group, voxels)
        counts = torch.bincount(group, minlength=keys.shape[0]).to(sums.dtype)
    return sums / counts[:, None], keys % n_ids, keys // n_ids


def region_contrast(embeddings: torch.Tensor, region_ids: torch.Tensor, patient_ids: torch.Tensor,
                    positions: torch.Tensor | None = None, *, tau: float = 0.2, fn_radius: float = 0.0,
                    cross_patient: bool = False) -> torch.Tensor:
    """Multi-positive InfoNCE over region embeddings.

    Shape: embeddings (N, D), region_ids (N,), patient_ids (N,), positions (N, 3) -> scalar, float32.

    region_ids, patient_ids: long; positions: normalised body
    coordinates in [0, 1]^3, needed when fn_radius > 0. A negative at Euclidean distance
    < fn_radius from the anchor is excluded. cross_patient=True keeps only positives from other
    patients (the same region of the same patient is then excluded, neither positive nor negative).
    """
    n = embeddings.shape[0]
    if region_ids.shape != (n,) or patient_ids.shape != (n,):
        raise ValueError(f"region_contrast: expected region_ids and patient_ids of shape ({n},), got "
                         f"{tuple(region_ids.shape)} and {tuple(patient_ids.shape)}")
    eye = torch.eye(n, dtype=torch.bool, device=embeddings.device)
    same_region = same_id_mask(region_ids)
    exclude = eye | (same_region & same_id_mask(patient_ids)) if cross_patient else eye
    if fn_radius > 0:
        if positions is None or positions.shape != (n, 3):
            raise ValueError(f"region_contrast: fn_radius > 0 needs positions of shape ({n}, 3)")
        xyz = positions.float()
        exclude = exclude | (~same_region & (torch.cdist(xyz, xyz) < fn_radius))
    return info_nce(embeddings, embeddings, same_region & ~exclude, tau=tau, exclude=exclude)


class RegionConfig(ObjectiveConfig):
    """`objectives.region`: anatomical regions of crops a and d (another patient) across the batch."""

    tau: PositiveFloat = 0.2
    fn_radius: NonNegativeFloat = 0.1  # in normalised body coordinates [0, 1]^3
    cross_patient: bool = False


class RegionObjective(VolumeObjective):
    """{"region": contrast of the region-pooled dense features of views a and d (d only where matched)}."""

    Config = RegionConfig
    needs_dense = True

    def forward(self, step: VolumeStep) -> dict[str, torch.Tensor]:
        batch = {key: step.gather(step.batch[key]) for key in ("has_d", "region_a", "region_d", "patient", "patient_d")}
        has_d = batch["has_d"]
        feat = torch.cat([step.gather(step.dense("a")), step.gather(step.dense("d"))[has_d]])
        regions = torch.cat([batch["region_a"], batch["region_d"][has_d]])
        patients = torch.cat([batch["patient"], batch["patient_d"][has_d]])
        embeddings, region_ids, crop_index = pool_regions(feat, regions)
        return {"region": region_contrast(embeddings, region_ids, patients[crop_index],
                                          step.batch["cell_positions"][region_ids], tau=self.config.tau,
                                          fn_radius=self.config.fn_radius, cross_patient=self.config.cross_patient)}
