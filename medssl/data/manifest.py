"""Manifests: the JSON list of a cohort's files (DESIGN 3.4): schema, load and write.

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

Building a manifest from a folder: `medssl.data.manifest_build`; opening and checking every file:
`medssl.data.manifest_check`.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator

from medssl.atomic import write_json
from medssl.data import io
from medssl.errors import UserError, validation_message

SPLITS = ("training", "validation", "test")
MASK_KEYS = ("label", "lesion_mask")  # volumes that must share the image's grid


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
    modality: dict[str, str] = {}  # channel -> CT or MR for volumes (`manifest check` says so); free for signals
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
        return join_path(self.root, rel)

    def patients(self, split: str) -> list[str]:
        """Patient ids of `split`, each once, in order of first appearance."""
        return list(dict.fromkeys(entry.patient_id for entry in self.split(split)))

    def entries(self) -> Iterator[tuple[str, Entry]]:
        """(split name, entry) over all splits."""
        for name in SPLITS:
            for entry in self.split(name):
                yield name, entry


def join_path(root: Path, rel: str) -> Path:
    """root / rel with '..' folded lexically (as MONAI's datalist loader does)."""
    return Path(os.path.normpath(root / rel))


def validated_labels(labels: Any) -> dict[str, str] | None:
    """`labels` validated alone (raises ValidationError like the whole manifest would)."""
    return Manifest.model_validate({"name": "-", "modality": {}, "training": [], "labels": labels}).labels


# ------------------------------------------------------------------------------------------- load / write


def require_manifest_file(path: Path | None) -> None:
    """UserError unless `path` is None or an existing file: checked before long work that reads it later."""
    if path is not None and not Path(path).is_file():
        raise UserError(f"{path}: no such manifest file")


def read_json(path: Path) -> dict:
    """The manifest file as a dict; UserError naming the file for a missing file or bad JSON."""
    try:
        text = path.read_text(encoding="utf-8")
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


def manifest_folder(path: Path) -> Path:
    return Path(os.path.abspath(path)).parent


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest; UserError naming the file and every bad key (one line)."""
    path = Path(path)
    data = read_json(path)
    try:
        return Manifest.model_validate({**data, "root": manifest_folder(path)})
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
    folder = manifest_folder(path)
    for name in SPLITS:
        for entry in out.get(name, []):
            for key in ("image", *MASK_KEYS):
                if key in entry:
                    entry[key] = _relative(entry[key], folder)
            for ref in entry.get("signals", []):
                ref["path"] = _relative(ref["path"], folder)
    write_json(path, out)
