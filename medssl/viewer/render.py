"""The app's on-screen pictures: one plane at display size with its map overlay, mask outlines, crosshair
and R/L/A/P/S/I edge letters, and the way back from a click on it to a voxel.

A plane (`slicing.PlaneView`, screen orientation) is enlarged by nearest-neighbour index mapping to a
display size whose aspect follows the pixel size in mm; the map is composited at that size with
`overlay.overlay_map`, so outline mode draws thin lines and the threshold rule is the overlay's. The
crosshair is drawn through the centre of the crosshair voxel. Nothing here changes orientation: the
letters come from the view itself (`PlaneView.labels`), so what is left on screen is the view's left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage.segmentation import find_boundaries

from medssl.errors import UserError
from medssl.viewer.overlay import grey_rgb, overlay_map
from medssl.viewer.slicing import PlaneView
from medssl.viewer.windowing import Window, apply_window

DISPLAY_PX = 320  # longest side of one plane on screen at the default size
LABEL_RGB = (255, 214, 0)
CROSSHAIR_RGB = (0, 255, 0)
LESION_RGB = (255, 0, 255)  # magenta: apart from the crosshair (green) and the colour maps
ORGAN_RGB = (255, 255, 255)


@dataclass(frozen=True)
class MapStyle:
    """How a map is drawn: colour map over [vmin, vmax], opacity, transparent at or below `threshold`,
    "fill" or "outline"."""

    cmap: str = "turbo"
    opacity: float = 0.6
    threshold: float = 0.5
    vmin: float = 0.0
    vmax: float = 1.0
    mode: str = "fill"


@dataclass(frozen=True, eq=False)
class Panel:
    """One plane as shown: `rgb` (H, W, 3) uint8 at display size, the `view` it shows."""

    rgb: np.ndarray
    view: PlaneView

    def voxel_at(self, x: float, y: float, shown_width: float | None = None,
                 shown_height: float | None = None) -> tuple[int, int, int]:
        """A click at (x, y) display pixels (of an image shown `shown_width` x `shown_height` pixels large,
        by default its own size) -> the voxel (i, j, k) of the original array under it."""
        height, width = self.rgb.shape[:2]
        shown_width = width if shown_width is None else shown_width
        shown_height = height if shown_height is None else shown_height
        if not (shown_width > 0 and shown_height > 0):
            raise UserError(f"click: image shown with size {shown_width} x {shown_height}")
        rows, cols = self.view.image.shape
        row = int(np.clip(np.floor(float(y) / shown_height * rows), 0, rows - 1))
        col = int(np.clip(np.floor(float(x) / shown_width * cols), 0, cols - 1))
        return self.view.voxel_at(row, col)


def display_shape(view: PlaneView, longest: int = DISPLAY_PX) -> tuple[int, int]:
    """(height, width) in display pixels: the plane's extent in mm scaled so that its longest side is
    `longest` pixels (at least one display pixel per slice pixel)."""
    rows, cols = view.image.shape
    height_mm, width_mm = rows * view.pixel_mm[0], cols * view.pixel_mm[1]
    scale = longest / max(height_mm, width_mm)
    return max(rows, int(round(height_mm * scale))), max(cols, int(round(width_mm * scale)))


def _enlarge(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows, cols = image.shape[:2]
    r = np.minimum((np.arange(shape[0]) + 0.5) * rows / shape[0], rows - 1).astype(np.intp)
    c = np.minimum((np.arange(shape[1]) + 0.5) * cols / shape[1], cols - 1).astype(np.intp)
    return image[r[:, None], c[None, :]]


@lru_cache(maxsize=4)
def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _letters(rgb: np.ndarray, labels: dict[str, str]) -> np.ndarray:
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    height, width = rgb.shape[:2]
    font = _font(max(12, min(22, min(height, width) // 12)))
    pad = 3
    spots = {"top": ((width / 2, pad), "mt"), "bottom": ((width / 2, height - pad), "mb"),
             "left": ((pad, height / 2), "lm"), "right": ((width - pad, height / 2), "rm")}
    for edge, (xy, anchor) in spots.items():
        draw.text(xy, labels[edge], fill=LABEL_RGB, font=font, anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(img)


def _crosshair(rgb: np.ndarray, view: PlaneView) -> np.ndarray:
    """Lines through the centre of the crosshair voxel, open for two voxels (at least 6 px) around it."""
    height, width = rgb.shape[:2]
    rows, cols = view.image.shape
    gap = max(6, int(round(2 * max(height / rows, width / cols))))
    y = int((view.crosshair[0] + 0.5) * height / rows)
    x = int((view.crosshair[1] + 0.5) * width / cols)
    rgb[y, np.abs(np.arange(width) - x) > gap] = CROSSHAIR_RGB
    rgb[np.abs(np.arange(height) - y) > gap, x] = CROSSHAIR_RGB
    return rgb


def render_panel(view: PlaneView, window: Window | tuple[float, float], *, map_view: PlaneView | None = None,
                 style: MapStyle | None = None, outlines: Sequence[tuple[PlaneView, tuple[int, int, int]]] = (),
                 crosshair: bool = True, letters: bool = True, longest: int = DISPLAY_PX) -> Panel:
    """The plane at display size: windowed grey, the map overlay (`map_view`, same grid and cut), thin
    outlines of masks (`outlines`: (mask view, colour)), the crosshair and the edge letters."""
    shape = display_shape(view, longest)
    grey = _enlarge(apply_window(view.image, *window), shape)
    if map_view is not None:
        if (map_view.image.shape != view.image.shape or map_view.crosshair != view.crosshair
                or map_view.convention != view.convention or map_view.plane != view.plane):
            raise UserError(f"map: its {view.plane} view is not cut like the image's; maps must be on the image's grid")
        style = style or MapStyle()
        rgb = overlay_map(grey, _enlarge(np.asarray(map_view.image, dtype=np.float32), shape), cmap=style.cmap,
                          opacity=style.opacity, threshold=style.threshold, vmin=style.vmin, vmax=style.vmax,
                          mode=style.mode)
    else:
        rgb = grey_rgb(grey)
    for mask_view, colour in outlines:
        mask = _enlarge(np.asarray(mask_view.image) > 0, shape)
        rgb[find_boundaries(mask, mode="inner") & mask] = colour
    if crosshair:
        rgb = _crosshair(rgb, view)
    if letters:
        rgb = _letters(rgb, view.labels)
    return Panel(np.ascontiguousarray(rgb), view)
