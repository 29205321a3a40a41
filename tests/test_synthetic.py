"""The synthetic hospital: geometry, anatomy, lesions vs masks vs reports, signals, splits, determinism, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import wfdb
from monai.data import load_decathlon_datalist
from scipy.signal import butter, find_peaks, sosfiltfilt

from medssl.data import io
from medssl.data.manifest_check import check_manifest
from medssl.data.synthetic.anatomy import (LANDMARKS, ORGANS, SITES, _canonical, _canonical_landmarks, _Pose, _rotation,
                                          _world, hospital_affine, make_anatomy, render_study, world_grid)
from medssl.data.synthetic.hospital import MANIFEST_NAME, make_hospital
from medssl.data.synthetic.reports import GRAMMAR, finding_sentence

LESION_KINDS, ORGAN_TEXT = GRAMMAR.lesion_kinds, GRAMMAR.organ_text
from medssl.errors import UserError

SPLITS = ("training", "validation", "test")
ORGAN_ID = {name: k for k, name in ORGANS.items()}
SIZE = 32
ARGS = dict(patients=4, studies=2, size=SIZE, seed=3, trials=2, signal_seconds=8.0)


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifest path of a small hospital (4 patients x 2 studies at 32^3, 2 trials of 8 s per study)."""
    return make_hospital(tmp_path_factory.mktemp("synth") / "hospital", **ARGS)


def entries(manifest_path: Path) -> list[dict]:
    manifest = json.loads(manifest_path.read_text())
    return [entry for split in SPLITS for entry in manifest[split]]


def load(root: Path, rel: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(root / rel)
    return np.asarray(img.dataobj), img.affine


def centroid(labels: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    """World (RAS mm) centroid of the voxels equal to `value`: (3,)."""
    return nib.affines.apply_affine(affine, np.argwhere(labels == value)).mean(axis=0)


def sentences(report: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=\.)\s+|\n", report) if s.strip()]


def test_layout_geometry_and_dtypes(hospital: Path) -> None:
    root = hospital.parent
    assert len(entries(hospital)) == 8
    for entry in entries(hospital):
        stem = f"{entry['patient_id']}_{entry['study_id']}"
        assert entry["image"] == f"vol/{stem}.nii.gz" and entry["label"] == f"seg/{stem}.nii.gz"
        assert (root / "report" / f"{stem}.txt").read_text() == entry["report"]
        image, affine = load(root, entry["image"])
        labels, label_affine = load(root, entry["label"])
        mask, mask_affine = load(root, entry["lesion_mask"])
        assert image.shape == labels.shape == mask.shape == (SIZE,) * 3
        assert (image.dtype, labels.dtype, mask.dtype) == (np.int16, np.uint8, np.uint8)
        np.testing.assert_allclose(affine, hospital_affine(SIZE))
        np.testing.assert_allclose(label_affine, affine)
        np.testing.assert_allclose(mask_affine, affine)
        volume = io.read_volume(root / entry["image"])
        assert volume.orientation == "RAS"
        assert volume.spacing == pytest.approx((400 / SIZE,) * 3)
        np.testing.assert_allclose(nib.affines.apply_affine(affine, [(SIZE - 1) / 2] * 3), 0, atol=1e-6)
        # HU-like: air outside, soft tissue in the body, bone in the spine, lungs dark
        assert np.median(image[labels == 0]) < -900
        assert -150 < np.median(image[labels == ORGAN_ID["liver"]]) < 150
        assert np.median(image[labels == ORGAN_ID["spine"]]) > 150
        assert np.median(image[labels == ORGAN_ID["lung_left"]]) < -500


def test_every_structure_in_every_label_map(hospital: Path) -> None:
    for entry in entries(hospital):
        labels, _ = load(hospital.parent, entry["label"])
        assert set(np.unique(labels).tolist()) == set(ORGANS)


def test_organs_sit_where_anatomy_puts_them(hospital: Path) -> None:
    for entry in entries(hospital):
        labels, affine = load(hospital.parent, entry["label"])
        c = {name: centroid(labels, affine, k) for k, name in ORGANS.items() if k}
        x, y, z = 0, 1, 2
        midline = c["spine"][x]
        assert c["spleen"][x] < midline < c["liver"][x]            # RAS+: +x is the patient's right
        assert c["kidney_left"][x] < midline < c["kidney_right"][x]
        assert c["lung_left"][x] < midline < c["lung_right"][x]
        assert abs(midline) < 50
        assert min(c["lung_left"][z], c["lung_right"][z]) > max(c["kidney_left"][z], c["kidney_right"][z])
        assert c["heart"][z] > c["liver"][z]
        assert c["spine"][y] < min(c["heart"][y], c["liver"][y], c["kidney_left"][y])   # posterior


def test_patients_differ_and_studies_of_a_patient_share_anatomy(hospital: Path) -> None:
    maps = {(e["patient_id"], e["study_id"]): load(hospital.parent, e["label"])[0] for e in entries(hospital)}
    dice = lambda a, b: 2 * (a & b).sum() / (a.sum() + b.sum())  # noqa: E731
    liver = ORGAN_ID["liver"]
    same = dice(maps["P001", "S1"] == liver, maps["P001", "S2"] == liver)
    other = dice(maps["P001", "S1"] == liver, maps["P002", "S1"] == liver)
    assert 0.6 < same < 1.0 and not np.array_equal(maps["P001", "S1"], maps["P002", "S1"])
    assert other < same


def test_lesions_match_masks_and_reports(hospital: Path) -> None:
    allowed_locations = {"upper", "lower", "anterior", "posterior", "medial", "lateral", "central"}
    count = 0
    for entry in entries(hospital):
        labels, affine = load(hospital.parent, entry["label"])
        mask, _ = load(hospital.parent, entry["lesion_mask"])
        lesions = entry["lesions"]
        assert len(lesions) <= 3
        assert [lesion["label"] for lesion in lesions] == list(range(1, len(lesions) + 1))
        assert set(np.unique(mask).tolist()) == set(range(len(lesions) + 1))
        position = 0
        for lesion in lesions:
            count += 1
            voxels = mask == lesion["label"]
            assert np.all(labels[voxels] == ORGAN_ID[lesion["organ"]])      # inside its organ
            assert lesion["kind"] in LESION_KINDS[lesion["organ"]]
            assert set(lesion["location"].split()) <= allowed_locations
            assert lesion["size_mm"] >= 2 * 400 / SIZE - 1
            np.testing.assert_allclose(lesion["centre_mm"], centroid(mask, affine, lesion["label"]), atol=0.1)
            # the report names organ, size and kind, in the order of the labels
            sentence = lesion["sentence"]
            assert ORGAN_TEXT[lesion["organ"]] in sentence and f"{lesion['size_mm']} mm" in sentence
            assert lesion["kind"] in sentence.lower()
            assert entry["report"].index(sentence) > position
            position = entry["report"].index(sentence)
    assert count > 0, "the fixture should hold lesions"


def test_held_out_phrasings_are_never_used_by_the_reports(hospital: Path) -> None:
    """The grammar's held-out templates render every finding but no generated report uses them."""
    assert not set(GRAMMAR.held_out_finding_templates) & set(GRAMMAR.finding_templates)
    assert not set(GRAMMAR.held_out_normal_templates) & set(GRAMMAR.normal_one + GRAMMAR.normal_pair)
    findings = [lesion for entry in entries(hospital) for lesion in entry["lesions"]]
    reports = [entry["report"] for entry in entries(hospital)]
    assert findings
    for lesion in findings:
        for template in GRAMMAR.held_out_finding_templates:
            sentence = finding_sentence(lesion, template)
            assert ORGAN_TEXT[lesion["organ"]] in sentence and f"{lesion['size_mm']}" in sentence
            assert lesion["kind"] in sentence.lower() and not any(sentence in report for report in reports)
        seen = [finding_sentence(lesion, template) for template in GRAMMAR.finding_templates]
        assert lesion["sentence"] in seen
    for organ in GRAMMAR.organ_text.values():
        for template in GRAMMAR.held_out_normal_templates:
            assert not any(template.format(organ=organ).lower() in report.lower() for report in reports)


def test_lesions_persist_across_studies(hospital: Path) -> None:
    by_patient: dict[str, dict[str, list[dict]]] = {}
    for entry in entries(hospital):
        by_patient.setdefault(entry["patient_id"], {})[entry["study_id"]] = entry["lesions"]
    for studies in by_patient.values():
        for first in studies["S1"]:
            later = [l for l in studies["S2"] if (l["organ"], l["kind"]) == (first["organ"], first["kind"])]
            assert later and max(l["size_mm"] for l in later) >= first["size_mm"]


def test_reports_state_normal_organs(hospital: Path) -> None:
    pairs = {"lung_left": "lungs", "lung_right": "lungs", "kidney_left": "kidneys", "kidney_right": "kidneys"}
    for entry in entries(hospital):
        with_lesion = {lesion["organ"] for lesion in entry["lesions"]}
        normal = [s.lower() for s in sentences(entry["report"]) if "mm" not in s]
        for organ in ("liver", "spleen", "lung_left", "lung_right", "kidney_left", "kidney_right"):
            if organ in with_lesion:
                continue
            names = [ORGAN_TEXT[organ]]
            if organ in pairs and not with_lesion & {o for o, p in pairs.items() if p == pairs[organ]}:
                names = [pairs[organ]]
            assert any(name in s for s in normal for name in names), (organ, entry["report"])
        assert entry["report"].startswith(f"CT chest and abdomen, study {entry['study_id']}.")


def r_peaks(ecg: np.ndarray, fs: float) -> np.ndarray:
    """Sample indices of the QRS complexes: peaks of the 5-30 Hz band energy."""
    energy = sosfiltfilt(butter(2, (5, 30), "bandpass", fs=fs, output="sos"), ecg) ** 2
    return find_peaks(energy, distance=int(0.3 * fs), height=0.2 * np.percentile(energy, 99.5))[0]


def rr_irregularity(ecg: np.ndarray, fs: float) -> float:
    """Median absolute successive RR difference over the median RR (robust to single ectopic beats)."""
    rr = np.diff(r_peaks(ecg, fs)) / fs
    return float(np.median(np.abs(np.diff(rr))) / np.median(rr))


def test_signals_are_wfdb_records(hospital: Path) -> None:
    for entry in entries(hospital):
        assert [ref["trial_id"] for ref in entry["signals"]] == [f"{entry['study_id']}_T1", f"{entry['study_id']}_T2"]
        for ref in entry["signals"]:
            assert ref["format"] == "wfdb" and ref["path"] == f"sig/{entry['patient_id']}_{ref['trial_id']}"
            record = wfdb.rdrecord(str(hospital.parent / ref["path"]))
            assert record.fs == 250 and record.sig_name == ["ECG", "PPG"] and record.units == ["mV", "NU"]
            assert record.p_signal.shape == (2000, 2) and np.isfinite(record.p_signal).all()
            assert entry["patient_id"] in record.comments[0]
            ecg = record.p_signal[:, 0]
            assert 0.5 < np.percentile(ecg, 99.9) - np.median(ecg) < 3.0      # R peaks of about a millivolt
            rate = 60 * record.fs / np.median(np.diff(r_peaks(ecg, record.fs)))
            assert 40 <= rate <= 150


def test_condition_makes_rr_intervals_irregular(tmp_path: Path) -> None:
    manifest = make_hospital(tmp_path / "h", patients=12, studies=1, size=16, trials=1, signal_seconds=10.0)
    scores: dict[int, list[float]] = {0: [], 1: []}
    for entry in entries(manifest):
        record = wfdb.rdrecord(str(manifest.parent / entry["signals"][0]["path"]))
        scores[entry["condition"]].append(rr_irregularity(record.p_signal[:, 0], record.fs))
    assert len(scores[0]) == len(scores[1]) == 6                              # one of each pair of patients
    assert np.mean(scores[1]) > 1.5 * np.mean(scores[0])
    assert max(scores[0]) < 0.1                                               # sinus rhythm is regular


def test_splits_are_patient_independent_and_monai_reads_them(hospital: Path) -> None:
    manifest = json.loads(hospital.read_text())
    assert manifest["name"] == MANIFEST_NAME and manifest["modality"] == {"0": "CT"}
    assert manifest["labels"] == {str(k): v for k, v in ORGANS.items()}
    patients = {split: {e["patient_id"] for e in manifest[split]} for split in SPLITS}
    assert all(patients.values())
    assert sum(len(p) for p in patients.values()) == len(set().union(*patients.values())) == 4
    assert {e["condition"] for split in SPLITS for e in manifest[split]} == {0, 1}
    for split in SPLITS:
        items = load_decathlon_datalist(hospital, data_list_key=split)
        assert len(items) == len(manifest[split])
        assert all(Path(item["image"]).is_file() and Path(item["label"]).is_file() for item in items)
    assert check_manifest(hospital) == []


def test_deterministic_per_seed_and_patient_independent_of_count(hospital: Path, tmp_path: Path) -> None:
    again = make_hospital(tmp_path / "again", **ARGS)
    assert again.read_text() == hospital.read_text()
    for entry in entries(hospital):
        for key in ("image", "label", "lesion_mask"):
            np.testing.assert_array_equal(load(again.parent, entry[key])[0], load(hospital.parent, entry[key])[0])
        for ref in entry["signals"]:
            np.testing.assert_array_equal(wfdb.rdrecord(str(again.parent / ref["path"])).p_signal,
                                          wfdb.rdrecord(str(hospital.parent / ref["path"])).p_signal)
    fewer = make_hospital(tmp_path / "fewer", **{**ARGS, "patients": 2})
    for entry in entries(fewer):
        image = load(fewer.parent, entry["image"])[0]
        np.testing.assert_array_equal(image, load(hospital.parent, entry["image"])[0])
    other = make_hospital(tmp_path / "other", **{**ARGS, "patients": 1, "studies": 1, "seed": ARGS["seed"] + 1})
    first = "vol/P001_S1.nii.gz"
    assert not np.array_equal(load(other.parent, first)[0], load(hospital.parent, first)[0])


@pytest.mark.parametrize("field, value", [("patients", 0), ("studies", 0), ("size", 8), ("trials", 0),
                                          ("size", 2.5), ("seed", -1), ("signal_seconds", 0.0), ("fs", 50.0)])
def test_bad_arguments(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(UserError, match=f"^{field}: "):
        make_hospital(tmp_path / "h", **{"patients": 1, "studies": 1, "size": 16, field: value})
    assert not (tmp_path / "h").exists()


def test_refuses_a_foreign_folder_and_replaces_a_previous_hospital(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=re.escape(str(foreign))):
        make_hospital(foreign, patients=1, studies=1, size=16)
    assert (foreign / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        make_hospital(tmp_path / "file", patients=1, studies=1, size=16)

    out = tmp_path / "hospital"
    out.mkdir()                                                               # an empty folder is fine
    make_hospital(out, patients=1, studies=1, size=16, progress=True)
    (out / "stray.txt").write_text("x")
    manifest = make_hospital(out, patients=2, studies=1, size=16)
    assert len(entries(manifest)) == 2 and not (out / "stray.txt").exists()


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path, signal):
        raise UserError(f"{path}: disk full")

    monkeypatch.setattr(io, "write_wfdb", broken)
    with pytest.raises(UserError, match="disk full"):
        make_hospital(tmp_path / "h", patients=1, studies=1, size=16)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seconds", [1.0, 2.0, 3.5, 10.0, 20.0])
def test_every_generated_signal_is_physiological_and_fits_wfdb_format_16(seconds: float, tmp_path: Path) -> None:
    """Many seeds, patients and lengths: ECG within a few mV of 0 and PPG near its pulse range (a short recording
    once drew a 20 mV offset), and every recording survives the WFDB round trip (format 16) within a step."""
    from medssl.data.synthetic.signals import SIGNAL_CHANNELS, SIGNAL_UNITS, condition, make_heart, trial_signals
    from medssl.data.synthetic.streams import TRIAL, stream_rng

    for seed in range(8):
        for patient in range(0, 20, 3 if seconds > 5 else 1):
            heart = make_heart(seed, patient, condition(seed, patient))
            data = trial_signals(heart, stream_rng(seed, TRIAL, patient, 1, 0), seconds, 250.0)
            assert np.abs(data[0]).max() < 5.0 and -1.0 < data[1].min() and data[1].max() < 4.0, (seed, patient)
            path = tmp_path / f"s{seed}_p{patient}"
            io.write_wfdb(path, io.Signal(data, 250.0, SIGNAL_CHANNELS, SIGNAL_UNITS, path))
            back = io.read_signal(path, "wfdb").data
            step = (data.max(axis=1) - data.min(axis=1)) / 65000
            assert (np.abs(back - data) <= step[:, None] + 1e-6).all(), (seed, patient)


def test_the_hospital_that_could_not_be_written_is_written(tmp_path: Path) -> None:
    """`synth --patients 20 --seed 5 --trials 1 --signal-seconds 2` stopped on a WFDB range error."""
    manifest = make_hospital(tmp_path / "h", patients=20, studies=2, size=16, seed=5, trials=1, signal_seconds=2.0)
    assert len(list((tmp_path / "h" / "sig").glob("*.hea"))) == 40 and not check_manifest(manifest)
# ------------------------------------------------------------------------------- two sites, pool, landmarks


def test_landmarks_are_the_same_anatomy_in_every_study(hospital: Path) -> None:
    """Landmarks: every one in every entry, interior ones inside their organ's label, the inverse of the
    world -> canonical map exact, a patient's studies close, patients apart; lesion ids follow a lesion."""
    inside = {"liver_centre": "liver", "spleen_centre": "spleen", "heart_centre": "heart",
              "vertebra_lower": "spine", "vertebra_middle": "spine", "vertebra_upper": "spine"}
    points: dict[tuple[str, str], np.ndarray] = {}
    for entry in entries(hospital):
        assert list(entry["landmarks"]) == list(LANDMARKS)
        labels, affine = load(hospital.parent, entry["label"])
        for name, organ in inside.items():
            voxel = np.rint(nib.affines.apply_affine(np.linalg.inv(affine), entry["landmarks"][name])).astype(int)
            assert labels[tuple(voxel)] == ORGAN_ID[organ], (entry["image"], name)
        points[entry["patient_id"], entry["study_id"]] = np.array(list(entry["landmarks"].values()))
    same = np.linalg.norm(points["P001", "S1"] - points["P001", "S2"], axis=1)
    other = np.linalg.norm(points["P001", "S1"] - points["P002", "S1"], axis=1)
    assert np.median(same) < 30 and np.median(other) > np.median(same)   # pose and breathing move them
    by_patient: dict[str, dict[int, set]] = {}
    for entry in entries(hospital):
        for lesion in entry["lesions"]:
            by_patient.setdefault(entry["patient_id"], {}).setdefault(lesion["lesion_id"], set()).add(
                (lesion["organ"], lesion["kind"]))
    assert all(len(kinds) == 1 for lesions in by_patient.values() for kinds in lesions.values())

    anatomy = make_anatomy(3, 0, SIZE)
    rng = np.random.default_rng(0)
    pose = _Pose(_rotation(rng.normal(0, 1.5, 3)), rng.normal(0, 4, 3).astype(np.float32), 9.0)
    canonical = _canonical_landmarks(anatomy)
    world = _world(anatomy, pose, canonical)
    np.testing.assert_allclose(_canonical(anatomy, pose, world.astype(np.float32)), canonical, atol=1e-3)


def test_two_sites_and_a_pool(tmp_path: Path) -> None:
    """Site-A patients are the one-site hospital's, byte for byte; as many site-B test patients as site-A
    ones, enhanced and noisier; the pool: other patients, both sites, images only, its own manifest."""
    args = dict(patients=3, studies=1, size=32, seed=5, trials=1, signal_seconds=2.0)
    plain = make_hospital(tmp_path / "plain", **args)
    manifest_path = make_hospital(tmp_path / "two", **args, two_site=True, pool=2)
    manifest, root = json.loads(manifest_path.read_text()), manifest_path.parent
    assert {e["site"] for e in manifest["training"] + manifest["validation"]} == {"A"}
    sites = [e["site"] for e in manifest["test"]]
    assert sites.count("A") == sites.count("B") == 1
    for entry in entries(plain):
        assert (root / entry["image"]).read_bytes() == (plain.parent / entry["image"]).read_bytes()
    site_a, site_b = (next(e for e in manifest["test"] if e["site"] == s) for s in "AB")
    stats = {}
    for site, entry in (("A", site_a), ("B", site_b)):
        image, labels = load(root, entry["image"])[0].astype(float), load(root, entry["label"])[0]
        stats[site] = (image[labels == ORGAN_ID["liver"]].mean(), image[labels == ORGAN_ID["kidney_left"]].mean())
    assert stats["B"][0] > stats["A"][0] + 15 and stats["B"][1] > stats["A"][1] + 50   # blurred at 12.5 mm
    anatomy, world = make_anatomy(5, 0, 32), world_grid(32)   # one study at both sites, the same draws
    (image_a, labels, *_), (image_b, *_) = (render_study(anatomy, world, 0, np.random.default_rng(1), SITES[s])
                                            for s in "AB")
    air = (labels == 0) & (image_a < -900)
    assert np.std(image_b[air]) > 1.3 * np.std(image_a[air])          # low-dose noise (clipped at -1024)
    pool = json.loads((root / "pool.json").read_text())
    assert pool["name"] == "synthetic-hospital-pool" and [e["site"] for e in pool["training"]] == ["A", "B"]
    assert not {e["patient_id"] for e in pool["training"]} & {e["patient_id"] for e in entries(manifest_path)}
    assert all(set(e) == {"image", "patient_id", "study_id", "site", "landmarks"} for e in pool["training"])
    assert check_manifest(root / "pool.json") == [] and check_manifest(manifest_path) == []
    with pytest.raises(UserError, match="^pool: "):
        make_hospital(tmp_path / "bad", **{**args, "pool": -1})
