"""The body frame of a volume, found without labels: the body mask, its box and normalised coordinates.

Body mask: voxels above ``threshold`` (intensities scaled to [0, 1], e.g. by the CT window, so air is 0;
the default 0.05 is about -140 HU with the (40, 400) soft-tissue window), reduced to the largest
26-connected component (`scipy.ndimage.label`), with holes filled in 3D and then slice by slice along Z
(axial in RAS order: lungs touching the top or bottom of the field are enclosed within their slice).
Its bounding box (first to last body voxel centre on each axis) is the body box; normalised body
coordinates are positions inside that box, about [0, 1] per axis, so the same coordinates are roughly the
same anatomical place in every patient. The anatomical matchers of pretraining and the grounding head use it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

DEFAULT_THRESHOLD = 0.05


def body_mask(volume: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """(X, Y, Z) bool body mask of a [0, 1]-scaled volume (see the module docstring); all False if
    nothing exceeds `threshold`."""
    labels, count = ndimage.label(volume > threshold, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return np.zeros(volume.shape, bool)
    largest = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    filled = ndimage.binary_fill_holes(largest)
    for k in range(filled.shape[2]):
        filled[:, :, k] = ndimage.binary_fill_holes(filled[:, :, k])
    return filled


def body_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi), each (3,) float: the first and last body voxel index on each axis."""
    nonzero = np.nonzero(mask)
    return (np.array([idx.min() for idx in nonzero], float), np.array([idx.max() for idx in nonzero], float))


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
