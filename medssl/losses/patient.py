"""Patient-level contrast: crops from different studies of the same patient are positives.

Crops of the same patient and the same study are neither positive nor negative (that is the crop
level's job); crops of other patients are negatives. Study ids may be global or per patient.
"""

from __future__ import annotations

import torch

from medssl.losses.contrastive import info_nce, same_id_mask


def _masks(patient_ids: torch.Tensor, study_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, exclude), both (N, N) bool, from patient_ids and study_ids (N,)."""
    if patient_ids.ndim != 1 or patient_ids.shape != study_ids.shape:
        raise ValueError(f"patient_contrast: expected patient_ids and study_ids (N,), got "
                         f"{tuple(patient_ids.shape)} and {tuple(study_ids.shape)}")
    same_patient = same_id_mask(patient_ids)
    same_study = same_patient & same_id_mask(study_ids)  # includes the anchor itself
    return same_patient & ~same_study, same_study


def patient_contrast(z: torch.Tensor, patient_ids: torch.Tensor, study_ids: torch.Tensor, *,
                     tau: float = 0.2, decoupled: bool = False) -> torch.Tensor:
    """z: (N, D) crop embeddings; patient_ids, study_ids: (N,) long. Scalar, float32.

    Anchors without a crop from another study of their patient are left out (see
    `patient_positive_count`); with none, a zero that carries a gradient.
    """
    positives, exclude = _masks(patient_ids, study_ids)
    return info_nce(z, z, positives, tau=tau, exclude=exclude, decoupled=decoupled)


def patient_positive_count(patient_ids: torch.Tensor, study_ids: torch.Tensor) -> int:
    """How many of the N anchors have at least one positive (a crop of another study of their patient)."""
    positives, _ = _masks(patient_ids, study_ids)
    return int(positives.any(dim=1).sum())
