"""The one preprocessing schema per modality family, used by configs, checkpoints and every task.

`VolumePreprocessing` (CT/MR volumes) and `SignalPreprocessing` (physiological signals) are frozen
pydantic models. A task's `data` config section *is* one of them plus where the data lives
(`VolumeDataConfig`, `SignalDataConfig`), so a bad value is refused when the config is read, under
the key the user wrote (`data.percentiles`). Checkpoints store `to_dict()`; `from_dict` reads it
back (also from checkpoints written before this module existed: same keys).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
)

from medssl.config import StrictModel
from medssl.errors import UserError, validation_message

AXES = "LRPAIS"  # pairs of opposite axis codes
Modality = Literal["CT", "MR"]


class FrozenModel(BaseModel):
    """A validated, immutable value: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str | None = None):
        """Validate `values` (e.g. read back from a checkpoint); UserError naming `preprocessing.<key>`
        (after `where`, e.g. the checkpoint's path, when given)."""
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            message = validation_message(err, prefix="preprocessing")
            raise UserError(f"{where}: {message}" if where else message) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists): what checkpoints store."""
        return self.model_dump(mode="json")


class DataSource(StrictModel):
    """Where a task's data comes from. A relative `manifest` is resolved against the current directory."""

    manifest: Path
    store: Path | None = None  # the on-disk store (volumes: `medssl preprocess`; signals: memory-mapped recordings)

    @field_validator("manifest", "store")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else Path(os.path.abspath(Path(value).expanduser()))

    @field_validator("store")
    @classmethod
    def _a_folder(cls, value: Path | None) -> Path | None:
        if value is not None and value.exists() and not value.is_dir():
            raise ValueError(f"{value} is a file, not a folder")
        return value


# ------------------------------------------------------------------------------------------------ volumes


def smaller_than_crop(name: object, shape: tuple[int, ...], crop_size: tuple[int, ...], *,
                      resampled: bool = False) -> UserError:
    """The one refusal of a volume smaller than the crop under `data.small_volume=error` (`resampled`: its shape
    is the one after reorientation / resampling), naming the keys that change it."""
    after = " (after reorientation/resampling)" if resampled else ""
    return UserError(f"{name}: volume shape {tuple(int(s) for s in shape)}{after} is smaller than data.crop_size "
                     f"{tuple(crop_size)}; set data.small_volume=pad to zero-pad it")


class VolumePreprocessing(FrozenModel):
    """How volumes become network inputs (medssl.data.volumes builds the MONAI pipeline from it)."""

    modality: Modality = "CT"  # "CT" -> intensity window; "MR" -> percentile normalisation
    spacing: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None = None  # target mm; None: native
    window: tuple[float, PositiveFloat] = (40.0, 400.0)  # CT (level, width) in HU -> [0, 1], clipped
    percentiles: tuple[float, float] = (1.0, 99.0)  # MR (lower, upper) percentiles -> [0, 1], clipped
    crop_size: tuple[PositiveInt, PositiveInt, PositiveInt] = (64, 64, 64)  # (D, H, W) voxels
    orientation: str = "RAS"
    small_volume: Literal["pad", "error"] = "pad"  # a volume smaller than crop_size: zero-pad or refuse

    @field_validator("modality", "orientation", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("percentiles")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= value[0] < value[1] <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got {list(value)}")
        return value

    @field_validator("orientation")
    @classmethod
    def _axis_codes(cls, value: str) -> str:
        if len(value) != 3 or sorted(AXES.find(c) // 2 for c in value) != [0, 1, 2]:
            raise ValueError(f"{value!r} is not 3 axis codes like RAS or LPS")
        return value

    def differences(self, other: VolumePreprocessing) -> dict[str, tuple[Any, Any]]:
        """Fields that matter for this modality and differ: {name: (mine, other's)} (the window is
        ignored for MR, the percentiles for CT)."""
        ignored = {"percentiles"} if other.modality == "CT" else {"window"}
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], v) for k, v in theirs.items() if k not in ignored and mine[k] != v}


class VolumeDataConfig(VolumePreprocessing, DataSource):
    """The `data` section of a volume task: the preprocessing plus where the volumes are.

    `modality` may be left unset (None): it is then the manifest's modality "0" (`preprocessing`).
    `store`: the preprocessed on-disk store (`medssl.data.store`) that `medssl preprocess` writes and training
    reads crops from; unset, one folder per preprocessing beside the manifest (``.medssl-store/<key>``).
    """

    modality: Modality | None = None

    def preprocessing(self, manifest_modality: str | None) -> VolumePreprocessing:
        """The preprocessing, the modality defaulting to the manifest's (`manifest_modality`, e.g. "CT")."""
        modality = self.modality or (manifest_modality or "CT").upper()
        if modality not in ("CT", "MR"):
            raise UserError(f"data.modality: manifest {self.manifest} declares modality {manifest_modality!r}; "
                            "volume tasks need CT or MR (set data.modality)")
        values = self.model_dump(exclude=set(DataSource.model_fields))
        return VolumePreprocessing(**{**values, "modality": modality})


# ------------------------------------------------------------------------------------------------ signals


class SignalPreprocessing(FrozenModel):
    """How recordings become windows: resampled to `fs`, reduced to `channels`, cut into windows."""

    fs: PositiveFloat = 125.0
    channels: list[str] | None = None  # None: every record must have the same channels
    missing_channels: Literal["error", "zeros"] = "error"
    window_seconds: PositiveFloat = 4.0
    stride_seconds: PositiveFloat | None = None  # None: non-overlapping windows
    nan: Literal["error", "mask"] = "error"
    short: Literal["error", "skip"] = "error"  # a recording shorter than one window (skipped ones are reported)
    flat: Literal["error", "keep"] = "keep"

    def window_samples(self) -> tuple[int, int | None]:
        """(window, stride) in samples at `fs`; stride None = non-overlapping."""
        window = round(self.window_seconds * self.fs)
        if window < 2:
            raise UserError(f"data.window_seconds: {self.window_seconds} s at {self.fs:g} Hz is {window} sample(s); "
                            "need at least 2")
        stride = None if self.stride_seconds is None else max(1, round(self.stride_seconds * self.fs))
        return window, stride

    def check_channel_count(self, in_channels: int, field: str = "model.in_channels") -> None:
        """ValueError (for a config validator) when `channels` names another number of channels."""
        if self.channels is not None and len(self.channels) != in_channels:
            raise ValueError(f"{field} is {in_channels} but data.channels names {len(self.channels)} channels "
                             f"({', '.join(self.channels)})")

    def to_dict(self) -> dict[str, Any]:
        """The fields plus the derived `window` and `stride` in samples (what checkpoints store)."""
        window, stride = self.window_samples()
        return {**super().to_dict(), "window": window, "stride": stride}

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str | None = None) -> SignalPreprocessing:
        """Read back `to_dict()` (the derived keys are recomputed, not read)."""
        return super().from_dict({k: v for k, v in values.items() if k not in ("window", "stride")}, where=where)


class SignalDataConfig(SignalPreprocessing, DataSource):
    """The `data` section of a signal task: the preprocessing plus where the recordings are. `store`: a folder
    for the resampled recordings as memory-mapped ``.npy`` files (`medssl.data.timeseries.RecordingStore`),
    kept for later runs; unset, a temporary folder for the run."""

