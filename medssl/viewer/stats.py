"""Region statistics of a map for the app: the peak, the mass share per named mask and the top region's
signed CNR (`medssl.explain.measures` defines the share and the CNR; the grounding metrics live with
grounding, `medssl.downstream.grounding.metrics`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medssl.explain.maps import peak
from medssl.explain.measures import check_map, check_mask, cnr, cnr_of, mass_share

__all__ = ["peak", "check_map", "check_mask", "cnr", "mass_shares", "RegionStats", "region_stats"]


def mass_shares(map01: Any, masks: Mapping[str, Any]) -> dict[str, float]:
    """Share of the map's mass sum(map) inside each named mask (masks may overlap: shares need not sum
    to 1). An all-zero map has share 0.0 everywhere."""
    values = check_map(map01)
    return {name: mass_share(values, check_mask(mask, values.shape, name)) for name, mask in masks.items()}


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
    shares = {name: mass_share(values, mask) for name, mask in checked.items()}
    top = max(shares, key=lambda name: shares[name]) if shares and values.max() > 0 else None
    return RegionStats(voxel, mm, float(values[voxel]), [name for name, m in checked.items() if m[voxel]], shares,
                       top, cnr_of(values, checked[top]) if top is not None else math.nan)
