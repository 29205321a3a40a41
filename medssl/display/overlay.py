"""Compositing for display: a windowed grey slice plus a map or label overlay -> uint8 RGB.

All slices are 2D (rows, cols) in screen orientation (as `slicing.plane_slice` returns them); the grey
slice is already windowed to [0, 1] (`windowing.apply_window`). A map slice holds values in [0, 1]
(the map file contract). Map pixels with value <= `threshold` are fully transparent (the same strict
"> threshold" rule as the grounding metrics in `stats`); the colour scale runs separately from `vmin`
to `vmax`. `mode="outline"` paints only the inner boundary of the region above the threshold, so the
anatomy under the map stays visible.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from skimage.segmentation import find_boundaries

import medssl
from medssl.atomic import atomic_path
from medssl.errors import UserError
from medssl.explain.maps import (
    LinearRescaling,
    MapSidecar,
    MinMaxRescaling,
    check_same_grid,
    describe_scale,
    raw_values,
)
from medssl.display.slicing import PlaneView
from medssl.display.windowing import Window, apply_window

MODES = ("fill", "outline")
PROVENANCE_KEYS = ("checkpoint", "phrase", "preprocessing", "rescaling", "threshold")
PROVENANCE_CHUNK = "medssl-provenance"  # PNG iTXt chunk holding the whole provenance as JSON
CROSSHAIR_RGB = (0, 255, 0)
# discrete palette for label maps: label k > 0 gets LABEL_PALETTE[(k - 1) % 20] (matplotlib "tab20")
LABEL_PALETTE = np.rint(np.asarray(matplotlib.colormaps["tab20"].colors) * 255).astype(np.uint8)


def _grey(grey: np.ndarray) -> np.ndarray:
    grey = np.asarray(grey)
    if grey.ndim != 2:
        raise UserError(f"grey slice: expected a 2D (rows, cols) array, got shape {tuple(grey.shape)}")
    if not np.isfinite(grey).all():
        raise UserError("grey slice: has NaN/inf values")
    if grey.size and (grey.min() < 0 or grey.max() > 1):
        raise UserError(f"grey slice: values must lie in [0, 1], got [{grey.min():g}, {grey.max():g}]; "
                        "window the image first (apply_window)")
    return grey.astype(np.float32)


def grey_rgb(grey: np.ndarray) -> np.ndarray:
    """Windowed grey slice (rows, cols) in [0, 1] -> uint8 RGB (rows, cols, 3)."""
    return np.repeat(np.rint(_grey(grey) * 255).astype(np.uint8)[..., None], 3, axis=-1)


def _same_shape(grey: np.ndarray, other: np.ndarray, what: str) -> None:
    if other.shape != grey.shape:
        raise UserError(f"{what}: slice shape {tuple(other.shape)} does not match the image slice "
                        f"{tuple(grey.shape)}; the overlay must be on the image's grid")


def _blend(base: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    out = base.astype(np.float32) * (1 - alpha[..., None]) + colour.astype(np.float32) * alpha[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _check_opacity_mode(opacity: float, mode: str) -> None:
    if not (np.isfinite(opacity) and 0.0 <= opacity <= 1.0):
        raise UserError(f"opacity: must lie in [0, 1], got {opacity!r}")
    if mode not in MODES:
        raise UserError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")


def map_colours(values: np.ndarray, cmap: str = "inferno", vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """Map values -> uint8 RGB (..., 3) with a matplotlib colour map over [vmin, vmax] (clipped)."""
    if not (np.isfinite(vmin) and np.isfinite(vmax) and vmin < vmax):
        raise UserError(f"colour scale: need finite vmin < vmax, got ({vmin!r}, {vmax!r})")
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as err:
        raise UserError(f"cmap: unknown matplotlib colour map {cmap!r}") from err
    rgba = colormap(Normalize(vmin, vmax, clip=True)(np.asarray(values, dtype=np.float64)))
    return np.rint(np.asarray(rgba)[..., :3] * 255).astype(np.uint8)


def overlay_map(grey: np.ndarray, map_slice: np.ndarray, *, cmap: str = "inferno", opacity: float = 0.5,
                threshold: float = 0.5, vmin: float = 0.0, vmax: float = 1.0, mode: str = "fill") -> np.ndarray:
    """Grey slice (rows, cols) in [0, 1] + map slice (rows, cols) in [0, 1] -> uint8 RGB (rows, cols, 3).

    Pixels with map <= threshold show the grey image unchanged; the others (fill) or the inner boundary
    of their region (outline) get the colour of their value, blended with `opacity`.
    """
    base = grey_rgb(grey)
    values = np.asarray(map_slice)
    _same_shape(np.asarray(grey), values, "map")
    if not np.isfinite(values).all():
        raise UserError("map slice: has NaN/inf values")
    _check_opacity_mode(opacity, mode)
    shown = values > threshold
    if mode == "outline":
        shown = find_boundaries(shown, mode="inner") & shown
    alpha = np.where(shown, np.float32(opacity), np.float32(0.0))
    return _blend(base, map_colours(values, cmap, vmin, vmax), alpha)


def label_colours(labels: Any) -> dict[int, tuple[int, int, int]]:
    """Colour of each label value > 0 in the discrete palette (for a legend)."""
    return {int(k): tuple(int(c) for c in LABEL_PALETTE[(int(k) - 1) % len(LABEL_PALETTE)])
            for k in sorted(set(np.unique(np.asarray(labels)).tolist())) if k > 0}


def overlay_labels(grey: np.ndarray, labels: np.ndarray, *, opacity: float = 0.5, mode: str = "fill",
                   palette: Mapping[int, tuple[int, int, int]] | None = None) -> np.ndarray:
    """Grey slice in [0, 1] + integer label slice (0 = background, transparent) -> uint8 RGB.

    Label k gets `palette[k]` when given, else `LABEL_PALETTE[(k - 1) % 20]`. Outline mode paints the
    boundary of each labelled region (also between touching labels).
    """
    base = grey_rgb(grey)
    labels = np.asarray(labels)
    _same_shape(np.asarray(grey), labels, "labels")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"labels: expected an integer label slice, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise UserError(f"labels: negative label {int(labels.min())}; labels are 0 (background) or positive")
    _check_opacity_mode(opacity, mode)
    colours = dict(label_colours(labels))
    if palette is not None:
        colours.update({int(k): tuple(v) for k, v in palette.items()})
    table = np.zeros((int(labels.max(initial=0)) + 1, 3), dtype=np.uint8)
    for k, rgb in colours.items():
        if k < len(table):
            table[k] = rgb
    shown = labels > 0
    if mode == "outline":
        shown = find_boundaries(labels, mode="inner") & shown
    return _blend(base, table[labels], np.where(shown, np.float32(opacity), np.float32(0.0)))


def draw_crosshair(rgb: np.ndarray, row: int, col: int, *, colour: tuple[int, int, int] = CROSSHAIR_RGB,
                   gap: int = 2) -> np.ndarray:
    """Copy of an RGB(A) image (rows, cols, C) with a full-width horizontal line through `row` and a
    vertical one through `col`, leaving `gap` pixels free around the crosshair voxel itself."""
    rgb = np.array(rgb, copy=True)
    rows, cols = rgb.shape[:2]
    if not (0 <= row < rows and 0 <= col < cols):
        raise UserError(f"crosshair: ({row}, {col}) outside the {rows} x {cols} image")
    colour = np.asarray(colour, dtype=np.uint8)[: rgb.shape[2]]
    far_cols = np.abs(np.arange(cols) - col) > gap
    far_rows = np.abs(np.arange(rows) - row) > gap
    rgb[row, far_cols, : len(colour)] = colour
    rgb[far_rows, col, : len(colour)] = colour
    return rgb


# ----------------------------------------------------------------------------------------------- colour bar


def _draw_colorbar(fig: Figure, cax: Any, *, cmap: str, vmin: float, vmax: float, threshold: float | None,
                   caption: str, rescaling: LinearRescaling | MinMaxRescaling | None) -> None:
    map_colours(np.zeros(1), cmap, vmin, vmax)  # validates cmap, vmin, vmax
    bar = fig.colorbar(ScalarMappable(Normalize(vmin, vmax), matplotlib.colormaps[cmap]), cax=cax)
    parts = re.split(r", (?![^\[]*\])", caption) if caption else []  # "<raw scale>, <rescaling>", not inside [..]
    lines = [f"map value [0, 1]: {parts[0]}" if parts else "map value [0, 1]", *parts[1:]]
    if threshold is not None:
        lines.append(f"transparent at or below {threshold:g}")
        if vmin <= threshold <= vmax:
            cax.axhline(threshold, color="cyan", linewidth=2)
    # the label runs along the bar: wrap it to the bar's length so that no word is cut off the figure
    length_px = cax.get_position().height * fig.get_figheight() * fig.dpi
    per_line = max(16, int(length_px / (8 * fig.dpi / 72 * 0.6)))
    bar.set_label("\n".join(part for line in lines for part in textwrap.wrap(line, per_line, break_on_hyphens=False)),
                  fontsize=8)
    if rescaling is not None and rescaling.from_[1] > rescaling.from_[0]:
        lo, hi = rescaling.from_
        to = rescaling.to if isinstance(rescaling, LinearRescaling) else (0.0, 1.0)

        def inverse(raw: np.ndarray) -> np.ndarray:
            return to[0] + (np.asarray(raw) - lo) / (hi - lo) * (to[1] - to[0])

        raw = cax.secondary_yaxis("left", functions=(lambda v: raw_values(rescaling, v), inverse))
        raw.set_ylabel("raw", fontsize=8)
        raw.tick_params(labelsize=7)
    cax.tick_params(labelsize=7)


def _figure_rgb(fig: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _scale_from(sidecar: MapSidecar | None, caption: str,
                rescaling: LinearRescaling | MinMaxRescaling | None) -> tuple[str, Any]:
    if sidecar is None:
        return caption, rescaling
    return caption or describe_scale(sidecar.raw_scale, sidecar.rescaling), rescaling or sidecar.rescaling


def colorbar_image(*, cmap: str = "inferno", vmin: float = 0.0, vmax: float = 1.0, threshold: float | None = None,
                   caption: str = "", rescaling: LinearRescaling | MinMaxRescaling | None = None,
                   sidecar: MapSidecar | None = None, height_px: int = 300, dpi: int = 100) -> np.ndarray:
    """A vertical colour bar as uint8 RGB (height_px, w, 3). The label states the scale (`caption`, by
    default `maps.describe_scale` of the `sidecar`) and the threshold (a cyan line); with `rescaling` (by
    default the sidecar's) a second axis shows the raw values."""
    caption, rescaling = _scale_from(sidecar, caption, rescaling)
    fig = Figure(figsize=(2.2, height_px / dpi), dpi=dpi)
    cax = fig.add_axes((0.45, 0.05, 0.12, 0.9))
    _draw_colorbar(fig, cax, cmap=cmap, vmin=vmin, vmax=vmax, threshold=threshold, caption=caption,
                   rescaling=rescaling)
    return _figure_rgb(fig)


# ----------------------------------------------------------------------------------------------- PNG export


def _png_chunks(provenance: Mapping[str, Any]) -> PngInfo:
    missing = [key for key in PROVENANCE_KEYS if key not in provenance]
    if missing:
        raise UserError(f"provenance: missing key(s) {', '.join(missing)}; a rendered map must say where it "
                        "came from")
    info = PngInfo()
    for key, value in provenance.items():
        if not (isinstance(key, str) and 0 < len(key) < 80 and key == key.strip() and key != PROVENANCE_CHUNK
                and all(32 <= ord(c) < 127 for c in key)):
            raise UserError(f"provenance: key {key!r} cannot be a PNG text keyword (1-79 printable ASCII)")
        info.add_itxt(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str))
    info.add_itxt(PROVENANCE_CHUNK, json.dumps(dict(provenance), sort_keys=True, default=str))
    info.add_itxt("Software", f"medssl {medssl.__version__}")
    return info


def provenance_from_sidecar(sidecar: MapSidecar, threshold: float) -> dict[str, Any]:
    """The provenance of a rendered map: the sidecar's checkpoint, phrase, image, preprocessing, raw scale
    and rescaling plus the display threshold."""
    data = sidecar.model_dump(mode="json", by_alias=True)
    keys = ("checkpoint", "phrase", "image", "kind", "preprocessing", "raw_scale", "rescaling", "medssl_version")
    return {**{key: data[key] for key in keys}, "threshold": threshold}


def png_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance embedded by `render_views_png` (from its "medssl-provenance" text chunk)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            text = dict(getattr(img, "text", {}))
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError for bad files
        raise UserError(f"{path}: cannot read PNG ({type(err).__name__}: {err})") from err
    if PROVENANCE_CHUNK not in text:
        raise UserError(f"{path}: PNG has no {PROVENANCE_CHUNK} text chunk")
    return json.loads(text[PROVENANCE_CHUNK])


def render_views_png(path: str | os.PathLike, image_views: Mapping[str, PlaneView],
                     map_views: Mapping[str, PlaneView] | None = None, *, window: Window | tuple[float, float],
                     provenance: Mapping[str, Any], cmap: str = "inferno", opacity: float = 0.5,
                     threshold: float = 0.5, vmin: float = 0.0, vmax: float = 1.0, mode: str = "fill",
                     caption: str = "", rescaling: LinearRescaling | MinMaxRescaling | None = None,
                     sidecar: MapSidecar | None = None, crosshair: bool = True, dpi: int = 100) -> Path:
    """Write a PNG of the planes side by side (in the order of `image_views`), each windowed with
    `window` = (width, level), with the map overlay (`map_views`, same planes, same grid), edge labels,
    the crosshair and a colour bar captioned with the map's scale (`caption` / `rescaling`, by default
    from `sidecar`, as in `colorbar_image`).

    `provenance` (must hold checkpoint, phrase, preprocessing, rescaling, threshold) is embedded as PNG
    iTXt chunks, one per key (non-strings as JSON) plus all of it as JSON under "medssl-provenance".
    The file is written atomically. Returns the path.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"{path}: render_views_png writes PNG; the name must end in .png")
    if not image_views:
        raise UserError("image_views: nothing to render")
    if map_views is not None and set(map_views) != set(image_views):
        raise UserError(f"map_views: planes {sorted(map_views)} differ from the image's {sorted(image_views)}")
    info = _png_chunks(provenance)
    caption, rescaling = _scale_from(sidecar, caption, rescaling)
    width, level = window
    panels = []
    for plane, view in image_views.items():
        grey = apply_window(view.image, width, level)
        if map_views is not None:
            other = map_views[plane]
            check_same_grid(view.grid.shape, view.grid.affine, other.grid.shape, other.grid.affine,
                            map_name=f"map_views[{plane!r}]")
            if (other.crosshair, other.convention, other._axes) != (view.crosshair, view.convention, view._axes):
                raise UserError(f"map_views[{plane!r}]: cut through another voxel or convention than the image")
            rgb = overlay_map(grey, map_views[plane].image, cmap=cmap, opacity=opacity, threshold=threshold,
                              vmin=vmin, vmax=vmax, mode=mode)
        else:
            rgb = grey_rgb(grey)
        panels.append((view, rgb))
    fig = Figure(figsize=(4 * len(panels) + 2.4, 4.6), dpi=dpi)
    span = 1.0 / (len(panels) + 0.6)
    for n, (view, rgb) in enumerate(panels):
        ax = fig.add_axes((n * span + 0.01, 0.08, span - 0.02, 0.82))
        ax.imshow(rgb, aspect=view.pixel_mm[0] / view.pixel_mm[1], interpolation="nearest")
        ax.set_axis_off()
        if crosshair:  # thin vector lines (draw_crosshair burns whole pixels: too thick on small volumes)
            ax.axhline(view.crosshair[0], color="lime", linewidth=0.8, alpha=0.8)
            ax.axvline(view.crosshair[1], color="lime", linewidth=0.8, alpha=0.8)
        ax.set_title(f"{view.plane} ({view.convention})", fontsize=9)
        style = dict(transform=ax.transAxes, color="yellow", fontsize=10, fontweight="bold")
        ax.text(0.5, 0.99, view.labels["top"], ha="center", va="top", **style)
        ax.text(0.5, 0.01, view.labels["bottom"], ha="center", va="bottom", **style)
        ax.text(0.01, 0.5, view.labels["left"], ha="left", va="center", **style)
        ax.text(0.99, 0.5, view.labels["right"], ha="right", va="center", **style)
        if view.note:
            ax.text(0.5, -0.04, view.note, ha="center", va="top", fontsize=6, color="red", transform=ax.transAxes,
                    wrap=True)
    if map_views is not None:
        cax = fig.add_axes((len(panels) * span + 0.12 * span, 0.1, 0.05 * span, 0.78))
        _draw_colorbar(fig, cax, cmap=cmap, vmin=vmin, vmax=vmax, threshold=threshold, caption=caption,
                       rescaling=rescaling)
    phrase = provenance.get("phrase")
    fig.suptitle(f"{phrase}" if isinstance(phrase, str) else "", fontsize=10)
    rgb = _figure_rgb(fig)
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG", pnginfo=info)
    return path
