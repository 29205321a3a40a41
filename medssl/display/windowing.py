"""Intensity windows for display: CT width/level presets and MR percentile presets.

A window is (width, level) in the image's units (HU for CT): values from level - width/2 to
level + width/2 map linearly to [0, 1], clipped. Note the order: viewers quote "width/level"
(lung 1500/-600); `medssl.data.volumes.Preprocessing.window` stores (level, width).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from medssl.errors import UserError


class Window(NamedTuple):
    """A display window in image units: `width` > 0 and `level` (the centre)."""

    width: float
    level: float

    @property
    def low(self) -> float:
        """Value shown black."""
        return self.level - self.width / 2

    @property
    def high(self) -> float:
        """Value shown white."""
        return self.level + self.width / 2

    @property
    def label(self) -> str:
        """"W/L" as viewers write it, e.g. "1500/-600"."""
        return f"{self.width:g}/{self.level:g}"


# CT presets (HU), shown with their numbers. Public viewers have shipped lung as 150/-600 and bone and
# brain swapped; tests pin these values.
CT_PRESETS: dict[str, Window] = {
    "lung": Window(1500.0, -600.0),
    "soft tissue": Window(400.0, 40.0),
    "bone": Window(1500.0, 300.0),
    "brain": Window(80.0, 40.0),
}

# MR presets: (lower, upper) percentiles of the volume's intensities mapped to black and white.
MR_PERCENTILE_PRESETS: dict[str, tuple[float, float]] = {
    "1-99 %": (1.0, 99.0),
    "5-95 %": (5.0, 95.0),
    "0.5-99.5 %": (0.5, 99.5),
}


def preset_labels() -> dict[str, str]:
    """Menu entries with their numbers: {"lung 1500/-600": "lung", ..., "MR 1-99 %": "1-99 %"}."""
    labels = {f"{name} {window.label}": name for name, window in CT_PRESETS.items()}
    labels.update({f"MR {name}": name for name in MR_PERCENTILE_PRESETS})
    return labels


def _check_window(width: float, level: float) -> None:
    if not (np.isfinite(width) and width > 0):
        raise UserError(f"window width: must be a positive number, got {width!r}")
    if not np.isfinite(level):
        raise UserError(f"window level: must be a finite number, got {level!r}")


def _finite(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise UserError(f"{what}: expected a numeric array, got dtype {array.dtype}")
    if array.size and not np.isfinite(array).all():
        raise UserError(f"{what}: has {int((~np.isfinite(array)).sum())} NaN/inf values; cannot window it")
    return array


def apply_window(array: np.ndarray, width: float, level: float) -> np.ndarray:
    """Any-shape array -> float32 in [0, 1]: (x - (level - width/2)) / width, clipped."""
    _check_window(width, level)
    array = _finite(array, "image")
    out = (array.astype(np.float32) - np.float32(level - width / 2)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def percentile_window(array: np.ndarray, lower: float, upper: float, *, mask: np.ndarray | None = None) -> Window:
    """(width, level) that maps the `lower` and `upper` percentiles (of the voxels in `mask`, or of all
    voxels) to black and white. A constant array gets width 1 centred on its value (shown mid-grey)."""
    if not 0.0 <= lower < upper <= 100.0:
        raise UserError(f"percentiles: need 0 <= lower < upper <= 100, got ({lower:g}, {upper:g})")
    array = _finite(array, "image")
    values = array[np.asarray(mask, dtype=bool)] if mask is not None else array.ravel()
    if values.size == 0:
        raise UserError("image: no voxels to compute percentiles from (empty array or mask)")
    lo, hi = (float(v) for v in np.percentile(values, [lower, upper]))
    if hi <= lo:
        return Window(1.0, lo)
    return Window(hi - lo, (lo + hi) / 2)


# words of a phrase that choose the CT window it opens in (anything else: soft tissue)
PHRASE_WINDOWS: dict[str, tuple[str, ...]] = {
    "lung": ("lung", "lungs", "pulmonary", "nodule", "nodules", "pneumothorax", "emphysema", "bronch", "airway",
             "pleura", "pleural", "ground-glass", "consolidation", "lobe"),
    "bone": ("bone", "bones", "spine", "spinal", "vertebra", "vertebral", "vertebrae", "rib", "ribs", "fracture",
             "osseous", "sclerotic", "lytic", "skull", "pelvis", "femur"),
    "brain": ("brain", "cerebral", "cerebellar", "intracranial", "ventricle", "ventricles", "cortex", "cortical"),
}


def preset_for_phrase(phrase: str | None) -> str:
    """The CT window preset a phrase opens in: lung findings in the lung window, bone findings in the bone
    window, brain findings in the brain window, everything else soft tissue."""
    words = "".join(c if c.isalnum() or c == "-" else " " for c in (phrase or "").lower()).split()
    for preset, cues in PHRASE_WINDOWS.items():
        if any(word == cue or (cue == "bronch" and word.startswith(cue)) for word in words for cue in cues):
            return preset
    return "soft tissue"
