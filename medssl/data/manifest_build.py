"""`medssl manifest build`: a manifest from a folder of files, with patient-independent splits.

File names: a study is ``<patient>_S<n>`` (``P001_S1`` -> patient ``P001``, study ``S1``); any
other stem is a patient of its own with no study (decathlon ``liver_003``). A signal record is
``<study or patient>_T<n>`` (``P001_S1_T1`` -> study ``P001_S1``, trial ``S1_T1``); a record without
a ``_T<n>`` suffix is a patient of its own (PhysioNet ``100``). The trial id is the record name
without its ``<patient>_`` prefix (the whole name when nothing is left).

Layout: role sub-folders (``vol/`` or ``images*/``, ``seg/`` or ``labels*/``, ``lesion/``, ``report(s)/``),
or a flat folder of scans: volume files directly in the folder are images, ``<stem>_seg`` /
``<stem>_label`` files beside them their label maps and ``<stem>.txt`` their reports.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from medssl.data import io
from medssl.data.manifest import SPLITS, read_json, validated_labels
from medssl.errors import UserError, validation_message

VOLUME_SUFFIXES = io.NIFTI_SUFFIXES + io.ITK_SUFFIXES
SIGNAL_SUFFIXES = {".hea": "wfdb", ".edf": "edf", ".bdf": "edf"}
STUDY_RE = re.compile(r"^(?P<patient>.+?)_(?P<study>S\d+)$")
TRIAL_RE = re.compile(r"^(?P<base>.+)_(?P<trial>T\d+)$")


def _stem(path: Path, suffixes: tuple[str, ...]) -> str | None:
    """File name without one of `suffixes` (case-insensitive), or None when it has none of them."""
    name = path.name
    for suffix in suffixes:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _ids(stem: str) -> dict[str, str]:
    """'P001_S1' -> {patient_id: 'P001', study_id: 'S1'}; any other stem is a patient with no study."""
    match = STUDY_RE.match(stem)
    return {"patient_id": match["patient"], "study_id": match["study"]} if match else {"patient_id": stem}


LABEL_SUFFIXES = ("_seg", "_label")  # flat folders: <stem>_seg.nii.gz is the label map of <stem>.nii.gz
MODALITIES = ("CT", "MR")


def _flat_folder(folder: Path, warnings: list[str]) -> tuple[dict[str, Path], dict[str, Path], dict[str, Path]]:
    """A flat folder of scans: (images, label maps, reports) by stem."""
    volumes = _files_by_stem([folder], VOLUME_SUFFIXES, "volume", [], series_dirs=False)
    volumes = {stem: path for stem, path in volumes.items() if path.is_file()}
    labels = {stem[: -len(s)]: path for stem, path in volumes.items() for s in LABEL_SUFFIXES if stem.endswith(s)}
    images = {stem: path for stem, path in volumes.items() if path not in labels.values()}
    reports = {p.stem: p for p in sorted(folder.glob("*.txt")) if p.stem in images}
    for path in sorted(folder.iterdir()) if images else ():
        if path.is_file() and not path.name.startswith(".") and path not in {*volumes.values(), *reports.values()} \
                and path.suffix.lower() not in SIGNAL_SUFFIXES and path.suffix.lower() != ".dat":
            warnings.append(f"{path}: not a volume, label map or report of a scan in this folder; skipped")
    return images, labels, reports


def _check_readable(paths: list[Path]) -> None:
    """Open each volume's header: a file that is not a volume, or not 3D, is a UserError naming it."""
    for path in paths:
        if path.is_dir():
            continue
        shape = io.read_shape(path)
        if len(shape) != 3 and not (len(shape) > 3 and all(n == 1 for n in shape[3:])):
            raise UserError(f"{path}: expected a 3D volume, got shape {shape}")


def _role_folders(folder: Path, accepts: Callable[[str], bool]) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_dir() and accepts(p.name.lower())]


def _files_by_stem(folders: list[Path], suffixes: tuple[str, ...], what: str, warnings: list[str], *,
                   series_dirs: bool = False) -> dict[str, Path]:
    """stem -> file in `folders`; other files are reported. `series_dirs`: sub-folders are DICOM series."""
    found: dict[str, Path] = {}
    for path in (p for folder in folders for p in sorted(folder.iterdir()) if not p.name.startswith(".")):
        stem = path.name if series_dirs and path.is_dir() else _stem(path, suffixes)
        if stem is None:
            warnings.append(f"{path}: not a {what} file ({', '.join(suffixes)}); skipped")
        elif stem in found:
            warnings.append(f"{path}: same name as {found[stem]}; skipped")
        else:
            found[stem] = path
    return found


def _signal_records(folder: Path, warnings: list[str]) -> dict[str, tuple[str, str]]:
    """Record name -> (path, format) for every .hea/.edf/.bdf under `folder` (WFDB paths without extension)."""
    records: dict[str, tuple[str, str]] = {}
    for path in sorted(folder.rglob("*")):
        fmt = SIGNAL_SUFFIXES.get(path.suffix.lower())
        if fmt is None or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        stem, target = path.stem, str(path.with_suffix("") if fmt == "wfdb" else path)
        if stem in records:
            warnings.append(f"{path}: same record name as {records[stem][0]}; skipped")
        else:
            records[stem] = (target, fmt)
    return records


def _label_names(folder: Path, label_maps: list[Path], warnings: list[str]) -> dict[str, str]:
    """Label names from a decathlon dataset.json, else 'label_<k>' for every value found in the maps."""
    names = _dataset_json_labels(folder / "dataset.json", warnings)
    if names is not None:
        return names
    values = {0}
    for path in label_maps:
        try:
            values.update(int(v) for v in np.unique(io.read_volume(path, label=True).array))
        except UserError as err:
            warnings.append(str(err))
    warnings.append(f"{folder}: label names unknown, named label_1 ... label_{max(values)}; "
                    "edit 'labels' in the manifest")
    return {str(v): "background" if v == 0 else f"label_{v}" for v in sorted(values)}


def _dataset_json_labels(path: Path, warnings: list[str]) -> dict[str, str] | None:
    """'labels' of a decathlon ({"1": "liver"}) or nnU-Net v2 ({"liver": 1}) dataset.json, if any."""
    if not path.is_file():
        return None
    try:
        labels = read_json(path).get("labels")
        if isinstance(labels, dict) and labels and all(isinstance(v, int) for v in labels.values()):
            labels = {str(v): k for k, v in labels.items()}
        return validated_labels(labels)
    except UserError as err:
        problem = str(err)
    except ValidationError as err:
        problem = f"{path}: " + validation_message(err)
    warnings.append(f"{problem}; label names taken from the label maps instead")
    return None


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for key, fraction in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise UserError(f"{key}: must be in [0, 1), got {fraction}")


def _split_patients(patients: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """patient -> split: seeded shuffle; at least one validation/test patient each when asked and >= 3 patients."""
    _check_fractions(val_fraction, test_fraction)
    patients = sorted(set(patients))
    n = len(patients)

    def count(fraction: float) -> int:
        return max(1, round(n * fraction)) if fraction > 0 and n >= 3 else round(n * fraction)

    n_val, n_test = count(val_fraction), count(test_fraction)
    if n - n_val - n_test < 1:
        raise UserError(f"--val-fraction, --test-fraction: {val_fraction} + {test_fraction} of {n} patient(s) "
                        "leaves no training patient")
    order = np.random.default_rng(seed).permutation(patients)
    return {str(p): "test" if i < n_test else "validation" if i < n_test + n_val else "training"
            for i, p in enumerate(order)}


def build_manifest(folder: str | os.PathLike, *, name: str | None = None, modality: str = "CT",
                   val_fraction: float = 0.2, test_fraction: float = 0.2,
                   seed: int = 0) -> tuple[dict, list[str]]:
    """Scan `folder` into a manifest dict with patient-independent splits; returns (manifest, warnings).

    Looks at sub-folders ``vol/`` or ``images*/`` (volumes or DICOM series folders), ``seg/`` or
    ``labels*/`` (label maps), ``lesion/`` (lesion masks, key ``lesion_mask``), ``report/`` or
    ``reports/`` (``.txt``, stored as text), and signal records (``.hea``, ``.edf``, ``.bdf``) anywhere
    below. Files are paired by name (see the module docstring). Paths in the dict are absolute;
    `write_manifest` stores them relative to the manifest file. Nothing is dropped silently: label
    maps, masks and reports without a matching image, and unrecognised files, are skipped and listed
    in the warnings. No volume and no signal found -> UserError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    if str(modality).upper() not in MODALITIES:
        raise UserError(f"--modality: {modality!r} is not one of {', '.join(MODALITIES)}")
    modality = str(modality).upper()
    _check_fractions(val_fraction, test_fraction)  # before any file is read
    folder = Path(os.path.abspath(folder))
    warnings: list[str] = []

    def files(accepts: Callable[[str], bool], suffixes: tuple[str, ...], what: str, **kw: bool) -> dict[str, Path]:
        return _files_by_stem(_role_folders(folder, accepts), suffixes, what, warnings, **kw)

    images = files(lambda n: n == "vol" or n.startswith("images"), VOLUME_SUFFIXES, "volume", series_dirs=True)
    labels = files(lambda n: n == "seg" or n.startswith("labels"), VOLUME_SUFFIXES, "label map")
    lesions = files(lambda n: n == "lesion", VOLUME_SUFFIXES, "lesion mask")
    reports = files(lambda n: n in ("report", "reports"), (".txt",), "report")
    if not images:
        images, labels, reports = _flat_folder(folder, warnings)
    records = _signal_records(folder, warnings)
    for path, fmt in records.values():
        io.check_signal_header(path, fmt)
    if not images and not records:
        raise UserError(f"{folder}: found no volumes (in vol/ or images*/, or volume files in the folder itself) "
                        "and no signal records (.hea, .edf, .bdf)")
    _check_readable([*images.values(), *labels.values(), *lesions.values()])

    entries: dict[str, dict[str, Any]] = {stem: {"image": str(path), **_ids(stem)} for stem, path in images.items()}
    for stem, (path, fmt) in records.items():
        match = TRIAL_RE.match(stem)
        base = match["base"] if match else stem
        entry = entries.setdefault(base, _ids(base))
        patient = entry["patient_id"]
        trial = stem[len(patient) + 1:] if stem.startswith(f"{patient}_") else stem
        entry.setdefault("signals", []).append({"path": path, "format": fmt, "trial_id": trial})
    for key, found, what in (("label", labels, "label map"), ("lesion_mask", lesions, "lesion mask")):
        for stem, path in found.items():
            if "image" in entries.get(stem, {}):
                entries[stem][key] = str(path)
            else:
                warnings.append(f"{path}: {what} without an image named {stem}; skipped")
    for stem, path in reports.items():
        if stem not in entries:
            warnings.append(f"{path}: report without an image or signal named {stem}; skipped")
            continue
        try:
            entries[stem]["report"] = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            warnings.append(f"{path}: cannot read report ({type(err).__name__}: {err}); skipped")

    split_of = _split_patients([e["patient_id"] for e in entries.values()], val_fraction, test_fraction, seed)
    manifest: dict[str, Any] = {"name": name or folder.name, **({"modality": {"0": modality}} if images else {})}
    label_maps = [Path(e["label"]) for e in entries.values() if "label" in e]
    if label_maps:
        manifest["labels"] = _label_names(folder, label_maps, warnings)
    for split in SPLITS:
        manifest[split] = [entries[stem] for stem in sorted(entries, key=lambda s: (entries[s]["patient_id"], s))
                           if split_of[entries[stem]["patient_id"]] == split]
    return manifest, warnings
