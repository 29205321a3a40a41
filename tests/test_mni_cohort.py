"""The MNI152 tissue cohort (medssl.data.mni_cohort) and the label-efficiency benchmark on it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.bench.label_efficiency import label_efficiency, summarise
from medssl.data import io
from medssl.data.manifest import load_manifest
from medssl.data.manifest_check import check_manifest
from medssl.data.synthetic.mni152 import FOV_MM, MANIFEST_NAME, TISSUES, make_mni_cohort
from medssl.data.preprocessing import VolumePreprocessing
from medssl.errors import UserError
from medssl.models.volume_encoders import VolumeEncoderConfig, build_volume_encoder, export_encoder

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
    runs = [{"cohort": "c", "labelled": 1, "init": init, "seed": s, "test_dice_mean": v}
            for init, values in (("scratch", [0.2, 0.4]), ("pretrained", [0.5])) for s, v in enumerate(values)]
    rows = summarise(runs)
    assert [r["init"] for r in rows] == ["scratch", "pretrained"]
    assert rows[0]["dice_mean"] == pytest.approx(0.3) and rows[0]["dice_std"] == pytest.approx(0.1414, abs=1e-4)
    assert rows[1]["dice_std"] == 0.0 and rows[1]["runs"] == 1


def test_label_efficiency_bench_on_the_mni_cohort(cohort, tmp_path, capsys):
    model = VolumeEncoderConfig(name="segresnet", width=8, segresnet_blocks=(1, 1, 1))
    torch.manual_seed(0)
    export_encoder(tmp_path / "encoder.pt", build_volume_encoder(model), model,
                   VolumePreprocessing(modality="MR", crop_size=(16, 16, 16)).to_dict(), {}, step=1)
    overrides = ["model.name=segresnet", "model.width=8", "model.segresnet_blocks=[1,1,1]",
                 "data.crop_size=[16,16,16]", "train.log_every=1", "seg.eval_every=0", "seg.overlay_cases=0"]
    out = tmp_path / "bench"
    rows = label_efficiency(out, cohorts=["mni152"], counts=[1, 2], seeds=[0], steps=2,
                            finetune_config=REPO / "configs" / "finetune_seg_tiny.yaml", overrides=overrides,
                            manifests={"mni152": cohort}, pretrained={"mni152": tmp_path / "encoder.pt"})
    assert [(r["labelled"], r["init"]) for r in rows] == [(1, "scratch"), (1, "pretrained"), (2, "scratch"),
                                                         (2, "pretrained")]
    table = list(csv.DictReader((out / "label_efficiency.csv").open()))
    assert len(table) == 4 and all(0.0 <= float(r["dice_mean"]) <= 1.0 for r in table)
    runs = list(csv.DictReader((out / "label_efficiency_runs.csv").open()))
    assert [int(r["labelled_patients"]) for r in runs] == [1, 1, 2, 2] and {r["steps"] for r in runs} == {"2"}
    summary = json.loads((out / "mni152" / "pretrained_n2_seed0" / "summary.json").read_text())
    assert summary["encoder_loaded_fraction"] == 1.0 and summary["labelled_volumes"] == 2
    assert (out / "label_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    assert "label efficiency" in capsys.readouterr().out
    # a re-run finds every run directory and recomputes nothing
    before = (out / "mni152" / "scratch_n1_seed0" / "summary.json").stat().st_mtime_ns
    assert label_efficiency(out, cohorts=["mni152"], counts=[1, 2], seeds=[0], steps=2, quiet=True,
                            finetune_config=REPO / "configs" / "finetune_seg_tiny.yaml", overrides=overrides,
                            manifests={"mni152": cohort}, pretrained={"mni152": tmp_path / "encoder.pt"}) == rows
    assert (out / "mni152" / "scratch_n1_seed0" / "summary.json").stat().st_mtime_ns == before
