"""TS2Vec-style dilated convolutional encoder for multichannel signals.

Input projection (a 1x1 convolution, i.e. a per-timestamp linear map) followed by `depth` residual
blocks of two dilated `Conv1d` (dilation 2^i in block i, GELU before each convolution, "same"
padding); the last block maps to `out_dim`. The output keeps the time axis: one representation per
timestamp. Timestamp masking (TS2Vec) zeroes the projected input at masked timestamps.

Sizes: the defaults are tiny (CPU tests and demos). The paper-size setting of TS2Vec / COMET is
`TSEncoderConfig(hidden=64, out_dim=320, depth=10, kernel=3)` (10 residual blocks, 320-d).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import PositiveInt, field_validator
from torch import nn

from medssl.config import StrictModel
from medssl.errors import UserError
from medssl.training.checkpoint import ENCODER_PREFIX, Kind, LoadReport, load_checkpoint, load_weights, with_prefix


class TSEncoderConfig(StrictModel):
    """Architecture arguments (stored in checkpoints as `arch`)."""

    in_channels: PositiveInt = 2
    hidden: PositiveInt = 32
    out_dim: PositiveInt = 64
    depth: PositiveInt = 6
    kernel: PositiveInt = 3

    @field_validator("kernel")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be odd so that 'same' padding keeps the length")
        return value


class DilatedBlock(nn.Module):
    """GELU -> Conv1d(dilation) -> GELU -> Conv1d(dilation), plus a residual (1x1 projection when widths differ).

    (B, C_in, T) -> (B, C_out, T).
    """

    def __init__(self, c_in: int, c_out: int, *, kernel: int, dilation: int):
        super().__init__()
        padding = (kernel - 1) * dilation // 2
        self.conv1 = nn.Conv1d(c_in, c_out, kernel, padding=padding, dilation=dilation)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel, padding=padding, dilation=dilation)
        self.project = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, 1, T) in channels-last memory (see `TSEncoder.forward`) -> (B, C_out, 1, T), the same."""
        residual = x if self.project is None else _conv(self.project, x)
        return _conv(self.conv2, F.gelu(_conv(self.conv1, F.gelu(x)))) + residual


def _conv(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """The "same"-padded `conv` applied to x (B, C, 1, T) as the equivalent 2D convolution (in channels-last
    memory oneDNN convolves without reordering its input and output: faster than the 1D convolution of (B, C, T)
    on a CPU), with only the taps that can reach the signal: a tap whose offset is T or more multiplies zero
    padding at every timestamp, so dropping it changes no output, and its weight's gradient is 0 either way. (A
    window of 300 samples at dilation 512 or 1024, the last blocks of a 10-block TS2Vec encoder, needs the centre
    tap alone: a third of the work.)"""
    half, dilation = (conv.kernel_size[0] - 1) // 2, conv.dilation[0]
    reach = min(half, (x.shape[-1] - 1) // dilation)
    weight = conv.weight[:, :, half - reach:half + reach + 1] if reach < half else conv.weight
    return F.conv2d(x, weight.unsqueeze(2), conv.bias, padding=(0, reach * dilation), dilation=(1, dilation))


class TSEncoder(nn.Module):
    """(B, C, T) signals -> (B, T, D) per-timestamp representations (D = out_dim)."""

    def __init__(self, config: TSEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or TSEncoderConfig()
        self.input = nn.Conv1d(config.in_channels, config.hidden, 1)
        widths = [config.hidden] * config.depth + [config.out_dim]
        self.blocks = nn.Sequential(*(DilatedBlock(widths[i], widths[i + 1], kernel=config.kernel, dilation=2**i)
                                      for i in range(config.depth)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, T); mask: (B, T) bool, True = masked timestamp (zeroed after the input projection)."""
        if x.ndim != 3 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"TSEncoder: expected (B, {self.config.in_channels}, T), got {tuple(x.shape)}")
        h = _conv(self.input, x[:, :, None, :].contiguous(memory_format=torch.channels_last))
        if mask is not None:  # masked_fill returns (B, C, 1, T) memory: back to channels-last
            h = h.masked_fill(mask[:, None, None, :], 0.0).contiguous(memory_format=torch.channels_last)
        return self.blocks(h)[:, :, 0, :].transpose(1, 2)  # (B, T, D): contiguous, channels-last was time-major

    @property
    def receptive_field(self) -> int:
        """Timestamps that one output timestamp sees: 1 + 2 (kernel - 1) (2^depth - 1)."""
        return 1 + 2 * (self.config.kernel - 1) * (2**self.config.depth - 1)


def pool(z: torch.Tensor) -> torch.Tensor:
    """Max over time: (B, T, D) -> (B, D), the window-level representation."""
    return z.max(dim=1).values


# ------------------------------------------------------------------------------------------------ checkpoints

HEAD_PREFIX = "head."  # a fine-tuned classifier's linear head (`downstream.ts_classification.Classifier.head`)


@dataclass(eq=False)
class TimeseriesCheckpoint:
    """A time-series checkpoint read once, the only place that does: its encoder (weights loaded, all of
    them), the linear head of a fine-tuned classifier (None otherwise), the stored preprocessing dict and
    the encoder's load report."""

    path: Path
    kind: str
    encoder: TSEncoder
    head: nn.Linear | None
    preprocessing: dict[str, Any]
    report: LoadReport


def load_timeseries_checkpoint(path: str | Path, kinds: tuple[str, ...]) -> TimeseriesCheckpoint:
    """Read a `pretrain-timeseries` (encoder under `ENCODER_PREFIX`), `timeseries-encoder` (the encoder's
    own keys) or `finetune-timeseries` (encoder + `HEAD_PREFIX` head) checkpoint of one of `kinds`.
    UserError (one line) for another kind, an architecture that is not a TSEncoder's, or weights that do
    not all fit."""
    path = Path(path)
    payload = load_checkpoint(path, kind=kinds)
    kind = payload["kind"]
    arch = dict(payload["arch"])
    classes = arch.pop("classes", None)
    try:
        encoder = TSEncoder(TSEncoderConfig(**arch))
    except (TypeError, ValueError) as err:
        raise UserError(f"{path}: its architecture does not read as a time-series encoder "
                        f"({type(err).__name__})") from None
    weights = payload["model"]
    own = weights if kind == Kind.TIMESERIES_ENCODER else with_prefix(weights, ENCODER_PREFIX)
    report = load_weights(encoder, own, min_fraction=1.0, source=str(path))
    head = None
    if kind == Kind.FINETUNE_TIMESERIES:
        if not isinstance(classes, int) or classes < 1:
            raise UserError(f"{path}: a fine-tuned time-series checkpoint without its number of classes")
        head = nn.Linear(encoder.config.out_dim, classes)
        load_weights(head, with_prefix(weights, HEAD_PREFIX), min_fraction=1.0, source=str(path))
    return TimeseriesCheckpoint(path, kind, encoder, head, dict(payload.get("preprocessing") or {}), report)
