"""Fine-tuning pieces for the shared Trainer: the network (and its pretrained encoder), random crops,
the Dice + CE objective, layer-wise learning-rate groups."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import Dataset

from medssl.downstream.segmentation.config import FinetuneSegConfig
from medssl.models.volume_encoders import (EncoderLoadReport, VolumeEncoder, build_segmentation_network,
                                          load_pretrained_encoder)
from medssl.seeding import numpy_generator
from medssl.training.loop import ParamGroup, StepOutput


def build_network(config: FinetuneSegConfig, classes: int, pretrained: Path | None
                  ) -> tuple[nn.Module, EncoderLoadReport | None]:
    """The segmentation network (seeded by train.seed) and, with `pretrained`, its encoder's load report."""
    torch.manual_seed(config.train.seed)
    network = build_segmentation_network(config.model, classes)
    if pretrained is None:
        return network, None
    return network, load_pretrained_encoder(network, pretrained, arch=config.model, min_fraction=1.0)


class SegBatches(Dataset):
    """Micro-batch i: `size` random crops of `crop` from the labelled volumes, drawn by (seed, i).

    images, labels: (1, D, H, W) tensors, each at least `crop` per axis. Item: {"image": (B, 1, *crop)
    float32, "label": (B, 1, *crop) int64}."""

    def __init__(self, images: list[torch.Tensor], labels: list[torch.Tensor], *, crop: Sequence[int], size: int,
                 seed: int):
        self.images, self.labels, self.crop, self.size, self.seed = images, labels, tuple(crop), size, seed

    def __len__(self) -> int:
        return 10**12

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = numpy_generator(self.seed, i)
        images, labels = [], []
        for _ in range(self.size):
            k = int(rng.integers(len(self.images)))
            shape = self.images[k].shape[1:]
            start = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, self.crop)]
            window = (slice(None),) + tuple(slice(a, a + c) for a, c in zip(start, self.crop))
            images.append(self.images[k][window])
            labels.append(self.labels[k][window])
        return {"image": torch.stack(images).float(), "label": torch.stack(labels).long()}


class DiceCEObjective:
    """`monai.losses.DiceCELoss` (softmax, one-hot target) as a Trainer objective; logs both terms."""

    def __init__(self, lambda_dice: float, lambda_ce: float):
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> StepOutput:
        logits = model(batch["image"]).float()
        loss = self.loss(logits, batch["label"])
        with torch.no_grad():
            terms = {"dice": self.loss.dice(logits, batch["label"]), "ce": self.loss.ce(logits, batch["label"])}
        return StepOutput(loss=loss, terms=terms, items=int(batch["image"].shape[0]))


def encoder_stages(encoder: VolumeEncoder) -> list[nn.Module]:
    """The encoder's stages, fine to coarse: its `parts`, a ModuleList part giving one stage per element."""
    stages: list[nn.Module] = []
    for part in encoder.parts:
        module = getattr(encoder, part)
        stages.extend(module if isinstance(module, nn.ModuleList) else [module])
    return stages


def layerwise_param_groups(network: nn.Module, encoder: VolumeEncoder, layer_decay: float) -> list[ParamGroup]:
    """Trainer groups: decoder and head at scale 1 ("head"), encoder stage i of S at layer_decay^(S - i)
    ("stage<i>"); biases and norm weights (ndim <= 1) without weight decay (".no_decay"). The first
    group is at scale 1 (its lr is the logged `lr`)."""
    stages = encoder_stages(encoder)
    stage_of = {id(p): i for i, stage in enumerate(stages) for p in stage.parameters()}
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for p in network.parameters():
        buckets.setdefault((stage_of.get(id(p), len(stages)), p.ndim > 1), []).append(p)
    groups = []
    for (stage, decay), params in sorted(buckets.items(), key=lambda kv: (-kv[0][0], not kv[0][1])):
        name = ("head" if stage == len(stages) else f"stage{stage}") + ("" if decay else ".no_decay")
        groups.append(ParamGroup(name, params, lr_scale=layer_decay ** (len(stages) - stage), weight_decay=decay))
    return groups
