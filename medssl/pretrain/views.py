"""Crops with known geometry: every crop voxel knows where it lies in its volume.

Conventions:
- Volume points are continuous voxel coordinates (array indices along the volume's spatial axes,
  0 = centre of the first voxel), crop points likewise in the crop.
- A crop is axis-aligned: crop voxel ``c`` samples the volume at ``origin + step * c`` (per axis);
  ``|step|`` is the scale (volume voxels per crop voxel), a negative step flips that axis.
- Feature grids: an encoder with total stride ``s`` turns a crop of size ``S`` into a grid of
  ``S // s`` feature voxels per axis; feature index ``f`` covers crop voxels ``[s*f, s*f + s - 1]``,
  whose centre is ``s*f + (s - 1) / 2``. So feature coordinate = ``(crop - (s - 1) / 2) / s`` and
  0 / ``S // s - 1`` are the first / last feature centres (the ``align_corners=True`` convention of
  `medssl.losses.voxel.sample_features`).
- Crops are resampled trilinearly with zero padding: volumes are CT-windowed to [0, 1] before, so
  outside the volume is air (0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medssl.pretrain.matchers import Matcher
from medssl.pretrain.resample import resample_axis_aligned


@dataclass(frozen=True)
class CropGeometry:
    """Crop voxel ``c`` (3,) sits at volume point ``origin + step * c``; ``size`` (3,) crop voxels."""

    origin: np.ndarray  # (3,) float volume coordinates of crop voxel (0, 0, 0)
    step: np.ndarray  # (3,) float volume voxels per crop voxel; negative = flipped axis
    size: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "origin", np.asarray(self.origin, float).reshape(3))
        object.__setattr__(self, "step", np.asarray(self.step, float).reshape(3))
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        if np.any(self.step == 0) or len(self.size) != 3 or min(self.size) < 1:
            raise ValueError(f"CropGeometry: need nonzero steps and 3 positive sizes, got {self.step}, {self.size}")

    def to_crop(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) volume coordinates -> (N, 3) crop coordinates."""
        return (np.asarray(points, float) - self.origin) / self.step

    def to_volume(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) crop coordinates -> (N, 3) volume coordinates."""
        return self.origin + self.step * np.asarray(points, float)

    @property
    def centre(self) -> np.ndarray:
        """(3,) volume coordinates of the crop's centre."""
        return self.to_volume((np.array(self.size) - 1) / 2)

    def feature_interval(self, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi), each (3,): the volume-coordinate box spanned by the first and last feature centres."""
        first, last = _feature_centres_range(self.size, stride)
        ends = np.stack([self.to_volume(first), self.to_volume(last)])
        return ends.min(0), ends.max(0)


def feature_grid_size(size: Sequence[int], stride: int) -> tuple[int, int, int]:
    """Feature voxels per axis for a crop of `size` and encoder stride `stride`."""
    grid = tuple(int(s) // stride for s in size)
    if stride < 1 or min(grid) < 1:
        raise ValueError(f"feature_grid_size: crop {tuple(size)} is smaller than stride {stride}")
    return grid  # type: ignore[return-value]


def feature_to_crop(points: np.ndarray, stride: int) -> np.ndarray:
    """(N, 3) feature-grid coordinates -> (N, 3) crop coordinates (centre of the covered voxels)."""
    return np.asarray(points, float) * stride + (stride - 1) / 2


def crop_to_feature(points: np.ndarray, stride: int) -> np.ndarray:
    """(N, 3) crop coordinates -> (N, 3) feature-grid coordinates."""
    return (np.asarray(points, float) - (stride - 1) / 2) / stride


def _feature_centres_range(size: Sequence[int], stride: int) -> tuple[np.ndarray, np.ndarray]:
    grid = np.array(feature_grid_size(size, stride))
    return feature_to_crop(np.zeros(3), stride), feature_to_crop(grid - 1, stride)


def extract_crop(volume: torch.Tensor, geom: CropGeometry) -> torch.Tensor:
    """Resample a crop: volume (C, X, Y, Z) float32 -> (C, *geom.size), trilinear, zeros outside; the same bits
    as `F.grid_sample` (align_corners=True) on the axis-aligned grid (`medssl.pretrain.resample`).

    An identity geometry (origin at a voxel, step 1) returns the array slice.
    """
    return resample_axis_aligned(volume, (0, 0, 0), volume.shape[1:], geom.origin.tolist(), geom.step.tolist(),
                                 geom.size)


def crop_region(geom: CropGeometry, volume_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) (3,) int64: the voxel box (``lo <= i < hi``, inside the volume) holding every voxel that
    `extract_crop` may read for `geom` (the two neighbours of each sample, with one voxel to spare for
    float32 rounding); empty (some ``hi <= lo``) when the crop lies outside the volume."""
    ends = np.stack([geom.to_volume(np.zeros(3)), geom.to_volume(np.array(geom.size) - 1.0)])
    lo = np.floor(ends.min(0)).astype(np.int64) - 1
    hi = np.floor(ends.max(0)).astype(np.int64) + 3
    shape = np.asarray(volume_shape, np.int64)
    return np.clip(lo, 0, shape), np.clip(hi, 0, shape)


def extract_crop_from_region(region: torch.Tensor, start: Sequence[int], volume_shape: Sequence[int],
                             geom: CropGeometry) -> torch.Tensor:
    """`extract_crop` of a volume of `volume_shape` of which only `region` (C, *m), the box starting at voxel
    `start` (`crop_region`), was read: the same crop, bit for bit (the samples are placed on the whole volume's
    grid, and only the region's voxels are read)."""
    return resample_axis_aligned(region, start, volume_shape, geom.origin.tolist(), geom.step.tolist(), geom.size)


def sample_crop(volume_shape: Sequence[int], centre: np.ndarray, crop_size: Sequence[int] | int,
                scale: float | Sequence[float] = 1.0, flips: Sequence[bool] = (False, False, False),
                *, clamp: bool = True) -> CropGeometry:
    """The crop of `crop_size` voxels centred at `centre` (3,) volume coordinates with `scale` volume
    voxels per crop voxel and flipped axes `flips`.

    clamp: move the centre (per axis) so the crop stays inside the volume when it fits; a crop
    larger than the volume is centred on it (the rest is zero padding).
    """
    size = np.broadcast_to(np.asarray(crop_size, int), (3,))
    step = np.broadcast_to(np.asarray(scale, float), (3,)) * np.where(np.asarray(flips, bool), -1.0, 1.0)
    centre = np.asarray(centre, float).reshape(3)
    if clamp:
        half_extent = np.abs(step) * (size - 1) / 2
        last = np.asarray(volume_shape, float) - 1
        fits = 2 * half_extent <= last
        centre = np.where(fits, np.clip(centre, half_extent, last - half_extent), last / 2)
    return CropGeometry(origin=centre - step * (size - 1) / 2, step=step, size=tuple(size))


def random_flips(rng: np.random.Generator, flip_prob: float) -> np.ndarray:
    """(3,) bool, each axis flipped with probability `flip_prob`."""
    return rng.random(3) < flip_prob


def sample_overlapping(geom_a: CropGeometry, rng: np.random.Generator, max_shift_fraction: float = 0.25,
                       scale_range: tuple[float, float] = (0.8, 1.25), flip_prob: float = 0.5, *,
                       volume_shape: Sequence[int] | None = None) -> CropGeometry:
    """A second crop of the same size overlapping `geom_a` by construction.

    Its centre is shifted from a's by up to `max_shift_fraction` (< 0.5) of a's extent per axis (so it
    lies inside a), its isotropic scale is drawn from `scale_range`, each axis flipped with
    `flip_prob`. With `volume_shape`, the crop is clamped into the volume (it still overlaps a when
    a lies inside the volume).
    """
    if not 0 <= max_shift_fraction < 0.5:
        raise ValueError(f"sample_overlapping: max_shift_fraction must be in [0, 0.5), got {max_shift_fraction}")
    extent = np.abs(geom_a.step) * (np.array(geom_a.size) - 1)
    centre = geom_a.centre + rng.uniform(-1, 1, 3) * max_shift_fraction * extent
    scale = rng.uniform(*scale_range)
    flips = random_flips(rng, flip_prob)
    shape = volume_shape if volume_shape is not None else np.full(3, np.inf)
    return sample_crop(shape, centre, geom_a.size, scale, flips, clamp=volume_shape is not None)


def corresponding_points(geom_a: CropGeometry, geom_b: CropGeometry, n: int, rng: np.random.Generator,
                         stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`n` random volume points inside both crops' feature grids, as (N, 3) float32 feature-grid
    coordinates of crop a and of crop b (see the module docstring for the stride convention).

    Raises ValueError when the feature grids do not overlap.
    """
    lo_a, hi_a = geom_a.feature_interval(stride)
    lo_b, hi_b = geom_b.feature_interval(stride)
    lo, hi = np.maximum(lo_a, lo_b), np.minimum(hi_a, hi_b)
    if np.any(lo > hi):
        raise ValueError(f"corresponding_points: crops do not overlap (box {lo} .. {hi})")
    points = rng.uniform(lo, hi, size=(n, 3))
    return tuple(_to_feature(geom, points, stride) for geom in (geom_a, geom_b))  # type: ignore[return-value]


def _to_feature(geom: CropGeometry, points: np.ndarray, stride: int) -> np.ndarray:
    """Volume points -> feature-grid coordinates clipped to the grid (removes float round-off)."""
    grid = np.array(feature_grid_size(geom.size, stride))
    return np.clip(crop_to_feature(geom.to_crop(points), stride), 0, grid - 1).astype(np.float32)


def feature_centres(geom: CropGeometry, stride: int) -> np.ndarray:
    """(d*h*w, 3) volume coordinates of every feature voxel centre, in C order of the (d, h, w) grid."""
    grid = feature_grid_size(geom.size, stride)
    index = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, 3)
    return geom.to_volume(feature_to_crop(index, stride))


def region_map(geom: CropGeometry, matcher: Matcher, index: int, grid: int, stride: int = 1) -> torch.Tensor:
    """(d, h, w) long: for each feature voxel of the crop, the id of the cell of a grid^3 partition
    of the matcher's normalised frame holding its centre (id = (gx * grid + gy) * grid + gz);
    -1 outside volume `index`'s body mask or outside [0, 1]^3."""
    points = feature_centres(geom, stride)
    coords = matcher.to_normalised(index, points)
    valid = np.all((coords >= 0) & (coords <= 1), axis=1) & matcher.inside_body(index, points)
    cells = np.clip(np.floor(coords * grid), 0, grid - 1).astype(np.int64)
    ids = np.where(valid, (cells[:, 0] * grid + cells[:, 1]) * grid + cells[:, 2], -1)
    return torch.from_numpy(ids.reshape(feature_grid_size(geom.size, stride)))


def cell_centres(grid: int) -> torch.Tensor:
    """(grid^3, 3) float32 normalised positions of the cell centres, row = cell id of `region_map`."""
    axis = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)


@dataclass(frozen=True)
class Jitter:
    """One crop's intensity jitter draws: gamma, contrast, brightness shift, noise (the crop's shape), noise std."""

    gamma: float
    contrast: float
    brightness: float
    noise: torch.Tensor
    noise_std: float


def draw_jitter(shape: tuple[int, ...], generator: torch.Generator, *, gamma: tuple[float, float] = (0.7, 1.5),
                contrast: tuple[float, float] = (0.75, 1.25), brightness: float = 0.1,
                noise_std: tuple[float, float] = (0.0, 0.03)) -> Jitter:
    """The draws of `intensity_jitter` for a crop of `shape`, in its order (every draw from `generator`); drawing
    without applying keeps a generator in step for crops that are not made (other ranks' crops)."""

    def uniform(low: float, high: float) -> float:
        return float(low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64))

    g, c, b = uniform(*gamma), uniform(*contrast), uniform(-brightness, brightness)
    noise = torch.randn(shape, generator=generator)
    return Jitter(g, c, b, noise, uniform(*noise_std))


def intensity_jitter(crop: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random gamma, contrast (about the crop mean), brightness shift and Gaussian noise, clipped to
    [0, 1]. crop: (C, ...) float32 in [0, 1]; every draw comes from `generator` (deterministic)."""
    draw = draw_jitter(tuple(crop.shape), generator)
    out = crop.clamp(0, 1).pow_(draw.gamma)  # in place from here: the same operations, without new tensors
    mean = out.mean()
    out.sub_(mean).mul_(draw.contrast).add_(mean).add_(draw.brightness)
    return out.add_(draw.noise.to(out.dtype).mul_(draw.noise_std)).clamp_(0, 1)
