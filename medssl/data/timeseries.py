"""Physiological signals for hierarchical contrastive learning: recordings -> windows -> batches.

Vocabulary (COMET levels): a *patient* has *trials* (one recording each, e.g. one session); a trial is
cut into *samples*: windows of ``window`` time steps, the encoder's input; a window's time steps are
its *observations*. `WindowDataset` serves windows with their patient, trial and sample indices;
`HierarchicalBatchSampler` draws batches of P patients x R trials x S windows, re-drawn every epoch,
so that losses can build their positive masks on the device from the collated index tensors
(``batch["patient"][:, None] == batch["patient"][None, :]``, likewise for trials and samples).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medssl.data import io
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


def load_recordings(manifest: Manifest, split: str, *, fs: float, channels: list[str] | None,
                    missing_channels: str = "error") -> list[Recording]:
    """Every signal of `split` in `manifest` (a `medssl.data.manifest.Manifest`), resampled to `fs` Hz.

    `channels` selects channels by name (case-insensitive, in that order; `missing_channels`
    "error" | "zeros" as in `io.select_channels`); None keeps them all, and then every recording
    must have the same channel names. The label is the entry's ``condition`` field when present.
    """
    recordings = []
    for index, entry in enumerate(manifest.split(split)):
        label = _condition(entry, f"manifest {manifest.root}: {split}[{index}].condition")
        for ref in entry.signals:
            signal = io.resample_signal(io.read_signal(manifest.path(ref.path), ref.format, fs=ref.fs), fs)
            if channels is not None:
                signal = io.select_channels(signal, channels, missing=missing_channels)
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

    Per-window index tensors (N,) int64: `patient_index`, `trial_index`, `sample_index`, `start`
    (first time step in its recording), `labels`; per trial: `trial_patient` (n_trials,).
    The recordings are held in memory as (C, T) float32 tensors.
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
        self._data: list[torch.Tensor] = []
        self._paths: dict[str, str] = {}
        trial_patient, starts, trial_of_window, labels = [], [], [], []
        for rec in recordings:
            self._check_compatible(rec.signal, first)
            kept = self._window_starts(rec)
            if kept is None:
                continue
            patient = self._register(rec)
            trial_patient.append(patient)
            starts.append(kept)
            trial_of_window.append(np.full(len(kept), len(self.trial_ids) - 1))
            labels.append(np.full(len(kept), -1 if rec.label is None else int(rec.label)))
        if not self.trial_ids:
            raise UserError(f"recordings: no window of {self.window} samples left in any recording; "
                            f"skipped: {'; '.join(self.skipped)}")
        self.trial_patient = torch.tensor(trial_patient, dtype=torch.long)
        self.trial_index = torch.from_numpy(np.concatenate(trial_of_window)).long()
        self.patient_index = self.trial_patient[self.trial_index]
        self.sample_index = torch.arange(len(self.trial_index))
        self.start = torch.from_numpy(np.concatenate(starts)).long()
        self.labels = torch.from_numpy(np.concatenate(labels)).long()

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
        if rec.patient_id not in self.patient_ids:
            self.patient_ids.append(rec.patient_id)
        self.trial_ids.append(trial_id)
        self._data.append(torch.from_numpy(np.ascontiguousarray(rec.signal.data, dtype=np.float32)))
        return self.patient_ids.index(rec.patient_id)

    def __len__(self) -> int:
        return len(self.trial_index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        trial, start = int(self.trial_index[i]), int(self.start[i])
        return {"x": self._data[trial][:, start:start + self.window].clone(), "patient": int(self.patient_index[i]),
                "trial": trial, "sample": int(i), "label": int(self.labels[i])}


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
        order = torch.argsort(dataset.trial_index, stable=True)
        self._windows_of = list(torch.split(order, torch.bincount(dataset.trial_index).tolist()))
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
        return (self._batch(generator) for _ in range(self.num_batches))

    def _batch(self, generator: torch.Generator) -> list[int]:
        batch: list[int] = []
        for patient in _draw(len(self._trials_of), self.patients, generator).tolist():
            trials = self._trials_of[patient]
            for trial in trials[_draw(len(trials), self.trials, generator)].tolist():
                windows = self._windows_of[trial]
                batch += windows[_draw(len(windows), self.samples, generator)].tolist()
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
    recordings = [rec for split in splits
                  for rec in load_recordings(manifest, split, fs=data.fs, channels=data.channels,
                                             missing_channels=data.missing_channels)]
    name = "+".join(splits)
    if not recordings:
        raise UserError(f"{data.manifest}: split {name} has no signal recordings")
    window, stride = data.window_samples()
    windows = WindowDataset(recordings, window=window, stride=stride, nan=data.nan, short=data.short, flat=data.flat)
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
