"""Checks that several commands share, each written once with one wording.

A check returns `Problem`s (the file it concerns and what is wrong) so that `manifest check` can
list every problem of a cohort, while a training command raises the first one (`raise_first`)
before it writes anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from medssl.data import io
from medssl.errors import UserError

if TYPE_CHECKING:
    from medssl.data.manifest import Manifest

AFFINE_TOLERANCE_MM = 1e-3


@dataclass
class Problem:
    """One problem: the file (or manifest) it concerns and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def raise_first(problems: list[Problem]) -> None:
    """UserError with the first problem (and how many more there are)."""
    if problems:
        more = f" (and {len(problems) - 1} more problem(s): run medssl manifest check)" if len(problems) > 1 else ""
        raise UserError(f"{problems[0]}{more}")


def image_problems(image: io.Volume, where: str) -> list[Problem]:
    """NaN/inf voxels; a constant image. (The voxel size is checked when any volume is read:
    `io.check_geometry`.)"""
    problems = []
    finite = np.isfinite(image.array)
    bad = finite.size - int(np.count_nonzero(finite))
    if bad:
        problems.append(Problem(str(image.path), f"{where}: {bad} NaN/inf voxel(s)"))
    values = image.array[finite] if bad else image.array  # no copy of a clean image (a CT is 300 MB)
    if values.size and values.min() == values.max():
        problems.append(Problem(str(image.path), f"{where}: image is constant (every voxel {values.min():g})"))
    return problems


def grid_problems(mask: io.Volume, image: io.Volume, where: str) -> list[Problem]:
    """A label map or mask must share the image's shape and affine (to AFFINE_TOLERANCE_MM)."""
    if mask.array.shape != image.array.shape:
        return [Problem(str(mask.path), f"{where}: shape {mask.array.shape} differs from the image's "
                                        f"{image.array.shape} ({image.path})")]
    gap = float(np.abs(mask.affine - image.affine).max())
    if gap > AFFINE_TOLERANCE_MM:
        return [Problem(str(mask.path), f"{where}: affine differs from the image's by up to {gap:.4g} mm "
                                        f"(tolerance {AFFINE_TOLERANCE_MM} mm; {image.path}); resample it onto "
                                        "the image grid")]
    return []


def label_problems(label: io.Volume, declared: Iterable[int] | None, where: str,
                   declared_in: str = "'labels'") -> list[Problem]:
    """Values not declared (in `declared_in`; not checked when `declared` is None); an empty (all 0) label map."""
    values = {int(v) for v in np.unique(label.array)}
    problems = []
    undeclared = sorted(values - set(declared)) if declared is not None else []
    if undeclared:
        problems.append(Problem(str(label.path), f"{where}: value(s) {undeclared} not declared in {declared_in} "
                                                 f"(declared: {sorted(declared)})"))
    if values <= {0}:
        problems.append(Problem(str(label.path), f"{where}: label map is empty (every voxel 0)"))
    return problems


def labelled_volume_problems(image: io.Volume, label: io.Volume, declared: Iterable[int] | None, where: str,
                             declared_in: str = "'labels'") -> list[Problem]:
    """A label map against its image: same grid, declared values, not empty."""
    return grid_problems(label, image, f"{where}.label") + label_problems(label, declared, f"{where}.label",
                                                                           declared_in)


def patient_split_problems(patients_by_split: Mapping[str, Iterable[str]], source: str) -> list[Problem]:
    """One Problem per patient found in more than one split. patients_by_split: split name -> patient ids."""
    splits_of: dict[str, list[str]] = {}
    for split, patients in patients_by_split.items():
        for patient in patients:
            if split not in splits_of.setdefault(patient, []):
                splits_of[patient].append(split)
    return [Problem(source, f"patient {patient!r} is in more than one split: {' and '.join(names)}")
            for patient, names in splits_of.items() if len(names) > 1]


def require_patient_independent(manifest: Manifest, splits: Iterable[str], source: str) -> None:
    """UserError naming the first patient of `manifest` found in more than one of `splits`."""
    raise_first(patient_split_problems({split: manifest.patients(split) for split in splits}, source))
