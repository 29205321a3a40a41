"""The body frame of a volume, found without labels: the body mask, its box and normalised coordinates.

Body mask: voxels above ``threshold`` (intensities scaled to [0, 1], e.g. by the CT window, so air is 0;
the default 0.05 is about -140 HU with the (40, 400) soft-tissue window), reduced to the largest
26-connected component, with holes filled in 3D and then slice by slice along Z (axial in RAS order: lungs
touching the top or bottom of the field are enclosed within their slice). Both fills are one 2D fill per Z
slice (a background region, 4-connected within its slice, that touches no X/Y edge of the slice is a hole):
every 3D hole is also a hole of each of its slices, so this equals `scipy.ndimage.binary_fill_holes` in 3D
followed by it per slice, voxel for voxel (tested).
Its bounding box (first to last body voxel centre on each axis) is the body box; normalised body
coordinates are positions inside that box, about [0, 1] per axis, so the same coordinates are roughly the
same anatomical place in every patient. The anatomical matchers of pretraining and the grounding head use it.

`BodyMasks` is what the matchers read: per volume its shape, box, body-voxel count, the k-th body voxel
(C order) and the mask over a box. `MaskList` holds masks in memory; `medssl.data.store` reads them
from disk, a region at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import cc3d
import fill_voids
import numpy as np

DEFAULT_THRESHOLD = 0.05


def body_mask(volume: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """(X, Y, Z) bool body mask of a [0, 1]-scaled volume (see the module docstring); all False if
    nothing exceeds `threshold`.

    Computed inside the box of the voxels above `threshold` (the largest component lies in it, and a background
    region of a slice that reaches the box's edge reaches the slice's edge through the empty frame around it),
    with `cc3d` (26-connected components) and `fill_voids` (2D holes of each Z slice, made contiguous first):
    1.3 s instead of 2.8 s with `scipy.ndimage` on a 512 x 512 x 300 CT, the same mask voxel for voxel (tested).
    """
    above = volume > threshold
    box = _box(above)
    mask = np.zeros(volume.shape, bool)
    if box is None:
        return mask
    labels = cc3d.connected_components(above[box], connectivity=26)
    sizes = cc3d.statistics(labels, no_slice_conversion=True)["voxel_counts"][1:]
    winners = np.flatnonzero(sizes == sizes.max()) + 1
    # a tie goes to the component met first in C order (scipy's numbering, which this replaced)
    if len(winners) > 1:
        winners = winners[np.argsort([np.flatnonzero(labels == k)[0] for k in winners])]
    slices = np.ascontiguousarray((labels == winners[0]).transpose(2, 0, 1))  # (Z, X, Y): each slice contiguous
    del labels
    for z, plane in enumerate(slices):
        slices[z] = fill_voids.fill(plane)  # holes = background 4-connected regions off the slice's edge
    mask[box] = slices.transpose(1, 2, 0)
    return mask


def _box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The slices of the smallest box holding every True voxel of a 3D bool array; None when there is none."""
    box = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if not len(hits):
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def body_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi), each (3,) float: the first and last body voxel index on each axis."""
    axes = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    return np.array([idx[0] for idx in axes], float), np.array([idx[-1] for idx in axes], float)


def body_coordinates(volume: np.ndarray, threshold: float = DEFAULT_THRESHOLD, *,
                     mask: np.ndarray | None = None) -> np.ndarray:
    """(3, X, Y, Z) float32 normalised body-box coordinates of every voxel of a [0, 1]-scaled volume
    (0 at the first body voxel of each axis, 1 at the last; the whole array's box when no body is found).
    `mask`: the volume's body mask when already computed."""
    mask = body_mask(volume, threshold) if mask is None else mask
    lo, hi = body_box(mask) if mask.any() else (np.zeros(3), np.array(volume.shape, float) - 1)
    grids = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in volume.shape), indexing="ij")
    return np.stack([(g - l) / max(h - l, 1.0) for g, l, h in zip(grids, lo, hi)]).astype(np.float32)


def ras_body_coordinates(volume: np.ndarray, orientation: str, threshold: float = DEFAULT_THRESHOLD, *,
                         mask: np.ndarray | None = None) -> np.ndarray:
    """`body_coordinates` of a volume whose axes follow `orientation` (e.g. "RAS", "LPS"), turned so that
    channel 0 grows towards the patient's right, 1 towards anterior, 2 towards superior, whatever the
    storage order. Shape: (X, Y, Z) -> (3, X, Y, Z) float32."""
    coords = body_coordinates(volume, threshold, mask=mask)
    order = ["RL".find(c) if c in "RL" else "AP".find(c) + 2 if c in "AP" else "SI".find(c) + 4 for c in orientation]
    out = np.empty_like(coords)
    for axis, code in enumerate(order):
        channel, flipped = divmod(code, 2)
        out[channel] = 1.0 - coords[axis] if flipped else coords[axis]
    return out


class BodyMasks(Protocol):
    """Body masks of several volumes, read by index: in memory (`MaskList`) or from a store."""

    def __len__(self) -> int: ...

    def shape(self, index: int) -> tuple[int, int, int]:
        """The (X, Y, Z) shape of volume `index` (its mask's)."""

    def box(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """`body_box` of volume `index`."""

    def count(self, index: int) -> int:
        """Number of body voxels of volume `index`."""

    def voxel(self, index: int, k: int) -> np.ndarray:
        """(3,) int64 index of the `k`-th body voxel of volume `index` in C order (the `np.flatnonzero` order)."""

    def region(self, index: int, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
        """The bool mask of volume `index` over the box ``lo <= i < hi`` (inside the array)."""


class MaskList:
    """`BodyMasks` over in-memory (X, Y, Z) bool masks."""

    def __init__(self, masks: Sequence[np.ndarray]) -> None:
        self.masks = list(masks)
        self._boxes = [body_box(mask) for mask in self.masks]
        self._flat: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.masks)

    def shape(self, index: int) -> tuple[int, int, int]:
        return tuple(self.masks[index].shape)  # type: ignore[return-value]

    def box(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self._boxes[index]

    def _voxels(self, index: int) -> np.ndarray:
        if index not in self._flat:
            self._flat[index] = np.flatnonzero(self.masks[index])
        return self._flat[index]

    def count(self, index: int) -> int:
        return len(self._voxels(index))

    def voxel(self, index: int, k: int) -> np.ndarray:
        return np.array(np.unravel_index(self._voxels(index)[k], self.masks[index].shape), np.int64)

    def region(self, index: int, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
        return self.masks[index][tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]


def inside_mask(masks: BodyMasks, index: int, points: np.ndarray) -> np.ndarray:
    """(N,) bool: the nearest voxel of each (N, 3) voxel-coordinate point lies in the body mask of volume
    `index` (points outside the array are outside the body); reads the mask over the points' box only."""
    voxel = np.rint(np.asarray(points, float)).astype(np.int64).reshape(-1, 3)
    inside = np.all((voxel >= 0) & (voxel < masks.shape(index)), axis=1)
    result = np.zeros(len(voxel), bool)
    if inside.any():
        kept = voxel[inside]
        lo, hi = kept.min(0), kept.max(0) + 1
        result[inside] = masks.region(index, lo, hi)[tuple((kept - lo).T)]
    return result
