"""The volume objectives by name, their config section and the weighted total.

Config (the `objectives` section of a volume pretraining config): one sub-section per objective,
each with a non-negative `weight`; weight 0 switches the objective off. Unknown objective names,
unknown keys and negative weights fail validation naming the dotted key (e.g. `voxel.weight`).
Defaults: every weight 1.0 except part_whole 0.5, because part_whole yields two terms (compose and
decompose) and each gets the weight, so together they count as one objective (Adam-v2 weights each
branch 1 next to a single localizability loss; we have four other objectives). tau 0.2 throughout
(between SimCLR's 0.1 and SwinUNETR's 0.5). fn_radius 0.1 of the body box (~4 cm on a 40 cm field)
treats regions that close to the anchor as the same anatomy.
"""

from __future__ import annotations

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, model_validator

from medssl.config import StrictModel

VOLUME_OBJECTIVES = ("voxel", "region", "crop", "patient", "part_whole")


class VoxelObjective(StrictModel):
    """Dense contrast of corresponding voxels (medssl.losses.voxel)."""

    weight: NonNegativeFloat = 1.0
    tau: PositiveFloat = 0.2
    min_separation: NonNegativeFloat = 2.0  # feature voxels


class RegionObjective(StrictModel):
    """Anatomical-region consistency across patients (medssl.losses.region)."""

    weight: NonNegativeFloat = 1.0
    tau: PositiveFloat = 0.2
    fn_radius: NonNegativeFloat = 0.1  # in normalised body coordinates [0, 1]^3
    cross_patient: bool = False


class CropObjective(StrictModel):
    """Instance contrast between the two views of a crop (medssl.losses.crop)."""

    weight: NonNegativeFloat = 1.0
    tau: PositiveFloat = 0.2
    decoupled: bool = False


class PatientObjective(StrictModel):
    """Studies of the same patient are positives (medssl.losses.patient)."""

    weight: NonNegativeFloat = 1.0
    tau: PositiveFloat = 0.2
    decoupled: bool = False


class PartWholeObjective(StrictModel):
    """Octant composition and decomposition (medssl.losses.part_whole); the weight applies to each term."""

    weight: NonNegativeFloat = 0.5


class VolumeObjectivesConfig(StrictModel):
    """Weights and settings of the five volume objectives; at least one weight must be positive."""

    voxel: VoxelObjective = Field(default_factory=VoxelObjective)
    region: RegionObjective = Field(default_factory=RegionObjective)
    crop: CropObjective = Field(default_factory=CropObjective)
    patient: PatientObjective = Field(default_factory=PatientObjective)
    part_whole: PartWholeObjective = Field(default_factory=PartWholeObjective)

    @model_validator(mode="after")
    def _something_to_train(self) -> VolumeObjectivesConfig:
        if not self.active():
            raise ValueError("every objective weight is 0: set at least one weight > 0")
        return self

    def active(self) -> tuple[str, ...]:
        """Names of the objectives with a positive weight, in VOLUME_OBJECTIVES order."""
        return tuple(name for name in VOLUME_OBJECTIVES if getattr(self, name).weight > 0)


def total_loss(terms: dict[str, torch.Tensor], config: VolumeObjectivesConfig) -> torch.Tensor:
    """Sum of weight x term in float32. terms: scalar tensors keyed by objective name, or by
    "<objective>.<part>" for an objective with several terms (e.g. "part_whole.compose"); the
    objective's weight applies to each. Weight-0 terms are skipped (so a NaN there cannot leak).
    An unknown name or nothing with a positive weight is a ValueError (a programming error).
    """
    weighted = []
    for key, value in terms.items():
        name = key.split(".", 1)[0]
        if name not in VOLUME_OBJECTIVES:
            raise ValueError(f"total_loss: unknown objective term {key!r}; known: {', '.join(VOLUME_OBJECTIVES)}")
        weight = getattr(config, name).weight
        if weight > 0:
            weighted.append(weight * value.float())
    if not weighted:
        raise ValueError(f"total_loss: no term with a positive weight among {sorted(terms)}")
    return torch.stack(weighted).sum()
