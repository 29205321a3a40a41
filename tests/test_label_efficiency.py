"""The label-efficiency benchmark's two-site grid (medssl.bench.label_efficiency): tuning on validation, scores
per test site, Holm-corrected paired differences, per-organ family, resumable pretraining on the pool."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from medssl.bench.label_efficiency import Tuning, label_efficiency, pretrain_cohort, pretraining_manifest
from medssl.bench.stats import holm, paired_differences
from medssl.data.preprocessing import VolumePreprocessing
from medssl.data.synthetic.hospital import make_hospital
from medssl.errors import UserError
from medssl.models.volume_encoders import VolumeEncoderConfig, build_segmentation_network, network_encoder
from medssl.training.pretrained import export_encoder

REPO = Path(__file__).resolve().parents[1]
FAST = ["model.name=segresnet", "model.width=8", "model.segresnet_blocks=[1,1,1]", "data.crop_size=[16,16,16]",
        "train.log_every=1", "seg.eval_every=1", "seg.overlay_cases=0"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_site(tmp_path_factory) -> Path:
    """3 site-A patients (training / validation / test) + 1 site-B test patient, 1 study each at 32^3; pool of 2."""
    return make_hospital(tmp_path_factory.mktemp("two_site") / "h", patients=3, studies=1, size=32, seed=0,
                         trials=1, signal_seconds=2.0, two_site=True, pool=2)


def _rows(diffs: dict[str, list[float]]) -> list[dict]:
    runs = [{"cohort": "c", "labelled": 1, "init": "scratch", "seed": s, "test_dice_mean": 0.5} for s in range(5)]
    for k, (init, values) in enumerate(diffs.items()):
        runs += [{"cohort": "c", "labelled": 1, "init": init, "seed": s, "test_dice_mean": 0.5 + d}
                 for s, d in enumerate(values)]
    return paired_differences(runs)


def test_holm_step_down_levels_p_values_and_intervals():
    rows = holm(_rows({"big": [0.10, 0.11, 0.12, 0.10, 0.11], "medium": [0.02, 0.05, -0.01, 0.04, 0.03],
                       "none": [0.01, -0.02, 0.02, -0.01, 0.0]}))
    by = {r["init"]: r for r in rows}
    p = sorted(r["p_value"] for r in rows)
    assert by["big"]["p_value"] == p[0] and by["big"]["holm_p"] == pytest.approx(3 * p[0])
    assert by["big"]["holm_level"] == pytest.approx(0.05 / 3) and by["big"]["holm_reject"]
    assert by["medium"]["holm_p"] == pytest.approx(max(3 * p[0], 2 * p[1]))
    assert not by["none"]["holm_reject"] and by["none"]["holm_p"] == pytest.approx(min(1.0, max(2 * p[1], p[2])))
    for row in rows:  # an adjusted interval excludes 0 exactly when Holm rejects, and is wider than the plain one
        assert (row["holm_ci_low"] > 0 or row["holm_ci_high"] < 0) == row["holm_reject"]
        assert row["holm_ci_low"] <= row["ci_low"] <= row["diff_mean"] <= row["ci_high"] <= row["holm_ci_high"]
    one = holm(_rows({"single": [0.1]}))  # one seed: no test
    assert math.isnan(one[0]["holm_ci_low"]) and not one[0]["holm_reject"]


def _encoder(path: Path) -> Path:
    model = VolumeEncoderConfig(name="segresnet", width=8, segresnet_blocks=(1, 1, 1))
    torch.manual_seed(0)
    encoder = network_encoder(build_segmentation_network(model, 1), model)
    export_encoder(path, encoder, model, VolumePreprocessing(modality="CT", crop_size=(16, 16, 16)).to_dict(), {},
                   step=1)
    return path


def test_tuned_grid_per_test_site_with_holm_and_organs(two_site, tmp_path):
    out = tmp_path / "bench"
    tuning = Tuning(lrs=(0.01, 0.001), warmups=(0,), decays=(1.0,), labelled=1, seed=0)
    rows = label_efficiency(out, cohorts=["two_site"], counts=[1], seeds=[0, 1], inits=["scratch", "encoder"],
                            steps=2, finetune_config=REPO / "configs" / "finetune_seg_tiny.yaml", overrides=FAST,
                            manifests={"two_site": two_site}, pretrained={"two_site": {"encoder": _encoder(
                                tmp_path / "encoder.pt")}}, tuning=tuning, quiet=True)
    tuned = list(csv.DictReader((out / "label_efficiency_tuning.csv").open()))
    assert [(r["init"], r["lr"], r["decay_to_pretrained"]) for r in tuned] == [
        ("scratch", "0.01", "0"), ("scratch", "0.001", "0"), ("encoder", "0.01", "0"), ("encoder", "0.001", "0"),
        ("encoder", tuned[2 if float(tuned[2]["val_dice"]) >= float(tuned[3]["val_dice"]) else 3]["lr"], "1")]
    for init in ("scratch", "encoder"):
        mine = [r for r in tuned if r["init"] == init]
        (best,) = [r for r in mine if r["chosen"] == "True"]
        assert float(best["val_dice"]) == max(float(r["val_dice"]) for r in mine)
        cell = out / "two_site" / f"{init}_n1_seed0" / "summary.json"  # the chosen tuning run is the tuned cell
        assert cell.read_bytes() == (Path(best["run"]) / "summary.json").read_bytes()
        config = (out / "two_site" / f"{init}_n1_seed1" / "config.yaml").read_text()
        assert f"lr: {float(best['lr'])}" in config
    assert [(r["site"], r["init"]) for r in rows] == [("A", "scratch"), ("A", "encoder"), ("B", "scratch"),
                                                      ("B", "encoder")]
    runs = list(csv.DictReader((out / "label_efficiency_runs.csv").open()))
    assert len(runs) == 8 and {"dice_kidney_left", "dice_spleen", "drift_encoder"} <= set(runs[0])
    paired = list(csv.DictReader((out / "label_efficiency_paired.csv").open()))
    assert [(r["site"], r["init"], r["seeds"]) for r in paired] == [("A", "encoder", "2"), ("B", "encoder", "2")]
    assert all(float(r["holm_ci_low"]) <= float(r["ci_low"]) for r in paired)
    organs = list(csv.DictReader((out / "label_efficiency_paired_organs.csv").open()))
    assert {r["metric"] for r in organs} == {"dice_kidney_left", "dice_kidney_right", "dice_spleen"}
    markdown = (out / "label_efficiency.md").read_text(encoding="utf-8")
    assert "| two_site, site B | 1 |" in markdown and "Tuning on the validation split" in markdown
    assert (out / "label_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="encoder_nopool"):
        label_efficiency(out, cohorts=["two_site"], counts=[1], seeds=[0], inits=["scratch", "encoder_nopool"],
                         steps=2, finetune_config=REPO / "configs" / "finetune_seg_tiny.yaml", overrides=FAST,
                         manifests={"two_site": two_site}, pretrained={"two_site": {"encoder_nopool": tmp_path /
                                                                                    "encoder.pt"}},
                         tuning=tuning, quiet=True)
    with pytest.raises(UserError, match="--tune-decay"):
        Tuning(decays=(0.0,))


def test_pretraining_reads_the_pool_and_resumes(two_site, tmp_path):
    assert pretraining_manifest(two_site, "encoder").name == "pool.json"
    assert pretraining_manifest(two_site, "encoder_nopool") == two_site
    run_dir, config = tmp_path / "pretrain_encoder", REPO / "configs" / "pretrain_volume_tiny.yaml"
    pretrain_cohort(two_site.parent / "pool.json", run_dir, init="encoder", config=config, steps=2, overrides=[])
    assert json.loads((run_dir / "summary.json").read_text())["resumed"] is False
    (run_dir / "encoder.pt").unlink()  # as if stopped after its step-2 checkpoint
    pretrain_cohort(two_site.parent / "pool.json", run_dir, init="encoder", config=config, steps=4, overrides=[])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed"] is True and summary["steps"] == 4 and (run_dir / "encoder.pt").is_file()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_diverging_candidate_is_left_out_and_stale_cells_are_refused(two_site, tmp_path, monkeypatch):
    """A candidate whose loss diverges is recorded as failed (not rerun) and never chosen; a finished cell made
    with other settings is refused by name instead of being reused."""
    import medssl.bench.label_efficiency as bench

    real = bench.finetune_run

    def diverging(manifest, run_dir, **kwargs):
        if "train.lr=0.01" in kwargs["overrides"]:
            raise UserError("train: non-finite loss at step 1 (dice=nan); lower train.lr or check the data for NaNs")
        return real(manifest, run_dir, **kwargs)

    monkeypatch.setattr(bench, "finetune_run", diverging)
    options = dict(cohorts=["two_site"], counts=[1], seeds=[0], inits=["scratch"], steps=2,
                   finetune_config=REPO / "configs" / "finetune_seg_tiny.yaml", overrides=FAST,
                   manifests={"two_site": two_site}, quiet=True)
    out = tmp_path / "bench"
    label_efficiency(out, **options, tuning=Tuning(lrs=(0.01, 0.001), warmups=(0,), labelled=1, seed=0))
    tuned = list(csv.DictReader((out / "label_efficiency_tuning.csv").open()))
    assert [(r["lr"], r["chosen"], r["val_dice"]) for r in tuned][0] == ("0.01", "False", "-inf")
    assert "non-finite" in tuned[0]["failed"] and (out / "two_site" / "tune" / "scratch_lr0.01_wu0.failed").is_file()
    with pytest.raises(UserError, match=r"scratch_n1_seed0: finished with other train settings"):
        label_efficiency(out, **{**options, "overrides": [*FAST, "train.lr=0.003"]})
