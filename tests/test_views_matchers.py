"""Anatomical matchers, crops with known geometry and the 3D pretraining micro-batches."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import DataLoader

from medssl.data.preprocessing import VolumePreprocessing
from medssl.data.synthetic.hospital import make_hospital
from medssl.errors import UserError
from medssl.data.body import body_mask
from medssl.pretrain.matchers import BodyBoxMatcher, Matcher, build_matcher
from medssl.pretrain.views import (
    CropGeometry,
    cell_centres,
    corresponding_points,
    crop_to_feature,
    extract_crop,
    feature_to_crop,
    intensity_jitter,
    region_map,
    sample_crop,
    sample_overlapping,
)
from medssl.pretrain.volume_batches import VolumePretrainBatches

N = 48
CENTRE = np.full(3, (N - 1) / 2)
SHIFT = np.array([2.0, -3.0, 1.5])


def _ellipsoid(centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(N)] * 3, indexing="ij"), -1)
    return (((grid - centre) / radii) ** 2).sum(-1) <= 1


def _phantom() -> tuple[np.ndarray, np.ndarray]:
    """(N, N, N) torso-like volume in [0, 1] (body, bright organ, dark lung, bright spine) and the
    organ's centroid (3,), the landmark."""
    rng = np.random.default_rng(0)
    vol = np.zeros((N,) * 3, np.float32)
    vol[_ellipsoid(CENTRE, np.array([0.38, 0.30, 0.42]) * N)] = 0.45
    organ = _ellipsoid(CENTRE + np.array([-0.12, 0.05, -0.1]) * N, np.array([0.12, 0.09, 0.1]) * N)
    vol[organ] = 0.7
    vol[_ellipsoid(CENTRE + np.array([0.12, 0.0, 0.18]) * N, np.array([0.08, 0.08, 0.12]) * N)] = 0.0  # lung
    vol[_ellipsoid(CENTRE + np.array([0.0, -0.2, 0.0]) * N, np.array([0.04, 0.04, 0.4]) * N)] = 1.0  # spine
    vol = ndimage.gaussian_filter(vol, 0.7) + 0.02 * rng.standard_normal(vol.shape) * (vol > 0)
    return np.clip(vol, 0, 1).astype(np.float32), np.argwhere(organ).mean(0)


def _moved(vol: np.ndarray, landmark: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`vol` resampled so that output[x] = vol[matrix @ x + offset]; returns it and the landmark's true place."""
    offset = CENTRE - matrix @ CENTRE + SHIFT
    moved = ndimage.affine_transform(vol, matrix, offset, order=1).astype(np.float32)
    return moved, np.linalg.solve(matrix, landmark - offset)


def _rotation(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


@pytest.fixture(scope="module")
def phantoms() -> dict:
    vol, landmark = _phantom()
    scaled, scaled_truth = _moved(vol, landmark, np.diag([1.1, 0.92, 1.05]))
    rotated, rotated_truth = _moved(vol, landmark, _rotation(30))
    volumes = [vol, scaled, rotated]
    return {"volumes": volumes, "landmark": landmark, "truth": {1: scaled_truth, 2: rotated_truth},
            "box": build_matcher("body_box").fit(volumes),
            "registration": build_matcher("registration").fit(volumes, [(1.0, 1.0, 1.0)] * 3)}


# ------------------------------------------------------------------------------------------------ matchers


def test_body_mask_keeps_largest_component_and_fills_the_lung(phantoms):
    vol = phantoms["volumes"][0].copy()
    vol[1:3, 1:3, 1:3] = 1.0  # a speck outside the body
    mask = body_mask(vol)
    assert not mask[1:3, 1:3, 1:3].any()
    lung = CENTRE + np.array([0.12, 0.0, 0.18]) * N
    assert vol[tuple(np.rint(lung).astype(int))] < 0.05 and mask[tuple(np.rint(lung).astype(int))]
    assert not mask[0, 0, 0] and mask[tuple(np.rint(CENTRE).astype(int))]


@pytest.mark.parametrize("name", ["box", "registration"])
def test_matchers_find_the_landmark_on_a_scaled_shifted_copy(phantoms, name):
    matcher = phantoms[name]
    mapped, accepted = matcher.match(0, phantoms["landmark"][None], 1)
    assert accepted.all()
    assert np.linalg.norm(mapped[0] - phantoms["truth"][1]) < 1.5


def test_registration_follows_a_rotation_the_body_box_cannot(phantoms):
    errors = {name: np.linalg.norm(phantoms[name].match(0, phantoms["landmark"][None], 2)[0][0]
                                   - phantoms["truth"][2]) for name in ("box", "registration")}
    assert errors["registration"] < 1.0
    assert errors["box"] > 2.0 and errors["registration"] < errors["box"] / 3


def test_registration_is_deterministic_and_inverse_consistent(phantoms):
    again = build_matcher("registration").fit(phantoms["volumes"][:2])
    np.testing.assert_array_equal(again.from_reference[1], phantoms["registration"].from_reference[1])
    points = np.array([[20.0, 25.0, 30.0], [10.0, 11.0, 12.0]])
    back = again.from_normalised(1, again.to_normalised(1, points))
    np.testing.assert_allclose(back, points, atol=1e-9)


def test_normalised_frame_is_the_body_box(phantoms):
    matcher = phantoms["box"]
    lo, hi = matcher.boxes[0]
    np.testing.assert_allclose(matcher.to_normalised(0, np.stack([lo, hi])), [[0, 0, 0], [1, 1, 1]])
    points = np.array([[3.0, 40.0, 17.5]])
    np.testing.assert_allclose(matcher.from_normalised(0, matcher.to_normalised(0, points)), points)


def test_match_rejects_points_outside_the_body_and_counts():
    vol, landmark = _phantom()
    matcher = BodyBoxMatcher().fit([vol, vol])
    assert np.isnan(matcher.acceptance_rate)
    lo, _ = matcher.boxes[0]
    points = np.stack([landmark, lo, [-5.0, 0.0, 0.0]])  # in the body, box corner (air), outside the array
    mapped, accepted = matcher.match(0, points, 1)
    np.testing.assert_allclose(mapped[0], landmark)
    assert accepted.tolist() == [True, False, False]
    matcher.match(0, landmark[None], 1)
    assert (matcher.tried, matcher.accepted) == (4, 2) and matcher.acceptance_rate == 0.5


def test_matcher_errors_name_the_volume_or_option():
    with pytest.raises(UserError, match="/data/empty.nii.gz"):
        BodyBoxMatcher().fit([np.zeros((8, 8, 8), np.float32)], names=["/data/empty.nii.gz"])
    with pytest.raises(UserError, match="matcher: 'landmarks'"):
        build_matcher("landmarks")
    with pytest.raises(UserError, match="matcher.seed"):
        build_matcher("registration", seed=0)
    with pytest.raises(UserError, match="bad options"):
        build_matcher("body_box", iterations=3)


# ------------------------------------------------------------------------------------------------- views


def test_identity_crop_equals_the_array_slice():
    volume = torch.rand(2, 20, 22, 24, generator=torch.Generator().manual_seed(0))
    crop = extract_crop(volume, CropGeometry(origin=[3, 4, 5], step=[1, 1, 1], size=(8, 9, 10)))
    torch.testing.assert_close(crop, volume[:, 3:11, 4:13, 5:15], atol=1e-5, rtol=0)


@pytest.mark.parametrize("step", [(1, 1, 1), (-1, 1, -1), (2, -2, 2), (0.5, -0.5, 0.5), (-1.5, 1, 2)])
def test_a_bright_voxel_appears_at_to_crop(step):
    volume = torch.zeros(1, 40, 40, 40)
    p = np.array([17.0, 22.0, 25.0])
    volume[0, 17, 22, 25] = 1.0
    target = np.array([5, 9, 7])
    geom = CropGeometry(origin=p - np.array(step) * target, step=step, size=(12, 16, 14))
    np.testing.assert_allclose(geom.to_crop(p[None])[0], target)
    np.testing.assert_allclose(geom.to_volume(target[None])[0], p)
    crop = extract_crop(volume, geom)[0]
    assert np.unravel_index(int(crop.argmax()), crop.shape) == tuple(target)
    assert float(crop.max()) == pytest.approx(1.0, abs=1e-5)


def test_outside_the_volume_is_air():
    crop = extract_crop(torch.ones(1, 10, 10, 10), CropGeometry(origin=[-5, 0, 0], step=[1, 1, 1], size=(4, 4, 4)))
    assert float(crop.abs().max()) == 0.0


def test_sample_crop_centres_flips_and_clamps():
    geom = sample_crop((48, 48, 48), [20.0, 21.0, 22.0], 16, 0.5, [True, False, False])
    np.testing.assert_allclose(geom.centre, [20.0, 21.0, 22.0])
    np.testing.assert_allclose(geom.step, [-0.5, 0.5, 0.5])
    near_edge = sample_crop((48, 48, 48), [1.0, 46.0, 24.0], 16, 1.0)
    lo, hi = near_edge.feature_interval(1)
    assert (lo >= 0).all() and (hi <= 47).all()
    too_big = sample_crop((20, 48, 48), [3.0, 24.0, 24.0], 16, 2.0)
    assert too_big.centre[0] == pytest.approx(9.5)


def test_feature_grid_convention_matches_average_pooling():
    ramp = torch.arange(16, dtype=torch.float32).view(16, 1, 1).expand(16, 16, 16)[None, None]
    for stride in (1, 2, 4):
        pooled = F.avg_pool3d(ramp, stride)[0, 0, :, 0, 0].numpy()
        index = np.arange(len(pooled))
        np.testing.assert_allclose(pooled, feature_to_crop(np.stack([index] * 3, 1), stride)[:, 0])
        np.testing.assert_allclose(crop_to_feature(feature_to_crop(index, stride), stride), index)
    assert feature_to_crop(np.array([1.0]), 4)[0] == 5.5  # covers crop voxels 4..7


@pytest.mark.parametrize("stride", [1, 4])
def test_corresponding_points_land_on_the_same_intensity(stride):
    rng = np.random.default_rng(1)
    field = ndimage.gaussian_filter(rng.standard_normal((48, 48, 48)), 3)
    volume = torch.from_numpy((field - field.min()) / np.ptp(field)).float()[None]
    geom_a = sample_crop((48,) * 3, [22.0, 25.0, 24.0], 24, 1.1, [False, True, False])
    geom_b = sample_overlapping(geom_a, rng, 0.3, (0.7, 1.3), 0.5, volume_shape=(48,) * 3)
    pa, pb = corresponding_points(geom_a, geom_b, 200, rng, stride)
    assert pa.shape == pb.shape == (200, 3) and pa.dtype == np.float32
    grid = 24 // stride
    assert pa.min() >= 0 and pa.max() <= grid - 1 and pb.min() >= 0 and pb.max() <= grid - 1
    np.testing.assert_allclose(geom_a.to_volume(feature_to_crop(pa, stride)),
                               geom_b.to_volume(feature_to_crop(pb, stride)), atol=1e-3)
    crop_a, crop_b = (extract_crop(volume, g)[0].numpy() for g in (geom_a, geom_b))
    va = ndimage.map_coordinates(crop_a, feature_to_crop(pa, stride).T, order=1)
    vb = ndimage.map_coordinates(crop_b, feature_to_crop(pb, stride).T, order=1)
    assert np.abs(va - vb).mean() < 0.01
    assert np.abs(va - rng.permutation(vb)).mean() > 5 * np.abs(va - vb).mean()


class _ScaledMatcher(Matcher):
    """Stub matcher: normalised = voxel / 20, body = x < 15."""

    def to_normalised(self, index, points):
        return np.asarray(points, float) / 20

    def from_normalised(self, index, coords):
        return np.asarray(coords, float) * 20

    def inside_body(self, index, points):
        return np.asarray(points)[:, 0] < 15


def test_region_map_uses_the_matcher_frame():
    geom = CropGeometry(origin=[2.0, 4.0, -2.0], step=[1, 1, 1], size=(16, 16, 16))
    regions = region_map(geom, _ScaledMatcher(), 0, grid=2, stride=4)
    assert regions.shape == (4, 4, 4) and regions.dtype == torch.long
    # feature centre f -> crop 4f + 1.5 -> volume origin + that -> cell floor(v / 10) when 0 <= v <= 20
    centre = lambda f, o: o + 4 * f + 1.5  # noqa: E731
    for f in np.ndindex(4, 4, 4):
        v = np.array([centre(f[k], geom.origin[k]) for k in range(3)])
        inside = v[0] < 15 and np.all((v >= 0) & (v <= 20))
        expected = int((v[0] // 10) * 4 + (v[1] // 10) * 2 + v[2] // 10) if inside else -1
        assert int(regions[f]) == expected
    centres = cell_centres(2)
    assert centres.shape == (8, 3)
    np.testing.assert_allclose(centres[5].numpy(), [0.75, 0.25, 0.75])  # id 5 = (1, 0, 1)


def test_region_map_with_body_box_marks_air_outside():
    vol, _ = _phantom()
    matcher = BodyBoxMatcher().fit([vol])
    regions = region_map(sample_crop((N,) * 3, [5.0, 5.0, 5.0], 16, 1.0), matcher, 0, grid=4, stride=2)
    assert regions[0, 0, 0] == -1 and (regions >= 0).any() and regions.max() < 64


def test_intensity_jitter_is_deterministic_per_generator():
    crop = torch.rand(1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    one = intensity_jitter(crop, torch.Generator().manual_seed(3))
    assert torch.equal(one, intensity_jitter(crop, torch.Generator().manual_seed(3)))
    assert not torch.equal(one, intensity_jitter(crop, torch.Generator().manual_seed(4)))
    assert one.shape == crop.shape and one.min() >= 0 and one.max() <= 1


# ----------------------------------------------------------------------------------------------- batches

CROP = 24
PREP = VolumePreprocessing(crop_size=(CROP,) * 3)


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    """A 4-patient x 2-study synthetic hospital at 40^3 with label maps, lesion masks and reports DELETED."""
    manifest = make_hospital(tmp_path_factory.mktemp("hospital") / "h", patients=4, studies=2, size=40, seed=0,
                             trials=1, signal_seconds=1.0)
    for folder in ("seg", "lesion", "report"):
        shutil.rmtree(manifest.parent / folder)
    return manifest


@pytest.fixture(scope="module")
def batches(hospital):
    return VolumePretrainBatches.from_manifest(hospital, "training", PREP, "body_box", batch_size=3, points=16,
                                               stride=4, grid=3, seed=5)


def test_batch_keys_shapes_and_ids(batches):
    batch = batches[0]
    for key in "abcd":
        assert batch[key].shape == (3, 1, CROP, CROP, CROP) and batch[key].dtype == torch.float32
        assert 0 <= float(batch[key].min()) and float(batch[key].max()) <= 1
    assert batch["points_a"].shape == batch["points_b"].shape == (3, 16, 3)
    assert batch["region_a"].shape == batch["region_d"].shape == (3, 6, 6, 6)
    assert batch["region_a"].dtype == torch.long and int(batch["region_a"].max()) < 27
    assert batch["cell_positions"].shape == (27, 3)
    assert 0.0 <= float(batch["match_accept_rate"]) <= 1.0
    patient_of = torch.from_numpy(batches.patient_of)
    assert torch.equal(patient_of[batch["study_a"]], batch["patient"])
    # every training patient has 2 studies: c = same patient, other study; d = another patient
    assert batch["has_c"].all()
    assert torch.equal(patient_of[batch["study_c"]], batch["patient"])
    assert (batch["study_c"] != batch["study_a"]).all()
    assert (batch["patient_d"][batch["has_d"]] != batch["patient"][batch["has_d"]]).all()


def test_batches_are_deterministic_per_step_and_split_across_ranks(batches, hospital):
    one, again, other = batches[7], batches[7], batches[8]
    for key in one:
        assert torch.equal(one[key], again[key]), key
    assert not torch.equal(one["a"], other["a"])

    def made(batch_size: int, **ranks) -> dict[str, torch.Tensor]:
        return VolumePretrainBatches(batches.volumes, [batches.patient_ids[p] for p in batches.patient_of],
                                     batches.study_ids, batch_size=batch_size, crop_size=CROP, points=16, seed=5,
                                     **ranks)[7]

    whole, first, second = made(4), made(2, rank=0, world_size=2), made(2, rank=1, world_size=2)
    assert torch.equal(whole["a"][:3], one["a"])  # the first anchors do not depend on the batch size
    for key in whole:  # two ranks hold the two halves of the global batch, views and jitter included
        if key in ("match_accept_rate", "cell_positions"):
            assert torch.equal(first[key], whole[key]) and torch.equal(second[key], whole[key]), key
        else:
            assert torch.equal(torch.cat([first[key], second[key]]), whole[key]), key


def test_works_with_a_dataloader(batches):
    loader = DataLoader(batches, batch_size=None, num_workers=0, sampler=range(2, 4))
    for i, batch in zip(range(2, 4), loader):
        assert torch.equal(batch["d"], batches[i]["d"])


def test_registration_matcher_from_manifest(hospital):
    quick = {"iterations": 10, "shrink_factors": (4, 2), "smoothing_sigmas": (2.0, 1.0)}  # wiring, not accuracy
    data = VolumePretrainBatches.from_manifest(hospital, "training", PREP, "registration", batch_size=2, points=8,
                                               matcher_options=quick)
    batch = data[0]
    assert data.matcher.name == "registration" and batch["a"].shape == (2, 1, CROP, CROP, CROP)
    assert 0.0 <= float(batch["match_accept_rate"]) <= 1.0
    assert data.matcher.tried > 0 and 0 <= data.matcher.acceptance_rate <= 1


def test_one_study_one_patient_flags_missing_views():
    vol, _ = _phantom()
    data = VolumePretrainBatches([torch.from_numpy(vol)[None]], ["P1"], ["S1"], batch_size=2, crop_size=16)
    batch = data[0]
    assert not batch["has_c"].any() and not batch["has_d"].any()
    assert torch.equal(batch["study_c"], batch["study_a"]) and torch.equal(batch["patient_d"], batch["patient"])
    assert float(batch["match_accept_rate"]) == 0.0


def test_small_volumes_are_padded_or_refused(hospital, capsys):
    vol, _ = _phantom()
    small = torch.from_numpy(vol[:20, :, :30])[None]
    padded = VolumePretrainBatches([small], ["P1"], ["S1"], batch_size=1, crop_size=32, names=["/x/small.nii.gz"])
    assert padded.volumes[0].shape == (1, 32, 48, 32) and padded[0]["a"].shape == (1, 1, 32, 32, 32)
    # said once, with the file and the padded share of a crop: 1 - (20 * 32 * 30) / 32^3 = 41 %
    assert capsys.readouterr().err == ("warning: 1 volume(s) smaller than crop_size (32, 32, 32) are zero-padded, "
                                       "up to 41 % of a crop: /x/small.nii.gz\n")
    with pytest.raises(UserError, match=r"/x/small.nii.gz: volume shape \(20, 48, 30\)"):
        VolumePretrainBatches([small], ["P1"], ["S1"], batch_size=1, crop_size=32, names=["/x/small.nii.gz"],
                              small_volume="error")
    with pytest.raises(UserError, match=r"P\d+_S\d\.nii\.gz"):
        VolumePretrainBatches.from_manifest(hospital, "training", VolumePreprocessing(crop_size=(48,) * 3,
                                                                                 small_volume="error"), batch_size=1)


def test_crop_smaller_than_the_stride_is_a_user_error():
    vol, _ = _phantom()
    with pytest.raises(UserError, match="crop_size"):
        VolumePretrainBatches([torch.from_numpy(vol)[None]], ["P1"], ["S1"], batch_size=1, crop_size=2, stride=4)


def test_split_without_volumes_is_a_user_error(hospital):
    data = json.loads(hospital.read_text())
    data["validation"] = []
    empty = hospital.parent / "empty_validation.json"
    empty.write_text(json.dumps(data))
    with pytest.raises(UserError, match="split 'validation' has no volume"):
        VolumePretrainBatches.from_manifest(empty, "validation", PREP, batch_size=1)
