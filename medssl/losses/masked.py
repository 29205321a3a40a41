"""Masked-volume reconstruction through the whole segmentation network (encoder AND decoder).

Papers: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, sec. 3 (random patch
masking at a high ratio; the loss is the mean squared error between reconstruction and input, computed
on the masked patches only); Wald et al., "Revisiting MAE pre-training for 3D medical image
segmentation", CVPR 2025 (arXiv:2410.23132): the same objective for a 3D CNN U-Net, the whole network
pretrained and fine-tuned, with masked regions filled by a mask token; it beat a strong nnU-Net scratch
baseline by about 3 Dice points.

Here: each crop is cut into cubes of `block` voxels; a fraction `ratio` of the cubes (exactly
round(ratio x cubes) per crop) is replaced by a learned mask token (one value per input channel); the
MONAI segmentation network, built with as many output channels as input channels, predicts the crop and
the loss is the MSE on the masked voxels. The network is dense (no sparse convolutions), as a U-Net is
at fine-tuning time. Because the decoder is trained too, the whole network can be exported
(`network.pt`) and loaded by `medssl finetune seg` (only the output layer, whose shape depends on the
number of classes, starts from scratch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import PositiveInt, confloat

from medssl.losses.objective import ObjectiveConfig, ObjectiveContext, VolumeObjective, VolumeStep
from medssl.training.distributed import local_part


def block_mask(shape: Sequence[int], block: int, ratio: float, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Random cube mask: True where masked.

    Shape: shape (N, D, H, W) -> (N, 1, D, H, W) bool. The grid of ceil(size / block) cubes per axis is
    cut to the crop at the far edge; exactly round(ratio x cubes) cubes of each crop are masked, chosen
    uniformly by `generator` (on `device`)."""
    n, *spatial = (int(s) for s in shape)
    if len(spatial) != 3 or block < 1 or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"block_mask: expected (N, D, H, W), block >= 1 and 0 <= ratio <= 1, got {tuple(shape)}, "
                         f"{block}, {ratio}")
    grid = [math.ceil(s / block) for s in spatial]
    cells = math.prod(grid)
    masked = round(ratio * cells)
    order = torch.rand(n, cells, generator=generator, device=device).argsort(dim=1)
    flat = torch.zeros(n, cells, dtype=torch.bool, device=device)
    flat.scatter_(1, order[:, :masked], True)
    full = flat.view(n, 1, *grid)
    for axis in range(3):
        full = full.repeat_interleave(block, dim=2 + axis)
    return full[:, :, :spatial[0], :spatial[1], :spatial[2]]


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked voxels (all channels), in float32 (MAE's loss).

    Shape: prediction, target (N, C, D, H, W), mask (N, 1, D, H, W) bool -> scalar. No masked voxel: 0."""
    if prediction.shape != target.shape or mask.shape[2:] != target.shape[2:]:
        raise ValueError(f"masked_mse: prediction {tuple(prediction.shape)}, target {tuple(target.shape)} and mask "
                         f"{tuple(mask.shape)} do not fit")
    weight = mask.expand_as(target).float()
    squared = (prediction.float() - target.float()) ** 2
    return (squared * weight).sum() / weight.sum().clamp_min(1.0)


class MaskedConfig(ObjectiveConfig):
    """`objectives.masked`: masked-volume reconstruction through the whole network (off by default)."""

    weight: confloat(ge=0.0) = 0.0
    ratio: confloat(gt=0.0, lt=1.0) = 0.6  # share of the cubes masked
    block: PositiveInt = 4  # cube edge in voxels
    views: tuple[Literal["a", "b", "c", "d"], ...] = ("a", "b")  # the crops of each anchor reconstructed


class MaskedObjective(VolumeObjective):
    """{"masked": MSE on the masked cubes of the whole network's reconstruction of `views`}."""

    Config = MaskedConfig
    needs_network = True
    uses_encoder_pass = False

    def __init__(self, config: MaskedConfig, context: ObjectiveContext) -> None:
        super().__init__(config, context)
        self.mask_token = torch.nn.Parameter(torch.zeros(context.in_channels))

    def forward(self, step: VolumeStep) -> dict[str, torch.Tensor]:
        if step.network is None:
            raise RuntimeError("masked objective: the step carries no whole network")
        crops = torch.cat([step.batch[v] for v in self.config.views])
        views = len(self.config.views)
        mask = local_part(block_mask((views * step.ctx.world_size * step.anchors, *crops.shape[2:]), self.config.block,
                                     self.config.ratio, step.generator, device=crops.device),
                          step.ctx, groups=views)  # drawn for the global batch: this rank's rows
        token = self.mask_token.view(1, -1, 1, 1, 1).to(crops.dtype)
        masked = torch.where(mask, token, crops)
        return {"masked": masked_mse(step.network(masked), crops, mask)}
