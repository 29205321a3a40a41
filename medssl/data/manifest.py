"""Manifests: the JSON list of a cohort's files (DESIGN 3.4), its schema, building and checking.

A manifest is a superset of MONAI's decathlon datalist (``monai.data.load_decathlon_datalist``
reads it)::

    {"name": "...", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver"},
     "training": [{"image": "vol/P001_S1.nii.gz", "label": "seg/P001_S1.nii.gz",
                   "lesion_mask": "lesion/P001_S1.nii.gz", "patient_id": "P001", "study_id": "S1",
                   "report": "report text ...",
                   "signals": [{"path": "sig/P001_S1_T1", "format": "wfdb", "trial_id": "S1_T1"}]}],
     "validation": [], "test": []}

Paths are relative to the manifest's folder. ``report`` holds the report text itself, not a path.
``labels`` is optional (signal-only cohorts). Entries may carry any extra keys; they are kept.
A signal may also state ``"fs"`` (Hz; `check_manifest` then verifies the file's rate) and
``"allow_nan": true`` (the record holds invalid (NaN) samples on purpose: not reported by the check).

File names (used by `build_manifest`): a study is ``<patient>_S<n>`` (``P001_S1`` -> patient
``P001``, study ``S1``); any other stem is a patient of its own with no study (decathlon
``liver_003``). A signal record is ``<study or patient>_T<n>`` (``P001_S1_T1`` -> study ``P001_S1``,
trial ``S1_T1``); a record without a ``_T<n>`` suffix is a patient of its own (PhysioNet ``100``).
The trial id is the record name without its ``<patient>_`` prefix (the whole name when nothing is left).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator
from rich.progress import track

from medssl.atomic import write_json
from medssl.data import io
from medssl.errors import UserError, describe_error, validation_message

SPLITS = ("training", "validation", "test")
MASK_KEYS = ("label", "lesion_mask")  # volumes that must share the image's grid
AFFINE_TOLERANCE_MM = 1e-3
VOLUME_SUFFIXES = io.NIFTI_SUFFIXES + io.ITK_SUFFIXES
SIGNAL_SUFFIXES = {".hea": "wfdb", ".edf": "edf", ".bdf": "edf"}
STUDY_RE = re.compile(r"^(?P<patient>.+?)_(?P<study>S\d+)$")
TRIAL_RE = re.compile(r"^(?P<base>.+)_(?P<trial>T\d+)$")
_CHECK_THREADS = min(4, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------------ schema


class SignalRef(BaseModel):
    """One recorded trial: a signal file (WFDB record name without extension, EDF, CSV or NPY)."""

    model_config = ConfigDict(extra="forbid")

    path: str
    format: str
    trial_id: str = Field(min_length=1)
    fs: PositiveFloat | None = None  # Hz; when given, the file must be sampled at this rate
    allow_nan: bool = False  # the record has invalid (NaN) samples on purpose; check does not report them

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in io.SIGNAL_FORMATS:
            raise ValueError(f"must be one of {', '.join(io.SIGNAL_FORMATS)}")
        return value


class Entry(BaseModel):
    """One study of one patient: an image (+ label map, lesion mask, report) and/or signal trials."""

    model_config = ConfigDict(extra="allow")

    image: str | None = None
    label: str | None = None
    lesion_mask: str | None = None
    patient_id: str = Field(min_length=1)
    study_id: str | None = None
    report: str | None = None
    signals: list[SignalRef] = []


class Manifest(BaseModel):
    """A cohort: metadata plus the entries of each split; `root` is the folder paths are relative to."""

    model_config = ConfigDict(extra="allow")

    name: str
    modality: dict[str, str]
    labels: dict[str, str] | None = None
    training: list[Entry]
    validation: list[Entry] = []
    test: list[Entry] = []
    root: Path = Field(default_factory=Path.cwd, exclude=True)

    @field_validator("labels")
    @classmethod
    def _integer_keys(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key in value or {}:
            if not key.strip().lstrip("-").isdigit():
                raise ValueError(f"key {key!r} is not an integer label value")
        return value

    def split(self, name: str) -> list[Entry]:
        """Entries of split `name` (one of SPLITS)."""
        if name not in SPLITS:
            raise UserError(f"split: must be one of {', '.join(SPLITS)}, got {name!r}")
        return getattr(self, name)

    def path(self, rel: str) -> Path:
        """A manifest path resolved against the manifest's folder."""
        return _join(self.root, rel)

    def patients(self, split: str) -> list[str]:
        """Patient ids of `split`, each once, in order of first appearance."""
        return list(dict.fromkeys(entry.patient_id for entry in self.split(split)))

    def entries(self) -> Iterator[tuple[str, Entry]]:
        """(split name, entry) over all splits."""
        for name in SPLITS:
            for entry in self.split(name):
                yield name, entry


def _join(root: Path, rel: str) -> Path:
    """root / rel with '..' folded lexically (as MONAI's datalist loader does)."""
    return Path(os.path.normpath(root / rel))


def _validated_labels(labels: Any) -> dict[str, str] | None:
    """`labels` validated alone (raises ValidationError like the whole manifest would)."""
    return Manifest.model_validate({"name": "-", "modality": {}, "training": [], "labels": labels}).labels


# ------------------------------------------------------------------------------------------- load / write




def _read_json(path: Path) -> dict:
    """The manifest file as a dict; UserError naming the file for a missing file or bad JSON."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such manifest file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read manifest ({type(err).__name__}: {err})") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a JSON object, got {type(data).__name__}")
    return data


def _folder(path: Path) -> Path:
    return Path(os.path.abspath(path)).parent


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest; UserError naming the file and every bad key (one line)."""
    path = Path(path)
    data = _read_json(path)
    try:
        return Manifest.model_validate({**data, "root": _folder(path)})
    except ValidationError as err:
        raise UserError(f"{path}: " + validation_message(err)) from None


def _relative(value: str | None, folder: Path) -> str | None:
    return os.path.relpath(value, folder) if value and os.path.isabs(value) else value


def write_manifest(manifest: dict | Manifest, path: str | os.PathLike) -> None:
    """Validate and atomically write a manifest to `path`.

    Absolute file paths (as `build_manifest` returns) are stored relative to `path`'s folder,
    so the manifest and its files can move together. The input is not modified.
    """
    path = Path(path)
    data = manifest.model_dump(mode="json", exclude_none=True) if isinstance(manifest, Manifest) else manifest
    try:
        Manifest.model_validate(data)
    except ValidationError as err:
        raise UserError(f"{path}: manifest to write is invalid: "
                        + validation_message(err)) from None
    out = copy.deepcopy(data)
    folder = _folder(path)
    for name in SPLITS:
        for entry in out.get(name, []):
            for key in ("image", *MASK_KEYS):
                if key in entry:
                    entry[key] = _relative(entry[key], folder)
            for ref in entry.get("signals", []):
                ref["path"] = _relative(ref["path"], folder)
    write_json(path, out)


# ------------------------------------------------------------------------------------------------- build


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
        labels = _read_json(path).get("labels")
        if isinstance(labels, dict) and labels and all(isinstance(v, int) for v in labels.values()):
            labels = {str(v): k for k, v in labels.items()}
        return _validated_labels(labels)
    except UserError as err:
        problem = str(err)
    except ValidationError as err:
        problem = f"{path}: " + validation_message(err)
    warnings.append(f"{problem}; label names taken from the label maps instead")
    return None


def _split_patients(patients: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """patient -> split: seeded shuffle; at least one validation/test patient each when asked and >= 3 patients."""
    for key, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise UserError(f"{key}: must be in [0, 1), got {fraction}")
    patients = sorted(set(patients))
    n = len(patients)

    def count(fraction: float) -> int:
        return max(1, round(n * fraction)) if fraction > 0 and n >= 3 else round(n * fraction)

    n_val, n_test = count(val_fraction), count(test_fraction)
    if n - n_val - n_test < 1:
        raise UserError(f"val_fraction, test_fraction: {val_fraction} + {test_fraction} of {n} patient(s) "
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
    folder = Path(os.path.abspath(folder))
    warnings: list[str] = []

    def files(accepts: Callable[[str], bool], suffixes: tuple[str, ...], what: str, **kw: bool) -> dict[str, Path]:
        return _files_by_stem(_role_folders(folder, accepts), suffixes, what, warnings, **kw)

    images = files(lambda n: n == "vol" or n.startswith("images"), VOLUME_SUFFIXES, "volume", series_dirs=True)
    labels = files(lambda n: n == "seg" or n.startswith("labels"), VOLUME_SUFFIXES, "label map")
    lesions = files(lambda n: n == "lesion", VOLUME_SUFFIXES, "lesion mask")
    reports = files(lambda n: n in ("report", "reports"), (".txt",), "report")
    records = _signal_records(folder, warnings)
    if not images and not records:
        raise UserError(f"{folder}: found no volumes (in vol/ or images*/) and no signal records "
                        "(.hea, .edf, .bdf)")

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
            entries[stem]["report"] = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            warnings.append(f"{path}: cannot read report ({type(err).__name__}: {err}); skipped")

    split_of = _split_patients([e["patient_id"] for e in entries.values()], val_fraction, test_fraction, seed)
    manifest: dict[str, Any] = {"name": name or folder.name, "modality": {"0": modality}}
    label_maps = [Path(e["label"]) for e in entries.values() if "label" in e]
    if label_maps:
        manifest["labels"] = _label_names(folder, label_maps, warnings)
    for split in SPLITS:
        manifest[split] = [entries[stem] for stem in sorted(entries, key=lambda s: (entries[s]["patient_id"], s))
                           if split_of[entries[stem]["patient_id"]] == split]
    return manifest, warnings


# ------------------------------------------------------------------------------------------------- check


@dataclass
class Problem:
    """One problem found by `check_manifest`: the file it concerns and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _from_error(err: UserError, path: Path, where: str = "") -> Problem:
    """A reader's 'FILE: problem' UserError as a Problem for `where` (e.g. 'training[3].image')."""
    message = str(err)
    head, sep, tail = message.partition(": ")
    if sep and head.startswith(str(path)):  # the reader named the file (or its .hea/.dat sibling) first
        path, message = Path(head), tail
    return Problem(str(path), f"{where}: {message}" if where else message)


def _read_volume(path: Path, where: str, problems: list[Problem], *, label: bool = False) -> io.Volume | None:
    try:
        return io.read_volume(path, label=label)
    except UserError as err:
        problems.append(_from_error(err, path, where))
        return None


def _image_problems(image: io.Volume, where: str) -> list[Problem]:
    """NaN/inf voxels; a constant image."""
    problems = []
    finite = np.isfinite(image.array)
    if not finite.all():
        problems.append(Problem(str(image.path), f"{where}: {int((~finite).sum())} NaN/inf voxel(s)"))
    values = image.array[finite]
    if values.size and values.min() == values.max():
        problems.append(Problem(str(image.path), f"{where}: image is constant (every voxel {values.min():g})"))
    return problems


def _geometry_problems(mask: io.Volume, image: io.Volume, where: str) -> list[Problem]:
    """A mask must share the image's shape and affine (to AFFINE_TOLERANCE_MM)."""
    if mask.array.shape != image.array.shape:
        return [Problem(str(mask.path), f"{where}: shape {mask.array.shape} differs from the image's "
                                        f"{image.array.shape} ({image.path})")]
    gap = float(np.abs(mask.affine - image.affine).max())
    if gap > AFFINE_TOLERANCE_MM:
        return [Problem(str(mask.path), f"{where}: affine differs from the image's by up to {gap:.4g} mm "
                                        f"(tolerance {AFFINE_TOLERANCE_MM} mm; {image.path})")]
    return []


def _label_problems(label: io.Volume, declared: set[int] | None, where: str) -> list[Problem]:
    """Values not declared in `labels` (not checked when `declared` is None); an empty (all 0) label map."""
    values = {int(v) for v in np.unique(label.array)}
    problems = []
    undeclared = sorted(values - declared) if declared is not None else []
    if undeclared:
        problems.append(Problem(str(label.path), f"{where}: value(s) {undeclared} not declared in 'labels' "
                                                 f"(declared: {sorted(declared)})"))
    if values <= {0}:
        problems.append(Problem(str(label.path), f"{where}: label map is empty (every voxel 0)"))
    return problems


def _signal_problems(path: Path, ref: SignalRef, where: str, min_seconds: float) -> list[Problem]:
    """Unreadable file (incl. a WFDB header without its data file, a rate other than ref.fs), NaNs, too short."""
    try:
        signal = io.read_signal(path, ref.format, fs=ref.fs)
    except UserError as err:
        return [_from_error(err, path, where)]
    problems = []
    nan = np.isnan(signal.data)
    if nan.any() and not ref.allow_nan:
        channels = [name for name, row in zip(signal.channels, nan) if row.any()]
        problems.append(Problem(str(path), f"{where}: {int(nan.sum())} NaN sample(s) in channel(s) "
                                           f"{', '.join(channels)} (set \"allow_nan\": true if they are expected)"))
    if signal.duration < min_seconds:
        problems.append(Problem(str(path), f"{where}: {signal.duration:.3g} s long, shorter than "
                                           f"min_signal_seconds={min_seconds:g}"))
    return problems


@dataclass
class _Located:
    """An entry that passed the schema, with its split and its place in the file ('training[3]')."""

    split: str
    where: str
    entry: Entry


def _check_entry(root: Path, declared: set[int] | None, item: _Located, min_seconds: float) -> list[Problem]:
    """Open every file of one entry; `declared`: label values of `labels` (None: no valid `labels`)."""
    entry, where = item.entry, item.where
    problems: list[Problem] = []
    image = None
    if entry.image is not None:
        image = _read_volume(_join(root, entry.image), f"{where}.image", problems)
        problems += _image_problems(image, f"{where}.image") if image is not None else []
    for key in MASK_KEYS:
        if getattr(entry, key) is None:
            continue
        mask = _read_volume(_join(root, getattr(entry, key)), f"{where}.{key}", problems, label=True)
        if mask is None:
            continue
        if entry.image is None:
            problems.append(Problem(str(mask.path), f"{where}.{key}: entry has no image to go with it"))
        elif image is not None:
            problems += _geometry_problems(mask, image, f"{where}.{key}")
        if key == "label":
            problems += _label_problems(mask, declared, f"{where}.label")
    for j, ref in enumerate(entry.signals):
        problems += _signal_problems(_join(root, ref.path), ref, f"{where}.signals[{j}]", min_seconds)
    return problems


def _schema(path: Path, data: dict) -> tuple[list[_Located], set[int] | None, list[Problem]]:
    """One Problem per schema error; the entries valid on their own (with their original index) and the
    declared label values (None when `labels` is absent or invalid), so that files can still be checked."""
    try:
        Manifest.model_validate(data)
        problems = []
    except ValidationError as err:
        problems = [Problem(str(path), describe_error(e)) for e in err.errors()]
    located = []
    for split in SPLITS:
        items = data.get(split)
        for i, item in enumerate(items if isinstance(items, list) else []):
            try:
                located.append(_Located(split, f"{split}[{i}]", Entry.model_validate(item)))
            except ValidationError:
                pass  # reported above
    try:
        labels = _validated_labels(data.get("labels"))
    except ValidationError:
        labels = None  # reported above
    return located, None if labels is None else {int(key) for key in labels}, problems


def _cross_problems(path: Path, root: Path, data: dict, located: list[_Located]) -> list[Problem]:
    """Label maps without `labels`, entries with nothing to load, images listed twice, patients in more
    than one split."""
    problems = []
    labelled = sum(item.entry.label is not None for item in located)
    if labelled and data.get("labels") is None:
        problems.append(Problem(str(path), f"labels: missing, but {labelled} entries have a label map"))
    problems += [Problem(str(path), f"{item.where}: entry has neither an image nor signals")
                 for item in located if item.entry.image is None and not item.entry.signals]
    listed: dict[Path, list[str]] = {}
    for item in located:
        if item.entry.image is not None:
            listed.setdefault(_join(root, item.entry.image).resolve(), []).append(item.where)
    problems += [Problem(str(image), f"image listed {len(wheres)} times: {', '.join(wheres)}")
                 for image, wheres in listed.items() if len(wheres) > 1]
    splits: dict[str, list[str]] = {}
    for item in located:
        if item.split not in splits.setdefault(item.entry.patient_id, []):
            splits[item.entry.patient_id].append(item.split)
    problems += [Problem(str(path), f"patient {patient!r} is in more than one split: {' and '.join(names)}")
                 for patient, names in splits.items() if len(names) > 1]
    return problems


def check_manifest(path: str | os.PathLike, *, min_signal_seconds: float = 0.0,
                   progress: bool = False) -> list[Problem]:
    """Open every file of a manifest and return every problem found (empty list: the manifest is sound).

    Reports JSON and schema errors, missing or unreadable files, corrupt volumes, label maps or lesion
    masks whose shape or affine differ from the image's, undeclared label values, NaN or constant
    images, empty label maps, unreadable signals (incl. a WFDB header without its data file and a
    sampling rate other than the entry's `fs`), NaNs in signals (unless `allow_nan`), signals shorter than
    `min_signal_seconds`, images listed twice and patients in more than one split. Entries that
    fail the schema are reported and their files are not opened. Files are read in a few threads;
    `progress` shows a progress bar.
    """
    path = Path(path)
    if min_signal_seconds < 0:
        raise UserError(f"min_signal_seconds: must be >= 0, got {min_signal_seconds}")
    try:
        data = _read_json(path)
    except UserError as err:
        return [_from_error(err, path)]
    located, declared, problems = _schema(path, data)
    root = _folder(path)
    with ThreadPoolExecutor(max_workers=_CHECK_THREADS) as pool:
        found = pool.map(lambda item: _check_entry(root, declared, item, min_signal_seconds), located)
        for entry_problems in track(found, description="checking files", total=len(located),
                                    disable=not progress, transient=True):
            problems += entry_problems
    return problems + _cross_problems(path, root, data, located)
