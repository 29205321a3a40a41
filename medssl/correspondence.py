"""Anatomical correspondence across scans: where does this point of scan A lie in scan B?

`match_point(encoder, volume_a, volume_b, point_mm) -> (point_mm, score)` is the one-call form (`medssl match`
prints it as JSON); `Correspondence` holds the scans and their features for many queries (the app's linked
cursor, `medssl bench correspondence`). Points are world RAS millimetres.

Methods:
- embedding (`EmbeddingMatcher`, an encoder checkpoint): the 3D encoder's multi-scale feature maps of each
  whole scan; a point's descriptor is every map sampled trilinearly at the point, each scale unit-normalised,
  concatenated and divided by sqrt(scales) (unit length; its cosine with another descriptor is the mean of
  the per-scale cosines). The query's descriptor in A is compared with B's at the centre of every 2x2x2
  voxel cell inside B's body (coarse search), then on the voxel grid within 2 voxels of the 4 best cells and
  on a quarter-voxel grid within half a voxel of the best voxel (refinement); the best cosine is the score
  (-1..1). With a prior (`prior="registration"`), the search
  keeps only candidates within `radius_mm` of the affine registration's answer: the embedding then corrects
  what an affine map cannot follow (SAM-style coarse-to-fine matching with a geometric coarse step).
- geometric baselines (`GeometricMatcher`, `--encoder none`): `medssl.pretrain.matchers`' affine
  registration of B to A (SimpleITK) or normalised body-box coordinates; no score.

Each scan is read with the encoder's preprocessing (orientation, spacing, intensity window), so the scan's
preprocessed grid and its affine define the voxels searched. Two scans must look like one modality (CT: the
1st intensity percentile is below -500, air in Hounsfield units; else MR), and like the encoder's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from medssl.data import io
from medssl.data.body import body_mask
from medssl.data.preprocessing import VolumePreprocessing
from medssl.data.volumes import whole_volume_pipeline
from medssl.errors import UserError
from medssl.models.volume_encoders import VolumeEncoder, VolumeEncoderConfig, build_volume_encoder
from medssl.pretrain.matchers import build_matcher
from medssl.training.pretrained import load_pretrained, read_encoder_checkpoint

CT_AIR_PERCENTILE_HU = -500.0  # a CT scan's 1st intensity percentile lies below this (air is -1000 HU)
GeometricName = Literal["registration", "body_box"]


def guess_modality(array: np.ndarray) -> tuple[str, float]:
    """("CT" or "MR", the 1st percentile it was told by): CT when the 1st percentile is below -500 (HU air)."""
    first = float(np.percentile(np.asarray(array, np.float32), 1))
    return ("CT" if first < CT_AIR_PERCENTILE_HU else "MR"), first


@dataclass
class Scan:
    """One scan on its preprocessed grid: image (1, X, Y, Z) float32 in [0, 1] (RAS axes), affine (4, 4)
    voxel -> RAS mm of that grid, body (X, Y, Z) bool, modality as guessed from the raw intensities."""

    path: str
    image: torch.Tensor
    affine: np.ndarray
    body: np.ndarray
    modality: str
    first_percentile: float

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def to_voxels(self, points_mm: np.ndarray) -> np.ndarray:
        """(N, 3) RAS mm -> (N, 3) continuous voxel coordinates of the preprocessed grid."""
        inverse = np.linalg.inv(self.affine)
        return np.asarray(points_mm, float) @ inverse[:3, :3].T + inverse[:3, 3]

    def to_mm(self, voxels: np.ndarray) -> np.ndarray:
        return np.asarray(voxels, float) @ self.affine[:3, :3].T + self.affine[:3, 3]

    def contains(self, voxels: np.ndarray) -> np.ndarray:
        """(N,) bool: the voxel coordinates lie within the grid (half a voxel beyond the centres)."""
        shape = np.asarray(self.image.shape[1:])
        return np.all((voxels >= -0.5) & (voxels <= shape - 0.5), axis=1)


def load_scan(path: str | os.PathLike, prep: VolumePreprocessing) -> Scan:
    """Read and preprocess one scan (`whole_volume_pipeline(prep)`), with its body mask and modality guess."""
    modality, first = guess_modality(io.read_volume(path).array)
    item = whole_volume_pipeline(prep)({"image": str(path)})["image"]
    image = item.as_tensor().float()
    return Scan(str(path), image, np.asarray(item.affine, float), body_mask(image[0].numpy()), modality, first)


def check_same_modality(a: Scan, b: Scan, expected: str | None = None, source: str = "") -> None:
    """UserError when the two scans look like different modalities, or unlike `expected` (the encoder's)."""
    if a.modality != b.modality:
        raise UserError(f"{b.path}: looks like {b.modality} (1st intensity percentile {b.first_percentile:.0f}) "
                        f"while {a.path} looks like {a.modality} ({a.first_percentile:.0f}); matching needs two "
                        "scans of one modality")
    if expected is not None and a.modality != expected:
        raise UserError(f"{a.path}: looks like {a.modality} (1st intensity percentile {a.first_percentile:.0f}) "
                        f"but {source} was trained on {expected}")


# ------------------------------------------------------------------------------------------------ embedding


def sample_descriptors(maps: Sequence[torch.Tensor], strides: Sequence[int], voxels: torch.Tensor) -> torch.Tensor:
    """Unit-length descriptors (N, C) at continuous voxel coordinates `voxels` (N, 3) of the encoder's input
    grid: each map (1, C_s, X/s, Y/s, Z/s) sampled trilinearly where the point falls (a stride-s cell's centre
    is at input voxel s * i + (s - 1) / 2), unit-normalised, concatenated, divided by sqrt(number of maps)."""
    parts = []
    for m, s in zip(maps, strides):
        size = torch.tensor(m.shape[2:], dtype=voxels.dtype)
        u = (voxels - (s - 1) / 2) / s
        grid = (2 * u / (size - 1).clamp(min=1) - 1).flip(-1)  # grid_sample's last axis is (W, H, D) = (z, y, x)
        sampled = F.grid_sample(m.float(), grid.view(1, 1, 1, -1, 3).to(m.dtype), mode="bilinear",
                                padding_mode="border", align_corners=True)
        parts.append(F.normalize(sampled.view(m.shape[1], -1).T, dim=1))
    return torch.cat(parts, dim=1) / math.sqrt(len(parts))


class EmbeddingMatcher:
    """Matching by the encoder's multi-scale descriptors (module docstring). `name` labels it in reports."""

    candidates = 4  # best coarse cells refined per point

    def __init__(self, encoder: VolumeEncoder, prep: VolumePreprocessing, *, name: str = "encoder",
                 source: str = "encoder"):
        self.encoder = encoder.eval()
        self.prep, self.name, self.source = prep, name, source
        self._features: dict[str, list[torch.Tensor]] = {}

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, name: str = "encoder") -> EmbeddingMatcher:
        """The encoder of a "volume-encoder", "volume-network" or "pretrain-volume" checkpoint, with its
        preprocessing; another kind of checkpoint is a UserError naming it."""
        payload = read_encoder_checkpoint(path)
        arch = payload["arch"]
        config = VolumeEncoderConfig.model_validate(arch["encoder"] if isinstance(arch.get("encoder"), dict) else arch)
        encoder = build_volume_encoder(config)
        load_pretrained(encoder, path, arch=config, parts="encoder")
        prep = VolumePreprocessing.from_dict(payload["preprocessing"], where=str(path))
        return cls(encoder, prep, name=name, source=str(path))

    @classmethod
    def random(cls, config: VolumeEncoderConfig, prep: VolumePreprocessing, *, seed: int = 0,
               name: str = "random encoder") -> EmbeddingMatcher:
        """The same architecture at a seeded random initialisation: the control."""
        torch.manual_seed(seed)
        return cls(build_volume_encoder(config), prep, name=name, source=f"random {config.name} (seed {seed})")

    @torch.no_grad()
    def features(self, scan: Scan) -> list[torch.Tensor]:
        """The encoder's maps of the whole scan (zero-padded at the far end to a multiple of its coarsest
        stride, so voxel indices are unchanged), cached per scan path."""
        if scan.path not in self._features:
            k = self.encoder.size_multiple
            pad = [p for n in reversed(scan.image.shape[1:]) for p in (0, (-n) % k)]
            x = F.pad(scan.image, pad)[None].to(next(self.encoder.parameters()).device)
            self._features[scan.path] = [m.cpu() for m in self.encoder(x)]
        return self._features[scan.path]

    def descriptors(self, scan: Scan, voxels: np.ndarray) -> torch.Tensor:
        """(N, C) unit descriptors at (N, 3) voxel coordinates of `scan`."""
        return sample_descriptors(self.features(scan), self.encoder.strides,
                                  torch.as_tensor(np.asarray(voxels, np.float32)))

    @torch.no_grad()
    def match(self, a: Scan, points_mm: np.ndarray, b: Scan, *, prior_mm: np.ndarray | None = None,
              radius_mm: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) RAS mm of `a` -> ((N, 3) RAS mm in `b`, (N,) cosine scores). With `prior_mm` (N, 3), each
        point's search keeps the candidates within `radius_mm` of its prior (all body cells if none is)."""
        query = self.descriptors(a, a.to_voxels(points_mm))
        cells = _body_cells(b)
        candidates = self.descriptors(b, cells)                    # (M, C)
        similarity = query @ candidates.T                          # (N, M)
        if prior_mm is not None:
            distance = np.linalg.norm(b.to_mm(cells)[None] - np.asarray(prior_mm, float)[:, None], axis=2)
            far = torch.as_tensor(distance > radius_mm)
            far[far.all(dim=1)] = False                             # nothing within the radius: search everywhere
            similarity = similarity.masked_fill(far, -math.inf)
        top = similarity.topk(min(self.candidates, similarity.shape[1]), dim=1).indices.numpy()   # (N, k)
        best, scores = np.empty((len(top), 3)), np.empty(len(top))
        for n, cells_n in enumerate(top):
            local = np.concatenate([self._around(b, cells[c], 2, 1.0) for c in cells_n])
            values = (self.descriptors(b, local) @ query[n]).numpy()
            local = self._around(b, local[values.argmax()], 2, 0.25)   # then quarter voxels within half a voxel
            values = (self.descriptors(b, local) @ query[n]).numpy()
            best[n], scores[n] = local[values.argmax()], values.max()
        return b.to_mm(best), scores

    @staticmethod
    def _around(scan: Scan, centre: np.ndarray, steps: int, step: float) -> np.ndarray:
        """The (2 steps + 1)^3 grid points `step` voxels apart around `centre`, kept inside the scan."""
        offsets = np.stack(np.meshgrid(*[np.arange(-steps, steps + 1) * step] * 3, indexing="ij"), -1).reshape(-1, 3)
        return np.clip(np.round(centre / step) * step + offsets, 0, np.asarray(scan.image.shape[1:]) - 1)


def _body_cells(scan: Scan) -> np.ndarray:
    """(M, 3) voxel coordinates of the centres of the 2x2x2 cells whose nearest voxel lies in the body."""
    shape = scan.body.shape
    axes = [np.arange(0.5, n - 1, 2.0) for n in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    inside = scan.body[tuple(np.clip(np.round(grid).astype(int), 0, np.asarray(shape) - 1).T)]
    return grid[inside] if inside.any() else grid


# ------------------------------------------------------------------------------------------------ geometric


class GeometricMatcher:
    """The baselines of `medssl.pretrain.matchers` (`registration`: affine registration of B to A with
    SimpleITK; `body_box`: normalised body-box coordinates), fitted per pair of scans (cached)."""

    def __init__(self, method: GeometricName = "registration"):
        self.name, self.method = method, method
        self._fitted: dict[tuple[str, str], object] = {}

    def match(self, a: Scan, points_mm: np.ndarray, b: Scan) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) RAS mm of `a` -> ((N, 3) RAS mm in `b`, (N,) NaN scores)."""
        key = (a.path, b.path)
        if key not in self._fitted:
            self._fitted[key] = build_matcher(self.method).fit(
                [a.image[0].numpy(), b.image[0].numpy()], [a.spacing, b.spacing], [a.path, b.path])
        mapped, _ = self._fitted[key].match(0, a.to_voxels(points_mm), 1)
        return b.to_mm(mapped), np.full(len(mapped), np.nan)


# ------------------------------------------------------------------------------------------------ one call


class Correspondence:
    """A matcher with its scans cached by path: `match(a, b, points_mm)`. `prior`: with an embedding matcher,
    restrict its search to `radius_mm` around this geometric matcher's answer (a name, or a `GeometricMatcher`
    whose fitted pairs are shared with other users)."""

    def __init__(self, matcher: EmbeddingMatcher | GeometricMatcher, *,
                 prior: GeometricName | GeometricMatcher | None = None, radius_mm: float = 30.0,
                 prep: VolumePreprocessing | None = None):
        self.matcher, self.radius_mm = matcher, radius_mm
        if isinstance(prior, str):
            prior = GeometricMatcher(prior)
        self.prior = prior if isinstance(matcher, EmbeddingMatcher) else None
        self.prep = matcher.prep if isinstance(matcher, EmbeddingMatcher) else prep
        self._scans: dict[str, Scan] = {}

    @property
    def name(self) -> str:
        return self.matcher.name + (f" + {self.prior.name} prior" if self.prior else "")

    def scan(self, path: str | os.PathLike) -> Scan:
        path = str(path)
        if path not in self._scans:
            prep = self.prep
            if prep is None:  # geometric matching alone: the modality's default intensity scaling
                prep = VolumePreprocessing(modality=guess_modality(io.read_volume(path).array)[0], crop_size=(16,) * 3)
            self._scans[path] = load_scan(path, prep)
        return self._scans[path]

    def match(self, volume_a: str | os.PathLike, volume_b: str | os.PathLike, points_mm: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) RAS mm in A -> ((N, 3) RAS mm in B, (N,) scores; NaN for the geometric matchers)."""
        a, b = self.scan(volume_a), self.scan(volume_b)
        expected = self.matcher.prep.modality if isinstance(self.matcher, EmbeddingMatcher) else None
        check_same_modality(a, b, expected, getattr(self.matcher, "source", ""))
        points = np.atleast_2d(np.asarray(points_mm, float))
        outside = ~a.contains(a.to_voxels(points))
        if outside.any():
            lo, hi = a.to_mm(np.full(3, -0.5)), a.to_mm(np.asarray(a.image.shape[1:]) - 0.5)
            raise UserError(f"--point {' '.join(f'{v:g}' for v in points[outside][0])}: outside {a.path} "
                            f"(it spans {np.round(np.minimum(lo, hi), 1).tolist()} to "
                            f"{np.round(np.maximum(lo, hi), 1).tolist()} mm, RAS)")
        if isinstance(self.matcher, GeometricMatcher):
            return self.matcher.match(a, points, b)
        prior = self.prior.match(a, points, b)[0] if self.prior else None
        return self.matcher.match(a, points, b, prior_mm=prior, radius_mm=self.radius_mm)


def build_correspondence(encoder: str | os.PathLike | None, *, geometric: GeometricName = "registration",
                         prior: GeometricName | None = None, radius_mm: float = 30.0) -> Correspondence:
    """`encoder` a checkpoint path (embedding matching, optionally with a geometric `prior`), or None / "none"
    (the `geometric` baseline)."""
    if encoder is None or str(encoder) == "none":
        return Correspondence(GeometricMatcher(geometric))
    if not Path(encoder).is_file():
        raise UserError(f"{encoder}: no such encoder checkpoint (or give 'none' for the affine baseline)")
    return Correspondence(EmbeddingMatcher.from_checkpoint(encoder), prior=prior, radius_mm=radius_mm)


def match_point(encoder: str | os.PathLike | Correspondence | None, volume_a: str | os.PathLike,
                volume_b: str | os.PathLike, point_mm: Sequence[float]) -> tuple[tuple[float, float, float],
                                                                              float | None]:
    """Where `point_mm` (RAS mm) of `volume_a` lies in `volume_b`: (RAS mm, score), the score the descriptors'
    cosine (None for the geometric baseline, `encoder` None or "none"). `encoder`: a checkpoint path or a
    `Correspondence` (reuse one for many points: it caches the scans and their features)."""
    matcher = encoder if isinstance(encoder, Correspondence) else build_correspondence(encoder)
    points, scores = matcher.match(volume_a, volume_b, np.asarray(point_mm, float)[None])
    score = float(scores[0])
    return tuple(float(v) for v in points[0]), (None if math.isnan(score) else score)
