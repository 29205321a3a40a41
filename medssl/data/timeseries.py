"""Physiological signals for hierarchical contrastive learning: recordings -> windows -> batches.

Vocabulary (COMET levels): a *patient* has *trials* (one recording each, e.g. one session); a trial is
cut into *samples*: windows of ``window`` time steps, the encoder's input; a window's time steps are
its *observations*. `WindowDataset` serves windows with their patient, trial and sample indices;
`HierarchicalBatchSampler` draws batches of P patients x R trials x S windows, re-drawn every epoch,
so that losses can build their positive masks on the device from the collated index tensors
(``batch["patient"][:, None] == batch["patient"][None, :]``, likewise for trials and samples).

Memory stays flat in the number and length of recordings: `load_recordings` writes each resampled
recording to a `RecordingStore` (``.npy`` files, `data.store` or a temporary folder) and keeps it only as
a read-only memory map, so one recording at a time is in RAM while reading; `WindowDataset` keeps
per-trial counts and computes each window's trial and start from its index (the per-window index
tensors are built only when asked for); `HierarchicalBatchSampler` draws from those counts.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medssl.atomic import atomic_path, write_json
from medssl.data import io
from medssl.data.store import TemporaryFolder
from medssl.errors import UserError
from medssl.seeding import torch_generator

if TYPE_CHECKING:
    from medssl.data.manifest import Entry, Manifest
    from medssl.data.preprocessing import SignalDataConfig

NAN_POLICIES = ("error", "mask")
SHORT_POLICIES = ("error", "skip")
FLAT_POLICIES = ("error", "keep")


@dataclass
class Recording:
    """One trial of one patient: a (C, T) signal and the patient's class label (None if unknown)."""

    patient_id: str
    trial_id: str
    signal: io.Signal
    label: int | None = None


class RecordingStore:
    """Resampled recordings as ``.npy`` files in `folder` (a temporary folder, removed at exit, when None),
    each read back as a read-only memory map: `put(key, data)` -> the (C, T) float32 memmap. A file is named by
    the hash of its recording's path, size, modification time and the resampling (`key`), so a later run
    with the same `folder` reads it without resampling again; files are written atomically."""

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        if folder is None:
            self.temporary = TemporaryFolder("medssl-signals-")
            folder = self.temporary.path
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"data.store: cannot create {self.folder} ({err.strerror or err})") from None

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        """The stored recording, or None when there is none (or it is unreadable: it is then rewritten)."""
        try:
            return np.load(self.path(key), mmap_mode="r")
        except (OSError, ValueError):
            return None

    def put(self, key: str, data: np.ndarray) -> np.ndarray:
        try:
            with atomic_path(self.path(key)) as tmp:
                np.save(tmp, np.ascontiguousarray(data, dtype=np.float32))
        except OSError as err:
            raise UserError(f"data.store: cannot write {self.path(key)} ({err.strerror or err})") from None
        return np.load(self.path(key), mmap_mode="r")


def _recording_key(path: Path, ref_format: str | None, fs: float, channels: list[str] | None, missing: str) -> str:
    try:
        info = os.stat(path)
        stamp = [info.st_size, info.st_mtime_ns]
    except OSError:
        stamp = None  # a WFDB record is several files: the reader names what is missing
    fields = [str(path), stamp, ref_format, fs, channels, missing, 1]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:24]


def load_recordings(manifest: Manifest, split: str, *, fs: float, channels: list[str] | None,
                    missing_channels: str = "error", store: RecordingStore | None = None) -> list[Recording]:
    """Every signal of `split` in `manifest` (a `medssl.data.manifest.Manifest`), resampled to `fs` Hz.

    `channels` selects channels by name (case-insensitive, in that order; `missing_channels`
    "error" | "zeros" as in `io.select_channels`); None keeps them all, and then every recording
    must have the same channel names. The label is the entry's ``condition`` field when present.
    With `store`, each recording's data is its memory map in the store (one recording in RAM at a time).
    """
    recordings = []
    for index, entry in enumerate(manifest.split(split)):
        label = _condition(entry, f"manifest {manifest.root}: {split}[{index}].condition")
        for ref in entry.signals:
            path = manifest.path(ref.path)
            key = _recording_key(path, ref.format, fs, channels, missing_channels) if store is not None else ""
            stored = store.get(key) if store is not None else None
            meta = store.folder / f"{key}.json" if store is not None else None
            if stored is not None and meta is not None and meta.is_file():
                info = json.loads(meta.read_text(encoding="utf-8"))
                signal = io.Signal(stored, fs, info["channels"], info["units"], Path(info["path"]), info["meta"])
            else:
                signal = io.resample_signal(io.read_signal(path, ref.format, fs=ref.fs), fs)
                if channels is not None:
                    signal = io.select_channels(signal, channels, missing=missing_channels)
                if store is not None:
                    signal = io.Signal(store.put(key, signal.data), signal.fs, signal.channels, signal.units,
                                       signal.path, signal.meta)
                    write_json(meta, {"channels": list(signal.channels), "units": list(signal.units),
                                      "path": str(signal.path), "meta": json.loads(json.dumps(signal.meta,
                                                                                              default=str))})
            recordings.append(Recording(entry.patient_id, ref.trial_id, signal, label))
    if channels is None:
        _same_channel_names(recordings)
    return recordings


def _condition(entry: Entry, field: str) -> int | None:
    value = getattr(entry, "condition", None)
    if value is None:
        return None
    if isinstance(value, (bool, int)) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    raise UserError(f"{field}: expected an integer class label, got {value!r}")


def _same_channel_names(recordings: list[Recording]) -> None:
    if not recordings:
        return
    first = recordings[0].signal
    for rec in recordings[1:]:
        if [c.lower() for c in rec.signal.channels] != [c.lower() for c in first.channels]:
            raise UserError(f"{rec.signal.path}: channels {rec.signal.channels} differ from {first.channels} of "
                            f"{first.path}; choose channels by name (data.channels)")


class WindowDataset(Dataset):
    """Windows of `recordings`: item i -> ``{"x": (C, window) float32, "patient": int, "trial": int,
    "sample": int, "label": int}``.

    ``window`` and ``stride`` (default: ``window``, no overlap) are in samples; a tail shorter than a
    window is not used. ``patient`` indexes `patient_ids`, ``trial`` indexes `trial_ids`
    ("patient/trial", one per recording), ``sample`` is the global window index (= i, unique, so the
    same window drawn twice into a batch is recognisable), ``label`` is -1 when unknown.

    Policies, each reported rather than silent:
    - ``nan``: "error" -> UserError naming the file; "mask" -> windows with any NaN are dropped and
      counted in `dropped_nan` (a recording left with no window is listed in `skipped`).
    - ``short``: a recording shorter than one window: "error" -> UserError naming the file;
      "skip" -> listed in `skipped` (one-line messages naming the file).
    - ``flat``: channels constant over a whole recording (std 0, NaNs ignored; e.g. zero-filled
      missing channels) are listed in `flat_channels` as (patient_id, trial_id, channel);
      "error" -> UserError naming the file and channels; "keep" -> used as they are.

    Per trial: `trial_patient`, `trial_count` (windows), `trial_first` (index of its first window; one more
    entry, the total), `trial_label` (n_trials,) int64; a window's trial and start are computed from its
    index (`locate`). Per-window index tensors (N,) int64, built when first asked for: `patient_index`,
    `trial_index`, `sample_index`, `start` (first time step in its recording), `labels`.
    The recordings stay as they came (`load_recordings` with a store: memory maps; their pages are released
    after the checks here), so memory does not grow with the number or length of recordings.
    """

    def __init__(self, recordings: Sequence[Recording], *, window: int, stride: int | None = None,
                 nan: str = "error", short: str = "error", flat: str = "keep") -> None:
        self.window = _positive_int("window", window)
        self.stride = self.window if stride is None else _positive_int("stride", stride)
        for field, value, allowed in (("nan", nan, NAN_POLICIES), ("short", short, SHORT_POLICIES),
                                      ("flat", flat, FLAT_POLICIES)):
            if value not in allowed:
                raise UserError(f"{field}: must be one of {', '.join(allowed)}, got {value!r}")
        self.nan, self.short, self.flat = nan, short, flat
        if not recordings:
            raise UserError("recordings: no signal recordings to window (does the split list any signals?)")
        first = recordings[0].signal
        self.fs, self.channels = first.fs, list(first.channels)
        self.patient_ids: list[str] = []
        self.trial_ids: list[str] = []
        self.skipped: list[str] = []
        self.flat_channels: list[tuple[str, str, str]] = []
        self.dropped_nan = 0
        self._data: list[np.ndarray] = []
        self._paths: dict[str, str] = {}
        self._patient_of: dict[str, int] = {}
        self._irregular: dict[int, np.ndarray] = {}  # trial -> kept window starts, where NaN windows were dropped
        trial_patient, counts, labels = [], [], []
        for rec in recordings:
            self._check_compatible(rec.signal, first)
            kept = self._window_starts(rec)
            _release(rec.signal.data)
            if kept is None:
                continue
            patient = self._register(rec)
            if len(kept) != (rec.signal.data.shape[1] - self.window) // self.stride + 1:
                self._irregular[len(self.trial_ids) - 1] = kept
            trial_patient.append(patient)
            counts.append(len(kept))
            labels.append(-1 if rec.label is None else int(rec.label))
        if not self.trial_ids:
            raise UserError(f"recordings: no window of {self.window} samples left in any recording; "
                            f"skipped: {'; '.join(self.skipped)}")
        self.trial_patient = torch.tensor(trial_patient, dtype=torch.long)
        self.trial_count = torch.tensor(counts, dtype=torch.long)
        self.trial_first = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(self.trial_count, 0)])
        self.trial_label = torch.tensor(labels, dtype=torch.long)

    def locate(self, i: int) -> tuple[int, int]:
        """(trial, start) of window `i`."""
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")
        trial = int(torch.searchsorted(self.trial_first, i, right=True)) - 1
        k = i - int(self.trial_first[trial])
        return trial, int(self._irregular[trial][k]) if trial in self._irregular else k * self.stride

    @cached_property
    def trial_index(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(self.trial_ids)), self.trial_count)

    @cached_property
    def patient_index(self) -> torch.Tensor:
        return self.trial_patient[self.trial_index]

    @cached_property
    def sample_index(self) -> torch.Tensor:
        return torch.arange(len(self))

    @cached_property
    def labels(self) -> torch.Tensor:
        return self.trial_label[self.trial_index]

    @cached_property
    def start(self) -> torch.Tensor:
        return torch.tensor([self.locate(i)[1] for i in range(len(self))], dtype=torch.long)

    def _check_compatible(self, signal: io.Signal, first: io.Signal) -> None:
        if signal.data.ndim != 2 or signal.data.shape[0] != first.data.shape[0]:
            raise UserError(f"{signal.path}: signal shape {signal.data.shape} does not match the "
                            f"{first.data.shape[0]} channels of {first.path}")
        if not np.isclose(signal.fs, first.fs):
            raise UserError(f"{signal.path}: sampled at {signal.fs:g} Hz but {first.path} at {first.fs:g} Hz; "
                            "resample every recording to one rate first")

    def _window_starts(self, rec: Recording) -> np.ndarray | None:
        """Start offsets of the usable windows of `rec`, or None if it has none (reported)."""
        data, path = rec.signal.data, rec.signal.path
        length = data.shape[1]
        if length < self.window:
            message = (f"{path}: {length} samples ({length / rec.signal.fs:g} s) is shorter than one window "
                       f"of {self.window} samples")
            if self.short == "error":
                raise UserError(message + "; set data.short=skip to leave it out, or a shorter data.window_seconds")
            self.skipped.append(message)
            return None
        self._check_flat(rec)
        starts = np.arange(0, length - self.window + 1, self.stride)
        bad = np.isnan(data).any(axis=0)
        if not bad.any():
            return starts
        if self.nan == "error":
            raise UserError(f"{path}: {int(bad.sum())} time steps contain NaN (first at "
                            f"{np.argmax(bad) / rec.signal.fs:.2f} s); set data.nan=mask to drop windows with NaN")
        counts = np.concatenate([[0], np.cumsum(bad)])
        kept = starts[counts[starts + self.window] == counts[starts]]
        self.dropped_nan += len(starts) - len(kept)
        if len(kept) == 0:
            self.skipped.append(f"{path}: every one of its {len(starts)} windows contains NaN")
            return None
        return kept

    def _check_flat(self, rec: Recording) -> None:
        data = rec.signal.data
        missing = np.isnan(data)
        low = np.where(missing, np.inf, data).min(axis=1)
        high = np.where(missing, -np.inf, data).max(axis=1)
        flat = [name for name, lo, hi in zip(rec.signal.channels, low, high) if lo == hi]
        if flat and self.flat == "error":
            raise UserError(f"{rec.signal.path}: flat-lined channel(s) {', '.join(flat)} (constant over the "
                            "whole recording); set data.flat=keep to use them anyway")
        self.flat_channels += [(rec.patient_id, rec.trial_id, name) for name in flat]

    def _register(self, rec: Recording) -> int:
        """Add `rec` as a new trial; returns its patient index."""
        trial_id = f"{rec.patient_id}/{rec.trial_id}"
        if trial_id in self._paths:
            raise UserError(f"{rec.signal.path}: trial {trial_id} appears twice (also {self._paths[trial_id]}); "
                            "trial ids must be unique within a patient")
        self._paths[trial_id] = str(rec.signal.path)
        if rec.patient_id not in self._patient_of:
            self._patient_of[rec.patient_id] = len(self.patient_ids)
            self.patient_ids.append(rec.patient_id)
        self.trial_ids.append(trial_id)
        self._data.append(rec.signal.data)
        return self._patient_of[rec.patient_id]

    def __len__(self) -> int:
        return int(self.trial_first[-1])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        trial, start = self.locate(int(i))
        x = torch.from_numpy(np.array(self._data[trial][:, start:start + self.window], dtype=np.float32))
        return {"x": x, "patient": int(self.trial_patient[trial]), "trial": trial, "sample": int(i),
                "label": int(self.trial_label[trial])}


def _release(data: np.ndarray) -> None:
    """Drop the pages of a memory-mapped array from this process (they are read again from the file if needed)."""
    base = data
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if isinstance(base, mmap.mmap) and hasattr(base, "madvise"):
        base.madvise(mmap.MADV_DONTNEED)


def _positive_int(field: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise UserError(f"{field}: must be a positive whole number, got {value!r}")
    return int(value)


class HierarchicalBatchSampler(Sampler[list[int]]):
    """Batches of `patients` distinct patients x `trials` trials each x `samples` windows each.

    A batch lists its P*R*S dataset indices patient-major: ``reshape(P, R, S)`` groups them.
    Trials (windows) are drawn without replacement when the patient (trial) has enough, otherwise
    each one is used once and the rest drawn with replacement (equal ``sample`` ids mark repeats).
    Draws come from a torch.Generator seeded with (seed, epoch). Iterating uses the current epoch and
    then advances it, so a loop that never calls `set_epoch` still re-draws every epoch;
    `set_epoch(e)` picks the epoch of the next iteration (same (seed, e) -> same batches).
    ``len()`` is `batches_per_epoch`, or ``len(dataset) // (P * R * S)`` (at least 1).
    Use as ``DataLoader(dataset, batch_sampler=sampler)``.
    """

    def __init__(self, dataset: WindowDataset, *, patients: int, trials: int, samples: int,
                 batches_per_epoch: int | None = None, seed: int = 0) -> None:
        self.patients = _positive_int("patients", patients)
        self.trials = _positive_int("trials", trials)
        self.samples = _positive_int("samples", samples)
        self.batch_size = self.patients * self.trials * self.samples
        available = len(dataset.patient_ids)
        if self.patients > available:
            raise UserError(f"patients: {self.patients} patients per batch, but the dataset has only {available} "
                            f"patient(s) ({', '.join(dataset.patient_ids[:10])})")
        if batches_per_epoch is None:
            self.num_batches = max(1, len(dataset) // self.batch_size)
        else:
            self.num_batches = _positive_int("batches_per_epoch", batches_per_epoch)
        self.seed = int(seed)
        self.epoch = 0
        self._first, self._count = dataset.trial_first.tolist(), dataset.trial_count.tolist()
        trial_order = torch.argsort(dataset.trial_patient, stable=True)
        self._trials_of = list(torch.split(trial_order, torch.bincount(dataset.trial_patient).tolist()))

    def set_epoch(self, epoch: int) -> None:
        """Use `epoch` for the next iteration."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch_generator(self.seed, self.epoch)
        self.epoch += 1
        return (self.batch(generator) for _ in range(self.num_batches))

    def batch(self, generator: torch.Generator) -> list[int]:
        """The next batch drawn from `generator` (an epoch's batches: `torch_generator(seed, epoch)`, then one
        call per batch)."""
        batch: list[int] = []
        for patient in _draw(len(self._trials_of), self.patients, generator).tolist():
            trials = self._trials_of[patient]
            for trial in trials[_draw(len(trials), self.trials, generator)].tolist():
                batch += (self._first[trial] + _draw(self._count[trial], self.samples, generator)).tolist()
        return batch


def _draw(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """`k` indices into range(`n`): distinct when k <= n, else each index once plus k - n repeats. (k,) int64."""
    if k <= n:
        return torch.randperm(n, generator=generator)[:k]
    return torch.cat([torch.randperm(n, generator=generator), torch.randint(n, (k - n,), generator=generator)])


def signal_windows(data: SignalDataConfig, splits: str | Sequence[str], *,
                   manifest: Manifest | None = None) -> tuple[WindowDataset, list[str]]:
    """The windows of one or more manifest splits (preprocessed per `data`) and the notes to report
    (skipped records, dropped windows, ...)."""
    from medssl.data.manifest import load_manifest

    splits = [splits] if isinstance(splits, str) else list(splits)
    manifest = manifest or load_manifest(data.manifest)
    store = RecordingStore(data.store)
    recordings = [rec for split in splits
                  for rec in load_recordings(manifest, split, fs=data.fs, channels=data.channels,
                                             missing_channels=data.missing_channels, store=store)]
    name = "+".join(splits)
    if not recordings:
        raise UserError(f"{data.manifest}: split {name} has no signal recordings")
    window, stride = data.window_samples()
    windows = WindowDataset(recordings, window=window, stride=stride, nan=data.nan, short=data.short, flat=data.flat)
    windows.store = store  # the memory maps' folder lives as long as the windows
    return windows, dataset_notes(windows, name)


def dataset_notes(windows: WindowDataset, split: str) -> list[str]:
    """One line per thing the user must know: skipped recordings, windows dropped for NaN, flat
    channels, single-trial patients (the trial level has no trial-specific positive for them)."""
    notes = [f"{split}: skipped {line}" for line in windows.skipped]
    if windows.dropped_nan:
        notes.append(f"{split}: {windows.dropped_nan} window(s) containing NaN dropped (data.nan: mask)")
    flat: dict[str, list[str]] = {}
    for patient, trial, channel in windows.flat_channels:
        flat.setdefault(f"{patient}/{trial}", []).append(channel)
    notes += [f"{split}: flat-lined (or zero-filled) channel(s) {', '.join(channels)} in {trial}"
              for trial, channels in flat.items()]
    trials = torch.bincount(windows.trial_patient, minlength=len(windows.patient_ids))
    single = [windows.patient_ids[i] for i in torch.nonzero(trials == 1).flatten().tolist()]
    if single:
        notes.append(f"{split}: {len(single)} of {len(trials)} patient(s) have one trial only "
                     f"({', '.join(single[:5])}{', ...' if len(single) > 5 else ''}): the trial level is skipped "
                     "for them (counted as trial_skipped_patients in metrics.jsonl)")
    return notes
