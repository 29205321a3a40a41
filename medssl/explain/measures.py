"""Measures of a map against masks, shared by the grounding metrics and the app's region statistics.

`map01` is a 3D (X, Y, Z) map with values in [0, 1] (the map file contract, `medssl.explain.maps`); masks
are boolean arrays of the same shape.

- mass share of a mask: sum(map * mask) / sum(map); 0.0 for an all-zero map.
- CNR, signed: (mean_in - mean_out) / sqrt(var_in + var_out) with population variances (ddof 0). It is
  invariant to a positive linear rescaling, so [0, 1] and [-1, 1] maps give the same value. 0.0 when the map
  is constant; +-inf when both sides are constant but differ (a perfect binary map); NaN when the region or
  its complement has no voxel.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medssl.errors import UserError


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
    return cnr_of(values, check_mask(region, values.shape, "region"))


def cnr_of(values: np.ndarray, region: np.ndarray) -> float:
    inside, outside = values[region], values[~region]
    if inside.size == 0 or outside.size == 0:
        return math.nan
    diff = float(inside.mean(dtype=np.float64) - outside.mean(dtype=np.float64))
    spread = math.sqrt(float(inside.var(dtype=np.float64) + outside.var(dtype=np.float64)))
    if spread == 0.0:
        return 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    return diff / spread




def mass_share(values: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's mass inside `mask` (checked arrays); 0.0 for an all-zero map."""
    total = float(values.sum(dtype=np.float64))
    return float(values[mask].sum(dtype=np.float64)) / total if total > 0 else 0.0
