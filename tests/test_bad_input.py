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
    ("volume-cache-dir-is-file", cfg("pretrain volume", "data.cache_dir=a_file"), "a_file"),
    # pretrain timeseries
    ("ts-unknown-channel", cfg("pretrain timeseries", "data.channels=[FOO]"), "FOO"),
    ("ts-zero-fs", cfg("pretrain timeseries", "data.fs=0"), "data.fs"),
    ("ts-zero-batch", cfg("pretrain timeseries", "train.batch_size=0"), "train.batch_size"),
    ("ts-missing-manifest", cfg("pretrain timeseries", manifest="hospital/none.json"), "none.json"),
    # finetune seg
    ("seg-missing-pretrained", [*cfg("finetune seg"), "--pretrained", "gone.pt"], "gone.pt"),
    ("seg-empty-pretrained", [*cfg("finetune seg"), "--pretrained", "empty.pt"], "empty.pt"),
    ("seg-corrupt-pretrained", [*cfg("finetune seg"), "--pretrained", "corrupt.pt"], "corrupt.pt"),
    ("seg-wrong-kind", [*cfg("finetune seg"), "--pretrained", "ts_kind.pt"], "ts_kind.pt"),
    ("seg-zero-labelled", cfg("finetune seg", "seg.labelled_volumes=0"), "seg.labelled_volumes"),
    ("seg-two-splits", cfg("finetune seg", manifest="hospital/two_splits.json"), "P00"),
    ("seg-label-shape", cfg("finetune seg", manifest="hospital/label_shape.json"), "small_label.nii.gz"),
    # eval timeseries
    ("eval-wrong-kind", [*cfg("eval timeseries"), "--pretrained", "corrupt.pt"], "corrupt.pt"),
    ("eval-one-condition", cfg("eval timeseries", manifest="hospital/one_condition.json"), "at least two conditions"),
    ("eval-bad-fraction", cfg("eval timeseries", "eval.fractions=[0]"), "eval.fractions"),
    ("eval-unknown-mode", cfg("eval timeseries", "eval.modes=[magic]"), "eval.modes"),
    # ground train / infer
    ("ground-no-reports", cfg("ground train", manifest="hospital/no_reports.json"), "report"),
    ("ground-zero-embed", cfg("ground train", "grounding.embed_dim=0"), "grounding.embed_dim"),
    ("ground-unknown-text", cfg("ground train", "text.name=bert"), "text.name"),
    ("ground-wrong-kind", [*cfg("ground train"), "--pretrained", "ts_kind.pt"], "ts_kind.pt"),
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
    ("bench-ceiling-manifest", ["bench", "grounding-ceiling", "--manifest", "hospital/none.json", "--pretrained",
                                "gone.pt"], "none.json"),
    ("bench-grounding-manifest", ["bench", "grounding", "-o", "bg", "--manifest", "hospital/none.json"], "none.json"),
    ("bench-threads-manifest", ["bench", "threads", "--manifest", "hospital/none.json"], "none.json"),
    ("bench-threads-steps", ["bench", "threads", "--steps", "1"], "'--steps'"),
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
    missing = runnable - covered - {"bench data", "bench pretrain-volume", "bench ts-label-efficiency",
                                    "bench seg-inference", "config list"}
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
