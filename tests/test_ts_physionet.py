"""Real data: time-series pretraining runs end to end on the five PhysioNet records (a smoke test)."""

from __future__ import annotations

import json
from pathlib import Path

from medssl.config import load_config
from medssl.pretrain.timeseries import PretrainTimeseriesConfig, pretrain_timeseries
from medssl.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_pretraining_runs_on_the_physionet_records(physionet_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # the config's data.manifest is relative to the repository
    config = load_config(REPO / "configs" / "pretrain_timeseries_physionet.yaml", PretrainTimeseriesConfig,
                         ["train.steps=3", "train.log_every=1"])
    summary = pretrain_timeseries(config, tmp_path / "run", resume=False)
    assert summary["patients"] == 5 and summary["trials"] == 5 and summary["windows"] > 500
    notes = " | ".join(summary["notes"])
    assert "containing NaN dropped" in notes  # 03700181 and v102s hold invalid samples
    assert "5 of 5 patient(s) have one trial only" in notes
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(m["trial"] == 0.0 and m["patient"] > 0 for m in metrics)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", kind="pretrain-timeseries")
    assert ckpt["preprocessing"]["fs"] == 125.0 and ckpt["preprocessing"]["channels"] == ["II", "MLII", "MCL1"]
