"""The map file contract: one 3D map per phrase, written as a NIfTI plus a JSON sidecar.

A map is `<stem>.nii.gz` (float32, the input volume's `(X, Y, Z)` shape and RAS+ affine, values in
[0, 1]) and `<stem>.json` beside it (a `MapSidecar`, format tag "medssl-map-v1"). The NIfTI also
carries the sidecar JSON as a NIfTI-1 header extension with code 6 ("comment", `EXTENSION_CODE`), UTF-8
encoded, so a map copied without its sidecar keeps its provenance.

Not-groundable results are NOT maps: `write_map` refuses a sidecar with `groundable: false`. The grounding
CLI writes such a result as the sidecar JSON alone (`write_result_json`); `read_map` on it says that the
phrase was judged not groundable and that there is no image.

Writing a pair: both files are written to temporary siblings first, then the old sidecar is removed, the
NIfTI renamed into place and the sidecar renamed last. At every instant a reader sees either a
consistent pair or a NIfTI alone (whose embedded provenance is complete). A reader racing an overwrite
can pair an old NIfTI with a new sidecar; `read_map` detects the disagreement and reads again (up to
three times in all).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import nibabel as nib
import numpy as np
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import medssl
from medssl.atomic import atomic_path
from medssl.errors import UserError, one_line, validation_message

MAP_FORMAT = "medssl-map-v1"
EXTENSION_CODE = 6  # NIfTI-1 extension code 6 = "comment"; content: the sidecar JSON, UTF-8
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_GRID_ATOL_MM = 1e-3  # NIfTI stores the affine as float32: equal grids may differ by ~1e-5 mm
_READ_ATTEMPTS = 10  # a reader racing an overwrite may pair an old NIfTI with a new sidecar: read again


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# ----------------------------------------------------------------------------------------------- sidecar


class CosineScale(_Strict):
    """Raw values are cosine similarities in `range` (normally [-1, 1])."""

    name: Literal["cosine"] = "cosine"
    range: tuple[float, float] = (-1.0, 1.0)


class AttentionScale(_Strict):
    """Raw values are attention weights (a softmax over regions) that sum to `sums_to`."""

    name: Literal["attention"] = "attention"
    sums_to: float = 1.0


class LinearRescaling(_Strict):
    """map = to[0] + (raw - from[0]) / (from[1] - from[0]) * (to[1] - to[0]), clipped to [0, 1]."""

    name: Literal["linear"] = "linear"
    from_: tuple[float, float] = Field(alias="from")
    to: tuple[float, float] = (0.0, 1.0)

    @model_validator(mode="after")
    def _ranges(self) -> LinearRescaling:
        if not self.from_[0] < self.from_[1]:
            raise ValueError(f"'from' must be increasing, got {list(self.from_)}")
        if not 0.0 <= self.to[0] < self.to[1] <= 1.0:
            raise ValueError(f"'to' must be an increasing range inside [0, 1], got {list(self.to)}")
        return self


class MinMaxRescaling(_Strict):
    """map = (raw - lo) / (hi - lo) with `from` = [lo, hi] the raw map's minimum and maximum
    (a constant raw map, lo == hi, gives an all-zero map)."""

    name: Literal["min-max"] = "min-max"
    from_: tuple[float, float] = Field(alias="from")

    @model_validator(mode="after")
    def _ranges(self) -> MinMaxRescaling:
        if not self.from_[0] <= self.from_[1]:
            raise ValueError(f"'from' must be [min, max], got {list(self.from_)}")
        return self


class ProbabilityScale(_Strict):
    """Raw values are probabilities in [0, 1]; `meaning` says of what (e.g. "the organ head's probability of
    the liver", or how a finding score became one)."""

    name: Literal["probability"] = "probability"
    meaning: str = Field(min_length=1)


RawScale = Annotated[CosineScale | AttentionScale | ProbabilityScale, Field(discriminator="name")]
Rescaling = Annotated[LinearRescaling | MinMaxRescaling, Field(discriminator="name")]


class MapSidecar(_Strict):
    """Provenance of one map (or of one not-groundable result). Unknown keys are errors.

    `groundable` is the grounding decision (normally score >= score_threshold, but negated or normal
    statements may be judged not groundable whatever the score). `peak_voxel` is the voxel index
    (i, j, k) of the map's maximum and `peak_mm` its RAS+ position in mm; both are required when
    `groundable` is true. `created` is a timezone-aware time (default: now, UTC), written as ISO 8601.
    `medssl_version` defaults to the running version.
    """

    format: Literal["medssl-map-v1"] = MAP_FORMAT
    kind: str = Field(min_length=1)
    image: str = Field(min_length=1)
    checkpoint: str = Field(min_length=1)
    phrase: str = Field(min_length=1)
    raw_scale: RawScale
    rescaling: Rescaling
    groundable: bool
    score: float = Field(allow_inf_nan=False)
    score_threshold: float = Field(allow_inf_nan=False)
    peak_voxel: tuple[int, int, int] | None = None
    peak_mm: tuple[float, float, float] | None = None
    preprocessing: dict[str, Any]
    created: AwareDatetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    medssl_version: str = medssl.__version__
    extra: dict[str, Any] | None = None

    @field_validator("peak_mm")
    @classmethod
    def _finite(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is not None and not all(math.isfinite(v) for v in value):
            raise ValueError("must be finite")
        return value

    @model_validator(mode="after")
    def _peak_for_maps(self) -> MapSidecar:
        if self.groundable and (self.peak_voxel is None or self.peak_mm is None):
            raise ValueError("a groundable result needs peak_voxel and peak_mm")
        return self

    def to_json(self) -> str:
        """The sidecar as indented JSON ("from" keys spelled as in the file)."""
        return self.model_dump_json(by_alias=True, indent=2) + "\n"


def sidecar_from_dict(data: Any, source: str | os.PathLike) -> MapSidecar:
    """Validate a parsed sidecar; a wrong format tag or a bad field is a UserError naming `source`."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a map sidecar must be a JSON object, got {type(data).__name__}")
    if data.get("format") != MAP_FORMAT:
        raise UserError(f"{source}: not a medssl map sidecar (format {data.get('format')!r}, "
                        f"expected {MAP_FORMAT!r})")
    try:
        return MapSidecar.model_validate(data)
    except ValidationError as err:
        raise UserError(f"{source}: invalid map sidecar: {validation_message(err)}") from err


def _as_sidecar(sidecar: MapSidecar | dict, source: Path) -> MapSidecar:
    if isinstance(sidecar, MapSidecar):
        return sidecar
    return sidecar_from_dict(sidecar, source)


def read_sidecar(path: str | os.PathLike) -> MapSidecar:
    """Read a sidecar JSON (of a map or of a not-groundable result)."""
    sidecar = _sidecar_if_present(Path(path))
    if sidecar is None:
        raise UserError(f"{path}: no such sidecar file")
    return sidecar


def _sidecar_if_present(path: Path) -> MapSidecar | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None  # also when a writer removed it between a listing and this read
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read the map sidecar ({one_line(err, with_type=True)})") from err
    return sidecar_from_dict(data, path)


def describe_scale(raw_scale: CosineScale | AttentionScale | ProbabilityScale,
                   rescaling: LinearRescaling | MinMaxRescaling) -> str:
    """One line for a colour bar caption: what the raw values are and how they became [0, 1]."""
    if isinstance(raw_scale, ProbabilityScale):
        return raw_scale.meaning
    if isinstance(raw_scale, CosineScale):
        raw = f"cosine similarity [{raw_scale.range[0]:g}, {raw_scale.range[1]:g}]"
    else:
        raw = f"attention weights (sum to {raw_scale.sums_to:g})"
    lo, hi = rescaling.from_
    if isinstance(rescaling, LinearRescaling):
        how = f"linear [{lo:g}, {hi:g}] -> [{rescaling.to[0]:g}, {rescaling.to[1]:g}]"
    else:
        how = f"min-max [{lo:.3g}, {hi:.3g}] -> [0, 1]"
    return f"{raw}, {how}"


def raw_values(rescaling: LinearRescaling | MinMaxRescaling, values: np.ndarray | float) -> np.ndarray:
    """Invert the rescaling: map values in [0, 1] -> raw values (for read-outs and colour-bar ticks)."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = rescaling.from_
    if isinstance(rescaling, LinearRescaling):
        t0, t1 = rescaling.to
        return lo + (values - t0) / (t1 - t0) * (hi - lo)
    return lo + values * (hi - lo)


# ----------------------------------------------------------------------------------------------- arrays


def map_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """`<stem>`, `<stem>.nii.gz`, `<stem>.nii` or `<stem>.json` -> (NIfTI path, sidecar path).

    The NIfTI is `<stem>.nii` only when given so or when only that file exists; otherwise `<stem>.nii.gz`.
    """
    path = Path(path)
    name = path.name
    lower = name.lower()
    for suffix in (*_NIFTI_SUFFIXES, ".json"):
        if lower.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if not name:
        raise UserError(f"{path}: a map path needs a file name stem")
    stem = path.with_name(name)
    nifti = stem.with_name(name + ".nii.gz")
    if lower.endswith(".nii") or (not nifti.exists() and stem.with_name(name + ".nii").exists()):
        nifti = stem.with_name(name + ".nii")
    return nifti, stem.with_name(name + ".json")


def check_map_array(array: Any, source: str | os.PathLike) -> np.ndarray:
    """A map array: 3D (X, Y, Z), finite, values in [0, 1] -> float32. UserError naming `source` otherwise."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise UserError(f"{source}: a map must be a 3D (X, Y, Z) array, got shape {tuple(array.shape)}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
            or array.dtype == bool):
        raise UserError(f"{source}: a map must hold numbers, got dtype {array.dtype}")
    if array.size == 0:
        raise UserError(f"{source}: the map is empty (shape {tuple(array.shape)})")
    bad = ~np.isfinite(array)
    if bad.any():
        raise UserError(f"{source}: the map has {int(bad.sum())} non-finite (NaN/inf) values")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise UserError(f"{source}: map values must lie in [0, 1], got [{low:g}, {high:g}]")
    return array.astype(np.float32, copy=False)


def check_affine(affine: Any, source: str | os.PathLike) -> np.ndarray:
    """A (4, 4) finite, invertible voxel -> RAS+ mm affine as float64."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise UserError(f"{source}: the affine must be a finite (4, 4) matrix, got shape {tuple(affine.shape)}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise UserError(f"{source}: the affine is singular (a voxel axis has zero length)")
    return affine


def check_same_grid(image_shape: tuple[int, ...], image_affine: np.ndarray, map_shape: tuple[int, ...],
                    map_affine: np.ndarray, *, image_name: str = "image", map_name: str = "map") -> None:
    """Refuse to overlay a map whose voxel grid (shape and affine) differs from the image's.

    Affines agree within 1e-3 mm (NIfTI stores them as float32). Resample the map to the image first.
    """
    if tuple(image_shape) != tuple(map_shape):
        raise UserError(f"{map_name}: shape {tuple(map_shape)} does not match the image {image_name} "
                        f"{tuple(image_shape)}; maps must be written on the image's grid")
    if not np.allclose(np.asarray(image_affine, float), np.asarray(map_affine, float), rtol=1e-5,
                       atol=_GRID_ATOL_MM):
        raise UserError(f"{map_name}: affine differs from the image {image_name}'s affine; maps must be "
                        "written on the image's grid (resample the map to the image first)")


def peak(array: np.ndarray, affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Voxel index (i, j, k) of the maximum of a 3D array and its RAS+ position in mm.

    Ties go to the first maximum in C order (numpy argmax). NaNs are refused.
    """
    array = np.asarray(array)
    if array.ndim != 3 or array.size == 0:
        raise UserError(f"array: peak needs a non-empty 3D (X, Y, Z) array, got shape {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise UserError("array: peak needs finite values; the array has NaN/inf")
    voxel = tuple(int(v) for v in np.unravel_index(int(np.argmax(array)), array.shape))
    mm = np.asarray(affine, dtype=np.float64) @ np.array([*voxel, 1.0])
    return voxel, (float(mm[0]), float(mm[1]), float(mm[2]))


def _check_peak(sidecar: MapSidecar, array: np.ndarray, affine: np.ndarray, source: Path) -> None:
    voxel = sidecar.peak_voxel
    if voxel is None or sidecar.peak_mm is None:
        raise UserError(f"{source}: peak_voxel and peak_mm are required for a map")
    if any(not 0 <= v < n for v, n in zip(voxel, array.shape)):
        raise UserError(f"{source}: peak_voxel {list(voxel)} lies outside the map's shape {tuple(array.shape)}")
    if array[voxel] != array.max():
        raise UserError(f"{source}: peak_voxel {list(voxel)} holds {float(array[voxel]):g}, not the map's "
                        f"maximum {float(array.max()):g}")
    mm = affine @ np.array([*voxel, 1.0])
    if not np.allclose(mm[:3], sidecar.peak_mm, atol=_GRID_ATOL_MM * 10):
        raise UserError(f"{source}: peak_mm {list(sidecar.peak_mm)} is not the position of peak_voxel "
                        f"({', '.join(f'{v:.3f}' for v in mm[:3])} mm by the affine)")


# ----------------------------------------------------------------------------------------------- write


def _nifti_with_provenance(array: np.ndarray, affine: np.ndarray, sidecar: MapSidecar) -> nib.Nifti1Image:
    """float32 NIfTI with q/sform "scanner" (as `medssl.data.io.write_volume`) plus the sidecar as a
    code-6 ("comment") header extension. `write_volume` cannot add extensions, hence this helper."""
    img = nib.Nifti1Image(array, affine, dtype=np.float32)
    img.set_qform(affine, code="scanner")
    img.set_sform(affine, code="scanner")
    img.header.extensions.append(nib.nifti1.Nifti1Extension(EXTENSION_CODE, sidecar.to_json().encode("utf-8")))
    return img


def write_map(stem_path: str | os.PathLike, array: np.ndarray, affine: np.ndarray,
              sidecar: MapSidecar | dict) -> tuple[Path, Path]:
    """Write a groundable map: `<stem>.nii.gz` (float32 (X, Y, Z), the image's RAS+ affine, values in
    [0, 1], provenance in a code-6 header extension) and `<stem>.json`. Returns (NIfTI path, sidecar path).

    Refused (UserError): a not-groundable sidecar (use `write_result_json`), an array that is not 3D, has
    NaN/inf or values outside [0, 1], a bad affine, a peak_voxel/peak_mm that is not the array's maximum.
    """
    nifti, sidecar_path = map_paths(stem_path)
    if not str(stem_path).lower().endswith(".nii"):  # writing: .nii.gz unless asked for .nii
        nifti = sidecar_path.with_name(sidecar_path.name[: -len(".json")] + ".nii.gz")
    sidecar = _as_sidecar(sidecar, sidecar_path)
    if not sidecar.groundable:
        raise UserError(f"{sidecar_path}: groundable is false; a not-groundable result is not a map: write "
                        "it with write_result_json")
    array = check_map_array(array, nifti)
    affine = check_affine(affine, nifti)
    _check_peak(sidecar, array, affine, sidecar_path)
    img = _nifti_with_provenance(array, affine, sidecar)
    with atomic_path(sidecar_path) as tmp_json:
        tmp_json.write_text(sidecar.to_json(), encoding="utf-8")
        with atomic_path(nifti) as tmp_nifti:
            nib.save(img, tmp_nifti)
            # both complete: drop the old sidecar so that no instant pairs it with the new NIfTI
            sidecar_path.unlink(missing_ok=True)
        # the NIfTI is in place (inner exit); the sidecar follows on the outer exit
    return nifti, sidecar_path


def write_result_json(path: str | os.PathLike, sidecar: MapSidecar | dict) -> Path:
    """Write a not-groundable result as `<stem>.json` alone (no image). A map NIfTI left at `<stem>`
    by an earlier run is removed first, so that a stale map never pairs with this result."""
    _, sidecar_path = map_paths(path)
    sidecar = _as_sidecar(sidecar, sidecar_path)
    if sidecar.groundable:
        raise UserError(f"{sidecar_path}: groundable is true; a groundable result is a map: write it with "
                        "write_map")
    stem = sidecar_path.name[: -len(".json")]
    for stale in (sidecar_path.with_name(stem + ".nii.gz"), sidecar_path.with_name(stem + ".nii")):
        stale.unlink(missing_ok=True)
    with atomic_path(sidecar_path) as tmp:
        tmp.write_text(sidecar.to_json(), encoding="utf-8")
    return sidecar_path


# ----------------------------------------------------------------------------------------------- read


class LoadedMap(NamedTuple):
    """What `read_map` returns: `array` float32 (X, Y, Z) in [0, 1], `affine` (4, 4) RAS+, `sidecar`."""

    array: np.ndarray
    affine: np.ndarray
    sidecar: MapSidecar


def _read_nifti(nifti: Path) -> tuple[np.ndarray, np.ndarray, MapSidecar | None]:
    """Array, affine and the embedded provenance (None when the header has no medssl extension)."""
    try:
        # one read of the file's bytes: header, extension and voxels come from the same version even if a
        # writer replaces the file meanwhile (nib.load would reopen it by name for the voxels)
        raw = nifti.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        img = nib.Nifti1Image.from_bytes(raw)
        array = np.asarray(img.dataobj)  # reading every voxel detects a truncated file
        extensions = [ext for ext in img.header.extensions if ext.get_code() == EXTENSION_CODE]
        contents = [ext.get_content() for ext in extensions]
    except Exception as err:  # nibabel raises many types (OSError, EOFError, zlib.error, ValueError, ...)
        raise UserError(f"{nifti}: cannot read the map NIfTI ({one_line(err, with_type=True)})") from err
    embedded = None
    for content in contents:
        try:
            data = json.loads(bytes(content).rstrip(b"\x00").decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # some other tool's comment
        if isinstance(data, dict) and data.get("format") == MAP_FORMAT:
            embedded = sidecar_from_dict(data, f"{nifti} (header extension)")
            break
    if array.ndim > 3 and all(n == 1 for n in array.shape[3:]):
        array = array.reshape(array.shape[:3])
    return array, img.affine.astype(np.float64), embedded


def _same(a: MapSidecar, b: MapSidecar) -> bool:
    return a.model_dump(mode="json", by_alias=True) == b.model_dump(mode="json", by_alias=True)


def read_map(path: str | os.PathLike, *, like: Any = None) -> LoadedMap:
    """Read a map written by `write_map` from `<stem>`, `<stem>.nii.gz` or `<stem>.json`.

    The sidecar is used when present, else the provenance embedded in the NIfTI header. With `like` (a
    `Volume` or anything with `.array` and `.affine`) the map must lie on that image's grid.
    UserError (one line naming the file): missing or corrupt files; a sidecar with the wrong format tag;
    a not-groundable result (sidecar without image data); a sidecar that disagrees with the embedded
    provenance; a map that is not 3D, has NaN/inf or values outside [0, 1]; a peak outside the array;
    a shape or affine that differs from `like`.
    """
    nifti, sidecar_path = map_paths(path)
    if not nifti.exists():
        if sidecar_path.exists():
            sidecar = read_sidecar(sidecar_path)
            if not sidecar.groundable:
                raise UserError(f"{sidecar_path}: phrase {sidecar.phrase!r} was judged not groundable (score "
                                f"{sidecar.score:g}, threshold {sidecar.score_threshold:g}): this result has no "
                                "map image")
            raise UserError(f"{nifti}: map image is missing (its sidecar {sidecar_path.name} is there)")
        raise UserError(f"{nifti}: no such map (nor {sidecar_path.name})")
    for attempt in range(_READ_ATTEMPTS):
        array, affine, embedded = _read_nifti(nifti)
        sidecar = _sidecar_if_present(sidecar_path)
        if sidecar is None or embedded is None or _same(sidecar, embedded):
            break
        time.sleep(0.005 * (attempt + 1))  # a writer replacing the pair is between its two renames
        if attempt == _READ_ATTEMPTS - 1:
            raise UserError(f"{sidecar_path}: sidecar does not match the provenance embedded in {nifti.name} "
                            f"(phrase {sidecar.phrase!r} vs {embedded.phrase!r}); the pair is mixed up")
    sidecar = sidecar or embedded
    if sidecar is None:
        raise UserError(f"{nifti}: no sidecar {sidecar_path.name} and no medssl provenance in the NIfTI "
                        "header: not a medssl map")
    source = nifti if sidecar is embedded else sidecar_path
    if not sidecar.groundable:
        raise UserError(f"{source}: groundable is false but a map image exists: stale or mixed-up files")
    array = check_map_array(array, nifti)
    voxel = sidecar.peak_voxel
    if voxel is not None and any(not 0 <= v < n for v, n in zip(voxel, array.shape)):
        raise UserError(f"{source}: peak_voxel {list(voxel)} lies outside the map's shape "
                        f"{tuple(array.shape)}: shape mismatch between sidecar and image")
    if like is not None:
        check_same_grid(np.shape(like.array), like.affine, array.shape, affine,
                        image_name=str(getattr(like, "path", "image")), map_name=str(nifti))
    return LoadedMap(array, affine, sidecar)
