"""3D pretraining end to end: run directory, every backbone, resume after a real kill, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medssl.config import load_config
from medssl.data.preprocessing import VolumePreprocessing
from medssl.data.synthetic.hospital import make_hospital
from medssl.errors import UserError
from medssl.models.volume_encoders import VolumeEncoderConfig, build_segmentation_network
from medssl.pretrain.volume import PretrainVolumeConfig, VolumePretrainModel, pretrain_volume
from medssl.pretrain.volume_batches import VolumePretrainBatches
from medssl.training.pretrained import load_pretrained_encoder

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "pretrain_volume_tiny.yaml"


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hospital(tmp_path_factory.mktemp("pv") / "hospital", patients=4, studies=2, size=32, seed=1,
                         trials=1, signal_seconds=2.0)


def tiny(hospital: Path, *overrides: str) -> PretrainVolumeConfig:
    return load_config(TINY, PretrainVolumeConfig, [f"data.manifest={hospital}", "probe.split=training", *overrides])


def test_run_directory_and_exported_encoder(hospital: Path, tmp_path: Path) -> None:
    summary = pretrain_volume(tiny(hospital, "train.steps=3", "probe.every=3"), tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt",
                 "encoder.pt"):
        assert (run / name).exists(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    terms = {"loss", "voxel", "region", "crop", "patient", "part_whole.compose", "part_whole.decompose",
             "match_accept_rate", "lr", "items_per_s", "embedding_std", "effective_rank"}
    assert [r["step"] for r in records] == [1, 2, 3] and terms <= set(records[0])
    assert all(r["loss"] is not None for r in records)
    assert 0.0 <= summary["final_probe_dice"] <= 1.0 and "init_probe_dice" in summary
    network = build_segmentation_network(VolumeEncoderConfig(), out_channels=10)
    report = load_pretrained_encoder(network, run / "encoder.pt", arch=VolumeEncoderConfig())
    assert report.fraction == 1.0 and not report.missing


@pytest.mark.parametrize("backbone", ["basicunet", "segresnet", "swinunetr"])
def test_every_objective_with_every_backbone(hospital: Path, backbone: str) -> None:
    config = tiny(hospital, f"model.name={backbone}", "model.width=12" if backbone == "swinunetr" else "model.width=8",
                  "views.feature_stride=4")
    torch.manual_seed(0)
    model = VolumePretrainModel(config)
    batches = VolumePretrainBatches.from_manifest(hospital, "training", VolumePreprocessing(crop_size=(32, 32, 32)),
                                                  batch_size=2, points=8, stride=4)
    out = model(batches[0], torch.Generator().manual_seed(0))
    assert {"voxel", "region", "crop", "patient", "part_whole.compose", "part_whole.decompose"} <= set(out.terms)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    # every weight on the path to the objectives learns; swinunetr's side blocks of unused scales cannot
    reached = [n for n, p in model.encoder.named_parameters() if p.grad is not None]
    expected = [n for n, _ in model.encoder.named_parameters()
                if backbone != "swinunetr" or n.startswith(("swinViT.", "encoder3."))]
    assert set(expected) <= set(reached)
    assert all(p.grad is None for p in model.objectives["part_whole"].teacher.parameters())


@pytest.mark.parametrize(("parts", "student_passes"), [("shared", 1), ("isolated", 2)])
def test_part_whole_shared_needs_no_second_student_pass(hospital: Path, parts: str, student_passes: int) -> None:
    """parts=shared: the student's octants are cells of the one shared pass (the teacher embeds the whole and one
    random octant alone); parts=isolated (Adam-v2 as written) encodes the 8 octants again."""
    config = tiny(hospital, f"objectives.part_whole.parts={parts}", "train.batch_size=2")
    torch.manual_seed(0)
    model = VolumePretrainModel(config)
    calls, teacher_rows = [], []
    model.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    model.objectives["part_whole"].teacher.module["encoder"].register_forward_hook(
        lambda module, args, out: teacher_rows.append(args[0].shape[0]))
    batches = VolumePretrainBatches.from_manifest(hospital, "training", VolumePreprocessing(crop_size=(32, 32, 32)),
                                                  batch_size=2, points=8, stride=4)
    out = model(batches[0], torch.Generator().manual_seed(0))
    out.loss.backward()
    assert len(calls) == student_passes and calls[0] == 8  # 4 views x 2 anchors, then 16 octants when isolated
    assert sum(teacher_rows) == (4 if parts == "shared" else 18)  # whole + one octant each, or whole + 8 octants
    assert torch.isfinite(out.terms["part_whole.compose"]) and torch.isfinite(out.terms["part_whole.decompose"])
    assert all(p.grad is None for p in model.objectives["part_whole"].teacher.parameters())
    if parts == "shared":
        assert all(p.grad is not None for p in model.objectives["part_whole"].cell_head.parameters())


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_resume_after_kill_matches_uninterrupted(hospital: Path, tmp_path: Path) -> None:
    args = [sys.executable, "-m", "medssl", "pretrain", "volume", "-c", str(TINY), f"data.manifest={hospital}",
            "probe.split=training",
            "train.steps=8", "train.checkpoint_every=2", "probe.enabled=false", "views.points=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run([*args, "-o", str(tmp_path / "full")], capture_output=True, encoding="utf-8",
                          errors="replace", env=env)
    assert full.returncode == 0, full.stderr[-2000:]
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*args, "-o", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not ((cut / "checkpoints" / "last.pt").exists()
                                          and len(_losses(cut)) >= 3 if (cut / "metrics.jsonl").exists() else False):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_losses(cut)) < 8, "the run finished before it could be killed"
    resumed = subprocess.run([*args, "-o", str(cut), "--resume"], capture_output=True, encoding="utf-8",
                             errors="replace", env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = _losses(tmp_path / "full"), _losses(cut)
    assert sorted(got) == list(range(1, 9))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), step


def test_bad_config_and_data_are_user_errors(hospital: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="objectives.voxel.weight"):
        tiny(hospital, "objectives.voxel.weight=-1")
    with pytest.raises(UserError, match="unknown key 'objectives.contour'"):
        tiny(hospital, "objectives.contour.weight=1")
    with pytest.raises(UserError, match="smaller than data.crop_size"):
        pretrain_volume(tiny(hospital, "data.crop_size=[48,48,48]", "data.small_volume=error"), tmp_path / "small")
    assert not (tmp_path / "small").exists()  # nothing written before the data is known to be usable
    with pytest.raises(UserError, match="modality"):
        pretrain_volume(tiny(REPO / "data_manifests" / "physionet.json"), tmp_path / "ecg")


def test_resume_with_other_architecture_is_refused_and_keeps_the_checkpoint(hospital: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    pretrain_volume(tiny(hospital, "train.steps=2", "probe.enabled=false"), run)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(UserError, match="architecture"):
        pretrain_volume(tiny(hospital, "train.steps=4", "probe.enabled=false", "model.width=16"), run, resume=True)
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    with pytest.raises(UserError, match="not empty"):
        pretrain_volume(tiny(hospital, "train.steps=2"), run)


def test_bench_times_the_objectives_against_crop_contrast_alone(hospital: Path, capsys) -> None:
    from medssl.bench.pretrain_volume import bench_pretrain_volume

    figures = bench_pretrain_volume(manifest=hospital, steps=1, against=("crop-only",), rounds=2)
    assert figures["ratio_cpu_vs_crop-only"] > 0 and figures["ratio_wall_vs_crop-only"] > 0
    assert figures["ratio_cpu_vs_all objectives"] == 1.0
    assert "crop-only" in capsys.readouterr().out
