"""The preprocessed volume store: `medssl preprocess` writes it once, training reads crops from it.

Every volume task (pretraining, fine-tuning, grounding) used to read and preprocess its whole split into
RAM before its first step, on every rank. The store does that work once, offline and in parallel, and
training then reads only the region each crop needs: nothing proportional to the number of scans stays
in memory beyond the index (a few numbers per manifest entry).

Layout of a store folder (`data.store`; unset, `medssl preprocess` writes ``<manifest folder>/.medssl-store/<key>``
and training looks there; a training command that finds no current store builds a small cohort's in a
temporary folder for the run, see `ensure_store`):

    store.json          {"format", "key", "preprocessing"}: the settings that shape the stored arrays
                        (modality, spacing, orientation, CT window or MR percentiles, body threshold);
                        `key` hashes them. A store made with other settings is refused, naming the fields.
    index.json          the manifest it indexes (path and sha256) and its entries in columns, split by split
                        (patient_id, study_id, scan), plus a few facts per scan (shape, spacing, body box,
                        body voxel count, label or not): all a training process loads before its first step.
    scans/<id>/         one folder per distinct image (+ label) file pair, complete or absent: written under
                        a temporary name and renamed, so a killed run leaves no half scan (its temporary
                        folder is removed and the scan redone on the next run). <id> hashes the files'
                        paths, sizes and modification times, so a replaced file is preprocessed again.
        image.b2nd      (X, Y, Z) float32: the image after orientation, spacing and intensity scaling
                        (`medssl.data.volumes.preprocessing_steps`), not padded
        body.b2nd       (X, Y, Z) uint8: the body mask (`medssl.data.body.body_mask`)
        label.b2nd      (X, Y, Z) uint8 or uint16: the label map on the image grid (entries with a label)
        scan.json       shape, affine, spacing, body box, body voxels per X plane, label voxels per class,
                        the source files, and a CRC-32 per compressed chunk of each array
        classes.npz     "class_<k>": up to `CLASS_LOCATIONS` voxel indices (n, 3) int32 of class k, evenly
                        spread over its voxels in C order (`spread_locations`), for class-balanced crops

Arrays are Blosc2 NDArrays (LZ4 level 5, byte shuffle: three times faster to read than zstd for 10 % more
disk), chunked in about half the configured crop per axis and blocked in a quarter, so a crop decompresses only
the blocks it covers; every chunk a read touches is checked against its CRC-32, so a corrupt or truncated file
is named instead of read as noise.

Reading API (pretraining, fine-tuning and grounding use only this)::

    store = open_store(path, prep, manifest_path)   # store.json + index.json; refuses other settings / stale
    split = store.split("training")                  # StoreSplit: patient_ids, study_ids, scans (arrays)
    scan = store.scan(split.scans[i], pad_to=prep.crop_size, small_volume=prep.small_volume)
    scan.shape                        # (X, Y, Z) as the in-RAM pipeline had it (zero-padded to the crop size)
    scan.image(lo, hi)                # (hi - lo) float32 region, zeros outside the array; lo, hi (3,) ints
    scan.label(lo, hi)                # int64 region of the label map (0 outside)
    scan.body(lo, hi)                 # bool region of the body mask
    scan.body_box                     # (lo, hi) (3,) float each: first / last body voxel per axis
    scan.body_count, scan.body_voxel(k)   # body voxels; the k-th in C order (3,) int64
    scan.body_points(n, rng)          # (n, 3) int64 body voxels drawn uniformly
    scan.class_counts                 # {class: voxels}; scan.class_locations(k): (n, 3) int64 (<= 10,000)
    scan.affine, scan.spacing, scan.offset   # the unpadded grid's affine; the padding before each axis

`store.scan` keeps at most `OPEN_SCANS` scans open per process (least recently used closed first), so a
DataLoader worker's memory is bounded whatever the number of scans. `task_store` / `ensure_store` are what
training commands call: the store when it is current (found from its index alone), else built on the spot for
a small cohort (`AUTO_BUILD_SCANS`), else one line saying to run `medssl preprocess`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blosc2
import numpy as np
from pydantic import BaseModel, ConfigDict

from medssl.atomic import write_json
from medssl.data import io
from medssl.data.body import DEFAULT_THRESHOLD, body_box, body_mask
from medssl.data.checks import image_problems, labelled_volume_problems, require_patient_independent
from medssl.data.manifest import SPLITS, Manifest, load_manifest
from medssl.data.preprocessing import VolumeDataConfig, VolumePreprocessing, smaller_than_crop
from medssl.errors import UserError, one_line

FORMAT = 1
CLASS_LOCATIONS = 10_000  # voxel locations kept per class and scan
OPEN_SCANS = 32  # scans a process keeps open
AUTO_BUILD_SCANS = 400  # a training command preprocesses a missing store itself up to this many scans
ARRAYS = ("image", "body", "label")
_FULL_DISK = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


# ------------------------------------------------------------------------------------------------ keys


def store_settings(prep: VolumePreprocessing) -> dict[str, Any]:
    """The preprocessing fields that shape the stored arrays (crop size and small-volume policy do not:
    padding is applied when reading)."""
    values = prep.to_dict()
    settings = {k: values[k] for k in ("modality", "spacing", "orientation")}
    settings["window" if prep.modality == "CT" else "percentiles"] = values[
        "window" if prep.modality == "CT" else "percentiles"]
    return {**settings, "body_threshold": DEFAULT_THRESHOLD, "format": FORMAT}


def store_key(prep: VolumePreprocessing) -> str:
    """16 hex digits naming `store_settings(prep)`."""
    return hashlib.sha256(json.dumps(store_settings(prep), sort_keys=True).encode()).hexdigest()[:16]


def default_store_path(manifest_path: str | os.PathLike, prep: VolumePreprocessing) -> Path:
    """Where a store lives when `data.store` is unset: beside the manifest, one folder per preprocessing."""
    return Path(manifest_path).resolve().parent / ".medssl-store" / store_key(prep)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _scan_id(image: str, label: str | None) -> str:
    """Hash of the files' paths, sizes and modification times; UserError naming a missing file."""
    parts = []
    for path in (image, label):
        if path is None:
            parts.append(None)
            continue
        try:
            info = os.stat(path)
        except OSError as err:
            raise UserError(f"{path}: cannot read ({err.strerror or one_line(err)})") from None
        parts.append([str(path), info.st_size, info.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class StoreSplit:
    """One split's entries in manifest order: (N,) arrays of patient ids, study ids (fixed-width strings: no
    Python object per entry) and the row of each entry's scan in the store's per-scan arrays."""

    name: str
    patient_ids: np.ndarray
    study_ids: np.ndarray
    rows: np.ndarray
    scan_ids: list[str]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def scans(self) -> np.ndarray:
        """(N,) the entries' scan ids."""
        return np.asarray(self.scan_ids, dtype=str)[self.rows] if len(self.rows) else np.zeros(0, str)

    def where(self, i: int) -> str:
        return f"{self.name}[{i}]"


class VolumeStore:
    """An opened store (see the module docstring): its settings, index and scans, opened lazily."""

    def __init__(self, root: Path, settings: dict[str, Any], index: dict[str, Any]) -> None:
        self.root, self.settings = root, settings
        self.manifest = index["manifest"]
        self.manifest_modality = index.get("modality")
        scans = index["scans"]
        self.scan_ids = list(scans["id"])
        self._row = {scan: k for k, scan in enumerate(self.scan_ids)}
        self._splits = {name: self._columns(columns) for name, columns in index["splits"].items()}
        self.shapes = np.asarray(scans["shape"], np.int64).reshape(-1, 3)
        self.spacings = np.asarray(scans["spacing"], float).reshape(-1, 3)
        self.boxes = np.asarray(scans["body_box"], float).reshape(-1, 2, 3)
        self.body_counts = np.asarray(scans["body_count"], np.int64)
        self.images = list(scans["image"])
        self._open: OrderedDict[tuple, StoredScan] = OrderedDict()
        self.temporary: TemporaryFolder | None = None  # the folder of a store built for one run only

    def _columns(self, columns: dict[str, list]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """An index split's columns as (patient ids, study ids, scan rows) arrays."""
        ids, inverse = np.unique(np.asarray(columns["scan"], dtype=str), return_inverse=True)
        rows = np.array([self._row[scan] for scan in ids.tolist()], np.int64)[inverse.reshape(-1)]
        return np.asarray(columns["patient_id"], dtype=str), np.asarray(columns["study_id"], dtype=str), rows

    def split(self, name: str) -> StoreSplit:
        patients, studies, rows = self._splits.get(name, (np.zeros(0, str), np.zeros(0, str), np.zeros(0, np.int64)))
        return StoreSplit(name, patients, studies, rows, self.scan_ids)

    def shared_patients(self) -> dict[str, list[str]]:
        """Split name -> its patients that are also in another split (for
        `medssl.data.checks.patient_split_problems`; empty lists when the splits are patient-independent)."""
        unique = {name: np.unique(patients) for name, (patients, _, _) in self._splits.items()}
        pooled, counts = np.unique(np.concatenate([*unique.values(), np.zeros(0, str)]), return_counts=True)
        shared = pooled[counts > 1]
        return {name: [str(p) for p in patients[np.isin(patients, shared)]] for name, patients in unique.items()}

    def row(self, scan: str) -> int:
        """The scan's row in the per-scan arrays (`shapes`, `boxes`, `body_counts`, ...)."""
        return self._row[scan]

    def scan(self, scan: str, *, pad_to: Sequence[int] | None = None, small_volume: str = "pad") -> StoredScan:
        """The scan `scan` (an id of `split(...).scans`), zero-padded (centred) to at least `pad_to` per axis
        as the in-RAM pipeline pads (``small_volume="pad"``) or refused naming its file (``"error"``)."""
        key = (scan, None if pad_to is None else tuple(int(c) for c in pad_to), small_volume)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        opened = StoredScan(self, scan, pad_to, small_volume)
        self._open[key] = opened
        while len(self._open) > OPEN_SCANS:
            self._open.popitem(last=False)
        return opened

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker opens its own files
        return {**self.__dict__, "_open": OrderedDict()}


class StoredScan:
    """One preprocessed scan of a store, read a region at a time (see the module docstring)."""

    def __init__(self, store: VolumeStore, scan: str, pad_to: Sequence[int] | None, small_volume: str) -> None:
        self.folder = store.root / "scans" / scan
        self.name = store.images[store.row(scan)]
        meta_path = self.folder / "scan.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"{meta_path}: unreadable store entry ({one_line(err)}); run medssl preprocess "
                            "again (it redoes broken scans)") from None
        self.meta = meta
        self.stored_shape = tuple(int(s) for s in meta["shape"])
        size = self.stored_shape if pad_to is None else tuple(int(c) for c in pad_to)
        short = [max(0, c - s) for s, c in zip(self.stored_shape, size)]
        if any(short) and small_volume == "error":
            raise smaller_than_crop(self.name, self.stored_shape, size, resampled=True)
        self.offset = np.array([n // 2 for n in short], np.int64)
        self.shape = tuple(s + n for s, n in zip(self.stored_shape, short))
        self.affine = np.asarray(meta["affine"], float)
        self.spacing = tuple(float(s) for s in meta["spacing"])
        lo, hi = meta["body_box"]
        self.body_box = (np.asarray(lo, float) + self.offset, np.asarray(hi, float) + self.offset)
        self._planes = np.cumsum(np.asarray(meta["body_per_plane"], np.int64))
        self.body_count = int(self._planes[-1]) if len(self._planes) else 0
        self.class_counts = {int(k): int(v) for k, v in meta.get("class_counts", {}).items()}
        self._arrays: dict[str, Any] = {}

    # -- arrays
    def _array(self, name: str) -> Any:
        if name not in self._arrays:
            path = self.folder / f"{name}.b2nd"
            if name not in self.meta["crc"]:
                raise UserError(f"{self.folder}: the store holds no {name} for {self.name}")
            try:
                self._arrays[name] = blosc2.open(str(path), mode="r", dparams=blosc2.DParams(nthreads=1))
            except (RuntimeError, OSError, ValueError) as err:
                raise UserError(f"{path}: corrupt or truncated store file ({one_line(err)}); run medssl "
                                "preprocess again to rewrite it") from None
            if tuple(self._arrays[name].shape) != self.stored_shape:
                raise UserError(f"{path}: shape {tuple(self._arrays[name].shape)} where the store's index says "
                                f"{self.stored_shape}; run medssl preprocess again to rewrite it")
        return self._arrays[name]

    def _read(self, name: str, lo: Sequence[int], hi: Sequence[int], dtype: Any) -> np.ndarray:
        """The (hi - lo) region of array `name` in padded coordinates, zeros outside the stored array."""
        lo = np.asarray(lo, np.int64) - self.offset
        hi = np.asarray(hi, np.int64) - self.offset
        out = np.zeros(np.maximum(hi - lo, 0), dtype)
        a, b = np.maximum(lo, 0), np.minimum(hi, self.stored_shape)
        if np.any(a >= b):
            return out
        array = self._array(name)
        self._verify(name, array, a, b)
        try:
            region = array[tuple(slice(int(x), int(y)) for x, y in zip(a, b))]
        except (RuntimeError, ValueError) as err:
            raise UserError(f"{self.folder / name}.b2nd: corrupt store file ({one_line(err)}); run medssl "
                            "preprocess again to rewrite it") from None
        out[tuple(slice(int(x), int(y)) for x, y in zip(a - lo, b - lo))] = region
        return out

    def _verify(self, name: str, array: Any, lo: np.ndarray, hi: np.ndarray) -> None:
        """Check the CRC-32 of every compressed chunk the box [lo, hi) touches."""
        chunks = np.asarray(array.chunks)
        grid = -(-np.asarray(self.stored_shape) // chunks)
        first, last = lo // chunks, (hi - 1) // chunks
        crcs = self.meta["crc"][name]
        for i in range(first[0], last[0] + 1):
            for j in range(first[1], last[1] + 1):
                for k in range(first[2], last[2] + 1):
                    n = int((i * grid[1] + j) * grid[2] + k)
                    try:
                        ok = zlib.crc32(array.schunk.get_chunk(n)) == crcs[n]
                    except (RuntimeError, IndexError, ValueError):
                        ok = False
                    if not ok:
                        raise UserError(f"{self.folder / name}.b2nd: chunk {n} is corrupt (checksum mismatch); "
                                        "run medssl preprocess again to rewrite this scan")

    def image(self, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
        """(hi - lo) float32 image region (zeros outside the array)."""
        return self._read("image", lo, hi, np.float32)

    def label(self, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
        """(hi - lo) int64 label region (0 outside the array)."""
        return self._read("label", lo, hi, np.int64)

    def body(self, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
        """(hi - lo) bool body-mask region."""
        return self._read("body", lo, hi, bool)

    # -- points
    def body_voxel(self, k: int) -> np.ndarray:
        """(3,) int64: the `k`-th body voxel in C order of the (padded) array (as `np.flatnonzero` counts)."""
        x = int(np.searchsorted(self._planes, k, side="right"))
        before = int(self._planes[x - 1]) if x else 0
        stored = self.offset + [x, 0, 0]
        plane = self._read("body", stored, stored + [1, *self.stored_shape[1:]], bool)[0]
        y, z = np.unravel_index(np.flatnonzero(plane)[k - before], plane.shape)
        return np.array([x, y, z], np.int64) + self.offset

    def body_points(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, 3) int64 body voxels drawn uniformly (with replacement)."""
        return np.stack([self.body_voxel(int(k)) for k in rng.integers(self.body_count, size=n)])

    def class_locations(self, value: int) -> np.ndarray:
        """(n, 3) int64 voxels of class `value` (all of them, or `CLASS_LOCATIONS` evenly spread over them)."""
        path = self.folder / "classes.npz"
        try:
            with np.load(path) as stored:
                found = stored[f"class_{value}"] if f"class_{value}" in stored.files else np.zeros((0, 3), np.int32)
        except (OSError, ValueError, zlib.error) as err:
            raise UserError(f"{path}: corrupt store file ({one_line(err)}); run medssl preprocess again") from None
        return found.astype(np.int64) + self.offset


def open_store(root: str | os.PathLike, prep: VolumePreprocessing, manifest_path: str | os.PathLike | None = None,
               *, field: str = "data.store") -> VolumeStore:
    """Open the store at `root` made with `prep`'s settings (for `manifest_path`, when given, which must be the
    manifest it indexes, unchanged). UserError naming the store: missing, a file, other settings, stale."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"{field}: {root} is a file, not a store folder")
    meta_path, index_path = root / "store.json", root / "index.json"
    if not index_path.is_file():
        raise UserError(f"{field}: no preprocessed store at {root}; run medssl preprocess -c CONFIG first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{field}: {root}: unreadable store.json / index.json ({one_line(err)})") from None
    _check_settings(root, meta, prep, field)
    if manifest_path is not None:
        manifest_path = Path(manifest_path).resolve()
        if index.get("manifest") != str(manifest_path):
            raise StaleStore(f"{field}: {root} indexes {index.get('manifest')}, not {manifest_path}; run medssl "
                             "preprocess -c CONFIG for this manifest (or use another data.store)")
        if index.get("manifest_sha256") != _sha256(manifest_path):
            raise StaleStore(f"{field}: {root} is stale: {manifest_path} changed since it was preprocessed; run "
                            "medssl preprocess -c CONFIG again (it redoes only what changed)")
    return VolumeStore(root, meta["preprocessing"], index)


class StaleStore(UserError):
    """The store indexes another manifest, or an older version of its manifest."""


def _check_settings(root: Path, meta: dict[str, Any], prep: VolumePreprocessing, field: str) -> None:
    ours = store_settings(prep)
    theirs = meta.get("preprocessing", {})
    differing = [f"{k} {theirs.get(k)!r} (asked: {v!r})" for k, v in ours.items() if theirs.get(k) != v]
    if differing:
        raise UserError(f"{field}: {root} was preprocessed with other settings: {'; '.join(differing)}; use another "
                        "data.store (or leave it unset: one store per preprocessing) or delete that folder")


def store_path(data: Any, prep: VolumePreprocessing) -> Path:
    """`data.store` when set, else the default beside the manifest (`default_store_path`)."""
    return Path(data.store) if data.store is not None else default_store_path(data.manifest, prep)


def task_store(data: VolumeDataConfig, *, quiet: bool = False) -> tuple[VolumeStore, VolumePreprocessing]:
    """The store of a task's `data` section and the preprocessing it stands for (the modality, when
    `data.modality` is unset, is the manifest's). A current store is found from its index alone, without
    parsing the manifest (only its bytes are hashed), so a training process's start costs the same whatever
    the manifest's size; otherwise `ensure_store` (built here for a small cohort)."""
    for modality in ([None] if data.modality else ["CT", "MR"]):
        prep = data.preprocessing(modality)
        root = store_path(data, prep)
        if not (root / "index.json").is_file() or _stored_key(root) != store_key(prep):
            continue
        try:
            store = open_store(root, prep, data.manifest)
        except StaleStore:
            continue
        if data.modality or (store.manifest_modality or "CT").upper() == modality:
            return store, prep
    manifest = load_manifest(data.manifest)
    prep = data.preprocessing(manifest.modality.get("0"))
    return ensure_store(data, prep, manifest, quiet=quiet), prep


def _stored_key(root: Path) -> str | None:
    try:
        return json.loads((root / "store.json").read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def ensure_store(data: Any, prep: VolumePreprocessing, manifest: Manifest | None = None, *,
                 quiet: bool = False) -> VolumeStore:
    """The store of a task's `data` section (`VolumeDataConfig`) for `prep`, opened when current. Otherwise, for
    a manifest of at most `AUTO_BUILD_SCANS` volume entries, built here: at `data.store` when it is set, else in
    a temporary folder that lives as long as the returned store (so a small experiment writes nothing beside its
    data; `medssl preprocess` keeps one there for later runs). Otherwise UserError saying to run
    `medssl preprocess`."""
    root = store_path(data, prep)
    if root.exists() and not root.is_dir():
        raise UserError(f"data.store: {root} is a file, not a store folder")
    if (root / "index.json").is_file():
        try:
            return open_store(root, prep, data.manifest)
        except StaleStore:
            if data.store is not None:
                raise
    manifest = manifest if manifest is not None else load_manifest(data.manifest)
    count = sum(1 for _, entry in manifest.entries() if entry.image)
    if count > AUTO_BUILD_SCANS:
        asked = data.preprocessing(manifest.modality.get("0")).to_dict()
        hint = " ".join(f"data.{k}={json.dumps(v).replace(' ', '')}" for k, v in prep.to_dict().items()
                        if asked.get(k) != v and k in store_settings(prep))
        raise UserError(f"data.store: {root} is missing or stale for {data.manifest} ({count} volumes); run medssl "
                        f"preprocess -c CONFIG{' ' + hint if hint else ''} (parallel with --workers, resumable) "
                        "before training")
    if data.store is None:
        folder = TemporaryFolder("medssl-store-")
        root = folder.path
        quiet = True
    preprocess(data.manifest, root, prep, workers=1, quiet=quiet, manifest=manifest)
    store = open_store(root, prep, data.manifest)
    if data.store is None:
        store.temporary = folder  # removed with the store
    return store


class TemporaryFolder:
    """A fresh temporary folder, removed when this object is collected or at exit, by the process that made it
    only (a forked DataLoader worker's copy never removes it)."""

    def __init__(self, prefix: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        weakref.finalize(self, _remove_folder, str(self.path), os.getpid())


def _remove_folder(folder: str, owner: int) -> None:
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ writing


class PreprocessConfig(BaseModel):
    """What `medssl preprocess` reads of a volume task's config: its `data` section (other sections ignored)."""

    model_config = ConfigDict(extra="ignore")
    data: VolumeDataConfig


def preprocess_data(data: VolumeDataConfig, *, workers: int = 1, quiet: bool = False) -> dict[str, Any]:
    """`preprocess` for a task's `data` section: its manifest, its store (`store_path`), its preprocessing."""
    manifest = load_manifest(data.manifest)
    prep = data.preprocessing(manifest.modality.get("0"))
    return preprocess(data.manifest, store_path(data, prep), prep, workers=workers, quiet=quiet, manifest=manifest)


@dataclass
class _Job:
    scan: str
    image: str
    label: str | None
    where: str
    chunks: tuple[int, int, int]


def preprocess(manifest_path: str | os.PathLike, root: str | os.PathLike, prep: VolumePreprocessing, *,
               workers: int = 1, quiet: bool = False, manifest: Manifest | None = None) -> dict[str, Any]:
    """Write (or complete) the store at `root` for every volume entry of the manifest; returns counts.

    Resumable: scans already complete are kept, partial ones (temporary folders) removed and redone. Every
    scan is checked (NaN/inf, constant, voxel size, label grid and values, an empty body); failures are
    collected and reported in one UserError after the others are written, and the index is then not written.
    """
    manifest_path = Path(manifest_path).resolve()
    root = Path(root)
    manifest = manifest if manifest is not None else load_manifest(manifest_path)
    require_patient_independent(manifest, SPLITS, str(manifest_path))
    if root.exists() and not root.is_dir():
        raise UserError(f"data.store: {root} is a file, not a store folder")
    if (root / "store.json").is_file():
        try:
            meta = json.loads((root / "store.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"data.store: {root / 'store.json'}: unreadable ({one_line(err)})") from None
        _check_settings(root, meta, prep, "data.store")
    elif root.is_dir() and any(p.name != "scans" for p in root.iterdir()):
        raise UserError(f"data.store: {root} is a folder that is not a medssl store; name an empty or new folder")
    try:
        (root / "scans").mkdir(parents=True, exist_ok=True)
        write_json(root / "store.json", {"format": FORMAT, "key": store_key(prep),
                                         "preprocessing": store_settings(prep)})
    except OSError as err:
        raise _write_error(root, err) from None
    for stale in (root / "scans").glob(".tmp-*"):  # a killed run's partial scans
        shutil.rmtree(stale, ignore_errors=True)
    declared = sorted(int(k) for k in manifest.labels) if manifest.labels else None
    chunks = tuple(max(16, c // 2) for c in prep.crop_size)
    splits: dict[str, dict[str, list]] = {}
    jobs: dict[str, _Job] = {}
    for split in SPLITS:
        columns = {"patient_id": [], "study_id": [], "scan": []}
        for i, entry in enumerate(manifest.split(split)):
            if not entry.image:
                continue
            image = str(manifest.path(entry.image))
            label = str(manifest.path(entry.label)) if entry.label else None
            scan = _scan_id(image, label)
            jobs.setdefault(scan, _Job(scan, image, label, f"{split}[{i}]", chunks))
            columns["patient_id"].append(entry.patient_id)
            columns["study_id"].append(entry.study_id or "")
            columns["scan"].append(scan)
        splits[split] = columns
    todo = [job for job in jobs.values() if not (root / "scans" / job.scan / "scan.json").is_file()]
    failures = _run_jobs(todo, root, prep, declared, workers, quiet)
    if failures:
        shown = "; ".join(failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")
        raise UserError(f"preprocess: {len(failures)} of {len(jobs)} scan(s) failed their checks (fix or drop them; "
                        f"medssl preprocess keeps the others and redoes only these): {shown}")
    facts = {"id": [], "image": [], "shape": [], "spacing": [], "body_box": [], "body_count": [], "label": []}
    for job in jobs.values():
        meta = json.loads((root / "scans" / job.scan / "scan.json").read_text(encoding="utf-8"))
        facts["id"].append(job.scan)
        facts["image"].append(job.image)
        facts["shape"].append(meta["shape"])
        facts["spacing"].append(meta["spacing"])
        facts["body_box"].append(meta["body_box"])
        facts["body_count"].append(int(sum(meta["body_per_plane"])))
        facts["label"].append(job.label is not None)
    try:
        write_json(root / "index.json", {"format": FORMAT, "manifest": str(manifest_path),
                                         "manifest_sha256": _sha256(manifest_path),
                                         "modality": manifest.modality.get("0"), "splits": splits,
                                         "scans": facts})
    except OSError as err:
        raise _write_error(root, err) from None
    return {"scans": len(jobs), "written": len(todo), "kept": len(jobs) - len(todo), "store": str(root)}


def _run_jobs(todo: list[_Job], root: Path, prep: VolumePreprocessing, declared: list[int] | None, workers: int,
              quiet: bool) -> list[str]:
    """Write every job's scan (in `workers` processes); returns the failures' one-line messages."""
    from tqdm.auto import tqdm

    failures: list[str] = []
    bar = tqdm(total=len(todo), desc="preprocess", unit="scan", disable=quiet or not todo, dynamic_ncols=True)
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            failure = _write_scan(job, root, prep, declared)
            if failure:
                failures.append(failure)
            bar.update(1)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # forkserver: the modules are imported once, in the server, and no OpenMP state of this process is copied
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["medssl.data.volumes", "medssl.data.store"])
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_one_thread) as pool:
            futures = [pool.submit(_write_scan, job, root, prep, declared) for job in todo]
            try:
                for future in as_completed(futures):
                    failure = future.result()
                    if failure:
                        failures.append(failure)
                    bar.update(1)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    bar.close()
    disk = [f for f in failures if f.startswith("\0")]
    if disk:  # a full disk is not a scan's fault: stop with it alone
        raise UserError(disk[0][1:])
    return failures


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _write_error(root: Path, err: OSError) -> UserError:
    if err.errno in _FULL_DISK:
        return UserError(f"data.store: {root}: disk full while writing ({err.strerror}); free space and run medssl "
                         "preprocess again (finished scans are kept)")
    return UserError(f"data.store: {root}: cannot write ({err.strerror or one_line(err)})")


def _write_scan(job: _Job, root: Path, prep: VolumePreprocessing, declared: list[int] | None) -> str | None:
    """Preprocess, check and write one scan under a temporary folder, renamed when complete. Returns None, a
    one-line failure, or a disk-full message prefixed with NUL."""
    blosc2.set_nthreads(1)
    tmp = root / "scans" / f".tmp-{job.scan}-{os.getpid()}"
    try:
        arrays, meta, locations = _prepare_scan(job, prep, declared)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta["crc"] = {}
        for name, array in arrays.items():
            meta["crc"][name] = _write_array(tmp / f"{name}.b2nd", array, job.chunks)
        if locations is not None:
            with open(tmp / "classes.npz", "wb") as handle:
                np.savez(handle, **locations)
        (tmp / "scan.json").write_text(json.dumps(meta), encoding="utf-8")
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        final = root / "scans" / job.scan
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return None
    except UserError as err:
        return str(err)
    except OSError as err:
        if err.errno in _FULL_DISK:
            return "\0" + str(_write_error(root, err))
        return f"{job.image}: {job.where}: cannot store ({err.strerror or one_line(err)})"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_array(path: Path, array: np.ndarray, chunks: Sequence[int]) -> list[int]:
    """Compress `array` into a Blosc2 frame file at `path`; returns the CRC-32 of each compressed chunk."""
    chunks = tuple(min(c, s) for c, s in zip(chunks, array.shape))
    blocks = tuple(max(1, c // 2) for c in chunks)
    cparams = blosc2.CParams(codec=blosc2.Codec.LZ4, clevel=5, typesize=array.dtype.itemsize, nthreads=1)
    frame = blosc2.asarray(np.ascontiguousarray(array), chunks=chunks, blocks=blocks, cparams=cparams).to_cframe()
    stored = blosc2.ndarray_from_cframe(frame)  # the chunks as the file holds them (the frame re-encodes some)
    crcs = [zlib.crc32(stored.schunk.get_chunk(n)) for n in range(stored.schunk.nchunks)]
    with open(path, "wb") as handle:
        handle.write(frame)
    return crcs


def spread_locations(flat: np.ndarray, limit: int = CLASS_LOCATIONS) -> np.ndarray:
    """At most `limit` of the sorted flat voxel indices `flat`, evenly spread over them (all of them when fewer):
    the class locations a store keeps (the same whether a volume is padded or not)."""
    if len(flat) <= limit:
        return flat
    return flat[np.linspace(0, len(flat) - 1, limit).round().astype(np.int64)]


def _prepare_scan(job: _Job, prep: VolumePreprocessing, declared: list[int] | None
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, np.ndarray] | None]:
    """Read, check and preprocess one entry: (arrays, scan.json content, class locations or None)."""
    from medssl.data.checks import raise_first
    from medssl.data.volumes import LoadVolumed, VolumePipeline, preprocessing_steps

    image = io.read_volume(job.image)
    problems = image_problems(image, job.where)
    label = None
    if job.label is not None:
        label = io.read_volume(job.label, label=True)
        problems += labelled_volume_problems(image, label, declared, job.where)
    raise_first(problems)
    keys = ["image"] if label is None else ["image", "label"]
    load = LoadVolumed(keys)
    item = {"image": load.from_volume(image)}
    if label is not None:
        item["label"] = load.from_volume(label)
    item = VolumePipeline(preprocessing_steps(prep, keys))(item)
    values = item["image"].as_tensor()[0].numpy().astype(np.float32, copy=False)
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise UserError(f"{job.image}: {job.where}: {bad} NaN/inf voxel(s) after preprocessing; fix or drop the "
                        "volume (medssl manifest check lists every such file)")
    if values.size and values.max() == values.min():
        raise UserError(f"{job.image}: {job.where}: constant after preprocessing (every voxel "
                        f"{float(values.max()):g}): nothing to learn from; check its intensities and data.window / "
                        "data.modality")
    mask = body_mask(values)
    if not mask.any():
        raise UserError(f"{job.image}: {job.where}: no body voxel above intensity {DEFAULT_THRESHOLD} after "
                        "windowing (empty or constant volume?)")
    lo, hi = body_box(mask)
    meta: dict[str, Any] = {
        "shape": list(values.shape), "affine": np.asarray(item["image"].affine, float).tolist(),
        "spacing": [float(s) for s in item["image"].pixdim[:3]], "body_box": [lo.tolist(), hi.tolist()],
        "body_per_plane": mask.sum(axis=(1, 2)).tolist(), "image": job.image, "label": job.label,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    arrays = {"image": values, "body": mask.view(np.uint8)}
    locations = None
    if label is not None:
        labels = np.rint(item["label"].as_tensor()[0].numpy()).astype(np.int64)
        dtype = np.uint8 if labels.max() < 256 else np.uint16
        arrays["label"] = labels.astype(dtype)
        counts = np.bincount(labels.ravel())
        meta["class_counts"] = {str(k): int(n) for k, n in enumerate(counts) if n}
        flat_labels = labels.ravel()
        locations = {}
        for value in meta["class_counts"]:
            where = spread_locations(np.flatnonzero(flat_labels == int(value)))
            locations[f"class_{value}"] = np.stack(np.unravel_index(where, labels.shape), 1).astype(np.int32)
    return arrays, meta, locations

