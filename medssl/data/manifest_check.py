"""`medssl manifest check`: open every file of a manifest and list every problem found.

The checks shared with training commands (label map against image, patient independence, image
values) are in `medssl.data.checks`; this module adds what only a whole-manifest check sees.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError
from rich.progress import track

from medssl.data import io
from medssl.data.checks import Problem, grid_problems, image_problems, label_problems, patient_split_problems
from medssl.data.manifest import (MASK_KEYS, SPLITS, Entry, Manifest, SignalRef, join_path, manifest_folder, read_json,
                                  validated_labels)
from medssl.errors import UserError, describe_error

_CHECK_THREADS = min(4, os.cpu_count() or 1)


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
        image = _read_volume(join_path(root, entry.image), f"{where}.image", problems)
        problems += image_problems(image, f"{where}.image") if image is not None else []
    for key in MASK_KEYS:
        if getattr(entry, key) is None:
            continue
        mask = _read_volume(join_path(root, getattr(entry, key)), f"{where}.{key}", problems, label=True)
        if mask is None:
            continue
        if entry.image is None:
            problems.append(Problem(str(mask.path), f"{where}.{key}: entry has no image to go with it"))
        elif image is not None:
            problems += grid_problems(mask, image, f"{where}.{key}")
        if key == "label":
            problems += label_problems(mask, declared, f"{where}.label")
    for j, ref in enumerate(entry.signals):
        problems += _signal_problems(join_path(root, ref.path), ref, f"{where}.signals[{j}]", min_seconds)
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
        labels = validated_labels(data.get("labels"))
    except ValidationError:
        labels = None  # reported above
    return located, None if labels is None else {int(key) for key in labels}, problems


def _cross_problems(path: Path, root: Path, data: dict, located: list[_Located]) -> list[Problem]:
    """Label maps without `labels`, entries with nothing to load, images listed twice, patients in more
    than one split."""
    problems = []
    modality = data.get("modality") if isinstance(data.get("modality"), dict) else {}
    if any(item.entry.image is not None for item in located) and str(modality.get("0", "")).upper() not in ("CT", "MR"):
        problems.append(Problem(str(path), f"modality: {modality.get('0')!r} for the volumes is not CT or MR (their "
                                "intensity normalisation follows it)"))
    if isinstance(data.get("training"), list) and not data["training"]:
        problems.append(Problem(str(path), "training: the split is empty; every training command needs entries"))
    labelled = sum(item.entry.label is not None for item in located)
    if labelled and data.get("labels") is None:
        problems.append(Problem(str(path), f"labels: missing, but {labelled} entries have a label map"))
    problems += [Problem(str(path), f"{item.where}: entry has neither an image nor signals")
                 for item in located if item.entry.image is None and not item.entry.signals]
    listed: dict[Path, list[str]] = {}
    for item in located:
        if item.entry.image is not None:
            listed.setdefault(join_path(root, item.entry.image).resolve(), []).append(item.where)
    problems += [Problem(str(image), f"image listed {len(wheres)} times: {', '.join(wheres)}")
                 for image, wheres in listed.items() if len(wheres) > 1]
    by_split: dict[str, list[str]] = {}
    for item in located:
        by_split.setdefault(item.split, []).append(item.entry.patient_id)
    problems += patient_split_problems(by_split, str(path))
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
        data = read_json(path)
    except UserError as err:
        return [_from_error(err, path)]
    located, declared, problems = _schema(path, data)
    root = manifest_folder(path)
    with ThreadPoolExecutor(max_workers=_CHECK_THREADS) as pool:
        found = pool.map(lambda item: _check_entry(root, declared, item, min_signal_seconds), located)
        for entry_problems in track(found, description="checking files", total=len(located),
                                    disable=not progress, transient=True):
            problems += entry_problems
    return problems + _cross_problems(path, root, data, located)
