"""Readers and writers for volumes (NIfTI, NRRD/MHA/MHD, DICOM series) and signals (WFDB, EDF/BDF, CSV, NPY).

Every reader returns one small dataclass (`Volume`, `Signal`) and turns any failure of the underlying
library into a one-line `UserError` that names the path. Writers are atomic: a reader never sees a
half-written file.

Conventions:
- Volumes are `(X, Y, Z)` arrays in nibabel voxel order with a `(4, 4)` affine mapping voxel indices
  to RAS+ world millimetres. SimpleITK images (LPS+ world, `(Z, Y, X)` arrays) are converted.
- Signals are `(C, T)` float32 arrays in physical units. NaNs (invalid samples) are returned as read.
- Multi-rate files: EDF channels are resampled to the highest rate (listed in
  `meta["resampled_channels"]`); WFDB channels with several samples per frame are averaged down to
  the frame rate by wfdb (`smooth_frames`; listed in `meta["smoothed_channels"]`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import wfdb
from pyedflib import highlevel as edf
from scipy.signal import resample_poly

from medssl.atomic import atomic_path
from medssl.errors import UserError, one_line

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SIGNAL_FORMATS = ("wfdb", "edf", "csv", "npy")
_SIGNAL_SUFFIXES = {".hea": "wfdb", ".edf": "edf", ".bdf": "edf", ".csv": "csv", ".npy": "npy"}
_TIME_COLUMNS = ("time", "t")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
VOXEL_MM = (0.01, 50.0)  # voxel sizes a CT or MR volume can have; outside, the header is wrong (`check_geometry`)



@contextlib.contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn any failure of a third-party reader into a one-line UserError naming `path`."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # the libraries raise many types (OSError, EOFError, zlib.error, ValueError, ...)
        raise UserError(f"{path}: cannot read {what} ({one_line(err, with_type=True)})") from err


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    return path


# ----------------------------------------------------------------------------------------------- volumes


@dataclass
class Volume:
    """A 3D volume: `array` (X, Y, Z), float32 for images or an integer dtype for label maps;
    `affine` (4, 4) float64 voxel index -> RAS+ mm."""

    array: np.ndarray
    affine: np.ndarray
    path: Path

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel sizes in mm along X, Y, Z (from the affine)."""
        return tuple(float(s) for s in nib.affines.voxel_sizes(self.affine))

    @property
    def orientation(self) -> str:
        """Axis codes of the voxel axes, e.g. "RAS" or "LPS"."""
        return "".join(nib.aff2axcodes(self.affine))


def read_volume(path: str | os.PathLike, *, label: bool = False) -> Volume:
    """Read a 3D volume: .nii/.nii.gz (nibabel), .nrrd/.nhdr/.mha/.mhd (SimpleITK) or a DICOM series folder.

    Trailing singleton dimensions are squeezed; anything else that is not 3D is refused. With
    `label=True` the values must be integral and the array gets the smallest integer dtype that holds them.
    """
    path = _existing(path)
    name = path.name.lower()
    if path.is_dir():
        array, affine = _read_dicom_series(path)
    elif name.endswith(NIFTI_SUFFIXES):
        array, affine = _read_nifti(path)
    elif name.endswith(ITK_SUFFIXES):
        with _reading(path, "image"):
            array, affine = _from_sitk(path, sitk.ReadImage(str(path)))
    else:
        raise UserError(f"{path}: unknown volume format; expected one of "
                        f"{', '.join(NIFTI_SUFFIXES + ITK_SUFFIXES)} or a DICOM series folder")
    array = _squeeze_to_3d(path, array)
    check_geometry(path, affine)
    return Volume(_as_labels(path, _c_order(array)) if label else _c_order(array, np.float32), affine, path)


def _c_order(array: np.ndarray, dtype: np.typing.DTypeLike = None) -> np.ndarray:
    """`array` (X, Y, Z) as a C-contiguous array of `dtype` (default: its own), what training and the store use.

    NIfTI files (and SimpleITK's arrays once transposed to (X, Y, Z)) hold their voxels in Fortran order; numpy's
    transposing copy of a 512 x 512 x 300 volume takes 1-2 s, this tile-by-tile copy (16 x 16 tiles over the last
    two axes, so both sides stay in cache) 0.25 s. The values are the same; only the memory order differs.
    """
    dtype = array.dtype if dtype is None else np.dtype(dtype)
    if array.ndim != 3 or array.flags.c_contiguous:
        return np.ascontiguousarray(array, dtype=dtype)
    out = np.empty(array.shape, dtype)
    for z in range(0, array.shape[2], 16):
        for y in range(0, array.shape[1], 16):
            out[:, y:y + 16, z:z + 16] = array[:, y:y + 16, z:z + 16]
    return out


def check_geometry(path: Path, affine: np.ndarray) -> None:
    """The one rule for a volume's geometry, applied wherever a volume is read (`read_volume`, `read_shape`): a
    finite, non-singular affine whose voxel sizes lie within VOXEL_MM (a 0 or 1e6 mm voxel is a header error,
    and would make every crop and spacing resample meaningless)."""
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise UserError(f"{path}: its affine (voxel -> mm) is singular or not finite, so it has no orientation or "
                        "voxel size; fix the header's sform/qform")
    sizes = nib.affines.voxel_sizes(affine)
    low, high = VOXEL_MM
    if not all(low * (1 - 1e-6) <= s <= high * (1 + 1e-6) for s in sizes):  # a header's float32 of 0.01 passes
        raise UserError(f"{path}: voxel size {tuple(float(f'{s:.4g}') for s in sizes)} mm is outside {low:g}-{high:g} "
                        "mm; check the header's voxel size (pixdim / spacing) and sform/qform")


def read_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """A volume file's array shape from its header alone (no voxel is read); a file that is not a volume, or
    whose geometry breaks `check_geometry`, is a UserError naming it."""
    path = _existing(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        with _reading(path, "NIfTI"):
            image = nib.load(path)
            shape = image.shape
            affine = _nifti_affine(path, image) if isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)) else None
    elif name.endswith(ITK_SUFFIXES):
        with _reading(path, "image"):
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            shape = reader.GetSize()
            affine = _itk_affine(reader) if len(shape) == 3 else None
    else:
        raise UserError(f"{path}: unknown volume format; expected one of {', '.join(NIFTI_SUFFIXES + ITK_SUFFIXES)}")
    if affine is not None and len(shape) >= 3:  # a 2D file: its caller refuses the shape
        check_geometry(path, affine)
    return tuple(int(n) for n in shape)



def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with _reading(path, "NIfTI"):  # its own UserErrors pass through as they are
        img = nib.load(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) or isinstance(img, nib.Cifti2Image):
            raise UserError(f"{path}: a {type(img).__name__.removesuffix('Image')} file, not a 3D NIfTI volume")
        affine = _nifti_affine(path, img)
        # reading every voxel here is what detects a truncated or corrupt file
        return np.asarray(img.dataobj), affine


def _nifti_affine(path: Path, img: nib.Nifti1Image) -> np.ndarray:
    """The image's affine; a voxel size <= 0 in a header without an sform is refused (nibabel would read it as
    1 mm)."""
    with nib.openers.ImageOpener(path) as handle:  # the header as stored: nibabel's copy has 0 sizes set to 1
        raw = type(img.header).from_fileobj(handle, check=False)
    pixdim = np.asarray(raw["pixdim"][1:4])
    if raw.get_sform(coded=True)[1] == 0 and (pixdim <= 0).any():
        raise UserError(f"{path}: voxel size {tuple(float(p) for p in pixdim)} in the header (nibabel would read 0 "
                        "as 1 mm); fix the header's pixdim or give it an sform")
    return img.affine.astype(np.float64)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    with _reading(folder, "DICOM series"):
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise UserError(f"{folder}: folder holds no DICOM series")
    if len(series) > 1:
        raise UserError(f"{folder}: folder holds {len(series)} DICOM series ({', '.join(series)}); "
                        "point to a folder with exactly one series")
    reader = sitk.ImageSeriesReader()
    with _reading(folder, "DICOM series"):
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
        return _from_sitk(folder, reader.Execute())


def _from_sitk(path: Path, img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image (LPS+, array (Z, Y, X)) -> array (X, Y, Z) and RAS+ affine."""
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{path}: expected a 3D scalar image, got {img.GetDimension()}D with "
                        f"{img.GetNumberOfComponentsPerPixel()} component(s) per voxel")
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0), _itk_affine(img)


def _itk_affine(img: sitk.Image | sitk.ImageFileReader) -> np.ndarray:
    """The RAS+ (4, 4) affine of a 3D SimpleITK image or read header (LPS+ direction, spacing, origin)."""
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(img.GetSpacing())
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(img.GetOrigin(), dtype=np.float64)
    return affine


def _squeeze_to_3d(path: Path, array: np.ndarray) -> np.ndarray:
    if array.ndim > 3 and all(n == 1 for n in array.shape[3:]):
        array = array.reshape(array.shape[:3])
    if array.ndim != 3:
        raise UserError(f"{path}: expected a 3D volume, got shape {tuple(array.shape)}")
    return array


def _as_labels(path: Path, array: np.ndarray) -> np.ndarray:
    """Label map -> integer array: integer files keep their dtype, float ones get the smallest of
    uint8/int16/int32/int64 that holds their values; non-integral values are refused."""
    if np.issubdtype(array.dtype, np.integer):
        return array
    bad = ~np.isfinite(array) | (array != np.round(array))
    if bad.any():
        raise UserError(f"{path}: label map has non-integral values (e.g. {array[bad].flat[0]!r}); "
                        "labels must be whole numbers")
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    dtype = next(t for t in (np.uint8, np.int16, np.int32, np.int64)
                 if np.iinfo(t).min <= low and high <= np.iinfo(t).max)
    return array.astype(dtype)


def write_volume(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> None:
    """Atomically write a (X, Y, Z) array with its (4, 4) RAS+ affine as NIfTI (.nii or .nii.gz).

    Integer arrays keep their dtype (bool -> uint8); float arrays are stored as float32.
    """
    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise UserError(f"{path}: write_volume writes NIfTI; the name must end in .nii or .nii.gz")
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif not np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(array, affine, dtype=array.dtype)
    img.set_qform(affine, code="scanner")
    img.set_sform(affine, code="scanner")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


# ----------------------------------------------------------------------------------------------- signals


@dataclass
class Signal:
    """A multichannel signal: `data` (C, T) float32 in physical units, sampled at `fs` Hz."""

    data: np.ndarray
    fs: float
    channels: list[str]
    units: list[str]
    path: Path
    meta: dict = field(default_factory=dict)

    @property
    def duration(self) -> float:
        """Length in seconds (T / fs)."""
        return self.data.shape[-1] / self.fs


def read_signal(path: str | os.PathLike, format: str | None = None, *, fs: float | None = None) -> Signal:
    """Read a signal file as (C, T) float32.

    `format` is inferred when None: ".hea" or a bare record name with a ".hea" beside it -> wfdb;
    ".edf"/".bdf" -> edf; ".csv" -> csv; ".npy" -> npy. `fs` (Hz) is required for .npy and for a CSV
    without a "time"/"t" column (seconds); for files that carry their own rate it must agree with it.
    """
    path = Path(path)
    format = format or _infer_format(path)
    if format not in SIGNAL_FORMATS:
        raise UserError(f"{path}: unknown signal format {format!r}; expected one of {', '.join(SIGNAL_FORMATS)}")
    if fs is not None and not (np.isfinite(fs) and fs > 0):
        raise UserError(f"{path}: fs must be a positive number of Hz, got {fs!r}")
    readers = {"wfdb": _read_wfdb, "edf": _read_edf, "csv": _read_csv, "npy": _read_npy}
    signal = readers[format](path, fs)
    if fs is not None and not np.isclose(signal.fs, fs, rtol=1e-6):
        raise UserError(f"{path}: file is sampled at {signal.fs:g} Hz but fs={fs:g} was given")
    return signal


def _infer_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in _SIGNAL_SUFFIXES:
        return _SIGNAL_SUFFIXES[suffix]
    if Path(f"{path}.hea").exists():
        return "wfdb"
    _existing(path)
    raise UserError(f"{path}: cannot tell the signal format from the name; expected a WFDB record "
                    f"(.hea), {', '.join(s for s in _SIGNAL_SUFFIXES if s != '.hea')}")


def check_signal_header(path: str | os.PathLike, format: str) -> None:
    """Open a record's header only (WFDB: the .hea and that its data files exist; EDF/BDF: the header); an
    empty, unreadable or incomplete record is a UserError naming it. No sample is read."""
    path = Path(path)
    if format == "wfdb":
        _wfdb_header(path)
    elif format == "edf":
        with _reading(_existing(path), "EDF/BDF header"):
            edf.read_edf_header(str(path))


def _wfdb_header(path: Path) -> tuple[Path, Path]:
    """(record base path, header path) of a WFDB record whose header reads and whose data files exist."""
    base = path.with_suffix("") if path.suffix.lower() == ".hea" else path
    header = _existing(base.parent / f"{base.name}.hea")
    if header.stat().st_size == 0:
        raise UserError(f"{header}: empty WFDB header")
    with _reading(header, "WFDB header"):
        files = getattr(wfdb.rdheader(str(base)), "file_name", None) or []
    for name in dict.fromkeys(files):
        if not (base.parent / name).exists():
            raise UserError(f"{header}: signal file {base.parent / name} is missing")
    return base, header


def _read_wfdb(path: Path, fs: float | None) -> Signal:
    base, header = _wfdb_header(path)
    with _reading(header, "WFDB record"):
        rec = wfdb.rdrecord(str(base), return_res=32)
    # the recording date is not kept (de-identification); comments (conditions, alarms, age/sex in PTB) are
    meta = {"record_name": rec.record_name, "comments": list(rec.comments or []),
            "samples_per_frame": list(rec.samps_per_frame)}
    smoothed = [name for name, spf in zip(rec.sig_name, rec.samps_per_frame) if spf > 1]
    if smoothed:
        meta["smoothed_channels"] = smoothed
    data = np.asarray(rec.p_signal, dtype=np.float32).T
    return Signal(np.ascontiguousarray(data), float(rec.fs), list(rec.sig_name), list(rec.units), path, meta)


def _read_edf(path: Path, fs: float | None) -> Signal:
    _existing(path)
    with _reading(path, "EDF/BDF"):
        signals, headers, header = edf.read_edf(str(path))
    if not headers:
        raise UserError(f"{path}: EDF/BDF file holds no signals")
    rates = [float(h["sample_frequency"]) for h in headers]
    top = max(rates)
    length = max(len(s) for s, r in zip(signals, rates) if r == top)
    resampled = [h["label"] for h, r in zip(headers, rates) if r != top]
    rows = [np.asarray(s if r == top else _resample(np.asarray(s), r, top), dtype=np.float32)[:length]
            for s, r in zip(signals, rates)]
    if any(len(row) != length for row in rows):
        raise UserError(f"{path}: channels of different durations cannot be stacked")
    meta: dict = {}  # de-identified on read: none of the patient and recording fields (name, code, birth date,
    # sex, technician, admin code, start date, free text) is kept
    if resampled:
        meta["resampled_channels"] = resampled
    return Signal(np.stack(rows), top, [h["label"] for h in headers], [h["dimension"] for h in headers], path, meta)


def _read_csv(path: Path, fs: float | None) -> Signal:
    _existing(path)
    with _reading(path, "CSV"):
        with open(path, newline="", encoding="utf-8") as handle:
            names = [name.strip() for name in next(csv.reader(handle), [])]
            table = np.loadtxt(handle, delimiter=",", dtype=np.float64, ndmin=2)
    if not names or table.size == 0:
        raise UserError(f"{path}: CSV needs a header row of channel names and at least one row of samples")
    if table.shape[1] != len(names):
        raise UserError(f"{path}: header names {len(names)} columns but rows have {table.shape[1]}")
    time_cols = [i for i, name in enumerate(names) if name.lower() in _TIME_COLUMNS]
    meta: dict = {}
    if time_cols:
        times = table[:, time_cols[0]]
        fs = _rate_from_times(path, times)
        meta["start_seconds"] = float(times[0])
    elif fs is None:
        raise UserError(f"{path}: CSV has no 'time' column, so fs (Hz) must be given")
    keep = [i for i in range(len(names)) if i not in time_cols]
    data = np.ascontiguousarray(table[:, keep].T, dtype=np.float32)
    return Signal(data, float(fs), [names[i] for i in keep], [""] * len(keep), path, meta)


def _rate_from_times(path: Path, times: np.ndarray) -> float:
    """Sampling rate (Hz) of an evenly spaced time column (seconds)."""
    steps = np.diff(times)
    if steps.size == 0 or not np.all(steps > 0):
        raise UserError(f"{path}: the time column must increase and have at least two rows")
    step = float(np.median(steps))
    if np.max(np.abs(steps - step)) > 0.01 * step:
        raise UserError(f"{path}: the time column is not evenly sampled (steps from {steps.min():g} "
                        f"to {steps.max():g} s)")
    return 1.0 / step


def _read_npy(path: Path, fs: float | None) -> Signal:
    _existing(path)
    with _reading(path, "NPY"):
        data = np.load(path, allow_pickle=False)
    if data.ndim != 2 or not np.issubdtype(data.dtype, np.number):
        raise UserError(f"{path}: expected a numeric (channels, samples) array, got {data.dtype} {data.shape}")
    if fs is None:
        raise UserError(f"{path}: .npy files carry no sampling rate, so fs (Hz) must be given")
    channels = [f"ch{i}" for i in range(data.shape[0])]
    return Signal(data.astype(np.float32), float(fs), channels, [""] * len(channels), path, {})


def write_wfdb(path: str | os.PathLike, signal: Signal) -> None:
    """Write `signal` as a WFDB record (format 16) at `path` (no extension): `<path>.hea` and `<path>.dat`.

    Both files are written in a temporary folder beside the target and moved in place, the header last.
    Empty units are written as "NU" (WFDB would otherwise read them as mV); string `meta["comments"]`
    become header comments.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comments = [str(c) for c in signal.meta.get("comments", [])]
    units = [unit or "NU" for unit in signal.units]
    data = np.asarray(signal.data, dtype=np.float64)
    gains, baselines = _fmt16_scaling(data)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        try:
            wfdb.wrsamp(path.name, fs=float(signal.fs), units=units, sig_name=list(signal.channels), p_signal=data.T,
                        fmt=["16"] * len(signal.channels), adc_gain=gains, baseline=baselines, comments=comments,
                        write_dir=tmp)
        except Exception as err:  # wfdb raises ValueError/TypeError for names, units and shapes
            raise UserError(f"{path}: cannot write WFDB record ({one_line(err, with_type=True)})") from err
        for suffix in (".dat", ".hea"):
            os.replace(Path(tmp, path.name + suffix), path.parent / (path.name + suffix))


def _fmt16_scaling(data: np.ndarray) -> tuple[list[float], list[int]]:
    """Per channel of `data` (C, T): the ADC gain and integer baseline that put its finite values within WFDB format
    16's [-32767, 32767] (-32768 stands for NaN) with one step to spare at each end. wfdb's own choice can round a
    channel's maximum one step past 32767 (a channel whose minimum lies just above 0) and then refuses to write."""
    low, high = -32767 + 1, 32767 - 1
    gains, baselines = [], []
    for channel in data:
        finite = channel[np.isfinite(channel)]
        pmin, pmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        gain = (high - low) / (pmax - pmin) if pmax > pmin else (1.0 / abs(pmin) if pmin else 1.0)
        baseline = round(low - gain * pmin) if pmax > pmin else 0
        if abs(baseline) >= 2**31:  # a tiny range far from 0: the int32 baseline bounds the gain
            baseline = int(np.sign(baseline)) * (2**31 - 1)
            gain = (high - baseline) / pmax if pmax > 0 else (low - baseline) / pmin
        gains.append(gain)
        baselines.append(int(baseline))
    return gains, baselines


def _resample(data: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    """Polyphase resampling along the last axis with a rational approximation of fs_out / fs_in."""
    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    if ratio == 1:
        return data
    return resample_poly(data, ratio.numerator, ratio.denominator, axis=-1, padtype="edge")


def resample_signal(signal: Signal, fs: float) -> Signal:
    """Resample to `fs` Hz: (C, T) -> (C, ceil(T * fs / signal.fs)); NaNs spread over the filter length."""
    if not (np.isfinite(fs) and fs > 0):
        raise UserError(f"fs: must be a positive number of Hz, got {fs!r}")
    if np.isclose(fs, signal.fs, rtol=1e-9):
        return signal
    data = _resample(signal.data, signal.fs, fs).astype(np.float32, copy=False)
    return dataclasses.replace(signal, data=data, fs=float(fs), meta={**signal.meta, "resampled_from": signal.fs})


def select_channels(signal: Signal, names: list[str], *, missing: str = "error") -> Signal:
    """Keep channels `names` (case-insensitive) in that order: (C, T) -> (len(names), T).

    missing="error": a UserError names the file, the missing channels and the available ones;
    missing="zeros": absent channels are zero-filled and listed in `meta["padded_channels"]`.
    """
    if missing not in ("error", "zeros"):
        raise UserError(f"missing: must be 'error' or 'zeros', got {missing!r}")
    index: dict[str, int] = {}
    for i, name in enumerate(signal.channels):
        index.setdefault(name.lower(), i)
    absent = [name for name in names if name.lower() not in index]
    if absent and missing == "error":
        raise UserError(f"{signal.path}: missing channel(s) {', '.join(absent)}; "
                        f"available: {', '.join(signal.channels)}")
    data = np.zeros((len(names), signal.data.shape[-1]), dtype=np.float32)
    units = []
    for row, name in enumerate(names):
        i = index.get(name.lower())
        if i is not None:
            data[row] = signal.data[i]
        units.append(signal.units[i] if i is not None else "")
    meta = {**signal.meta, "padded_channels": absent} if absent else dict(signal.meta)
    return dataclasses.replace(signal, data=data, channels=list(names), units=units, meta=meta)
