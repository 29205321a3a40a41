"""Manifests: schema and loading, building from folder layouts, and check_manifest's problem reports."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import wfdb
from monai.data import load_decathlon_datalist

from medssl.data.manifest import SPLITS, Manifest, load_manifest, write_manifest
from medssl.data.manifest_build import build_manifest
from medssl.data.manifest_check import check_manifest
from medssl.errors import UserError

REPO = Path(__file__).resolve().parents[1]
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
SHAPE = (8, 8, 6)
STUDIES = ("P001_S1", "P001_S2", "P002_S1", "P003_S1", "P004_S1")


# ------------------------------------------------------------------------------------------- helpers


def save_volume(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


def image_array(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 100.0, SHAPE).astype(np.float32)


def label_array(values: tuple[int, ...] = (1, 2)) -> np.ndarray:
    label = np.zeros(SHAPE, dtype=np.uint8)
    for i, value in enumerate(values):
        label[1 + 3 * i: 3 + 3 * i, 2:6, 1:5] = value
    return label


def save_record(folder: Path, name: str, *, seconds: float = 3.0, fs: float = 100.0, nan: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * fs)) / fs
    data = np.stack([np.sin(2 * np.pi * 1.2 * t), np.cos(2 * np.pi * 1.2 * t)], axis=1)
    if nan:
        data[10:20, 1] = np.nan
    wfdb.wrsamp(name, fs=fs, units=["mV", "NU"], sig_name=["ECG", "PPG"], p_signal=data, fmt=["16", "16"],
                write_dir=str(folder))


def make_hospital(root: Path) -> Path:
    """The synthetic hospital's layout: vol/ seg/ lesion/ report/ sig/ (P001 has two studies)."""
    for i, stem in enumerate(STUDIES):
        save_volume(root / "vol" / f"{stem}.nii.gz", image_array(i))
        save_volume(root / "seg" / f"{stem}.nii.gz", label_array())
        save_volume(root / "lesion" / f"{stem}.nii.gz", label_array((1,)))
        (root / "report").mkdir(exist_ok=True)
        (root / "report" / f"{stem}.txt").write_text(f"A 12 mm hypodense lesion in the liver ({stem}).\n")
        for trial in ("T1", "T2"):
            save_record(root / "sig", f"{stem}_{trial}")
    return root


def built(root: Path, **kw) -> Path:
    """Build a manifest of `root` into root/manifest.json (no validation/test split unless asked)."""
    manifest, _ = build_manifest(root, **{"val_fraction": 0.0, "test_fraction": 0.0, **kw})
    write_manifest(manifest, root / "manifest.json")
    return root / "manifest.json"


def edit(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def entry_of(data: dict, stem: str) -> dict:
    return next(e for split in SPLITS for e in data[split] if Path(e.get("image", "")).name == f"{stem}.nii.gz")


@pytest.fixture()
def hospital(tmp_path: Path) -> Path:
    return make_hospital(tmp_path / "hospital")


# ------------------------------------------------------------------------------------------- build


def test_build_pairs_the_hospital_layout_and_checks_clean(hospital: Path) -> None:
    (hospital / "vol" / "notes.md").write_text("not a volume")
    save_volume(hospital / "seg" / "P009_S1.nii.gz", label_array())
    manifest, warnings = build_manifest(hospital, name="h", val_fraction=0.25, test_fraction=0.25, seed=3)

    assert len(warnings) == 3  # the stray file, the orphan label map, the unnamed label values
    assert any("notes.md" in w for w in warnings)
    assert any("P009_S1.nii.gz" in w and "without an image" in w for w in warnings)
    assert manifest["labels"] == {"0": "background", "1": "label_1", "2": "label_2"}
    assert manifest["modality"] == {"0": "CT"}
    entries = {Path(e["image"]).name: (split, e) for split in SPLITS for e in manifest[split]}
    assert len(entries) == len(STUDIES)
    split, entry = entries["P001_S2.nii.gz"]
    assert (entry["patient_id"], entry["study_id"]) == ("P001", "S2")
    assert Path(entry["label"]) == hospital / "seg" / "P001_S2.nii.gz"
    assert Path(entry["lesion_mask"]) == hospital / "lesion" / "P001_S2.nii.gz"
    assert entry["report"] == "A 12 mm hypodense lesion in the liver (P001_S2)."
    assert [(Path(s["path"]).name, s["format"], s["trial_id"]) for s in entry["signals"]] == [
        ("P001_S2_T1", "wfdb", "S2_T1"), ("P001_S2_T2", "wfdb", "S2_T2")]
    assert entries["P001_S1.nii.gz"][0] == split  # both studies of a patient land in one split
    assert [len({e["patient_id"] for e in manifest[s]}) for s in SPLITS] == [2, 1, 1]

    write_manifest(manifest, hospital / "manifest.json")
    assert check_manifest(hospital / "manifest.json", progress=True) == []


def test_build_split_is_patient_independent_and_seeded(tmp_path: Path) -> None:
    for p in range(1, 11):
        for study in ("S1", "S2"):
            name = f"P{p:03d}_{study}_T1"  # a header and its data file: build reads headers, not samples
            (tmp_path / f"{name}.hea").write_text(f"{name} 1 100 10\n{name}.dat 16 200 16 0 0 0 0 ECG\n")
            (tmp_path / f"{name}.dat").write_bytes(b"\0" * 20)

    def splits(seed: int) -> list[set[str]]:
        manifest, warnings = build_manifest(tmp_path, seed=seed)
        assert warnings == []
        return [{e["patient_id"] for e in manifest[s]} for s in SPLITS]

    first = splits(0)
    assert [len(s) for s in first] == [6, 2, 2]
    assert set.union(*first) == {f"P{p:03d}" for p in range(1, 11)}
    assert splits(0) == first
    assert any(splits(seed) != first for seed in (1, 2, 3))


@pytest.mark.parametrize("labels", [{"0": "background", "1": "liver", "2": "cancer"},  # decathlon
                                    {"background": 0, "liver": 1, "cancer": 2}])  # nnU-Net v2
def test_build_decathlon_layout(tmp_path: Path, labels: dict) -> None:
    for stem in ("liver_003", "liver_007"):
        save_volume(tmp_path / "imagesTr" / f"{stem}.nii.gz", image_array())
        save_volume(tmp_path / "labelsTr" / f"{stem}.nii.gz", label_array())
    save_volume(tmp_path / "imagesTs" / "liver_100.nii.gz", image_array())
    save_volume(tmp_path / "labelsTr" / "liver_999.nii.gz", label_array())
    save_volume(tmp_path / "imagesTr" / "._liver_003.nii.gz", image_array())  # macOS litter: ignored
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "Liver", "labels": labels}))

    manifest, warnings = build_manifest(tmp_path, val_fraction=0.0, test_fraction=0.0)

    assert len(warnings) == 1 and "liver_999.nii.gz" in warnings[0]
    assert manifest["labels"] == {"0": "background", "1": "liver", "2": "cancer"}
    assert [(e["patient_id"], "study_id" in e, "label" in e) for e in manifest["training"]] == [
        ("liver_003", False, True), ("liver_007", False, True), ("liver_100", False, False)]
    write_manifest(manifest, tmp_path / "dataset_medssl.json")
    assert check_manifest(tmp_path / "dataset_medssl.json") == []


def test_build_loose_wfdb_records(physionet_dir: Path) -> None:
    manifest, warnings = build_manifest(physionet_dir, val_fraction=0.0, test_fraction=0.0)
    assert warnings == []
    entries = manifest["training"]
    assert [e["patient_id"] for e in entries] == ["03700181", "100", "a103l", "s0010_re", "v102s"]
    assert all(len(e["signals"]) == 1 and "image" not in e for e in entries)
    assert entries[1]["signals"] == [{"path": str(physionet_dir / "100"), "format": "wfdb", "trial_id": "100"}]
    assert "modality" not in manifest  # signals only: no volume modality is made up


def test_build_a_flat_folder_of_scans(tmp_path: Path) -> None:
    """Volumes directly in the folder are images, <stem>_seg their label maps, <stem>.txt their reports;
    a file that only looks like a volume is refused by name, a modality outside CT/MR too."""
    for stem in ("P1_S1", "P2_S1", "P3_S1"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(tmp_path / f"{stem}.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), str(tmp_path / "P1_S1_seg.nii.gz"))
    (tmp_path / "P2_S1.txt").write_text("Findings: a cyst in the liver.", encoding="utf-8")
    (tmp_path / "notes.doc").write_text("x", encoding="utf-8")
    manifest, warnings = build_manifest(tmp_path, modality="mr", val_fraction=0.0, test_fraction=0.0)
    entries = {e["patient_id"]: e for e in manifest["training"]}
    assert sorted(entries) == ["P1", "P2", "P3"] and manifest["modality"] == {"0": "MR"}
    assert entries["P1"]["label"] == str(tmp_path / "P1_S1_seg.nii.gz") and "label" not in entries["P2"]
    assert entries["P2"]["report"] == "Findings: a cyst in the liver."
    assert f"{tmp_path / 'notes.doc'}: not a volume, label map or report of a scan in this folder; skipped" in warnings
    with pytest.raises(UserError, match="--modality: 'PET' is not one of CT, MR"):
        build_manifest(tmp_path, modality="PET")
    (tmp_path / "P4_S1.nii.gz").write_text("a text file", encoding="utf-8")
    with pytest.raises(UserError, match=r"P4_S1.nii.gz: cannot read NIfTI"):
        build_manifest(tmp_path)


def test_write_manifest_stores_paths_relative_to_its_folder(hospital: Path, tmp_path: Path) -> None:
    manifest, _ = build_manifest(hospital)
    out = tmp_path / "elsewhere" / "m.json"
    write_manifest(manifest, out)

    stored = json.loads(out.read_text())
    entry = entry_of(stored, "P002_S1")
    assert entry["image"] == "../hospital/vol/P002_S1.nii.gz"
    assert entry["signals"][0]["path"] == "../hospital/sig/P002_S1_T1"
    assert Path(entry_of(manifest, "P002_S1")["image"]).is_absolute()  # input untouched
    assert check_manifest(out) == []

    items = load_decathlon_datalist(out, data_list_key="training")
    assert len(items) == len(stored["training"]) > 0
    assert all(Path(item["image"]).is_file() and Path(item["label"]).is_file() for item in items)


def test_write_manifest_refuses_an_invalid_dict(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"m\.json: .*missing key 'training\[0\]\.patient_id'"):
        write_manifest({"name": "x", "modality": {}, "training": [{"image": "a.nii.gz"}]}, tmp_path / "m.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make", [lambda root: root.mkdir(), lambda root: None])
def test_build_refuses_a_folder_with_nothing_or_no_folder(tmp_path: Path, make: Callable) -> None:
    root = tmp_path / "empty"
    make(root)
    with pytest.raises(UserError, match=str(root)):
        build_manifest(root)


# ------------------------------------------------------------------------------------------- load


def test_load_manifest_and_its_helpers(hospital: Path) -> None:
    path = built(hospital, val_fraction=0.3, seed=1)
    manifest = load_manifest(path)
    assert isinstance(manifest, Manifest) and manifest.root == hospital
    assert manifest.path("vol/P001_S1.nii.gz") == hospital / "vol" / "P001_S1.nii.gz"
    assert sum(len(manifest.patients(s)) for s in SPLITS) == 4
    assert len(list(manifest.entries())) == len(STUDIES)
    assert manifest.split("training")[0].signals[0].format == "wfdb"
    assert "root" not in manifest.model_dump(mode="json")
    with pytest.raises(UserError, match="split: must be one of"):
        manifest.split("train")


def test_load_manifest_keeps_extra_keys_and_allows_no_labels(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"name": "x", "modality": {"0": "ECG"}, "numTraining": 1,
                                "training": [{"patient_id": "a", "condition": 1,
                                              "signals": [{"path": "a", "format": "wfdb", "trial_id": "T1"}]}]}))
    manifest = load_manifest(path)
    assert manifest.labels is None and manifest.validation == [] and manifest.numTraining == 1
    assert manifest.training[0].condition == 1


@pytest.mark.parametrize("text, expected", [
    ('{"name": "x",\n  "training": [}', r"not valid JSON \(line 2, column 16"),
    ("[1, 2]", "top level must be a JSON object"),
    ('{"name": "x", "modality": {}}', r"missing key 'training'"),
    ('{"name": "x", "modality": {}, "training": [{"image": "a.nii.gz"}]}',
     r"missing key 'training\[0\]\.patient_id'"),
    ('{"name": "x", "modality": {}, "training": [{"patient_id": 3}]}',
     r"field 'training\[0\]\.patient_id': Input should be a valid string \(got int 3\)"),
    ('{"name": "x", "modality": {}, "training": [{"patient_id": "a", '
     '"signals": [{"path": "a", "format": "wav", "trial_id": "T1"}]}]}',
     r"field 'training\[0\]\.signals\[0\]\.format': .*must be one of wfdb"),
    ('{"name": "x", "modality": {}, "labels": {"liver": "1"}, "training": []}',
     r"field 'labels': .*'liver' is not an integer"),
])
def test_load_manifest_errors_name_the_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UserError, match=rf"^{path}: .*{expected}") as err:
        load_manifest(path)
    assert "\n" not in str(err.value)


def test_load_manifest_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"{tmp_path / 'nope.json'}: no such manifest file"):
        load_manifest(tmp_path / "nope.json")


# ------------------------------------------------------------------------------------------- check


def test_check_reports_every_problem_in_one_call(hospital: Path) -> None:
    path = built(hospital)
    (hospital / "vol" / "P003_S1.nii.gz").unlink()
    truncated = hospital / "vol" / "P002_S1.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])

    def move_second_study(data: dict) -> None:
        entry = entry_of(data, "P001_S2")
        data["training"].remove(entry)
        data["test"].append(entry)

    edit(path, move_second_study)
    problems = check_manifest(path)

    assert len(problems) == 3, problems
    by_path = {p.path: p for p in problems}
    missing = by_path[str(hospital / "vol" / "P003_S1.nii.gz")]
    corrupt = by_path[str(truncated)]
    patient = by_path[str(path)]
    assert "no such file" in missing.message
    assert "cannot read NIfTI" in corrupt.message
    assert patient.message == "patient 'P001' is in more than one split: training and test"
    assert str(patient) == f"{path}: {patient.message}"
    assert all(".image" in p.message for p in (missing, corrupt))


def _replace_volume(stem: str, folder: str, array: np.ndarray, affine: np.ndarray = AFFINE) -> Callable:
    def change(root: Path, data: dict) -> None:
        save_volume(root / folder / f"{stem}.nii.gz", array, affine)
    return change


def _set_signal(stem: str, **values) -> Callable:
    def change(root: Path, data: dict) -> None:
        entry_of(data, stem)["signals"][0].update(values)
    return change


def _duplicate_image(root: Path, data: dict) -> None:
    entry_of(data, "P003_S1")["image"] = "vol/P002_S1.nii.gz"


def _shifted() -> np.ndarray:
    affine = AFFINE.copy()
    affine[0, 3] = 0.01
    return affine


def _nan_image() -> np.ndarray:
    image = image_array()
    image[0, 0, :3] = np.nan
    return image


BAD_CASES = {
    "label shape": (_replace_volume("P002_S1", "seg", np.zeros((8, 8, 5), np.uint8) + 1),
                    "seg/P002_S1.nii.gz", r"training\[\d\]\.label: shape \(8, 8, 5\) differs from the image's"),
    "label affine": (_replace_volume("P002_S1", "seg", label_array(), _shifted()),
                     "seg/P002_S1.nii.gz", "affine differs from the image's by up to 0.01 mm"),
    "lesion affine": (_replace_volume("P002_S1", "lesion", label_array((1,)), _shifted()),
                      "lesion/P002_S1.nii.gz", r"\.lesion_mask: affine differs"),
    "undeclared label": (_replace_volume("P002_S1", "seg", label_array((1, 7))),
                         "seg/P002_S1.nii.gz", r"value\(s\) \[7\] not declared in 'labels'"),
    "empty label": (_replace_volume("P002_S1", "seg", np.zeros(SHAPE, np.uint8)),
                    "seg/P002_S1.nii.gz", "label map is empty"),
    "nan image": (_replace_volume("P002_S1", "vol", _nan_image()), "vol/P002_S1.nii.gz", r"3 NaN/inf voxel\(s\)"),
    "constant image": (_replace_volume("P002_S1", "vol", np.full(SHAPE, -1000.0, np.float32)),
                       "vol/P002_S1.nii.gz", r"image is constant \(every voxel -1000\)"),
    "header without data": (lambda root, data: (root / "sig" / "P002_S1_T1.dat").unlink(),
                            "sig/P002_S1_T1.hea", r"signals\[0\]: signal file .*P002_S1_T1\.dat is missing"),
    "nan signal": (lambda root, data: save_record(root / "sig", "P002_S1_T1", nan=True),
                   "sig/P002_S1_T1", r"10 NaN sample\(s\) in channel\(s\) PPG"),
    "fs mismatch": (_set_signal("P002_S1", fs=250.0), "sig/P002_S1_T1", "sampled at 100 Hz but fs=250"),
    "short signal": (lambda root, data: save_record(root / "sig", "P002_S1_T1", seconds=1.5),
                     "sig/P002_S1_T1", r"1\.5 s long, shorter than min_signal_seconds=2"),
    "duplicate image": (_duplicate_image, "vol/P002_S1.nii.gz",
                        r"image listed 2 times: training\[\d\], training\[\d\]"),
    "schema error": (lambda root, data: entry_of(data, "P002_S1").pop("patient_id"),
                     "manifest.json", r"missing key 'training\[\d\]\.patient_id'"),
    "labels missing": (lambda root, data: data.pop("labels"), "manifest.json",
                       "labels: missing, but 5 entries have a label map"),
    "no image no signals": (lambda root, data: data["training"].append({"patient_id": "P005"}),
                            "manifest.json", r"training\[5\]: entry has neither an image nor signals"),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_check_reports_each_bad_case(hospital: Path, case: str) -> None:
    change, where, expected = BAD_CASES[case]
    path = built(hospital)
    data = json.loads(path.read_text())
    change(hospital, data)
    path.write_text(json.dumps(data))

    problems = check_manifest(path, min_signal_seconds=2.0)

    assert len(problems) == 1, problems
    assert problems[0].path.endswith(where)
    assert re.search(expected, problems[0].message), problems[0]


def test_check_allows_declared_nan_signals(hospital: Path) -> None:
    path = built(hospital)
    save_record(hospital / "sig", "P002_S1_T1", nan=True)
    edit(path, lambda data: entry_of(data, "P002_S1")["signals"][0].update(allow_nan=True))
    assert check_manifest(path) == []


def test_check_non_json_is_one_problem_with_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text('{"name": "x",\n "training": [,]}')
    assert [str(p) for p in check_manifest(path)] == [
        f"{path}: not valid JSON (line 2, column 15: Expecting value)"]


def test_physionet_example_manifest_loads_and_checks_clean(physionet_dir: Path) -> None:
    path = REPO / "data_manifests" / "physionet.json"
    manifest = load_manifest(path)
    assert manifest.name == "physionet-sample" and manifest.labels is None
    assert manifest.patients("training") == ["03700181", "100", "a103l", "s0010_re", "v102s"]
    assert manifest.validation == [] and manifest.test == []
    refs = [entry.signals[0] for entry in manifest.training]
    assert {manifest.path(ref.path).resolve() for ref in refs} == {
        (physionet_dir / name).resolve() for name in manifest.patients("training")}
    assert [ref.fs for ref in refs] == [125.0, 360.0, 250.0, 1000.0, 250.0]
    assert check_manifest(path) == []
