"""`medssl demo`: the main job end to end on the embedded default data, in minutes on a CPU.

Steps: write the synthetic hospital, check its manifest, pretrain a tiny 3D encoder on it (with
the frozen-feature organ probe against its random initialisation), pretrain a signal encoder on its
ECG/PPG with four-level contrast and classify the patient condition with a linear probe on
held-out patients, fine-tune organ segmentation from the pretrained encoder with 2 labelled volumes,
and print a summary. Every step writes under the output folder; results are on
*synthetic* data and labelled so.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medssl.config import validate_config
from medssl.errors import UserError

console = Console()


def _step(title: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    console.rule(f"[bold]{title}")
    tick = time.perf_counter()
    result = fn()
    result["seconds"] = time.perf_counter() - tick
    return result


def _synth(out: Path) -> dict[str, Any]:
    from medssl.data.synthetic.hospital import make_hospital

    manifest = make_hospital(out / "hospital", patients=8, studies=2, size=64, seed=0, progress=True)
    return {"manifest": manifest}


def _check(manifest: Path) -> dict[str, Any]:
    from medssl.data.manifest_check import check_manifest

    problems = check_manifest(manifest, progress=True)
    if problems:
        raise UserError(f"{manifest}: {len(problems)} problem(s), first: {problems[0]}")
    return {"problems": 0}


def _pretrain_volume(manifest: Path, run_dir: Path) -> dict[str, Any]:
    from medssl.pretrain.volume import PretrainVolumeConfig, pretrain_volume

    config = validate_config({
        "data": {"manifest": str(manifest), "crop_size": [32, 32, 32]},
        "train": {"steps": 60, "batch_size": 4, "seed": 0, "lr": 1e-3, "warmup_steps": 6, "log_every": 5,
                  "checkpoint_every": 30},
        "views": {"points": 32},
        "probe": {"enabled": True, "every": 30, "max_volumes": 4},
    }, PretrainVolumeConfig, source="demo pretrain volume config")
    return pretrain_volume(config, run_dir)


def _timeseries(manifest: Path, pretrain_dir: Path, eval_dir: Path) -> dict[str, Any]:
    from medssl.downstream.ts_classification import (
        EvalTimeseriesConfig,
        eval_timeseries,
    )
    from medssl.pretrain.timeseries import PretrainTimeseriesConfig, pretrain_timeseries

    data = {"manifest": str(manifest), "fs": 125.0, "channels": ["ECG", "PPG"], "window_seconds": 4.0,
            "stride_seconds": 2.0}
    pretrain = validate_config({"data": data, "train": {"steps": 60, "batch_size": 32, "seed": 0, "warmup_steps": 6,
                                                        "log_every": 10, "checkpoint_every": 60}},
                               PretrainTimeseriesConfig, source="demo pretrain timeseries config")
    summary = pretrain_timeseries(pretrain, pretrain_dir, resume=False)
    evaluation = validate_config({"data": data, "train": {"steps": 30, "batch_size": 32, "seed": 0},
                                  "eval": {"fractions": [1.0], "modes": ["probe"], "test_splits": ["validation", "test"],
                                           "bootstrap": 200}},
                                 EvalTimeseriesConfig, source="demo eval timeseries config")
    scores = eval_timeseries(evaluation, eval_dir, pretrained=pretrain_dir / "checkpoints" / "last.pt")
    return {"final_loss": summary["final_loss"], **scores}


def _finetune(manifest: Path, encoder: Path, run_dir: Path) -> dict[str, Any]:
    from medssl.downstream.segmentation.config import FinetuneSegConfig
    from medssl.downstream.segmentation.task import finetune_seg

    config = validate_config({
        "data": {"manifest": str(manifest), "crop_size": [32, 32, 32]},
        "train": {"steps": 60, "batch_size": 2, "seed": 0, "lr": 0.005, "warmup_steps": 5, "log_every": 10,
                  "checkpoint_every": 60},
        "seg": {"labelled_volumes": 2, "eval_every": 60, "sw_batch_size": 2, "overlay_cases": 2},
    }, FinetuneSegConfig, source="demo finetune seg config")
    return finetune_seg(config, run_dir, pretrained=encoder)


def run_demo(out: str | Path) -> dict[str, dict[str, Any]]:
    """Run every built step under `out` and print the summary; returns each step's results."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "hospital" / "manifest.json").exists():
        raise UserError(f"{out}: folder exists and is not a previous demo output; choose another -o")
    results: dict[str, dict[str, Any]] = {}
    results["synth"] = _step("1. synthetic hospital", lambda: _synth(out))
    manifest = results["synth"]["manifest"]
    results["check"] = _step("2. manifest check", lambda: _check(manifest))
    for run in ("pretrain_volume", "finetune_seg", "pretrain_timeseries", "eval_timeseries"):
        shutil.rmtree(out / run, ignore_errors=True)  # a previous demo's runs: the demo always starts fresh
    results["pretrain_volume"] = _step("3. 3D pretraining (anatomical consistency, multi-level contrast)",
                                       lambda: _pretrain_volume(manifest, out / "pretrain_volume"))
    results["finetune_seg"] = _step("4. segmentation fine-tuning from the pretrained encoder (2 labelled volumes)",
                                    lambda: _finetune(manifest, out / "pretrain_volume" / "encoder.pt",
                                                      out / "finetune_seg"))
    results["timeseries"] = _step("5. signal pretraining (four levels) and patient-level condition probe",
                                  lambda: _timeseries(manifest, out / "pretrain_timeseries", out / "eval_timeseries"))
    _print_summary(out, results)
    return results


def _print_summary(out: Path, results: dict[str, dict[str, Any]]) -> None:
    table = Table(title="medssl demo (synthetic hospital: numbers are on synthetic data)")
    for column in ("step", "result", "seconds"):
        table.add_column(column)
    pre = results["pretrain_volume"]
    table.add_row("synthetic hospital", str(results["synth"]["manifest"]), f"{results['synth']['seconds']:.1f}")
    table.add_row("manifest check", "0 problems", f"{results['check']['seconds']:.1f}")
    table.add_row("3D pretraining",
                  f"loss {pre['final_loss']:.3f}; organ probe Dice {pre['final_probe_dice']:.3f} "
                  f"(random init {pre['init_probe_dice']:.3f})", f"{pre['seconds']:.1f}")
    seg = results["finetune_seg"]
    table.add_row("segmentation fine-tuning", f"test Dice {seg['test_dice_mean']:.3f} (mean of 9 organs, "
                  f"60 steps, 2 labelled volumes); predictions in {out / 'finetune_seg' / 'predictions'}",
                  f"{seg['seconds']:.1f}")
    ts = results["timeseries"]
    auroc = ts.get("probe_frac100_patient_auroc")
    table.add_row("signal pretraining + probe",
                  f"loss {ts['final_loss']:.3f}; condition probe patient AUROC "
                  f"{'n/a' if auroc is None else f'{auroc:.3f}'} (held-out patients)", f"{ts['seconds']:.1f}")
    console.print(table)
    console.print(f"outputs under {out}; pretrained encoder: {out / 'pretrain_volume' / 'encoder.pt'}")
    console.print(f"training curves: tensorboard --logdir {out}")
