"""Per-step micro-batches for 3D pretraining, read a crop at a time from the preprocessed store.

The volumes come from `medssl.data.store` (`VolumePretrainBatches.from_store`: only the store's index is in
memory; each crop reads the region it covers, each body-mask look-up the box it needs) or, for tests and
small experiments, from tensors in memory (the constructor, `from_manifest`). Both give the same batches,
bit for bit (`views.extract_crop_from_region`; tested against the in-memory path).

Item ``i`` of `VolumePretrainBatches` is one micro-batch, a deterministic function of ``(seed, i)``
(numpy and torch generators from `medssl.seeding`). Under torchrun every rank draws the anchors of the
global batch (``world_size`` x B) and makes the crops of its own B (rank-major), so N processes with B
anchors each see the batch one process with N x B sees. Only images are read: never label maps, lesion
masks or reports.

For each of the ``B`` anchors: a volume is drawn uniformly, an anchor point uniformly among its body
voxels (the matcher's body mask), and

- ``a``: a crop centred at the anchor point (random isotropic scale, random flips);
- ``b``: an overlapping crop of the same volume (`views.sample_overlapping`), with ``N``
  corresponding points of a and b in feature-grid coordinates;
- ``c``: a crop of another study of the same patient centred where the matcher maps the anchor
  point (when the patient has no other study: ``has_c`` False and c is a second crop of a's
  volume at the anchor point, with ``study_c == study_a``, so a same-study-aware patient loss
  ignores it);
- ``d``: a crop of another patient at the matched anatomical location: up to ``match_retries``
  distinct volumes of other patients (random order) are tried until the mapped point lies in the body
  (``has_d`` False when none is accepted, or when the split has one patient: then d is a second
  crop of a's volume and ``patient_d == patient``).

Crops near the border are moved inside the volume (`views.sample_crop(clamp=True)`), so a crop's
centre may differ from its anchor point; the region maps use each crop's true geometry.

Output of ``__getitem__(i)`` (S = crop size, (d, h, w) = S // stride per axis, G = grid):
    "a", "b", "c", "d":     (B, 1, S, S, S) float32 in [0, 1] (intensity jitter when enabled)
    "points_a", "points_b": (B, N, 3) float32, feature-grid coordinates (array-axis order) of the
                            same volume points in a and b (`views` module docstring: stride convention)
    "region_a", "region_d": (B, d, h, w) long, cell id of the matcher's normalised frame, -1 = outside
    "patient":              (B,) long, patient index of a/b/c (index into `patient_ids`)
    "study_a", "study_c":   (B,) long, volume index (unique per study) of a/b and of c
    "patient_d":            (B,) long, patient index of d
    "has_c", "has_d":       (B,) bool
    "match_accept_rate":    () float32, accepted / tried d-matches in this micro-batch (0 if none tried);
                            log this one: `matcher.acceptance_rate` also counts c-matches and, with
                            DataLoader workers, lives in each worker's copy
    "cell_positions":       (G^3, 3) float32, normalised centre of each region cell
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import Dataset as MonaiDataset
from monai.data import MetaTensor
from monai.transforms import SpatialPad
from torch.utils.data import Dataset

from medssl.data.manifest import Manifest, load_manifest
from medssl.data.preprocessing import VolumePreprocessing, smaller_than_crop
from medssl.data.store import StoredScan, StoreSplit, VolumeStore
from medssl.data.volumes import manifest_volume_entries, whole_volume_pipeline
from medssl.errors import UserError
from medssl.pretrain.matchers import Matcher, MatcherName, build_matcher
from medssl.pretrain.views import (
    CropGeometry,
    cell_centres,
    corresponding_points,
    crop_region,
    extract_crop,
    extract_crop_from_region,
    draw_jitter,
    intensity_jitter,
    random_flips,
    region_map,
    sample_crop,
    sample_overlapping,
)
from medssl.seeding import numpy_generator, torch_generator
from medssl.training.distributed import local_rows

VIEWS = ("a", "b", "c", "d")


@dataclass
class _Anchor:
    """The views of one anchor: (volume index, geometry) per view plus bookkeeping."""

    views: dict[str, tuple[int, CropGeometry]]
    has_c: bool
    has_d: bool
    tried: int
    accepted: int


class TensorVolumes:
    """In-memory (1, X, Y, Z) volumes as a crop source."""

    def __init__(self, volumes: Sequence[torch.Tensor]) -> None:
        self.volumes = list(volumes)

    def __len__(self) -> int:
        return len(self.volumes)

    def shape(self, index: int) -> tuple[int, int, int]:
        return tuple(self.volumes[index].shape[1:])  # type: ignore[return-value]

    def crop(self, index: int, geom: CropGeometry) -> torch.Tensor:
        return extract_crop(self.volumes[index], geom)


class StoredVolumes:
    """The entries of a store split as a crop source and as `medssl.data.body.BodyMasks`: entry i is scan
    ``split.scans[i]``, zero-padded to `crop_size` as the in-memory pipeline pads (or refused with
    ``small_volume="error"``). In memory: the split's index rows only; scans are opened when read."""

    def __init__(self, store: VolumeStore, split: StoreSplit, crop_size: Sequence[int], small_volume: str) -> None:
        self.store, self.crop_size, self.small_volume = store, tuple(int(c) for c in crop_size), small_volume
        self.rows = split.rows
        stored = store.shapes[self.rows] if len(self.rows) else np.zeros((0, 3), np.int64)
        short = np.maximum(np.asarray(self.crop_size) - stored, 0)
        if small_volume == "error" and short.any():
            first = int(np.flatnonzero(short.any(1))[0])
            raise smaller_than_crop(self.names[first], stored[first], self.crop_size)
        self.shapes, self.offsets = stored + short, short // 2

    @property
    def names(self) -> list[str]:
        return [self.store.images[row] for row in self.rows]

    @property
    def spacings(self) -> np.ndarray:
        return self.store.spacings[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def scan(self, index: int) -> StoredScan:
        return self.store.scan(self.store.scan_ids[self.rows[index]], pad_to=self.crop_size,
                               small_volume=self.small_volume)

    def shape(self, index: int) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.shapes[index])  # type: ignore[return-value]

    def crop(self, index: int, geom: CropGeometry) -> torch.Tensor:
        lo, hi = crop_region(geom, self.shapes[index])
        region = torch.from_numpy(self.scan(index).image(lo, hi))[None]
        return extract_crop_from_region(region, lo, self.shapes[index], geom)

    def read(self, index: int) -> np.ndarray:
        """The whole (padded) volume (the registration matcher reads each once)."""
        return self.scan(index).image(np.zeros(3, np.int64), self.shapes[index])

    # medssl.data.body.BodyMasks
    def box(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.store.boxes[self.rows[index]]
        return lo + self.offsets[index], hi + self.offsets[index]

    def count(self, index: int) -> int:
        return int(self.store.body_counts[self.rows[index]])

    def voxel(self, index: int, k: int) -> np.ndarray:
        return self.scan(index).body_voxel(k)

    def region(self, index: int, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
        return self.scan(index).body(lo, hi)


class VolumePretrainBatches(Dataset):
    """Map-style dataset: item ``i`` = micro-batch ``i`` (see the module docstring for keys and shapes).

    volumes: (1, X, Y, Z) float tensors in [0, 1] (windowed), or a `StoredVolumes` (`from_store`);
    patient_ids, study_ids: one per volume; spacings: (3,) mm per volume (None: 1 mm; used by the
    registration matcher); names: file paths for error messages. A volume smaller than `crop_size` is
    zero-padded (``small_volume="pad"``, centred) or refused with `UserError` naming it (``"error"``).
    `matcher` is a fitted-or-not `Matcher` or a name for `build_matcher(name, **matcher_options)`; it is
    fitted here. `length` is what ``len()`` reports (the trainer indexes by step, any ``i >= 0`` works).
    """

    def __init__(self, volumes: Sequence[torch.Tensor] | StoredVolumes, patient_ids: Sequence[str],
                 study_ids: Sequence[str], *, batch_size: int, crop_size: int | Sequence[int] = 32,
                 spacings: Sequence[Sequence[float]] | None = None, names: Sequence[str] | None = None,
                 matcher: Matcher | MatcherName = "body_box", matcher_options: dict[str, Any] | None = None,
                 points: int = 64, stride: int = 4, grid: int = 4,
                 scale_range: tuple[float, float] = (0.8, 1.25), max_shift_fraction: float = 0.25,
                 flip_prob: float = 0.5, jitter: bool = True, match_retries: int = 10, small_volume: str = "pad",
                 seed: int = 0, rank: int = 0, world_size: int = 1, length: int = 10**9) -> None:
        stored = isinstance(volumes, StoredVolumes)
        if stored:
            names = volumes.names if names is None else names
        names = list(names) if names is not None else [f"volume {i}" for i in range(len(volumes))]
        if not len(volumes):
            raise UserError("volumes: no volume to pretrain on")
        if not len(volumes) == len(patient_ids) == len(study_ids) == len(names):
            raise ValueError(f"VolumePretrainBatches: {len(volumes)} volumes but {len(patient_ids)} patient ids, "
                             f"{len(study_ids)} study ids and {len(names)} names")
        self.crop_size = tuple(int(s) for s in np.broadcast_to(np.asarray(crop_size), (3,)))
        if stride < 1 or min(self.crop_size) < stride:
            raise UserError(f"crop_size: {self.crop_size} must be at least the feature stride {stride} on every axis")
        shapes = volumes.store.shapes[volumes.rows] if stored else [tuple(v.shape[1:]) for v in volumes]
        if small_volume == "pad":  # said once, naming the files: a mostly padded crop teaches little
            _warn_padded(shapes, names, self.crop_size)
        if stored:
            self.source: TensorVolumes | StoredVolumes = volumes
        else:
            self.volumes = [_fit_size(v, self.crop_size, small_volume, name) for v, name in zip(volumes, names)]
            self.source = TensorVolumes(self.volumes)
        self.names, self.study_ids = names, np.asarray(study_ids, dtype=str)
        # sorted unique patients and each volume's index among them; fixed-width strings, no object per entry
        self.patient_ids, self.patient_of = np.unique(np.asarray(patient_ids, dtype=str), return_inverse=True)
        self.patient_of = self.patient_of.reshape(-1)
        self.batch_size, self.points, self.stride, self.grid = batch_size, points, stride, grid
        self.scale_range, self.max_shift_fraction, self.flip_prob = tuple(scale_range), max_shift_fraction, flip_prob
        self.jitter, self.match_retries, self.seed, self.length = jitter, match_retries, seed, length
        self.mine = local_rows(batch_size, rank)  # this rank's anchors of the global batch
        self.global_size = batch_size * world_size
        if isinstance(matcher, str):
            matcher = build_matcher(matcher, **(matcher_options or {}))
        if stored:
            self.matcher = matcher.fit_bodies(volumes, spacings, names, volumes.read)
        else:
            self.matcher = matcher.fit([v[0].numpy() for v in self.volumes], spacings, names)
        self.bodies = self.matcher.bodies
        self.cell_positions = cell_centres(grid)

    @classmethod
    def from_store(cls, store: VolumeStore, split: str, prep: VolumePreprocessing,
                   matcher_name: MatcherName = "body_box", **options: Any) -> VolumePretrainBatches:
        """The batches of `split` of a preprocessed store (`medssl.data.store.ensure_store`), read lazily. Crops
        have ``prep.crop_size`` unless ``crop_size`` is in `options` (the constructor's keyword arguments)."""
        entries = store.split(split)
        if not len(entries):
            raise UserError(f"{store.manifest}: split '{split}' has no volume to pretrain on")
        options.setdefault("crop_size", prep.crop_size)
        source = StoredVolumes(store, entries, options["crop_size"], prep.small_volume)
        return cls(source, entries.patient_ids, entries.study_ids, spacings=source.spacings,
                   matcher=matcher_name, small_volume=prep.small_volume, **options)

    @classmethod
    def from_manifest(cls, manifest: Manifest | str | os.PathLike, split: str, prep: VolumePreprocessing,
                      matcher_name: MatcherName = "body_box", **options: Any) -> VolumePretrainBatches:
        """Every image of `split` loaded into memory through the MONAI pipeline of `medssl.data.volumes` without
        its crop (`whole_volume_pipeline`: load, orientation, spacing, intensity window, the small-volume
        policy): for tests and benches (training reads the store: `from_store`). Crops have
        ``prep.crop_size`` unless ``crop_size`` is in `options` (the other keyword arguments of the constructor).
        A split without any volume raises `UserError` naming the manifest and split.
        """
        manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        entries = manifest_volume_entries(manifest, split)  # images only: no label maps, masks or reports
        if not entries:
            raise UserError(f"{manifest.root}: split '{split}' has no volume to pretrain on")
        options.setdefault("crop_size", prep.crop_size)
        dataset = MonaiDataset(entries, whole_volume_pipeline(prep))
        images = [dataset[i]["image"] for i in range(len(entries))]
        for entry, image in zip(entries, images):
            values = image.as_tensor()
            bad = int((~torch.isfinite(values)).sum())
            if bad:
                raise UserError(f"{entry['image']}: {bad} NaN/inf voxel(s) after preprocessing; fix or drop the volume "
                                "(medssl manifest check lists every such file)")
            if values.numel() and values.max() == values.min():
                raise UserError(f"{entry['image']}: constant after preprocessing (every voxel "
                                f"{float(values.max()):g}): nothing to learn from; check its intensities and "
                                "data.window / data.modality")
        return cls([image.as_tensor().float() for image in images], [e["patient_id"] for e in entries],
                   [e["study_id"] for e in entries], spacings=[image.pixdim.tolist() for image in images],
                   names=[e["image"] for e in entries], matcher=matcher_name, small_volume=prep.small_volume,
                   **options)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = numpy_generator(self.seed, i, 0)  # 0: where the rank was, so one process draws as it always did
        generator = torch_generator(self.seed, i, 0)
        drawn = [self._anchor(rng) for _ in range(self.global_size)]
        mine = range(self.global_size)[self.mine]
        crops = {key: torch.stack([crop for k, anchor in enumerate(drawn)
                                   if (crop := self._crop(*anchor.views[key], generator, k in mine)) is not None])
                 for key in VIEWS}
        pairs = [corresponding_points(anchor.views["a"][1], anchor.views["b"][1], self.points, rng, self.stride)
                 for anchor in drawn][self.mine]
        tried = sum(anchor.tried for anchor in drawn)
        accepted = sum(anchor.accepted for anchor in drawn)
        anchors = drawn[self.mine]
        return {
            **crops,
            "points_a": torch.from_numpy(np.stack([pa for pa, _ in pairs])),
            "points_b": torch.from_numpy(np.stack([pb for _, pb in pairs])),
            "region_a": self._regions(anchors, "a"),
            "region_d": self._regions(anchors, "d"),
            "patient": self._ids(anchors, "a", self.patient_of),
            "study_a": self._ids(anchors, "a"),
            "study_c": self._ids(anchors, "c"),
            "patient_d": self._ids(anchors, "d", self.patient_of),
            "has_c": torch.tensor([anchor.has_c for anchor in anchors]),
            "has_d": torch.tensor([anchor.has_d for anchor in anchors]),
            "match_accept_rate": torch.tensor(accepted / tried if tried else 0.0),  # of the global batch
            "cell_positions": self.cell_positions.clone(),
        }

    def _anchor(self, rng: np.random.Generator) -> _Anchor:
        """Draw one anchor (volume, body point) and the geometry of its four views."""
        volume = int(rng.integers(len(self.source)))
        voxel = self.bodies.voxel(volume, int(rng.integers(self.bodies.count(volume))))
        point = voxel.astype(float) + rng.uniform(-0.5, 0.5, 3)
        geom_a = self._view_at(volume, point, rng)
        geom_b = sample_overlapping(geom_a, rng, self.max_shift_fraction, self.scale_range, self.flip_prob,
                                    volume_shape=self.source.shape(volume))
        patient = self.patient_of[volume]
        same_patient = np.flatnonzero((self.patient_of == patient) & (np.arange(len(self.source)) != volume))
        others = np.flatnonzero(self.patient_of != patient)
        c_volume, c_point = volume, point
        if len(same_patient):
            c_volume = int(rng.choice(same_patient))
            c_point = self.matcher.match(volume, point[None], c_volume)[0][0]
        d_volume, d_point, accepted, tried = volume, point, False, 0
        for candidate in rng.permutation(others)[: self.match_retries]:
            mapped, ok = self.matcher.match(volume, point[None], int(candidate))
            d_volume, d_point, accepted, tried = int(candidate), mapped[0], bool(ok[0]), tried + 1
            if accepted:
                break
        views = {"a": (volume, geom_a), "b": (volume, geom_b), "c": (c_volume, self._view_at(c_volume, c_point, rng)),
                 "d": (d_volume, self._view_at(d_volume, d_point, rng))}
        return _Anchor(views, has_c=bool(len(same_patient)), has_d=accepted, tried=tried, accepted=int(accepted))

    def _view_at(self, volume: int, point: np.ndarray, rng: np.random.Generator) -> CropGeometry:
        scale = rng.uniform(*self.scale_range)
        return sample_crop(self.source.shape(volume), point, self.crop_size, scale,
                           random_flips(rng, self.flip_prob))

    def _crop(self, volume: int, geom: CropGeometry, generator: torch.Generator, make: bool) -> torch.Tensor | None:
        """The crop (jittered when enabled), or None for another rank's crop, whose draws are still taken."""
        if not make:
            if self.jitter:
                draw_jitter((1, *self.crop_size), generator)
            return None
        crop = self.source.crop(volume, geom)
        return intensity_jitter(crop, generator) if self.jitter else crop

    def _regions(self, anchors: list[_Anchor], view: str) -> torch.Tensor:
        return torch.stack([region_map(geom, self.matcher, volume, self.grid, self.stride)
                            for volume, geom in (anchor.views[view] for anchor in anchors)])

    @staticmethod
    def _ids(anchors: list[_Anchor], view: str, lookup: np.ndarray | None = None) -> torch.Tensor:
        volumes = np.array([anchor.views[view][0] for anchor in anchors])
        return torch.from_numpy(volumes if lookup is None else lookup[volumes]).long()


def _warn_padded(shapes: Sequence[Sequence[int]], names: Sequence[str], crop_size: tuple[int, int, int]) -> None:
    """Say once, naming up to three files, that volumes smaller than the crop are zero-padded."""
    shapes = np.asarray(shapes, np.int64).reshape(-1, 3)
    shares = 1 - np.prod(np.minimum(shapes, crop_size), axis=1) / np.prod(crop_size)
    padded = np.flatnonzero(shares > 0)
    if len(padded):
        worst = padded[np.argsort(-shares[padded], kind="stable")]
        print(f"warning: {len(padded)} volume(s) smaller than crop_size {crop_size} are zero-padded, up to "
              f"{100 * shares[worst[0]]:.0f} % of a crop: {', '.join(str(names[k]) for k in worst[:3])}"
              f"{' ...' if len(worst) > 3 else ''}", file=sys.stderr)


def _fit_size(volume: torch.Tensor, crop_size: tuple[int, int, int], small_volume: str, name: str) -> torch.Tensor:
    """Check a (1, X, Y, Z) volume against the crop size: zero-pad (centred) or raise UserError."""
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise UserError(f"{name}: expected a (1, X, Y, Z) volume, got shape {tuple(volume.shape)}")
    shape = tuple(volume.shape[1:])
    if all(s >= c for s, c in zip(shape, crop_size)):
        return volume.float()
    if small_volume == "error":
        raise smaller_than_crop(name, shape, crop_size)
    if small_volume != "pad":
        raise UserError(f"small_volume: {small_volume!r} is not one of pad, error")
    padded = SpatialPad(crop_size, mode="constant")(volume.float())
    return padded.as_tensor() if isinstance(padded, MetaTensor) else padded
