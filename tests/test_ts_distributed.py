"""Time-series pretraining under torchrun: 2 gloo processes with B/2 windows each train like 1 process
with B (the pooled levels contrast against every rank's windows, gathered with their gradient)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medssl.data.synthetic.hospital import make_hospital
from medssl.training.checkpoint import load_checkpoint

TINY = Path(__file__).resolve().parents[1] / "configs" / "pretrain_timeseries_tiny.yaml"
TERMS = ("loss", "observation", "sample", "trial", "patient", "dbpm_downweighted", "trial_skipped_patients")


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Path:
    return make_hospital(tmp_path_factory.mktemp("hospital"), patients=4, size=16, seed=0, signal_seconds=12.0)


def _pretrain(manifest: Path, run: Path, *, processes: int, batch: int, patients: int) -> subprocess.CompletedProcess:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "medssl"] if processes > 1 else [sys.executable, "-m", "medssl"])
    overrides = [f"data.manifest={manifest}", "train.steps=4", f"train.batch_size={batch}",
                 f"sampler.patients={patients}", "objectives.dbpm.enabled=true", "objectives.dbpm.warmup=1",
                 "objectives.dbpm.threshold=0.5", "views.jitter=0.1"]
    return subprocess.run([*launch, "pretrain", "timeseries", "-c", str(TINY), "-o", str(run), *overrides],
                          capture_output=True, encoding="utf-8", errors="replace", timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def test_two_processes_with_half_batches_train_like_one_with_the_whole(hospital: Path, tmp_path: Path) -> None:
    one = _pretrain(hospital, tmp_path / "one", processes=1, batch=16, patients=2)
    two = _pretrain(hospital, tmp_path / "two", processes=2, batch=8, patients=1)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    single, double = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in double] == [1, 2, 3, 4]  # rank 0 alone writes
    assert any(r["dbpm_downweighted"] > 0 for r in single)  # the weighted path is exercised
    for a, b in zip(single, double):
        for term in TERMS:
            assert b[term] == pytest.approx(a[term], rel=1e-4, abs=1e-5), (a["step"], term)
    w1 = load_checkpoint(tmp_path / "one" / "encoder.pt", kind="timeseries-encoder")["model"]
    w2 = load_checkpoint(tmp_path / "two" / "encoder.pt", kind="timeseries-encoder")["model"]
    for name, value in w1.items():
        assert torch.allclose(w2[name], value, rtol=1e-4, atol=1e-5), name


def test_too_few_patients_for_every_process_is_one_line(hospital: Path, tmp_path: Path) -> None:
    result = _pretrain(hospital, tmp_path / "run", processes=2, batch=12, patients=3)
    assert result.returncode != 0
    assert "sampler.patients: 3 per process x 2 processes = 6 patients per step, but the training split has" \
        in result.stderr
