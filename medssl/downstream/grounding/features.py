"""What: the voxel evidence a finding scorer reads inside an organ, organ-normalised.

For one volume (`VolumeEvidence.build`), on the organ head's preprocessed grid:
- intensity in each of the configured windows (default soft tissue 40/400 and lung -600/1500 HU, so lung
  nodules and ground-glass opacities are visible: the soft-tissue window clips lung tissue to 0);
- the organ head's decoder features at stride 1 (`organs.OrganOutput.features`);
- the organ masks (`anatomy.organ_masks`) and the body's midline.

For one organ (`OrganVoxels`), its core: the voxels deeper than SURFACE_VOXELS inside the predicted organ
(partial volume mixes what lies beyond the surface into the outer voxels: fat, air or bone there would look
like the strongest anomalies of the organ). The intensities are smoothed at a few Gaussian scales
(`SCALES_VOXELS`) reading the core only (`smoothed_inside`), then every feature organ-normalised,
z = (value - median) / (1.4826 x median absolute deviation + EPS) over the core, clipped to +-Z_CLIP: a value says how
unusual a voxel is *for that organ* in that scan (a hypodense lesion is negative in the liver whatever the
scanner's calibration). Kept per organ voxel: intensity z at every scale, decoder z, depth inside the organ
(mm) and the offsets in the organ's frame (`anatomy.OrganFrame.offsets_at`, for places).

`OrganVoxels.phi(size_mm)` -> (n, F) features for a finding of that size: for each window relu(z) and
relu(-z) at the scale matched to the size (sigma = diameter / 4, the nearest scale), then the depth
deficit relu(r - depth) / r (r: the stated radius, at least SURFACE_VOXELS voxels, where partial volume
mixes in what lies beyond the organ; 0 where a ball of the stated size fits inside the organ), then the
decoder z. F = 2 x windows + 1 + C.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from medssl.downstream.grounding import anatomy

SCALES_VOXELS = (0.35, 0.5, 0.7, 1.0, 1.4, 2.0)  # Gaussian sigmas of the smoothed intensities
EPS = 1e-3
Z_CLIP = 10.0
SURFACE_VOXELS = 1.5  # partial volume: voxels this close to an organ's surface mix in what lies beyond it
DEFAULT_SIZE_MM = 15.0  # a finding stated without a size


def scale_index(size_mm: float | None, spacing: float) -> int:
    """The index in SCALES_VOXELS nearest to sigma = size / 4 (in voxels of `spacing` mm)."""
    sigma = (size_mm or DEFAULT_SIZE_MM) / 4.0 / spacing
    return int(np.argmin([abs(sigma - s) for s in SCALES_VOXELS]))


def window01(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """Hounsfield units -> [0, 1] through a (level, width) window, clipped."""
    return np.clip((values - (level - width / 2.0)) / width, 0.0, 1.0).astype(np.float32)


def robust_z(values: np.ndarray) -> np.ndarray:
    """values (..., n) of the organ's voxels -> organ-normalised z (median / MAD over the last axis)."""
    median = np.median(values, axis=-1, keepdims=True)
    mad = np.median(np.abs(values - median), axis=-1, keepdims=True)
    return np.clip((values - median) / (1.4826 * mad + EPS), -Z_CLIP, Z_CLIP).astype(np.float32)


def smoothed_inside(channels: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of channels (W, ...) that reads the organ only (normalised convolution:
    G(x * mask) / G(mask)), so nothing outside the organ leaks into its voxels near the surface."""
    weight = ndimage.gaussian_filter(mask.astype(np.float32), sigma)
    out = np.stack([ndimage.gaussian_filter(c * mask, sigma) for c in channels])
    return out / np.maximum(weight, 1e-3)


@dataclass
class OrganVoxels:
    """One organ of one volume: `index` (n,) flat voxel indices of its core on the grid `shape`;
    `intensity_z` (S, W, n) per scale and window; `decoder_z` (C, n); `depth_mm` (n,); `offsets` (3, n)."""

    organ: str
    shape: tuple[int, int, int]
    index: np.ndarray
    intensity_z: np.ndarray
    decoder_z: np.ndarray
    depth_mm: np.ndarray
    offsets: np.ndarray
    spacing: float
    mask_voxels: int  # the whole organ's, surface included

    @property
    def size(self) -> int:
        return int(self.index.size)

    def phi(self, size_mm: float | None) -> torch.Tensor:
        """(n, F) float32 features for a finding of `size_mm` (module docstring)."""
        z = self.intensity_z[scale_index(size_mm, self.spacing)].astype(np.float32)
        needed = max((size_mm or DEFAULT_SIZE_MM) / 2.0, SURFACE_VOXELS * self.spacing)
        deficit = np.clip(needed - self.depth_mm, 0.0, None) / needed
        parts = [np.maximum(z, 0.0), np.maximum(-z, 0.0)]
        stacked = np.concatenate([np.stack([p[w] for w in range(z.shape[0]) for p in parts]),
                                  deficit[None].astype(np.float32), self.decoder_z.astype(np.float32)])
        return torch.from_numpy(np.ascontiguousarray(stacked.T))

    def prior(self, places: tuple[str, ...]) -> np.ndarray:
        """(n,) the places' soft prior (`anatomy.location_prior`)."""
        if not places:
            return np.ones(self.size, np.float32)
        return anatomy.location_prior(self.offsets.astype(np.float32)[:, :, None, None], places)[:, 0, 0]


def feature_count(windows: int, decoder_channels: int) -> int:
    """F of `OrganVoxels.phi`."""
    return 2 * windows + 1 + decoder_channels


@dataclass
class VolumeEvidence:
    """One volume on the organ head's grid: windowed intensities (W, D, H, W), decoder features (C, D, H, W),
    organ masks, probabilities (K, D, H, W), spacing (3,) mm, orientation, the body midline and mask."""

    intensities: np.ndarray
    decoder: np.ndarray
    masks: dict[str, np.ndarray]
    probabilities: np.ndarray
    spacing: np.ndarray
    orientation: str
    midline: float
    body: np.ndarray

    @classmethod
    def build(cls, intensity: np.ndarray, windows: list[tuple[float, float]] | None, probabilities: np.ndarray,
              decoder: np.ndarray, classes: dict[int, str], spacing: np.ndarray, orientation: str,
              body: np.ndarray) -> VolumeEvidence:
        """intensity (D, H, W): Hounsfield units when `windows` is given (each window a channel), else the
        normalised intensity itself (MR); probabilities (K, D, H, W); decoder (C, D, H, W); body (D, H, W)."""
        channels = [window01(intensity, level, width) for level, width in windows] if windows else \
            [intensity.astype(np.float32)]
        labels = probabilities.argmax(axis=0)
        masks = anatomy.organ_masks(labels, classes, skip=("background", "body"))
        return cls(np.stack(channels), decoder.astype(np.float32), masks, probabilities.astype(np.float32),
                   np.asarray(spacing, float), orientation, anatomy.midline_index(body, orientation), body)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.decoder.shape[1:])

    def organ(self, name: str) -> OrganVoxels | None:
        """The organ's core voxels and their features; None when the organ head found none of it."""
        mask = self.masks.get(name)
        if mask is None or not mask.any():
            return None
        depth = anatomy.depth_mm(mask, self.spacing)
        core = mask & (depth > SURFACE_VOXELS * float(np.min(self.spacing)))
        core = core if core.sum() >= 8 else mask
        index = np.flatnonzero(core)
        box = anatomy.bounding_box(core, margin=int(np.ceil(3 * max(SCALES_VOXELS))))
        inside = core[box]
        local = np.flatnonzero(inside)
        smoothed = np.stack([smoothed_inside(self.intensities[(slice(None), *box)], inside, sigma)
                             .reshape(self.intensities.shape[0], -1)[:, local] for sigma in SCALES_VOXELS])
        decoder = self.decoder.reshape(self.decoder.shape[0], -1)[:, index]
        frame = anatomy.OrganFrame.of(mask, self.spacing, self.midline, self.orientation)
        offsets = frame.offsets_at(np.stack(np.unravel_index(index, self.shape), axis=1).astype(np.float32),
                                   self.spacing)
        return OrganVoxels(name, self.shape, index, robust_z(smoothed).astype(np.float16),
                           robust_z(decoder).astype(np.float16), depth.ravel()[index],
                           offsets.astype(np.float16), float(np.mean(self.spacing)), int(mask.sum()))
