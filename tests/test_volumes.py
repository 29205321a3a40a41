"""The MONAI volume pipeline: intensities, geometry (orientation, spacing, pad, crop), label alignment,
the persistent cache and reading errors, on tiny NIfTI volumes with a flipped, anisotropic affine."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import Dataset, MetaTensor

from medssl.data import io
from medssl.data.preprocessing import VolumePreprocessing
from medssl.data.volumes import manifest_volume_entries, volume_transforms
from medssl.errors import UserError

SHAPE = (20, 24, 16)
# x axis flipped (voxel x grows towards the patient's left: "LAS"), anisotropic 2 x 1.5 x 2.5 mm
FLIPPED = np.array([[-2.0, 0, 0, 30.0], [0, 1.5, 0, -10.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])
RAS = np.diag([2.0, 1.5, 2.5, 1.0])
CUBE = (slice(3, 7), slice(5, 10), slice(4, 8))


def write(folder: Path, name: str, array: np.ndarray, affine: np.ndarray = FLIPPED) -> str:
    path = folder / name
    io.write_volume(path, array, affine)
    return str(path)


@pytest.fixture()
def cube(tmp_path: Path) -> dict:
    """A -1000 HU volume with a +1000 HU cube, and a label map with 1 on the cube."""
    image = np.full(SHAPE, -1000.0, dtype=np.float32)
    image[CUBE] = 1000.0
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[CUBE] = 1
    return {"image": write(tmp_path, "img.nii.gz", image), "label": write(tmp_path, "seg.nii.gz", label)}


def world(affine: torch.Tensor | np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices -> (N, 3) world mm."""
    affine = np.asarray(affine, dtype=np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def test_output_shapes_types_and_range(cube: dict) -> None:
    out = volume_transforms(VolumePreprocessing(crop_size=(16, 16, 8)), with_label=True)(cube)
    image, label = out["image"], out["label"]
    assert isinstance(image, MetaTensor) and image.shape == (1, 16, 16, 8) and image.dtype == torch.float32
    assert label.shape == (1, 16, 16, 8) and set(label.unique().tolist()) <= {0.0, 1.0}
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image.affine.shape == (4, 4) and image.meta["filename_or_obj"] == cube["image"]


def test_ct_window_maps_level_to_half(tmp_path: Path) -> None:
    level, width = 40.0, 400.0
    values = [level - width / 2, level, level + width / 2, -1000.0, 3000.0, level + width / 4]
    image = np.zeros(SHAPE, dtype=np.float32)
    image[: len(values), 0, 0] = values
    entry = {"image": write(tmp_path, "ct.nii.gz", image, RAS)}
    out = volume_transforms(VolumePreprocessing(window=(level, width), crop_size=SHAPE))(entry)["image"]
    np.testing.assert_allclose(out[0, : len(values), 0, 0].numpy(), [0.0, 0.5, 1.0, 0.0, 1.0, 0.75], atol=1e-6)


def test_mr_percentiles_map_to_unit_range(tmp_path: Path) -> None:
    image = np.random.default_rng(0).gamma(2.0, 100.0, size=SHAPE).astype(np.float32)
    entry = {"image": write(tmp_path, "mr.nii.gz", image, RAS)}
    out = volume_transforms(VolumePreprocessing(modality="MR", percentiles=(2.0, 98.0),
                                                crop_size=SHAPE))(entry)["image"]
    low, high = np.percentile(image, [2.0, 98.0])
    np.testing.assert_allclose(out[0].numpy(), np.clip((image - low) / (high - low), 0, 1), atol=1e-5)
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.015 < float((out == 0).float().mean()) < 0.025  # ~2 % of the voxels lie below the 2nd percentile


def test_orientation_to_ras_flips_x_and_keeps_world_positions(tmp_path: Path) -> None:
    ramp = np.broadcast_to(np.arange(SHAPE[0], dtype=np.float32)[:, None, None] * 10.0, SHAPE)
    entry = {"image": write(tmp_path, "ramp.nii.gz", np.ascontiguousarray(ramp))}
    assert "".join(nib.aff2axcodes(FLIPPED)) == "LAS"
    out = volume_transforms(VolumePreprocessing(window=(100.0, 400.0), crop_size=SHAPE))(entry)["image"]
    assert "".join(nib.aff2axcodes(out.affine.numpy())) == "RAS"
    expected = (ramp[::-1] + 100.0) / 400.0  # HU -100..300 -> 0..1
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-6)
    ijk = np.array([[0, 0, 0], [5, 7, 3], [19, 23, 15]], dtype=np.float64)
    flipped = ijk.copy()
    flipped[:, 0] = SHAPE[0] - 1 - ijk[:, 0]
    np.testing.assert_allclose(world(out.affine, ijk), world(FLIPPED, flipped))


def test_spacing_gives_expected_shape_and_affine(cube: dict) -> None:
    prep = dict(spacing=(4.0, 3.0, 5.0), small_volume="error")  # 20x24x16 at 2x1.5x2.5 mm -> 10x12x8
    out = volume_transforms(VolumePreprocessing(crop_size=(10, 12, 8), **prep), with_label=True)(cube)
    assert out["image"].shape == out["label"].shape == (1, 10, 12, 8)
    np.testing.assert_allclose(nib.affines.voxel_sizes(out["image"].affine.numpy()), (4.0, 3.0, 5.0))
    with pytest.raises(UserError, match=r"img\.nii\.gz: volume shape \(10, 12, 8\)") as err:
        volume_transforms(VolumePreprocessing(crop_size=(11, 12, 8), **prep))(cube)
    assert cube["image"] in str(err.value)


def test_label_stays_aligned_with_image_after_resampling(cube: dict) -> None:
    prep = VolumePreprocessing(spacing=(1.0, 1.5, 1.25), crop_size=(39, 24, 31))  # x and z: (n - 1) * 2 + 1 voxels
    out = volume_transforms(prep, with_label=True)(cube)
    image, label = out["image"][0].numpy(), out["label"][0].numpy()
    assert label.shape == (39, 24, 31)
    # where each output voxel lies in the input's voxel grid, through the two affines
    ijk = np.indices(label.shape).reshape(3, -1).T.astype(np.float64)
    source = world(np.linalg.inv(FLIPPED), world(out["image"].affine, ijk))
    nearest = np.round(source).astype(int)
    in_cube = np.all([(nearest[:, a] >= CUBE[a].start) & (nearest[:, a] < CUBE[a].stop) for a in range(3)], axis=0)
    not_tie = np.all(np.abs(np.abs(source - np.floor(source)) - 0.5) > 1e-3, axis=1)
    np.testing.assert_array_equal(label.reshape(-1)[not_tie], in_cube[not_tie])
    on_grid = np.all(np.abs(source - nearest) < 1e-3, axis=1)  # bilinear = the input value there
    np.testing.assert_allclose(image.reshape(-1)[on_grid], in_cube[on_grid].astype(np.float32), atol=1e-5)
    assert on_grid.sum() == 20 * 24 * 16 and label.sum() >= 8 * 5 * 8


def test_random_crop_is_seeded_and_a_subblock_of_the_full_volume(cube: dict) -> None:
    full = volume_transforms(VolumePreprocessing(crop_size=SHAPE), with_label=True)(cube)
    prep = VolumePreprocessing(crop_size=(8, 8, 8))
    crops = [volume_transforms(prep, with_label=True, random_crop=True, seed=seed)(cube) for seed in (0, 0, 1)]
    assert torch.equal(crops[0]["image"], crops[1]["image"])
    origins = set()
    for crop in crops:
        assert crop["image"].shape == crop["label"].shape == (1, 8, 8, 8)
        # the crop's affine says where it lies in the full volume; its voxels must be those voxels
        offset = np.linalg.solve(full["image"].affine.numpy(), crop["image"].affine.numpy()[:, 3])[:3]
        i, j, k = (int(round(v)) for v in offset)
        np.testing.assert_allclose(offset, (i, j, k), atol=1e-6)
        for key in ("image", "label"):
            assert torch.equal(crop[key][0], full[key][0, i:i + 8, j:j + 8, k:k + 8])
        origins.add((i, j, k))
    assert len(origins) == 2  # seed 1 crops elsewhere than seed 0


def test_small_volume_pad_or_error(cube: dict) -> None:
    out = volume_transforms(VolumePreprocessing(crop_size=(24, 24, 24)), with_label=True)(cube)
    image = out["image"][0]
    assert image.shape == (24, 24, 24)
    assert image[:2].abs().sum() == 0 and image[..., :4].abs().sum() == 0 and image[..., -4:].abs().sum() == 0
    oriented = volume_transforms(VolumePreprocessing(crop_size=SHAPE))(cube)["image"]
    assert torch.equal(image[2:22, :, 4:20], oriented[0])
    origin = world(oriented.affine, np.zeros((1, 3)))
    np.testing.assert_allclose(world(out["image"].affine, np.array([[2.0, 0, 4]])), origin)  # padding keeps geometry
    with pytest.raises(UserError, match=r"volume shape \(20, 24, 16\) .* smaller than data.crop_size \(24, 24, 24\); "
                                        "set data.small_volume=pad") as err:
        volume_transforms(VolumePreprocessing(crop_size=(24, 24, 24), small_volume="error"))(cube)
    assert cube["image"] in str(err.value)


def test_unreadable_files_raise_user_error_naming_them(cube: dict, tmp_path: Path) -> None:
    truncated = tmp_path / "cut.nii.gz"
    data = Path(cube["image"]).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    bad_label = write(tmp_path, "half.nii.gz", np.full(SHAPE, 0.5, dtype=np.float32))
    missing = str(tmp_path / "missing.nii.gz")
    cases = [({"image": str(truncated)}, str(truncated)), ({"image": missing}, missing),
             (dict(cube, label=bad_label), bad_label)]
    for entry, named in cases:
        dataset = Dataset([entry], volume_transforms(VolumePreprocessing(crop_size=(8, 8, 8)),
                                                     with_label="label" in entry))
        with pytest.raises(UserError) as err:
            dataset[0]
        assert named in str(err.value) and "\n" not in str(err.value)


def test_preprocessing_validates_and_round_trips_through_json() -> None:
    prep = VolumePreprocessing(modality="mr", spacing=[1, 1, 2], crop_size=[32, 32, 16])
    assert prep.modality == "MR" and prep.spacing == (1.0, 1.0, 2.0)
    assert VolumePreprocessing(**json.loads(json.dumps(prep.to_dict()))) == prep
    bad = [dict(modality="XR"), dict(crop_size=(0, 8, 8)), dict(crop_size=(8.5, 8, 8)), dict(window=(40, -1)),
           dict(window=(40,)), dict(percentiles=(99, 1)), dict(small_volume="crop"), dict(spacing=(1, 1)),
           dict(spacing=("a", 1, 1)), dict(orientation="RAR"), dict(orientation="RASL")]
    for kwargs in bad:
        with pytest.raises(UserError, match=rf"preprocessing\.{next(iter(kwargs))}"):
            VolumePreprocessing.from_dict(kwargs)


def test_manifest_volume_entries(cube: dict, tmp_path: Path) -> None:
    from medssl.data import manifest as manifest_mod

    folder = Path(cube["image"]).parent
    entries = [{"image": "img.nii.gz", "label": "seg.nii.gz", "patient_id": "P001", "study_id": "S1"},
               {"image": "img.nii.gz", "patient_id": "P002"}]
    doc = {"name": "t", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "cube"},
           "training": entries, "validation": [{"patient_id": "P003", "signals": []}], "test": []}
    (folder / "manifest.json").write_text(json.dumps(doc))
    manifest = manifest_mod.load_manifest(folder / "manifest.json")
    items = manifest_volume_entries(manifest, "training")
    assert items == [{"image": cube["image"], "patient_id": "P001", "study_id": "S1", "where": "training[0]"},
                     {"image": cube["image"], "patient_id": "P002", "study_id": "", "where": "training[1]"}]
    with pytest.raises(UserError, match=r"training\[1\] P002/- \(no label\)"):
        manifest_volume_entries(manifest, "training", with_label=True)
    with pytest.raises(UserError, match=r"validation\[0\] P003/- \(no image\)"):
        manifest_volume_entries(manifest, "validation")
