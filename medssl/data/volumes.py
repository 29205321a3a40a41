"""The volume pipeline: MONAI dictionary transforms from manifest entries to fixed-size crops.

Input items are dicts with absolute paths, ``{"image": "/abs/vol.nii.gz", "label": "/abs/seg.nii.gz", ...}``
(see `manifest_volume_entries`). Output items hold ``"image"``: a float32 `MetaTensor` of shape
``(1, D, H, W)`` in [0, 1] whose ``.affine`` maps voxel indices to RAS+ world mm after every spatial
step (orientation, resampling, padding, cropping), and, with ``with_label``, ``"label"``: a
``(1, D, H, W)`` float32 `MetaTensor` of integral class values on the same grid.

Reading: every file goes through `medssl.data.io.read_volume` wrapped as a MONAI `ImageReader`
(`VolumeReader`) and handed to `LoadImage` as its runtime reader. So NIfTI, NRRD/MHA and DICOM
series are read the same way as everywhere else in medssl (MONAI's own ITK reader needs the `itk`
package, which medssl does not install), each file is read once, and a missing, corrupt or
truncated file raises `UserError` naming it. MONAI's `Compose` wraps exceptions raised inside a
transform in a `RuntimeError`; `VolumePipeline` re-raises the `UserError` found in that chain.

Preprocessing settings come from `medssl.data.preprocessing.VolumePreprocessing`.

Pipeline order: load (channel first) -> Orientationd -> Spacingd (optional; bilinear image, nearest
label) -> intensity (CT: window (level, width) -> [0, 1] clipped; MR: percentiles -> [0, 1] clipped)
-> size policy (SpatialPadd to ``crop_size``, or UserError) -> RandSpatialCropd (training) or
CenterSpatialCropd (evaluation; deterministic)
-> EnsureTyped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import ImageReader, MetaTensor
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    EnsureTyped,
    LoadImage,
    MapTransform,
    Orientationd,
    RandomizableTrait,
    RandSpatialCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
    Transform,
)

from medssl.data import io
from medssl.data.preprocessing import VolumePreprocessing, smaller_than_crop
from medssl.errors import UserError

if TYPE_CHECKING:
    from medssl.data.manifest import Manifest

class VolumeReader(ImageReader):
    """A MONAI `ImageReader` backed by `medssl.data.io.read_volume` (NIfTI, NRRD/MHA, DICOM folders).

    `get_data` returns the ``(X, Y, Z)`` array and a meta dict with the RAS affine; errors are
    `UserError`s naming the file.
    """

    def __init__(self, *, label: bool = False) -> None:
        self.label = label

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        return True  # read_volume decides, and names the file when it cannot

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs: Any) -> io.Volume:
        paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        if len(paths) != 1:
            raise UserError(f"{paths[0]}: one file per key expected, got {len(paths)}")
        return io.read_volume(paths[0], label=self.label)

    def get_data(self, img: io.Volume) -> tuple[np.ndarray, dict]:
        # tensors rather than numpy arrays: the persistent cache loads with torch.load(weights_only=True)
        meta = {"affine": torch.as_tensor(img.affine), "original_affine": torch.as_tensor(img.affine),
                "spatial_shape": torch.as_tensor(img.array.shape), "space": "RAS",
                "original_channel_dim": float("nan")}
        return img.array, meta


class LoadVolumed(MapTransform):
    """Load each key's path with `VolumeReader` into a channel-first ``(1, X, Y, Z)`` float32 `MetaTensor`.

    The key ``"label"`` is read as a label map (values checked integral by `io.read_volume`).
    """

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__(keys)
        self._load = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = self._load(out[key], reader=VolumeReader(label=key == "label"))
        return out

    def from_volume(self, volume: io.Volume) -> MetaTensor:
        """The ``(1, X, Y, Z)`` float32 `MetaTensor` this transform makes of a file, from a `Volume` already read."""
        return self._load(str(volume.path), reader=_ReadAlready(volume))


class _ReadAlready(VolumeReader):
    """A `VolumeReader` that hands over a `Volume` read before (so a file is read once)."""

    def __init__(self, volume: io.Volume) -> None:
        super().__init__()
        self.volume = volume

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs: Any) -> io.Volume:
        return self.volume


class RequireSize(MapTransform):
    """Raise `UserError` naming the file and its shape when a spatial size is below `size` (small_volume: error)."""

    def __init__(self, keys: Sequence[str], size: Sequence[int]) -> None:
        super().__init__(keys)
        self.size = tuple(size)

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        for key in self.key_iterator(data):
            shape = tuple(data[key].shape[1:])
            if any(s < c for s, c in zip(shape, self.size)):
                name = data[key].meta.get("filename_or_obj", key)
                raise smaller_than_crop(name, shape, self.size, resampled=True)
        return data


class VolumePipeline(Compose):
    """A `Compose` that re-raises a `UserError` from any of its transforms as itself.

    `seed` seeds its random transforms (`Compose.set_random_state`). MONAI re-seeds the transforms
    inside any newly built `Compose` (also in `Compose.flatten`), so seed the outermost pipeline last.
    """

    def __init__(self, transforms: Sequence[Callable], *, seed: int | None = None) -> None:
        super().__init__(list(transforms))
        if seed is not None:
            self.set_random_state(seed=seed)

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as err:
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None

    def deterministic_head(self) -> list[Callable]:
        """The transforms before the first random one (the whole-volume pipeline)."""
        first = self.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
        return list(self.transforms[:first])


def preprocessing_steps(prep: VolumePreprocessing, keys: Sequence[str]) -> list[Callable]:
    """The transforms between loading and the size policy: orientation, spacing (bilinear image, nearest
    label), intensity. `keys`: ``["image"]`` or ``["image", "label"]``. What `medssl.data.store` applies to
    volumes it has read itself, so a stored volume equals the pipeline's, voxel for voxel."""
    modes = ["bilinear", "nearest"][: len(keys)]
    steps: list[Callable] = [Orientationd(keys, axcodes=prep.orientation, labels=None)]
    if prep.spacing is not None:
        steps.append(Spacingd(keys, pixdim=prep.spacing, mode=modes))
    if prep.modality == "CT":
        level, width = prep.window
        steps.append(ScaleIntensityRanged("image", a_min=level - width / 2, a_max=level + width / 2,
                                          b_min=0.0, b_max=1.0, clip=True))
    else:
        steps.append(ScaleIntensityRangePercentilesd("image", lower=prep.percentiles[0], upper=prep.percentiles[1],
                                                     b_min=0.0, b_max=1.0, clip=True))
    return steps


def volume_transforms(prep: VolumePreprocessing, *, with_label: bool = False, random_crop: bool = False,
                      seed: int | None = None) -> VolumePipeline:
    """The MONAI pipeline for `prep`: entry dict -> ``{"image": (1, D, H, W)[, "label": (1, D, H, W)]}``.

    ``random_crop`` picks RandSpatialCropd (seeded with ``seed``), otherwise a deterministic centre crop.
    """
    keys = ["image", "label"] if with_label else ["image"]
    steps: list[Callable] = [LoadVolumed(keys), *preprocessing_steps(prep, keys)]
    if prep.small_volume == "pad":
        steps.append(SpatialPadd(keys, spatial_size=prep.crop_size, mode="constant"))
    else:
        steps.append(RequireSize(keys, prep.crop_size))
    if random_crop:
        steps.append(RandSpatialCropd(keys, roi_size=prep.crop_size, random_size=False))
    else:
        steps.append(CenterSpatialCropd(keys, roi_size=prep.crop_size))
    steps.append(EnsureTyped(keys, dtype=torch.float32, track_meta=True))
    return VolumePipeline(steps, seed=seed)


def whole_volume_pipeline(prep: VolumePreprocessing, *, with_label: bool = False) -> VolumePipeline:
    """The pipeline without its crop: ``{"image"[, "label"]}`` -> whole preprocessed (1, D, H, W) volumes,
    padded to at least `crop_size` (or refused, per `small_volume`), each carrying its transform trace
    (so that MONAI's `Invertd` can take predictions back to the input's grid)."""
    return VolumePipeline(volume_transforms(prep, with_label=with_label, random_crop=True).deterministic_head())


def manifest_volume_entries(manifest: Manifest, split: str, *, with_label: bool = False) -> list[dict]:
    """Entries of `split` as dicts with absolute paths: ``image`` (+ ``label``), ``patient_id``, ``study_id``
    and ``where`` (the entry's place in the manifest, e.g. ``training[3]``, for messages).

    Volume pipelines need every entry to have an image (and a label with `with_label`): entries
    without one raise `UserError` listing them (``split[i] patient/study``).
    """
    keys = ("image", "label") if with_label else ("image",)
    items, lacking = [], []
    for i, entry in enumerate(manifest.split(split)):
        missing = [key for key in keys if not getattr(entry, key)]
        if missing:
            lacking.append(f"{split}[{i}] {entry.patient_id}/{entry.study_id or '-'} (no {', '.join(missing)})")
            continue
        item = {key: str(manifest.path(getattr(entry, key))) for key in keys}
        items.append({**item, "patient_id": entry.patient_id, "study_id": entry.study_id or "",
                      "where": f"{split}[{i}]"})
    if lacking:
        raise UserError(f"manifest {manifest.root}: {len(lacking)} entries lack a file the volume pipeline needs: "
                        + "; ".join(lacking))
    return items


def patients_in_turn(entries: list[dict], order: list[str] | None = None) -> list[dict]:
    """Entries (dicts with ``patient_id``) reordered round by round: each patient's first entry, then each
    one's second, ...; patients in `order` (default: order of first appearance). So the first n entries
    come from min(n, patients) patients, and the choice for n is inside the one for n + 1."""
    by_patient: dict[str, list[dict]] = {}
    for entry in entries:
        by_patient.setdefault(entry["patient_id"], []).append(entry)
    order = list(by_patient) if order is None else order
    rounds = max((len(studies) for studies in by_patient.values()), default=0)
    return [by_patient[p][r] for r in range(rounds) for p in order if r < len(by_patient[p])]
