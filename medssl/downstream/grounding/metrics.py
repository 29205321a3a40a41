"""The phrase-grounding metrics (MS-CXR / BioViL, ReXGroundingCT), fixed here for every grounding figure.

Inputs: `map01` a 3D (X, Y, Z) map with values in [0, 1] (`medssl.explain.maps`), `target` a non-empty boolean
mask of the same shape (an empty target is a UserError: not-groundable phrases are scored separately).

- pointing game: True when every voxel attaining the map's maximum lies in the target (ties count against
  the map, so a constant map scores False unless the target is the whole volume).
- mass inside target: sum(map * target) / sum(map); 0.0 for an all-zero map.
- mIoU (BioViL / MS-CXR protocol): s = 2 * map01 - 1 and IoU(s > t, target) averaged over t in 0.1 .. 0.5.
- CNR, signed (`medssl.explain.measures.cnr`).
- Dice of the thresholded map: 2 |P & T| / (|P| + |T|) with P = map01 > threshold (default 0.5);
  hit (ReXGroundingCT) = Dice >= 0.1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medssl.errors import UserError
from medssl.explain.measures import check_map, check_mask, cnr_of, mass_share

MIOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)  # on the [-1, 1] scale
DICE_THRESHOLD = 0.5  # on the [0, 1] scale
HIT_DICE = 0.1  # ReXGroundingCT hit: Dice >= 0.1



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
    return mass_share(*_map_and_target(map01, target))


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
    return GroundingMetrics(_pointing(values, target), mass_share(values, target),
                            _miou(values, target, miou_thresholds),
                            cnr_of(values, target), d, d >= HIT_DICE)
