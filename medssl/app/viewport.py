"""What the reading viewport (NiiVue in the browser, `viewport/src/viewport.js`) is given, as plain functions:
volumes and maps as NIfTI bytes (thinned for display when large, saying so; maps and masks cropped to what they
cover), label colour tables, the trust cues of a result (a close found / not-found call, two maps that are
near-identical, what the model read in the phrase and which organ it searched) and the map's default display. No
streamlit here: `app.py` serves the bytes (Streamlit's media files) and mounts the component.

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
NEAR_THRESHOLD = 0.05  # a finding score this close to its threshold is a close call: say so beside it
PROBABILITY_CUT = 0.5  # a probability map is coloured from here (organ: the organ; finding: one of the stated size)
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


def content_box(array: np.ndarray, steps: tuple[int, int, int] = (1, 1, 1)) -> tuple[slice, slice, slice]:
    """The block of `array` (X, Y, Z) that holds every nonzero voxel, its start on the display grid (a multiple
    of `steps`), so that a map or mask cropped to it lies on the image's display grid (the whole array when all
    voxels are 0)."""
    inside = np.asarray(array) != 0
    if not inside.any():
        return tuple(slice(0, n) for n in array.shape[:3])
    box = []
    for axis, s in enumerate(steps):  # per-axis projections: a fraction of np.nonzero's time on a 512^3 volume
        idx = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(idx[0]) // s * s, int(idx[-1]) + 1))
    return tuple(box)


def nifti_bytes(array: np.ndarray, affine: np.ndarray, steps: tuple[int, int, int] = (1, 1, 1), *,
                kind: str = "image", crop: bool = False) -> bytes:
    """An uncompressed NIfTI-1 of `array` (X, Y, Z) every `steps` voxels, with the affine of that grid.
    kind "image": int16 when the values are whole numbers in its range, else float32; "map": float32;
    "labels": uint8 (values 0-255). crop: only the `content_box` (a map that is 0 outside one organ, a lesion
    mask), with the affine of that block: the viewer places it on the image by its affine, and a 512^3 CT's
    map travels as its organ's box."""
    array = np.asarray(array)
    box = content_box(array, steps) if crop else tuple(slice(0, n) for n in array.shape[:3])
    affine = np.array(affine, dtype=np.float64)
    affine[:3, 3] = affine[:3, :3] @ np.array([b.start for b in box], dtype=np.float64) + affine[:3, 3]
    sx, sy, sz = steps
    data = array[box][::sx, ::sy, ::sz]
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
    """How a map is drawn, in the map's raw units (a probability, or e.g. a cosine for older map files): colours
    from `threshold` (transparent at or below it) to `vmax`; `range` is what the threshold slider covers."""

    threshold: float
    vmax: float
    range: tuple[float, float]
    opacity: float = 0.6
    cmap: str = "hot"
    mode: str = "fill"

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "vmax": self.vmax, "range": list(self.range), "opacity": self.opacity,
                "cmap": self.cmap, "mode": self.mode}


def map_nifti(result: Any, affine: np.ndarray, steps: tuple[int, int, int] = (1, 1, 1)) -> bytes:
    """The map for display: its raw values (the sidecar's scale) in the `content_box` of `map01` (where the map
    is above 0), as `nifti_bytes` of kind "map" with the affine of that block. Cropped before it is rescaled, so a
    512 x 300 CT's map costs what its organ's box does."""
    box = content_box(result.map01, steps)
    shifted = np.array(affine, dtype=np.float64)
    shifted[:3, 3] = shifted[:3, :3] @ np.array([b.start for b in box], dtype=np.float64) + shifted[:3, 3]
    return nifti_bytes(np.asarray(result.raw(result.map01[box]), dtype=np.float32), shifted, steps, kind="map")


def default_display(result: Any, *, top: float = 0.05, cmap: str = "hot") -> MapDisplay:
    """A new map's display. A probability map (what grounding writes) is drawn from its stated cut
    `PROBABILITY_CUT` to 1, the same for every map, so a colour means the same probability in every pane. A map
    on another scale (older map files) is drawn from its top `top` share of voxels above 0 up to its peak, in its
    raw units (and `result_cues` says that those colours are the map's own stretch)."""
    if result.is_probability:
        return MapDisplay(PROBABILITY_CUT, 1.0, (0.0, 1.0), cmap=cmap)
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


def result_cues(result: Any) -> list[str]:
    """Warnings to show beside a result: a found / not-found call within `NEAR_THRESHOLD` of its threshold (a
    close call either way), and a map whose colours are its own stretch rather than a stated probability."""
    cues = []
    if result.kind == "finding" and abs(result.score - result.threshold) < NEAR_THRESHOLD:
        call = "found" if result.groundable else "not found"
        cues.append(f"close call: score {result.score:.3f} is within {NEAR_THRESHOLD:g} of the threshold "
                    f"{result.threshold:.3f}; '{call}' could as well have gone the other way")
    if result.map01 is not None and not result.is_probability:
        cues.append(f"the colours stretch this map's own range ({result.sidecar.raw_scale.name}); they do not state "
                    "a probability")
    return cues


def query_lines(result: Any) -> list[str]:
    """What the model searched for, as a clinician checks it: the parsed query (organ, finding kind, places,
    stated size), the words the sentence encoder (MiniLM) read as concepts with their confidence, the words not
    understood, and the organ searched with its predicted volume. Empty for results without a stored query."""
    query, lines = result.query, []
    if query:
        organs = ", ".join(query.get("organs") or []) or "any organ the model saw findings in"
        kind = query.get("kind") or "the organ itself"
        parts = [f"organ **{organs}**", f"finding **{kind}**"]
        if query.get("locations"):
            parts.append(f"places **{', '.join(query['locations'])}**")
        if query.get("size_mm") is not None:
            parts.append(f"size **{float(query['size_mm']):g} mm**")
        if query.get("statement") not in (None, "finding"):
            parts.append(f"**{query['statement']}** statement")
        lines.append("read as: " + " · ".join(parts))
        mapped = [f"'{m['word']}' as {m['slot']} '{m['concept']}' ({float(m['confidence']):.2f}"
                  + ("" if m.get("used") else ", not used: its slot was filled") + ")"
                  for m in query.get("mapped") or []]
        if mapped:
            lines.append("words read by MiniLM (confidence): " + "; ".join(mapped))
        if query.get("unknown"):
            lines.append("words not understood: " + ", ".join(query["unknown"]))
    if result.organ:
        volume = (f" (predicted {result.organ_ml:.1f} ml, {result.organ_voxels} voxels of the organ head's grid)"
                  if result.organ_voxels else "")
        lines.append(f"organ searched: **{result.organ}**{volume}")
    return lines


def phrase_notes(result: Any) -> list[str]:
    """The grounder's notes on a phrase less those `query_lines` already shows (mapped and unknown words)."""
    shown = ("word '", 'word "', "words not understood") if result.query else ()
    return [note for note in result.warnings if not note.startswith(shown)]


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
