"""Patient-independent time-series evaluation: label fractions per patient, splits, metrics, the run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.config import load_config
from medssl.data.manifest import load_manifest
from medssl.data.synthetic.hospital import make_hospital
from medssl.downstream.ts_classification import (
    EvalTimeseriesConfig,
    check_patient_independent,
    classification_metrics,
    draw_patients,
    eval_timeseries,
    evaluate_predictions,
    fraction_key,
    load_encoder,
    patient_probabilities,
)
from medssl.errors import UserError
from medssl.pretrain.timeseries import PretrainTimeseriesConfig, pretrain_timeseries

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Path:
    return make_hospital(tmp_path_factory.mktemp("hospital"), patients=6, size=16, seed=1, signal_seconds=8.0)


@pytest.fixture(scope="module")
def checkpoint(hospital: Path, tmp_path_factory) -> Path:
    config = load_config(CONFIGS / "pretrain_timeseries_tiny.yaml", PretrainTimeseriesConfig,
                         [f"data.manifest={hospital}", "train.steps=2", "train.batch_size=8"])
    run = tmp_path_factory.mktemp("pretrain") / "run"
    pretrain_timeseries(config, run, resume=False)
    return run / "checkpoints" / "last.pt"


def eval_config(manifest: Path, *overrides: str) -> EvalTimeseriesConfig:
    return load_config(CONFIGS / "eval_timeseries_tiny.yaml", EvalTimeseriesConfig,
                       [f"data.manifest={manifest}", "train.steps=3", "eval.bootstrap=5", *overrides])


def test_label_fractions_are_drawn_per_patient_stratified_and_nested() -> None:
    labels = np.array([0] * 30 + [1] * 10 + [2] * 60)
    full, ten, one = (draw_patients(labels, f, seed=3) for f in (1.0, 0.1, 0.01))
    assert len(full) == 100
    assert np.bincount(labels[ten], minlength=3).tolist() == [3, 1, 6]
    assert np.bincount(labels[one], minlength=3).tolist() == [1, 1, 1]  # at least one patient per class
    assert set(one) <= set(ten) <= set(full)
    assert draw_patients(labels, 0.1, seed=3).tolist() == ten.tolist()
    assert draw_patients(labels, 0.1, seed=4).tolist() != ten.tolist()
    assert [fraction_key(f) for f in (1.0, 0.1, 0.01, 0.005)] == ["frac100", "frac10", "frac1", "frac0.5"]


def test_no_patient_in_two_splits(tmp_path: Path, hospital: Path) -> None:
    manifest = load_manifest(hospital)
    check_patient_independent(manifest, "training", ["validation", "test"])
    data = json.loads(hospital.read_text())
    data["test"].append(data["training"][0])  # a training patient's study leaks into test
    leaky = tmp_path / "manifest.json"
    leaky.write_text(json.dumps(data))
    patient = data["training"][0]["patient_id"]
    with pytest.raises(UserError, match=f"patient '{patient}' is in more than one split: training and test"):
        check_patient_independent(load_manifest(leaky), "training", ["test"])
    with pytest.raises(UserError, match="eval.train_split 'training' is also in eval.test_splits"):
        eval_config(hospital, "eval.test_splits=[training]")


def test_metrics_by_hand() -> None:
    y = np.array([0, 0, 1, 1])
    prob = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    m = classification_metrics(y, prob)
    assert m["accuracy"] == 0.75 and m["auroc"] == 1.0 and m["auprc"] == 1.0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert math.isnan(classification_metrics(np.array([1, 1]), prob[:2])["auroc"])
    three = classification_metrics(np.array([0, 1, 2]), np.eye(3))
    assert three["auroc"] == 1.0 and three["macro_f1"] == 1.0
    agg = patient_probabilities(prob, np.array([0, 0, 1, 1]), 2)
    assert np.allclose(agg, [[0.65, 0.35], [0.25, 0.75]])


def test_patient_bootstrap_intervals_bracket_the_estimate() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 10)
    patient = np.repeat(np.arange(20), 5)
    p1 = np.clip(labels[patient] * 0.2 + 0.4 + 0.5 * rng.normal(size=100), 0, 1)
    prob = np.stack([1 - p1, p1], axis=1)
    out = evaluate_predictions(prob, patient, labels, bootstrap=100, confidence=0.9, seed=0)
    for key in ("patient_auroc", "window_auroc", "patient_accuracy", "window_macro_f1"):
        assert out[f"{key}_ci_low"] <= out[key] <= out[f"{key}_ci_high"]
    assert out["patient_auroc_ci_high"] - out["patient_auroc_ci_low"] > 0.01
    assert out == evaluate_predictions(prob, patient, labels, bootstrap=100, confidence=0.9, seed=0)


def test_eval_from_pretrained_writes_flat_summary(hospital: Path, checkpoint: Path, tmp_path: Path, capsys) -> None:
    summary = eval_timeseries(eval_config(hospital), tmp_path / "eval", pretrained=checkpoint)
    written = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert written["load_report"].startswith("loaded 20, missing 0, unexpected 0, shape-mismatched 0")
    for mode in ("probe", "finetune"):
        for frac in ("frac100", "frac10", "frac1"):
            for level in ("patient", "window"):
                for metric in ("accuracy", "macro_f1", "auroc", "auprc"):
                    key = f"{mode}_{frac}_{level}_{metric}"
                    assert key in written and f"{key}_ci_low" in written
    assert written["frac1_patients"] == 2  # one training patient per class
    assert written["test_patients"] + written["train_patients"] == 6
    assert ((tmp_path / "eval" / "config.yaml").exists()
            and (tmp_path / "eval" / "finetune_frac10" / "metrics.jsonl").exists())
    assert "patient-independent classification" in capsys.readouterr().out
    assert summary["probe_frac100_patient_auroc"] == written["probe_frac100_patient_auroc"]


def test_eval_from_scratch_and_preprocessing_mismatch(hospital: Path, checkpoint: Path, tmp_path: Path) -> None:
    summary = eval_timeseries(eval_config(hospital, "eval.modes=[probe]", "eval.fractions=[1.0]"),
                              tmp_path / "scratch", pretrained=None, quiet=True)
    assert summary["load_report"] is None and 0.0 <= summary["probe_frac100_window_auroc"] <= 1.0
    with pytest.raises(UserError, match=r"data.fs: 100.0 differs from the pretraining preprocessing 50.0"):
        eval_timeseries(eval_config(hospital, "data.fs=100"), tmp_path / "fs", pretrained=checkpoint)
    with pytest.raises(UserError, match=r"encoder differs from the config's: model.depth: \d+ in the checkpoint, 3 in"):
        eval_timeseries(eval_config(hospital, "model.depth=3"), tmp_path / "arch", pretrained=checkpoint)
    with pytest.raises(UserError, match="checkpoint not found"):
        eval_timeseries(eval_config(hospital), tmp_path / "missing", pretrained=tmp_path / "nope.pt")


def test_the_exported_encoder_loads_like_the_pretraining_checkpoint(hospital: Path, checkpoint: Path) -> None:
    config = eval_config(hospital)
    from_run, report = load_encoder(config, checkpoint)
    from_export, exported = load_encoder(config, checkpoint.parents[1] / "encoder.pt")
    assert report.fraction == exported.fraction == 1.0
    for key, value in from_run.state_dict().items():
        assert torch.equal(value, from_export.state_dict()[key])
    with pytest.raises(UserError, match="expected 'pretrain-timeseries' or 'timeseries-encoder'"):
        load_encoder(config, _wrong_kind(checkpoint.parents[1].parent / "wrong.pt"))


def _wrong_kind(path: Path) -> Path:
    from medssl.training.checkpoint import save_checkpoint

    save_checkpoint(path, kind="volume-encoder", step=1, model={}, arch={}, preprocessing={}, config={})
    return path
