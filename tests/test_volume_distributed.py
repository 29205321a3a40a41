"""Volume pretraining under torchrun: 2 gloo processes with B/2 anchors each train like 1 process with B
(crop, patient, region and voxel contrast the gathered global batch; part-whole and masked
reconstruction average over ranks; every random draw is made for the global batch)."""

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

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Path:
    return make_hospital(tmp_path_factory.mktemp("hospital"), patients=4, studies=2, size=32, seed=1,
                         signal_seconds=2.0)


def _pretrain(config: str, manifest: Path, run: Path, *, processes: int, batch: int,
              extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "medssl"] if processes > 1 else [sys.executable, "-m", "medssl"])
    overrides = [f"data.manifest={manifest}", "train.steps=3", f"train.batch_size={batch}", "probe.enabled=false",
                 "train.checkpoint_every=3", "train.log_every=1", *extra]
    return subprocess.run([*launch, "pretrain", "volume", "-c", str(CONFIGS / config), "-o", str(run), *overrides],
                          capture_output=True, encoding="utf-8", errors="replace", timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("config, extra, terms", [
    ("pretrain_volume_tiny.yaml", ("heads.norm=layer",),
     ("loss", "voxel", "region", "crop", "patient", "part_whole.compose", "part_whole.decompose", "match_accept_rate")),
    ("pretrain_volume_mae.yaml", ("data.crop_size=[32,32,32]", "model.width=4"), ("loss", "masked")),
])
def test_two_processes_with_half_batches_train_like_one_with_the_whole(hospital: Path, tmp_path: Path, config: str,
                                                                        extra: tuple[str, ...],
                                                                        terms: tuple[str, ...]) -> None:
    one = _pretrain(config, hospital, tmp_path / "one", processes=1, batch=4, extra=extra)
    two = _pretrain(config, hospital, tmp_path / "two", processes=2, batch=2, extra=extra)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    single, double = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in double] == [1, 2, 3]  # rank 0 alone writes
    for a, b in zip(single, double):
        for term in terms:
            assert b[term] == pytest.approx(a[term], rel=1e-4, abs=1e-5), (a["step"], term)
    # The weights within a tenth of one Adam step (lr 1e-3) after 3 steps. Not compared: the convolution biases,
    # each right before an instance norm that removes it: their gradient is rounding noise, which Adam scales up
    # to full steps (they differ by up to 4e-3 between two runs, and change nothing the encoder computes).
    w1 = load_checkpoint(tmp_path / "one" / "encoder.pt", kind="volume-encoder")["model"]
    w2 = load_checkpoint(tmp_path / "two" / "encoder.pt", kind="volume-encoder")["model"]
    compared = [name for name in w1 if not name.endswith(".conv.bias")]
    assert len(compared) >= len(w1) // 2
    for name in compared:
        assert torch.allclose(w2[name], w1[name], rtol=0, atol=1e-4), name
