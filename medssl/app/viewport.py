"""What the reading viewport (NiiVue in the browser, `viewport/src/viewport.js`) is given, as plain functions:
volumes and maps as NIfTI bytes (thinned for display when large, saying so), label colour tables, the trust
cues of a map (its raw score scale, a low peak, two maps that are near-identical) and the map's default
display. No streamlit here: `app.py` serves the bytes (Streamlit's media files) and mounts the component.

The bundle itself (NiiVue + viewport.js, built by `npm run build` in `viewport/`, which `make install` runs)
is `BUNDLE`; `check_bundle` is the one clear error when it was not built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medssl.errors import UserError

HERE = Path(__file__).resolve().parent / "viewport"
BUNDLE = HERE / "dist" / "viewport.js"
COMPONENT = "medssl.viewport"  # "<project>.<component>" as declared in pyproject.toml [tool.streamlit.component]
DISPLAY_MAX_VOXELS = 48 * 2**20  # what one pane sends to the browser: a 512 x 512 x 192 CT at full resolution
LOW_PEAK_COSINE = 0.2  # a cosine map whose peak inside the body stays below this is weak: say so beside it
CORRELATED = 0.9  # two maps of one image whose Pearson r is above this are near-identical: warn
MAP_CMAPS = ("hot", "warm", "plasma", "viridis", "inferno", "jet", "turbo")
LESION_RGB = (255, 0, 255)
# organ outlines: distinct colours in label order (the first few chosen to read well on grey CT)
LABEL_PALETTE = ((0, 200, 255), (255, 200, 0), (0, 255, 120), (255, 120, 40), (180, 120, 255), (255, 90, 160),
                 (120, 255, 255), (200, 255, 0), (255, 255, 255), (80, 160, 255), (255, 60, 60), (160, 255, 160))


def check_bundle() -> Path:
    """The built viewer bundle; UserError naming the file and the command that builds it when it is missing."""
    if not BUNDLE.is_file() or BUNDLE.stat().st_size == 0:
        raise UserError(f"{BUNDLE}: the viewer's web bundle is not built; run `make install` (or `npm ci && npm run "
                        f"build` in {HERE}) with the npm registry reachable")
    return BUNDLE


# ----------------------------------------------------------------------------------------------- NIfTI for display


def display_steps(shape: tuple[int, ...], spacing: tuple[float, ...],
                  max_voxels: int = DISPLAY_MAX_VOXELS) -> tuple[int, int, int]:
    """Integer steps per axis so that a volume of `shape` sent for display has at most `max_voxels` voxels.
    The slice axis (the coarsest spacing; the last on ties) is thinned first, so that a 512 x 512 slice keeps
    every in-plane voxel; the in-plane axes are thinned only when that is not enough."""
    steps = [1, 1, 1]
    order = sorted(range(3), key=lambda a: (-float(spacing[a]), -a))

    def count() -> int:
        return math.prod(math.ceil(n / s) for n, s in zip(shape[:3], steps))

    first = order[0]
    while count() > max_voxels and steps[first] < 4:
        steps[first] += 1
    while count() > max_voxels:
        axis = min(range(3), key=lambda a: (float(spacing[a]) * steps[a], -shape[a] // steps[a]))
        steps[axis] += 1
    return tuple(steps)


def nifti_bytes(array: np.ndarray, affine: np.ndarray, steps: tuple[int, int, int] = (1, 1, 1), *,
                kind: str = "image") -> bytes:
    """An uncompressed NIfTI-1 of `array` (X, Y, Z) every `steps` voxels, with the affine of that grid.
    kind "image": int16 when the values are whole numbers in its range, else float32; "map": float32;
    "labels": uint8 (values 0-255)."""
    sx, sy, sz = steps
    data = np.asarray(array)[::sx, ::sy, ::sz]
    if kind == "labels":
        if data.size and (data.min() < 0 or data.max() > 255):
            raise UserError(f"labels: values must lie in 0-255 to be shown, got {data.min()}-{data.max()}")
        data = data.astype(np.uint8)
    elif kind == "image" and np.issubdtype(data.dtype, np.integer) and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16)
    elif kind == "image" and data.size and np.array_equal(data, np.round(data)) and -32768 <= data.min() \
            and data.max() <= 32767:
        data = data.astype(np.int16)
    else:
        data = data.astype(np.float32)
    grid = np.array(affine, dtype=np.float64)
    grid[:3, :3] = grid[:3, :3] * np.array(steps, dtype=np.float64)[None, :]
    image = nib.Nifti1Image(np.ascontiguousarray(data), grid)
    image.header.set_qform(grid, code=1)
    image.header.set_sform(grid, code=1)
    image.header["cal_min"] = float(data.min()) if data.size else 0.0
    image.header["cal_max"] = float(data.max()) if data.size else 0.0
    return image.to_bytes()


def thinning_note(shape: tuple[int, ...], steps: tuple[int, int, int]) -> str | None:
    """The line that says a volume is shown thinned (None when it is shown whole)."""
    if steps == (1, 1, 1):
        return None
    shown = tuple(math.ceil(n / s) for n, s in zip(shape[:3], steps))
    return (f"shown thinned for display: {shape[0]} x {shape[1]} x {shape[2]} voxels as {shown[0]} x {shown[1]} x "
            f"{shown[2]} (every {steps[0]}, {steps[1]}, {steps[2]} voxels); read-outs and statistics use every voxel")


def label_table(names: Mapping[int, str], *, colour: tuple[int, int, int] | None = None
                ) -> tuple[dict[str, list], list[tuple[str, tuple[int, int, int]]]]:
    """NiiVue's label colour table for label values -> names (one colour each, or `colour` for all) and the
    legend [(name, rgb)]."""
    top = max([0, *names])
    r, g, b, a = [0] * (top + 1), [0] * (top + 1), [0] * (top + 1), [0] * (top + 1)
    labels = [""] * (top + 1)
    legend = []
    for n, value in enumerate(sorted(names)):
        if value <= 0:
            continue
        rgb = colour or LABEL_PALETTE[n % len(LABEL_PALETTE)]
        r[value], g[value], b[value], a[value] = *rgb, 255
        labels[value] = names[value]
        legend.append((names[value], tuple(rgb)))
    return {"R": r, "G": g, "B": b, "A": a, "I": list(range(top + 1)), "labels": labels}, legend


# ----------------------------------------------------------------------------------------------- trust cues


@dataclass(frozen=True)
class MapDisplay:
    """How a map is drawn, in the map's raw units (e.g. cosine): colours from `threshold` (transparent at or
    below it) to `vmax`; `range` is what the threshold slider covers (the map's raw minimum and peak)."""

    threshold: float
    vmax: float
    range: tuple[float, float]
    opacity: float = 0.6
    cmap: str = "hot"
    mode: str = "fill"

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "vmax": self.vmax, "range": list(self.range), "opacity": self.opacity,
                "cmap": self.cmap, "mode": self.mode}


def raw_map(result: Any) -> np.ndarray:
    """The map on its raw scale (float32), from `map01` through the sidecar's rescaling."""
    return np.asarray(result.raw(result.map01), dtype=np.float32)


def default_display(result: Any, *, top: float = 0.05, cmap: str = "hot") -> MapDisplay:
    """A new map's display: transparent below the top `top` share of its voxels inside the body (map > 0),
    colours up to its peak, all in raw units so the colour bar states the model's own numbers."""
    inside = result.map01[result.map01 > 0]
    if inside.size == 0:
        lo = float(result.raw(0.0))
        return MapDisplay(lo, float(result.raw(1.0)), (lo, float(result.raw(1.0))), cmap=cmap)
    peak = float(inside.max())
    cut = min(float(np.quantile(inside, 1.0 - top)), peak)
    lo, threshold, vmax = (float(result.raw(v)) for v in (float(inside.min()), cut, peak))
    if vmax <= threshold:
        threshold = vmax - 1e-3 * max(1.0, abs(vmax))
    return MapDisplay(round(threshold, 4), round(vmax, 4), (round(lo, 4), round(vmax, 4)), cmap=cmap)


def to_map01(result: Any, raw: float) -> float:
    """A raw value back on the map's [0, 1] scale (the rescaling is linear)."""
    r0, r1 = float(result.raw(0.0)), float(result.raw(1.0))
    return float(np.clip((raw - r0) / (r1 - r0), 0.0, 1.0)) if r1 != r0 else 0.0


def map_cues(result: Any) -> list[str]:
    """Warnings to show beside a map: a weak peak (cosine maps), which says the colours are this map's own
    stretch and not strength."""
    if result.map01 is None:
        return []
    scale = result.sidecar.raw_scale
    peak = float(result.raw(float(result.map01.max())))
    if getattr(scale, "name", "") == "cosine" and peak < LOW_PEAK_COSINE:
        return [f"weak map: its peak cosine is {peak:.3f} (below {LOW_PEAK_COSINE:g}); the colours stretch this "
                "map's own range, they do not mean strong agreement"]
    return []


def map_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson r of two maps of one image over the voxels where either is above 0 (None for other grids or
    a constant map)."""
    if a is None or b is None or a.shape != b.shape:
        return None
    where = (a > 0) | (b > 0)
    x, y = a[where].astype(np.float64), b[where].astype(np.float64)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def correlation_cue(r: float | None) -> str | None:
    """The warning for two near-identical maps (None below `CORRELATED`)."""
    if r is None or r < CORRELATED:
        return None
    return (f"the two maps are near-identical (Pearson r = {r:.2f} inside the body): the map may not depend on what "
            "is compared (phrase or model)")
