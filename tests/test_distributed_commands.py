"""Every downstream training command under torchrun with 2 gloo processes: it runs, rank 0 alone writes
(one metrics line per step), and `finetune seg --resume` continues at the world size it was saved with.
(The pretrainings are tested for equivalence with one process in test_volume/ts_distributed.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medssl.data.synthetic.hospital import make_hospital

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SEG_FAST = ["model.name=segresnet", "model.width=8", "model.segresnet_blocks=[1,1,1]", "data.crop_size=[16,16,16]"]


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Path:
    return make_hospital(tmp_path_factory.mktemp("hospital"), patients=8, studies=2, size=32, seed=3,
                         signal_seconds=8.0)


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "medssl", *argv], capture_output=True, encoding="utf-8", errors="replace",
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def test_finetune_seg_on_two_processes_and_its_resume(hospital: Path, tmp_path: Path) -> None:
    run = tmp_path / "seg"
    common = ["finetune", "seg", "-c", str(CONFIGS / "finetune_seg_tiny.yaml"), "-o", str(run),
              f"data.manifest={hospital}", *SEG_FAST, "train.log_every=1", "train.checkpoint_every=1",
              "seg.eval_every=2"]
    _torchrun(*common, "train.steps=2")
    assert _steps(run) == [1, 2]
    _torchrun(*common, "train.steps=3", "--resume")
    assert _steps(run) == [1, 2, 3]
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 3 and 0.0 <= summary["test_dice_mean"] <= 1.0
    assert (run / "test_cases.csv").is_file() and not (run / "FAILED").exists()


def test_eval_timeseries_fine_tuning_on_two_processes(hospital: Path, tmp_path: Path) -> None:
    run = tmp_path / "eval"
    _torchrun("eval", "timeseries", "-c", str(CONFIGS / "eval_timeseries_tiny.yaml"), "-o", str(run),
              f"data.manifest={hospital}", "eval.modes=[finetune]", "eval.fractions=[1.0]", "train.steps=2",
              "train.log_every=1")
    assert _steps(run / "finetune_frac100") == [1, 2]
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert 0.0 <= summary["finetune_frac100_patient_auroc"] <= 1.0


def test_ground_train_on_two_processes(hospital: Path, tmp_path: Path) -> None:
    run = tmp_path / "ground"
    _torchrun("ground", "train", "-c", str(CONFIGS / "grounding_tiny.yaml"), "-o", str(run),
              f"data.manifest={hospital}", "train.steps=2", "train.log_every=1")
    assert _steps(run) == [1, 2]
    assert (run / "grounding.pt").is_file() and (run / "summary.json").is_file()
