"""Time-series pretraining: views, one encoder call per step, batches, the run, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.config import load_config
from medssl.data.synthetic.hospital import make_hospital
from medssl.errors import UserError
from medssl.pretrain.timeseries import (
    HierarchicalBatches,
    HierarchicalObjective,
    PretrainTimeseriesConfig,
    TimeseriesPretrainer,
    ViewConfig,
    make_views,
    pretrain_timeseries,
    signal_windows,
)
from medssl.training.checkpoint import load_checkpoint

TINY = Path(__file__).resolve().parents[1] / "configs" / "pretrain_timeseries_tiny.yaml"


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Path:
    return make_hospital(tmp_path_factory.mktemp("hospital"), patients=4, size=16, seed=0, signal_seconds=12.0)


def tiny(manifest: Path, *overrides: str) -> PretrainTimeseriesConfig:
    return load_config(TINY, PretrainTimeseriesConfig, [f"data.manifest={manifest}", *overrides])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_views_are_aligned_masked_and_seeded() -> None:
    x = torch.randn(3, 2, 50)
    cfg = ViewConfig(crop=0.8, mask_spans=5, mask_span_fraction=0.1)
    views = make_views(x, cfg, torch.Generator().manual_seed(0))
    assert views.x.shape == (6, 2, 40) and views.mask.shape == (6, 40)
    assert views.overlap >= 30  # at least 2 x crop - 1 of the window
    a = views.x[:3, :, views.start_a:views.start_a + views.overlap]
    b = views.x[3:, :, views.start_b:views.start_b + views.overlap]
    assert torch.equal(a, b)  # the overlapping timestamps are the same samples of the signal
    masked = views.mask.sum(dim=1)
    assert (masked >= 4).all() and (masked <= 20).all()  # 5 spans of 4 timestamps, possibly overlapping
    again = make_views(x, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(again.x, views.x) and torch.equal(again.mask, views.mask)
    other = make_views(x, cfg, torch.Generator().manual_seed(1))
    assert not torch.equal(other.mask, views.mask)
    jittered = make_views(x, ViewConfig(crop=1.0, mask_spans=0, jitter=0.1), torch.Generator().manual_seed(0))
    assert jittered.overlap == 50 and not jittered.mask.any()
    noise = jittered.x[:3] - x
    assert 0.05 < float(noise.std()) < 0.15


def test_one_pair_of_views_is_one_encoder_call_per_step(hospital: Path) -> None:
    cfg = tiny(hospital)
    windows, _ = signal_windows(cfg.data, "training")
    batches = HierarchicalBatches(windows, patients=2, trials=2, samples=4, batches_per_epoch=None, seed=0)
    model = TimeseriesPretrainer(cfg.model, cfg.objectives)
    calls: list[tuple[int, ...]] = []
    model.encoder.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    out = HierarchicalObjective(cfg.views)(model, batches[0], torch.Generator().manual_seed(0))
    assert calls == [(32, 2, 80)]  # both views of the 16 windows, in one batched call
    assert {"observation", "sample", "trial", "patient", "trial_skipped_patients"} <= set(out.terms)
    assert out.items == 16 and out.embeddings.shape == (16, cfg.model.out_dim)


def test_batches_are_hierarchical_deterministic_and_redrawn_per_epoch(hospital: Path) -> None:
    cfg = tiny(hospital)
    windows, _ = signal_windows(cfg.data, "training")
    make = lambda seed: HierarchicalBatches(windows, patients=2, trials=2, samples=4,  # noqa: E731
                                            batches_per_epoch=None, seed=seed)
    batches = make(0)
    n = len(batches.sampler)
    batch = batches[n + 1]
    assert batch["x"].shape == (16, 2, 100)
    assert len(set(batch["patient"].tolist())) == 2
    assert batch["patient"].reshape(2, 8).unique(dim=1).shape[1] == 1  # patient-major P x (R x S)
    assert make(0).indices(n + 1) == batches.indices(n + 1)  # a pure function of (seed, i)
    assert batches.indices(1) != batches.indices(n + 1)  # next epoch: other batches
    assert make(1).indices(1) != batches.indices(1)


def test_pretraining_learns_and_writes_the_run_dir(hospital: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = pretrain_timeseries(tiny(hospital, "train.steps=30", "train.lr=0.005"), run, resume=False)
    losses = [r["loss"] for r in records(run)]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1
    assert ({"observation", "sample", "trial", "patient", "trial_skipped_patients", "embedding_std"}
            <= set(records(run)[0]))
    assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "tb"} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "summary.json").read_text())["windows"] == summary["windows"] > 0
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt", kind="pretrain-timeseries")
    assert ckpt["preprocessing"]["fs"] == 50.0 and ckpt["preprocessing"]["channels"] == ["ECG", "PPG"]
    assert ckpt["preprocessing"]["window"] == 100 and ckpt["arch"]["depth"] == 4
    assert any(k.startswith("encoder.") for k in ckpt["model"]) and "loss.dbpm_mean" in ckpt["model"]
    exported = load_checkpoint(run / "encoder.pt", kind="timeseries-encoder")  # the encoder alone
    assert exported["model"].keys() == {k[len("encoder."):] for k in ckpt["model"] if k.startswith("encoder.")}
    assert exported["arch"] == ckpt["arch"] and exported["preprocessing"] == ckpt["preprocessing"]


def test_resume_matches_an_uninterrupted_run(hospital: Path, tmp_path: Path, monkeypatch) -> None:
    overrides = ("train.steps=6", "train.checkpoint_every=3", "objectives.dbpm.enabled=true",
                 "objectives.dbpm.warmup=2", "views.jitter=0.05")
    pretrain_timeseries(tiny(hospital, *overrides), tmp_path / "full", resume=False)
    call = HierarchicalObjective.__call__
    steps = []

    def dies_in_step_5(self, model, batch, generator):
        steps.append(1)
        if len(steps) == 5:
            raise KeyboardInterrupt
        return call(self, model, batch, generator)

    monkeypatch.setattr(HierarchicalObjective, "__call__", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        pretrain_timeseries(tiny(hospital, *overrides), tmp_path / "cut", resume=False)
    monkeypatch.setattr(HierarchicalObjective, "__call__", call)
    pretrain_timeseries(tiny(hospital, *overrides), tmp_path / "cut", resume=True)
    full, cut = records(tmp_path / "full"), records(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 7))
    for a, b in zip(full, cut):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    with pytest.raises(UserError, match="not empty"):
        pretrain_timeseries(tiny(hospital), tmp_path / "full", resume=False)


@pytest.mark.parametrize("override, message", [
    ("objectives.trial.weight=-1", "objectives.trial.weight"),
    ("objectives.session.weight=1", "unknown key 'objectives.session'"),
    ("train.batch_size=10", r"\.yaml: train\.batch_size 10 is not a multiple of sampler\.patients x sampler\.trials"),
    ("model.in_channels=3", "model.in_channels is 3"),
    ("data.fs=null", "data.fs"),
    ("objectives.dbpm.w_min=0", "objectives.dbpm.w_min"),
])
def test_config_errors_name_the_key(hospital: Path, override: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        tiny(hospital, override)


# ---------------------------------------------------------------------------------------------- bad input


def write_cohort(root: Path, trials: dict[str, list[np.ndarray]], fs: float = 50.0) -> Path:
    """A manifest of .npy signals: trials = {patient: [(C, T) array per trial]}, all in the training split."""
    entries = []
    for patient, arrays in trials.items():
        refs = []
        for k, array in enumerate(arrays):
            np.save(root / f"{patient}_T{k}.npy", array.astype(np.float32))
            refs.append({"path": f"{patient}_T{k}.npy", "format": "npy", "trial_id": f"T{k}", "fs": fs})
        entries.append({"patient_id": patient, "signals": refs, "condition": len(entries) % 2})
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"name": "bad", "modality": {"0": "signal"}, "training": entries}))
    return manifest


def waves(seconds: float, seed: int, fs: float = 50.0) -> np.ndarray:
    t = np.arange(int(seconds * fs)) / fs
    rng = np.random.default_rng(seed)
    return (np.stack([np.sin(2 * np.pi * (1 + seed) * t), np.cos(2 * np.pi * 0.3 * t)])
            + 0.1 * rng.normal(size=(2, t.size)))


def cohort_config(manifest: Path, *overrides: str) -> PretrainTimeseriesConfig:
    return tiny(manifest, "data.channels=null", "train.steps=2", "train.batch_size=8", *overrides)


def test_nan_stretches_are_refused_or_masked_and_reported(tmp_path: Path) -> None:
    bad = waves(10, 0)
    bad[:, 120:180] = np.nan
    manifest = write_cohort(tmp_path, {"A": [bad, waves(10, 1)], "B": [waves(10, 2), waves(10, 3)]})
    with pytest.raises(UserError, match=r"A_T0\.npy: 60 time steps contain NaN"):
        pretrain_timeseries(cohort_config(manifest), tmp_path / "refused", resume=False)
    summary = pretrain_timeseries(cohort_config(manifest, "data.nan=mask"), tmp_path / "masked", resume=False)
    assert any("window(s) containing NaN dropped" in note for note in summary["notes"])
    assert np.isfinite(summary["final_loss"])


def test_record_shorter_than_a_window_is_an_error_naming_the_file(tmp_path: Path) -> None:
    manifest = write_cohort(tmp_path, {"A": [waves(10, 0), waves(1.5, 1)], "B": [waves(10, 2), waves(10, 3)]})
    with pytest.raises(UserError, match=r"A_T1\.npy: 75 samples .* shorter than one window of 100"):
        pretrain_timeseries(cohort_config(manifest), tmp_path / "run", resume=False)


def test_single_trial_patients_are_warned_and_counted(tmp_path: Path, capsys) -> None:
    manifest = write_cohort(tmp_path, {"A": [waves(10, 0), waves(10, 1)], "B": [waves(20, 2)]})
    summary = pretrain_timeseries(cohort_config(manifest), tmp_path / "run", resume=False)
    assert "1 of 2 patient(s) have one trial only (B)" in capsys.readouterr().err
    assert any("one trial only" in note for note in summary["notes"])
    assert all(r["trial_skipped_patients"] == 1.0 for r in records(tmp_path / "run"))


def test_missing_channels_and_wrong_channel_count_are_clear(tmp_path: Path) -> None:
    manifest = write_cohort(tmp_path, {"A": [waves(10, 0)], "B": [waves(10, 2)]})
    with pytest.raises(UserError, match=r"A_T0\.npy: missing channel\(s\) ECG"):
        pretrain_timeseries(cohort_config(manifest, "data.channels=[ECG, ch1]"), tmp_path / "r1", resume=False)
    with pytest.raises(UserError, match="model.in_channels: 3, but the recordings have 2 channels"):
        pretrain_timeseries(cohort_config(manifest, "model.in_channels=3"), tmp_path / "r2", resume=False)


def test_flat_lined_channels_are_refused_or_reported(tmp_path: Path) -> None:
    flat = waves(10, 0)
    flat[1] = 0.25  # a flat-lined second channel (e.g. a disconnected lead)
    manifest = write_cohort(tmp_path, {"A": [flat, waves(10, 1)], "B": [waves(10, 2), waves(10, 3)]})
    with pytest.raises(UserError, match=r"A_T0\.npy: flat-lined channel\(s\) ch1"):
        pretrain_timeseries(cohort_config(manifest, "data.flat=error"), tmp_path / "refused", resume=False)
    summary = pretrain_timeseries(cohort_config(manifest), tmp_path / "kept", resume=False)
    assert "training: flat-lined (or zero-filled) channel(s) ch1 in A/T0" in summary["notes"]
