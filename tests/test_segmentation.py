"""Segmentation fine-tuning (medssl.downstream.segmentation): learning, geometry of the predictions,
pretrained encoders, freezing, layer-wise LR, per-patient label selection and bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.config import load_config
from medssl.data import io
from medssl.data.preprocessing import VolumePreprocessing
from medssl.data.synthetic.hospital import make_hospital
from medssl.downstream.segmentation.cases import resolve_preprocessing, select_labelled
from medssl.downstream.segmentation.config import FinetuneSegConfig
from medssl.downstream.segmentation.task import finetune_seg
from medssl.downstream.segmentation.training import (DecayToPretrained, build_network, encoder_stages,
                                                     layerwise_param_groups, pretrained_parameters)
from medssl.errors import UserError
from medssl.models.volume_encoders import VolumeEncoderConfig, build_segmentation_network, network_encoder
from medssl.training.checkpoint import load_checkpoint
from medssl.training.loop import ParamGroup
from medssl.training.pretrained import export_encoder

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "finetune_seg_tiny.yaml"
# a fast network for CPU tests: SegResNet with 3 one-block stages on 16^3 crops
FAST = ["model.name=segresnet", "model.width=8", "model.segresnet_blocks=[1,1,1]", "data.crop_size=[16,16,16]",
        "train.lr=0.01"]



pytestmark = pytest.mark.usefixtures("one_thread")

def _flip_x(path: str, *, label: bool) -> None:
    """Rewrite a volume in LAS orientation with the same world geometry (array flipped, affine adjusted)."""
    volume = io.read_volume(path, label=label)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = volume.array.shape[0] - 1
    io.write_volume(path, np.ascontiguousarray(volume.array[::-1]), volume.affine @ flip)


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Path:
    """4 patients x 2 studies at 32^3 (train P001, P004; validation P002; test P003); the first test
    volume and its label map are stored in LAS orientation."""
    manifest = make_hospital(tmp_path_factory.mktemp("seg") / "hospital", patients=4, studies=2, size=32, seed=0)
    entry = json.loads(manifest.read_text())["test"][0]
    _flip_x(str(manifest.parent / entry["image"]), label=False)
    _flip_x(str(manifest.parent / entry["label"]), label=True)
    return manifest


def _config(manifest: Path, *overrides: str) -> FinetuneSegConfig:
    return load_config(TINY, FinetuneSegConfig, [f"data.manifest={manifest}", *FAST, *overrides])


def _checkpoint(path: Path, cfg: FinetuneSegConfig, *, seed: int = 123, window=(40.0, 400.0)) -> dict:
    """A "volume-encoder" checkpoint of cfg.model with weights drawn by `seed`; returns its weights."""
    torch.manual_seed(seed)
    encoder = network_encoder(build_segmentation_network(cfg.model, 2), cfg.model)
    prep = VolumePreprocessing(crop_size=cfg.data.crop_size, spacing=cfg.data.spacing, window=window)
    export_encoder(path, encoder, cfg.model, prep.to_dict(), {}, step=7)
    return {k: v.clone() for k, v in encoder.state_dict().items()}


def _encoder_weights(weights: dict, cfg: FinetuneSegConfig) -> dict:
    parts = network_encoder(build_segmentation_network(cfg.model, 10), cfg.model).parts
    return {k: v for k, v in weights.items() if k.split(".")[0] in parts}


# ------------------------------------------------------------------------------------------------ end to end


def test_finetune_learns_and_writes_the_run_directory(hospital, tmp_path):
    cfg = _config(hospital, "train.steps=40", "seg.eval_every=20", "data.spacing=[15.0,15.0,15.0]")
    run = tmp_path / "run"
    summary = finetune_seg(cfg, run)

    # the body class is learnt well above chance (chance: predict body everywhere)
    truth = [io.read_volume(hospital.parent / e["label"], label=True).array
             for e in json.loads(hospital.read_text())["test"]]
    chance = max(2 * (t == 1).sum() / ((t == 1).sum() + t.size) for t in truth)
    assert chance < 0.5
    assert summary["test_dice_body"] > 0.6 > chance + 0.1
    assert 0.0 <= summary["test_dice_mean"] <= 1.0 and summary["test_hd95_body"] > 0
    assert summary["labelled_volumes"] == 4 and summary["test_cases"] == 2 and summary["pretrained"] is None

    # predictions: on the input's grid, with the input's affine (the first one is LAS, resampled to 15 mm inside)
    rows = list(csv.DictReader((run / "test_cases.csv").open()))
    assert [r["case"] for r in rows] == ["P003_S1", "P003_S2"]
    for row in rows:
        image = nib.load(row["image"])
        pred = nib.load(run / "predictions" / f"{row['case']}.nii.gz")
        assert nib.aff2axcodes(image.affine) == (("L", "A", "S") if row["case"] == "P003_S1" else ("R", "A", "S"))
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-5)
        assert pred.shape == image.shape and pred.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(pred.dataobj))) <= set(range(10))
        assert float(row["dice_body"]) > 0.6  # aligned with the label map, LAS case included

    # run directory (DESIGN 3.2)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    assert {"loss", "dice", "ce"} <= set(records[0]) and "val_dice_mean" in records[3]
    assert records[-1]["loss"] < records[0]["loss"]
    assert json.loads((run / "summary.json").read_text())["test_dice_mean"] == summary["test_dice_mean"]
    assert load_checkpoint(run / "checkpoints" / "last.pt", kind="finetune-seg")["step"] == 40
    assert load_checkpoint(run / "checkpoints" / "best.pt", kind="finetune-seg")["step"] in (20, 40)
    assert any((run / "tb").iterdir()) and (run / "config.yaml").is_file()
    assert (run / "test_overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_a_stopped_fine_tuning(hospital, tmp_path):
    """A run stopped at step 2 (last.pt) resumes to step 4 with the same model and data; a refused resume
    (another architecture) changes nothing in the run folder."""
    run = tmp_path / "run"
    short = ["train.checkpoint_every=2", "train.log_every=1", "seg.eval_every=0"]
    finetune_seg(_config(hospital, "train.steps=2", *short), run, quiet=True)
    config_before = (run / "config.yaml").read_bytes()
    with pytest.raises(UserError, match="architecture"):
        finetune_seg(_config(hospital, "train.steps=4", "model.width=16", "seg.eval_every=0"), run, resume=True,
                     quiet=True)
    assert (run / "config.yaml").read_bytes() == config_before
    summary = finetune_seg(_config(hospital, "train.steps=4", *short), run, resume=True, quiet=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 4 and [r["step"] for r in records] == [1, 2, 3, 4]
    assert load_checkpoint(run / "checkpoints" / "last.pt", kind="finetune-seg")["step"] == 4


def test_pretrained_encoder_is_loaded_whole(hospital, tmp_path):
    cfg = _config(hospital)
    stored = _checkpoint(tmp_path / "encoder.pt", cfg)
    scratch, none = build_network(cfg, 10, None)
    network, report = build_network(cfg, 10, tmp_path / "encoder.pt")
    assert none is None and report.fraction == 1.0 and not report.missing and report.step == 7
    encoder = _encoder_weights(network.state_dict(), cfg)
    assert encoder.keys() == stored.keys()
    for key, value in encoder.items():
        assert torch.equal(value, stored[key])
    changed = [k for k, v in _encoder_weights(scratch.state_dict(), cfg).items() if v.ndim > 1]
    assert changed and all(not torch.equal(scratch.state_dict()[k], stored[k]) for k in changed)
    decoder = [k for k in network.state_dict() if k not in encoder]
    assert decoder and all(torch.equal(network.state_dict()[k], scratch.state_dict()[k]) for k in decoder)


@pytest.mark.parametrize("steps, frozen", [(3, True), (5, False)])
def test_freeze_encoder_for_n_steps(hospital, tmp_path, capsys, steps, frozen):
    cfg = _config(hospital, f"train.steps={steps}", "train.log_every=1", "seg.freeze_encoder_steps=3",
                  "seg.eval_every=0", "seg.overlay_cases=0", "seg.labelled_volumes=1")
    stored = _checkpoint(tmp_path / "encoder.pt", cfg, window=(50.0, 350.0))
    summary = finetune_seg(cfg, tmp_path / "run", pretrained=tmp_path / "encoder.pt")
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    encoder = _encoder_weights(last, cfg)
    same = [torch.equal(encoder[k], stored[k]) for k in encoder]
    assert all(same) if frozen else not any(same)
    initial = build_network(cfg, 10, tmp_path / "encoder.pt")[0].state_dict()
    assert any(not torch.equal(last[k], initial[k]) for k in last if k not in encoder)  # the decoder trained
    # the checkpoint's preprocessing wins, with a warning naming both windows
    assert summary["encoder_loaded_fraction"] == 1.0
    assert len(summary["warnings"]) == 1 and "data.window" in summary["warnings"][0]
    assert "[40.0, 400.0]" in summary["warnings"][0] and "[50.0, 350.0]" in summary["warnings"][0]
    assert "warning: data.window" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["preprocessing"]["window"] == [50.0, 350.0]


# ------------------------------------------------------------------------------------------------ pieces


def test_labelled_volumes_are_chosen_per_patient():
    entries = [{"image": f"{p}_{s}", "patient_id": p} for p in ("A", "B", "C", "D", "E") for s in ("S1", "S2")]
    three = select_labelled(entries, 3, seed=0)
    assert len({e["patient_id"] for e in three}) == 3
    assert all(e["image"].endswith("S1") for e in three)
    seven = select_labelled(entries, 7, seed=0)
    assert {e["patient_id"] for e in seven} == set("ABCDE") and seven[:3] == three  # nested
    assert select_labelled(entries, 3, seed=0) == three  # deterministic
    assert any(select_labelled(entries, 3, seed=s) != three for s in range(1, 5))
    assert select_labelled(entries, None, seed=0) == entries
    with pytest.raises(UserError, match="seg.labelled_volumes: 11 labelled volumes asked for"):
        select_labelled(entries, 11, seed=0)


def test_preprocessing_mismatch_warns_with_both_values(hospital):
    from medssl.data.manifest import load_manifest

    cfg = _config(hospital)
    stored = VolumePreprocessing(crop_size=(32, 32, 32), window=(50.0, 350.0), percentiles=(2.0, 98.0)).to_dict()
    prep, notes = resolve_preprocessing(cfg.data, load_manifest(hospital), stored, "CKPT")
    assert prep.crop_size == (32, 32, 32) and prep.window == (50.0, 350.0)
    assert len(notes) == 2  # percentiles do not matter for CT
    assert any("data.crop_size" in n and "[16, 16, 16]" in n and "[32, 32, 32]" in n and "CKPT" in n for n in notes)
    assert resolve_preprocessing(cfg.data, load_manifest(hospital), None, "-")[1] == []


def test_layerwise_lr_decay_groups():
    cfg = VolumeEncoderConfig(width=4)
    network = build_segmentation_network(cfg, 3)
    encoder = network_encoder(network, cfg)
    groups = layerwise_param_groups(network, encoder, layer_decay=0.5)
    lr_of = {id(p): g.lr_scale for g in groups for p in g.params}
    assert len(lr_of) == sum(1 for _ in network.parameters())  # every parameter once
    assert groups[0].lr_scale == 1.0 and groups[0].name == "head"
    stages = encoder_stages(encoder)
    assert [type(s).__name__ for s in stages][:1] == ["TwoConv"] and len(stages) == 5
    for i, stage in enumerate(stages):
        assert {lr_of[id(p)] for p in stage.parameters()} == {0.5 ** (5 - i)}
    assert {lr_of[id(p)] for p in network.final_conv.parameters()} == {1.0}
    assert all(g.weight_decay == (g.params[0].ndim > 1) for g in groups)


def test_layerwise_learning_rates_are_in_effect_during_training(hospital, tmp_path):
    cfg = _config(hospital, "train.steps=3", "train.log_every=1", "train.warmup_steps=0", "seg.layer_decay=0.5",
                  "seg.eval_every=0", "seg.overlay_cases=0", "seg.labelled_volumes=1")
    finetune_seg(cfg, tmp_path / "run", quiet=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stages = len(encoder_stages(network_encoder(build_segmentation_network(cfg.model, 10), cfg.model)))
    for record in records:
        assert record["lr.head"] == record["lr"]
        for i in range(stages):
            assert record[f"lr.stage{i}"] == pytest.approx(record["lr"] * 0.5 ** (stages - i))
        for key in (k for k in record if k.endswith(".no_decay")):
            assert record[key] == record[key.removesuffix(".no_decay")]


def test_decay_to_pretrained_pulls_loaded_weights_back():
    """One step of the hook: p -> p - lr_t * strength * (p - p0), lr_t from the warm-up/cosine schedule and the
    group's scale; frozen parameters stay; the groups keep pulled tensors out of the decay toward zero."""
    weight, frozen = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    hook = DecayToPretrained([ParamGroup("stage0.to_pretrained", [weight, frozen], lr_scale=0.5),
                              ParamGroup("head", [torch.nn.Parameter(torch.ones(1))])], 4.0, lr=0.1, warmup=0,
                             total=10)
    with torch.no_grad():
        weight += 1.0
        frozen += 1.0
    frozen.requires_grad_(False)
    hook(torch.nn.Module(), 1)
    torch.testing.assert_close(weight.detach(), torch.full((3,), 1 - 0.1 * 4.0 * 0.5))
    torch.testing.assert_close(frozen.detach(), torch.ones(2))
    cfg = VolumeEncoderConfig(width=4)
    network = build_segmentation_network(cfg, 3)
    encoder = network_encoder(network, cfg)
    pulled = frozenset(id(p) for p in encoder.parameters())
    groups = layerwise_param_groups(network, encoder, 1.0, pulled)
    assert {g.name for g in groups} == {"head", "head.no_decay", *(f"stage{i}.to_pretrained" for i in range(5))}
    assert all(not g.weight_decay for g in groups if g.name.endswith(".to_pretrained"))


def test_decay_to_pretrained_keeps_the_encoder_near_its_pretrained_weights(hospital, tmp_path):
    overrides = ("train.steps=4", "train.warmup_steps=0", "seg.eval_every=0", "seg.overlay_cases=0",
                 "seg.labelled_volumes=1")
    drift = {}
    for strength in (0, 40):
        cfg = _config(hospital, *overrides, f"seg.decay_to_pretrained={strength}")
        stored = _checkpoint(tmp_path / "encoder.pt", cfg)
        finetune_seg(cfg, tmp_path / f"run{strength}", pretrained=tmp_path / "encoder.pt", quiet=True)
        last = _encoder_weights(load_checkpoint(tmp_path / f"run{strength}" / "checkpoints" / "last.pt")["model"],
                                cfg)
        drift[strength] = sum(float((last[k].float() - stored[k].float()).norm()) for k in stored if k in last)
    assert 0 < drift[40] < 0.7 * drift[0]
    network, report = build_network(cfg, 10, tmp_path / "encoder.pt")
    assert len(pretrained_parameters(network, report)) == len(list(network_encoder(network, cfg.model).parameters()))
    with pytest.raises(UserError, match="^seg.decay_to_pretrained: 40.0 .* no --pretrained"):
        finetune_seg(cfg, tmp_path / "scratch", quiet=True)
    assert not (tmp_path / "scratch").exists()


# ------------------------------------------------------------------------------------------------ bad input


def _copy(hospital: Path, tmp_path: Path) -> tuple[Path, dict]:
    folder = shutil.copytree(hospital.parent, tmp_path / "copy")
    manifest = folder / "manifest.json"
    return manifest, json.loads(manifest.read_text())["training"][0]


@pytest.mark.parametrize("problem, message", [
    ("undeclared", r"training\[\d\]\.label: value\(s\) \[12\] not declared in .*'labels'"),
    ("empty", r"training\[\d\]\.label: label map is empty"),
    ("affine", r"training\[\d\]\.label: affine differs from the image's by up to 5 mm"),
])
def test_bad_label_maps_are_refused_before_writing(hospital, tmp_path, problem, message):
    manifest, entry = _copy(hospital, tmp_path)
    path = manifest.parent / entry["label"]
    label = io.read_volume(path, label=True)
    array, affine = label.array.copy(), label.affine.copy()
    if problem == "undeclared":
        array[0, 0, 0] = 12
    elif problem == "empty":
        array[:] = 0
    else:
        affine[0, 3] += 5.0
    io.write_volume(path, array, affine)
    with pytest.raises(UserError, match=message) as err:
        finetune_seg(_config(manifest), tmp_path / "run")
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_unfit_checkpoints_are_refused(hospital, tmp_path):
    cfg = _config(hospital)
    weights = _checkpoint(tmp_path / "encoder.pt", cfg)
    missing = sorted(weights)[:2]
    payload = torch.load(tmp_path / "encoder.pt", weights_only=True)
    payload["model"] = {k: v for k, v in weights.items() if k not in missing}
    torch.save(payload, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="only .* of the network's tensors load, 100% required") as err:
        finetune_seg(cfg, tmp_path / "run", pretrained=tmp_path / "partial.pt")
    assert str(tmp_path / "partial.pt") in str(err.value) and missing[0] in str(err.value)
    other = _config(hospital, "model.width=16")
    with pytest.raises(UserError, match="encoder differs from the config's: model.width: 8 in the checkpoint, 16 in"):
        finetune_seg(other, tmp_path / "run", pretrained=tmp_path / "encoder.pt")
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="run directory is not empty"):
        finetune_seg(cfg, tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["keep.txt"]


def test_config_errors_name_the_field(hospital):
    with pytest.raises(UserError, match="seg.eval_every 7 must be a multiple of train.log_every 5"):
        _config(hospital, "seg.eval_every=7")
    with pytest.raises(UserError, match="seg.layer_decay"):
        _config(hospital, "seg.layer_decay=0")
    with pytest.raises(UserError, match="unknown key 'seg.freeze'"):
        _config(hospital, "seg.freeze=3")


def test_inference_speed_reports_throughput_and_memory(capsys):
    from medssl.bench.label_efficiency import inference_speed

    figures = inference_speed(TINY, size=32, classes=3, volumes=2, overrides=FAST)
    assert figures["volumes_per_s"] > 0 and figures["seconds_per_volume"] == pytest.approx(1 / figures["volumes_per_s"])
    assert figures["peak_rss_mib"] > 0 and figures["inference_rss_increase_mib"] >= 0
    printed = " ".join(capsys.readouterr().out.split())  # rich may wrap long lines
    assert "sliding-window inference (segresnet width 8, ROI (16, 16, 16)" in printed


def test_a_patient_in_two_splits_is_refused_naming_the_patient(hospital, tmp_path):
    data = json.loads(hospital.read_text())
    leaked = dict(data["test"][0], image=str(hospital.parent / data["test"][0]["image"]),
                  label=str(hospital.parent / data["test"][0]["label"]))
    data["training"].append(leaked)
    manifest = tmp_path / "leaky.json"
    manifest.write_text(json.dumps(data))
    with pytest.raises(UserError,
                       match=f"patient '{leaked['patient_id']}' is in more than one split: training and test"):
        finetune_seg(_config(manifest), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_evaluation_cases_are_read_one_at_a_time(hospital, monkeypatch):
    """Validation and test cases keep no volume between evaluations: each is read when evaluated, and at most
    one case's volumes are alive at a time (a hospital's test split need not fit in memory)."""
    import gc
    import weakref

    from medssl.data.volumes import manifest_volume_entries
    from medssl.downstream.segmentation.cases import Case, load_cases
    from medssl.downstream.segmentation.metrics import evaluate_cases
    from medssl.inference import SlidingWindowPredictor

    from medssl.data.manifest import load_manifest

    classes = {int(k): v for k, v in json.loads(hospital.read_text())["labels"].items()}
    entries = manifest_volume_entries(load_manifest(hospital), "test", with_label=True)
    cases = load_cases(entries, classes, str(hospital))
    assert len(cases) == len(entries) >= 2
    assert not any(isinstance(v, np.ndarray) and v.ndim == 3 for c in cases for v in vars(c).values())
    prep = _config(hospital).data.preprocessing("CT")
    predictor = SlidingWindowPredictor(prep)
    network = build_segmentation_network(_config(hospital).model, len(classes))
    alive: list[weakref.ref] = []
    seen = []

    def on_case(case: Case, loaded, pred: np.ndarray) -> None:
        gc.collect()
        assert sum(ref() is not None for ref in alive) == 0, "an earlier case's volumes are still in memory"
        alive.append(weakref.ref(loaded.preprocessed))
        assert pred.shape == loaded.label.shape == case.image().shape
        seen.append(case.name)

    rows = evaluate_cases(network, cases, predictor, classes, on_case=on_case)
    assert seen == [c.name for c in cases] and len(rows) == len(cases) and "dice_mean" in rows[0]
