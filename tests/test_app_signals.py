"""The signals panel's plain functions (`medssl.app.signals`): time-series checkpoints of both kinds,
gradient and occlusion saliency, and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.data import io
from medssl.downstream.ts_classification import Classifier
from medssl.errors import UserError
from medssl.models.ts_encoder import TSEncoder, TSEncoderConfig
from medssl.training.checkpoint import save_checkpoint
from medssl.app import signals

ARCH = {"in_channels": 2, "hidden": 8, "out_dim": 16, "depth": 2, "kernel": 3}
PREP = {"manifest": "/data/manifest.json", "fs": 50.0, "channels": ["ECG", "PPG"],
        "missing_channels": "error", "window_seconds": 1.0, "stride_seconds": None, "nan": "error", "flat": "keep",
        "window": 50, "stride": None}


def _checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    encoder = TSEncoder(TSEncoderConfig(**ARCH))
    pretrain = tmp_path / "pretrain.pt"
    save_checkpoint(pretrain, kind="pretrain-timeseries", step=1,
                    model={f"encoder.{k}": v for k, v in encoder.state_dict().items()}, arch=ARCH, preprocessing=PREP,
                    config={})
    finetune = tmp_path / "finetune.pt"
    save_checkpoint(finetune, kind="finetune-timeseries", step=1, model=Classifier(encoder, 3).state_dict(),
                    arch={**ARCH, "classes": 3}, preprocessing=PREP, config={})
    return pretrain, finetune


def _record(tmp_path: Path, seconds: float = 2.5, fs: float = 100.0) -> Path:
    t = np.arange(int(seconds * fs)) / fs
    ecg = np.where((t % 0.8) < 0.04, 1.5, 0.1) + 0.01 * np.sin(t)
    ppg = np.sin(2 * np.pi * t / 0.8)
    path = tmp_path / "rec"
    io.write_wfdb(path, io.Signal(np.stack([ppg, ecg]).astype(np.float32), fs, ["PPG", "ECG"], ["NU", "mV"], path))
    return path


@pytest.mark.parametrize("method", signals.METHODS)
def test_saliency_of_both_checkpoint_kinds(tmp_path: Path, method: str) -> None:
    pretrain, finetune = _checkpoints(tmp_path)
    record = _record(tmp_path)
    model = signals.load_timeseries_model(pretrain)
    assert model.head is None and model.window == 50 and model.classes == 0
    signal = signals.read_for_model(model, record, "wfdb")
    assert signal.channels == ["ECG", "PPG"] and signal.fs == 50.0 and signal.data.shape == (2, 125)
    result = signals.saliency(model, signal, method=method)
    assert result.values.shape == (2, 125) and result.values.min() >= 0 and result.values.max() == pytest.approx(1)
    assert result.windows == 3 and "L2 norm of the pooled embedding" in result.target and result.method == method
    classifier = signals.load_timeseries_model(finetune)
    assert classifier.classes == 3
    logit = signals.saliency(classifier, signal, method=method, target=2)
    assert logit.target == "logit of class 2 (fine-tuned classifier)" and logit.values.shape == (2, 125)
    predicted = signals.saliency(classifier, signal, method=method)
    assert predicted.target.startswith("logit of class ")
    if method == "occlusion":  # occlusion scores time spans: every channel of a span gets the same value
        np.testing.assert_allclose(result.values[0], result.values[1], atol=1e-6)
    image = signals.signal_figure(signal, result, start=0.5, seconds=1.0, width_px=600)
    assert image.dtype == np.uint8 and image.shape[1] == 600 and image.std() > 0
    bare = signals.signal_figure(signal, None, start=0.5, seconds=1.0, width_px=600)  # the waveform alone
    assert bare.shape == image.shape and not np.array_equal(bare, image)


def test_gradient_saliency_is_where_the_input_matters(tmp_path: Path) -> None:
    """An encoder whose output depends on samples 10..19 of channel 0 only: the gradient attribution is zero
    elsewhere (up to the display smoothing)."""
    pretrain, _ = _checkpoints(tmp_path)
    model = signals.load_timeseries_model(pretrain)

    class Window(torch.nn.Module):
        config = model.encoder.config

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, 0, 10:20][:, None, :]  # (B, T=1, D=10): the embedding is samples 10..19 of channel 0

    model.encoder = Window()
    signal = io.Signal(np.ones((2, 50), np.float32), 50.0, ["ECG", "PPG"], ["", ""], Path("x"))
    result = signals.saliency(model, signal, method="gradient")
    assert result.values[1].max() == 0 and result.values[0, 25:].max() == 0 and result.values[0, 12:18].min() > 0


def test_refusals(tmp_path: Path) -> None:
    pretrain, finetune = _checkpoints(tmp_path)
    seg = tmp_path / "seg.pt"
    save_checkpoint(seg, kind="finetune-seg", step=1, model={}, arch={}, preprocessing={}, config={})
    expected = "'finetune-seg' checkpoint, expected 'pretrain-timeseries' or 'finetune-timeseries'"
    with pytest.raises(UserError, match=expected):
        signals.load_timeseries_model(seg)
    model = signals.load_timeseries_model(pretrain)
    short = _record(tmp_path, seconds=0.5)
    with pytest.raises(UserError, match="shorter than one window"):
        signals.read_for_model(model, short, "wfdb")
    one = tmp_path / "one"
    io.write_wfdb(one, io.Signal(np.zeros((1, 300), np.float32), 100.0, ["ECG"], ["mV"], one))
    with pytest.raises(UserError, match="missing channel"):
        signals.read_for_model(model, one, "wfdb")
    signal = signals.read_for_model(model, _record(tmp_path), "wfdb")
    with pytest.raises(UserError, match="attribution"):
        signals.saliency(model, signal, method="shap")
    with pytest.raises(UserError, match="class: 7"):
        signals.saliency(signals.load_timeseries_model(finetune), signal, target=7)
    with pytest.raises(UserError, match="nothing to show"):
        signals.signal_figure(signal, signals.saliency(model, signal), start=100.0)
