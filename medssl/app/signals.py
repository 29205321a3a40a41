"""The signals panel: a patient's ECG/PPG with a time-series model's saliency over it.

Models: a `pretrain-timeseries` checkpoint (the encoder alone; the attributed quantity is the L2 norm of
the window's pooled embedding, `models.ts_encoder.pool`) or a `finetune-timeseries` checkpoint (encoder
+ linear head, `downstream.ts_classification.Classifier`; the attributed quantity is the logit of one
class, by default the class the model predicts for the recording).

Attributions, per window of the checkpoint's length (the recording is cut as in training; a shorter tail
is covered by one more window aligned to the recording's end, overlaps averaged):
- "gradient": |d target / d x| * |x| (gradient x input), per channel and sample;
- "occlusion": |target(x) - target(x with a 0.1 s span set to the window's channel means)| for every
  span, the same for every channel of that span.
Values are smoothed over 0.05 s and divided by their maximum over the recording: [0, 1], relative.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from scipy.ndimage import uniform_filter1d

from medssl.data import io
from medssl.data.preprocessing import SignalPreprocessing
from medssl.errors import UserError
from medssl.models.ts_encoder import TSEncoder, load_timeseries_checkpoint, pool
from medssl.training.checkpoint import Kind

METHODS = ("gradient", "occlusion")
OCCLUSION_SECONDS = 0.1
SMOOTH_SECONDS = 0.05
BACKGROUND = "#0e1117"  # Streamlit's dark theme
SALIENCY_CMAP = LinearSegmentedColormap.from_list("saliency", [BACKGROUND, "#b3001b", "#ff5a36"])


@dataclass(eq=False)
class TimeseriesModel:
    """A time-series checkpoint ready for attribution. `head` is None for a pretraining checkpoint."""

    checkpoint: Path
    kind: str
    encoder: TSEncoder
    head: torch.nn.Linear | None
    prep: SignalPreprocessing

    @property
    def window(self) -> int:
        return self.prep.window_samples()[0]

    @property
    def classes(self) -> int:
        return 0 if self.head is None else self.head.out_features

    def target_name(self, target: int | None) -> str:
        if self.head is None:
            return "L2 norm of the pooled embedding (pretrained encoder, no labels)"
        return f"logit of class {target} (fine-tuned classifier)"

    def targets(self, x: torch.Tensor, target: int | None) -> torch.Tensor:
        """(B, C, T) windows -> (B,) the attributed quantity."""
        z = pool(self.encoder(x))
        if self.head is None:
            return z.norm(dim=1)
        return self.head(z)[:, target]


def load_timeseries_model(path: str | Path) -> TimeseriesModel:
    """A `pretrain-timeseries` or `finetune-timeseries` checkpoint (`models.ts_encoder.load_timeseries_checkpoint`);
    UserError for any other kind or a checkpoint whose weights do not fit its architecture."""
    stored = load_timeseries_checkpoint(path, (Kind.PRETRAIN_TIMESERIES, Kind.FINETUNE_TIMESERIES))
    fields = SignalPreprocessing.model_fields
    prep = SignalPreprocessing.from_dict({k: v for k, v in stored.preprocessing.items() if k in fields},
                                         where=str(path))
    head = stored.head.eval() if stored.head is not None else None
    return TimeseriesModel(stored.path, stored.kind, stored.encoder.eval(), head, prep)


def read_for_model(model: TimeseriesModel, path: str | Path, format: str | None = None) -> io.Signal:
    """A recording resampled to the model's rate with its channels (by name) in the model's order."""
    signal = io.resample_signal(io.read_signal(path, format), model.prep.fs)
    if model.prep.channels is not None:
        signal = io.select_channels(signal, model.prep.channels, missing=model.prep.missing_channels)
    if signal.data.shape[0] != model.encoder.config.in_channels:
        raise UserError(f"{path}: {signal.data.shape[0]} channel(s) ({', '.join(signal.channels)}), the model "
                        f"{model.checkpoint} takes {model.encoder.config.in_channels}")
    if signal.data.shape[1] < model.window:
        raise UserError(f"{path}: {signal.duration:.1f} s is shorter than one window of the model "
                        f"({model.prep.window_seconds:g} s)")
    return signal


@dataclass
class Saliency:
    """`values` (C, T) in [0, 1] over the recording, what was attributed and how."""

    values: np.ndarray
    method: str
    target: str
    windows: int


def _starts(length: int, window: int) -> list[int]:
    starts = list(range(0, length - window + 1, window))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def _standardised(data: np.ndarray) -> np.ndarray:
    """NaN -> 0 for the model (NaN samples get no attribution)."""
    return np.nan_to_num(data, nan=0.0).astype(np.float32)


def saliency(model: TimeseriesModel, signal: io.Signal, *, method: str = "gradient",
             target: int | None = None) -> Saliency:
    """Attribution of the model's quantity over `signal` (already `read_for_model`); see the module docstring."""
    if method not in METHODS:
        raise UserError(f"attribution: must be one of {', '.join(METHODS)}, got {method!r}")
    data = _standardised(signal.data)
    window = model.window
    starts = _starts(data.shape[1], window)
    x = torch.from_numpy(np.stack([data[:, s:s + window] for s in starts]))
    if model.head is not None and target is None:
        with torch.no_grad():
            target = int(model.head(pool(model.encoder(x))).mean(dim=0).argmax())
    if model.head is not None and not 0 <= target < model.classes:
        raise UserError(f"class: {target} outside 0..{model.classes - 1} of {model.checkpoint}")
    per_window = _gradient(model, x, target) if method == "gradient" else _occlusion(model, x, target, signal.fs)
    total = np.zeros_like(data)
    count = np.zeros(data.shape[1], dtype=np.float32)
    for s, values in zip(starts, per_window):
        total[:, s:s + window] += values
        count[s:s + window] += 1
    values = total / np.maximum(count, 1)
    values = uniform_filter1d(values, size=max(1, int(round(SMOOTH_SECONDS * signal.fs))), axis=1)
    peak = float(values.max())
    values = values / peak if peak > 0 else values
    values[:, np.isnan(signal.data).any(axis=0)] = 0.0
    return Saliency(values.astype(np.float32), method, model.target_name(target), len(starts))


def _gradient(model: TimeseriesModel, x: torch.Tensor, target: int | None) -> np.ndarray:
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        model.targets(x, target).sum().backward()
    return (x.grad.abs() * x.detach().abs()).numpy()


def _occlusion(model: TimeseriesModel, x: torch.Tensor, target: int | None, fs: float) -> np.ndarray:
    span = max(1, int(round(OCCLUSION_SECONDS * fs)))
    length = x.shape[-1]
    out = np.zeros(tuple(x.shape), dtype=np.float32)
    with torch.no_grad():
        base = model.targets(x, target)
        means = x.mean(dim=-1, keepdim=True)
        for b in range(x.shape[0]):
            starts = list(range(0, length, span))
            occluded = x[b].repeat(len(starts), 1, 1)
            for n, s in enumerate(starts):
                occluded[n, :, s:s + span] = means[b]
            change = (model.targets(occluded, target) - base[b]).abs().numpy()
            for n, s in enumerate(starts):
                out[b, :, s:s + span] = change[n]
    return out


def signal_figure(signal: io.Signal, result: Saliency | None, *, start: float = 0.0, seconds: float | None = None,
                  title: str = "", width_px: int = 1100, dpi: int = 100) -> np.ndarray:
    """uint8 RGB: one row per channel, the waveform (light line) over its saliency (a band from the dark
    background (0) to bright red (1, the recording's maximum); none when `result` is None), time in
    seconds, dark like the app."""
    fs = signal.fs
    first = int(max(0.0, start) * fs)
    last = signal.data.shape[1] if seconds is None else min(signal.data.shape[1], first + int(seconds * fs))
    if last - first < 2:
        raise UserError(f"signal: nothing to show from {start:g} s (the recording lasts {signal.duration:.1f} s)")
    time = np.arange(first, last) / fs
    channels = signal.data.shape[0]
    fig = Figure(figsize=(width_px / dpi, 0.9 + 1.1 * channels), dpi=dpi, facecolor=BACKGROUND)
    axes = fig.subplots(channels, 1, sharex=True, squeeze=False)[:, 0]
    for c, ax in enumerate(axes):
        ax.set_facecolor(BACKGROUND)
        trace = signal.data[c, first:last]
        finite = trace[np.isfinite(trace)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        pad = (hi - lo) * 0.1 or 1.0
        if result is not None:
            ax.imshow(result.values[c, first:last][None], aspect="auto", cmap=SALIENCY_CMAP, vmin=0, vmax=1,
                      extent=(time[0], time[-1], lo - pad, hi + pad), interpolation="nearest", alpha=0.9)
        ax.plot(time, trace, color="#e8e8e8", linewidth=0.8)
        ax.set_ylim(lo - pad, hi + pad)
        unit = signal.units[c] if c < len(signal.units) and signal.units[c] else ""
        ax.set_ylabel(f"{signal.channels[c]}" + (f" ({unit})" if unit else ""), color="#e8e8e8", fontsize=9)
        ax.tick_params(colors="#b0b0b0", labelsize=8)
        for spine in ax.spines.values():
            spine.set_color("#555555")
    axes[-1].set_xlabel("time (s)", color="#e8e8e8", fontsize=9)
    if not title:
        title = ("waveform only: no time-series model" if result is None else
                 f"{result.method} attribution of the {result.target}; red = high (relative, recording maximum = 1)")
    fig.suptitle(title, color="#e8e8e8", fontsize=10)
    fig.tight_layout()
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
