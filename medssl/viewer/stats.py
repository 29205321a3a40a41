"""Region statistics of a map and the phrase-grounding metrics (MS-CXR / BioViL, ReXGroundingCT).

Inputs: `map01` a 3D (X, Y, Z) map with values in [0, 1] (the map file contract, `medssl.explain.maps`);
masks and targets boolean arrays of the same shape. These functions are also what the grounding
evaluation reports, so their definitions are fixed here:

- pointing game: True when every voxel attaining the map's maximum lies in the target (ties count
  against the map, so a constant map scores False unless the target is the whole volume).
- mass inside target: sum(map * target) / sum(map); 0.0 for an all-zero map.
- mIoU (BioViL / MS-CXR protocol): the map is taken back to [-1, 1] as s = 2 * map01 - 1 (for a cosine
  map stored with the linear [-1, 1] -> [0, 1] rescaling this is exactly the raw cosine; it is NOT a
  per-map min-max) and IoU(s > t, target) is averaged over t in 0.1, 0.2, 0.3, 0.4, 0.5.
- CNR, signed: (mean_in - mean_out) / sqrt(var_in + var_out) with population variances (ddof 0). It is
  invariant to a positive linear rescaling, so [0, 1] and [-1, 1] maps give the same value. 0.0 when
  the map is constant; +-inf when both sides are constant but differ (a perfect binary map); NaN when
  the region or its complement has no voxel.
- Dice of the thresholded map: 2 |P & T| / (|P| + |T|) with P = map01 > threshold (default 0.5);
  hit (ReXGroundingCT) = Dice >= 0.1.
An empty target is refused (UserError): grounding metrics are undefined without one; not-groundable
phrases are scored separately.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medssl.errors import UserError
from medssl.explain.maps import peak

MIOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)  # on the [-1, 1] scale
DICE_THRESHOLD = 0.5  # on the [0, 1] scale
HIT_DICE = 0.1  # ReXGroundingCT hit: Dice >= 0.1

__all__ = ["MIOU_THRESHOLDS", "DICE_THRESHOLD", "HIT_DICE", "peak", "check_map", "check_mask", "cnr",
           "mass_shares", "RegionStats", "region_stats", "pointing_game", "mass_inside", "miou", "dice",
           "GroundingMetrics", "grounding_metrics"]


def check_map(map01: Any) -> np.ndarray:
    """A 3D map with finite values in [0, 1] (integer/bool maps become float32); UserError naming "map"
    otherwise. Sums and moments below are taken in float64."""
    map01 = np.asarray(map01)
    if map01.ndim != 3 or map01.size == 0:
        raise UserError(f"map: expected a non-empty 3D (X, Y, Z) array, got shape {tuple(map01.shape)}")
    if not np.isfinite(map01).all():
        raise UserError(f"map: has {int((~np.isfinite(map01)).sum())} NaN/inf values")
    if map01.min() < 0 or map01.max() > 1:
        raise UserError(f"map: values must lie in [0, 1], got [{map01.min():g}, {map01.max():g}]")
    return map01 if np.issubdtype(map01.dtype, np.floating) else map01.astype(np.float32)


def check_mask(mask: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A boolean mask of `shape` (bool, or integers that are all 0/1); UserError naming `name` otherwise."""
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise UserError(f"{name}: mask shape {tuple(mask.shape)} does not match the map {tuple(shape)}")
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.integer) or not np.isin(mask, (0, 1)).all():
            raise UserError(f"{name}: a mask must be boolean (or 0/1 integers), got dtype {mask.dtype}")
        mask = mask.astype(bool)
    return mask


def cnr(values: Any, region: Any) -> float:
    """Signed contrast-to-noise ratio of `region` (bool, same shape) against the rest of `values` (any
    finite array, e.g. a map or a raw map); see the module docstring for the edge cases."""
    values = np.asarray(values)
    if not np.isfinite(values).all():
        raise UserError("values: CNR needs finite values; the array has NaN/inf")
    return _cnr(values, check_mask(region, values.shape, "region"))


def _cnr(values: np.ndarray, region: np.ndarray) -> float:
    inside, outside = values[region], values[~region]
    if inside.size == 0 or outside.size == 0:
        return math.nan
    diff = float(inside.mean(dtype=np.float64) - outside.mean(dtype=np.float64))
    spread = math.sqrt(float(inside.var(dtype=np.float64) + outside.var(dtype=np.float64)))
    if spread == 0.0:
        return 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    return diff / spread


def mass_shares(map01: Any, masks: Mapping[str, Any]) -> dict[str, float]:
    """Share of the map's mass sum(map) inside each named mask (masks may overlap: shares need not sum
    to 1). An all-zero map has share 0.0 everywhere."""
    values = check_map(map01)
    return {name: _mass(values, check_mask(mask, values.shape, name)) for name, mask in masks.items()}


def _mass(values: np.ndarray, mask: np.ndarray) -> float:
    total = float(values.sum(dtype=np.float64))
    return float(values[mask].sum(dtype=np.float64)) / total if total > 0 else 0.0


@dataclass(frozen=True)
class RegionStats:
    """Region statistics of one map: the peak (voxel index, RAS+ mm, value, names of the masks that
    contain it), the mass share per named mask, the mask with the largest share (None without masks or
    for an all-zero map; ties go to the first name) and its signed CNR against the rest."""

    peak_voxel: tuple[int, int, int]
    peak_mm: tuple[float, float, float]
    peak_value: float
    peak_regions: list[str]
    shares: dict[str, float]
    top_region: str | None
    top_region_cnr: float

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON / tables)."""
        return asdict(self)


def region_stats(map01: Any, affine: np.ndarray, masks: Mapping[str, Any]) -> RegionStats:
    """Peak, mass share per named mask (dict name -> bool (X, Y, Z)) and the top region's signed CNR."""
    values = check_map(map01)
    voxel, mm = peak(values, affine)
    checked = {name: check_mask(mask, values.shape, name) for name, mask in masks.items()}
    shares = {name: _mass(values, mask) for name, mask in checked.items()}
    top = max(shares, key=lambda name: shares[name]) if shares and values.max() > 0 else None
    return RegionStats(voxel, mm, float(values[voxel]), [name for name, m in checked.items() if m[voxel]], shares,
                       top, _cnr(values, checked[top]) if top is not None else math.nan)


# ----------------------------------------------------------------------------------------------- grounding


def _map_and_target(map01: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    values = check_map(map01)
    target = check_mask(target, values.shape, "target")
    if not target.any():
        raise UserError("target: the mask is empty; grounding metrics need a non-empty target")
    return values, target


def pointing_game(map01: Any, target: Any) -> bool:
    """True when every voxel attaining the map's maximum lies inside the target."""
    return _pointing(*_map_and_target(map01, target))


def _pointing(values: np.ndarray, target: np.ndarray) -> bool:
    return bool(target[values == values.max()].all())


def mass_inside(map01: Any, target: Any) -> float:
    """Share of the map's mass inside the target; 0.0 for an all-zero map."""
    return _mass(*_map_and_target(map01, target))


def miou(map01: Any, target: Any, thresholds: tuple[float, ...] = MIOU_THRESHOLDS) -> float:
    """Mean over `thresholds` t of IoU(2 * map01 - 1 > t, target) (BioViL / MS-CXR protocol)."""
    return _miou(*_map_and_target(map01, target), thresholds)


def _miou(values: np.ndarray, target: np.ndarray, thresholds: tuple[float, ...]) -> float:
    if not thresholds:
        raise UserError("thresholds: need at least one mIoU threshold")
    signed = 2.0 * values - 1.0
    ious = []
    for t in thresholds:
        pred = signed > t
        ious.append(float((pred & target).sum()) / float((pred | target).sum()))
    return float(np.mean(ious))


def dice(map01: Any, target: Any, threshold: float = DICE_THRESHOLD) -> float:
    """Dice of (map01 > threshold) against the target."""
    return _dice(*_map_and_target(map01, target), threshold)


def _dice(values: np.ndarray, target: np.ndarray, threshold: float) -> float:
    pred = values > threshold
    return 2.0 * float((pred & target).sum()) / float(pred.sum() + target.sum())


@dataclass(frozen=True)
class GroundingMetrics:
    """All grounding metrics of one map against one target (definitions in the module docstring)."""

    pointing_game: bool
    mass_inside: float
    miou: float
    cnr: float
    dice: float
    hit: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON / tables)."""
        return asdict(self)


def grounding_metrics(map01: Any, target: Any, *, dice_threshold: float = DICE_THRESHOLD,
                      miou_thresholds: tuple[float, ...] = MIOU_THRESHOLDS) -> GroundingMetrics:
    """Pointing game, mass inside, mIoU, signed CNR, Dice at `dice_threshold` and hit (Dice >= 0.1)."""
    values, target = _map_and_target(map01, target)
    d = _dice(values, target, dice_threshold)
    return GroundingMetrics(_pointing(values, target), _mass(values, target), _miou(values, target, miou_thresholds),
                            _cnr(values, target), d, d >= HIT_DICE)
