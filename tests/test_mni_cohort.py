"""The MNI152 tissue cohort (medssl.data.mni_cohort) and the label-efficiency benchmark on it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.bench.label_efficiency import label_efficiency, paired_differences, summarise
from medssl.data import io
from medssl.data.manifest import load_manifest
from medssl.data.manifest_check import check_manifest
from medssl.data.synthetic.mni152 import FOV_MM, MANIFEST_NAME, TISSUES, make_mni_cohort
from medssl.data.preprocessing import VolumePreprocessing
from medssl.errors import UserError
from medssl.models.volume_encoders import VolumeEncoderConfig, build_segmentation_network, network_encoder
from medssl.training.pretrained import export_encoder, export_network

REPO = Path(__file__).resolve().parents[1]



pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return make_mni_cohort(tmp_path_factory.mktemp("mni") / "mni", subjects=5, studies=2, size=32, seed=0)


def _volumes(manifest: Path, stem: str) -> tuple[io.Volume, io.Volume]:
    return (io.read_volume(manifest.parent / "vol" / f"{stem}.nii.gz"),
            io.read_volume(manifest.parent / "seg" / f"{stem}.nii.gz", label=True))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_cohort_is_a_sound_mr_manifest(cohort):
    assert check_manifest(cohort) == []
    manifest = load_manifest(cohort)
    assert manifest.name == MANIFEST_NAME and manifest.modality == {"0": "MR"}
    assert manifest.labels == {str(k): v for k, v in TISSUES.items()}
    splits = {name: set(manifest.patients(name)) for name in ("training", "validation", "test")}
    assert all(splits.values()) and sum(len(p) for p in splits.values()) == 5
    assert not (splits["training"] & splits["test"] or splits["training"] & splits["validation"])
    assert all(len(manifest.split(name)) == 2 * len(splits[name]) for name in splits)  # 2 studies each
    image, label = _volumes(cohort, "M001_S1")
    assert image.array.shape == (32, 32, 32) and image.array.dtype == np.float32
    assert image.spacing == pytest.approx((FOV_MM / 32,) * 3) and image.orientation == "RAS"
    centre = image.affine[:3, :3] @ np.full(3, 15.5) + image.affine[:3, 3]
    np.testing.assert_allclose(centre, [0.0, -17.0, 5.0], atol=2.0)  # the brain's centre in MNI mm
    assert nib.load(cohort.parent / "seg" / "M001_S1.nii.gz").get_data_dtype() == np.uint8


def test_image_and_labels_are_deformed_together(cohort):
    for stem in ("M001_S1", "M002_S2", "M005_S1"):
        image, label = _volumes(cohort, stem)
        assert set(np.unique(label.array)) == {0, 1, 2, 3}
        means = [image.array[label.array == c].mean() for c in range(4)]
        # T1 contrast: background < CSF/other < grey < white matter, in every deformed, biased scan
        assert means[0] < means[1] < means[2] < means[3]
        assert means[3] > 1.15 * means[2]
    _, a1 = _volumes(cohort, "M001_S1")
    _, a2 = _volumes(cohort, "M001_S2")
    _, b1 = _volumes(cohort, "M002_S1")
    same_subject, other_subject = _dice(a1.array == 3, a2.array == 3), _dice(a1.array == 3, b1.array == 3)
    assert 0.3 < other_subject < same_subject < 0.98  # subjects differ; studies of a subject share anatomy


def test_deterministic_per_seed_and_subject(cohort, tmp_path):
    again = make_mni_cohort(tmp_path / "again", subjects=2, studies=1, size=32, seed=0)
    other = make_mni_cohort(tmp_path / "other", subjects=2, studies=1, size=32, seed=1)
    first, first_label = _volumes(cohort, "M001_S1")
    same, same_label = _volumes(again, "M001_S1")
    np.testing.assert_array_equal(first.array, same.array)
    np.testing.assert_array_equal(first_label.array, same_label.array)
    assert not np.array_equal(first_label.array, _volumes(other, "M001_S1")[1].array)


def test_bad_arguments_and_foreign_folders(tmp_path):
    with pytest.raises(UserError, match="size: must be an integer between 16 and 128, got 8"):
        make_mni_cohort(tmp_path / "x", size=8)
    with pytest.raises(UserError, match="subjects: must be an integer >= 1"):
        make_mni_cohort(tmp_path / "x", subjects=0)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a previous MNI cohort") as err:
        make_mni_cohort(foreign, subjects=1, size=16)
    assert str(foreign) in str(err.value)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------------------------ benchmark


def test_summarise_mean_and_spread():
    runs = [{"cohort": "c", "labelled": 1, "init": init, "seed": s, "test_dice_mean": v, "seconds": 10.0 * (s + 1),
             "dice_csf": v / 2}
            for init, values in (("scratch", [0.2, 0.4]), ("encoder", [0.5])) for s, v in enumerate(values)]
    rows = summarise(runs)
    assert [r["init"] for r in rows] == ["scratch", "encoder"]
    assert rows[0]["dice_mean"] == pytest.approx(0.3) and rows[0]["dice_std"] == pytest.approx(0.1414, abs=1e-4)
    assert rows[0]["seconds_mean"] == pytest.approx(15.0) and rows[0]["dice_csf"] == pytest.approx(0.15)
    assert rows[1]["dice_std"] == 0.0 and rows[1]["runs"] == 1


def test_paired_differences_and_their_interval():
    runs = [{"cohort": "c", "labelled": 2, "init": "scratch", "seed": s, "test_dice_mean": 0.5} for s in range(4)]
    runs += [{"cohort": "c", "labelled": 2, "init": "network", "seed": s, "test_dice_mean": 0.5 + d}
             for s, d in enumerate([0.1, 0.2, 0.3])]  # seed 3 has no network run: left out of the pairs
    (row,) = paired_differences(runs)
    assert (row["init"], row["seeds"], row["wins"]) == ("network", 3, 3)
    assert row["diff_mean"] == pytest.approx(0.2) and row["diff_std"] == pytest.approx(0.1)
    half = 4.302653 * 0.1 / 3 ** 0.5  # t(0.975, 2 degrees of freedom)
    assert (row["ci_low"] == pytest.approx(0.2 - half, abs=1e-5)
            and row["ci_high"] == pytest.approx(0.2 + half, abs=1e-5))


@pytest.fixture
def checkpoints(tmp_path) -> dict[str, Path]:
    """An encoder and a whole network (random weights) for the fast segresnet of the benchmark tests."""
    model = VolumeEncoderConfig(name="segresnet", width=8, segresnet_blocks=(1, 1, 1))
    prep = VolumePreprocessing(modality="MR", crop_size=(16, 16, 16)).to_dict()
    torch.manual_seed(0)
    network = build_segmentation_network(model, 1)
    export_encoder(tmp_path / "encoder.pt", network_encoder(network, model), model, prep, {}, step=1)
    export_network(tmp_path / "network.pt", network, model, 1, prep, {}, step=1)
    return {"encoder": tmp_path / "encoder.pt", "network": tmp_path / "network.pt"}


BENCH = ["model.name=segresnet", "model.width=8", "model.segresnet_blocks=[1,1,1]", "data.crop_size=[16,16,16]",
         "train.log_every=1", "seg.eval_every=1", "seg.overlay_cases=0"]


def _bench(out: Path, cohort: Path, checkpoints: dict[str, Path], **options):
    return label_efficiency(out, cohorts=["mni152"], steps=2,
                            finetune_config=REPO / "configs" / "finetune_seg_tiny.yaml",
                            overrides=BENCH, manifests={"mni152": cohort}, pretrained={"mni152": checkpoints},
                            **options)


def test_label_efficiency_bench_on_the_mni_cohort(cohort, checkpoints, tmp_path, capsys):
    out = tmp_path / "bench"
    rows = _bench(out, cohort, checkpoints, counts=[1, 2], seeds=[0, 1])
    assert [(r["labelled"], r["init"]) for r in rows] == [(1, "scratch"), (1, "encoder"), (1, "network"),
                                                         (2, "scratch"), (2, "encoder"), (2, "network")]
    table = list(csv.DictReader((out / "label_efficiency.csv").open()))
    assert len(table) == 6 and all(0.0 <= float(r["dice_mean"]) <= 1.0 for r in table)
    assert {"dice_csf_other", "dice_grey_matter", "dice_white_matter", "seconds_mean"} <= set(table[0])
    runs = list(csv.DictReader((out / "label_efficiency_runs.csv").open()))
    assert [int(r["labelled_patients"]) for r in runs] == [1] * 6 + [2] * 6 and {r["steps"] for r in runs} == {"2"}
    assert all(float(r["seconds"]) > 0 and float(r["drift_decoder"]) > 0 for r in runs)
    paired = list(csv.DictReader((out / "label_efficiency_paired.csv").open()))
    assert [(r["labelled"], r["init"], r["seeds"]) for r in paired] == [("1", "encoder", "2"), ("1", "network", "2"),
                                                                        ("2", "encoder", "2"), ("2", "network", "2")]
    assert all(float(r["ci_low"]) <= float(r["diff_mean"]) <= float(r["ci_high"]) for r in paired)
    encoder = json.loads((out / "mni152" / "encoder_n2_seed0" / "summary.json").read_text())
    network = json.loads((out / "mni152" / "network_n2_seed1" / "summary.json").read_text())
    assert encoder["pretrained_parts"] == "encoder" and network["pretrained_parts"] == "network"
    assert encoder["encoder_loaded_fraction"] == 1.0 and encoder["labelled_volumes"] == 2
    for name in ("label_efficiency.png", "label_efficiency_curves.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "label_efficiency.md").read_text(encoding="utf-8")
    assert "| mni152 | 1 |" in markdown
    assert "whole network pretrained (masked) - scratch [Holm-adjusted 95 % CI]" in markdown
    assert "label efficiency" in capsys.readouterr().out


def test_label_efficiency_resumes_where_it_stopped(cohort, checkpoints, tmp_path):
    out = tmp_path / "bench"
    _bench(out, cohort, checkpoints, counts=[1], seeds=[0], inits=["scratch", "network"], quiet=True)
    done = {p.name: p.stat().st_mtime_ns for p in (out / "mni152").glob("*/summary.json") for p in [p.parent]}
    assert sorted(done) == ["network_n1_seed0", "scratch_n1_seed0"]
    # a run killed half-way leaves its temporary folder (atomic_dir) and no run directory
    stale = out / "mni152" / ".scratch_n1_seed1.x1y2.tmp"
    stale.mkdir()
    (stale / "metrics.jsonl").write_text('{"step": 1, "loss": 9.9}\n')
    rows = _bench(out, cohort, checkpoints, counts=[1], seeds=[0, 1], inits=["scratch", "network"], quiet=True)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "mni152").iterdir() if p.name in done} == done  # kept
    assert (out / "mni152" / "scratch_n1_seed1" / "summary.json").is_file() and not stale.exists()
    assert [r["runs"] for r in rows] == [2, 2]
    runs = list(csv.DictReader((out / "label_efficiency_runs.csv").open()))
    assert sorted((r["init"], r["seed"]) for r in runs) == [("network", "0"), ("network", "1"), ("scratch", "0"),
                                                           ("scratch", "1")]


def test_weight_drift_is_measured_from_the_weights_a_run_started_from(cohort, checkpoints, tmp_path):
    from medssl.bench.label_efficiency import weight_drift
    from medssl.config import load_config
    from medssl.downstream.segmentation.config import FinetuneSegConfig
    from medssl.downstream.segmentation.task import finetune_seg

    frozen = load_config(REPO / "configs" / "finetune_seg_tiny.yaml", FinetuneSegConfig,
                         [f"data.manifest={cohort}", *BENCH, "train.steps=2", "seg.freeze_encoder_steps=2",
                          "seg.labelled_volumes=1"])
    finetune_seg(frozen, tmp_path / "frozen", pretrained=checkpoints["network"], quiet=True)
    drift = weight_drift(tmp_path / "frozen")
    assert drift["drift_encoder"] == 0.0 and drift["drift_decoder"] > 0  # w0 is rebuilt exactly
    finetune_seg(frozen.model_copy(update={"seg": frozen.seg.model_copy(update={"freeze_encoder_steps": 0})}),
                 tmp_path / "free", quiet=True)
    assert 0 < weight_drift(tmp_path / "free")["drift_encoder"] < 1


def test_label_efficiency_reuses_the_scratch_runs_and_pretraining_of_another_folder(cohort, checkpoints, tmp_path):
    first = tmp_path / "main"
    _bench(first, cohort, checkpoints, counts=[1], seeds=[0], inits=["scratch"], quiet=True)
    earlier = tmp_path / "earlier" / "mni152" / "pretrain_network"
    earlier.mkdir(parents=True)
    (earlier / "network.pt").write_bytes(checkpoints["network"].read_bytes())
    variant = tmp_path / "variant"
    rows = label_efficiency(variant, cohorts=["mni152"], counts=[1], seeds=[0], inits=["scratch", "network"], steps=2,
                            finetune_config=REPO / "configs" / "finetune_seg_tiny.yaml",
                            overrides=[*BENCH, "seg.layer_decay=0.5"], manifests={"mni152": cohort},
                            pretrained_from=tmp_path / "earlier", scratch_from=first, quiet=True)
    copied = variant / "mni152" / "scratch_n1_seed0" / "summary.json"
    assert copied.read_bytes() == (first / "mni152" / "scratch_n1_seed0" / "summary.json").read_bytes()
    network = json.loads((variant / "mni152" / "network_n1_seed0" / "summary.json").read_text())
    assert network["pretrained"] == str(earlier / "network.pt")
    assert not (variant / "mni152" / "pretrain_network").exists()
    assert [r["init"] for r in rows] == ["scratch", "network"]
    assert (variant / "label_efficiency_paired.csv").is_file()
