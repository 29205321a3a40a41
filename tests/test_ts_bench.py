"""Time-series benchmarks: the per-level baseline computes the same loss with 8 encoder calls; harness smoke tests."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from medssl.bench.timeseries import PerLevelObjective, label_efficiency, random_batch, throughput, two_level
from medssl.config import load_config
from medssl.data.synthetic.hospital import make_hospital
from medssl.downstream.ts_classification import EvalTimeseriesConfig
from medssl.pretrain.timeseries import HierarchicalObjective, PretrainTimeseriesConfig, TimeseriesPretrainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny(*overrides: str) -> PretrainTimeseriesConfig:
    return load_config(CONFIGS / "pretrain_timeseries_tiny.yaml", PretrainTimeseriesConfig, list(overrides))


def test_per_level_baseline_gives_the_same_loss_with_eight_encoder_calls() -> None:
    config = tiny()
    torch.manual_seed(0)
    model = TimeseriesPretrainer(config.model, config.objectives)
    calls = []
    model.encoder.register_forward_hook(lambda *args: calls.append(1))
    batch = random_batch(config, seed=0)
    ours = HierarchicalObjective(config.views)(model, batch, torch.Generator().manual_seed(5))
    assert len(calls) == 1
    calls.clear()
    theirs = PerLevelObjective(config.views, config.objectives)(model, batch, torch.Generator().manual_seed(5))
    assert len(calls) == 8
    assert theirs.loss.item() == pytest.approx(ours.loss.item(), rel=1e-5)
    for level in ("observation", "sample", "trial", "patient"):
        assert theirs.terms[level].item() == pytest.approx(ours.terms[level].item(), rel=1e-5)


def test_two_level_keeps_the_total_weight() -> None:
    objectives = tiny().objectives
    two = two_level(objectives)
    assert two.active == ["observation", "sample"] and two.observation.weight == two.sample.weight == 0.5
    assert objectives.active == ["observation", "sample", "trial", "patient"]  # the original is untouched


@pytest.mark.slow  # two fresh Python processes
def test_throughput_reports_both_implementations_and_their_ratio(capsys) -> None:
    result = throughput(tiny("train.batch_size=8"), steps=2, warmup=1, device="cpu", threads=1)
    assert result["one_pair_encoder_calls_per_step"] == 1 and result["per_level_encoder_calls_per_step"] == 8
    assert result["per_level_saved_for_backward_mib"] > 2 * result["one_pair_saved_for_backward_mib"]
    assert result["speedup"] == pytest.approx(result["one_pair_windows_per_s"] / result["per_level_windows_per_s"])
    assert "windows/s" in capsys.readouterr().out


def test_label_efficiency_writes_one_row_per_method(tmp_path: Path, capsys) -> None:
    manifest = make_hospital(tmp_path / "hospital", patients=6, size=16, seed=2, signal_seconds=6.0)
    pretrain = tiny(f"data.manifest={manifest}", "train.steps=2", "train.batch_size=8")
    evaluation = load_config(CONFIGS / "eval_timeseries_tiny.yaml", EvalTimeseriesConfig,
                             [f"data.manifest={manifest}", "train.steps=2", "eval.fractions=[1.0]",
                              "eval.modes=[probe]", "eval.bootstrap=0"])
    rows = label_efficiency(pretrain, evaluation, tmp_path / "bench", seeds=(0,))
    assert [r["method"] for r in rows] == ["four-level", "two-level", "scratch"]
    with open(tmp_path / "bench" / "ts_label_efficiency.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 3 and {"patient_auroc_mean", "patient_auroc_std"} <= set(table[0])
    assert (tmp_path / "bench" / "two-level" / "seed0" / "pretrain" / "checkpoints" / "last.pt").exists()
    assert "label efficiency" in capsys.readouterr().out


_FAKE_COMET = '''
import json, os, time
class COMET:
    def __init__(self, **kwargs):
        self.kwargs, self.after_iter_callback = kwargs, None
    def fit(self, X, y, shuffle_function, factors, n_iters, verbose):
        with open(os.environ["FAKE_COMET_LOG"], "w") as handle:
            json.dump({"kwargs": self.kwargs, "x": list(X.shape), "y": y[:12].tolist(), "factors": factors,
                       "n_iters": n_iters, "shuffle": shuffle_function}, handle)
        for _ in range(n_iters - 1):
            time.sleep(0.01)
            self.after_iter_callback(self, 0.0)
'''


def test_the_comet_harness_calls_its_fit_with_our_encoder_window_batch_and_weights(tmp_path, monkeypatch) -> None:
    """`--against comet` runs COMET's reference fit (a stand-in module here: its code is not part of medssl) with
    COMET's depth = ours - 1, our batch, window, channels and level weights as its factors (patient, trial,
    sample, observation), patient x trial x sample IDs, and times the iterations after the warm-up."""
    import json

    from medssl.bench.timeseries import _measure_comet

    (tmp_path / "comet").mkdir()
    (tmp_path / "comet" / "comet.py").write_text(_FAKE_COMET)
    monkeypatch.setenv("FAKE_COMET_LOG", str(tmp_path / "log.json"))
    config = tiny("train.batch_size=16", "objectives.trial.weight=0.7")
    result = _measure_comet(str(tmp_path / "comet"), config.model_dump_json(), 3, 1, "cpu", 0, 1)
    seen = json.loads((tmp_path / "log.json").read_text())
    assert seen["kwargs"] == {"input_dims": 2, "output_dims": config.model.out_dim, "hidden_dims": config.model.hidden,
                              "depth": config.model.depth - 1, "device": "cpu", "lr": config.train.lr,
                              "batch_size": 16, "flag_use_multi_gpu": False}
    assert seen["x"][1:] == [config.data.window_samples()[0], 2] and seen["shuffle"] == "trial"
    assert seen["factors"] == [0.25, 0.7, 0.25, 0.25] and seen["n_iters"] == 5
    per_trial = config.samples_per_trial
    assert [row[2] for row in seen["y"]] == [i // per_trial for i in range(12)]  # trial ids
    assert [row[1] for row in seen["y"]] == [i // (per_trial * config.sampler.trials) for i in range(12)]
    assert result["encoder_calls_per_step"] == 8 and 16 / 0.5 < result["windows_per_s"] < 16 / 0.005


def test_a_measurement_killed_for_memory_is_one_line(monkeypatch) -> None:
    import subprocess

    from medssl.bench import timeseries
    from medssl.errors import UserError

    monkeypatch.setattr(timeseries.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, -9, ""))
    killed = "the measurement of one pair of views .ours. was killed .SIGKILL: out of memory"
    with pytest.raises(UserError, match=killed):
        timeseries.throughput(tiny(), steps=1, warmup=1, device="cpu", against=())
