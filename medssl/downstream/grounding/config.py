"""The `medssl ground train` config schema (configs/grounding.yaml) and the table of alignment objectives."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, confloat, model_validator

from medssl.config import StrictModel, TrainConfig
from medssl.data.preprocessing import VolumeDataConfig
from medssl.losses.anatomy_prompts import AnatomyObjective
from medssl.losses.phrase_local import LocalObjective
from medssl.losses.report_global import GlobalObjective
from medssl.losses.report_prior import PriorObjective
from medssl.losses.weighting import objectives_section
from medssl.models.volume_encoders import VolumeEncoderConfig
from medssl.text.encoders import TextEncoderConfig

Split = Literal["training", "validation", "test"]

GROUNDING_OBJECTIVES = {"global": GlobalObjective, "local": LocalObjective, "anatomy": AnatomyObjective,
                        "prior": PriorObjective}
GroundingObjectivesConfig = objectives_section(
    "GroundingObjectivesConfig", GROUNDING_OBJECTIVES,
    "The `objectives` section: global (report vs volume), local (phrase vs voxels), anatomy (graph regions vs "
    "their prompts), prior (report-stated size and emptiness); weight 0 switches one off.")


class HeadConfig(StrictModel):
    """The `grounding` section: how voxels and phrases are embedded into one space."""

    embed_dim: PositiveInt = 64
    hidden: PositiveInt = 64
    feature_stride: Literal[1, 2, 4] = 2  # voxel embeddings on the encoder grid of this stride
    coord_frequencies: NonNegativeInt = 4  # Fourier features of the normalised body coordinates (0: none)
    context_layers: NonNegativeInt = 1  # 3x3x3 convolutions of the voxel head (neighbourhood context)
    context_channels: PositiveInt = 32  # their width
    encoder_lr_scale: confloat(ge=0.0, le=1.0) = 0.0  # encoder learning rate / train.lr; 0 freezes the encoder
                                                      # (its features are then computed once per volume)
    max_phrases: PositiveInt = 6  # finding statements per report used in a step (the first ones)
    edge_margin: NonNegativeInt = 4  # voxels next to the volume's faces where nothing is grounded (padding)
    strip_measurements: bool = True  # texts are embedded without their sizes and numbers: a size identifies one
                                     # lesion (the model would memorise volumes by it); the prior reads it instead


class GraphConfig(StrictModel):
    """The `graph` section: the label-free anatomy tree (medssl.downstream.grounding.graph)."""

    regions: PositiveInt = 8  # organ-level regions (k-means clusters)
    parts: list[Literal["upper_lower", "left_right", "anterior_posterior"]] = Field(
        default_factory=lambda: ["upper_lower", "left_right"])
    volumes: PositiveInt = 8  # training volumes the clustering sees
    voxels_per_volume: PositiveInt = 4000
    coord_weight: PositiveFloat = 1.0  # weight of the body coordinates against the (standardised) features


class GroundingEvalConfig(StrictModel):
    """The `eval` section: where and how the trained model is scored (labels and masks read here only)."""

    split: Split = "test"
    calibration_split: Split = "validation"  # picks the not-groundable score threshold
    absent_per_study: PositiveInt = 3  # phrases of findings absent from a study, for the not-groundable call
    swap_per_study: PositiveInt = 2  # phrase-swap control pairs per study
    sw_batch_size: PositiveInt = 2


class GroundingConfig(StrictModel):
    """`medssl ground train` (configs/grounding.yaml). Training reads volumes and reports only."""

    data: VolumeDataConfig
    train: TrainConfig
    model: VolumeEncoderConfig = Field(default_factory=VolumeEncoderConfig)
    grounding: HeadConfig = Field(default_factory=HeadConfig)
    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    graph: GraphConfig = Field(default_factory=GraphConfig)
    objectives: GroundingObjectivesConfig = Field(default_factory=GroundingObjectivesConfig)
    eval: GroundingEvalConfig = Field(default_factory=GroundingEvalConfig)
    train_split: Split = "training"

    @model_validator(mode="after")
    def _consistent(self) -> GroundingConfig:
        if self.train_split in (self.eval.split, self.eval.calibration_split):
            raise ValueError(f"train_split '{self.train_split}' is also eval.split or eval.calibration_split")
        if self.train.batch_size < 2:
            raise ValueError("train.batch_size must be at least 2 (volumes contrast with each other)")
        return self
