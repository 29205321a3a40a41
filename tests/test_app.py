"""The clinician app driven by `streamlit.testing.v1.AppTest` on a tiny trained grounding run: the case opens in
the reading viewport (what the viewport is given: layers, presets, view), a click reported by the viewport
moves the crosshair the statistics follow, the window a phrase opens in, trust cues, display settings kept per
(case, model, phrase), compare and follow-up panes, export, review, signals, and bad input (paths escaping the
data folders, corrupt or 2D/4D volumes, a volume without an affine, a checkpoint of another kind, a run
directory without maps, refused uploads, empty and over-long phrases). Assertions are on what is shown."""

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
from medssl.data.synthetic.hospital import make_hospital
from medssl.downstream.grounding.config import GroundingConfig
from medssl.downstream.grounding.task import ground_train
from medssl.explain.maps import read_map
from medssl.pretrain.timeseries import PretrainTimeseriesConfig, pretrain_timeseries
from medssl.training.checkpoint import load_checkpoint
from medssl.app.review import read_reviews
from medssl.display.overlay import png_provenance

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "medssl" / "app" / "app.py"
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
    payload["arch"]["settings"]["threshold"] = -1.0
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


def viewer_data(at: AppTest) -> dict:
    """What the reading viewport was given in the last run (the components-v2 element's JSON data)."""
    found = [e for e in at.get("bidi_component") if e.proto.component_name == "medssl.viewport"]
    assert len(found) == 1, "one reading viewport"
    return json.loads(found[0].proto.json)


def kinds(at: AppTest, pane: int = 0) -> list[str]:
    return [layer["kind"] for layer in viewer_data(at)["panes"][pane]["layers"]]


def case_mm(app_data: AppData, voxel: tuple[int, int, int]) -> list[float]:
    """RAS mm of a voxel of the default case (P007 / S2)."""
    from medssl.display.slicing import voxel_to_mm

    image = nib.load(app_data.manifest.parent / "vol" / "P007_S2.nii.gz")
    return list(voxel_to_mm(image.affine, voxel))


def click(at: AppTest, mm: list[float], seq: str = "1:1", pane: str = "A") -> None:
    """A click in the viewport as the browser reports it (component state)."""
    at.session_state["viewport"] = {"click": {"pane": pane, "mm": mm, "seq": seq}, "display": None,
                                    "measurement": None}
    at.run()


def captions(at: AppTest) -> str:
    return "\n".join(c.value for c in at.caption) + "\n" + "\n".join(m.value for m in at.markdown)


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label or b.label.startswith(label + "  ·"))


# ----------------------------------------------------------------------------------------------- the run's case


def test_a_run_opens_on_a_case_in_the_reading_viewport(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run, "--data-root", app_data.signals)
    clean(at)
    assert "**P007 / S2 (test)** · 32 x 32 x 32 voxels · CT" in captions(at)
    labels = [b.label for b in at.button if b.key and b.key.startswith("ground_") and b.key != "ground_free"]
    assert f"{LESION}  ·  _finding_" in labels and "The lungs are clear.  ·  _normal_" in labels
    data = viewer_data(at)
    assert kinds(at) == ["image", "labels"] and data["panes"][0]["legend"][0][1] == [255, 0, 255]  # lesion, magenta
    assert all(layer["url"].startswith("/mock/media/") for layer in data["panes"][0]["layers"])  # served, not paths
    assert [p["label"] for p in data["presets"]] == ["lung 1500/-600", "soft tissue 400/40", "bone 1500/300",
                                                     "brain 80/40"]
    assert data["view"]["window"] == {"width": 400.0, "level": 40.0} and data["view"]["hero"] == "axial"
    assert data["view"]["crosshair_mm"] == [6.25, 6.25, 6.25]
    assert "voxel (16, 16, 16)" in captions(at)
    assert f"{app_data.manifest.parent.resolve()} — manifest named by" in captions(at)
    assert at.selectbox(key="checkpoint").value == (app_data.run / "grounding.pt").resolve()


def test_a_click_in_the_viewport_moves_the_crosshair_and_the_read_out(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    seq = viewer_data(at)["view"]["seq"]
    click(at, case_mm(app_data, (26, 16, 6)))
    clean(at)
    text = captions(at)
    assert "voxel (26, 16, 6)" in text and "organs:" in text and "lesions:" in text
    assert viewer_data(at)["view"]["seq"] == seq  # a click does not make the viewer re-apply its view
    click(at, case_mm(app_data, (26, 16, 6)))  # the same click reported again changes nothing
    assert "voxel (26, 16, 6)" in captions(at)
    button(at, "Centre on lesion 1: 27 mm hypodense lesion (lower posterior spleen)").click().run()
    data = viewer_data(at)
    assert data["view"]["seq"] == seq + 1  # Python moved the crosshair: the viewer applies it
    assert "lesions: lesion 1" in captions(at)


def test_a_phrase_opens_in_its_window_with_its_score_query_and_organ(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    button(at, "The lungs are clear.").click().run()
    clean(at)
    assert viewer_data(at)["view"]["window"] == {"width": 1500.0, "level": -600.0}  # lung finding: lung window
    assert any("not groundable" in w.value and "normal statement" in w.value and "score" in w.value
               for w in at.warning)
    assert "read as: organ **lung_left, lung_right** · finding **the organ itself** · **normal** statement" in \
        captions(at)  # what the model read is shown for a not-groundable statement too
    assert kinds(at) == ["image", "labels"] and viewer_data(at)["map_scale"] is None  # no map, no colour bar
    button(at, LESION).click().run()
    clean(at)
    data = viewer_data(at)
    assert kinds(at) == ["image", "map", "labels"] and data["has_map"]
    assert data["map_scale"]["name"] == "probability" and "0 outside the organ searched" in data["map_scale"]["meaning"]
    assert data["view"]["window"] == {"width": 400.0, "level": 40.0}
    assert data["view"]["map"] == {"threshold": 0.5, "vmax": 1.0, "range": [0.0, 1.0], "opacity": 0.6, "cmap": "hot",
                                   "mode": "fill"}  # a probability: the same colours mean the same in every map
    assert any("groundable, score" in s.value and "threshold -1.000" in s.value for s in at.success)
    text = captions(at)
    assert ("read as: organ **spleen** · finding **hypodense lesion** · places **lower, posterior** · size "
            "**27 mm**") in text
    assert "organ searched: **spleen** (predicted " in text and " ml, " in text
    assert not [w for w in at.warning if "close call" in w.value]  # threshold -1: far from every score


def test_display_settings_are_kept_per_case_model_and_phrase(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    button(at, LESION).click().run()
    data = viewer_data(at)
    mine = {**data["view"]["map"], "threshold": data["view"]["map"]["threshold"] + 0.001, "opacity": 0.3}
    at.session_state["viewport"] = {"click": None, "measurement": None, "display": {
        "window": {"width": 1234.0, "level": 56.0}, "map": mine, "hero": "coronal", "view_seq": data["view"]["seq"]}}
    at.run()
    button(at, "The lungs are clear.").click().run()
    assert viewer_data(at)["view"]["window"] == {"width": 1500.0, "level": -600.0}
    key = next(s.key for s in at.selectbox if s.key.startswith("case::"))
    default = at.selectbox(key=key).index
    at.selectbox(key=key).select_index(0 if default else 1).run()  # another case and back
    at.selectbox(key=key).select_index(default).run()
    button(at, LESION).click().run()
    view = viewer_data(at)["view"]
    assert view["window"] == {"width": 1234.0, "level": 56.0} and view["hero"] == "coronal"
    assert view["map"]["opacity"] == 0.3 and view["map"]["threshold"] == mine["threshold"]


def test_jump_to_peak_moves_the_crosshair_to_the_maps_peak(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    button(at, LESION).click().run()
    button(at, "Jump to peak").click().run()
    clean(at)
    peak = next(s.value for s in at.success).split("peak at (")[1].split(")")[0]
    mm = [round(float(v), 1) for v in peak.split(",")]
    assert [round(v, 1) for v in viewer_data(at)["view"]["crosshair_mm"]] == mm


def test_compare_a_checkpoint_with_its_control_and_a_prior_study(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    button(at, LESION).click().run()
    at.radio(key="second").set_value("another checkpoint").run()
    clean(at)
    data = viewer_data(at)
    assert [p["key"] for p in data["panes"]] == ["A", "B"] and "untrained scorer" in data["panes"][1]["title"]
    assert kinds(at, 1)[:2] == ["image", "map"] and data["link"] == "mm"
    at.radio(key="second").set_value("prior study (follow-up)").run()
    clean(at)
    data = viewer_data(at)
    assert data["panes"][1]["title"] == "P007 / S1 (test)" and "cursors linked by mm (RAS coordinates)" in data["notes"]
    assert data["panes"][1]["layers"][0]["url"] != data["panes"][0]["layers"][0]["url"]  # the other study's image
    # the same phrase grounded there too
    assert any("P007 / S1" in s.value for s in list(at.success) + list(at.warning))


def test_follow_up_cursors_and_distances_between_the_studies(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    at.radio(key="second").set_value("prior study (follow-up)").run()
    a, b = case_mm(app_data, (20, 16, 6)), case_mm(app_data, (22, 13, 6))
    click(at, b, seq="1:1", pane="B")  # linked: a click in the prior moves the crosshair (the same RAS point)
    clean(at)
    assert "voxel (22, 13, 6)" in captions(at)
    at.session_state["viewport"] = {"click": {"pane": "A", "mm": a, "seq": "1:2", "linked": False},
                                    "display": None, "measurement": None}
    at.run()
    at.session_state["viewport"] = {"click": {"pane": "B", "mm": b, "seq": "1:3", "linked": False},
                                    "display": None, "measurement": None}
    at.run()
    clean(at)
    assert "voxel (20, 16, 6)" in captions(at)  # B's own cursor does not move A's
    assert viewer_data(at)["linked"] == {"B": b}  # the viewer keeps B's cursor where it was put
    assert any(n.startswith("cursors unlinked: each study has its own") for n in viewer_data(at)["notes"])
    gap = np.subtract(b, a)
    assert (f"cursors unlinked: P007 / S2 (test) at ({a[0]:.1f}, {a[1]:.1f}, {a[2]:.1f}) mm, P007 / S1 (test) at "
            f"({b[0]:.1f}, {b[1]:.1f}, {b[2]:.1f}) mm: **{np.linalg.norm(gap):.1f} mm apart**") in captions(at)
    for pane, length in (("B", 24.0), ("A", 26.5)):  # the same finding measured in the prior and the current study
        at.session_state["viewport"] = {"click": None, "display": None, "measurement": {
            "pane": pane, "start_mm": [0, 0, 0], "end_mm": [length, 0, 0], "distance_mm": length, "seq": pane}}
        at.run()
    text = captions(at)
    assert "distance P007 / S2 (test): **26.5 mm**" in text and "distance P007 / S1 (test): **24.0 mm**" in text
    assert "P007 / S2 (test) − P007 / S1 (test): **+2.5 mm**" in text
    at.session_state["viewport"] = {"click": {"pane": "A", "mm": a, "seq": "1:4", "linked": True},
                                    "display": None, "measurement": None}
    at.run()  # linked again: one cursor
    assert "cursors unlinked" not in captions(at) and "B" not in viewer_data(at)["linked"]
    at.radio(key="second").set_value("none").run()
    clean(at)
    assert "distance P007 / S1" not in captions(at) and "distance P007 / S2 (test): **26.5 mm**" in captions(at)


def test_two_phrases_that_give_near_identical_maps_are_flagged(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    button(at, LESION).click().run()
    at.radio(key="second").set_value("another phrase").run()
    at.text_input(key="phrase_b_box").input(LESION.replace("27 mm", "28 mm")).run()
    clean(at)
    assert len(viewer_data(at)["panes"]) == 2
    assert any("near-identical (Pearson r =" in w.value for w in at.warning)


def test_region_statistics_of_the_map(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    button(at, LESION).click().run()
    clean(at)
    assert at.table and {row for row in at.table[0].value["family"]} >= {"organs", "lesions"}
    assert any("Peak of the map:" in m.value and "raw" in m.value for m in at.markdown)


def test_export_writes_png_and_nifti_with_provenance(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    button(at, LESION).click().run()
    button(at, "Export PNG and NIfTI").click().run()
    clean(at)
    exports = sorted((app_data.run / "exports").glob("*"))
    png = next(p for p in exports if p.suffix == ".png")
    assert png_provenance(png)["phrase"] == LESION
    sidecar = json.loads(next(p for p in exports if p.suffix == ".json").read_text())
    display = sidecar["extra"]["display"]
    assert display["window"] == [400.0, 40.0] and "threshold_raw" in display and display["threshold"] >= 0
    message = next(s.value for s in at.success if s.value.startswith("wrote"))
    assert str(app_data.run.resolve()) not in message and "grounding/exports/" in message  # named by its data folder
    assert read_map(next(p for p in exports if p.name.endswith(".nii.gz"))).array.shape == (32, 32, 32)


def test_a_review_needs_a_verdict_and_a_name_and_can_mark_the_true_location(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    button(at, LESION).click().run()
    assert at.radio(key="review_verdict").value is None  # nothing preselected
    at.text_input(key="review_reviewer").input("JD").run()
    next(b for b in at.button if b.label == "Save review").click().run()
    assert any("choose a verdict" in e.value for e in at.error)
    click(at, case_mm(app_data, (26, 16, 6)))
    at.text_input(key="review_reviewer").input("JD")
    at.radio(key="review_verdict").set_value("wrong_region")
    at.checkbox(key="review_mark").check()
    next(b for b in at.button if b.label == "Save review").click().run()
    clean(at)
    rows = read_reviews(app_data.run / "review.csv")
    assert rows[-1].verdict == "wrong_region" and rows[-1].reviewer == "JD"
    assert [float(v) for v in rows[-1].true_location_mm.split()] == [round(v, 1) for v in case_mm(app_data,
                                                                                                   (26, 16, 6))]


def test_signals_show_the_patients_waveform_with_a_named_attribution(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run, "--data-root", app_data.signals)
    clean(at)
    assert [c for image in at.image for c in image.captions if c.startswith("patient P007")]
    assert any("Attribution: **gradient**" in c.value for c in at.caption)


def test_empty_and_over_long_phrases_are_answered(app_data: AppData, monkeypatch) -> None:
    at = start(monkeypatch, "--run", app_data.run)
    at.text_input(key="free_phrase").input("   ").run()
    at.button(key="ground_free").click().run()
    assert any("phrase: empty" in e.value for e in at.error)
    at.text_input(key="free_phrase").input("liver " * 4000).run()
    at.button(key="ground_free").click().run()
    message = next(e.value for e in at.error if "characters, at most" in e.value)
    assert len(message) < 250 and "23999 characters" in message


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
        assert not at.get("bidi_component")
        assert str(tmp_path) not in at.error[0].value or typed.startswith(str(tmp_path))
    at.text_input(key="typed_path").input("ok.nii.gz").run()
    clean(at)
    assert kinds(at) == ["image"]  # the app kept working


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
    assert kinds(at) == ["image"]


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
    assert any("expected 'grounding-model'" in e.value for e in at.error)
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
    listing = json.loads((out / "results.json").read_text(encoding="utf-8"))
    listing["checkpoint"] = os.path.relpath(app_data.run / "grounding.pt", out)  # relative to its own folder
    listing["image"] = os.path.relpath(image, out)
    (out / "results.json").write_text(json.dumps(listing), encoding="utf-8")
    monkeypatch.chdir(tmp_path.parent)  # started elsewhere: paths still found from results.json's folder
    at = start(monkeypatch, "--run", out)
    clean(at)
    assert at.radio(key="source").value == "maps of a ground infer output"
    assert any("groundable, score" in s.value for s in at.success) and "map" in kinds(at)  # opens on its first map
    button(at, LESION).click().run()
    clean(at)
    assert any("groundable, score" in s.value for s in at.success) and "map" in kinds(at)
    button(at, "The lungs are clear.").click().run()
    clean(at)
    assert any("not groundable" in w.value and "normal statement" in w.value for w in at.warning)



def test_the_apps_entry_runs_the_packaged_app(app_data: AppData, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["attention_viewer.py", "--run", str(app_data.run)])
    at = AppTest.from_file(str(REPO / "apps" / "attention_viewer.py"), default_timeout=180).run()
    clean(at)
    assert "**P007 / S2 (test)** · 32 x 32 x 32 voxels · CT" in captions(at) and kinds(at) == ["image", "labels"]


def test_uploads_corrupt_nifti_and_zipped_dicom(tmp_path: Path, monkeypatch) -> None:
    import gzip
    import io as bytesio
    import zipfile

    from test_io import write_dicom_series

    at = start(monkeypatch, "--data-root", tmp_path)
    at.radio(key="source").set_value("upload a volume").run()
    at.file_uploader(key="upload_0").upload("notes.txt", b"hello").run()
    assert not at.exception and any("unsupported type" in e.value for e in at.error)
    assert any("refused: notes.txt" in e.value for e in at.error)  # said in the page, the uploader emptied
    at.run()
    at.file_uploader(key="upload_1").upload("scan.nii.gz", b"\x1f\x8b\x08 corrupt").run()
    assert not at.exception and any("cannot read" in e.value for e in at.error)
    assert not any(at_dir in e.value for e in at.error for at_dir in ("/tmp/medssl-app-",))  # no server temp path
    at.run()
    cube = (np.random.default_rng(0).normal(size=(8, 9, 10)) * 50 - 900).astype(np.float32)
    at.file_uploader(key="upload_1").set_value(
        ("good.nii.gz", gzip.compress(nib.Nifti1Image(cube, np.diag([1.0, 1.0, 2.0, 1.0])).to_bytes()),
         "application/gzip")).run()
    clean(at)
    assert kinds(at) == ["image"] and "8 x 9 x 10 voxels" in captions(at)
    series = tmp_path / "dicom"
    write_dicom_series(series, np.zeros((4, 5, 6), np.int16) - 1000, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0),
                       "1.2.826.0.1.3680043.2.1125.7")
    buffer = bytesio.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(series.iterdir()):
            archive.write(path, f"series/{path.name}")
    at.file_uploader(key="upload_1").set_value(("ct.zip", buffer.getvalue(), "application/zip")).run()
    clean(at)
    assert "6 x 5 x 4 voxels" in captions(at)
