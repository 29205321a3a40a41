"""The organ voxels of `ground train`'s training studies on disk, one file per (study, organ), read back lazily.

The finding scorer's training draws its bags from every training study; an organ's `features.OrganVoxels` of a
512^3 CT weigh tens of MB, so they are not kept in RAM. `task.training_studies` writes each one as it is computed
to RUN/organ_voxels/KEY/NAME.npz (uncompressed numpy arrays, written atomically: a file that exists is complete),
or NAME.none (empty) when the organ head does not find the organ. KEY (`organ_voxels_key`) identifies what the
voxels depend on: the organ head (weights, architecture, classes, preprocessing), the intensity windows and
FORMAT; NAME: the volume (its path, size and modification time) and the organ. `ground train --resume` reuses
every file under the same KEY and recomputes only the missing ones; the folders of another KEY (another organ
head or windows) are removed when the main process opens the store.

`OrganVoxelStore` is the index, {(study, organ): path} of the organs found, as a read-only mapping:
`store[(study, organ)]` reads the file, keeping the last CACHED ones read, so memory stays flat in the number of
studies. A file holds 8 (index) + 2 x 6 x W (intensity z) + 2 x C (decoder z) + 4 (depth) + 6 (offsets) bytes per
core voxel: 106 with W = 2 windows and C = 32 decoder channels, 48 MB for a liver of 450k core voxels.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from medssl.atomic import UnwritableError, atomic_path, write_text
from medssl.downstream.grounding.features import OrganVoxels
from medssl.downstream.grounding.organs import OrganHead
from medssl.errors import UserError

FORMAT = 1  # raised when OrganVoxels or its file layout changes: older files are then not reused
CACHED = 32  # organ voxels kept in RAM after reading


def organ_voxels_key(head: OrganHead, windows: list[tuple[float, float]] | None) -> str:
    """16 hex digits of a hash of the organ head (weights, architecture, classes, preprocessing), the windows
    and FORMAT: organ voxels computed under another key are never reused."""
    state = head.state()
    digest = hashlib.sha256(json.dumps({"format": FORMAT, "arch": state["arch"], "windows": windows,
                                        "preprocessing": state["preprocessing"]}, sort_keys=True).encode())
    for name, tensor in sorted(state["model"].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def write_organ_voxels(path: Path, voxels: OrganVoxels) -> None:
    """Write `voxels` to `path` (.npz, atomically)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, organ=np.array(voxels.organ), shape=np.array(voxels.shape), index=voxels.index,
                 intensity_z=voxels.intensity_z, decoder_z=voxels.decoder_z, depth_mm=voxels.depth_mm,
                 offsets=voxels.offsets, spacing=np.array(voxels.spacing), mask_voxels=np.array(voxels.mask_voxels))


def read_organ_voxels(path: Path) -> OrganVoxels:
    """The OrganVoxels `write_organ_voxels` wrote (the same arrays, bit for bit); an unreadable file is a
    UserError naming it."""
    try:
        with np.load(path) as arrays:
            return OrganVoxels(str(arrays["organ"]), tuple(int(n) for n in arrays["shape"]), arrays["index"],
                               arrays["intensity_z"], arrays["decoder_z"], arrays["depth_mm"], arrays["offsets"],
                               float(arrays["spacing"]), int(arrays["mask_voxels"]))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"{path}: unreadable organ voxels ({type(err).__name__}); delete the file and run "
                        "ground train --resume to compute it again") from None


class OrganVoxelStore(Mapping):
    """{(study, organ): OrganVoxels} of the organs found, on disk under `folder` (module docstring)."""

    def __init__(self, folder: Path, *, cached: int = CACHED):
        self.folder, self.cached = Path(folder), cached
        self.paths: dict[tuple[int, str], Path] = {}
        self._loaded: OrderedDict[tuple[int, str], OrganVoxels] = OrderedDict()

    @classmethod
    def open(cls, root: Path, key: str, *, clean: bool, cached: int = CACHED) -> OrganVoxelStore:
        """The store of `key` under `root` (RUN/organ_voxels; created by the first file written). `clean` (the
        main process only, before the others open it) removes the folders of other keys and a killed run's
        temporary files."""
        folder = Path(root) / key
        if clean and Path(root).is_dir():
            for other in Path(root).iterdir():
                if other.name != key:
                    shutil.rmtree(other, ignore_errors=True)
            for partial in folder.glob(".*.tmp*"):
                partial.unlink()
        return cls(folder, cached=cached)

    def name(self, image: Path, organ: str) -> str:
        """NAME of (image, organ): a hash of the image's path, size and modification time and the organ."""
        stat = Path(image).stat()
        text = json.dumps([str(Path(image).resolve()), stat.st_size, stat.st_mtime_ns, organ])
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def reuse(self, study: int, image: Path, organ: str) -> bool:
        """Index the file an earlier run wrote for (image, organ) as `study`'s; False when there is none."""
        name = self.name(image, organ)
        if (self.folder / f"{name}.npz").is_file():
            self.paths[(study, organ)] = self.folder / f"{name}.npz"
            return True
        return (self.folder / f"{name}.none").is_file()

    def add(self, study: int, image: Path, organ: str, voxels: OrganVoxels | None) -> None:
        """Write `voxels` (None: the organ head did not find the organ) and index them as `study`'s. A refused
        write (a full disk) is a one-line UserError naming the folder; the files already written are kept."""
        name = self.name(image, organ)
        try:
            if voxels is None:
                write_text(self.folder / f"{name}.none", "")
                return
            write_organ_voxels(self.folder / f"{name}.npz", voxels)
        except UnwritableError as err:
            raise UserError(f"{self.folder}: cannot write the organ voxels of the training studies: {err.reason}; "
                            "ground train --resume keeps the files already written") from None
        self.paths[(study, organ)] = self.folder / f"{name}.npz"

    def __getitem__(self, key: tuple[int, str]) -> OrganVoxels:
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        voxels = read_organ_voxels(self.paths[key])
        self._loaded[key] = voxels
        if len(self._loaded) > self.cached:
            self._loaded.popitem(last=False)
        return voxels

    def __contains__(self, key: object) -> bool:
        return key in self.paths

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)
