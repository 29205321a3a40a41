"""Readers and writers: real PhysioNet records and NIfTI files, round trips through every format, bad input."""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import wfdb
from pyedflib import highlevel as edf

from medssl.data.io import Signal, read_signal, read_volume, resample_signal, select_channels, write_volume, write_wfdb
from medssl.errors import UserError

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
STUDY_UID = "1.2.826.0.1.3680043.2.1125.1"


def rotated_affine() -> np.ndarray:
    """An oblique (rotated about z and x), anisotropic, x-flipped affine with an offset origin."""
    cz, sz, cx, sx = math.cos(0.3), math.sin(0.3), math.cos(-0.2), math.sin(-0.2)
    rotation = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.8, 1.25, 2.5])
    affine[:3, 3] = [12.5, -40.0, 7.0]
    return affine


@contextlib.contextmanager
def expect_user_error(path: Path, *words: str) -> Iterator[None]:
    """Expect a UserError whose one-line message names `path` and contains every one of `words`."""
    with pytest.raises(UserError) as info:
        yield
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    for word in words:
        assert word in message, message


# ----------------------------------------------------------------------------------------------- volumes


def test_nifti_round_trip_keeps_values_affine_and_dtype(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(5, 6, 7))
    labels = rng.integers(0, 4, size=(5, 6, 7)).astype(np.uint8)
    affine = rotated_affine()
    write_volume(tmp_path / "img.nii.gz", image, affine)
    write_volume(tmp_path / "seg.nii", labels, affine)
    img, seg = read_volume(tmp_path / "img.nii.gz"), read_volume(tmp_path / "seg.nii", label=True)
    assert img.array.dtype == np.float32 and img.array.shape == (5, 6, 7)
    np.testing.assert_allclose(img.array, image, rtol=1e-6)
    assert seg.array.dtype == np.uint8 and np.array_equal(seg.array, labels)
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    np.testing.assert_allclose(img.spacing, (0.8, 1.25, 2.5), atol=1e-6)
    assert img.orientation == "".join(nib.aff2axcodes(affine))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.nii.gz", "seg.nii"]  # no temp files left


def test_label_dtypes_and_singleton_fourth_axis(tmp_path: Path) -> None:
    array = np.arange(-30, 30, dtype=np.int16).reshape(3, 4, 5, 1)
    write_volume(tmp_path / "v.nii.gz", array, np.eye(4))
    assert nib.load(tmp_path / "v.nii.gz").get_data_dtype() == np.int16
    vol = read_volume(tmp_path / "v.nii.gz", label=True)
    assert vol.array.shape == (3, 4, 5) and vol.array.dtype == np.int16
    assert np.array_equal(vol.array, array[..., 0])
    write_volume(tmp_path / "f.nii.gz", np.array([[[0.0, 9.0], [300.0, -1.0]]]), np.eye(4))  # float storage
    floats = read_volume(tmp_path / "f.nii.gz", label=True)
    assert floats.array.dtype == np.int16 and floats.array.tolist() == [[[0, 9], [300, -1]]]


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".mhd"])
def test_itk_formats_read_like_the_nifti_they_came_from(tmp_path: Path, suffix: str) -> None:
    array = np.random.default_rng(1).normal(size=(6, 7, 8)).astype(np.float32)
    nifti = tmp_path / "src.nii.gz"
    write_volume(nifti, array, rotated_affine())
    converted = tmp_path / f"conv{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(converted))  # SimpleITK: LPS world, its own writer
    reference, vol = read_volume(nifti), read_volume(converted)
    assert vol.array.shape == (6, 7, 8)
    np.testing.assert_array_equal(vol.array, reference.array)
    np.testing.assert_allclose(vol.affine, reference.affine, atol=1e-4)
    assert vol.orientation == reference.orientation


def write_dicom_series(folder: Path, array_zyx: np.ndarray, spacing: tuple[float, float, float],
                       origin: tuple[float, float, float], series_uid: str, extra_tags: dict | None = None) -> None:
    """One axial int16 slice per file, LPS origin/spacing (x, y, z), identity orientation."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, plane in enumerate(array_zyx):
        position = (origin[0], origin[1], origin[2] + k * spacing[2])
        img = sitk.GetImageFromArray(plane[None].astype(np.int16))
        img.SetSpacing(spacing)
        img.SetOrigin(position)
        tags = {"0008|0060": "CT", "0020|000d": STUDY_UID, "0020|000e": series_uid,
                "0008|0018": f"{series_uid}.{k + 1}", "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{v:g}" for v in position), "0020|0037": "1\\0\\0\\0\\1\\0",
                "0028|0030": f"{spacing[1]:g}\\{spacing[0]:g}", "0018|0050": f"{spacing[2]:g}", **(extra_tags or {})}
        for key, value in tags.items():
            img.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{series_uid[-1]}_{k:03d}.dcm"))
        writer.Execute(img)


def test_dicom_series_folder_gives_array_and_ras_affine(tmp_path: Path) -> None:
    array_zyx = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    write_dicom_series(tmp_path / "ct", array_zyx, (0.5, 0.75, 2.0), (-10.0, 20.0, 30.0), f"{STUDY_UID}.2")
    vol = read_volume(tmp_path / "ct")
    assert vol.array.shape == (6, 5, 4) and vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, array_zyx.transpose(2, 1, 0))
    # LPS origin (-10, 20, 30) is RAS (10, -20, 30); LPS-aligned axes point to -R, -A, +S
    expected = np.array([[-0.5, 0, 0, 10], [0, -0.75, 0, -20], [0, 0, 2, 30], [0, 0, 0, 1]])
    np.testing.assert_allclose(vol.affine, expected, atol=1e-6)
    assert vol.orientation == "LPS" and vol.spacing == pytest.approx((0.5, 0.75, 2.0))


PATIENT_TAGS = {"0010|0010": "Roe^Jane", "0010|0020": "MRN-4711", "0010|0030": "19500203",
                "0008|0090": "Dr^Who", "0008|0080": "St Elsewhere Hospital"}


def test_dicom_patient_tags_reach_no_manifest_volume_or_check(tmp_path: Path) -> None:
    """De-identification on read: the volume carries voxels and geometry only, so the patient's name, id,
    birth date, physician and institution appear nowhere medssl writes or prints."""
    from medssl.data.manifest import write_manifest
    from medssl.data.manifest_build import build_manifest
    from medssl.data.manifest_check import check_manifest

    for stem in ("P001_S1", "P002_S1"):
        write_dicom_series(tmp_path / "data" / "images" / stem, np.zeros((4, 5, 6), np.int16), (1.0, 1.0, 2.0),
                           (0.0, 0.0, 0.0), f"{STUDY_UID}.{stem[3]}", PATIENT_TAGS)
    manifest, warnings = build_manifest(tmp_path / "data", val_fraction=0.0, test_fraction=0.0)
    write_manifest(manifest, tmp_path / "m.json")
    problems = check_manifest(tmp_path / "m.json")
    volume = read_volume(tmp_path / "data" / "images" / "P001_S1")
    written = (tmp_path / "m.json").read_text(encoding="utf-8") + repr(volume) + repr(problems) + repr(warnings)
    for value in ("Roe", "Jane", "MRN-4711", "19500203", "Who", "Elsewhere"):
        assert value not in written


def test_dicom_folder_with_two_series_or_none_is_refused(tmp_path: Path) -> None:
    plane = np.zeros((2, 3, 3), dtype=np.int16)
    write_dicom_series(tmp_path / "mixed", plane, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), f"{STUDY_UID}.3")
    write_dicom_series(tmp_path / "mixed", plane, (1.0, 1.0, 1.0), (0.0, 0.0, 5.0), f"{STUDY_UID}.4")
    with expect_user_error(tmp_path / "mixed", "2 DICOM series"):
        read_volume(tmp_path / "mixed")
    (tmp_path / "empty").mkdir()
    with expect_user_error(tmp_path / "empty", "no DICOM series"):
        read_volume(tmp_path / "empty")


def test_real_nibabel_files() -> None:
    anatomical = read_volume(NIBABEL_DATA / "anatomical.nii")
    assert anatomical.array.shape == (33, 41, 25) and anatomical.orientation == "LAS"
    np.testing.assert_array_equal(anatomical.affine, nib.load(NIBABEL_DATA / "anatomical.nii").affine)
    np.testing.assert_array_equal(anatomical.array, nib.load(NIBABEL_DATA / "anatomical.nii").get_fdata())
    assert anatomical.array.std() > 0
    standard = read_volume(NIBABEL_DATA / "standard.nii.gz", label=True)
    assert standard.array.shape == (4, 5, 7) and standard.array.dtype == np.uint8
    assert standard.spacing == (1.0, 3.0, 2.0) and standard.orientation == "RAS"
    with expect_user_error(NIBABEL_DATA / "example4d.nii.gz", "(128, 96, 24, 2)"):
        read_volume(NIBABEL_DATA / "example4d.nii.gz")


def test_mni152_template_from_nilearn(tmp_path: Path) -> None:
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template(resolution=2)
    template.to_filename(tmp_path / "mni152.nii.gz")
    vol = read_volume(tmp_path / "mni152.nii.gz")
    assert vol.array.shape == (99, 117, 95) and vol.spacing == (2.0, 2.0, 2.0) and vol.orientation == "RAS"
    np.testing.assert_allclose(vol.affine, template.affine)
    original = template.get_fdata()
    np.testing.assert_allclose(vol.array, original, atol=0.01 * original.max())  # stored as scaled uint8
    assert (vol.array > 0).mean() > 0.2  # a head, not an empty box


def test_bad_volumes_raise_user_errors_naming_the_file(tmp_path: Path) -> None:
    with expect_user_error(tmp_path / "missing.nii.gz", "no such file"):
        read_volume(tmp_path / "missing.nii.gz")

    good = tmp_path / "good.nii.gz"
    write_volume(good, np.random.default_rng(2).normal(size=(16, 16, 16)), np.eye(4))
    truncated = tmp_path / "truncated.nii.gz"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with expect_user_error(truncated, "cannot read NIfTI"):
        read_volume(truncated)

    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not gzip" * 50)
    with expect_user_error(garbage, "cannot read NIfTI"):
        read_volume(garbage)

    unknown = tmp_path / "scan.png"
    unknown.write_bytes(b"\x89PNG")
    with expect_user_error(unknown, "unknown volume format"):
        read_volume(unknown)

    fractional = tmp_path / "seg.nii.gz"
    write_volume(fractional, np.full((3, 3, 3), 1.5), np.eye(4))
    with expect_user_error(fractional, "non-integral"):
        read_volume(fractional, label=True)
    assert read_volume(fractional).array.max() == pytest.approx(1.5)  # as an image it is fine

    with expect_user_error(tmp_path / "out.mha", "NIfTI"):
        write_volume(tmp_path / "out.mha", np.zeros((2, 2, 2)), np.eye(4))


# ----------------------------------------------------------------------------------------------- signals

RECORDS = {  # name: (fs, channels, units, samples, NaN-free first minute)
    "100": (360, ["MLII", "V5"], ["mV", "mV"], 650000, True),
    "s0010_re": (1000, ["i", "ii", "iii", "avr", "avl", "avf", "v1", "v2", "v3", "v4", "v5", "v6", "vx", "vy", "vz"],
                 ["mV"] * 15, 38400, True),
    "a103l": (250, ["II", "V", "PLETH"], ["mV", "mV", "NU"], 82500, True),
    "v102s": (250, ["II", "V", "PLETH", "RESP"], ["mV", "mV", "NU", "NU"], 75000, False),
    "03700181": (125, ["MCL1", "ABP", "RESP"], ["mV", "mmHg", "mV"], 75000, True),
}


@pytest.mark.parametrize("name", list(RECORDS))
def test_real_physionet_records(physionet_dir: Path, name: str) -> None:
    fs, channels, units, samples, clean = RECORDS[name]
    signal = read_signal(physionet_dir / name)
    assert signal.fs == fs and signal.channels == channels and signal.units == units
    assert signal.data.shape == (len(channels), samples) and signal.data.dtype == np.float32
    assert signal.duration == pytest.approx(samples / fs)
    assert signal.meta["record_name"] == name
    minute = signal.data[:, : 60 * fs]
    assert np.isfinite(minute).all() if clean else np.isfinite(minute).mean() > 0.999
    reference = wfdb.rdrecord(str(physionet_dir / name)).p_signal.T
    np.testing.assert_allclose(signal.data, reference, rtol=1e-5, atol=1e-5)  # NaNs where wfdb has them
    assert np.nanstd(signal.data, axis=1).min() > 0  # every channel carries a signal
    ecg = [i for i, unit in enumerate(units) if unit == "mV"]
    assert np.nanmax(np.abs(signal.data[ecg])) < 20  # physical units (mV), not ADC counts


def test_physionet_metadata_and_path_forms(physionet_dir: Path) -> None:
    ptb = read_signal(physionet_dir / "s0010_re.hea", "wfdb")
    assert "age: 81" in ptb.meta["comments"] and "sex: female" in ptb.meta["comments"]
    assert read_signal(physionet_dir / "a103l").meta["comments"] == ["Asystole", "False alarm"]
    mgh = read_signal(physionet_dir / "03700181")
    assert "start" not in mgh.meta  # the recording date is dropped on read (de-identification)
    assert mgh.meta["smoothed_channels"] == ["MCL1"]  # 4 samples per frame, averaged to the 125 Hz frame rate
    nan_v102s = np.isnan(read_signal(physionet_dir / "v102s").data)
    assert 0 < nan_v102s.sum() < 100  # invalid samples are returned as NaN, not repaired


@pytest.mark.parametrize("name,fs_out", [("100", 250), ("s0010_re", 250), ("03700181", 250), ("a103l", 100)])
def test_resampling_real_records_gives_the_right_length(physionet_dir: Path, name: str, fs_out: float) -> None:
    signal = read_signal(physionet_dir / name)
    chunk = Signal(signal.data[:, : 10 * int(signal.fs) + 1], signal.fs, signal.channels, signal.units,
                   signal.path, signal.meta)
    out = resample_signal(chunk, fs_out)
    assert out.fs == fs_out and out.meta["resampled_from"] == signal.fs
    assert out.data.shape == (len(signal.channels), math.ceil(chunk.data.shape[1] * fs_out / signal.fs))
    assert out.data.dtype == np.float32 and out.duration == pytest.approx(chunk.duration, abs=1 / fs_out)
    assert np.isfinite(out.data).all()


def test_resampling_preserves_a_sinusoid() -> None:
    t = np.arange(3600) / 360.0
    data = np.stack([np.sin(2 * np.pi * 7 * t), 1.5 + np.cos(2 * np.pi * 3 * t)]).astype(np.float32)
    out = resample_signal(Signal(data, 360.0, ["a", "b"], ["mV", "mV"], Path("x"), {}), 250.0)
    assert out.data.shape == (2, 2500)
    t2 = np.arange(2500) / 250.0
    expected = np.stack([np.sin(2 * np.pi * 7 * t2), 1.5 + np.cos(2 * np.pi * 3 * t2)])
    np.testing.assert_allclose(out.data[:, 50:-50], expected[:, 50:-50], atol=2e-3)
    np.testing.assert_allclose(out.data, expected, atol=5e-2)  # edges too (edge padding, no ramp to zero)
    same = Signal(data, 360.0, ["a", "b"], ["mV", "mV"], Path("x"), {})
    assert resample_signal(same, 360.0) is same


def test_select_channels(physionet_dir: Path) -> None:
    signal = read_signal(physionet_dir / "v102s")
    picked = select_channels(signal, ["pleth", "II"])
    assert picked.channels == ["pleth", "II"] and picked.units == ["NU", "mV"]
    np.testing.assert_array_equal(picked.data, signal.data[[2, 0]])
    with expect_user_error(signal.path, "ABP", "available: II, V, PLETH, RESP"):
        select_channels(signal, ["II", "ABP"])
    padded = select_channels(signal, ["ABP", "resp"], missing="zeros")
    assert padded.data.shape == (2, 75000) and not padded.data[0].any()
    np.testing.assert_array_equal(padded.data[1], signal.data[3])
    assert padded.meta["padded_channels"] == ["ABP"]
    with pytest.raises(UserError, match="missing"):
        select_channels(signal, ["II"], missing="drop")


def test_wfdb_round_trip(physionet_dir: Path, tmp_path: Path) -> None:
    ptb = read_signal(physionet_dir / "s0010_re")
    short = Signal(ptb.data[:, :2000], ptb.fs, ptb.channels, ptb.units, ptb.path, ptb.meta)
    write_wfdb(tmp_path / "sig" / "P001_T1", short)
    assert sorted(p.name for p in (tmp_path / "sig").iterdir()) == ["P001_T1.dat", "P001_T1.hea"]
    back = read_signal(tmp_path / "sig" / "P001_T1")
    assert back.fs == 1000 and back.channels == ptb.channels and back.units == ptb.units
    assert back.meta["comments"] == ptb.meta["comments"]
    np.testing.assert_allclose(back.data, short.data, atol=1e-3)  # 16-bit quantisation of a few mV

    data = np.array([[0.0, 1.0, np.nan, -2.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    write_wfdb(tmp_path / "tiny", Signal(data, 50.0, ["x", "flat"], ["", "mV"], Path("t"), {}))
    tiny = read_signal(tmp_path / "tiny.hea")
    assert tiny.units == ["NU", "mV"]
    np.testing.assert_allclose(tiny.data, data, atol=1e-4)  # NaN stays NaN, a flat channel stays flat


@pytest.mark.parametrize("suffix", [".edf", ".bdf"])
def test_edf_and_bdf_with_two_rates(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"rec{suffix}"
    t_fast, t_slow = np.arange(10 * 256) / 256, np.arange(10 * 32) / 32
    headers = [edf.make_signal_header("ECG", dimension="mV", sample_frequency=256, physical_min=-5, physical_max=5),
               edf.make_signal_header("Resp", dimension="NU", sample_frequency=32, physical_min=-5, physical_max=5)]
    edf.write_edf(str(path), [np.sin(2 * np.pi * 5 * t_fast), np.sin(2 * np.pi * 0.5 * t_slow)], headers,
                  edf.make_header(patientcode="MRN-4711", patientname="Jane Roe", birthdate="1950-02-03",
                                  technician="Tech Smith", equipment="bench"))
    signal = read_signal(path)
    assert signal.fs == 256 and signal.channels == ["ECG", "Resp"] and signal.units == ["mV", "NU"]
    assert signal.data.shape == (2, 2560) and signal.meta == {"resampled_channels": ["Resp"]}  # de-identified
    assert not any(word in repr(signal) for word in ("MRN-4711", "Jane", "Roe", "1950", "Smith"))
    np.testing.assert_allclose(signal.data[0], np.sin(2 * np.pi * 5 * t_fast), atol=1e-3)
    np.testing.assert_allclose(signal.data[1, 100:-100], np.sin(2 * np.pi * 0.5 * t_fast)[100:-100], atol=1e-2)


def test_csv_and_npy(tmp_path: Path) -> None:
    t = np.arange(500) / 100.0
    rows = "\n".join(f"{ti:.4f},{np.sin(ti):.6f},{np.cos(ti):.6f}" for ti in t)
    (tmp_path / "timed.csv").write_text("time,ECG,PPG\n" + rows + "\n")
    timed = read_signal(tmp_path / "timed.csv")
    assert timed.fs == pytest.approx(100.0) and timed.channels == ["ECG", "PPG"] and timed.data.shape == (2, 500)
    np.testing.assert_allclose(timed.data[1], np.cos(t), atol=1e-6)

    (tmp_path / "plain.csv").write_text("ECG,PPG\n1,2\n3,4\n5,6\n")
    plain = read_signal(tmp_path / "plain.csv", fs=50)
    np.testing.assert_array_equal(plain.data, [[1, 3, 5], [2, 4, 6]])
    assert plain.fs == 50 and plain.duration == pytest.approx(0.06)

    np.save(tmp_path / "x.npy", np.ones((3, 40)))
    array = read_signal(tmp_path / "x.npy", fs=20.0)
    assert array.data.shape == (3, 40) and array.data.dtype == np.float32 and array.duration == 2.0


def test_bad_signals_raise_user_errors_naming_the_file(physionet_dir: Path, tmp_path: Path) -> None:
    with expect_user_error(tmp_path / "nothing.edf", "no such file"):
        read_signal(tmp_path / "nothing.edf")
    with expect_user_error(tmp_path / "sig" / "P009_T1", "no such file"):
        read_signal(tmp_path / "sig" / "P009_T1")

    for name in ("v102s.hea", "v102s.dat"):
        shutil.copy(physionet_dir / name, tmp_path / name)
    (tmp_path / "v102s.dat").unlink()
    with expect_user_error(tmp_path / "v102s.dat", "missing"):
        read_signal(tmp_path / "v102s")

    (tmp_path / "plain.csv").write_text("ECG,PPG\n1,2\n3,4\n")
    with expect_user_error(tmp_path / "plain.csv", "fs"):
        read_signal(tmp_path / "plain.csv")
    (tmp_path / "bad.csv").write_text("ECG,PPG\n1,2\n3,oops\n")
    with expect_user_error(tmp_path / "bad.csv", "cannot read CSV"):
        read_signal(tmp_path / "bad.csv", fs=10)
    (tmp_path / "jitter.csv").write_text("t,ECG\n0,1\n0.01,2\n0.05,3\n0.06,4\n")
    with expect_user_error(tmp_path / "jitter.csv", "not evenly sampled"):
        read_signal(tmp_path / "jitter.csv")

    good = tmp_path / "good.edf"
    edf.write_edf(str(good), [np.zeros(512)], [edf.make_signal_header("ECG", sample_frequency=256)])
    corrupt = tmp_path / "corrupt.edf"
    corrupt.write_bytes(good.read_bytes()[:700])
    with expect_user_error(corrupt, "cannot read EDF"):
        read_signal(corrupt)
    (tmp_path / "garbage.edf").write_bytes(b"not an edf" * 100)
    with expect_user_error(tmp_path / "garbage.edf", "cannot read EDF"):
        read_signal(tmp_path / "garbage.edf")

    np.save(tmp_path / "x.npy", np.ones((2, 10)))
    with expect_user_error(tmp_path / "x.npy", "fs"):
        read_signal(tmp_path / "x.npy")
    np.save(tmp_path / "cube.npy", np.ones((2, 3, 4)))
    with expect_user_error(tmp_path / "cube.npy", "(2, 3, 4)"):
        read_signal(tmp_path / "cube.npy", fs=1)

    (tmp_path / "rec.xyz").write_text("1,2")
    with expect_user_error(tmp_path / "rec.xyz", "signal format"):
        read_signal(tmp_path / "rec.xyz")
    with expect_user_error(tmp_path / "rec.xyz", "'mat'"):
        read_signal(tmp_path / "rec.xyz", "mat")
    with expect_user_error(physionet_dir / "100", "360 Hz", "fs=250"):
        read_signal(physionet_dir / "100", fs=250)


@pytest.mark.parametrize("sizes", [(1e6, 1.0, 1.0), (0.001, 1.0, 1.0), (1.0, 60.0, 1.0)],
                         ids=["huge", "tiny", "just-over"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_one_voxel_size_rule_for_every_reader(tmp_path: Path, sizes: tuple[float, ...], suffix: str) -> None:
    """read_volume and read_shape (manifest build) refuse a voxel size outside 0.01-50 mm in every format."""
    from medssl.data.io import read_shape

    data = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    path = tmp_path / f"scan{suffix}"
    if suffix == ".nii.gz":
        write_volume(path, data, np.diag([*sizes, 1.0]))
    else:
        image = sitk.GetImageFromArray(data.transpose(2, 1, 0))
        image.SetSpacing(sizes)
        sitk.WriteImage(image, str(path))
    for read in (read_volume, read_shape):
        with pytest.raises(UserError, match=r"voxel size \(.*\) mm is outside 0.01-50 mm"):
            read(path)
    write_volume(tmp_path / "good.nii.gz", data, np.diag([0.01, 50.0, 1.0, 1.0]))  # the bounds themselves pass
    assert read_shape(tmp_path / "good.nii.gz") == (6, 7, 8) and read_volume(tmp_path / "good.nii.gz").spacing[1] == 50


@pytest.mark.parametrize("pixdim", [0.0, -1.0, float("nan")])
def test_a_nifti_voxel_size_without_an_sform_is_refused_by_both_readers(tmp_path: Path, pixdim: float) -> None:
    from medssl.data.io import read_shape

    image = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None)
    image.header["pixdim"][1] = pixdim
    image.header.set_sform(None, code=0)
    image.header.set_qform(None, code=0)
    nib.save(image, str(tmp_path / "zero.nii.gz"))
    for read in (read_volume, read_shape):
        with pytest.raises(UserError, match="zero.nii.gz: (voxel size|its affine)"):
            read(tmp_path / "zero.nii.gz")


@pytest.mark.parametrize("channel", [[1.1e-5, 1.229, 0.6], [-4.3, -2.6, -3.0], [1000.0, 1000.001, 1000.0005],
                                     [-7.0, -7.0, -7.0], [0.0, 0.0, 0.0], [float("nan"), 0.2, 3e-7]],
                         ids=["min-just-above-0", "all-negative", "tiny-range-far-from-0", "constant", "zeros",
                              "with-nan"])
def test_wfdb_format_16_stores_any_finite_range(tmp_path: Path, channel: list[float]) -> None:
    """wfdb's own gain rounds a channel whose minimum lies just above 0 one step past 32767 and refuses to write
    it; medssl chooses the gain and baseline itself."""
    rng = np.random.default_rng(0)
    values = np.array(channel)
    data = np.stack([np.resize(values, 300), rng.normal(size=300)]).astype(np.float64)
    write_wfdb(tmp_path / "rec", Signal(data, 100.0, ["A", "B"], ["mV", "mV"], tmp_path / "rec"))
    back = read_signal(tmp_path / "rec", "wfdb").data
    finite = np.isfinite(data)
    assert (np.isnan(back) == ~finite).all()
    spread = np.nanmax(data, axis=1) - np.nanmin(data, axis=1)
    tolerance = np.maximum(spread / 65000, np.abs(np.nan_to_num(data)).max(axis=1) * 1e-6)[:, None]
    assert (np.abs(np.nan_to_num(back - data)) <= tolerance + 1e-9).all()
