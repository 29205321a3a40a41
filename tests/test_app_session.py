"""The app's plain functions without Streamlit (`medssl.app.session`): start-up arguments and command,
the data folders and what is found under them, cases from manifests, uploads (files and zipped DICOM
series), volumes that cannot be shown, default display, region statistics and exports."""

from __future__ import annotations

import io as bytesio
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_io import write_dicom_series

from medssl.data.synthetic.hospital import make_hospital
from medssl.errors import UserError
from medssl.explain.maps import MapSidecar, peak, read_map
from medssl.app import paths, session, viewport


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hospital(tmp_path_factory.mktemp("session") / "hospital", patients=4, studies=1, size=16, seed=3,
                         trials=1, signal_seconds=2.0)


def test_start_up_arguments_and_the_streamlit_command(tmp_path: Path) -> None:
    assert session.parse_app_args(["--run", "a", "--data-root", "b", "--run", "c"]) == (
        [Path("a"), Path("c")], [Path("b")])
    for bad in (["--port", "1"], ["--run"], ["stray"]):
        with pytest.raises(UserError, match="expected --run DIR or --data-root DIR"):
            session.parse_app_args(bad)
    command = session.streamlit_command([tmp_path], [tmp_path / "x"], port=8765)
    assert command[:5] == [sys.executable, "-m", "streamlit", "run", str(session.APP_SCRIPT)]
    options = dict(zip(command[5:command.index("--")][::2], command[5:command.index("--")][1::2]))
    assert options["--server.address"] == "127.0.0.1" and options["--server.port"] == "8765"
    assert int(options["--server.maxUploadSize"]) * 2**20 == paths.UPLOAD_LIMIT_BYTES  # Streamlit's limit matches
    assert command[command.index("--") + 1:] == ["--run", str(tmp_path.resolve()), "--data-root",
                                                 str((tmp_path / "x").resolve())]
    assert session.APP_SCRIPT.is_file() and session.APP_SCRIPT.parent.name == "app"
    with pytest.raises(UserError, match="not a TCP port"):
        session.streamlit_command([], [], port=70000)
    with pytest.raises(UserError, match="give a run directory"):
        session.check_folders([], [])
    with pytest.raises(UserError, match="run directory is not an existing folder"):
        session.check_folders([tmp_path / "missing"], [])


def test_the_app_command_refuses_missing_folders_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "medssl.cli", "app", str(tmp_path / "nope")], capture_output=True,
                            encoding="utf-8", timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "run directory is not an existing folder" in result.stderr and "Traceback" not in result.stderr


def test_discovery_roots_and_problems(hospital: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "grounding.pt").write_bytes(b"placeholder")  # listed; loading it is the app's job (and an error there)
    (run / "config.yaml").write_text(f"data:\n  manifest: {hospital}\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    library = session.discover([run, empty, tmp_path / "gone"], [])
    assert [root.why for root in library.roots] == ["run directory", "run directory",
                                                    f"manifest named by {run.resolve() / 'config.yaml'}"]
    assert library.manifests == [hospital.resolve()] and library.checkpoints == [(run / "grounding.pt").resolve()]
    problems = " | ".join(library.problems)
    assert "gone: run directory is not an existing folder" in problems
    assert f"{empty}: no grounding model (grounding.pt) and no maps (results.json)" in problems
    assert library.review_folder(run / "grounding.pt") == run.resolve()
    assert session.discover([], [tmp_path]).review_folder(run / "grounding.pt") == run.resolve()  # found under a root
    assert session.discover([], [hospital.parent]).review_folder(None) is None
    assert library.resolve("vol/P001_S1.nii.gz") == (hospital.parent / "vol" / "P001_S1.nii.gz").resolve()
    for bad in ("../../etc/passwd", "/etc/passwd"):
        with pytest.raises(UserError, match="outside"):
            library.resolve(bad)
    (run / "config.yaml").write_text("data:\n  manifest: nowhere/manifest.json\n")
    assert "data.manifest nowhere/manifest.json not found" in " ".join(session.discover([run], []).problems)


def test_cases_from_a_manifest_keep_files_inside_the_roots(hospital: Path, tmp_path: Path) -> None:
    library = session.discover([], [hospital.parent])
    assert library.manifests == [hospital.resolve()]
    cases, problems = session.cases_from_manifest(library, hospital)
    assert not problems and len(cases) == 4
    case = next(c for c in cases if c.lesion_names)
    assert case.label is not None and case.lesion_mask is not None and case.label_names[5] == "liver"
    assert all(name.startswith("lesion ") and " mm " in name for name in case.lesion_names.values())
    assert case.signals and all(s.path.with_suffix(".hea").is_file() for s in case.signals)
    statements = session.report_statements(case.report)
    assert statements and all(s.section == "findings" for s in statements)
    # a manifest entry pointing outside the data folder is a problem line, not a case
    data = json.loads(hospital.read_text())
    data["training"][0]["image"] = "../../outside.nii.gz"
    leaky = hospital.parent / "leaky.json"
    leaky.write_text(json.dumps(data))
    try:
        cases, problems = session.cases_from_manifest(library, leaky)
        assert len(cases) == 3 and len(problems) == 1 and "outside" in problems[0]
    finally:
        leaky.unlink()


def _nifti_bytes(array: np.ndarray) -> bytes:
    img = nib.Nifti1Image(array, np.diag([2.0, 2.0, 3.0, 1.0]))
    return img.to_bytes()


def test_uploads_are_checked_written_once_and_read(tmp_path: Path) -> None:
    cube = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32) * 100 - 900
    data = _nifti_bytes(cube)
    saved = session.save_upload("scan.nii", data, tmp_path)
    assert saved.read_bytes() == data and saved.parent.parent == tmp_path
    assert session.save_upload("scan.nii", data, tmp_path) == saved  # same content, same place
    view = session.load_view_volume(saved)
    assert view.volume.array.shape == (6, 7, 8) and view.modality == "CT" and view.centre == (3, 3, 4)
    for name, payload, message in (("../scan.nii", data, "path separators"), ("scan.exe", data, "unsupported type"),
                                   ("scan.nii", b"", "empty file")):
        with pytest.raises(UserError, match=message):
            session.save_upload(name, payload, tmp_path)
    corrupt = session.save_upload("bad.nii.gz", b"\x1f\x8b\x08 not a nifti", tmp_path)
    with pytest.raises(UserError, match="cannot read"):
        session.load_view_volume(corrupt)


def test_upload_limit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(paths, "UPLOAD_LIMIT_BYTES", 100)
    with pytest.raises(UserError, match="exceeds the limit"):
        session.save_upload("scan.nii", b"x" * 101, tmp_path)
    with pytest.raises(UserError, match="exceeds the limit"):
        session.save_upload("series.zip", b"x" * 101, tmp_path)
    assert not any(tmp_path.iterdir())


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = bytesio.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def test_a_zipped_dicom_series_is_unpacked_safely(tmp_path: Path) -> None:
    series = tmp_path / "series"
    array_zyx = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) * 10 - 1000
    write_dicom_series(series / "CT", array_zyx, (0.5, 0.75, 2.0), (-10.0, 20.0, 30.0), "1.2.826.0.1.3680043.2.1125.9")
    members = {f"CT/{p.name}": p.read_bytes() for p in sorted((series / "CT").iterdir())}
    folder = session.save_upload("ct.zip", _zip(members), tmp_path / "uploads")
    view = session.load_view_volume(folder)
    assert view.volume.array.shape == (6, 5, 4) and view.volume.orientation == "LPS"
    for bad, message in (({"../evil.dcm": b"x"}, "outside the upload folder"),
                         ({"/abs/evil.dcm": b"x"}, "outside the upload folder"),
                         ({"a/1.dcm": b"x", "b/2.dcm": b"y"}, "2 folders"), ({}, "empty")):
        with pytest.raises(UserError, match=message):
            session.save_upload("bad.zip", _zip(bad) if bad else _zip({"d/": b""}), tmp_path / "uploads")
    with pytest.raises(UserError, match="not a readable zip"):
        session.save_upload("junk.zip", b"PK not really", tmp_path / "uploads")
    assert not (tmp_path / "evil.dcm").exists() and not Path("/abs/evil.dcm").exists()


def test_volumes_that_cannot_be_shown(tmp_path: Path) -> None:
    cube = np.zeros((5, 5, 5), np.float32)
    cases = {"flat.nii": (cube[:, :, 0], np.eye(4), "expected a 3D volume"),
             "slab.nii": (cube[:, :, :1], np.eye(4), "a 2D image"),
             "four.nii": (np.stack([cube, cube], -1), np.eye(4), "expected a 3D volume"),
             "noaffine.nii": (cube, None, "has no affine"),
             "nan.nii": (np.where(np.eye(5)[:, :, None] > 0, np.nan, cube).astype(np.float32), np.eye(4), "NaN")}
    for name, (array, affine, message) in cases.items():
        nib.save(nib.Nifti1Image(array, affine), tmp_path / name)
        with pytest.raises(UserError, match=message) as err:
            session.load_view_volume(tmp_path / name)
        assert "\n" not in str(err.value)
    mr = np.random.default_rng(1).uniform(0, 500, (5, 6, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(mr, np.eye(4)), tmp_path / "mr.nii")
    view = session.load_view_volume(tmp_path / "mr.nii")
    assert view.modality == "MR" and view.default_window == session.window_for(view, "1-99 %")
    assert session.window_for(view, "lung") == (1500, -600)
    with pytest.raises(UserError, match="unknown"):
        session.window_for(view, "pet")


def _result(map01: np.ndarray | None, *, scale: dict | None = None, score: float = 0.5, threshold: float = 0.0,
            extra: dict | None = None, warnings: list[str] | None = None):
    """A result as the app holds it: a probability map (what grounding writes), or a map on `scale` with a linear
    [-1, 1] -> [0, 1] rescaling (an older cosine map file)."""
    from medssl.app.grounding import Grounding

    probability = scale is None
    sidecar = MapSidecar.model_validate({
        "kind": "grounding", "image": "x.nii.gz", "checkpoint": "g.pt", "phrase": "p",
        "raw_scale": scale or {"name": "probability", "meaning": "how likely"},
        "rescaling": {"name": "linear", "from": [0, 1] if probability else [-1, 1], "to": [0, 1]},
        "groundable": map01 is not None, "score": score, "score_threshold": threshold, "preprocessing": {},
        "peak_voxel": [7, 7, 7] if map01 is not None else None, "peak_mm": [7.0, 7.0, 7.0] if map01 is not None
        else None, "extra": extra})
    return Grounding("p", "finding", map01 is not None, score, threshold, "", map01, sidecar, warnings or [])


def test_display_steps_keep_a_512_slice_whole_and_say_so() -> None:
    assert viewport.display_steps((64, 64, 64), (1.0, 1.0, 1.0)) == (1, 1, 1)
    steps = viewport.display_steps((512, 512, 300), (0.7, 0.7, 1.0))
    assert steps == (1, 1, 2) and "512 x 512 x 300 voxels as 512 x 512 x 150" in viewport.thinning_note(
        (512, 512, 300), steps)
    data = viewport.nifti_bytes(np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 1000, np.diag([2, 2, 3, 1]),
                                (1, 1, 2))
    image = nib.Nifti1Image.from_bytes(data)
    assert image.shape == (2, 3, 2) and image.get_data_dtype() == np.int16 and image.affine[2, 2] == 6
    lut, legend = viewport.label_table({1: "liver", 3: "spleen"})
    assert lut["labels"] == ["", "liver", "", "spleen"] and [n for n, _ in legend] == ["liver", "spleen"]
    assert lut["A"][2] == 0 and lut["A"][3] == 255


def test_the_window_a_phrase_opens_in() -> None:
    from medssl.display.windowing import preset_for_phrase

    assert preset_for_phrase("A 12 mm nodule in the right upper lobe.") == "lung"
    assert preset_for_phrase("The lungs are clear.") == "lung"
    assert preset_for_phrase("Sclerotic lesion of a vertebra") == "bone"
    assert preset_for_phrase("A 27 mm hypodense lesion in the spleen") == "soft tissue"
    assert preset_for_phrase("") == "soft tissue"


def test_default_display_and_statistics_of_a_map() -> None:
    map01 = np.zeros((10, 10, 10), np.float32)
    map01[2:8, 2:8, 2:8] = np.linspace(0.4, 0.6, 216).reshape(6, 6, 6)
    map01[7, 7, 7] = 0.9
    result = _result(map01)  # a probability: drawn from 0.5 to 1 whatever its values
    assert viewport.default_display(result).to_dict() == {"threshold": 0.5, "vmax": 1.0, "range": [0.0, 1.0],
                                                          "opacity": 0.6, "cmap": "hot", "mode": "fill"}
    assert result.meaning == "how likely" and viewport.result_cues(result) == []
    cosine = _result(map01, scale={"name": "cosine"})  # an older map file: its own top 5 %, in raw cosine units
    shown = viewport.default_display(cosine)
    assert shown.vmax == pytest.approx(0.8) and shown.range[0] == pytest.approx(-0.2)
    threshold = viewport.to_map01(cosine, shown.threshold)
    assert np.mean(map01[map01 > 0] > threshold) == pytest.approx(0.05, abs=0.01)
    assert "stretch this map's own range (cosine)" in viewport.result_cues(cosine)[0]
    assert viewport.correlation_cue(viewport.map_correlation(map01, map01 * 0.9)) is not None
    assert viewport.map_correlation(map01, np.zeros((2, 2, 2), np.float32)) is None
    counted = session.stats_map(map01, threshold, True)
    assert counted.max() == pytest.approx(0.9) and (counted[map01 <= threshold] == 0).all()
    assert session.stats_map(map01, threshold, False) is map01
    masks = {"corner": np.zeros_like(map01, bool), "body": map01 > 0}
    masks["corner"][7:] = True  # the top 5 % of the ramp and the spike lie in x = 7
    rows, summary = session.region_report(counted, np.eye(4), {"organs": masks, "none": {}})
    assert [r["region"] for r in rows] == ["corner"]  # "body" contains every organ: left out
    assert rows[0]["share of map mass"] == pytest.approx(1.0) and rows[0]["holds the peak"]
    assert len(summary) == 1 and summary[0]["top region"] == "corner" and summary[0]["share"] == 1.0
    assert summary[0]["CNR vs rest"] > 0


def test_close_calls_and_what_the_model_read_are_said_beside_a_result() -> None:
    map01 = np.zeros((10, 10, 10), np.float32)
    map01[5, 5, 5] = 0.98
    assert "close call: score 0.530 is within 0.05 of the threshold 0.500; 'found'" in viewport.result_cues(
        _result(map01, score=0.53, threshold=0.5))[0]
    assert "'not found' could" in viewport.result_cues(_result(None, score=0.47, threshold=0.5))[0]
    assert viewport.result_cues(_result(None, score=0.3, threshold=0.5)) == []  # clearly not found
    query = {"text": "a 12 mm lump in the upper spleen", "statement": "finding", "organs": ["spleen"], "kind": "mass",
             "locations": ["upper"], "size_mm": 12.0, "unknown_organs": [], "unknown": ["blob"], "sides": [],
             "mapped": [{"word": "lump", "slot": "kind", "concept": "mass", "confidence": 0.71, "used": True},
                        {"word": "tiny", "slot": "location", "concept": "lower", "confidence": 0.2, "used": False}]}
    notes = ["word 'lump' read as kind 'mass' (confidence 0.71)", "words not understood: blob",
             "no 'mass' was seen in training; any finding is searched"]
    result = _result(map01, extra={"query": query, "organ": "spleen", "organ_voxels": 738, "organ_ml": 180.25},
                     warnings=notes)
    assert viewport.query_lines(result) == [
        "read as: organ **spleen** · finding **mass** · places **upper** · size **12 mm**",
        "words read by MiniLM (confidence): 'lump' as kind 'mass' (0.71); 'tiny' as location 'lower' (0.20, not "
        "used: its slot was filled)",
        "words not understood: blob",
        "organ searched: **spleen** (predicted 180.2 ml, 738 voxels of the organ head's grid)"]
    assert viewport.phrase_notes(result) == notes[2:]  # the reading of the words is in the query lines already
    organ_only = _result(map01, extra={"query": {**query, "kind": None, "organs": [], "locations": [],
                                                 "size_mm": None, "mapped": [], "unknown": []}})
    assert viewport.query_lines(organ_only) == [
        "read as: organ **any organ the model saw findings in** · finding **the organ itself**"]
    assert viewport.query_lines(_result(map01)) == [] and viewport.phrase_notes(_result(map01, warnings=notes)) == notes


def test_maps_and_masks_travel_cropped_to_what_they_cover() -> None:
    array = np.zeros((10, 12, 14), np.float32)
    array[3:6, 5:7, 9:11] = 0.7
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    assert viewport.content_box(array) == (slice(3, 6), slice(5, 7), slice(9, 11))
    assert viewport.content_box(array, (1, 1, 2)) == (slice(3, 6), slice(5, 7), slice(8, 11))  # on the display grid
    image = nib.Nifti1Image.from_bytes(viewport.nifti_bytes(array, affine, (1, 1, 2), kind="map", crop=True))
    assert image.shape == (3, 2, 2) and np.allclose(image.get_fdata()[..., 1], 0.7)  # slices 8 and 10 shown
    assert np.allclose(image.affine[:3, 3], [10 + 3 * 2, 20 + 5 * 3, 30 + 8 * 4]) and image.affine[2, 2] == 8
    whole = nib.Nifti1Image.from_bytes(viewport.nifti_bytes(np.zeros((4, 4, 4)), affine, kind="map", crop=True))
    assert whole.shape == (4, 4, 4)  # nothing to crop to: the whole map


def test_mask_centre_lies_inside_the_mask() -> None:
    ring = np.zeros((9, 9, 3), bool)
    ring[1:8, 1:8, 1] = True
    ring[3:6, 3:6, 1] = False  # the centroid (4, 4, 1) is a hole: the nearest mask voxel is taken
    voxel = session.mask_centre(ring)
    assert ring[voxel] and abs(voxel[0] - 4) + abs(voxel[1] - 4) == 2
    with pytest.raises(UserError, match="empty"):
        session.mask_centre(np.zeros((2, 2, 2), bool))


def test_exported_map_says_how_it_was_shown(tmp_path: Path) -> None:
    map01 = np.zeros((4, 5, 6), np.float32)
    map01[1, 2, 3] = 0.8
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    voxel, mm = peak(map01, affine)
    sidecar = MapSidecar(kind="grounding", image="vol/a.nii.gz", checkpoint="run/grounding.pt", phrase="a cyst",
                         raw_scale={"name": "probability", "meaning": "m"},
                         rescaling={"name": "linear", "from": [0, 1]},
                         groundable=True,
                         score=0.3, score_threshold=0.1, peak_voxel=voxel, peak_mm=mm, preprocessing={},
                         extra={"statement_kind": "finding"})
    stem = session.export_stem(tmp_path, "P001 / S1 (test)", "A cyst, 9 mm!")
    assert stem.parent == tmp_path / "exports" and stem.name.endswith("_p001_s1_test_a_cyst_9_mm")
    nifti, side = session.export_map(stem, map01, affine, sidecar, {"threshold": 0.4, "cmap": "turbo"})
    loaded = read_map(nifti)
    assert loaded.sidecar.extra == {"statement_kind": "finding", "display": {"threshold": 0.4, "cmap": "turbo"}}
    assert json.loads(side.read_text())["extra"]["display"]["threshold"] == 0.4


def test_review_rows_from_two_writers(tmp_path: Path) -> None:
    for n in range(3):
        session.add_review(tmp_path, checkpoint="a.pt", image="x.nii", phrase=f"p{n}", verdict="right")
    session.add_review(tmp_path, checkpoint="b.pt", image="x.nii", phrase="p", verdict="wrong_region", comment="c")
    table = {row["checkpoint"]: row for row in session.review_table(tmp_path)}
    assert table["a.pt"]["right"] == 3 and table["a.pt"]["share_right"] == 1.0
    assert table["b.pt"]["wrong_region"] == 1 and table["b.pt"]["total"] == 1
    with pytest.raises(UserError, match="verdict"):
        session.add_review(tmp_path, checkpoint="a.pt", image="x.nii", phrase="p", verdict="maybe")
    assert os.path.exists(tmp_path / "review.csv")


def test_the_apps_plain_modules_do_not_import_streamlit() -> None:
    code = ("import sys, medssl.app.session, medssl.app.viewport, medssl.app.grounding, medssl.app.signals; "
            "print('streamlit' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", check=True,
                            timeout=120)
    assert result.stdout.strip() == "False"
