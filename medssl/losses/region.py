"""Region-level anatomical consistency: pooled features of the same anatomical region are positives.

Regions come from the view sampler (e.g. cells of normalised body coordinates or a matcher's
correspondence), never from label maps. Positives: the other embeddings with the same region id,
in any patient (across patients is what teaches invariance; the same region of the same patient
also counts, self excluded). Negatives: other regions, minus those whose body position lies within
`fn_radius` of the anchor's (same anatomy under another id: a false negative).
"""

from __future__ import annotations

import torch

from medssl.losses.contrastive import info_nce, same_id_mask


def pool_regions(feat: torch.Tensor, region_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean feature per (batch element, region id), in float32.

    feat: (B, C, d, h, w); region_map: (B, d, h, w) long, region id per voxel, -1 = outside.
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
    """Multi-positive InfoNCE over region embeddings. Scalar, float32.

    embeddings: (N, D); region_ids, patient_ids: (N,) long; positions: (N, 3) normalised body
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
