"""The axis-aligned resampler gives grid_sample's bits (the crops every pretraining run and figure are made of)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medssl.pretrain.resample import resample_axis_aligned
from medssl.pretrain.views import (crop_region, draw_jitter, extract_crop, extract_crop_from_region, intensity_jitter,
                                  sample_crop)


def _grid_sample_crop(volume: torch.Tensor, origin, step, size) -> torch.Tensor:
    """The crop as medssl made it before the resampler: grid_sample on the axis-aligned grid."""
    axes = [(2 * (o + s * torch.arange(z, dtype=torch.float64)) / max(n - 1, 1) - 1).to(volume.dtype)
            for o, s, z, n in zip(origin, step, size, volume.shape[1:])]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1)[None]
    return F.grid_sample(volume[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]


def test_crops_are_grid_samples_bits_flipped_scaled_and_outside_the_volume() -> None:
    rng = np.random.default_rng(0)
    volume = torch.rand(2, 23, 31, 17)
    for trial in range(40):
        size = tuple(int(n) for n in rng.integers(1, 20, 3))
        geom = sample_crop(volume.shape[1:], rng.uniform(-10, 40, 3), size, rng.uniform(0.5, 2.0, 3),
                           rng.random(3) < 0.5, clamp=trial % 3 == 0)
        expected = _grid_sample_crop(volume, geom.origin.tolist(), geom.step.tolist(), geom.size)
        got = extract_crop(volume, geom)
        assert got.shape == expected.shape
        assert np.array_equal(got.numpy().view(np.int32), expected.numpy().view(np.int32)), trial
        lo, hi = crop_region(geom, volume.shape[1:])
        region = volume[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        assert torch.equal(extract_crop_from_region(region, lo, volume.shape[1:], geom), expected)


def test_an_axis_of_one_voxel_and_a_crop_wholly_outside() -> None:
    volume = torch.rand(1, 1, 9, 9)
    expected = _grid_sample_crop(volume, [0.0, 1.5, 2.0], [1.0, 0.7, 1.3], (3, 4, 5))
    assert torch.equal(resample_axis_aligned(volume, (0, 0, 0), (1, 9, 9), [0.0, 1.5, 2.0], [1.0, 0.7, 1.3],
                                             (3, 4, 5)), expected)
    empty = torch.zeros(1, 0, 0, 0)
    outside = resample_axis_aligned(empty, (0, 0, 0), (1, 9, 9), [50.0, 50.0, 50.0], [1.0, 1.0, 1.0], (2, 2, 2))
    assert torch.equal(outside, torch.zeros(1, 2, 2, 2))


def test_a_region_that_misses_voxels_the_samples_read_is_refused() -> None:
    volume = torch.rand(1, 20, 20, 20)
    with pytest.raises(ValueError, match="does not hold every voxel"):
        resample_axis_aligned(volume[:, 5:10, 5:10, 5:10], (5, 5, 5), (20, 20, 20), [4.0, 6.0, 6.0], [1.0] * 3,
                              (3, 3, 3))


def test_the_in_place_intensity_jitter_gives_the_bits_of_the_expression_it_replaced() -> None:
    crop = torch.rand(1, 12, 10, 8) * 1.2 - 0.1
    for seed in range(5):
        draw = draw_jitter(tuple(crop.shape), torch.Generator().manual_seed(seed))
        out = crop.clamp(0, 1) ** draw.gamma
        mean = out.mean()
        out = (out - mean) * draw.contrast + mean + draw.brightness
        expected = (out + draw.noise * draw.noise_std).clamp(0, 1)
        got = intensity_jitter(crop, torch.Generator().manual_seed(seed))
        assert np.array_equal(got.numpy().view(np.int32), expected.numpy().view(np.int32))
