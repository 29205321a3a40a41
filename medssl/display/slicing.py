"""The three orthogonal planes of a volume with any affine, in screen orientation.

Display space is RAS: the voxel array is reoriented (flips and a transpose, no resampling) with
nibabel's `io_orientation` / `apply_orientation` so that display axis 0 runs left -> Right, 1
posterior -> Anterior, 2 inferior -> Superior. For an oblique affine the closest axis orientation is
used and `DisplayGrid.note` says so (edge labels are then approximate).

Screen orientation of a `PlaneView.image` (rows, cols), row 0 at the top of the screen:
- axial (normal S): top = anterior, bottom = posterior;
- coronal (normal A) and sagittal (normal R): top = superior, bottom = inferior;
- axial and coronal columns: "radiological" puts the patient's right on the screen's left (as if
  facing the patient), "neurological" puts the patient's left on the left;
- sagittal columns: anterior on the left in both conventions.

A linked crosshair is one voxel index (i, j, k) of the ORIGINAL array shared by the three planes.
A map on the same grid as the image (same shape and affine) slices identically, so overlays align.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from nibabel.orientations import apply_orientation, io_orientation

from medssl.errors import UserError

PLANES = ("axial", "coronal", "sagittal")
CONVENTIONS = ("radiological", "neurological")
OBLIQUE_TOLERANCE_DEG = 0.01
_LOW, _HIGH = "LPI", "RAS"  # letter of the low / high end of display axis 0, 1, 2
_NORMAL = {"axial": 2, "coronal": 1, "sagittal": 0}


@dataclass(frozen=True, eq=False)
class DisplayGrid:
    """How a voxel array of `shape` with `affine` (voxel -> RAS+ mm) maps to RAS display space.

    `ornt` (3, 2) is nibabel's orientation: original axis a becomes display axis ornt[a, 0], flipped
    when ornt[a, 1] == -1. `obliquity_deg` is the largest angle between a voxel axis and its closest
    world axis.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    ornt: np.ndarray
    obliquity_deg: float

    @property
    def ras_shape(self) -> tuple[int, int, int]:
        """Shape of the array in display (RAS) order."""
        out = [0, 0, 0]
        for a, (b, _) in enumerate(self.ornt):
            out[int(b)] = self.shape[a]
        return tuple(out)

    @property
    def ras_spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along display axes R, A, S."""
        sizes = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        out = [0.0, 0.0, 0.0]
        for a, (b, _) in enumerate(self.ornt):
            out[int(b)] = float(sizes[a])
        return tuple(out)

    @property
    def oblique(self) -> bool:
        """True when the voxel axes are not aligned with the world axes."""
        return self.obliquity_deg > OBLIQUE_TOLERANCE_DEG

    @property
    def note(self) -> str | None:
        """A warning to show beside the views, or None."""
        if not self.oblique:
            return None
        return (f"oblique acquisition ({self.obliquity_deg:.1f} deg off the axes): shown in the closest axis "
                "orientation without resampling; edge labels are approximate")

    def to_ras(self, array: np.ndarray) -> np.ndarray:
        """(X, Y, Z) array on this grid -> the same voxels in display (R, A, S) order (a view)."""
        array = np.asarray(array)
        if tuple(array.shape[:3]) != self.shape:
            raise UserError(f"array: shape {tuple(array.shape)} does not match the grid {self.shape}")
        return apply_orientation(array, self.ornt)

    def voxel_to_ras(self, voxel: Any) -> tuple[int, int, int]:
        """Original voxel index -> display (RAS) index."""
        voxel = self.check_voxel(voxel)
        out = [0, 0, 0]
        for a, (b, flip) in enumerate(self.ornt):
            out[int(b)] = voxel[a] if flip > 0 else self.shape[a] - 1 - voxel[a]
        return tuple(out)

    def ras_to_voxel(self, ras: Any) -> tuple[int, int, int]:
        """Display (RAS) index -> original voxel index."""
        ras = [int(v) for v in ras]
        out = [0, 0, 0]
        for a, (b, flip) in enumerate(self.ornt):
            v = ras[int(b)]
            out[a] = v if flip > 0 else self.shape[a] - 1 - v
        return self.check_voxel(out)

    def check_voxel(self, voxel: Any) -> tuple[int, int, int]:
        """A voxel index inside the array, as a tuple of ints; UserError otherwise."""
        try:
            voxel = tuple(int(v) for v in voxel)
        except (TypeError, ValueError) as err:
            raise UserError(f"voxel: expected three integer indices, got {voxel!r}") from err
        if len(voxel) != 3 or any(not 0 <= v < n for v, n in zip(voxel, self.shape)):
            raise UserError(f"voxel: {list(voxel)} lies outside the volume of shape {self.shape}")
        return voxel

    def slice_count(self, plane: str) -> int:
        """Number of slices of `plane` (along its normal)."""
        return self.ras_shape[_NORMAL[_check_plane(plane)]]

    def slice_position(self, voxel: Any, plane: str) -> int:
        """Slice number of `voxel` in `plane`, counted from the L / P / I end (0) to R / A / S."""
        return self.voxel_to_ras(voxel)[_NORMAL[_check_plane(plane)]]

    def with_slice(self, voxel: Any, plane: str, position: int) -> tuple[int, int, int]:
        """Move the crosshair `voxel` to slice `position` of `plane` (as `slice_position` counts)."""
        ras = list(self.voxel_to_ras(voxel))
        normal = _NORMAL[_check_plane(plane)]
        if not 0 <= int(position) < self.ras_shape[normal]:
            raise UserError(f"slice: {position} outside 0..{self.ras_shape[normal] - 1} for the {plane} plane")
        ras[normal] = int(position)
        return self.ras_to_voxel(ras)


def _check_plane(plane: str) -> str:
    if plane not in PLANES:
        raise UserError(f"plane: must be one of {', '.join(PLANES)}, got {plane!r}")
    return plane


def _check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise UserError(f"convention: must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    return convention


def _obliquity_deg(affine: np.ndarray) -> float:
    columns = affine[:3, :3] / np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    cosines = np.clip(np.abs(columns).max(axis=0), -1.0, 1.0)
    return float(np.degrees(np.arccos(cosines)).max())


def display_grid(shape: tuple[int, ...], affine: np.ndarray) -> DisplayGrid:
    """The display grid of a 3D array of `shape` with a (4, 4) voxel -> RAS+ mm `affine`."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"volume: expected a non-empty 3D (X, Y, Z) array, got shape {shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise UserError(f"affine: expected a finite (4, 4) matrix, got shape {tuple(affine.shape)}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise UserError("affine: singular (a voxel axis has zero length)")
    ornt = io_orientation(affine)
    return DisplayGrid(shape, affine, ornt.astype(int), _obliquity_deg(affine))


def _array_affine(volume: Any) -> tuple[np.ndarray, np.ndarray]:
    """`Volume`, `LoadedMap` or anything with `.array` and `.affine`, or an (array, affine) pair."""
    if hasattr(volume, "array") and hasattr(volume, "affine"):
        return np.asarray(volume.array), np.asarray(volume.affine)
    try:
        array, affine = volume
    except (TypeError, ValueError) as err:
        raise UserError("volume: expected a Volume or an (array, affine) pair") from err
    return np.asarray(array), np.asarray(affine)


@dataclass(frozen=True, eq=False)
class PlaneView:
    """One plane in screen orientation.

    `image` (rows, cols): row 0 at the top of the screen (see the module docstring). `labels`: the
    patient direction at each screen edge, keys "top", "bottom", "left", "right", values in R/L/A/P/S/I.
    `crosshair`: (row, col) of the voxel the plane was cut through. `pixel_mm`: (row, col) pixel size in mm,
    for the display aspect ratio.
    """

    image: np.ndarray
    plane: str
    convention: str
    labels: dict[str, str]
    crosshair: tuple[int, int]
    pixel_mm: tuple[float, float]
    grid: DisplayGrid
    _axes: tuple[int, bool, int, bool, int, int]  # row axis, row reversed, col axis, col reversed, normal, pos

    @property
    def note(self) -> str | None:
        """The grid's obliquity warning, or None."""
        return self.grid.note

    def voxel_at(self, row: int, col: int) -> tuple[int, int, int]:
        """Screen pixel (row, col) of this plane -> voxel index (i, j, k) of the original array."""
        rows, cols = self.image.shape
        if not (0 <= int(row) < rows and 0 <= int(col) < cols):
            raise UserError(f"click: ({row}, {col}) outside the {self.plane} view of {rows} x {cols} pixels")
        row_axis, row_rev, col_axis, col_rev, normal, position = self._axes
        ras = [0, 0, 0]
        ras[normal] = position
        ras[row_axis] = rows - 1 - int(row) if row_rev else int(row)
        ras[col_axis] = cols - 1 - int(col) if col_rev else int(col)
        return self.grid.ras_to_voxel(ras)

    def pixel_of(self, voxel: Any) -> tuple[int, int]:
        """Voxel index of the original array -> screen pixel (row, col) of its projection on this plane."""
        ras = self.grid.voxel_to_ras(voxel)
        rows, cols = self.image.shape
        row_axis, row_rev, col_axis, col_rev, _, _ = self._axes
        row = rows - 1 - ras[row_axis] if row_rev else ras[row_axis]
        col = cols - 1 - ras[col_axis] if col_rev else ras[col_axis]
        return int(row), int(col)


def _layout(plane: str, convention: str) -> tuple[int, bool, int, bool]:
    """(row axis, row reversed, col axis, col reversed) in display space; reversed: index 0 is the high end."""
    if plane == "sagittal":
        return 2, True, 1, True  # superior at the top, anterior on the left
    row_axis = 1 if plane == "axial" else 2  # axial: anterior at the top; coronal: superior at the top
    return row_axis, True, 0, convention == "radiological"  # radiological: patient's right (high x) at left


def edge_labels(plane: str, convention: str = "radiological") -> dict[str, str]:
    """Patient direction at each screen edge of `plane`: {"top", "bottom", "left", "right"} -> letter."""
    row_axis, row_rev, col_axis, col_rev = _layout(_check_plane(plane), _check_convention(convention))
    first = {True: _HIGH, False: _LOW}
    last = {True: _LOW, False: _HIGH}
    return {"top": first[row_rev][row_axis], "bottom": last[row_rev][row_axis],
            "left": first[col_rev][col_axis], "right": last[col_rev][col_axis]}


def plane_slice(volume: Any, plane: str, index: Any, convention: str = "radiological",
                grid: DisplayGrid | None = None) -> PlaneView:
    """The `plane` through voxel `index` (i, j, k of the original array) in screen orientation.

    `volume`: a `Volume` / `LoadedMap` (`.array` (X, Y, Z), `.affine`) or an (array, affine) pair. Pass a
    precomputed `grid` (from `display_grid`) to skip recomputing it; it must match the volume's shape.
    """
    array, affine = _array_affine(volume)
    _check_plane(plane)
    _check_convention(convention)
    if array.ndim != 3:
        raise UserError(f"volume: expected a 3D (X, Y, Z) array, got shape {tuple(array.shape)}")
    grid = grid or display_grid(array.shape, affine)
    if grid.shape != tuple(array.shape):
        raise UserError(f"grid: made for shape {grid.shape}, the volume has shape {tuple(array.shape)}")
    ras_index = grid.voxel_to_ras(index)
    ras = grid.to_ras(array)
    normal = _NORMAL[plane]
    row_axis, row_rev, col_axis, col_rev = _layout(plane, convention)
    image = np.take(ras, ras_index[normal], axis=normal)  # remaining axes in increasing order
    if row_axis > col_axis:
        image = image.T
    if row_rev:
        image = image[::-1, :]
    if col_rev:
        image = image[:, ::-1]
    rows, cols = image.shape
    crosshair = (rows - 1 - ras_index[row_axis] if row_rev else ras_index[row_axis],
                 cols - 1 - ras_index[col_axis] if col_rev else ras_index[col_axis])
    spacing = grid.ras_spacing
    return PlaneView(np.ascontiguousarray(image), plane, convention, edge_labels(plane, convention), crosshair,
                     (spacing[row_axis], spacing[col_axis]), grid,
                     (row_axis, row_rev, col_axis, col_rev, normal, ras_index[normal]))


def three_planes(volume: Any, index: Any, convention: str = "radiological",
                 grid: DisplayGrid | None = None) -> dict[str, PlaneView]:
    """The axial, coronal and sagittal views through one crosshair voxel (a linked crosshair)."""
    array, affine = _array_affine(volume)
    if array.ndim != 3:
        raise UserError(f"volume: expected a 3D (X, Y, Z) array, got shape {tuple(array.shape)}")
    grid = grid or display_grid(array.shape, affine)
    return {plane: plane_slice((array, affine), plane, index, convention, grid) for plane in PLANES}


def voxel_to_mm(affine: np.ndarray, voxel: Any) -> tuple[float, float, float]:
    """Voxel index (i, j, k) -> RAS+ world position (x, y, z) in mm."""
    mm = np.asarray(affine, dtype=np.float64) @ np.array([*(float(v) for v in voxel), 1.0])
    return float(mm[0]), float(mm[1]), float(mm[2])


def mm_to_voxel(affine: np.ndarray, mm: Any, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """RAS+ world position (x, y, z) mm -> the nearest voxel index; UserError if outside the volume."""
    ijk = np.linalg.solve(np.asarray(affine, dtype=np.float64), np.array([*(float(v) for v in mm), 1.0]))[:3]
    voxel = tuple(int(v) for v in np.rint(ijk))
    if any(not 0 <= v < n for v, n in zip(voxel, shape)):
        raise UserError(f"mm: ({', '.join(f'{float(v):g}' for v in mm)}) lies outside the volume "
                        f"(nearest voxel {list(voxel)}, shape {tuple(shape)})")
    return voxel
