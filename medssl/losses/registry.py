"""The volume objectives by name (one table entry each), their `objectives` config section and the
weighted total.

Config: one sub-section per objective, each with a non-negative `weight`; weight 0 switches the
objective off. Unknown objective names, unknown keys and negative weights fail validation naming the
dotted key (e.g. `voxel.weight`). Defaults: every weight 1.0 except part_whole 0.5, because part_whole
yields two terms (compose and decompose) and each gets the weight, so together they count as one
objective (Adam-v2 weights each branch 1 next to a single localizability loss; we have four other
objectives), and masked 0: masked reconstruction trains the whole network (encoder and decoder) and is
switched on by its own config (configs/pretrain_volume_mae.yaml). tau 0.2 throughout (between SimCLR's 0.1 and
SwinUNETR's 0.5). fn_radius 0.1 of the body box (~4 cm on a 40 cm field) treats regions that close to the
anchor as the same anatomy.

The table's order is the order in which the objectives run (and their terms are summed).
"""

from __future__ import annotations

import torch
from pydantic import Field, create_model, model_validator

from medssl.config import StrictModel
from medssl.losses.crop import CropObjective
from medssl.losses.masked import MaskedObjective
from medssl.losses.objective import VolumeObjective
from medssl.losses.part_whole import PartWholeObjective
from medssl.losses.patient import PatientObjective
from medssl.losses.region import RegionObjective
from medssl.losses.voxel import VoxelObjective

VOLUME_OBJECTIVES: dict[str, type[VolumeObjective]] = {
    "crop": CropObjective, "patient": PatientObjective, "voxel": VoxelObjective, "region": RegionObjective,
    "part_whole": PartWholeObjective, "masked": MaskedObjective}


class _ObjectivesSection(StrictModel):
    """The `objectives` section: one sub-section per registered objective; at least one weight > 0."""

    @model_validator(mode="after")
    def _something_to_train(self) -> _ObjectivesSection:
        if not self.active():
            raise ValueError("every objective weight is 0: set at least one weight > 0")
        return self

    def active(self) -> tuple[str, ...]:
        """Names of the objectives with a positive weight, in table order."""
        return tuple(name for name in VOLUME_OBJECTIVES if getattr(self, name).weight > 0)


VolumeObjectivesConfig = create_model(
    "VolumeObjectivesConfig", __base__=_ObjectivesSection,
    **{name: (objective.Config, Field(default_factory=objective.Config))
       for name, objective in VOLUME_OBJECTIVES.items()})


def total_loss(terms: dict[str, torch.Tensor], config: _ObjectivesSection) -> torch.Tensor:
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
