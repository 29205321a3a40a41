"""The `medssl finetune seg` config schema (configs/finetune_seg.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    confloat,
    field_validator,
    model_validator,
)

from medssl.config import StrictModel, TrainConfig
from medssl.data.preprocessing import VolumeDataConfig
from medssl.models.volume_encoders import VolumeEncoderConfig


Split = Literal["training", "validation", "test"]
Probability = confloat(ge=0.0, le=1.0)


class CropSettings(StrictModel):
    """The `seg.crops` section: how training crops are placed (`training.SegBatches`).

    classes: a share `uniform_fraction` of the crops is placed uniformly (they show the background and the
    field of view's edges as inference sees them); for the others the class of the crop's centre voxel is
    drawn with probability proportional to `ratios` (one per class, background first; null: equal for
    every class), the centre uniformly among that class's voxels of the volume (MONAI
    `RandCropByLabelClassesd`), the crop moved inside the volume (nnU-Net's foreground oversampling,
    class-balanced). uniform: every crop's corner is drawn uniformly (small organs are rarely in a crop)."""

    sampler: Literal["classes", "uniform"] = "classes"
    ratios: tuple[NonNegativeFloat, ...] | None = None
    uniform_fraction: confloat(ge=0.0, le=1.0) = 0.5

    @field_validator("ratios")
    @classmethod
    def _some_positive(cls, ratios: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if ratios is not None and sum(ratios) <= 0:
            raise ValueError("at least one class needs a ratio > 0")
        return ratios


class AugmentSettings(StrictModel):
    """The `seg.augment` section: MONAI dictionary transforms on each training crop, image and label alike
    for the spatial ones (label resampled nearest), the image alone for the intensity ones.

    With `affine_prob` > 0 a crop of `crop_size + 2 * affine_margin` voxels is drawn and `RandAffined`
    (rotation up to `rotate_deg` per axis, isotropic scale by 1 +- `scale`) resamples its centre to
    `crop_size` (without rotation, the identical centre crop), so rotated crops have no empty corners."""

    enabled: bool = True
    flip_axes: tuple[Literal[0, 1, 2], ...] = ()  # array axes of the preprocessed volume (RAS: 0 = x); none by default
    flip_prob: Probability = 0.5  # per axis
    affine_prob: Probability = 0.2
    rotate_deg: NonNegativeFloat = 15.0
    scale: confloat(ge=0.0, lt=1.0) = 0.15
    affine_margin: NonNegativeInt = 8  # voxels of context on each side for the affine resampling
    intensity_prob: Probability = 0.15  # for the scale and the shift, each
    intensity_scale: NonNegativeFloat = 0.1  # image x (1 + U(-s, s))
    intensity_shift: NonNegativeFloat = 0.1  # image + U(-o, o) (images are in [0, 1])
    noise_prob: Probability = 0.15
    noise_std: NonNegativeFloat = 0.03


class SegSettings(StrictModel):
    """The `seg` section."""

    labels: dict[int, str] | None = None  # class value -> name, values 0..K-1; None: the manifest's labels
    labelled_volumes: PositiveInt | None = None  # labelled training volumes (per patient); None: all
    train_split: Split = "training"
    val_split: Split = "validation"
    test_split: Split = "test"
    pretrained_parts: Literal["auto", "encoder", "network"] = "auto"  # what --pretrained loads
    freeze_encoder_steps: NonNegativeInt = 0
    layer_decay: confloat(gt=0.0, le=1.0) = 1.0
    # decoupled weight decay toward the pretrained weights (L2-SP in AdamW's form): each step, every loaded tensor
    # moves lr x decay_to_pretrained of the way back to its pretrained value (instead of train.weight_decay's
    # pull toward zero); 0: off. The tensors a checkpoint did not provide keep train.weight_decay.
    decay_to_pretrained: NonNegativeFloat = 0.0
    lambda_dice: NonNegativeFloat = 1.0
    lambda_ce: NonNegativeFloat = 1.0
    class_weights: tuple[PositiveFloat, ...] | None = None  # one per class (background first); null: equal
    deep_supervision: bool = False
    crops: CropSettings = Field(default_factory=CropSettings)
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
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
