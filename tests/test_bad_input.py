"""Bad input across every command, as one table: each case exits 2 with one line that names the file or field
and the problem, prints no traceback, and leaves every file of the workspace as it was (no half-written or
altered output)."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.cli import main
from medssl.data.preprocessing import VolumePreprocessing
from medssl.data.store import preprocess
from medssl.data.synthetic.hospital import make_hospital
from medssl.training.checkpoint import save_checkpoint

TINY = {"pretrain volume": "pretrain_volume_tiny", "pretrain timeseries": "pretrain_timeseries_tiny",
        "finetune seg": "finetune_seg_tiny", "eval timeseries": "eval_timeseries_tiny",
        "ground train": "grounding_tiny"}


@dataclass
class Workspace:
    """Files the cases point at, made once per module (copied per test)."""

    root: Path

    def __getattr__(self, name: str) -> Path:
        return self.root / name.replace("__", ".")


def _manifest(ws: Path, name: str, edit: Callable[[dict], None]) -> None:
    tree = json.loads((ws / "hospital" / "manifest.json").read_text(encoding="utf-8"))
    edit(tree)
    (ws / "hospital" / name).write_text(json.dumps(tree), encoding="utf-8")


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))


@pytest.fixture(scope="module")
def workspace_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("bad_input")
    make_hospital(ws / "hospital", patients=4, studies=1, size=32, seed=0, trials=1, signal_seconds=10.0)
    vol = ws / "hospital" / "vol"
    image = nib.load(str(next(vol.glob("*.nii.gz"))))
    data = np.asarray(image.dataobj, dtype=np.float32)
    first = json.loads((ws / "hospital" / "manifest.json").read_text(encoding="utf-8"))["training"][0]
    # broken volumes beside the good ones
    (vol / "notnifti.nii.gz").write_bytes(b"this is a text file, not a NIfTI")
    raw = (vol / Path(first["image"]).name).read_bytes()
    (vol / "truncated.nii.gz").write_bytes(raw[: len(raw) // 3])
    with_nan = data.copy()
    with_nan[5, 5, 5] = np.nan
    _nifti(vol / "nan.nii.gz", with_nan, image.affine)
    _nifti(vol / "fourd.nii.gz", np.stack([data, data], -1), image.affine)
    singular = image.affine.copy()
    singular[:, 0] = 0
    flat = nib.Nifti1Image(data, None)
    flat.header.set_sform(singular, code=1)
    flat.header.set_qform(None, code=0)
    nib.save(flat, str(vol / "singular.nii.gz"))
    _nifti(vol / "constant.nii.gz", np.full_like(data, -50.0), image.affine)
    _nifti(vol / "mr_like.nii.gz", data + 1100.0, image.affine)  # no air at -1000: looks like MR
    _nifti(vol / "huge_voxels.nii.gz", data, np.diag([1e6, 1e6, 1e6, 1.0]))
    zero = nib.Nifti1Image(data, None)
    zero.header["pixdim"][1] = 0  # no sform / qform: the voxel size comes from pixdim alone
    zero.header.set_sform(None, code=0)
    zero.header.set_qform(None, code=0)
    nib.save(zero, str(vol / "zero_voxels.nii.gz"))
    from nibabel import cifti2

    axes = (cifti2.ScalarAxis(["thickness"]), cifti2.BrainModelAxis.from_mask(np.ones(10, bool), name="CortexLeft"))
    cifti2.Cifti2Image(np.zeros((1, 10), np.float32), header=axes).to_filename(str(vol / "surface.dscalar.nii"))
    (ws / "signals").mkdir()
    (ws / "signals" / "rec1.hea").write_text("", encoding="utf-8")
    _nifti(ws / "hospital" / "seg" / "small_label.nii.gz", np.zeros((16, 16, 16), np.int16), image.affine)

    def with_image(name: str) -> Callable[[dict], None]:
        return lambda tree: tree["training"][0].update(image=f"vol/{name}")

    _manifest(ws, "two_splits.json", lambda t: t["test"][0].update(patient_id=t["training"][0]["patient_id"]))
    _manifest(ws, "missing_image.json", with_image("gone.nii.gz"))
    _manifest(ws, "not_nifti.json", with_image("notnifti.nii.gz"))
    _manifest(ws, "truncated.json", with_image("truncated.nii.gz"))
    _manifest(ws, "nan.json", with_image("nan.nii.gz"))
    _manifest(ws, "fourd.json", with_image("fourd.nii.gz"))
    _manifest(ws, "constant.json", with_image("constant.nii.gz"))
    _manifest(ws, "huge_voxels.json", with_image("huge_voxels.nii.gz"))
    _manifest(ws, "cifti.json", with_image("surface.dscalar.nii"))
    _manifest(ws, "one_condition.json", lambda t: [e.update(condition=0) for e in t["training"]])
    _manifest(ws, "zero_voxels.json", with_image("zero_voxels.nii.gz"))
    _manifest(ws, "singular.json", with_image("singular.nii.gz"))
    _manifest(ws, "label_shape.json", lambda t: t["training"][0].update(label="seg/small_label.nii.gz"))
    _manifest(ws, "empty_training.json", lambda t: t.update(training=[]))
    _manifest(ws, "no_landmarks.json", lambda t: [e.pop("landmarks") for s in ("training", "validation", "test")
                                                  for e in t[s]])
    _manifest(ws, "bad_modality.json", lambda t: t.update(modality={"0": "XYZ"}))
    _manifest(ws, "no_reports.json", lambda t: [e.pop("report", None) or e.pop("report_file", None)
                                                 for s in ("training", "validation", "test") for e in t[s]])
    (ws / "hospital" / "list.json").write_text("[1, 2]", encoding="utf-8")
    (ws / "hospital" / "broken.json").write_text("{not json", encoding="utf-8")
    (ws / "bad.yaml").write_text("data: [unclosed\n", encoding="utf-8")
    (ws / "list.yaml").write_text("- 1\n- 2\n", encoding="utf-8")
    (ws / "a_file").write_text("x", encoding="utf-8")
    (ws / "empty_dir").mkdir()
    (ws / "flat").mkdir()
    (ws / "flat" / "scan.nii.gz").write_bytes(b"not a volume at all")
    (ws / "odd_voxels").mkdir()
    _nifti(ws / "odd_voxels" / "scan.nii.gz", data, np.diag([1e6, 1e6, 1e6, 1.0]))
    import SimpleITK as sitk

    itk = sitk.GetImageFromArray(data)
    itk.SetSpacing((2000.0, 1.0, 1.0))
    sitk.WriteImage(itk, str(vol / "absurd_spacing.mha"))
    _manifest(ws, "absurd_mha.json", with_image("absurd_spacing.mha"))
    (ws / "empty.pt").write_bytes(b"")
    (ws / "corrupt.pt").write_bytes(b"PK\x03\x04 broken zip")
    save_checkpoint(ws / "ts_kind.pt", kind="timeseries-pretrain", step=1, model={"w": torch.zeros(1)}, arch={},
                    preprocessing={}, config={})
    (ws / "binary_report.txt").write_bytes(b"\x00\x01\x02 report")
    (ws / "latin1_report.txt").write_bytes("Lésion".encode("latin-1"))
    (ws / "empty_report.txt").write_text("   \n", encoding="utf-8")
    (ws / "report.txt").write_text("Findings: A cyst in the liver.", encoding="utf-8")
    with gzip.open(ws / "fake.nii.gz", "wb") as handle:
        handle.write(b"gzip but no NIfTI header")
    # a run folder that must not be touched by a refused --resume or a refused overwrite
    run = ws / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {width: 4}\n", encoding="utf-8")
    (run / "checkpoints" / "last.pt").write_bytes(b"corrupt")
    (ws / "out_busy").mkdir()
    (ws / "out_busy" / "keep.txt").write_text("precious", encoding="utf-8")
    # a preprocessed store of the hospital, made with the tiny configs' settings
    preprocess(ws / "hospital" / "manifest.json", ws / "store", VolumePreprocessing(crop_size=(32, 32, 32)),
               quiet=True)
    # a real one-step pretraining: its checkpoint against a config of another architecture
    from medssl.config import load_config
    from medssl.pretrain.volume import PretrainVolumeConfig, pretrain_volume

    pretrain_volume(load_config(TINY["pretrain volume"], PretrainVolumeConfig, [
        f"data.manifest={ws / M}", "train.steps=1", "probe.enabled=false"]), ws / "run_tiny")
    return ws


M = "hospital/manifest.json"


def cfg(command: str, *extra: str, manifest: str = M) -> list[str]:
    """A training command on the tiny config and the workspace's hospital (paths relative to it)."""
    quiet = ["probe.enabled=false"] if command == "pretrain volume" else []  # 4 patients: the probe would warn
    return [*command.split(), "-c", TINY[command], f"data.manifest={manifest}", *quiet, *extra]


# (id, argv relative to the workspace, what the one-line message must contain)
CASES: list[tuple[str, list[str], str]] = [
    # synth
    ("synth-zero-patients", ["synth", "new", "--patients", "0"], "'--patients'"),
    ("synth-tiny-size", ["synth", "new", "--size", "4"], "'--size'"),
    ("synth-zero-studies", ["synth", "new", "--studies", "0"], "'--studies'"),
    ("synth-unknown-cohort", ["synth", "new", "--cohort", "zoo"], "--cohort"),
    ("synth-out-is-file", ["synth", "a_file"], "a_file"),
    ("synth-out-not-empty", ["synth", "out_busy"], "out_busy"),
    ("synth-negative-seconds", ["synth", "new", "--signal-seconds", "-1"], "'--signal-seconds'"),
    ("synth-bad-integer", ["synth", "new", "--patients", "many"], "--patients"),
    # manifest build
    ("build-missing-folder", ["manifest", "build", "nowhere", "-o", "m.json"], "nowhere"),
    ("build-empty-folder", ["manifest", "build", "empty_dir", "-o", "m.json"], "empty_dir"),
    ("build-unknown-modality", ["manifest", "build", "hospital", "-o", "m.json", "--modality", "XYZ"], "--modality"),
    ("build-output-is-folder", ["manifest", "build", "hospital", "-o", "empty_dir"], "empty_dir"),
    ("build-bad-fraction", ["manifest", "build", "hospital", "-o", "m.json", "--val-fraction", "1.5"],
     "--val-fraction"),
    ("build-corrupt-flat-scan", ["manifest", "build", "flat", "-o", "m.json"], "scan.nii.gz"),
    # manifest check
    ("check-missing", ["manifest", "check", "hospital/none.json"], "none.json"),
    ("check-not-json", ["manifest", "check", "hospital/broken.json"], "broken.json"),
    ("check-json-list", ["manifest", "check", "hospital/list.json"], "list.json"),
    ("check-two-splits", ["manifest", "check", "hospital/two_splits.json"], "P00"),
    ("check-missing-image", ["manifest", "check", "hospital/missing_image.json"], "gone.nii.gz"),
    ("check-not-nifti", ["manifest", "check", "hospital/not_nifti.json"], "notnifti.nii.gz"),
    ("check-truncated", ["manifest", "check", "hospital/truncated.json"], "truncated.nii.gz"),
    ("check-nan", ["manifest", "check", "hospital/nan.json"], "nan.nii.gz"),
    ("check-4d", ["manifest", "check", "hospital/fourd.json"], "fourd.nii.gz"),
    ("check-singular-affine", ["manifest", "check", "hospital/singular.json"], "singular.nii.gz"),
    ("check-label-shape", ["manifest", "check", "hospital/label_shape.json"], "small_label.nii.gz"),
    ("check-empty-training", ["manifest", "check", "hospital/empty_training.json"], "training"),
    ("check-cifti", ["manifest", "check", "hospital/cifti.json"], "a Cifti2 file, not a 3D NIfTI volume"),
    ("check-huge-voxels", ["manifest", "check", "hospital/huge_voxels.json"], "huge_voxels.nii.gz"),
    ("check-zero-voxel-size", ["manifest", "check", "hospital/zero_voxels.json"], "zero_voxels.nii.gz"),
    ("check-absurd-mha-spacing", ["manifest", "check", "hospital/absurd_mha.json"], "absurd_spacing.mha"),
    ("build-huge-voxels", ["manifest", "build", "odd_voxels", "-o", "m.json"], "scan.nii.gz: voxel size"),
    ("build-empty-wfdb-header", ["manifest", "build", "signals", "-o", "m.json"], "rec1.hea"),
    ("check-bad-modality", ["manifest", "check", "hospital/bad_modality.json"], "XYZ"),
    # configs and overrides (through pretrain volume)
    ("config-missing", ["pretrain", "volume", "-c", "nope.yaml"], "nope.yaml"),
    ("config-bad-yaml", ["pretrain", "volume", "-c", "bad.yaml"], "bad.yaml"),
    ("config-not-mapping", ["pretrain", "volume", "-c", "list.yaml"], "list.yaml"),
    ("override-no-equals", cfg("pretrain volume", "train.steps"), "train.steps"),
    ("override-negative-steps", cfg("pretrain volume", "train.steps=-3"), "train.steps"),
    ("override-unknown-key", cfg("pretrain volume", "train.stepz=3"), "train.stepz"),
    ("override-wrong-type", cfg("pretrain volume", "train.lr=fast"), "train.lr"),
    ("override-unknown-model", cfg("pretrain volume", "model.name=resnet"), "model.name"),
    ("override-2d-crop", cfg("pretrain volume", "data.crop_size=[32, 32]"), "data.crop_size"),
    ("override-bad-window", cfg("pretrain volume", "data.window=[40]"), "data.window"),
    ("volume-one-anchor-batch-norm", cfg("pretrain volume", "train.batch_size=1"),
     "train.batch_size is 1 but heads.norm is batch"),
    ("override-value-is-section", cfg("pretrain volume", "train.steps.x=1"), "train.steps"),
    # pretrain volume: data and run folder
    ("volume-missing-manifest", cfg("pretrain volume", manifest="hospital/none.json"), "none.json"),
    ("volume-nan-volume", cfg("pretrain volume", manifest="hospital/nan.json"), "nan.nii.gz"),
    ("volume-singular-affine", cfg("pretrain volume", manifest="hospital/singular.json"), "singular.nii.gz"),
    ("volume-constant-volume", cfg("pretrain volume", manifest="hospital/constant.json"), "constant.nii.gz"),
    ("volume-truncated-volume", cfg("pretrain volume", manifest="hospital/truncated.json"), "truncated.nii.gz"),
    ("volume-two-splits", cfg("pretrain volume", manifest="hospital/two_splits.json"), "P00"),
    ("volume-out-is-file", [*cfg("pretrain volume"), "-o", "a_file"], "a_file"),
    ("volume-out-under-file", [*cfg("pretrain volume"), "-o", "a_file/run"], "a_file"),
    ("volume-out-not-empty", [*cfg("pretrain volume"), "-o", "out_busy"], "out_busy"),
    ("volume-resume-missing", [*cfg("pretrain volume"), "-o", "no_run", "--resume"], "no_run"),
    ("volume-resume-corrupt", [*cfg("pretrain volume"), "-o", "run", "--resume"], "last.pt"),
    ("volume-store-is-file", cfg("pretrain volume", "data.store=a_file"), "a_file"),
    ("volume-store-other-settings", cfg("pretrain volume", "data.store=store", "data.window=[50,400]"),
     "window [40.0, 400.0] (asked: [50.0, 400.0])"),
    ("volume-store-of-another-manifest", cfg("pretrain volume", "data.store=store", manifest="hospital/nan.json"),
     "medssl preprocess"),
    # preprocess
    ("preprocess-store-is-file", ["preprocess", "-c", "pretrain_volume_tiny", f"data.manifest={M}",
                                  "data.store=a_file"], "a_file"),
    ("preprocess-other-settings", ["preprocess", "-c", "pretrain_volume_tiny", f"data.manifest={M}",
                                   "data.store=store", "data.spacing=[2,2,2]"],
     "spacing None (asked: [2.0, 2.0, 2.0])"),
    ("preprocess-not-a-store", ["preprocess", "-c", "pretrain_volume_tiny", f"data.manifest={M}",
                                "data.store=out_busy"], "out_busy"),
    ("preprocess-missing-manifest", ["preprocess", "-c", "pretrain_volume_tiny", "data.manifest=hospital/none.json"],
     "none.json"),
    ("preprocess-two-splits", ["preprocess", "-c", "pretrain_volume_tiny", "data.manifest=hospital/two_splits.json",
                               "data.store=new_store"], "P00"),
    ("preprocess-zero-workers", ["preprocess", "-c", "pretrain_volume_tiny", f"data.manifest={M}", "--workers", "0"],
     "--workers"),
    ("volume-resume-other-arch", [*cfg("pretrain volume", "train.steps=2", "heads.proj_dim=16"), "-o", "run_tiny",
                                  "--resume"], "the checkpoint's architecture differs from the config's: "
                                               "heads.proj_dim: 64 in the checkpoint, 16 in the config"),
    ("volume-smaller-than-crop", cfg("pretrain volume", "data.small_volume=error", "data.crop_size=[64,64,64]"),
     "set data.small_volume=pad to zero-pad it"),
    ("seg-smaller-than-crop", cfg("finetune seg", "data.small_volume=error", "data.crop_size=[64,64,64]"),
     "set data.small_volume=pad to zero-pad it"),
    ("volume-huge-voxels", cfg("pretrain volume", manifest="hospital/huge_voxels.json"), "huge_voxels.nii.gz"),
    ("volume-zero-voxel-size", cfg("pretrain volume", manifest="hospital/zero_voxels.json"), "zero_voxels.nii.gz"),
    ("volume-absurd-mha-spacing", cfg("pretrain volume", manifest="hospital/absurd_mha.json"),
     "absurd_spacing.mha: voxel size (2000.0, 1.0, 1.0) mm is outside 0.01-50 mm"),
    # pretrain timeseries
    ("ts-unknown-channel", cfg("pretrain timeseries", "data.channels=[FOO]"), "FOO"),
    ("ts-zero-fs", cfg("pretrain timeseries", "data.fs=0"), "data.fs"),
    ("ts-zero-batch", cfg("pretrain timeseries", "train.batch_size=0"), "train.batch_size"),
    ("ts-short-signal", cfg("pretrain timeseries", "data.window_seconds=30"),
     "shorter than one window of 1500 samples; set data.short=skip to leave it out, or a shorter data.window_seconds"),
    ("ts-every-signal-skipped", cfg("pretrain timeseries", "data.window_seconds=30", "data.short=skip"),
     "no window of 1500 samples left in any recording"),
    ("ts-missing-manifest", cfg("pretrain timeseries", manifest="hospital/none.json"), "none.json"),
    # finetune seg
    ("seg-missing-pretrained", [*cfg("finetune seg"), "--pretrained", "gone.pt"], "gone.pt"),
    ("seg-empty-pretrained", [*cfg("finetune seg"), "--pretrained", "empty.pt"], "empty.pt"),
    ("seg-corrupt-pretrained", [*cfg("finetune seg"), "--pretrained", "corrupt.pt"], "corrupt.pt"),
    ("seg-wrong-kind", [*cfg("finetune seg"), "--pretrained", "ts_kind.pt"], "ts_kind.pt"),
    ("seg-zero-labelled", cfg("finetune seg", "seg.labelled_volumes=0"), "seg.labelled_volumes"),
    ("seg-two-splits", cfg("finetune seg", manifest="hospital/two_splits.json"), "P00"),
    ("seg-label-shape", cfg("finetune seg", manifest="hospital/label_shape.json"), "small_label.nii.gz"),
    ("seg-pretrained-other-arch", [*cfg("finetune seg", "model.width=16"), "--pretrained", "run_tiny/encoder.pt"],
     "run_tiny/encoder.pt: the checkpoint's encoder differs from the config's: model.width: 8 in the checkpoint, 16 "
     "in the config"),
    ("seg-huge-voxels", cfg("finetune seg", manifest="hospital/huge_voxels.json"), "huge_voxels.nii.gz"),
    # eval timeseries
    ("eval-wrong-kind", [*cfg("eval timeseries"), "--pretrained", "corrupt.pt"], "corrupt.pt"),
    ("eval-one-condition", cfg("eval timeseries", manifest="hospital/one_condition.json"), "at least two conditions"),
    ("eval-resume", [*cfg("eval timeseries"), "--resume"], "eval timeseries has no --resume: an evaluation is short"),
    ("eval-bad-fraction", cfg("eval timeseries", "eval.fractions=[0]"), "eval.fractions"),
    ("eval-unknown-mode", cfg("eval timeseries", "eval.modes=[magic]"), "eval.modes"),
    # ground train / infer
    ("ground-no-reports", cfg("ground train", manifest="hospital/no_reports.json"), "report"),
    ("ground-bad-window", cfg("ground train", "scorer.windows=[[40, 0]]"), "scorer.windows"),
    ("ground-unknown-text", cfg("ground train", "text.name=bert"), "unknown key 'text'"),
    ("ground-wrong-kind", [*cfg("ground train"), "--pretrained", "ts_kind.pt"], "ts_kind.pt"),
    ("ground-zero-voxel-size", cfg("ground train", manifest="hospital/zero_voxels.json"), "zero_voxels.nii.gz"),
    ("infer-missing-checkpoint", ["ground", "infer", "--checkpoint", "gone.pt", "--image", "fake.nii.gz",
                                  "--text", "cyst", "-o", "maps"], "gone.pt"),
    ("infer-wrong-kind", ["ground", "infer", "--checkpoint", "ts_kind.pt", "--image", "fake.nii.gz", "--text",
                          "cyst", "-o", "maps"], "ts_kind.pt"),
    ("infer-text-and-report", ["ground", "infer", "--checkpoint", "ts_kind.pt", "--image", "fake.nii.gz",
                               "--text", "cyst", "--report", "report.txt", "-o", "maps"], "--text"),
    ("infer-neither", ["ground", "infer", "--checkpoint", "ts_kind.pt", "--image", "fake.nii.gz", "-o", "maps"],
     "--report"),
    ("infer-empty-text", ["ground", "infer", "--checkpoint", "ts_kind.pt", "--image", "fake.nii.gz", "--text", " ",
                          "-o", "maps"], "--text"),
    ("infer-bad-modality", ["ground", "infer", "--checkpoint", "ts_kind.pt", "--image", "fake.nii.gz", "--text",
                            "cyst", "--modality", "PET", "-o", "maps"], "--modality"),
    # app and benchmarks
    ("app-missing-run", ["app", "no_run"], "no_run"),
    ("app-missing-data-root", ["app", "--data-root", "nowhere"], "nowhere"),
    ("bench-ts-device", ["bench", "ts-throughput", "--device", "tpu"], "--device"),
    ("bench-ts-threads", ["bench", "ts-throughput", "--threads", "0"], "--threads"),
    ("bench-le-cohort", ["bench", "label-efficiency", "-o", "le", "--cohort", "foo"], "--cohort"),
    ("bench-le-init", ["bench", "label-efficiency", "-o", "le", "--init", "magic"], "--init"),
    ("bench-probe-manifest", ["bench", "volume-probe", "--manifest", "hospital/none.json", "--output", "probe"],
     "none.json"),
    ("bench-speed-checkpoint", ["bench", "grounding-speed", "--checkpoint", "gone.pt", "--image", "fake.nii.gz",
                                "--report", "report.txt"], "gone.pt"),
    ("bench-grounding-manifest", ["bench", "grounding", "-o", "bg", "--manifest", "hospital/none.json"], "none.json"),
    ("bench-grounding-run-missing", ["bench", "grounding", "-o", "bg", "--run", "no_run"], "no_run"),
    ("bench-threads-manifest", ["bench", "threads", "--manifest", "hospital/none.json"], "none.json"),
    ("bench-threads-steps", ["bench", "threads", "--steps", "1"], "'--steps'"),
    ("bench-inference-size-0", ["bench", "seg-inference", "--size", "0"], "'--size'"),
    ("bench-inference-volumes-0", ["bench", "seg-inference", "--volumes", "0"], "'--volumes'"),
    ("bench-data-steps-0", ["bench", "data", "--steps", "0"], "'--steps'"),
    ("bench-data-workers-negative", ["bench", "data", "--workers", "-1"], "'--workers'"),
    ("bench-pretrain-steps-0", ["bench", "pretrain-volume", "--steps", "0"], "'--steps'"),
    ("bench-pretrain-batch-negative", ["bench", "pretrain-volume", "--batch-size", "-2"], "'--batch-size'"),
    ("bench-pretrain-against", ["bench", "pretrain-volume", "--against", "fast"], "--against: fast"),
    ("bench-probe-bad-set", ["bench", "volume-probe", "--set", "objectives", "--output", "probe"], "objectives"),
    ("bench-ts-against", ["bench", "ts-throughput", "--against", "magic"], "--against: magic"),
    ("bench-ts-comet-missing", ["bench", "ts-throughput", "--against", "comet"], "--comet"),
    ("bench-pretrain-crop-0", ["bench", "pretrain-volume", "--crop", "0"], "'--crop'"),
    ("bench-probe-one-anchor", ["bench", "volume-probe", "--batch-size", "1", "--output", "probe"], "'--batch-size'"),
    ("bench-probe-steps-0", ["bench", "volume-probe", "--steps", "0", "--output", "probe"], "'--steps'"),
    ("bench-ts-steps-0", ["bench", "ts-throughput", "--steps", "0"], "'--steps'"),
    ("bench-ts-warmup-negative", ["bench", "ts-throughput", "--warmup", "-1"], "'--warmup'"),
    ("bench-ts-le-seed-negative", ["bench", "ts-label-efficiency", "-o", "tle", "--seed", "-1"], "'--seed'"),
    ("bench-le-count-0", ["bench", "label-efficiency", "-o", "le", "--count", "0"], "'--count'"),
    ("bench-le-steps-0", ["bench", "label-efficiency", "-o", "le", "--steps", "0"], "'--steps'"),
    ("bench-grounding-pretrain-steps-0", ["bench", "grounding", "-o", "bg", "--pretrain-steps", "0"],
     "'--pretrain-steps'"),
    ("bench-speed-repeats-0", ["bench", "grounding-speed", "--checkpoint", "gone.pt", "--image", "fake.nii.gz",
                               "--report", "report.txt", "--repeats", "0"], "'--repeats'"),
    ("bench-app-size-8", ["bench", "app", "--size", "8", "8", "8", "--work", "app"], "--size"),
    ("config-show-unknown", ["config", "show", "nope"], "nope"),
    # match and correspondence
    ("match-point-outside", ["match", "--encoder", "none", "--from", "hospital/vol/P001_S1.nii.gz", "--to",
                             "hospital/vol/P002_S1.nii.gz", "--point", "0", "0", "900"], "--point 0 0 900: outside"),
    ("match-other-modality", ["match", "--encoder", "none", "--from", "hospital/vol/P001_S1.nii.gz", "--to",
                              "hospital/vol/mr_like.nii.gz", "--point", "0", "0", "0"],
     "mr_like.nii.gz: looks like MR"),
    ("match-wrong-kind", ["match", "--encoder", "ts_kind.pt", "--from", "hospital/vol/P001_S1.nii.gz", "--to",
                          "hospital/vol/P002_S1.nii.gz", "--point", "0", "0", "0"], "ts_kind.pt"),
    ("match-missing-encoder", ["match", "--encoder", "gone.pt", "--from", "hospital/vol/P001_S1.nii.gz", "--to",
                               "hospital/vol/P002_S1.nii.gz", "--point", "0", "0", "0"], "gone.pt"),
    ("match-missing-scan", ["match", "--encoder", "none", "--from", "hospital/vol/gone.nii.gz", "--to",
                            "hospital/vol/P002_S1.nii.gz", "--point", "0", "0", "0"], "gone.nii.gz"),
    ("match-bad-baseline", ["match", "--encoder", "none", "--from", "hospital/vol/P001_S1.nii.gz", "--to",
                            "hospital/vol/P002_S1.nii.gz", "--point", "0", "0", "0", "--baseline", "magic"],
     "--baseline"),
    ("bench-correspondence-no-landmarks", ["bench", "correspondence", "--manifest", "hospital/no_landmarks.json",
                                           "--encoder", "gone.pt", "-o", "corr"], "landmarks"),
    ("bench-correspondence-manifest", ["bench", "correspondence", "--manifest", "hospital/none.json", "--encoder",
                                       "gone.pt", "-o", "corr"], "none.json"),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` -> its content hash (folders: "dir")."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def test_the_table_covers_every_command() -> None:
    from test_cli import COMMANDS

    covered = {" ".join(argv[:2]) if argv[0] in ("manifest", "pretrain", "finetune", "eval", "ground", "bench",
                                                 "config") else argv[0] for _, argv, _ in CASES}
    runnable = {" ".join(c) for c in COMMANDS if c not in (["bench"], ["demo"])}
    missing = runnable - covered - {"config list"}
    assert not missing and len(CASES) >= 60


@pytest.mark.parametrize(("argv", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(argv: list[str], needle: str, workspace_template: Path,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(workspace_template, ws, symlinks=True)
    monkeypatch.chdir(ws)
    before = _snapshot(ws)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    _, err = capsys.readouterr()
    assert exit_info.value.code == 2, err
    lines = err.splitlines()
    if argv[:2] == ["manifest", "check"]:  # one line per problem, then the count
        assert lines[-1].endswith("problem(s) found"), err
    else:
        assert len(lines) == 1, err
    assert all(line.startswith("error: ") for line in lines), err
    assert "Traceback" not in err and needle in err, err
    assert _snapshot(ws) == before, "the workspace changed"


def _can_mount_in_a_user_namespace() -> bool:
    import subprocess

    try:
        return subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "none", "/mnt"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _can_mount_in_a_user_namespace(), reason="needs `unshare -rm` (user namespaces) to mount "
                    "a read-only and a full file system without root")
@pytest.mark.parametrize("filesystem", ["ro", "size=40k"], ids=["read-only", "full"])
@pytest.mark.parametrize("command", [["synth", "{mnt}/hospital", "--patients", "2", "--size", "32"],
                                     ["manifest", "build", "{hospital}", "-o", "{mnt}/manifest.json"]],
                         ids=["synth", "manifest-build"])
def test_a_read_only_or_full_file_system_is_one_line_and_leaves_nothing(
        filesystem: str, command: list[str], tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """A real read-only / full tmpfs, mounted in a user namespace (no root needed): exit 2, one line naming the
    output, nothing left on the file system."""
    import subprocess
    import sys

    hospital = tmp_path_factory.getbasetemp() / "fs_hospital"
    if not hospital.exists():
        make_hospital(hospital, patients=2, studies=1, size=16, seed=0, trials=1, signal_seconds=4.0)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    argv = [a.format(mnt=mnt, hospital=hospital) for a in command]
    script = (f"mount -t tmpfs -o {filesystem} none {mnt} && dd if=/dev/zero of={mnt}/filler bs=1k count=40 "
              f"2>/dev/null; {sys.executable} -m medssl {' '.join(argv)}; code=$?; echo listing: $(ls -A {mnt}); "
              "exit $code")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, encoding="utf-8",
                          timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert done.returncode == 2, done.stderr
    reason = "read-only file system" if filesystem == "ro" else "no space left on device"
    assert len(errors) == 1 and argv[-1 if command[0] == "manifest" else 1] in errors[0], done.stderr
    assert reason in errors[0] or "requested and" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.split("listing:")[-1].split() in ([], ["filler"]), done.stdout  # no output left
