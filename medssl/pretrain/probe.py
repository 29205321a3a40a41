"""Proxy evaluation during pretraining: a frozen-feature organ probe.

Is pretraining helping? Every N steps, the frozen encoder's multi-scale features of a few held-out
labelled volumes are fitted by a linear classifier (ridge, closed form: milliseconds) to the organ labels on
some patients and scored on the others (voxel Dice averaged over the organ classes). Pretraining
never sees these labels: only this probe does, and only to report a number.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import Dataset
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from sklearn.linear_model import RidgeClassifier
from sklearn.preprocessing import StandardScaler

from medssl.data.manifest import Manifest
from medssl.data.preprocessing import VolumePreprocessing
from medssl.data.volumes import manifest_volume_entries, patients_in_turn, volume_transforms
from medssl.errors import UserError
from medssl.models.volume_encoders import VolumeEncoder
from medssl.seeding import numpy_generator


@torch.no_grad()
def probe_features(encoder: VolumeEncoder, image: torch.Tensor, *, stride: int = 2) -> torch.Tensor:
    """Multi-scale features of one volume on the grid of the given stride.

    image: (1, D, H, W) -> (C_total, D/stride, H/stride, W/stride): every feature map of the encoder,
    trilinearly resized to that grid and concatenated along channels.
    """
    maps = encoder(image[None].to(next(encoder.parameters()).device))
    size = tuple(s // stride for s in image.shape[1:])
    return torch.cat([F.interpolate(m.float(), size=size, mode="trilinear", align_corners=False)[0] for m in maps])


def label_grid(label: torch.Tensor, *, stride: int = 2) -> torch.Tensor:
    """Labels on the stride grid (nearest: the voxel at each cell's centre). label (1, D, H, W) -> (d, h, w)."""
    offset = stride // 2
    return label[0, offset::stride, offset::stride, offset::stride].long()


def mean_dice(pred: np.ndarray, truth: np.ndarray, classes: list[int]) -> float:
    """Mean over `classes` of the Dice between the voxels predicted and labelled as that class (MONAI's
    `compute_dice`; a class absent from both counts 1). pred, truth: (N,) integer labels."""
    k = int(max(pred.max(initial=0), truth.max(initial=0), *classes)) + 1
    p = one_hot(torch.as_tensor(pred.astype(np.int64))[None, None], k)
    t = one_hot(torch.as_tensor(truth.astype(np.int64))[None, None], k)
    dice = compute_dice(p, t, include_background=True, ignore_empty=False)[0]
    return float(dice[classes].mean())


class ProbeUnavailable(UserError):
    """The probe split cannot host the probe (no labelled volume, one patient): pretraining runs without it."""


def _require_two_patients(patients: set[str]) -> None:
    if len(patients) < 2:
        raise ProbeUnavailable(f"probe.split: its labelled volumes come from {len(patients)} patient(s); the probe "
                               "needs at least 2 (it fits on half of them and scores on the rest)")


class OrganProbe:
    """Fit on the volumes of the first half of the patients, score on the rest (patient-independent)."""

    def __init__(self, volumes: list[dict], *, stride: int = 2, voxels_per_class: int = 200, seed: int = 0):
        patients = sorted({v["patient_id"] for v in volumes})
        _require_two_patients(set(patients))
        fit_patients = set(patients[: len(patients) // 2])
        self.fit_volumes = [v for v in volumes if v["patient_id"] in fit_patients]
        self.test_volumes = [v for v in volumes if v["patient_id"] not in fit_patients]
        self.stride = stride
        self.voxels_per_class = voxels_per_class
        self.seed = seed

    @classmethod
    def from_manifest(cls, manifest: Manifest, split: str, prep: VolumePreprocessing, *, max_volumes: int = 4,
                      **options) -> OrganProbe:
        """Load up to `max_volumes` labelled volumes of `split` (centre crops of `prep.crop_size`), taking
        the patients in turn so that both halves of the probe have patients."""
        entries = patients_in_turn(manifest_volume_entries(manifest, split, with_label=True))[:max_volumes]
        if not entries:
            raise ProbeUnavailable(f"{manifest.root}: probe split '{split}' has no labelled volume")
        _require_two_patients({entry["patient_id"] for entry in entries})  # before any volume is read
        data = Dataset(entries, volume_transforms(prep, with_label=True))
        volumes = [{"image": item["image"].as_tensor(), "label": item["label"].as_tensor(),
                    "patient_id": entry["patient_id"]} for entry, item in zip(entries, data)]
        return cls(volumes, **options)

    def __call__(self, encoder: VolumeEncoder) -> dict[str, float]:
        """Fit and score the probe on `encoder`'s frozen features: {"probe_dice", "probe_accuracy"}."""
        was_training = encoder.training
        encoder.eval()
        rng = numpy_generator(self.seed)
        x_fit, y_fit = [], []
        for volume in self.fit_volumes:
            feats, labels = self._voxels(encoder, volume)
            for c in np.unique(labels):
                idx = np.flatnonzero(labels == c)
                idx = rng.choice(idx, size=min(len(idx), self.voxels_per_class), replace=False)
                x_fit.append(feats[idx])
                y_fit.append(labels[idx])
        scaler = StandardScaler().fit(np.concatenate(x_fit))
        classifier = RidgeClassifier(alpha=1.0).fit(scaler.transform(np.concatenate(x_fit)), np.concatenate(y_fit))
        dice, accuracy = [], []
        for volume in self.test_volumes:
            feats, labels = self._voxels(encoder, volume)
            pred = classifier.predict(scaler.transform(feats))
            classes = [int(c) for c in np.unique(labels) if c != 0]
            dice.append(mean_dice(pred, labels, classes))
            accuracy.append(float(np.mean([np.mean(pred[labels == c] == c) for c in np.unique(labels)])))
        encoder.train(was_training)
        return {"probe_dice": float(np.mean(dice)), "probe_accuracy": float(np.mean(accuracy))}

    def _voxels(self, encoder: VolumeEncoder, volume: dict) -> tuple[np.ndarray, np.ndarray]:
        """(N, C) features and (N,) labels of every voxel of the stride grid."""
        feats = probe_features(encoder, volume["image"], stride=self.stride)
        labels = label_grid(volume["label"], stride=self.stride)
        return feats.flatten(1).T.cpu().numpy(), labels.flatten().cpu().numpy()
