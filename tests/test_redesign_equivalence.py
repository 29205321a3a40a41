"""Behaviour kept across the redesign: today's code reproduces the losses of the code before it, and
checkpoints written before it still load (fixtures in tests/fixtures/pre_redesign, see its README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medssl.config import load_config
from medssl.data.synthetic.hospital import make_hospital
from medssl.downstream.segmentation.config import FinetuneSegConfig
from medssl.downstream.segmentation.task import finetune_seg
from medssl.pretrain.volume import PretrainVolumeConfig, pretrain_volume

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "pre_redesign"
# objectives.part_whole.parts=isolated: part-whole as the code before the redesign computed it (Adam-v2 as written;
# the default since then takes the student's octants from the shared pass)
PRETRAIN = ["train.steps=20", "train.log_every=1", "train.checkpoint_every=20", "probe.enabled=false",
            "model.width=4", "objectives.part_whole.parts=isolated"]
# seg.crops.sampler=uniform and seg.augment.enabled=false: the crops of the code before the redesign (the
# fine-tuning recipe's defaults since then draw class-balanced crops and augment them)
FINETUNE = ["train.steps=20", "train.log_every=1", "train.checkpoint_every=20", "model.width=4", "seg.eval_every=10",
            "seg.layer_decay=0.8", "seg.freeze_encoder_steps=5", "seg.labelled_volumes=2", "seg.overlay_cases=0",
            "seg.crops.sampler=uniform", "seg.augment.enabled=false"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hospital(tmp_path_factory.mktemp("eq") / "hospital", patients=4, studies=2, size=32, seed=1,
                         trials=2, signal_seconds=8.0)


def losses(path: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


def assert_same_losses(now: Path, before: Path) -> None:
    ours, theirs = losses(now), losses(before)
    assert [s for s, _ in ours] == [s for s, _ in theirs]
    for (step, a), (_, b) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-6), f"step {step}: loss {a} now, {b} before the redesign"


def test_pretrain_volume_and_finetune_seg_reproduce_the_losses_before_the_redesign(hospital: Path,
                                                                                  tmp_path: Path) -> None:
    config = load_config(REPO / "configs" / "pretrain_volume_tiny.yaml", PretrainVolumeConfig,
                         [f"data.manifest={hospital}", *PRETRAIN])
    pretrain_volume(config, tmp_path / "pv")
    assert_same_losses(tmp_path / "pv" / "metrics.jsonl", FIXTURES / "pretrain_volume_metrics.jsonl")
    config = load_config(REPO / "configs" / "finetune_seg_tiny.yaml", FinetuneSegConfig,
                         [f"data.manifest={hospital}", *FINETUNE])
    finetune_seg(config, tmp_path / "fs", pretrained=tmp_path / "pv" / "encoder.pt", quiet=True)
    assert_same_losses(tmp_path / "fs" / "metrics.jsonl", FIXTURES / "finetune_seg_metrics.jsonl")


def test_finetune_seg_from_an_encoder_written_before_the_redesign(hospital: Path, tmp_path: Path) -> None:
    config = load_config(REPO / "configs" / "finetune_seg_tiny.yaml", FinetuneSegConfig,
                         [f"data.manifest={hospital}", *FINETUNE])
    summary = finetune_seg(config, tmp_path / "fs", pretrained=FIXTURES / "volume_encoder.pt", quiet=True)
    assert summary["encoder_loaded_fraction"] == 1.0
    assert_same_losses(tmp_path / "fs" / "metrics.jsonl", FIXTURES / "finetune_seg_metrics.jsonl")


def test_eval_timeseries_from_a_checkpoint_written_before_the_redesign(hospital: Path, tmp_path: Path) -> None:
    from medssl.downstream.ts_classification import (
        EvalTimeseriesConfig,
        eval_timeseries,
    )

    config = load_config(REPO / "configs" / "eval_timeseries_tiny.yaml", EvalTimeseriesConfig,
                         [f"data.manifest={hospital}", "eval.modes=[probe]", "eval.fractions=[1.0]",
                          "eval.bootstrap=0"])
    summary = eval_timeseries(config, tmp_path / "ev", pretrained=FIXTURES / "pretrain_timeseries_last.pt",
                              quiet=True)
    assert summary["load_report"].startswith("loaded") and "(100% of the module)" in summary["load_report"]
    assert 0.0 <= summary["probe_frac100_patient_auroc"] <= 1.0
