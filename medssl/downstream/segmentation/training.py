"""Fine-tuning pieces for the shared Trainer: the network (and its pretrained weights), deep-supervision
heads, training crops (class-balanced or uniform) with MONAI augmentation, the Dice + CE objective,
layer-wise learning-rate groups, weight decay toward the pretrained weights."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.transforms import (
    Compose,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.transforms.utils import generate_label_classes_crop_centers
from monai.utils import MAX_SEED
from torch import nn
from torch.utils.data import Dataset

from medssl.data.preprocessing import VolumePreprocessing
from medssl.data.store import StoredScan, VolumeStore, spread_locations
from medssl.downstream.segmentation.config import AugmentSettings, CropSettings, FinetuneSegConfig
from medssl.errors import UserError
from medssl.models.volume_encoders import BACKBONES, VolumeEncoder, VolumeEncoderConfig, build_segmentation_network
from medssl.seeding import derive_seed, numpy_generator
from medssl.training.loop import ParamGroup, StepOutput, warmup_cosine
from medssl.training.pretrained import EncoderLoadReport, load_pretrained

DEEP_SUPERVISION_LEVELS = 2  # decoder maps with auxiliary heads: the two finest below full resolution
_AUGMENT_STREAM = 1  # random stream (with seed, i) of the class sampler and the augmentation


def build_network(config: FinetuneSegConfig, classes: int, pretrained: Path | None
                  ) -> tuple[nn.Module, EncoderLoadReport | None]:
    """The segmentation network (seeded by train.seed), with deep-supervision heads when asked, and, with
    `pretrained`, the load report of its encoder or whole network (`seg.pretrained_parts`)."""
    torch.manual_seed(config.train.seed)
    network = build_segmentation_network(config.model, classes)
    if config.seg.deep_supervision:
        network.deep_supervision = DeepSupervisionHeads(network, config.model, classes)
    if pretrained is None:
        return network, None
    return network, load_pretrained(network, pretrained, arch=config.model, parts=config.seg.pretrained_parts,
                                    min_fraction=1.0, field_name="seg.pretrained_parts")


class DeepSupervisionHeads(nn.Module):
    """1x1x1 convolutions giving class logits from the decoder's `DEEP_SUPERVISION_LEVELS` finest maps below
    full resolution (`VolumeEncoder.decoder_maps`), captured by forward hooks on those decoder blocks.

    Attached to the network as its `deep_supervision` child, so its weights travel in the network's state
    dict; the network's output (and inference) is unchanged. `outputs()`: the logits of the last forward
    pass, finest first."""

    def __init__(self, network: nn.Module, cfg: VolumeEncoderConfig, classes: int):
        super().__init__()
        maps = BACKBONES[cfg.name].decoder_maps(cfg)[-DEEP_SUPERVISION_LEVELS:][::-1]
        self.heads = nn.ModuleList(nn.Conv3d(channels, classes, kernel_size=1) for _, channels, _ in maps)
        self.strides = [stride for _, _, stride in maps]
        self._maps: list[torch.Tensor | None] = [None] * len(maps)
        for level, (name, _, _) in enumerate(maps):
            network.get_submodule(name).register_forward_hook(functools.partial(self._keep, level))

    def _keep(self, level: int, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._maps[level] = output

    def outputs(self) -> list[torch.Tensor]:
        if any(m is None for m in self._maps):
            raise RuntimeError("deep supervision: no decoder maps captured (run the network first)")
        return [head(m) for head, m in zip(self.heads, self._maps)]


# ------------------------------------------------------------------------------------------------ crops


class TensorSegVolumes:
    """In-memory (1, D, H, W) images and label maps as `SegBatches` volumes, each zero-padded to at least `crop`
    (centred) and then by `margin` on every side. Class locations: `medssl.data.store.spread_locations` of each
    class's voxels in the volume itself (not its padding)."""

    def __init__(self, images: list[torch.Tensor], labels: list[torch.Tensor], crop: Sequence[int], margin: int,
                 classes: int | None) -> None:
        self.images = [_pad(_pad_to(image, crop), margin) for image in images]
        self.labels = [_pad(_pad_to(label, crop), margin) for label in labels]
        self.offsets = [[max(0, c - n) // 2 + margin for n, c in zip(label.shape[1:], crop)] for label in labels]
        self.unpadded = [label[0].numpy() for label in labels]
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def shape(self, k: int) -> tuple[int, int, int]:
        return tuple(self.images[k].shape[1:])  # type: ignore[return-value]

    def read(self, k: int, start: Sequence[int], size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        window = (slice(None),) + tuple(slice(a, a + c) for a, c in zip(start, size))
        return self.images[k][window], self.labels[k][window]

    def class_locations(self, k: int) -> list[np.ndarray]:
        label, shape = self.unpadded[k], self.shape(k)
        places = [np.unravel_index(spread_locations(np.flatnonzero(label.ravel() == c)), label.shape)
                  for c in range(self.classes or 0)]
        return [np.ravel_multi_index(tuple(a + o for a, o in zip(place, self.offsets[k])), shape) for place in places]


class StoredSegVolumes:
    """Labelled scans of a preprocessed store (`medssl.data.store`) as `SegBatches` volumes, padded as
    `TensorSegVolumes` pads, read a crop at a time; class locations from the store's side files (the same:
    `spread_locations` of the volume's own voxels, padding excluded)."""

    def __init__(self, store: VolumeStore, scans: Sequence[str], crop: Sequence[int], margin: int,
                 classes: int | None, small_volume: str = "pad") -> None:
        self.store, self.scans, self.crop, self.margin = store, list(scans), tuple(crop), margin
        self.classes, self.small_volume = classes, small_volume

    def __len__(self) -> int:
        return len(self.scans)

    def _scan(self, k: int) -> StoredScan:
        return self.store.scan(self.scans[k], pad_to=self.crop, small_volume=self.small_volume)

    def shape(self, k: int) -> tuple[int, int, int]:
        return tuple(n + 2 * self.margin for n in self._scan(k).shape)  # type: ignore[return-value]

    def read(self, k: int, start: Sequence[int], size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        scan = self._scan(k)
        lo = np.asarray(start, np.int64) - self.margin
        hi = lo + np.asarray(size, np.int64)
        return torch.from_numpy(scan.image(lo, hi))[None], torch.from_numpy(scan.label(lo, hi))[None]

    def class_locations(self, k: int) -> list[np.ndarray]:
        scan, shape = self._scan(k), self.shape(k)
        return [np.ravel_multi_index(tuple((scan.class_locations(c) + self.margin).T), shape)
                if scan.class_counts.get(c) else np.zeros(0, np.int64) for c in range(self.classes or 0)]


class SegBatches(Dataset):
    """Micro-batch i: `size` training crops of `crop` from the labelled volumes, drawn by (seed, i).

    images, labels: (1, D, H, W) tensors, each at least `crop` per axis (smaller ones are zero-padded to
    the sampled size), or `StoredSegVolumes` (`from_store`: scans of the preprocessed store, read a crop at a
    time; the same crops as from the same volumes in memory). For each crop a volume is drawn uniformly, then
    the crop's place:
    - `crops.sampler` "classes": with probability `crops.uniform_fraction` as "uniform", else a class with
      probability proportional to `crops.ratios` (None: equal; classes absent from the volume are
      skipped), the centre uniformly among its voxels (MONAI's `generate_label_classes_crop_centers`, the
      centre picker of `RandCropByLabelClassesd`, over at most `CLASS_LOCATIONS` voxels per class evenly
      spread over them: what the store keeps), the crop moved inside the volume;
    - "uniform": the corner uniformly (the original sampler: with `augment` None the crops are exactly
      those of the code before class-balanced sampling).
    `augment` (enabled): `augmentation(augment, crop)`; with an affine step the sampled crop is larger by
    `affine_margin` on each side (the volumes are zero-padded by as much, so its centre ranges as a crop's
    would) and the affine resamples its centre. Item: {"image": (B, 1, *crop) float32,
    "label": (B, 1, *crop) int64}."""

    def __init__(self, images: list[torch.Tensor] | StoredSegVolumes, labels: list[torch.Tensor] | None = None, *,
                 crop: Sequence[int], size: int, seed: int, classes: int | None = None,
                 crops: CropSettings | None = None, augment: AugmentSettings | None = None):
        crops = crops or CropSettings(sampler="uniform")
        self.crop, self.size, self.seed = tuple(crop), size, seed
        self.augment = augmentation(augment, self.crop) if augment is not None and augment.enabled else None
        self.margin = augment.affine_margin if self.augment is not None and augment.affine_prob > 0 else 0
        self.sampled = tuple(c + 2 * self.margin for c in self.crop)
        # the margin is added on every side, so the larger crops are centred where the crops would be
        if isinstance(images, StoredSegVolumes):
            images.margin = self.margin
            self.volumes: TensorSegVolumes | StoredSegVolumes = images
        else:
            self.volumes = TensorSegVolumes(images, labels or [], self.crop, self.margin, classes)
        self.ratios, self.uniform_fraction = None, crops.uniform_fraction
        if crops.sampler == "classes":
            if classes is None:
                raise ValueError("SegBatches: the class sampler needs the number of classes")
            ratios = list(crops.ratios) if crops.ratios is not None else [1.0] * classes
            if len(ratios) != classes:
                raise UserError(f"seg.crops.ratios: {len(ratios)} values given, one per class is needed ({classes})")
            for k in range(len(self.volumes)):
                if not any(len(ix) and r > 0 for ix, r in zip(self.volumes.class_locations(k), ratios)):
                    raise UserError(f"seg.crops.ratios: labelled volume {k} holds no class with a ratio > 0")
            self.ratios = ratios

    @classmethod
    def from_store(cls, store: VolumeStore, scans: Sequence[str], prep: VolumePreprocessing, *, classes: int,
                   augment: AugmentSettings | None = None, **options: Any) -> SegBatches:
        """The batches over labelled `scans` of a preprocessed store, crops of ``prep.crop_size``."""
        return cls(StoredSegVolumes(store, scans, prep.crop_size, 0, classes, prep.small_volume), crop=prep.crop_size,
                   classes=classes, augment=augment, **options)

    def __len__(self) -> int:
        return 10**12

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = numpy_generator(self.seed, i)
        if self.ratios is None and self.augment is None:  # the original uniform crops, draw for draw
            images, labels = [], []
            for _ in range(self.size):
                k = int(rng.integers(len(self.volumes)))
                image, label = self._uniform(k, rng)
                images.append(image)
                labels.append(label)
            return {"image": torch.stack(images).float(), "label": torch.stack(labels).long()}
        monai_seed = derive_seed(self.seed, i, _AUGMENT_STREAM) % MAX_SEED
        centres = np.random.RandomState(monai_seed)  # the random state MONAI's set_random_state(seed) makes
        if self.augment is not None:
            self.augment.set_random_state(seed=monai_seed + 1)
        images, labels = [], []
        for _ in range(self.size):
            k = int(rng.integers(len(self.volumes)))
            if self.ratios is None or rng.random() < self.uniform_fraction:
                image, label = self._uniform(k, rng)
            else:
                centre = generate_label_classes_crop_centers(self.sampled, 1, self.volumes.shape(k),
                                                             self.volumes.class_locations(k), self.ratios, centres,
                                                             warn=False)[0]
                start = [int(c) - s // 2 for c, s in zip(centre, self.sampled)]
                image, label = (_cropped(x, start) for x in self.volumes.read(k, start, self.sampled))
            item = {"image": image, "label": label.float()}
            if self.augment is not None:
                item = self.augment(item)
            images.append(torch.as_tensor(item["image"]).float())
            labels.append(torch.as_tensor(item["label"]).round().long())
        return {"image": torch.stack(images), "label": torch.stack(labels)}

    def _uniform(self, k: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        shape = self.volumes.shape(k)
        start = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, self.sampled)]
        return self.volumes.read(k, start, self.sampled)


def _cropped(crop: torch.Tensor, start: Sequence[int]) -> MetaTensor:
    """A crop as MONAI's `SpatialCrop` returns it from a volume without meta data (identity affine): a
    `MetaTensor` whose affine is shifted to `start`, so the augmentation's resampling sees what it always saw."""
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, 3] = torch.as_tensor(start, dtype=torch.float64)
    return MetaTensor(crop, affine=affine)


def augmentation(settings: AugmentSettings, crop: Sequence[int]) -> Compose:
    """MONAI dictionary transforms on {"image", "label"} (1, ...) crops: RandAffined (image bilinear, label
    nearest; output `crop`, the centre of a larger input), RandFlipd per axis of `flip_axes` (both keys),
    then on the image only RandScaleIntensityd, RandShiftIntensityd and RandGaussianNoised."""
    keys = ["image", "label"]
    steps = []
    if settings.affine_prob > 0:
        rotate = float(np.deg2rad(settings.rotate_deg))
        steps.append(RandAffined(keys, prob=settings.affine_prob, rotate_range=(rotate,) * 3,
                                 scale_range=(settings.scale,) * 3, spatial_size=tuple(crop),
                                 mode=("bilinear", "nearest"), padding_mode="border"))
    steps += [RandFlipd(keys, prob=settings.flip_prob, spatial_axis=axis) for axis in settings.flip_axes]
    steps += [RandScaleIntensityd("image", factors=settings.intensity_scale, prob=settings.intensity_prob),
              RandShiftIntensityd("image", offsets=settings.intensity_shift, prob=settings.intensity_prob),
              RandGaussianNoised("image", prob=settings.noise_prob, std=settings.noise_std)]
    return Compose(steps)


def _pad_to(volume: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Zero-pad (1, D, H, W) symmetrically to at least `size` per axis."""
    short = [max(0, c - s) for s, c in zip(volume.shape[1:], size)]
    if not any(short):
        return volume
    pad = [p for n in reversed(short) for p in (n // 2, n - n // 2)]
    return F.pad(volume, pad)


def _pad(volume: torch.Tensor, margin: int) -> torch.Tensor:
    """Zero-pad (1, D, H, W) by `margin` voxels on every side."""
    return F.pad(volume, [margin] * 6) if margin else volume


# ------------------------------------------------------------------------------------------------ objective


class DiceCEObjective:
    """`monai.losses.DiceCELoss` (softmax, one-hot target, optional class weights) as a Trainer objective,
    wrapped in `monai.losses.DeepSupervisionLoss` (weights 1, 1/2, 1/4 fine to coarse, labels resized
    nearest) when `deep_supervision` heads are given; logs the Dice and CE terms of the final output."""

    def __init__(self, lambda_dice: float, lambda_ce: float, *, class_weights: Sequence[float] | None = None,
                 deep_supervision: DeepSupervisionHeads | None = None):
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce,
                               weight=weight)
        self.heads = deep_supervision
        self.deep = DeepSupervisionLoss(self.loss, weight_mode="exp") if deep_supervision is not None else None

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> StepOutput:
        logits = model(batch["image"]).float()
        if self.deep is not None:
            loss = self.deep([logits, *self.heads.outputs()], batch["label"].float())
        else:
            loss = self.loss(logits, batch["label"])
        with torch.no_grad():
            terms = {"dice": self.loss.dice(logits, batch["label"]), "ce": self.loss.ce(logits, batch["label"])}
        return StepOutput(loss=loss, terms=terms, items=int(batch["image"].shape[0]))


# ------------------------------------------------------------------------------------------------ groups


def encoder_stages(encoder: VolumeEncoder) -> list[nn.Module]:
    """The encoder's stages, fine to coarse: its `parts`, a ModuleList part giving one stage per element."""
    stages: list[nn.Module] = []
    for part in encoder.parts:
        module = getattr(encoder, part)
        stages.extend(module if isinstance(module, nn.ModuleList) else [module])
    return stages


def layerwise_param_groups(network: nn.Module, encoder: VolumeEncoder, layer_decay: float,
                           to_pretrained: frozenset[int] = frozenset()) -> list[ParamGroup]:
    """Trainer groups: decoder and head at scale 1 ("head"), encoder stage i of S at layer_decay^(S - i)
    ("stage<i>"); biases and norm weights (ndim <= 1) without weight decay (".no_decay"); the parameters whose
    id is in `to_pretrained` without weight decay toward zero either (".to_pretrained": `DecayToPretrained`
    pulls them back to their pretrained values). The first group is at scale 1 (its lr is the logged `lr`)."""
    stages = encoder_stages(encoder)
    stage_of = {id(p): i for i, stage in enumerate(stages) for p in stage.parameters()}
    buckets: dict[tuple[int, int], list[nn.Parameter]] = {}
    for p in network.parameters():  # kind: 0 decayed toward zero, 1 no decay, 2 decayed toward the pretrained value
        kind = 2 if id(p) in to_pretrained else int(p.ndim <= 1)
        buckets.setdefault((stage_of.get(id(p), len(stages)), kind), []).append(p)
    groups = []
    for (stage, kind), params in sorted(buckets.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        name = ("head" if stage == len(stages) else f"stage{stage}") + ("", ".no_decay", ".to_pretrained")[kind]
        groups.append(ParamGroup(name, params, lr_scale=layer_decay ** (len(stages) - stage), weight_decay=kind == 0))
    return groups


class DecayToPretrained:
    """Decoupled weight decay toward the pretrained weights (L2-SP, Li et al., ICML 2018, eq. 3, in AdamW's
    decoupled form): after optimiser step t, each parameter p of `groups`' ".to_pretrained" groups moves to
    p - lr_t * strength * (p - p0), p0 its value when this object was made (the pretrained weights), lr_t the
    learning rate of step t for its group (train.lr x group scale x warm-up/cosine factor). A Trainer
    `after_step`; frozen parameters (no gradient) are left alone, as AdamW leaves them."""

    def __init__(self, groups: list[ParamGroup], strength: float, *, lr: float, warmup: int, total: int):
        self.pulled = [(p, p.detach().clone(), group.lr_scale) for group in groups
                       if group.name.endswith(".to_pretrained") for p in group.params]
        self.strength, self.lr, self.warmup, self.total = strength, lr, warmup, total

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int) -> None:
        factor = self.lr * self.strength * warmup_cosine(step - 1, warmup=self.warmup, total=self.total)
        for p, start, scale in self.pulled:
            if p.requires_grad:
                p.sub_(min(1.0, factor * scale) * (p - start.to(p.device)))


def pretrained_parameters(network: nn.Module, report: EncoderLoadReport | None) -> frozenset[int]:
    """ids of the network's parameters that `report` says were loaded from the checkpoint."""
    if report is None:
        return frozenset()
    loaded = set(report.loaded)
    return frozenset(id(p) for name, p in network.named_parameters() if name in loaded)
