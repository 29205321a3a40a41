"""What the app reads and writes, as plain functions: its data folders, the cases it lists, uploads,
volumes, masks for region statistics, map exports and the review table's place.

Data folders ("roots"). The app reads files only under its roots: the run directories and `--data-root`
folders it was started with, plus the folders those run directories name themselves: the manifest's
folder of a grounding run (`RUN/config.yaml` `data.manifest`) and the image's folder of a `medssl ground
infer` output (`OUT/results.json` `image`, and the folder of its `checkpoint`). Every file path, also the
ones a manifest lists, goes through `medssl.app.paths.resolve_under`, so `..`, absolute paths and
symbolic links cannot lead outside them.
Uploads are written by the app into its own temporary folder.

No streamlit here: `medssl/viewer/app.py` lays out widgets and calls these functions.
"""

from __future__ import annotations

import hashlib
import io as bytesio
import json
import os
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import yaml

from medssl.data import io
from medssl.errors import UserError, one_line
from medssl.explain.maps import MapSidecar, write_map
from medssl.text.query import MAX_PHRASE_CHARS
from medssl.text.statements import Statement, split_statements
from medssl.app import paths, review
from medssl.display.slicing import DisplayGrid, display_grid
from medssl.display.windowing import CT_PRESETS, MR_PERCENTILE_PRESETS, Window, percentile_window

APP_SCRIPT = Path(__file__).with_name("app.py")
UPLOAD_LIMIT_MB = paths.UPLOAD_LIMIT_BYTES // 2**20  # Streamlit's server.maxUploadSize is in MB
ZIP_SUFFIXES = (".zip",)
ZIP_MAX_FILES = 5000
REVIEW_NAME = "review.csv"
EXPORT_FOLDER = "exports"
TIMESERIES_KINDS = ("pretrain-timeseries", "finetune-timeseries")
_SCAN_DEPTH = 3  # folders below a root searched for runs, manifests and checkpoints
ANATOMY_AUTO_VOXELS = 2**24  # the organ head's regions are computed unasked only up to a 256^3 volume


# ----------------------------------------------------------------------------------------------- start-up


def parse_app_args(argv: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """The script's own arguments (after `streamlit run app.py --`): `--run DIR` and `--data-root DIR`,
    each any number of times -> (run directories, data roots)."""
    runs: list[Path] = []
    roots: list[Path] = []
    argv = list(argv)
    while argv:
        flag = argv.pop(0)
        if flag not in ("--run", "--data-root") or not argv:
            raise UserError(f"app arguments: expected --run DIR or --data-root DIR, got {flag!r}")
        (runs if flag == "--run" else roots).append(Path(argv.pop(0)))
    return runs, roots


def check_folders(runs: Sequence[os.PathLike], data_roots: Sequence[os.PathLike]) -> None:
    """UserError (one line) for a run directory or data root that is not an existing folder, or for none at all."""
    if not runs and not data_roots:
        raise UserError("give a run directory (medssl app RUN_DIR) or a data folder (--data-root DIR)")
    for what, folders in (("run directory", runs), ("--data-root", data_roots)):
        for folder in folders:
            if not Path(folder).is_dir():
                raise UserError(f"{folder}: {what} is not an existing folder")


def streamlit_command(runs: Sequence[os.PathLike], data_roots: Sequence[os.PathLike], *, port: int,
                      address: str = "127.0.0.1") -> list[str]:
    """`python -m streamlit run` on the packaged app, listening on `address:port` (loopback by default),
    headless, uploads capped at `paths.UPLOAD_LIMIT_BYTES`, with the folders as the script's arguments."""
    if not 0 < int(port) < 65536:
        raise UserError(f"--port: {port} is not a TCP port (1-65535)")
    script_args = [arg for run in runs for arg in ("--run", str(Path(run).resolve()))]
    script_args += [arg for root in data_roots for arg in ("--data-root", str(Path(root).resolve()))]
    return [sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT), "--server.address", address,
            "--server.port", str(int(port)), "--server.headless", "true",
            "--server.maxUploadSize", str(UPLOAD_LIMIT_MB), "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--theme.base", "dark", "--client.toolbarMode", "viewer",
            "--", *script_args]


# ----------------------------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Root:
    """A folder the app may read, and why."""

    path: Path
    why: str


@dataclass
class InferOutput:
    """A folder written by `medssl ground infer -o OUT`: the image, the checkpoint and one row per phrase."""

    folder: Path
    image: Path
    checkpoint: Path
    rows: list[dict]
    warnings: list[str]


@dataclass
class Library:
    """Everything the app found under its roots. `problems`: one line per thing it could not use."""

    roots: list[Root]
    runs: list[Path]
    grounding_runs: dict[Path, Path | None] = field(default_factory=dict)  # run folder -> its manifest (or None)
    infer_outputs: list[InferOutput] = field(default_factory=list)
    manifests: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)  # grounding models (grounding.pt)
    timeseries: list[tuple[Path, str]] = field(default_factory=list)  # (checkpoint, kind)
    problems: list[str] = field(default_factory=list)

    @property
    def root_paths(self) -> list[Path]:
        return [root.path for root in self.roots]

    def resolve(self, user_path: str | os.PathLike) -> Path:
        """A path under the roots (relative to the first root that has it, or absolute); UserError otherwise."""
        return paths.resolve_under(self.root_paths, str(user_path))

    def shown(self, text: str) -> str:
        """`text` with every data folder written as its name (`hospital/vol/P001.nii.gz`), so messages name files
        relative to the data folders and never show the server's full paths."""
        for root in sorted(self.roots, key=lambda r: -len(str(r.path))):
            text = text.replace(str(root.path) + os.sep, root.path.name + "/").replace(str(root.path),
                                                                                        root.path.name)
        return text

    def review_folder(self, checkpoint: str | os.PathLike | None) -> Path | None:
        """Where the review table and exports go: the grounding run of `checkpoint` (a run directory given or
        found under a data root), else the first run directory given, else None."""
        if checkpoint is not None:
            folder = Path(checkpoint).resolve().parent
            if folder in self.grounding_runs or any(folder == Path(run).resolve() for run in self.runs):
                return folder
        for run in self.runs:
            if (Path(run) / "grounding.pt").is_file() or (Path(run) / "results.json").is_file():
                return Path(run).resolve()
        return Path(self.runs[0]).resolve() if self.runs else None


def _config_manifest(run: Path) -> Path | None:
    config = run / "config.yaml"
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"{config}: cannot read the run's config ({one_line(err, with_type=True)})") from None
    value = (data or {}).get("data", {}).get("manifest") if isinstance(data, dict) else None
    if not value:
        return None
    manifest = Path(value)
    candidates = [manifest] if manifest.is_absolute() else [Path.cwd() / manifest, run / manifest]
    for candidate in candidates:
        if candidate.is_file():
            return Path(os.path.abspath(candidate))
    raise UserError(f"{config}: data.manifest {value} not found; start the app from the folder the run was "
                    "trained in, or give the manifest's folder with --data-root")


def read_infer_output(folder: Path) -> InferOutput:
    """Read `OUT/results.json` of `medssl ground infer`; UserError (one line) for a file that is not one."""
    path = folder / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data["results"]
        image, checkpoint = Path(data["image"]), Path(data["checkpoint"])
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "phrase" in r for r in rows):
            raise ValueError("'results' is not a list of phrases")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: not a medssl ground infer listing ({one_line(err, with_type=True)})") from None
    return InferOutput(folder.resolve(), _listed(folder, image), _listed(folder, checkpoint), rows,
                       list(data.get("warnings") or []))


def _listed(folder: Path, path: Path) -> Path:
    """A path written in `folder/results.json`: absolute as it is, else relative to that folder (so the app may
    start anywhere); a relative path that only exists from the current folder (older listings) is taken from
    there."""
    if path.is_absolute():
        return path
    own = Path(os.path.abspath(folder / path))
    if own.exists() or not Path(os.path.abspath(path)).exists():
        return own
    return Path(os.path.abspath(path))


def _below(root: Path, pattern: str) -> list[Path]:
    found: list[Path] = []
    for depth in range(_SCAN_DEPTH):
        found += sorted(root.glob("/".join(["*"] * depth + [pattern])))
    return found


def _is_manifest(path: Path) -> bool:
    if path.stat().st_size > 64 * 2**20:
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "training" in data and "modality" in data


def checkpoint_kind(path: Path) -> str | None:
    """The `kind` of a medssl checkpoint without reading its tensors (None for anything else)."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a checkpoint: torch raises many types; such a file is simply not listed
        return None
    return payload.get("kind") if isinstance(payload, dict) else None


def discover(runs: Sequence[os.PathLike], data_roots: Sequence[os.PathLike]) -> Library:
    """The roots and what lies under them. A folder that cannot be used is a line in `problems`, not an error."""
    library = Library([], [Path(os.path.abspath(r)) for r in runs])
    for run in library.runs:
        if not run.is_dir():
            library.problems.append(f"{run}: run directory is not an existing folder")
            continue
        library.roots.append(Root(run.resolve(), "run directory"))
    for folder in data_roots:
        folder = Path(os.path.abspath(folder))
        if folder.is_dir():
            library.roots.append(Root(folder.resolve(), "--data-root"))
        else:
            library.problems.append(f"{folder}: --data-root is not an existing folder")
    given = list(library.roots)
    for root in given:
        _scan(library, root)
    for run in library.runs:
        if run.is_dir() and run.resolve() not in library.grounding_runs and not any(
                out.folder == run.resolve() for out in library.infer_outputs):
            library.problems.append(f"{run}: no grounding model (grounding.pt) and no maps (results.json): not a "
                                    "grounding run directory nor a 'medssl ground infer' output")
    return library


def _add_root(library: Library, folder: Path, why: str) -> None:
    folder = folder.resolve()
    if not any(folder == root.path or folder.is_relative_to(root.path) for root in library.roots):
        library.roots.append(Root(folder, why))


def _scan(library: Library, root: Root) -> None:
    for checkpoint in _below(root.path, "grounding.pt"):
        run = checkpoint.parent.resolve()
        if run in library.grounding_runs:
            continue
        library.checkpoints.append(checkpoint.resolve())
        try:
            manifest = _config_manifest(run) if (run / "config.yaml").is_file() else None
        except UserError as err:
            library.problems.append(one_line(err))
            manifest = None
        library.grounding_runs[run] = manifest
        if manifest is not None:
            _add_root(library, manifest.parent, f"manifest named by {run / 'config.yaml'}")
            if manifest not in library.manifests:
                library.manifests.append(manifest)
    for listing in _below(root.path, "results.json"):
        try:
            output = read_infer_output(listing.parent)
        except UserError as err:
            library.problems.append(one_line(err))
            continue
        library.infer_outputs.append(output)
        _add_root(library, output.image if output.image.is_dir() else output.image.parent,
                  f"image named by {listing}")
        if output.checkpoint.is_file():
            _add_root(library, output.checkpoint.parent, f"grounding model named by {listing}")
    for candidate in _below(root.path, "*.json"):
        if (candidate.name != "results.json" and candidate.resolve() not in library.manifests
                and _is_manifest(candidate)):
            library.manifests.append(candidate.resolve())
    for checkpoint in _below(root.path, "checkpoints/last.pt"):
        kind = checkpoint_kind(checkpoint)
        if kind in TIMESERIES_KINDS and all(checkpoint.resolve() != c for c, _ in library.timeseries):
            library.timeseries.append((checkpoint.resolve(), kind))


# ----------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class SignalFile:
    """One recorded trial of the case's patient."""

    path: Path
    format: str
    trial_id: str
    study_id: str | None


@dataclass(frozen=True)
class Case:
    """One volume to look at, with what the app knows about it.

    `rows`: precomputed results of a `ground infer` output (phrase, groundable, score, reason, map path).
    `label_names` / `lesion_names`: value -> name of the label map's and the lesion mask's values.
    """

    key: str
    title: str
    image: Path
    source: str
    patient_id: str | None = None
    study_id: str | None = None
    report: str | None = None
    label: Path | None = None
    label_names: dict[int, str] = field(default_factory=dict)
    lesion_mask: Path | None = None
    lesion_names: dict[int, str] = field(default_factory=dict)
    signals: tuple[SignalFile, ...] = ()
    rows: tuple[dict, ...] = ()
    checkpoint: Path | None = None


def _lesion_names(lesions: Any) -> dict[int, str]:
    names = {}
    for index, lesion in enumerate(lesions if isinstance(lesions, list) else [], start=1):
        if isinstance(lesion, dict):
            where = " ".join(str(lesion.get(k, "")) for k in ("location", "organ")).replace("_", " ").strip()
            kind = lesion.get("kind", "lesion")
            size = f"{lesion['size_mm']} mm " if isinstance(lesion.get("size_mm"), (int, float)) else ""
            names[int(lesion.get("label", index))] = f"lesion {lesion.get('label', index)}: {size}{kind}" + (
                f" ({where})" if where else "")
    return names


def cases_from_manifest(library: Library, manifest_path: Path) -> tuple[list[Case], list[str]]:
    """Every entry with an image (all splits) -> (cases, problems). Files outside the roots are problems."""
    from medssl.data.manifest import load_manifest

    manifest = load_manifest(library.resolve(str(manifest_path)))
    labels = {int(k): v for k, v in (manifest.labels or {}).items()}
    by_patient: dict[str, list[SignalFile]] = {}
    problems: list[str] = []
    for _, entry in manifest.entries():
        for ref in entry.signals:
            try:
                path = _signal_path(library, manifest.path(ref.path), ref.format)
            except UserError as err:
                problems.append(one_line(err))
                continue
            by_patient.setdefault(entry.patient_id, []).append(SignalFile(path, ref.format, ref.trial_id,
                                                                          entry.study_id))
    cases = []
    for split, entry in manifest.entries():
        if not entry.image:
            continue
        try:
            image = library.resolve(str(manifest.path(entry.image)))
            label = library.resolve(str(manifest.path(entry.label))) if entry.label else None
            lesion = library.resolve(str(manifest.path(entry.lesion_mask))) if entry.lesion_mask else None
        except UserError as err:
            problems.append(f"{manifest_path}: {entry.patient_id} {entry.study_id or ''}: {one_line(err)}")
            continue
        own = [s for s in by_patient.get(entry.patient_id, []) if s.study_id == entry.study_id]
        rest = [s for s in by_patient.get(entry.patient_id, []) if s.study_id != entry.study_id]
        study = f" / {entry.study_id}" if entry.study_id else ""
        cases.append(Case(key=f"{manifest_path}::{split}::{entry.patient_id}::{entry.study_id}::{entry.image}",
                          title=f"{entry.patient_id}{study} ({split})", image=image, source=str(manifest_path),
                          patient_id=entry.patient_id, study_id=entry.study_id, report=entry.report, label=label,
                          label_names=labels, lesion_mask=lesion,
                          lesion_names=_lesion_names(getattr(entry, "lesions", None)), signals=tuple(own + rest)))
    return cases, problems


def _signal_path(library: Library, path: Path, format: str) -> Path:
    """A manifest's signal path under the roots (a WFDB record is named without its extension)."""
    if format == "wfdb":
        header = library.resolve(str(path) + ".hea")
        return header.with_suffix("")
    return library.resolve(str(path))


def case_from_infer_output(library: Library, output: InferOutput) -> Case:
    """The image of a `ground infer` output with its phrases and maps (paths checked against the roots)."""
    image = library.resolve(str(output.image))
    rows = []
    for row in output.rows:
        row = {**row, "preprocessing": list(output.warnings)}  # the output's notes on its image, for every phrase
        for key in ("map", "sidecar"):
            if row.get(key):
                row[key] = str(library.resolve(str(output.folder / row[key])))
        rows.append(row)
    report = " ".join(r["phrase"].strip() for r in rows)
    return Case(key=f"infer::{output.folder}", title=f"{output.folder.name}: {image.name}", image=image,
                source=str(output.folder), report=report, rows=tuple(rows), checkpoint=output.checkpoint)


def first_map(case: Case) -> str | None:
    """The phrase a case opens on: the first stored map of a `ground infer` output (what it was opened to see),
    else None."""
    return next((row["phrase"] for row in case.rows if row.get("groundable") and row.get("map")), None)


def other_studies(cases: Sequence[Case], case: Case) -> list[Case]:
    """The same patient's other studies among `cases` (for follow-up side by side), in study order."""
    if case.patient_id is None:
        return []
    return sorted((c for c in cases if c.patient_id == case.patient_id and c.study_id != case.study_id
                   and c.image != case.image), key=lambda c: str(c.study_id))


# THE HOOK for the anatomical matcher of issue #19 (`match_point`, not on main yet): a function
# (from_image, to_image, mm) -> mm. While it is None the follow-up view links the two studies by mm.
ANATOMY_MATCHER: Callable[[Path, Path, tuple[float, float, float]], Sequence[float]] | None = None


def matched_point(from_image: Path, to_image: Path, mm: Sequence[float]) -> tuple[tuple[float, float, float], str]:
    """Where the point `mm` (RAS) of `from_image` lies in `to_image`, and how it was found ("anatomy" through
    `ANATOMY_MATCHER`, else "mm": the same coordinates). The follow-up view calls only this."""
    point = tuple(float(v) for v in mm[:3])
    if ANATOMY_MATCHER is None:
        return point, "mm"
    found = ANATOMY_MATCHER(from_image, to_image, point)
    return (float(found[0]), float(found[1]), float(found[2])), "anatomy"


def case_from_file(path: Path, source: str) -> Case:
    """A volume alone (a file under the data folders or an upload)."""
    return Case(key=f"file::{path}", title=path.name, image=path, source=source)


def report_statements(report: str | None) -> list[Statement]:
    """The statements to list, one row each: those of the "Findings:" section, else all (as
    `grounding.infer.read_report` grounds them)."""
    if not report or not report.strip():
        return []
    statements = split_statements(report)
    return [s for s in statements if s.section == "findings"] or statements


# ----------------------------------------------------------------------------------------------- uploads


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def save_upload(name: str, data: bytes, folder: Path) -> Path:
    """Check an upload (name, size; `paths.check_upload`) and write it under `folder/<content hash>/`.
    A `.zip` must hold one DICOM series: it is unpacked (no member may escape, be a link, or unpack to more
    than the upload limit) and the series folder is returned."""
    if name.lower().endswith(ZIP_SUFFIXES):
        paths.check_upload(name, len(data), suffixes=ZIP_SUFFIXES)
        return unpack_dicom_zip(data, folder / _digest(data), name)
    paths.check_upload(name, len(data))
    target = folder / _digest(data) / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return target


def unpack_dicom_zip(data: bytes, folder: Path, name: str = "upload.zip") -> Path:
    """Unpack a zipped DICOM series safely into `folder`; returns the one folder that holds files."""
    try:
        archive = zipfile.ZipFile(bytesio.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise UserError(f"upload {name}: not a readable zip archive ({one_line(err, with_type=True)})") from None
    if not members:
        raise UserError(f"upload {name}: the zip archive is empty")
    if len(members) > ZIP_MAX_FILES:
        raise UserError(f"upload {name}: {len(members)} files in the archive, more than {ZIP_MAX_FILES}")
    if sum(m.file_size for m in members) > paths.UPLOAD_LIMIT_BYTES:
        raise UserError(f"upload {name}: unpacks to more than the upload limit of {UPLOAD_LIMIT_MB} MiB")
    for member in members:
        parts = Path(member.filename).parts
        if member.filename.startswith(("/", "\\")) or ".." in parts or (member.external_attr >> 28) == 0o12:
            raise UserError(f"upload {name}: member {member.filename!r} would be written outside the upload folder")
    folders = {str(Path(m.filename).parent) for m in members if not Path(m.filename).name.startswith(".")}
    if len(folders) != 1:
        raise UserError(f"upload {name}: files in {len(folders)} folders; zip one DICOM series (one folder)")
    if not folder.exists():
        tmp = folder.with_name(folder.name + ".part")
        try:
            for member in members:
                target = tmp / member.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
            raise UserError(f"upload {name}: cannot unpack ({one_line(err, with_type=True)})") from None
        os.replace(tmp, folder)
    return folder / folders.pop()


# ----------------------------------------------------------------------------------------------- volumes


@dataclass(eq=False)
class ViewVolume:
    """A volume ready to show: the data, its display grid, the modality guessed from its values and the
    default window (CT soft tissue for Hounsfield units, MR 1-99 % otherwise)."""

    volume: io.Volume
    grid: DisplayGrid
    modality: str
    default_window: Window

    @property
    def centre(self) -> tuple[int, int, int]:
        return tuple(n // 2 for n in self.volume.array.shape)


def check_affine_present(path: Path) -> None:
    """UserError for a NIfTI whose header holds no orientation (qform and sform codes 0): left and right
    would be guesses."""
    if path.is_dir() or not path.name.lower().endswith(io.NIFTI_SUFFIXES):
        return
    try:
        header = nib.load(path).header
        codes = (int(header["qform_code"]), int(header["sform_code"]))
    except Exception as err:  # nibabel raises many types for a corrupt header
        raise UserError(f"{path}: cannot read NIfTI ({one_line(err, with_type=True)})") from None
    if codes == (0, 0):
        raise UserError(f"{path}: the NIfTI header has no affine (qform and sform codes are 0): its orientation "
                        "is unknown, so left and right cannot be shown")


def load_view_volume(path: Path) -> ViewVolume:
    """Read a 3D volume to show; UserError (one line) for a corrupt file, a missing affine, a 2D or 4D image."""
    check_affine_present(path)
    volume = io.read_volume(path)
    shape = volume.array.shape
    if min(shape) < 2:
        raise UserError(f"{path}: a 2D image (shape {shape}); the viewer shows 3D volumes")
    if not np.isfinite(volume.array).all():
        raise UserError(f"{path}: has {int((~np.isfinite(volume.array)).sum())} NaN/inf voxels")
    grid = display_grid(shape, volume.affine)
    if float(volume.array.min()) < -500:
        return ViewVolume(volume, grid, "CT", CT_PRESETS["soft tissue"])
    lo, hi = MR_PERCENTILE_PRESETS["1-99 %"]
    return ViewVolume(volume, grid, "MR", percentile_window(volume.array, lo, hi))


def window_for(view: ViewVolume, preset: str) -> Window:
    """The window of a preset name: a CT preset, an MR percentile preset or "default"."""
    if preset in CT_PRESETS:
        return CT_PRESETS[preset]
    if preset in MR_PERCENTILE_PRESETS:
        return percentile_window(view.volume.array, *MR_PERCENTILE_PRESETS[preset])
    if preset == "default":
        return view.default_window
    raise UserError(f"window preset: unknown {preset!r}")


def label_masks(path: Path, view: ViewVolume, names: dict[int, str], what: str) -> dict[str, np.ndarray]:
    """{name: bool (X, Y, Z)} for each value > 0 present in a label file on the image's grid."""
    from medssl.explain.maps import check_same_grid

    labels = io.read_volume(path, label=True)
    check_same_grid(view.volume.array.shape, view.volume.affine, labels.array.shape, labels.affine,
                    map_name=f"{path} ({what})")
    values = [int(v) for v in np.unique(labels.array) if v > 0]
    return {names.get(v, f"{what} {v}"): labels.array == v for v in values}


def mask_centre(mask: np.ndarray) -> tuple[int, int, int]:
    """The voxel of a non-empty mask nearest to its centroid (a crosshair that lies inside the mask)."""
    voxels = np.argwhere(np.asarray(mask, dtype=bool))
    if voxels.size == 0:
        raise UserError("mask: empty; nothing to centre on")
    nearest = voxels[np.argmin(((voxels - voxels.mean(axis=0)) ** 2).sum(axis=1))]
    return tuple(int(v) for v in nearest)


PHRASE_MAX = MAX_PHRASE_CHARS  # characters: longer text is refused (and echoed shortened), as `ground infer` does


def phrase_problem(phrase: str | None) -> str | None:
    """Why a typed phrase cannot be grounded (empty, or longer than `PHRASE_MAX`), or None."""
    text = (phrase or "").strip()
    if not text:
        return "phrase: empty; type a finding to ground, e.g. 'a hypodense lesion in the spleen'"
    if len(text) > PHRASE_MAX:
        return (f"phrase: {len(text)} characters, at most {PHRASE_MAX} ('{text[:60]}...'); ground one finding at a "
                "time")
    return None


def regions_at(families: dict[str, dict[str, np.ndarray]], voxel: tuple[int, int, int]) -> dict[str, list[str]]:
    """{family: names of its regions that contain `voxel`} (containers such as "body" included)."""
    return {family: [name for name, mask in masks.items() if bool(mask[voxel])] for family, masks in families.items()}


def stats_map(map01: np.ndarray, threshold: float, above_only: bool) -> np.ndarray:
    """The map that region statistics count: the map, or only its part above the display threshold."""
    return np.where(map01 > threshold, map01, np.float32(0)).astype(np.float32) if above_only else map01


# ----------------------------------------------------------------------------------------------- outputs


def _slug(text: str, limit: int = 40) -> str:
    words = "".join(c if c.isalnum() else "_" for c in text.lower()).split("_")
    return "_".join(w for w in words if w)[:limit] or "map"


def export_stem(folder: Path, case_title: str, phrase: str, label: str = "") -> Path:
    """`folder/exports/<time>_<case>_<phrase>[_<label>]` (the caller adds .png / .nii.gz)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    tail = f"_{label}" if label else ""
    return folder / EXPORT_FOLDER / f"{stamp}_{_slug(case_title, 24)}_{_slug(phrase)}{tail}"


def export_map(stem: Path, map01: np.ndarray, affine: np.ndarray, sidecar: MapSidecar,
               display: dict[str, Any]) -> tuple[Path, Path]:
    """Write the map (NIfTI + sidecar, `medssl.explain.maps`) with the display settings (threshold, colour
    scale, opacity) added to the sidecar's `extra`, so the file says how it was shown."""
    extra = {**(sidecar.extra or {}), "display": display}
    return write_map(stem, map01, affine, sidecar.model_copy(update={"extra": extra}))


def review_csv(folder: Path) -> Path:
    return folder / REVIEW_NAME


def add_review(folder: Path, *, checkpoint: str, image: str, phrase: str, verdict: str, comment: str = "",
               reviewer: str = "", true_mm: Sequence[float] | None = None) -> review.ReviewRow:
    """Append one verdict to `folder/review.csv` (atomic, safe across tabs: `medssl.app.review`), with who
    judged and, where given, the RAS mm point where the finding really is."""
    where = "" if true_mm is None else " ".join(f"{float(v):.1f}" for v in true_mm)
    return review.append_review(review_csv(folder), {
        "run": str(folder), "checkpoint": checkpoint, "image": image, "phrase": phrase, "verdict": verdict,
        "comment": comment, "reviewer": reviewer, "true_location_mm": where})


def review_table(folder: Path) -> list[dict[str, Any]]:
    """The review summary per checkpoint as table rows."""
    rows = review.read_reviews(review_csv(folder))
    return [{"checkpoint": name, **counts} for name, counts in review.review_summary(rows).items()]


# ----------------------------------------------------------------------------------------------- maps


CONTAINER_LABELS = ("background", "body")  # labels that contain the others: left out of the organ shares


def region_report(map01: np.ndarray, affine: np.ndarray, families: dict[str, dict[str, np.ndarray]]
                  ) -> tuple[list[dict], list[dict]]:
    """Region statistics of a map per family of masks ("anatomy", "organs", "lesions"): one row per
    region (share of the map's mass, whether it holds the peak) and one summary per family (the region
    with the largest share and its signed CNR against the rest, `medssl.viewer.stats`)."""
    from medssl.viewer.stats import region_stats

    rows, summary = [], []
    for family, masks in families.items():
        masks = {name: mask for name, mask in masks.items() if name not in CONTAINER_LABELS}
        if not masks:
            continue
        result = region_stats(map01, affine, masks)
        for name, share in sorted(result.shares.items(), key=lambda item: -item[1]):
            rows.append({"family": family, "region": name, "share of map mass": round(share, 4),
                         "holds the peak": name in result.peak_regions})
        summary.append({"family": family, "top region": result.top_region or "-",
                        "share": round(result.shares.get(result.top_region, 0.0), 4) if result.top_region else 0.0,
                        "CNR vs rest": round(result.top_region_cnr, 3)})
    return rows, summary
