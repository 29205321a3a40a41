"""The viewer's pure functions: windowing, orientation-aware slicing, overlays, statistics and metrics,
the review table and path checks."""

from __future__ import annotations

import math
import multiprocessing
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medssl.errors import UserError
from medssl.explain.maps import LinearRescaling, MapSidecar, peak
from medssl.app import paths, review
from medssl.display import overlay, slicing, windowing
from medssl.viewer import stats
from medssl.display.slicing import display_grid, edge_labels, mm_to_voxel, plane_slice, three_planes, voxel_to_mm

# ----------------------------------------------------------------------------------------------- windowing


def test_ct_presets_are_the_clinical_numbers():
    assert windowing.CT_PRESETS == {"lung": (1500, -600), "soft tissue": (400, 40), "bone": (1500, 300),
                                    "brain": (80, 40)}
    assert windowing.CT_PRESETS["lung"].width == 1500 and windowing.CT_PRESETS["lung"].level == -600
    labels = windowing.preset_labels()
    assert {"lung 1500/-600", "soft tissue 400/40", "bone 1500/300", "brain 80/40"} <= set(labels)
    assert windowing.MR_PERCENTILE_PRESETS == {"1-99 %": (1, 99), "5-95 %": (5, 95), "0.5-99.5 %": (0.5, 99.5)}


def test_apply_window_maps_the_window_to_unit_range():
    lung = windowing.CT_PRESETS["lung"]
    out = windowing.apply_window(np.array([-2000, -1350, -600, 150, 3000]), *lung)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1])
    assert lung.low == -1350 and lung.high == 150
    brain = windowing.CT_PRESETS["brain"]
    np.testing.assert_allclose(windowing.apply_window(np.array([0.0, 20.0, 40.0, 60.0, 80.0]), *brain),
                               [0, 0.25, 0.5, 0.75, 1])
    with pytest.raises(UserError, match="width"):
        windowing.apply_window(np.zeros(3), 0, 40)
    with pytest.raises(UserError, match="NaN"):
        windowing.apply_window(np.array([0.0, np.nan]), 400, 40)


def test_percentile_window():
    window = windowing.percentile_window(np.arange(101.0), 1, 99)
    assert window == (98.0, 50.0)
    out = windowing.apply_window(np.arange(101.0), *window)
    assert out[1] == 0 and out[99] == 1 and out[50] == pytest.approx(0.5)
    values = np.concatenate([np.zeros(1000), np.arange(1.0, 102.0)])  # MR background plus tissue
    mask = values > 0
    assert windowing.percentile_window(values, 0, 100, mask=mask) == (100.0, 51.0)
    assert windowing.percentile_window(np.full(10, 7.0), 5, 95) == (1.0, 7.0)
    with pytest.raises(UserError, match="percentiles"):
        windowing.percentile_window(np.arange(10.0), 99, 1)


# ----------------------------------------------------------------------------------------------- slicing

SHAPE_RAS = (20, 24, 16)
SPACING = (1.0, 2.0, 3.0)
LEFT, SUPERIOR, ANTERIOR = 1.0, 2.0, 3.0  # marker values
CENTRE = (10, 12, 8)


def _phantom_ras() -> tuple[np.ndarray, np.ndarray]:
    """RAS-stored phantom: a cube on the patient's LEFT (low x), one SUPERIOR (high z), one ANTERIOR (high y),
    all through the centre slices; the affine puts the centre voxel at the world origin."""
    array = np.zeros(SHAPE_RAS, np.float32)
    cx, cy, cz = CENTRE
    array[1:4, cy - 1:cy + 2, cz - 1:cz + 2] = LEFT
    array[cx - 1:cx + 2, cy - 1:cy + 2, 13:16] = SUPERIOR
    array[cx - 1:cx + 2, 20:23, cz - 1:cz + 2] = ANTERIOR
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-c * s for c, s in zip(CENTRE, SPACING)]
    return array, affine


def _stored(codes: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """The RAS phantom stored with axis codes `codes` (built by hand, not with nibabel), its affine and the
    stored index of the centre voxel."""
    array, affine = _phantom_ras()
    axis_of = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    perm = [axis_of[c] for c in codes]
    flips = [c in "LPI" for c in codes]
    stored = array.transpose(perm)
    m = np.zeros((4, 4))
    m[3, 3] = 1
    for d, (r, flip) in enumerate(zip(perm, flips)):
        if flip:
            stored = np.flip(stored, axis=d)
            m[r, d], m[r, 3] = -1, SHAPE_RAS[r] - 1
        else:
            m[r, d] = 1
    stored_affine = affine @ m
    centre = tuple(int(v) for v in np.rint(np.linalg.solve(stored_affine, [0, 0, 0, 1])[:3]))
    assert "".join(nib.aff2axcodes(stored_affine)) == codes
    return np.ascontiguousarray(stored), stored_affine, centre


ORIENTATIONS = ("RAS", "LAS", "LPS", "SLP", "AIR")


def _side(view: slicing.PlaneView, value: float) -> tuple[float, float]:
    """Mean (row, col) of the marker pixels, as a fraction of the image size."""
    rows, cols = np.nonzero(view.image == value)
    assert rows.size > 0, f"marker {value} not in the {view.plane} view"
    return (rows.mean() + 0.5) / view.image.shape[0], (cols.mean() + 0.5) / view.image.shape[1]


@pytest.mark.parametrize("codes", ORIENTATIONS)
@pytest.mark.parametrize("convention", ["radiological", "neurological"])
def test_markers_land_on_the_labelled_screen_side(codes, convention):
    stored, affine, centre = _stored(codes)
    views = three_planes((stored, affine), centre, convention)
    left_on_screen = "right" if convention == "radiological" else "left"
    axial, coronal, sagittal = views["axial"], views["coronal"], views["sagittal"]
    # axial: anterior at the top, patient's left on the screen's right (radiological) or left (neurological)
    assert _side(axial, ANTERIOR)[0] < 0.5
    assert (_side(axial, LEFT)[1] > 0.5) == (left_on_screen == "right")
    assert axial.labels == {"top": "A", "bottom": "P", "left": "L" if left_on_screen == "left" else "R",
                            "right": "L" if left_on_screen == "right" else "R"}
    # coronal: superior at the top, left/right as axial
    assert _side(coronal, SUPERIOR)[0] < 0.5
    assert (_side(coronal, LEFT)[1] > 0.5) == (left_on_screen == "right")
    assert coronal.labels == {**axial.labels, "top": "S", "bottom": "I"}
    # sagittal: superior at the top, anterior on the left in both conventions
    assert _side(sagittal, SUPERIOR)[0] < 0.5 and _side(sagittal, ANTERIOR)[1] < 0.5
    assert sagittal.labels == {"top": "S", "bottom": "I", "left": "A", "right": "P"}
    # the label on the marker's side names the marker's direction
    for view, value, letter in ((axial, LEFT, "L"), (coronal, LEFT, "L"), (axial, ANTERIOR, "A"),
                                (coronal, SUPERIOR, "S"), (sagittal, SUPERIOR, "S"), (sagittal, ANTERIOR, "A")):
        row, col = _side(view, value)
        edge = min((("top", row), ("bottom", 1 - row), ("left", col), ("right", 1 - col)), key=lambda e: e[1])[0]
        assert view.labels[edge] == letter, (view.plane, value, edge)


@pytest.mark.parametrize("codes", ORIENTATIONS[1:])
def test_every_storage_order_shows_the_same_pictures(codes):
    ras, ras_affine, ras_centre = _stored("RAS")
    stored, affine, centre = _stored(codes)
    for convention in slicing.CONVENTIONS:
        expected = three_planes((ras, ras_affine), ras_centre, convention)
        got = three_planes((stored, affine), centre, convention)
        for plane in slicing.PLANES:
            np.testing.assert_array_equal(got[plane].image, expected[plane].image)
            assert got[plane].pixel_mm == expected[plane].pixel_mm
            assert got[plane].crosshair == expected[plane].crosshair


@pytest.mark.parametrize("codes", ORIENTATIONS)
def test_clicks_map_to_voxels_and_millimetres(codes):
    stored, affine, centre = _stored(codes)
    views = three_planes((stored, affine), centre, "radiological")
    for plane, view in views.items():
        assert view.voxel_at(*view.crosshair) == centre  # the linked crosshair
        rows, cols = np.nonzero(view.image == LEFT) if plane != "sagittal" else np.nonzero(view.image == SUPERIOR)
        voxel = view.voxel_at(rows[0], cols[0])
        assert stored[voxel] == view.image[rows[0], cols[0]]
        x, y, z = voxel_to_mm(affine, voxel)
        if plane == "sagittal":
            assert z > 0  # superior marker
        else:
            assert x < 0  # the patient's left is negative x in RAS+
        assert mm_to_voxel(affine, (x, y, z), stored.shape) == voxel
        for row, col in ((0, 0), (view.image.shape[0] - 1, 3), (5, view.image.shape[1] - 1)):
            assert view.pixel_of(view.voxel_at(row, col)) == (row, col)
    assert voxel_to_mm(affine, centre) == pytest.approx((0, 0, 0))
    with pytest.raises(UserError, match="outside the volume"):
        mm_to_voxel(affine, (0, 0, 500), stored.shape)
    with pytest.raises(UserError, match="click"):
        views["axial"].voxel_at(-1, 0)


def test_pixel_sizes_slice_navigation_and_a_map_on_the_same_grid():
    stored, affine, centre = _stored("SLP")
    views = three_planes((stored, affine), centre)
    assert views["axial"].pixel_mm == (2.0, 1.0) and views["coronal"].pixel_mm == (3.0, 1.0)
    assert views["sagittal"].pixel_mm == (3.0, 2.0)
    assert views["axial"].image.shape == (24, 20) and views["sagittal"].image.shape == (16, 24)
    grid = display_grid(stored.shape, affine)
    assert grid.ras_shape == SHAPE_RAS and grid.slice_count("axial") == 16
    assert grid.slice_position(centre, "axial") == CENTRE[2]
    top = grid.with_slice(centre, "axial", 15)  # the most superior slice
    assert voxel_to_mm(affine, top)[2] == pytest.approx((15 - CENTRE[2]) * 3.0)
    assert plane_slice((stored, affine), "axial", top).image.max() == SUPERIOR
    mask = (stored == LEFT).astype(np.float32)  # a "map" on the image's grid
    for plane, view in views.items():
        map_view = plane_slice((mask, affine), plane, centre, grid=grid)
        np.testing.assert_array_equal(map_view.image > 0, view.image == LEFT)
    with pytest.raises(UserError, match="plane"):
        plane_slice((stored, affine), "transverse", centre)
    with pytest.raises(UserError, match="convention"):
        plane_slice((stored, affine), "axial", centre, "surgical")
    with pytest.raises(UserError, match="outside the volume"):
        plane_slice((stored, affine), "axial", (99, 0, 0))
    with pytest.raises(UserError, match="3D"):
        plane_slice((stored[..., None], affine), "axial", centre)


def test_oblique_affine_uses_the_closest_orientation_and_says_so():
    array, affine = _phantom_ras()
    angle = np.radians(20)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    grid = display_grid(array.shape, rotation @ affine)
    assert grid.oblique and grid.obliquity_deg == pytest.approx(20, abs=1e-6)
    view = plane_slice((array, rotation @ affine), "axial", CENTRE)
    assert "oblique" in view.note and view.labels == edge_labels("axial")
    np.testing.assert_array_equal(view.image, plane_slice((array, affine), "axial", CENTRE).image)
    assert plane_slice((array, affine), "axial", CENTRE).note is None


# ----------------------------------------------------------------------------------------------- overlay


def _grey_and_map() -> tuple[np.ndarray, np.ndarray]:
    grey = np.random.default_rng(0).uniform(0, 1, (20, 24)).astype(np.float32)
    heat = np.full((20, 24), 0.3, np.float32)
    heat[4:10, 5:11] = 0.9
    heat[12, 20] = 0.55  # just above the threshold: painted even though below vmin
    return grey, heat


def test_overlay_fill_changes_exactly_the_pixels_above_threshold():
    grey, heat = _grey_and_map()
    base = overlay.grey_rgb(grey)
    out = overlay.overlay_map(grey, heat, opacity=0.6, threshold=0.5, vmin=0.6, vmax=1.0)
    assert out.dtype == np.uint8 and out.shape == (20, 24, 3)
    changed = (out != base).any(axis=-1)
    np.testing.assert_array_equal(changed, heat > 0.5)
    opaque = overlay.overlay_map(grey, heat, opacity=1.0, threshold=0.5, cmap="viridis")
    np.testing.assert_array_equal(opaque[5, 6], overlay.map_colours(np.array([0.9]), "viridis")[0])
    np.testing.assert_array_equal(overlay.overlay_map(grey, heat, opacity=0.0), base)
    with pytest.raises(UserError, match="does not match"):
        overlay.overlay_map(grey, heat[:, :-1])
    with pytest.raises(UserError, match="window the image first"):
        overlay.overlay_map(grey * 100, heat)


def test_overlay_outline_leaves_the_interior_grey():
    grey, heat = _grey_and_map()
    heat[12, 20] = 0.3
    base = overlay.grey_rgb(grey)
    out = overlay.overlay_map(grey, heat, opacity=0.8, threshold=0.5, mode="outline")
    changed = (out != base).any(axis=-1)
    ring = np.zeros_like(changed)
    ring[4:10, 5:11] = True
    ring[5:9, 6:10] = False
    np.testing.assert_array_equal(changed, ring)
    assert changed.sum() == 20


def test_label_overlay_and_crosshair():
    grey = np.full((10, 10), 0.5, np.float32)
    labels = np.zeros((10, 10), np.int16)
    labels[1:4, 1:4], labels[6:9, 6:9] = 1, 7
    out = overlay.overlay_labels(grey, labels, opacity=1.0)
    colours = overlay.label_colours(labels)
    assert set(colours) == {1, 7} and colours[1] != colours[7]
    np.testing.assert_array_equal(out[2, 2], colours[1])
    np.testing.assert_array_equal(out[7, 7], colours[7])
    np.testing.assert_array_equal(out[labels == 0], overlay.grey_rgb(grey)[labels == 0])
    custom = overlay.overlay_labels(grey, labels, opacity=1.0, palette={7: (1, 2, 3)}, mode="outline")
    np.testing.assert_array_equal(custom[6, 6], (1, 2, 3))
    np.testing.assert_array_equal(custom[7, 7], overlay.grey_rgb(grey)[7, 7])  # interior stays grey
    with pytest.raises(UserError, match="integer"):
        overlay.overlay_labels(grey, labels.astype(float))
    lines = overlay.draw_crosshair(overlay.grey_rgb(grey), 4, 6, gap=1)
    assert (lines[4, 0] == overlay.CROSSHAIR_RGB).all() and (lines[9, 6] == overlay.CROSSHAIR_RGB).all()
    assert (lines[4, 6] == 128).all() and (lines[4, 5] == 128).all()  # the voxel itself stays visible


def test_colorbar_and_png_with_provenance(tmp_path):
    bar = overlay.colorbar_image(threshold=0.5, caption="cosine similarity [-1, 1], linear [-1, 1] -> [0, 1]",
                                 rescaling=LinearRescaling.model_validate({"from": [-1, 1]}))
    assert bar.dtype == np.uint8 and bar.shape[0] == 300 and bar.shape[2] == 3 and bar.std() > 0
    stored, affine, centre = _stored("LPS")
    image = np.where(stored > 0, 200.0, -800.0).astype(np.float32)  # HU
    heat = (stored == LEFT).astype(np.float32)
    provenance = {"checkpoint": "runs/g/checkpoints/last.pt", "phrase": "lésion de 14 mm, foie",
                  "preprocessing": {"spacing": [1, 2, 3], "window": [40, 400]},
                  "rescaling": {"name": "linear", "from": [-1, 1], "to": [0, 1]}, "threshold": 0.5}
    path = overlay.render_views_png(tmp_path / "views.png", three_planes((image, affine), centre),
                                    three_planes((heat, affine), centre), window=windowing.CT_PRESETS["lung"],
                                    provenance=provenance, caption="cosine similarity", threshold=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["views.png"]
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1]
        text = dict(img.text)
    assert text["checkpoint"] == "runs/g/checkpoints/last.pt" and text["phrase"] == "lésion de 14 mm, foie"
    assert text["threshold"] == "0.5" and '"window": [40, 400]' in text["preprocessing"]
    assert overlay.png_provenance(path) == provenance
    with pytest.raises(UserError, match="missing key.*threshold"):
        overlay.render_views_png(tmp_path / "x.png", three_planes((image, affine), centre), window=(400, 40),
                                 provenance={k: v for k, v in provenance.items() if k != "threshold"})
    assert not (tmp_path / "x.png").exists()
    shifted = affine.copy()
    shifted[:3, 3] += 5.0
    with pytest.raises(UserError, match="affine differs"):
        overlay.render_views_png(tmp_path / "x.png", three_planes((image, affine), centre),
                                 three_planes((heat, shifted), centre), window=(400, 40), provenance=provenance)
    with pytest.raises(UserError, match="another voxel"):
        overlay.render_views_png(tmp_path / "x.png", three_planes((image, affine), centre),
                                 three_planes((heat, affine), (0, 0, 0)), window=(400, 40), provenance=provenance)


def test_png_from_a_map_sidecar(tmp_path):
    stored, affine, centre = _stored("RAS")
    heat = (stored == LEFT).astype(np.float32)
    voxel, mm = peak(heat, affine)
    sidecar = MapSidecar(kind="grounding", image="vol/a.nii.gz", checkpoint="ck.pt", phrase="left cube",
                         raw_scale={"name": "attention", "sums_to": 1},
                         rescaling={"name": "min-max", "from": [0.0, 0.02]}, groundable=True, score=0.3,
                         score_threshold=0.1, peak_voxel=voxel, peak_mm=mm, preprocessing={"spacing": [1, 2, 3]})
    provenance = overlay.provenance_from_sidecar(sidecar, threshold=0.4)
    assert provenance["rescaling"] == {"name": "min-max", "from": [0.0, 0.02]} and provenance["threshold"] == 0.4
    path = overlay.render_views_png(tmp_path / "a.png", three_planes((stored, affine), centre),
                                    three_planes((heat, affine), centre), window=(4, 2), provenance=provenance,
                                    sidecar=sidecar, threshold=0.4)
    assert overlay.png_provenance(path)["phrase"] == "left cube"
    with_sidecar = overlay.colorbar_image(sidecar=sidecar, threshold=0.4)
    plain = overlay.colorbar_image(threshold=0.4)
    assert with_sidecar.shape[0] == plain.shape[0] and not np.array_equal(with_sidecar, plain)  # caption, raw axis


# ----------------------------------------------------------------------------------------------- stats


def test_region_stats():
    heat = np.zeros((6, 4, 4), np.float32)
    heat[0:2] = 0.5
    heat[1, 2, 3] = 1.0
    liver = np.zeros(heat.shape, bool)
    liver[0:3] = True
    spleen = ~liver
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    result = stats.region_stats(heat, affine, {"liver": liver, "spleen": spleen.astype(np.uint8)})
    assert result.peak_voxel == (1, 2, 3) and result.peak_mm == (2.0, 4.0, 6.0) and result.peak_value == 1.0
    assert result.peak_regions == ["liver"]
    assert result.shares == {"liver": pytest.approx(1.0), "spleen": 0.0}
    assert result.top_region == "liver" and result.top_region_cnr > 0
    empty = stats.region_stats(np.zeros((6, 4, 4)), affine, {"liver": liver})
    assert empty.top_region is None and math.isnan(empty.top_region_cnr) and empty.shares == {"liver": 0.0}
    with pytest.raises(UserError, match="spleen: a mask must be boolean"):
        stats.mass_shares(heat, {"spleen": spleen * 2})


# ----------------------------------------------------------------------------------------------- review

ROW = {"run": "runs/ground-1", "checkpoint": "ckpt-a.pt", "image": "vol/P001.nii.gz",
       "phrase": "A 14 mm lesion in the liver.", "verdict": "right", "comment": ""}


def _append_many(csv_path: str, worker: int, count: int, barrier) -> None:
    barrier.wait()
    for n in range(count):
        review.append_review(csv_path, {**ROW, "comment": f"worker {worker}, row {n}"})


def test_review_roundtrip_and_summary(tmp_path):
    table = tmp_path / "reviews" / "reviews.csv"
    assert review.read_reviews(table) == []
    tricky = 'looks off, "maybe" the kidney\nsecond line, ünïcode'
    stored = review.append_review(table, {**ROW, "comment": tricky})
    review.append_review(table, {**ROW, "verdict": "wrong_region"})
    review.append_review(table, {**ROW, "checkpoint": "ckpt-b.pt", "verdict": "should_not_be_groundable",
                                 "time": "2025-01-02T03:04:05+00:00"})
    rows = review.read_reviews(table)
    assert [r.verdict for r in rows] == ["right", "wrong_region", "should_not_be_groundable"]
    assert rows[0].comment == tricky and rows[0].time == stored.time and rows[2].time.startswith("2025-01-02")
    assert table.read_text(encoding="utf-8").splitlines()[0] == ",".join(review.COLUMNS)
    summary = review.review_summary(rows)
    assert summary["ckpt-a.pt"] == {"right": 1, "wrong_region": 1, "should_not_be_groundable": 0, "total": 2,
                                    "share_right": 0.5}
    assert summary["ckpt-b.pt"]["share_right"] == 0.0
    with pytest.raises(UserError, match="verdict"):
        review.append_review(table, {**ROW, "verdict": "maybe"})
    with pytest.raises(UserError, match="score"):
        review.append_review(table, {**ROW, "score": 3})
    with pytest.raises(UserError, match="time"):
        review.append_review(table, {**ROW, "time": "yesterday"})
    assert len(review.read_reviews(table)) == 3
    other = tmp_path / "other.csv"
    other.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(UserError, match="other.csv: not a review table"):
        review.append_review(other, ROW)


def test_concurrent_appends_lose_no_rows(tmp_path):
    table = tmp_path / "reviews.csv"
    workers, count = 4, 15
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(workers)
    processes = [context.Process(target=_append_many, args=(str(table), w, count, barrier)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [p.exitcode for p in processes] == [0] * workers
    comments = sorted(row.comment for row in review.read_reviews(table))
    assert comments == sorted(f"worker {w}, row {n}" for w in range(workers) for n in range(count))


# ----------------------------------------------------------------------------------------------- paths


def test_resolve_under_refuses_escapes(tmp_path):
    root, other, outside = tmp_path / "data", tmp_path / "more", tmp_path / "secret"
    for folder in (root / "sub", other, outside):
        folder.mkdir(parents=True)
    (root / "sub" / "a.nii.gz").write_bytes(b"x")
    (other / "b.nii.gz").write_bytes(b"x")
    (outside / "passwd").write_text("x")
    os.symlink(outside / "passwd", root / "link_out")
    os.symlink(root / "sub" / "a.nii.gz", root / "link_in")
    roots = [root, other]
    assert paths.resolve_under(roots, "sub/a.nii.gz") == (root / "sub" / "a.nii.gz").resolve()
    assert paths.resolve_under(roots, "b.nii.gz") == (other / "b.nii.gz").resolve()  # second root
    assert paths.resolve_under(roots, str(root / "sub" / "a.nii.gz")) == (root / "sub" / "a.nii.gz").resolve()
    assert paths.resolve_under(roots, "sub/../sub/a.nii.gz").name == "a.nii.gz"
    assert paths.resolve_under(roots, "link_in") == (root / "sub" / "a.nii.gz").resolve()
    for bad, message in (("../secret/passwd", r"'\.\.' leads outside"), ("sub/../../secret/passwd", "leads outside"),
                         (str(outside / "passwd"), "outside the allowed"),
                         (str(root / ".." / "secret" / "passwd"), "outside the allowed"),
                         ("link_out", "symbolic link leads outside"), ("sub/missing.nii", "no such file"),
                         ("", "empty")):
        with pytest.raises(UserError, match=message) as err:
            paths.resolve_under(roots, bad)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not an existing folder"):
        paths.resolve_under([tmp_path / "nope"], "a")


def test_check_upload():
    limit = paths.UPLOAD_LIMIT_BYTES
    assert limit == 512 * 2**20
    assert paths.check_upload("scan.nii.gz", limit) == "scan.nii.gz"
    assert paths.check_upload("SCAN.MHA", 10) == "SCAN.MHA"
    for name, size, message in (("scan.nii.gz", limit + 1, "exceeds the limit"), ("scan.nii.gz", 0, "empty"),
                                ("scan.exe", 10, "unsupported type"), ("../scan.nii", 10, "path separators"),
                                ("dir/scan.nii", 10, "path separators"), (".hidden.nii", 10, "start with"),
                                ("scan.mhd", 10, "unsupported type")):
        with pytest.raises(UserError, match=message):
            paths.check_upload(name, size)


def test_no_streamlit_import():
    code = ("import sys, medssl.explain.maps, medssl.display.windowing, medssl.display.slicing, "
            "medssl.display.overlay, medssl.viewer.stats, medssl.app.review, medssl.app.paths; "
            "print('streamlit' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", check=True)
    assert result.stdout.strip() == "False"
