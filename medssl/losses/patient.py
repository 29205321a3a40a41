"""Patient-level contrast: crops from different studies of the same patient are positives.

Crops of the same patient and the same study are neither positive nor negative (that is the crop
level's job); crops of other patients are negatives. Study ids may be global or per patient.

Paper: the patient level of COMET (Wang et al., "Contrast Everything: A Hierarchical Contrastive
Framework for Medical Time-Series", arXiv:2310.14017, eq. (7)), applied to the studies of a patient;
a supervised-contrastive loss over ids (Khosla et al., arXiv:2004.11362, eq. (2), "L_out").
"""

from __future__ import annotations

import torch

from medssl.losses.contrastive import info_nce, same_id_mask
from medssl.losses.objective import ContrastConfig, VolumeObjective, VolumeStep


def patient_masks(patient_ids: torch.Tensor, study_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, exclude), both (N, N) bool, from patient_ids and study_ids (N,): positives are other
    studies of the same patient; the same study (the anchor included) is excluded."""
    if patient_ids.ndim != 1 or patient_ids.shape != study_ids.shape:
        raise ValueError(f"patient_contrast: expected patient_ids and study_ids (N,), got "
                         f"{tuple(patient_ids.shape)} and {tuple(study_ids.shape)}")
    same_patient = same_id_mask(patient_ids)
    same_study = same_patient & same_id_mask(study_ids)  # includes the anchor itself
    return same_patient & ~same_study, same_study


def patient_contrast(z: torch.Tensor, patient_ids: torch.Tensor, study_ids: torch.Tensor, *,
                     tau: float = 0.2, decoupled: bool = False) -> torch.Tensor:
    """Anchors without a crop from another study of their patient are left out; with none, a zero that
    carries a gradient.

    Shape: z (N, D) crop embeddings; patient_ids, study_ids (N,) long -> scalar, float32.
    """
    positives, exclude = patient_masks(patient_ids, study_ids)
    return info_nce(z, z, positives, tau=tau, exclude=exclude, decoupled=decoupled)


class PatientConfig(ContrastConfig):
    """`objectives.patient`: studies of the same patient are positives."""


class PatientObjective(VolumeObjective):
    """{"patient": contrast of views a and c}; c is another study of a's patient where one exists."""

    Config = PatientConfig

    def forward(self, step: VolumeStep) -> dict[str, torch.Tensor]:
        batch = {key: step.gather(step.batch[key]) for key in ("has_c", "patient", "study_a", "study_c")}
        keep = torch.cat([torch.ones_like(batch["has_c"]), batch["has_c"]])
        z = torch.cat([step.gather(step.view("a")), step.gather(step.view("c"))])
        return {"patient": patient_contrast(z[keep], batch["patient"].repeat(2)[keep],
                                            torch.cat([batch["study_a"], batch["study_c"]])[keep],
                                            tau=self.config.tau, decoupled=self.config.decoupled)}
