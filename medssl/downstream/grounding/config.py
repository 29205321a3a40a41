"""The `medssl ground train` config schema (configs/grounding.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from medssl.config import StrictModel, TrainConfig
from medssl.data.preprocessing import VolumeDataConfig
from medssl.downstream.segmentation.config import SegSettings
from medssl.models.volume_encoders import VolumeEncoderConfig

Split = Literal["training", "validation", "test"]


def _organ_seg_defaults() -> SegSettings:
    return SegSettings(labelled_volumes=8, eval_every=200, overlay_cases=3)


class OrganHeadConfig(StrictModel):
    """The `organs` section: the organ head that `ground train` fine-tunes with `finetune seg` (from
    --pretrained, on `seg.labelled_volumes` labelled training volumes) unless --organs gives one. `train` and
    `seg` are finetune seg's sections; with `small_organ_weight` and no `seg.class_weights`, each organ's
    Dice + CE weight is (median organ volume / its volume) ** 0.5 in [1, 4] over the labelled volumes."""

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=2000, batch_size=2, lr=0.005,
                                                                  weight_decay=0.01, warmup_steps=10,
                                                                  checkpoint_every=200))
    seg: SegSettings = Field(default_factory=_organ_seg_defaults)
    small_organ_weight: bool = True


class ScorerConfig(StrictModel):
    """The `scorer` section: the finding scorer's inputs and its training (`train.batch_size` bags a step)."""

    windows: list[tuple[float, PositiveFloat]] = Field(
        default_factory=lambda: [(40.0, 400.0), (-600.0, 1500.0)])  # CT (level, width) HU: soft tissue, lung
    anchor_weight: NonNegativeFloat = 0.01  # pull towards the untrained anomaly score (losses.anchored_l2)


class GroundingEvalConfig(StrictModel):
    """The `eval` section: where and how the trained model is scored (labels and masks read here only)."""

    split: Split = "test"
    calibration_split: Split = "validation"  # picks the not-found threshold, from reports alone
    absent_per_study: PositiveInt = 3  # phrases of findings absent from a study, for the absent/present call
    swap_per_study: PositiveInt = 2  # phrase-swap control pairs per study
    calibration_per_study: PositiveInt = 3  # absent findings asked per calibration study


class GroundingConfig(StrictModel):
    """`medssl ground train` (configs/grounding.yaml). Training reads volumes and reports; the organ head it
    fine-tunes reads the label maps of `organs.seg.labelled_volumes` training volumes; no lesion mask."""

    data: VolumeDataConfig
    train: TrainConfig
    model: VolumeEncoderConfig = Field(default_factory=VolumeEncoderConfig)
    organs: OrganHeadConfig = Field(default_factory=OrganHeadConfig)
    scorer: ScorerConfig = Field(default_factory=ScorerConfig)
    eval: GroundingEvalConfig = Field(default_factory=GroundingEvalConfig)
    train_split: Split = "training"

    @model_validator(mode="after")
    def _consistent(self) -> GroundingConfig:
        if self.train_split in (self.eval.split, self.eval.calibration_split):
            raise ValueError(f"train_split '{self.train_split}' is also eval.split or eval.calibration_split")
        if self.organs.seg.train_split != self.train_split:
            raise ValueError(f"organs.seg.train_split '{self.organs.seg.train_split}' must be train_split "
                             f"'{self.train_split}' (the organ head must not see evaluation patients' labels)")
        return self
