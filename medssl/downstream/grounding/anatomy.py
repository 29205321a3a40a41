"""Where: organs found by the organ head, each organ's own frame, places inside an organ, and the anatomy
tree organ -> parts (SS-ACL's hierarchy, built on predicted organs).

All arrays are on one voxel grid (the organ head's preprocessed grid, axes in RAS order): `labels` (D, H, W)
int class map, masks (D, H, W) bool, `spacing` (3,) mm.

- `organ_masks`: per organ label, the predicted voxels closed and hole-filled in 3D (a lesion that the
  segmentation network gives to another class still lies inside its organ), the largest component kept.
- `OrganFrame`: an organ's centroid and spread (standard deviation in mm along R, A, S) and which way is
  lateral (away from the body's midline, the median R coordinate of the body).
- `location_prior`: a place word as a soft prior in the organ's frame: "upper" is
  sigmoid(offset_S / TEMPERATURE) with offset_S the voxel's S position minus the centroid's in organ
  spreads; "lower", "anterior", "posterior", "medial", "lateral" likewise; "central" a Gaussian of the
  offset's length. Several words multiply. The prior is a probability in (0, 1], 1 when no place is named.
- `organ_parts`: the tree's second level: each organ split into halves along S (upper / lower), A
  (anterior / posterior) and the lateral axis (medial / lateral), at its centroid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

TEMPERATURE = 0.5  # organ spreads: a voxel 0.5 spreads above the centroid is "upper" with prior 0.73
AXIS_OF_PLACE = {"upper": (2, 1.0), "lower": (2, -1.0), "anterior": (1, 1.0), "posterior": (1, -1.0),
                 "lateral": (0, 1.0), "medial": (0, -1.0)}  # (RAS axis, sign); axis 0 is "away from midline"
PART_PAIRS = (("upper", "lower"), ("anterior", "posterior"), ("medial", "lateral"))
_BALL = ndimage.generate_binary_structure(3, 1)


def organ_masks(labels: np.ndarray, classes: dict[int, str], *, skip: tuple[str, ...] = ("background",)
                ) -> dict[str, np.ndarray]:
    """{organ name: (D, H, W) bool} for every class of `classes` but `skip` (empty where not found)."""
    out = {}
    for value, name in classes.items():
        if name in skip:
            continue
        raw = labels == value
        out[name] = raw.copy()
        if not raw.any():
            continue
        box = bounding_box(raw, margin=2)
        closed = ndimage.binary_closing(raw[box], _BALL, iterations=1) | raw[box]
        filled = ndimage.binary_fill_holes(closed)
        components, count = ndimage.label(filled)
        if count > 1:
            filled = components == 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
        out[name][box] = filled
    return out


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The bounding box of a non-empty mask, `margin` voxels wider on each side (inside the array)."""
    nonzero = np.nonzero(mask)
    return tuple(slice(max(int(i.min()) - margin, 0), min(int(i.max()) + margin + 1, n))
                 for i, n in zip(nonzero, mask.shape))


def depth_mm(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) of every voxel of `mask` to the nearest voxel outside it; 0 outside. (D, H, W) float32."""
    out = np.zeros(mask.shape, np.float32)
    if mask.any():
        box = bounding_box(mask, margin=1)
        inner = np.pad(mask[box], 1)
        out[box] = ndimage.distance_transform_edt(inner, sampling=spacing)[1:-1, 1:-1, 1:-1]
    return out


def left_right_axis(orientation: str) -> int:
    """The array axis of a grid with axis codes `orientation` ("RAS", "LPS", ...) that runs left-right."""
    return next(i for i, code in enumerate(orientation.upper()) if code in "RL")


def midline_index(body: np.ndarray, orientation: str = "RAS") -> float:
    """The body's midline as an index along the left-right array axis: the median index of its voxels (the
    volume's centre when the body is empty)."""
    axis = left_right_axis(orientation)
    if not body.any():
        return (body.shape[axis] - 1) / 2
    return float(np.median(np.nonzero(body)[axis]))


@dataclass(frozen=True)
class OrganFrame:
    """An organ's centroid (3,) voxel index, spread (3,) mm (standard deviation along each array axis, at
    least one voxel), the grid's `orientation` and `lateral_sign` (+1 when the organ lies at larger
    left-right indices than the body's midline: there, larger indices are lateral)."""

    centroid: np.ndarray
    spread_mm: np.ndarray
    orientation: str
    lateral_sign: float

    @classmethod
    def of(cls, mask: np.ndarray, spacing: np.ndarray, midline: float, orientation: str = "RAS") -> OrganFrame:
        """The frame of a non-empty mask; `midline`: `midline_index` of the body."""
        points = np.argwhere(mask).astype(np.float64)
        centroid = points.mean(axis=0)
        spread = np.maximum(points.std(axis=0) * spacing, spacing)
        side = 1.0 if centroid[left_right_axis(orientation)] >= midline else -1.0
        return cls(centroid, spread, orientation.upper(), side)

    def offsets(self, shape: tuple[int, int, int], spacing: np.ndarray) -> np.ndarray:
        """(3, D, H, W) float32: each voxel's offset from the centroid in organ spreads, channel 0 towards
        lateral (away from the midline), 1 towards anterior, 2 towards superior."""
        points = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"), axis=-1)
        return self.offsets_at(points.reshape(-1, 3), spacing).reshape(3, *shape)

    def offsets_at(self, points: np.ndarray, spacing: np.ndarray) -> np.ndarray:
        """`offsets` of voxel positions (n, 3) -> (3, n) float32."""
        axes = (points - self.centroid) * spacing / self.spread_mm
        out = np.empty((3, len(points)), np.float32)
        for axis, code in enumerate(self.orientation):
            if code in "RL":
                out[0] = self.lateral_sign * axes[:, axis]
            else:
                out["APSI".index(code) // 2 + 1] = axes[:, axis] if code in "AS" else -axes[:, axis]
        return out


def location_prior(offsets: np.ndarray, places: tuple[str, ...]) -> np.ndarray:
    """(D, H, W) float32 in (0, 1]: the product of each place's soft prior (module docstring); all ones when
    `places` is empty. offsets: `OrganFrame.offsets`."""
    prior = np.ones(offsets.shape[1:], np.float32)
    for place in places:
        if place == "central":
            prior *= np.exp(-0.5 * (offsets ** 2).sum(axis=0) / (2 * TEMPERATURE) ** 2)
        else:
            axis, sign = AXIS_OF_PLACE[place]
            prior *= 1.0 / (1.0 + np.exp(-sign * offsets[axis] / TEMPERATURE))
    return np.maximum(prior, 1e-6).astype(np.float32)


def organ_parts(mask: np.ndarray, offsets: np.ndarray) -> dict[str, np.ndarray]:
    """The organ's halves: {"upper": bool mask, "lower": ..., "anterior", "posterior", "medial", "lateral"}."""
    parts = {}
    for first, second in PART_PAIRS:
        axis, sign = AXIS_OF_PLACE[first]
        side = sign * offsets[axis] > 0
        parts[first], parts[second] = mask & side, mask & ~side
    return parts
