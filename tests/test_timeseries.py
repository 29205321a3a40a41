"""Signal windowing and the patient x trial x sample batch sampler, on synthetic signals and real
PhysioNet records (v102s: 5 min at 250 Hz with NaN gaps in lead II; a103l: 5.5 min at 250 Hz)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medssl.data import io
from medssl.data.timeseries import HierarchicalBatchSampler, Recording, WindowDataset, load_recordings
from medssl.errors import UserError


def signal(length: int, *, name: str = "rec", fs: float = 100.0, channels: int = 2, seed: int = 0) -> io.Signal:
    data = np.random.default_rng(seed).normal(size=(channels, length)).astype(np.float32)
    names = ["ECG", "PPG", "RESP"][:channels]
    return io.Signal(data, fs, names, ["mV"] * channels, Path(f"/data/{name}"), {})


def recording(patient: str, trial: str, length: int, label: int | None = None, **kw) -> Recording:
    return Recording(patient, trial, signal(length, name=f"{patient}_{trial}", **kw), label)


def test_windows_counts_shapes_and_indices() -> None:
    recs = [recording("P1", "T1", 1000, 1), recording("P1", "T2", 790, 1, seed=1), recording("P2", "T1", 520)]
    ds = WindowDataset(recs, window=250)
    assert len(ds) == 4 + 3 + 2 and ds.patient_ids == ["P1", "P2"] and ds.trial_ids == ["P1/T1", "P1/T2", "P2/T1"]
    assert ds.patient_index.tolist() == [0] * 7 + [1] * 2 and ds.trial_index.tolist() == [0] * 4 + [1] * 3 + [2] * 2
    assert ds.sample_index.tolist() == list(range(9)) and ds.start.tolist() == [0, 250, 500, 750, 0, 250, 500, 0, 250]
    assert ds.labels.tolist() == [1] * 7 + [-1] * 2 and ds.trial_patient.tolist() == [0, 0, 1]
    assert all(t.dtype == torch.long for t in (ds.patient_index, ds.trial_index, ds.sample_index, ds.labels))
    item = ds[5]
    assert item["x"].shape == (2, 250) and item["x"].dtype == torch.float32
    assert (item["patient"], item["trial"], item["sample"], item["label"]) == (0, 1, 5, 1)
    np.testing.assert_array_equal(item["x"].numpy(), recs[1].signal.data[:, 250:500])
    overlapping = WindowDataset(recs, window=250, stride=100)
    assert len(overlapping) == 8 + 6 + 3  # (T - window) // stride + 1 per recording
    assert overlapping.start[:3].tolist() == [0, 100, 200]
    assert ds.skipped == [] and ds.dropped_nan == 0 and ds.flat_channels == []


def test_nan_policy_error_or_mask() -> None:
    rec = recording("P1", "T1", 1000)
    rec.signal.data[1, 260] = np.nan  # window 1
    rec.signal.data[0, 999] = np.nan  # window 3
    with pytest.raises(UserError, match=r"^/data/P1_T1: 2 time steps contain NaN \(first at 2.60 s\)"):
        WindowDataset([rec], window=250)
    all_nan = recording("P2", "T1", 500)
    all_nan.signal.data[0, ::100] = np.nan
    ds = WindowDataset([rec, all_nan, recording("P3", "T1", 500)], window=250, nan="mask")
    assert ds.dropped_nan == 2 + 2 and ds.start.tolist() == [0, 500, 0, 250]
    assert ds.trial_ids == ["P1/T1", "P3/T1"] and ds.patient_index.tolist() == [0, 0, 1, 1]
    assert ds.skipped == ["/data/P2_T1: every one of its 2 windows contains NaN"]
    assert not any(torch.isnan(ds[i]["x"]).any() for i in range(len(ds)))


def test_short_recording_error_or_skip() -> None:
    recs = [recording("P1", "T1", 1000), recording("P2", "T1", 120)]
    with pytest.raises(UserError, match=r"^/data/P2_T1: 120 samples \(1.2 s\) is shorter than one window of 250"):
        WindowDataset(recs, window=250)
    ds = WindowDataset(recs, window=250, short="skip")
    assert len(ds) == 4 and ds.patient_ids == ["P1"] and len(ds.skipped) == 1 and "/data/P2_T1" in ds.skipped[0]
    with pytest.raises(UserError, match="no window of 250 samples left"):
        WindowDataset(recs[1:], window=250, short="skip")


def test_flat_channels_reported_or_refused() -> None:
    rec = recording("P1", "T1", 1000)
    rec.signal.data[1] = 0.25
    rec.signal.data[1, 10] = np.nan  # NaNs do not hide a flat line
    ds = WindowDataset([rec, recording("P2", "T1", 1000)], window=250, nan="mask")
    assert ds.flat_channels == [("P1", "T1", "PPG")]
    with pytest.raises(UserError, match=r"^/data/P1_T1: flat-lined channel\(s\) PPG"):
        WindowDataset([rec], window=250, nan="mask", flat="error")


def test_bad_inputs_name_file_or_option() -> None:
    recs = [recording("P1", "T1", 1000), recording("P2", "T1", 1000, channels=3)]
    with pytest.raises(UserError, match=r"^/data/P2_T1: signal shape \(3, 1000\) does not match the 2 channels"):
        WindowDataset(recs, window=250)
    with pytest.raises(UserError, match=r"^/data/P2_T1: sampled at 50 Hz"):
        WindowDataset([recs[0], recording("P2", "T1", 1000, fs=50.0)], window=250)
    with pytest.raises(UserError, match=r"^/data/P1_T1: trial P1/T1 appears twice"):
        WindowDataset([recs[0], recs[0]], window=250)
    for kwargs, field in ((dict(window=0), "window"), (dict(window=10, stride=2.5), "stride"),
                          (dict(window=10, nan="drop"), "nan"), (dict(window=10, short="pad"), "short")):
        with pytest.raises(UserError, match=f"^{field}: "):
            WindowDataset(recs[:1], **kwargs)
    with pytest.raises(UserError, match="^recordings: no signal recordings"):
        WindowDataset([], window=10)


@pytest.fixture()
def cohort() -> WindowDataset:
    """5 patients; P5 has one trial; P1/T1 has 2 windows, P3/T2 exactly 4; others more."""
    lengths = {"P1": [100, 300, 400], "P2": [500, 600, 700], "P3": [300, 200, 500], "P4": [800, 300, 300],
               "P5": [1000]}
    recs = [recording(p, f"T{t + 1}", n, label=int(p[1]) % 2, seed=7 * i + t)
            for i, (p, ns) in enumerate(lengths.items()) for t, n in enumerate(ns)]
    return WindowDataset(recs, window=50)


def check_batch(ds: WindowDataset, batch: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """Assert P distinct patients x R trials x S windows (distinct whenever possible); (P, R, S) indices."""
    n_patients, n_trials, n_samples = shape
    idx = torch.tensor(batch).reshape(shape)
    patients, trials = ds.patient_index[idx], ds.trial_index[idx]
    assert (patients == patients[:, :1, :1]).all() and (trials == trials[:, :, :1]).all()
    assert len(set(patients[:, 0, 0].tolist())) == n_patients
    for p in range(n_patients):
        available = int((ds.trial_patient == patients[p, 0, 0]).sum())
        assert len(set(trials[p, :, 0].tolist())) == min(n_trials, available)
        for r in range(n_trials):
            available = int((ds.trial_index == trials[p, r, 0]).sum())
            assert len(set(idx[p, r].tolist())) == min(n_samples, available)
    return idx


def test_batches_have_p_patients_r_trials_s_windows(cohort: WindowDataset) -> None:
    assert len(cohort) == 2 + 6 + 8 + 10 + 12 + 14 + 6 + 4 + 10 + 16 + 6 + 6 + 20
    sampler = HierarchicalBatchSampler(cohort, patients=3, trials=2, samples=4, seed=0)
    assert len(sampler) == len(cohort) // 24 == len(list(sampler))
    for batch in sampler:
        check_batch(cohort, batch, (3, 2, 4))
    # every patient in every batch: P5's single trial is used twice, P1/T1's 2 windows fill 4 slots
    short_trial_drawn = 0
    for batch in HierarchicalBatchSampler(cohort, patients=5, trials=2, samples=4, batches_per_epoch=10):
        trials = cohort.trial_index[check_batch(cohort, batch, (5, 2, 4))][:, :, 0]
        assert [sorted(row) for row in trials.tolist()].count([12, 12]) == 1  # P5's only trial, twice
        short_trial_drawn += int((trials == 0).sum())  # P1/T1: its 2 windows, repeated (checked above)
    assert short_trial_drawn > 0
    assert len(HierarchicalBatchSampler(cohort, patients=2, trials=1, samples=1, batches_per_epoch=7)) == 7


def test_epochs_redraw_and_seed_epoch_reproduce(cohort: WindowDataset) -> None:
    sampler = HierarchicalBatchSampler(cohort, patients=2, trials=2, samples=3, seed=5)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    epoch1 = list(sampler)  # iterating advanced the epoch
    sampler.set_epoch(1)
    assert list(sampler) == epoch1 != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    assert list(HierarchicalBatchSampler(cohort, patients=2, trials=2, samples=3, seed=5)) == epoch0
    assert list(HierarchicalBatchSampler(cohort, patients=2, trials=2, samples=3, seed=6)) != epoch0


def test_sampler_refuses_more_patients_than_exist(cohort: WindowDataset) -> None:
    with pytest.raises(UserError, match=r"^patients: 6 patients per batch, but the dataset has only 5 patient\(s\)"):
        HierarchicalBatchSampler(cohort, patients=6, trials=1, samples=1)
    with pytest.raises(UserError, match="^samples: "):
        HierarchicalBatchSampler(cohort, patients=2, trials=1, samples=0)


def test_dataloader_collates_index_tensors_for_masks(cohort: WindowDataset) -> None:
    sampler = HierarchicalBatchSampler(cohort, patients=3, trials=2, samples=2, batches_per_epoch=3)
    batches = list(DataLoader(cohort, batch_sampler=sampler))
    assert len(batches) == 3
    batch = batches[0]
    assert batch["x"].shape == (12, 2, 50) and batch["x"].dtype == torch.float32
    for key in ("patient", "trial", "sample", "label"):
        assert batch[key].shape == (12,) and batch[key].dtype == torch.long
    same_patient = batch["patient"][:, None] == batch["patient"][None, :]
    assert same_patient.sum(1).tolist() == [4] * 12  # R * S windows share each window's patient
    assert torch.equal(batch["label"], cohort.labels[batch["sample"]])


def test_real_physionet_records(physionet_dir: Path) -> None:
    recs = []
    for record in ("v102s", "a103l"):
        sig = io.read_signal(physionet_dir / record)
        sig = io.select_channels(io.resample_signal(sig, 125.0), ["II"])
        recs.append(Recording(record, "T1", sig))
    with pytest.raises(UserError, match="time steps contain NaN") as err:
        WindowDataset(recs, window=1250)
    assert str(physionet_dir / "v102s") in str(err.value)
    ds = WindowDataset(recs, window=1250, nan="mask")  # 10 s windows: 300 s -> 30, 330 s -> 33
    assert ds.dropped_nan == 3 and len(ds) == 27 + 33  # v102s lead II has NaN gaps in windows 2, 4 and 14
    assert ds.start[:4].tolist() == [0, 1250, 3750, 6250]
    assert ds[0]["x"].shape == (1, 1250) and torch.isfinite(torch.stack([ds[i]["x"] for i in range(len(ds))])).all()
    batch = next(iter(DataLoader(ds, batch_sampler=HierarchicalBatchSampler(ds, patients=2, trials=1, samples=4))))
    assert batch["x"].shape == (8, 1, 1250) and batch["patient"].tolist() in ([0] * 4 + [1] * 4, [1] * 4 + [0] * 4)


@pytest.fixture()
def physionet_manifest(physionet_dir: Path, tmp_path: Path) -> Path:
    """A manifest over v102s (P1, condition 1) and a103l (P2, condition 0), symlinked under sig/."""
    (tmp_path / "sig").mkdir()
    for name in ("v102s.hea", "v102s.dat", "a103l.hea", "a103l.mat"):
        (tmp_path / "sig" / name).symlink_to(physionet_dir / name)
    entries = [{"patient_id": patient, "condition": condition,
                "signals": [{"path": f"sig/{record}", "format": "wfdb", "trial_id": "T1"}]}
               for patient, condition, record in (("P1", 1, "v102s"), ("P2", 0, "a103l"))]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"name": "physionet", "modality": {"0": "ECG"}, "training": entries}))
    return path


def test_load_recordings_from_manifest(physionet_manifest: Path) -> None:
    from medssl.data.manifest import load_manifest

    manifest = load_manifest(physionet_manifest)
    recs = load_recordings(manifest, "training", fs=125.0, channels=["ii", "PLETH"])
    assert [(r.patient_id, r.trial_id, r.label) for r in recs] == [("P1", "T1", 1), ("P2", "T1", 0)]
    assert [r.signal.data.shape for r in recs] == [(2, 37500), (2, 41250)] and recs[0].signal.fs == 125.0
    assert load_recordings(manifest, "validation", fs=125.0, channels=None) == []
    with pytest.raises(UserError, match=r"a103l: missing channel\(s\) RESP"):
        load_recordings(manifest, "training", fs=125.0, channels=["II", "RESP"])
    padded = load_recordings(manifest, "training", fs=125.0, channels=["II", "RESP"], missing_channels="zeros")
    ds = WindowDataset(padded, window=1250, nan="mask")
    assert ds.flat_channels == [("P2", "T1", "RESP")] and ds.labels.unique().tolist() == [0, 1]
    with pytest.raises(UserError, match=r"a103l: channels \['II', 'V', 'PLETH'\] differ from"):
        load_recordings(manifest, "training", fs=125.0, channels=None)
    doc = json.loads(physionet_manifest.read_text())
    doc["training"][1]["condition"] = "sick"
    physionet_manifest.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"training\[1\]\.condition: expected an integer class label, got 'sick'"):
        load_recordings(load_manifest(physionet_manifest), "training", fs=125.0, channels=["II"])


def test_recordings_in_a_store_are_memory_maps_and_read_back_without_resampling(physionet_manifest: Path,
                                                                                tmp_path: Path) -> None:
    from medssl.data.manifest import load_manifest
    from medssl.data.timeseries import RecordingStore

    manifest = load_manifest(physionet_manifest)
    in_memory = load_recordings(manifest, "training", fs=125.0, channels=["ii", "PLETH"])
    store = RecordingStore(tmp_path / "signals")
    stored = load_recordings(manifest, "training", fs=125.0, channels=["ii", "PLETH"], store=store)
    assert all(isinstance(r.signal.data, np.memmap) and not r.signal.data.flags.writeable for r in stored)
    assert len(list((tmp_path / "signals").glob("*.npy"))) == 2
    again = load_recordings(manifest, "training", fs=125.0, channels=["ii", "PLETH"], store=store)
    for a, b, c in zip(in_memory, stored, again):
        np.testing.assert_array_equal(a.signal.data, b.signal.data)
        np.testing.assert_array_equal(a.signal.data, c.signal.data)
        assert (a.signal.channels, a.signal.path) == (c.signal.channels, c.signal.path)
    windows = WindowDataset(again, window=1250, nan="mask")
    reference = WindowDataset(in_memory, window=1250, nan="mask")
    assert len(windows) == len(reference)
    assert all(torch.equal(windows[i]["x"], reference[i]["x"]) for i in (0, len(windows) // 2, len(windows) - 1))
    temporary = RecordingStore(None)
    folder = temporary.folder
    assert folder.is_dir()
    del temporary
    assert not folder.exists()


def test_batches_drawn_by_the_cursor_equal_the_materialised_epochs(cohort: WindowDataset) -> None:
    from medssl.pretrain.timeseries import HierarchicalBatches

    batches = HierarchicalBatches(cohort, patients=2, trials=2, samples=3, batches_per_epoch=4, seed=3)
    reference = HierarchicalBatchSampler(cohort, patients=2, trials=2, samples=3, batches_per_epoch=4,
                                         seed=batches.sampler.seed)
    epochs = []
    for epoch in range(3):
        reference.set_epoch(epoch)
        epochs += list(reference)
    order = [0, 1, 2, 3, 4, 6, 5, 2, 11, 9, 10]  # forwards, skipping, back within an epoch, across epochs (a resume)
    assert [batches.indices(i) for i in order] == [epochs[i] for i in order]
    # window positions computed from per-trial counts equal those listed per window
    for i in range(len(cohort)):
        trial, start = cohort.locate(i)
        assert (trial, start) == (int(cohort.trial_index[i]), int(cohort.start[i]))
