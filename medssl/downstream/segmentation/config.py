"""The `medssl finetune seg` config schema (configs/finetune_seg.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt, confloat, model_validator

from medssl.config import StrictModel, TrainConfig
from medssl.data.preprocessing import VolumeDataConfig
from medssl.models.volume_encoders import VolumeEncoderConfig


Split = Literal["training", "validation", "test"]


class SegSettings(StrictModel):
    """The `seg` section."""

    labels: dict[int, str] | None = None  # class value -> name, values 0..K-1; None: the manifest's labels
    labelled_volumes: PositiveInt | None = None  # labelled training volumes (per patient); None: all
    train_split: Split = "training"
    val_split: Split = "validation"
    test_split: Split = "test"
    freeze_encoder_steps: NonNegativeInt = 0
    layer_decay: confloat(gt=0.0, le=1.0) = 1.0
    lambda_dice: NonNegativeFloat = 1.0
    lambda_ce: NonNegativeFloat = 1.0
    eval_every: NonNegativeInt = 0  # validation every N steps (a multiple of train.log_every); 0: at the end only
    sw_batch_size: PositiveInt = 4  # windows per forward pass of sliding-window inference
    sw_overlap: confloat(ge=0.0, lt=1.0) = 0.25
    sw_mode: Literal["gaussian", "constant"] = "gaussian"
    overlay_cases: NonNegativeInt = 3  # test cases drawn in test_overlay.png (0: no PNG)


class FinetuneSegConfig(StrictModel):
    """`medssl finetune seg` (configs/finetune_seg.yaml). With --pretrained, `model` must equal the
    checkpoint's encoder and the checkpoint's preprocessing replaces `data`'s (with warnings)."""

    data: VolumeDataConfig
    train: TrainConfig
    model: VolumeEncoderConfig = Field(default_factory=VolumeEncoderConfig)
    seg: SegSettings = Field(default_factory=SegSettings)

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneSegConfig:
        if self.seg.eval_every % self.train.log_every:
            raise ValueError(f"seg.eval_every {self.seg.eval_every} must be a multiple of train.log_every "
                             f"{self.train.log_every} (validation runs on logged steps)")
        if self.seg.lambda_dice == 0 and self.seg.lambda_ce == 0:
            raise ValueError("seg.lambda_dice and seg.lambda_ce are both 0: no loss left")
        if self.seg.train_split in (self.seg.val_split, self.seg.test_split):
            raise ValueError(f"seg.train_split '{self.seg.train_split}' is also the validation or test split")
        return self
