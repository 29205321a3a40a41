"""The clinician app driven by `streamlit.testing.v1.AppTest` on a tiny trained grounding run: load a case, move
the crosshair, change windows, ground findings, change opacity and threshold, compare, export, review,
signals, and bad input (paths escaping the data folders, corrupt or 2D/4D volumes, a volume without an affine,
a checkpoint of another kind, a run directory without maps). Assertions are on what is shown."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from medssl.config import load_config
from medssl.data import io
from medssl.data.synthetic.hospital import make_hospital
from medssl.downstream.grounding.config import GroundingConfig
from medssl.downstream.grounding.task import ground_train
from medssl.explain.maps import read_map
from medssl.pretrain.timeseries import PretrainTimeseriesConfig, pretrain_timeseries
from medssl.training.checkpoint import load_checkpoint
from medssl.display.overlay import png_provenance
from medssl.app.review import read_reviews

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "medssl" / "viewer" / "app.py"
LESION = "There is a 27 mm hypodense lesion in the lower posterior spleen."  # the default case's finding (seed 3)

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class AppData:
    root: Path
    manifest: Path
    run: Path  # grounding run directory
    signals: Path  # a data root holding a pretrain-timeseries run


def make_app_data(root: Path) -> AppData:
    """A 32^3 hospital, a 4-step grounding run whose threshold lets every finding ground (the tests must not
    depend on what 4 steps learn), and a 2-step time-series pretraining run."""
    manifest = make_hospital(root / "hospital", patients=8, studies=2, size=32, seed=3, trials=1, signal_seconds=4.0)
    config = load_config(REPO / "configs" / "grounding_tiny.yaml", GroundingConfig,
                         [f"data.manifest={manifest}", "train.steps=4", "train.log_every=2"])
    ground_train(config, root / "grounding", quiet=True)
    payload = load_checkpoint(root / "grounding" / "grounding.pt")
    payload["state"]["calibration"]["threshold"] = -1.0
    torch.save(payload, root / "grounding" / "grounding.pt")
    ts = load_config(REPO / "configs" / "pretrain_timeseries_tiny.yaml", PretrainTimeseriesConfig,
                     [f"data.manifest={manifest}", "train.steps=2"])
    pretrain_timeseries(ts, root / "signals" / "pretrain_timeseries", resume=False)
    return AppData(root, manifest, root / "grounding", root / "signals")


@pytest.fixture(scope="session")
def app_data(tmp_path_factory: pytest.TempPathFactory) -> AppData:
    return make_app_data(tmp_path_factory.mktemp("app"))


def start(monkeypatch: pytest.MonkeyPatch, *args: str | os.PathLike) -> AppTest:
    """The app with `args` as its script arguments (as `medssl app` passes them), after its first run."""
    monkeypatch.setattr(sys, "argv", ["app.py", *(str(a) for a in args)])
    return AppTest.from_file(str(APP), default_timeout=180).run()


def clean(at: AppTest) -> None:
    """No exception element and no error shown."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def planes(at: AppTest) -> list[str]:
    """The PNG data URLs of the clickable planes, then the comparison row's images, in page order."""
    clickable = [json.loads(e.proto.json_args)["src"] for e in at.get("component_instance")
                 if "image_coordinates" in e.proto.component_name]
    return clickable + [url for image in at.image if not any(image.captions) for url in image.value]


def colour_bars(at: AppTest) -> list[str]:
    return [caption for image in at.image for caption in image.captions if caption.endswith("colour scale")]


def signal_figures(at: AppTest) -> list[str]:
    return [caption for image in at.image for caption in image.captions if caption.startswith("patient ")]


def captions(at: AppTest) -> str:
    return "\n".join(c.value for c in at.caption)


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


# ----------------------------------------------------------------------------------------------- the run's case


def test_a_run_opens_on_a_case_with_its_report_views_and_data_folders(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run, "--data-root", app_data.signals)
    clean(at)
    assert at.markdown[1].value == "### P007 / S2 (test)"
    labels = [b.label for b in at.button if b.key and b.key.startswith("ground_") and b.key != "ground_free"]
    assert LESION in labels and "The lungs are clear." in labels
    assert len(at.get("component_instance")) == 3  # three planes
    assert len(signal_figures(at)) == 1 and not colour_bars(at)  # no map yet, so no colour bar
    assert {s.key for s in at.slider} >= {"slice_axial", "slice_coronal", "slice_sagittal"}
    assert [at.slider(key=f"slice_{p}").value for p in ("axial", "coronal", "sagittal")] == [16, 16, 16]
    text = captions(at)
    assert f"{app_data.manifest.parent.resolve()} — manifest named by" in text  # the roots are shown with why
    assert "crosshair voxel (16, 16, 16)" in text and "window 400/40 (width/level): -160 to 240" in text
    assert at.selectbox(key="checkpoint").value == (app_data.run / "grounding.pt").resolve()


def test_crosshair_follows_sliders_clicks_and_the_peak(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    before = planes(at)
    at.slider(key="slice_axial").set_value(5).run()
    clean(at)
    assert "crosshair voxel (16, 16, 5)" in captions(at)  # RAS-stored: the axial slice is the k index
    after = planes(at)
    assert after[0] != before[0] and after[1] != before[1]  # axial image and the crosshair on the coronal
    # a click on the coronal plane (320 px shown for 32 voxels): column 10 px per voxel, row from the top (S)
    at.session_state["click_coronal"] = {"x": 45, "y": 305, "width": 320, "height": 320, "unix_time": 1}
    at.run()
    clean(at)
    assert "crosshair voxel (27, 16, 1)" in captions(at)  # radiological: the screen's left is the patient's right
    assert at.slider(key="slice_axial").value == 1 and at.slider(key="slice_sagittal").value == 27
    key = next(s.key for s in at.selectbox if s.key.startswith("case::"))
    default = at.selectbox(key=key).index
    at.selectbox(key=key).select_index(0 if default else 1).run()  # another case: its centre, the old click gone
    at.run()
    assert "crosshair voxel (16, 16, 16)" in captions(at)
    at.selectbox(key=key).select_index(default).run()
    at.button(key="centre_lesion_0").click().run()  # the crosshair on the case's lesion mask
    clean(at)
    lesion = io.read_volume(app_data.manifest.parent / "lesion" / "P007_S2.nii.gz", label=True).array
    assert lesion[tuple(at.session_state["crosshair"])] == 1
    button(at, LESION).click().run()
    peak = next(m.value for m in at.markdown if m.value.startswith("Peak of the map:"))
    voxel = peak.split("voxel (")[1].split(")")[0]
    at.button(key="jump").click().run()
    clean(at)
    assert f"crosshair voxel ({voxel})" in captions(at)


def test_window_presets_and_free_window(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    soft = planes(at)[0]
    at.selectbox(key="window_preset").set_value("CT lung 1500/-600").run()
    clean(at)
    assert "window 1500/-600 (width/level): -1350 to 150" in captions(at) and planes(at)[0] != soft
    options = at.selectbox(key="window_preset").options
    assert {"CT soft tissue 400/40", "CT bone 1500/300", "CT brain 80/40", "MR 1-99 %"} <= set(options)
    at.selectbox(key="window_preset").set_value("free width / level").run()
    at.number_input(key="free_width").set_value(400.0).run()
    at.number_input(key="free_level").set_value(40.0).run()
    clean(at)
    assert planes(at)[0] == soft  # free 400/40 is the soft-tissue picture


def test_grounding_a_finding_overlays_its_map_and_another_phrase_changes_it(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    bare = planes(at)
    button(at, LESION).click().run()
    clean(at)
    assert any("groundable, score" in s.value and "peak at" in s.value for s in at.success)
    lesion = planes(at)
    assert colour_bars(at) == ["colour scale"]
    assert lesion[:3] != bare[:3]
    threshold = at.slider(key="threshold").value
    assert 0.0 < threshold < 1.0 and at.slider(key="colour_range").value[0] == pytest.approx(threshold)
    at.text_input(key="free_phrase").input("a cyst in the upper right lung")
    at.button(key="ground_free").click().run()
    clean(at)
    assert any("a cyst in the upper right lung" in s.value for s in at.success)
    assert planes(at)[:3] != lesion[:3]
    # a negated statement is not groundable: said with its score, and no map is drawn
    button(at, "Heart: no focal lesion.").click().run()
    clean(at)
    assert any("not groundable" in w.value and "negated statement" in w.value and "score" in w.value
               for w in at.warning)
    assert planes(at)[:3] == bare and not colour_bars(at)


def test_opacity_threshold_colour_map_and_outline(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    bare = planes(at)[:3]
    button(at, LESION).click().run()
    shown = planes(at)[:3]
    at.slider(key="opacity").set_value(0.2).run()
    clean(at)
    faint = planes(at)[:3]
    assert faint != shown
    at.radio(key="mode").set_value("outline").run()
    assert planes(at)[:3] != faint
    at.selectbox(key="cmap").set_value("hot").run()
    clean(at)
    at.slider(key="threshold").set_value(1.0).run()  # nothing is above 1: the bare image, with the colour bar
    clean(at)
    assert planes(at)[:3] == bare and len(colour_bars(at)) == 1
    at.slider(key="opacity").set_value(0.0).run()
    at.slider(key="threshold").set_value(0.0).run()
    assert planes(at)[:3] == bare  # opacity 0 draws nothing either


def test_region_statistics_of_the_map(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    button(at, LESION).click().run()
    clean(at)
    assert any(m.value.startswith("Peak of the map:") for m in at.markdown)
    families = {row["family"] for row in at.table[0].value.to_dict("records")}
    assert families == {"anatomy graph", "organs", "lesions"}
    rows = at.dataframe[0].value
    assert set(rows["family"]) == families and rows["share of map mass"].between(0, 1).all()
    organs = rows[rows["family"] == "organs"]
    assert "body" not in set(organs["region"]) and "spleen" in set(organs["region"])
    assert any(region.startswith("lesion 1: 27 mm hypodense lesion") for region in rows["region"])


def test_compare_two_phrases_and_two_checkpoints(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    button(at, LESION).click().run()
    one = planes(at)
    at.radio(key="compare").set_value("another phrase").run()
    at.text_input(key="phrase_b_box").input("a nodule in the lower left lung").run()
    clean(at)
    rows = planes(at)
    assert len(rows) == 3 + 3  # clickable row A, row B
    assert colour_bars(at) == ["A: colour scale", "B: colour scale"]
    assert rows[:3] == one[:3] and rows[3:6] != rows[:3]
    assert any(s.value.startswith("**B:**") for s in at.success)
    at.slider(key="slice_coronal").set_value(3).run()  # one crosshair for both rows
    assert all("slice 3 (0-31)" in c.value for c in at.caption if "coronal (" in c.value)
    at.radio(key="compare").set_value("another checkpoint").run()
    assert at.selectbox(key="checkpoint_b").value == "randomised control"
    clean(at)
    control = planes(at)
    assert len(control) == 6 and control[3:6] != control[:3]
    assert any(s.value.startswith("**B (randomised control):**") for s in [*at.success, *at.warning])


def test_export_writes_png_and_nifti_with_provenance(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    button(at, LESION).click().run()
    at.slider(key="threshold").set_value(0.55).run()
    at.button(key="export").click().run()
    clean(at)
    written = sorted((app_data.run / "exports").iterdir())
    pngs = [p for p in written if p.suffix == ".png"]
    niftis = [p for p in written if p.name.endswith(".nii.gz")]
    assert pngs and niftis and any("wrote" in s.value for s in at.success)
    provenance = png_provenance(pngs[-1])
    assert provenance["phrase"] == LESION and provenance["threshold"] == 0.55
    assert provenance["checkpoint"] == str((app_data.run / "grounding.pt").resolve())
    assert provenance["rescaling"]["name"] == "linear" and provenance["preprocessing"]["spacing"] == [12.5] * 3
    image = app_data.manifest.parent / "vol" / "P007_S2.nii.gz"
    loaded = read_map(niftis[-1], like=io.read_volume(image))
    assert loaded.sidecar.extra["display"]["threshold"] == 0.55 and loaded.sidecar.phrase == LESION
    assert loaded.array.shape == (32, 32, 32)


def test_a_review_row_is_written_and_summarised(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    button(at, LESION).click().run()
    at.radio(key="review_verdict").set_value("wrong_region")
    at.text_input(key="review_comment").input("peak in the lung")
    next(b for b in at.get("form_submit_button") if b.label == "Save review").click().run()
    clean(at)
    rows = read_reviews(app_data.run / "review.csv")
    mine = [r for r in rows if r.comment == "peak in the lung"]
    assert len(mine) == 1 and mine[0].verdict == "wrong_region" and mine[0].phrase == LESION
    assert mine[0].run == str(app_data.run.resolve()) and mine[0].image.endswith("P007_S2.nii.gz")
    summary = at.dataframe[-1].value
    assert summary["wrong_region"].sum() >= 1 and "share_right" in summary.columns


def test_signals_show_the_patients_waveform_with_a_named_attribution(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run, "--data-root", app_data.signals)
    clean(at)
    assert "Attribution: **gradient** of the **L2 norm of the pooled embedding" in "\n".join(
        c.value for c in at.caption)
    assert len(signal_figures(at)) == 1
    at.radio(key="ts_method").set_value("occlusion").run()
    clean(at)
    assert "Attribution: **occlusion**" in captions(at) and "patient P007" in captions(at)
    at = start(monkeypatch, "--run", app_data.run)  # without a time-series model: said so, the waveform alone
    assert any("No time-series checkpoint" in i.value for i in at.info) and len(signal_figures(at)) == 1


# ----------------------------------------------------------------------------------------------- bad input


def test_typed_paths_cannot_leave_the_data_folders(app_data: AppData, tmp_path: Path, monkeypatch) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "scan.nii.gz").write_bytes((app_data.manifest.parent / "vol" / "P007_S2.nii.gz").read_bytes())
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(secret / "scan.nii.gz", data / "link.nii.gz")
    (data / "ok.nii.gz").write_bytes((secret / "scan.nii.gz").read_bytes())
    at = start(monkeypatch, "--data-root", data)
    at.radio(key="source").set_value("file under the data folders").run()
    for typed, message in (("../secret/scan.nii.gz", "'..' leads outside"), (str(secret / "scan.nii.gz"),
                                                                              "outside the allowed data folders"),
                           ("link.nii.gz", "symbolic link leads outside"), (f"{data}/../secret/scan.nii.gz",
                                                                            "outside the allowed")):
        at.text_input(key="typed_path").input(typed).run()
        assert not at.exception
        assert len(at.error) == 1 and message in at.error[0].value and "\n" not in at.error[0].value, typed
        assert not at.get("component_instance")
    at.text_input(key="typed_path").input("ok.nii.gz").run()
    clean(at)
    assert len(at.get("component_instance")) == 3  # the app kept working


def _nifti(path: Path, array: np.ndarray, *, affine: bool = True) -> str:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine else None), path)  # None: qform and sform codes 0
    return path.name


def test_bad_volumes_give_one_line_and_the_app_goes_on(tmp_path: Path, monkeypatch) -> None:
    cube = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    names = {
        _nifti(tmp_path / "flat.nii.gz", cube[:, :, 0]): "expected a 3D volume",
        _nifti(tmp_path / "one_slice.nii.gz", cube[:, :, :1]): "a 2D image",
        _nifti(tmp_path / "four_d.nii.gz", np.stack([cube, cube], axis=-1)): "expected a 3D volume",
        _nifti(tmp_path / "no_affine.nii.gz", cube, affine=False): "has no affine",
    }
    (tmp_path / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08garbage")
    names["corrupt.nii.gz"] = "cannot read"
    at = start(monkeypatch, "--data-root", tmp_path)
    at.radio(key="source").set_value("file under the data folders").run()
    for name, message in names.items():
        at.text_input(key="typed_path").input(name).run()
        assert not at.exception, name
        assert len(at.error) == 1 and message in at.error[0].value and "Traceback" not in at.error[0].value, name
    _nifti(tmp_path / "good.nii.gz", cube)
    at.text_input(key="typed_path").input("good.nii.gz").run()
    clean(at)
    assert len(at.get("component_instance")) == 3


def test_a_checkpoint_of_another_kind_and_a_run_without_maps(app_data: AppData, tmp_path: Path, monkeypatch) -> None:
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    payload = load_checkpoint(app_data.run / "grounding.pt")
    torch.save({**payload, "kind": "finetune-seg"}, wrong / "grounding.pt")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    at = start(monkeypatch, "--run", app_data.run, "--run", empty, "--data-root", wrong)
    assert not at.exception
    assert any("no grounding model (grounding.pt) and no maps (results.json)" in e.value for e in at.error)
    at.selectbox(key="checkpoint").set_value((wrong / "grounding.pt").resolve()).run()
    button(at, LESION).click().run()
    assert not at.exception
    assert any("is not a grounding model" in e.value for e in at.error)
    at.selectbox(key="checkpoint").set_value((app_data.run / "grounding.pt").resolve()).run()
    button(at, LESION).click().run()
    assert not at.exception and any("groundable, score" in s.value for s in at.success)


def test_bad_app_arguments_are_a_message(monkeypatch) -> None:
    at = start(monkeypatch, "--port", "1")
    assert not at.exception and "expected --run DIR or --data-root DIR" in at.error[0].value


def test_a_ground_infer_output_opens_with_its_stored_maps(app_data: AppData, tmp_path: Path, monkeypatch) -> None:
    from medssl.cli import main

    out = tmp_path / "infer"
    report = tmp_path / "report.txt"
    report.write_text(f"Findings: {LESION} The lungs are clear.\n", encoding="utf-8")
    image = app_data.manifest.parent / "vol" / "P007_S2.nii.gz"
    try:
        main(["ground", "infer", "--checkpoint", str(app_data.run / "grounding.pt"), "--image", str(image),
              "--report", str(report), "-o", str(out)])
    except SystemExit as exit_:
        assert not exit_.code
    at = start(monkeypatch, "--run", out)
    clean(at)
    assert at.radio(key="source").value == "maps of a ground infer output"
    button(at, LESION).click().run()
    clean(at)
    assert any("groundable, score" in s.value for s in at.success) and len(colour_bars(at)) == 1
    button(at, "The lungs are clear.").click().run()
    clean(at)
    assert any("not groundable" in w.value and "normal statement" in w.value for w in at.warning)



def test_the_apps_entry_runs_the_packaged_app(app_data: AppData, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["attention_viewer.py", "--run", str(app_data.run)])
    at = AppTest.from_file(str(REPO / "apps" / "attention_viewer.py"), default_timeout=180).run()
    clean(at)
    assert at.markdown[1].value == "### P007 / S2 (test)" and len(at.get("component_instance")) == 3


def test_uploads_corrupt_nifti_and_zipped_dicom(tmp_path: Path, monkeypatch) -> None:
    import gzip
    import io as bytesio
    import zipfile

    from test_io import write_dicom_series

    at = start(monkeypatch, "--data-root", tmp_path)
    at.radio(key="source").set_value("upload a volume").run()
    at.file_uploader(key="upload").upload("scan.nii.gz", b"\x1f\x8b\x08 corrupt").run()
    assert not at.exception and len(at.error) == 1 and "cannot read" in at.error[0].value
    cube = (np.random.default_rng(0).normal(size=(8, 9, 10)) * 50 - 900).astype(np.float32)
    at.file_uploader(key="upload").set_value(
        ("good.nii.gz", gzip.compress(nib.Nifti1Image(cube, np.diag([1.0, 1.0, 2.0, 1.0])).to_bytes()),
         "application/gzip")).run()
    clean(at)
    assert len(at.get("component_instance")) == 3 and "8 x 9 x 10 voxels" in captions(at)
    series = tmp_path / "dicom"
    write_dicom_series(series, np.zeros((4, 5, 6), np.int16) - 1000, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0),
                       "1.2.826.0.1.3680043.2.1125.7")
    buffer = bytesio.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(series.iterdir()):
            archive.write(path, f"series/{path.name}")
    at.file_uploader(key="upload").set_value(("ct.zip", buffer.getvalue(), "application/zip")).run()
    clean(at)
    assert "6 x 5 x 4 voxels" in captions(at) and "stored LPS" in captions(at)
