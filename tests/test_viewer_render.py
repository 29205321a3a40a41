"""The app's rendering path (`medssl.viewer.render`): left stays left after enlargement, letters and overlays,
clicks back to voxels; and the colour bar's label fits its figure."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from test_viewer import LEFT, ORIENTATIONS, SUPERIOR, _stored

from medssl.errors import UserError
from medssl.explain.maps import LinearRescaling
from medssl.viewer import overlay
from medssl.viewer.render import DISPLAY_PX, LABEL_RGB, MapStyle, display_shape, render_panel
from medssl.viewer.slicing import CONVENTIONS, three_planes

HU = {0.0: -800.0, LEFT: 200.0, SUPERIOR: 200.0, 3.0: 200.0}


def _grey_value(view_image: np.ndarray) -> np.ndarray:
    return np.vectorize(HU.get)(view_image).astype(np.float32)


def _side(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    assert rows.size, "nothing drawn"
    return (rows.mean() + 0.5) / mask.shape[0], (cols.mean() + 0.5) / mask.shape[1]


def _letter_side(rgb: np.ndarray, letter_box: str) -> bool:
    """True when the letters' colour is drawn in the middle of the `letter_box` edge band."""
    height, width = rgb.shape[:2]
    middle_rows, middle_cols = slice(height // 3, 2 * height // 3), slice(width // 3, 2 * width // 3)
    band = {"left": rgb[middle_rows, :width // 12], "right": rgb[middle_rows, -width // 12:],
            "top": rgb[:height // 12, middle_cols], "bottom": rgb[-height // 12:, middle_cols]}
    near = np.abs(band[letter_box].astype(int) - np.asarray(LABEL_RGB)).max(axis=-1) < 40  # anti-aliased text
    return int(near.sum()) >= 3


@pytest.mark.parametrize("codes", ORIENTATIONS)
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_rendered_planes_keep_left_on_the_left_label_and_the_map_on_its_marker(codes, convention):
    """An asymmetric phantom stored in five orientations: in every rendered plane (enlarged, letters drawn) the
    map of the LEFT cube covers exactly the cube's pixels and lies on the side whose letter is L; the marker
    above lies on the S side."""
    stored, affine, centre = _stored(codes)
    image = np.vectorize(HU.get)(stored).astype(np.float32)
    left_map = (stored == LEFT).astype(np.float32)
    views = three_planes((image, affine), centre, convention)
    maps = three_planes((left_map, affine), centre, convention)
    markers = three_planes((stored, affine), centre, convention)
    style = MapStyle(cmap="turbo", opacity=1.0, threshold=0.5, vmin=0.0, vmax=1.0, mode="fill")
    for plane in ("axial", "coronal"):
        bare = render_panel(views[plane], (400, 40), crosshair=False, letters=False).rgb
        shown = render_panel(views[plane], (400, 40), map_view=maps[plane], style=style, crosshair=False,
                             letters=False).rgb
        painted = (shown != bare).any(axis=-1)
        expected = render_panel(three_planes(((stored == LEFT).astype(np.float32), affine), centre, convention)[plane],
                                (1, 0.5), crosshair=False, letters=False).rgb[..., 0] > 127
        np.testing.assert_array_equal(painted, expected)  # the map lands on the marker after enlargement
        left_edge = "left" if _side(painted)[1] < 0.5 else "right"
        assert views[plane].labels[left_edge] == "L", (plane, convention)
        assert (left_edge == "right") == (convention == "radiological")
        lettered = render_panel(views[plane], (400, 40), map_view=maps[plane], style=style).rgb
        assert _letter_side(lettered, left_edge) and _letter_side(lettered, "top")
    for plane in ("coronal", "sagittal"):
        superior = render_panel(three_planes(((stored == SUPERIOR).astype(np.float32), affine), centre,
                                             convention)[plane], (1, 0.5), crosshair=False, letters=False).rgb[..., 0]
        assert _side(superior > 127)[0] < 0.5 and markers[plane].labels["top"] == "S"


def test_display_size_follows_millimetres_and_clicks_return_the_voxel():
    stored, affine, centre = _stored("SLP")  # voxels 1 x 2 x 3 mm
    views = three_planes((stored, affine), centre)
    axial = views["axial"]  # rows: 24 voxels of 2 mm (A-P), cols: 20 voxels of 1 mm (R-L)
    assert display_shape(axial) == (DISPLAY_PX, round(DISPLAY_PX * 20 / 48))
    panel = render_panel(axial, (4, 2))
    assert panel.rgb.shape[:2] == display_shape(axial) and panel.rgb.dtype == np.uint8
    height, width = panel.rgb.shape[:2]
    for row, col in ((0, 0), (23, 19), (7, 3)):
        voxel = axial.voxel_at(row, col)
        x, y = (col + 0.5) * width / 20, (row + 0.5) * height / 24
        assert panel.voxel_at(x, y) == voxel
        assert panel.voxel_at(x * 0.5, y * 0.5, width * 0.5, height * 0.5) == voxel  # shown at half size
    assert panel.voxel_at(-5, height + 5) == axial.voxel_at(23, 0)  # clamped to the edge pixels
    with pytest.raises(UserError, match="click"):
        panel.voxel_at(1, 1, 0, 10)
    # the crosshair passes through the centre of the crosshair voxel
    row, col = axial.crosshair
    y, x = int((row + 0.5) * height / 24), int((col + 0.5) * width / 20)
    assert (panel.rgb[y, 0] == (0, 255, 0)).all() and (panel.rgb[0, x] == (0, 255, 0)).all()


def test_a_map_cut_elsewhere_is_refused():
    stored, affine, centre = _stored("RAS")
    views = three_planes((stored, affine), centre)
    other = three_planes((stored.astype(np.float32) / 3, affine), (0, 0, 0))
    with pytest.raises(UserError, match="not cut like the image"):
        render_panel(views["axial"], (4, 2), map_view=other["axial"])


def test_colorbar_label_is_wrapped_inside_its_figure():
    caption = "cosine similarity [-1, 1], linear [-1, 1] -> [0, 1]"
    fig = Figure(figsize=(2.2, 3.2), dpi=100)
    cax = fig.add_axes((0.45, 0.05, 0.12, 0.9))
    overlay._draw_colorbar(fig, cax, cmap="turbo", vmin=0.2, vmax=0.4, threshold=0.25, caption=caption,
                           rescaling=LinearRescaling.model_validate({"from": [-1, 1]}))
    fig.canvas.draw()
    label = cax.yaxis.label
    box, page = label.get_window_extent(), fig.bbox
    assert box.y0 >= page.y0 - 1 and box.y1 <= page.y1 + 1  # the whole text along the bar is inside
    lines = label.get_text().split("\n")
    assert lines == ["map value [0, 1]: cosine similarity [-1, 1]", "linear [-1, 1] -> [0, 1]",
                     "transparent at or below 0.25"]
    assert overlay.colorbar_image(caption=caption, threshold=0.25, height_px=320).shape[0] == 320
