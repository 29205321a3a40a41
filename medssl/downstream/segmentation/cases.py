"""Which volumes a fine-tuning run uses, checked and loaded: classes, preprocessing (the checkpoint's wins),
the labelled volumes chosen per patient, evaluation cases on the input's grid."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.data import MetaTensor

from medssl.data import io
from medssl.data.checks import labelled_volume_problems, raise_first
from medssl.data.manifest import Manifest
from medssl.data.preprocessing import VolumeDataConfig, VolumePreprocessing
from medssl.data.store import VolumeStore
from medssl.data.volumes import patients_in_turn
from medssl.downstream.segmentation.config import SegSettings
from medssl.errors import UserError
from medssl.inference import SlidingWindowPredictor
from medssl.seeding import numpy_generator


_LABELLED_STREAM = 1  # random stream (with train.seed) of the labelled-volume choice


def class_names(settings: SegSettings, manifest: Manifest, source: str) -> dict[int, str]:
    """Class value -> name (`seg.labels`, else the manifest's `labels`); values must be 0..K-1, K >= 2."""
    labels = settings.labels if settings.labels is not None else {int(k): v for k, v in (manifest.labels or {}).items()}
    where = "seg.labels" if settings.labels is not None else f"{source}: labels"
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise UserError(f"{where}: segmentation needs class values 0..K-1 with K >= 2, got {sorted(labels)}")
    return dict(sorted(labels.items()))


def resolve_preprocessing(data: VolumeDataConfig, manifest: Manifest, stored: dict | None,
                          source: str) -> tuple[VolumePreprocessing, list[str]]:
    """The preprocessing to use and the warnings: the checkpoint's (`stored`) when given, else the config's.

    A warning names each field where the config differs from the checkpoint (fields that matter only:
    the window for CT, the percentiles for MR)."""
    ours = data.preprocessing(manifest.modality.get("0"))
    if stored is None:
        return ours, []
    theirs = VolumePreprocessing.from_dict(stored, where=source)
    notes = [f"data.{name}: the fine-tuning config has {mine!r} but the pretrained checkpoint {source} "
             f"was trained with {value!r}; using the checkpoint's {value!r}"
             for name, (mine, value) in ours.differences(theirs).items()]
    return theirs, notes


def select_labelled(entries: list[dict], count: int | None, seed: int, *, field: str = "seg.labelled_volumes"
                    ) -> list[dict]:
    """`count` entries chosen per patient: patients in a seeded order, round by round (each patient's
    first study, then each one's second, ...). Deterministic per seed; nested over count. None: all."""
    if count is None:
        return list(entries)
    if count > len(entries):
        raise UserError(f"{field}: {count} labelled volumes asked for, the training split has {len(entries)}")
    patients = sorted({entry["patient_id"] for entry in entries})
    order = [patients[k] for k in numpy_generator(seed, _LABELLED_STREAM).permutation(len(patients))]
    return patients_in_turn(entries, order)[:count]


def check_labelled(entry: dict, classes: dict[int, str], declared_in: str) -> tuple[io.Volume, io.Volume]:
    """Read an entry's image and label map; UserError naming the label file when the grids differ, the
    label map holds values outside `classes` or is empty (`medssl.data.checks`)."""
    image = io.read_volume(entry["image"])
    label = io.read_volume(entry["label"], label=True)
    raise_first(labelled_volume_problems(image, label, classes, entry["where"], declared_in))
    return image, label


@dataclass
class LoadedCase:
    """A case's volumes, read when it is evaluated and dropped after it (the image on the input's grid is read
    only where it is drawn: `Case.image`)."""

    label: np.ndarray  # (X, Y, Z) int on the input's grid
    preprocessed: MetaTensor  # (1, D, H, W) whole preprocessed image, with its transform trace


@dataclass
class Case:
    """One labelled volume for evaluation: what names it and its geometry; `load` reads its volumes, so a split
    of any size is evaluated one volume in memory at a time."""

    name: str  # image file name without .nii.gz etc.
    patient_id: str
    study_id: str
    image_path: Path
    label_path: Path
    affine: np.ndarray  # (4, 4) the input's
    spacing: tuple[float, float, float]

    def load(self, predictor: SlidingWindowPredictor) -> LoadedCase:
        """The label on the input's grid and the image preprocessed by `predictor` (which will invert the
        prediction)."""
        return LoadedCase(io.read_volume(self.label_path, label=True).array, predictor.preprocess(self.image_path))

    def image(self) -> np.ndarray:
        """The image (X, Y, Z) on the input's grid (for figures)."""
        return io.read_volume(self.image_path).array


def load_cases(entries: list[dict], classes: dict[int, str], declared_in: str) -> list[Case]:
    """Check labelled entries (dicts of `manifest_volume_entries(..., with_label=True)`) one at a time, before
    training (a bad one is a UserError naming it), keeping only what names them; their volumes are read again
    when evaluated (`Case.load`)."""
    cases = []
    for entry in entries:
        image, _ = check_labelled(entry, classes, declared_in)
        name = Path(entry["image"]).name.split(".")[0]
        cases.append(Case(name, entry["patient_id"], entry["study_id"], Path(entry["image"]), Path(entry["label"]),
                          image.affine, image.spacing))
    return cases


def stored_training_scans(store: VolumeStore, split: str, entries: list[dict], prep: VolumePreprocessing,
                          classes: dict[int, str], declared_in: str) -> list[str]:
    """The store's scans of `entries` (dicts of `manifest_volume_entries(manifest, split, with_label=True)`, whose
    ``where`` is ``split[i]``), each label map's values checked against `classes` from the store's class counts
    (the grid was checked when the store was written). UserError naming the label file otherwise."""
    stored = store.split(split)
    scans = []
    for entry in entries:
        scan = stored.scans[int(entry["where"][len(split) + 1: -1])]
        counts = store.scan(scan, pad_to=prep.crop_size, small_volume=prep.small_volume).class_counts
        undeclared = sorted(set(counts) - set(classes))
        if undeclared:
            raise UserError(f"{entry['label']}: {entry['where']}.label: value(s) {undeclared} not declared in "
                            f"{declared_in} (declared: {sorted(classes)})")
        if not set(counts) - {0}:
            raise UserError(f"{entry['label']}: {entry['where']}.label: label map is empty (every voxel 0)")
        scans.append(scan)
    return scans
