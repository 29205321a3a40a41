"""Segmentation benchmarks: `medssl bench label-efficiency` and the sliding-window inference speed.

Label efficiency: for each cohort (the synthetic hospital, the MNI152 tissue cohort) and each
initialisation in `inits`:
- "scratch": the fine-tuning config's network at its random initialisation;
- "encoder": the encoder pretrained by the contrastive objectives (`configs/pretrain_volume.yaml`,
  probe off) on the cohort's unlabelled training volumes, loaded into the encoder only (the decoder
  starts random);
- "network": the whole network (encoder and decoder) pretrained by masked-volume reconstruction
  (`configs/pretrain_volume_mae.yaml`, probe off) on the same volumes, loaded whole (but the output layer);
then for every number n of labelled training volumes (chosen per patient by `select_labelled`, nested
over n for one seed) and every seed, the network is fine-tuned with the same budget, crops,
augmentation and seed (the fine-tuning config's `train.*` and `seg.*`: the seed chooses the labelled
volumes, the network's random layers and every crop, so the inits of one seed see the same data).
Test Dice (mean over the foreground classes, then over the test cases) and per-class Dice are collected
per run and summarised per (cohort, n, init) as mean, standard deviation (over seeds, ddof 1), min and
max; each pretrained init is compared with scratch seed by seed (paired difference: mean, standard
deviation and the 95 % t interval over seeds). Wall-clock seconds are recorded for every run and
every pretraining, and how far fine-tuning moved the encoder's and the decoder's weights from where
they started (`weight_drift`).

Layout of `out_dir` (re-running skips what is already there, so an interrupted benchmark resumes where
it stopped; each run directory is written atomically, and a half-written one left by a killed process
is removed before its run starts again):

    data/<cohort>/                         the cohort, written when no manifest is given
    <cohort>/pretrain_<init>/              pretraining run (encoder.pt / network.pt), unless a checkpoint is given
    <cohort>/<init>_n<n>_seed<seed>/       one fine-tuning run directory each
    label_efficiency_runs.csv              one row per run (test Dice overall and per class, seconds, drift)
    label_efficiency.csv                   mean / std / min / max of test Dice per (cohort, n, init), class means
    label_efficiency_paired.csv            pretrained minus scratch per (cohort, n, init): mean, std, 95 % interval
    label_efficiency.png                   Dice vs labelled volumes, one curve per init, one panel per cohort
    label_efficiency_curves.png            validation Dice vs fine-tuning step (mean over seeds) per cohort and init
    label_efficiency.md                    the tables as markdown
    label_efficiency.json                  the settings, the pretraining runs and every row
"""

from __future__ import annotations

import csv
import io as textio
import json
import math
import os
import shutil
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.atomic import atomic_dir, atomic_path, write_json, write_text
from medssl.bench.report import peak_rss_mib, print_table
from medssl.config import load_config
from medssl.errors import UserError

INITS = ("scratch", "encoder", "network")
INIT_NAMES = {"scratch": "scratch", "encoder": "encoder pretrained (contrastive)",
              "network": "whole network pretrained (masked)"}
COUNTS = (1, 2, 4, 8)
SEEDS = (0, 1, 2)
FINETUNE_CONFIG = Path("configs/finetune_seg.yaml")
PRETRAIN_CONFIGS = {"encoder": Path("configs/pretrain_volume.yaml"),
                    "network": Path("configs/pretrain_volume_mae.yaml")}
PRETRAINED_FILE = {"encoder": "encoder.pt", "network": "network.pt"}
BENCH_COHORTS = {"hospital": {"patients": 12, "studies": 2, "size": 64},  # 16 training volumes
                 "mni152": {"patients": 16, "studies": 1, "size": 48}}  # 10 training volumes


def make_cohort(name: str, folder: Path, *, seed: int = 0) -> Path:
    """Write a benchmark cohort with at least 8 training volumes from 8 patients (`BENCH_COHORTS`);
    returns its manifest. An existing complete cohort is reused."""
    from medssl.data.synthetic.cohorts import write_cohort

    if name not in BENCH_COHORTS:
        raise UserError(f"--cohort: {name!r} is not one of {', '.join(BENCH_COHORTS)}")
    if (folder / "manifest.json").is_file():
        return folder / "manifest.json"
    return write_cohort(name, folder, seed=seed, **BENCH_COHORTS[name])


def _clear_leftovers(run_dir: Path) -> None:
    """Remove the temporary folders a killed `atomic_dir(run_dir)` left beside it."""
    for stale in run_dir.parent.glob(f".{run_dir.name}.*"):
        if stale.is_dir() and (stale.name.endswith(".tmp") or stale.name.endswith(".old")):
            shutil.rmtree(stale, ignore_errors=True)


def pretrain_cohort(manifest: Path, run_dir: Path, *, init: str, config: Path, steps: int | None,
                    overrides: Sequence[str]) -> Path:
    """Pretrain for `init` ("encoder" or "network") on the cohort's training split (probe off) unless its
    checkpoint (`PRETRAINED_FILE`) exists; the run's summary.json gets its wall-clock `seconds`. Returns
    the checkpoint."""
    from medssl.pretrain.volume import PretrainVolumeConfig, pretrain_volume

    checkpoint = run_dir / PRETRAINED_FILE[init]
    if not checkpoint.exists():
        _clear_leftovers(run_dir)
        extra = [f"train.steps={steps}"] if steps is not None else []
        cfg = load_config(config, PretrainVolumeConfig,
                          [f"data.manifest={manifest}", "probe.enabled=false", *extra, *overrides])
        with atomic_dir(run_dir) as tmp:
            tick = time.perf_counter()
            summary = pretrain_volume(cfg, tmp)
            write_json(tmp / "summary.json", {**summary, "seconds": time.perf_counter() - tick})
            if not (tmp / PRETRAINED_FILE[init]).exists():
                raise UserError(f"{config}: the pretraining for '{init}' wrote no {PRETRAINED_FILE[init]} "
                                "(a whole-network objective such as objectives.masked needs a weight > 0)")
    return checkpoint


def finetune_run(manifest: Path, run_dir: Path, *, labelled: int, seed: int, pretrained: Path | None, config: Path,
                 steps: int | None, overrides: Sequence[str]) -> dict[str, Any]:
    """One fine-tuning run (its summary), skipped when run_dir/summary.json exists."""
    from medssl.downstream.segmentation.config import FinetuneSegConfig
    from medssl.downstream.segmentation.task import finetune_seg

    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text(encoding="utf-8"))
    _clear_leftovers(run_dir)
    extra = [f"train.steps={steps}"] if steps is not None else []
    cfg = load_config(config, FinetuneSegConfig, [f"data.manifest={manifest}", f"seg.labelled_volumes={labelled}",
                                                  f"train.seed={seed}", *extra, *overrides])
    with atomic_dir(run_dir) as tmp:
        summary = finetune_seg(cfg, tmp, pretrained=pretrained, quiet=True)
    return summary


def weight_drift(run_dir: Path) -> dict[str, float]:
    """How far fine-tuning moved the weights: ||w - w0|| / ||w0|| over the encoder's parameters and over the
    rest of the network ("decoder", output layer included), w0 the network the run started from (rebuilt
    from its config.yaml and summary.json: the seed's initialisation plus the pretrained weights it loaded),
    w the tested checkpoint (best.pt, else last.pt)."""
    from medssl.downstream.segmentation.config import FinetuneSegConfig
    from medssl.downstream.segmentation.training import build_network
    from medssl.models.volume_encoders import network_encoder
    from medssl.training.checkpoint import load_checkpoint

    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    cfg = load_config(run_dir / "config.yaml", FinetuneSegConfig, [])
    tested = run_dir / "checkpoints" / ("best.pt" if (run_dir / "checkpoints" / "best.pt").exists() else "last.pt")
    payload = load_checkpoint(tested)
    pretrained = Path(summary["pretrained"]) if summary.get("pretrained") else None
    start, _ = build_network(cfg, len(payload["arch"]["classes"]), pretrained)
    encoder = {f"{name}" for name, _ in network_encoder(start, cfg.model).named_parameters()}
    moved = {"encoder": [0.0, 0.0], "decoder": [0.0, 0.0]}
    for name, w0 in start.named_parameters():
        part = moved["encoder" if name in encoder else "decoder"]
        part[0] += float(((payload["model"][name].float() - w0.detach()) ** 2).sum())
        part[1] += float((w0.detach() ** 2).sum())
    return {f"drift_{k}": math.sqrt(a / b) if b else math.nan for k, (a, b) in moved.items()}


def _copy_scratch(source: Path, target: Path, counts: Sequence[int], seeds: Sequence[int]) -> None:
    """Copy the finished scratch cells of `source` (a cohort folder of another benchmark) into `target`."""
    for labelled in counts:
        for seed in seeds:
            cell = source / f"scratch_n{labelled}_seed{seed}"
            if (cell / "summary.json").is_file() and not (target / cell.name).exists():
                with atomic_dir(target / cell.name) as tmp:
                    shutil.copytree(cell, tmp, dirs_exist_ok=True)


def _run_row(cohort: str, init: str, labelled: int, seed: int, summary: dict[str, Any],
             run_dir: Path | None = None) -> dict[str, Any]:
    organs = {k.removeprefix("test_"): v for k, v in summary.items()
              if k.startswith("test_dice_") and k != "test_dice_mean"}
    drift = weight_drift(run_dir) if run_dir is not None and (run_dir / "checkpoints").is_dir() else {}
    return {"cohort": cohort, "init": init, "labelled": labelled, "seed": seed,
            "labelled_patients": summary["labelled_patients"], "steps": summary["steps"],
            "seconds": summary.get("seconds", math.nan), "best_val_dice_mean": summary.get("best_val_dice_mean"),
            "test_checkpoint": summary.get("test_checkpoint"), **drift, "test_dice_mean": summary["test_dice_mean"],
            "test_hd95_mean": summary["test_hd95_mean"], **organs}


def _nan_stats(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (cohort, labelled, init): runs, mean, std (ddof 1; 0 for one run), min, max of test_dice_mean, the
    mean seconds per run and the mean (over seeds) Dice of every class ("dice_<class>")."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["cohort"], run["labelled"], run["init"]), []).append(run)
    rows = []
    for (cohort, labelled, init), members in groups.items():
        v = np.asarray([m["test_dice_mean"] for m in members], dtype=float)
        organs = [k for k in members[0] if k.startswith("dice_")]
        rows.append({"cohort": cohort, "labelled": labelled, "init": init, "runs": len(v), "dice_mean": float(v.mean()),
                     "dice_std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "dice_min": float(v.min()),
                     "dice_max": float(v.max()),
                     "seconds_mean": _nan_stats([m.get("seconds", math.nan) for m in members])[0],
                     **{k: _nan_stats([m.get(k, math.nan) for m in members])[0]
                        for k in ("drift_encoder", "drift_decoder")
                        if k in members[0]},
                     **{organ: _nan_stats([m.get(organ, math.nan) for m in members])[0] for organ in organs}})
    order = {init: k for k, init in enumerate(INITS)}
    return sorted(rows, key=lambda r: (r["cohort"], r["labelled"], order.get(r["init"], len(order)), r["init"]))


def paired_differences(runs: list[dict[str, Any]], *, baseline: str = "scratch", level: float = 0.95
                       ) -> list[dict[str, Any]]:
    """Per (cohort, labelled, init != baseline): the per-seed differences init - baseline of test_dice_mean
    over the seeds both have, their mean, std (ddof 1) and the two-sided `level` t interval of the mean
    (NaN with fewer than 2 seeds), and how many seeds the init won."""
    from scipy import stats

    by_key = {(r["cohort"], r["labelled"], r["init"], r["seed"]): r["test_dice_mean"] for r in runs}
    rows = []
    for cohort, labelled, init in sorted({(r["cohort"], r["labelled"], r["init"]) for r in runs}):
        if init == baseline:
            continue
        seeds = sorted(s for (c, n, i, s) in by_key if (c, n, i) == (cohort, labelled, init)
                       and (cohort, labelled, baseline, s) in by_key)
        if not seeds:
            continue
        d = np.asarray([by_key[(cohort, labelled, init, s)] - by_key[(cohort, labelled, baseline, s)]
                        for s in seeds])
        mean = float(d.mean())
        std = float(d.std(ddof=1)) if len(d) > 1 else math.nan
        half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * std / math.sqrt(len(d))) if len(d) > 1 else math.nan
        rows.append({"cohort": cohort, "labelled": labelled, "init": init, "seeds": len(d), "diff_mean": mean,
                     "diff_std": std, "ci_low": mean - half, "ci_high": mean + half, "wins": int((d > 0).sum()),
                     "diffs": " ".join(f"{x:+.4f}" for x in d)})
    order = {init: k for k, init in enumerate(INITS)}
    return sorted(rows, key=lambda r: (r["cohort"], r["labelled"], order.get(r["init"], len(order))))


def _csv_text(rows: list[dict[str, Any]]) -> str:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buffer = textio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows([{k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows])
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """PNG: test Dice (mean +- std over seeds) vs labelled volumes, one curve per init, one panel per cohort."""
    plt = _pyplot()
    cohorts = sorted({r["cohort"] for r in rows})
    fig, axes = plt.subplots(1, len(cohorts), figsize=(4.8 * len(cohorts), 3.8), squeeze=False)
    for ax, cohort in zip(axes[0], cohorts):
        inits = [i for i in INITS if any(r["init"] == i for r in rows)]
        for k, (init, marker) in enumerate(zip(inits, "osd^v")):
            mine = sorted((r for r in rows if r["cohort"] == cohort and r["init"] == init), key=lambda r: r["labelled"])
            if mine:
                shift = 1.0 + 0.04 * (k - (len(inits) - 1) / 2)  # side by side on the log axis
                ax.errorbar([r["labelled"] * shift for r in mine], [r["dice_mean"] for r in mine],
                            yerr=[r["dice_std"] for r in mine], marker=marker, capsize=3,
                            label=INIT_NAMES.get(init, init))
        counts = sorted({r["labelled"] for r in rows if r["cohort"] == cohort})
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_xlabel("labelled training volumes")
        ax.set_ylabel("test Dice (mean over classes)")
        ax.set_title(f"{cohort} (synthetic subjects)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, width=62 * len(cohorts)), fontsize=9)  # never cut at the figure's edges
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def validation_curves(out: Path, runs: list[dict[str, Any]]) -> dict[tuple, list[tuple[int, float]]]:
    """Validation Dice vs step, mean over seeds, per (cohort, init, labelled), read from the runs' metrics.jsonl."""
    curves: dict[tuple, dict[int, list[float]]] = {}
    for run in runs:
        metrics = out / run["cohort"] / f"{run['init']}_n{run['labelled']}_seed{run['seed']}" / "metrics.jsonl"
        if not metrics.exists():
            continue
        for record in map(json.loads, metrics.read_text(encoding="utf-8").splitlines()):
            if record.get("val_dice_mean") is not None:
                curves.setdefault((run["cohort"], run["init"], run["labelled"]), {}).setdefault(
                    record["step"], []).append(record["val_dice_mean"])
    return {key: sorted((step, float(np.mean(v))) for step, v in points.items()) for key, points in curves.items()}


def plot_curves(path: Path, curves: dict[tuple, list[tuple[int, float]]], title: str) -> None:
    """PNG: validation Dice vs step (mean over seeds), rows = cohorts, columns = inits, one curve per n."""
    plt = _pyplot()
    cohorts = sorted({c for c, _, _ in curves})
    inits = [i for i in INITS if any(k[1] == i for k in curves)]
    fig, axes = plt.subplots(len(cohorts), len(inits), figsize=(3.6 * len(inits), 2.9 * len(cohorts)),
                             squeeze=False, sharey="row")
    for row, cohort in enumerate(cohorts):
        for col, init in enumerate(inits):
            ax = axes[row][col]
            for (c, i, labelled), points in sorted(curves.items(), key=lambda kv: kv[0][2]):
                if (c, i) == (cohort, init):
                    ax.plot([p[0] for p in points], [p[1] for p in points], label=f"{labelled} labelled")
            ax.set_title(f"{cohort}: {INIT_NAMES.get(init, init)}", fontsize=8)
            ax.set_xlabel("fine-tuning step", fontsize=8)
            ax.set_ylabel("validation Dice", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def markdown(rows: list[dict[str, Any]], paired: list[dict[str, Any]]) -> str:
    """The summary and the paired differences as markdown tables (Dice in points, i.e. x 100)."""
    by_key = {(r["cohort"], r["labelled"], r["init"]): r for r in rows}
    diff = {(p["cohort"], p["labelled"], p["init"]): p for p in paired}
    inits = [i for i in INITS if any(r["init"] == i for r in rows)]
    head = ["cohort", "labelled", *[INIT_NAMES[i] for i in inits],
            *[f"{INIT_NAMES[i]} - scratch [95 % CI]" for i in inits if i != "scratch"], "s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cohort, labelled in sorted({(r["cohort"], r["labelled"]) for r in rows}):
        cells = [by_key.get((cohort, labelled, i)) for i in inits]
        shown = [f"{100 * c['dice_mean']:.1f} ± {100 * c['dice_std']:.1f}" if c else "-" for c in cells]
        deltas = []
        for init in inits[1:] if inits and inits[0] == "scratch" else []:
            p = diff.get((cohort, labelled, init))
            deltas.append(f"{100 * p['diff_mean']:+.1f} [{100 * p['ci_low']:+.1f}, {100 * p['ci_high']:+.1f}]"
                          if p and not math.isnan(p["ci_low"]) else (f"{100 * p['diff_mean']:+.1f}" if p else "-"))
        seconds = np.nanmean([c["seconds_mean"] for c in cells if c])
        lines.append(f"| {cohort} | {labelled} | " + " | ".join(shown + deltas) + f" | {seconds:.0f} |")
    organ_lines = []
    for cohort in sorted({r["cohort"] for r in rows}):
        organs = [k for k in next(r for r in rows if r["cohort"] == cohort) if k.startswith("dice_")
                  and k not in ("dice_mean", "dice_std", "dice_min", "dice_max")]
        organ_lines += ["", f"Per-class test Dice, {cohort} (mean over seeds, points):", "",
                        "| labelled | init | " + " | ".join(o.removeprefix("dice_") for o in organs) + " |",
                        "|" + "---|" * (len(organs) + 2)]
        for r in (r for r in rows if r["cohort"] == cohort):
            organ_lines.append(f"| {r['labelled']} | {r['init']} | " + " | ".join(
                f"{100 * r[o]:.1f}" if not math.isnan(r[o]) else "-" for o in organs) + " |")
    return "\n".join(lines + organ_lines) + "\n"


def label_efficiency(out_dir: str | Path, *, cohorts: Sequence[str] = tuple(BENCH_COHORTS),
                     counts: Sequence[int] = COUNTS,
                     seeds: Sequence[int] = SEEDS, inits: Sequence[str] = INITS, steps: int | None = None,
                     pretrain_steps: int | None = None, finetune_config: str | Path = FINETUNE_CONFIG,
                     pretrain_configs: dict[str, Path] | None = None, overrides: Sequence[str] = (),
                     pretrain_overrides: Sequence[str] = (), manifests: dict[str, Path] | None = None,
                     pretrained: dict[str, dict[str, Path]] | None = None, pretrained_from: Path | None = None,
                     scratch_from: Path | None = None, quiet: bool = False) -> list[dict[str, Any]]:
    """Run the label-efficiency benchmark (module docstring) and return the summary rows.

    steps / pretrain_steps: fine-tuning / pretraining steps (None: the configs' train.steps; pretrain_steps
    applies to both pretrainings); overrides / pretrain_overrides: `key=value` for the fine-tuning / both
    pretraining configs (their `model` sections must agree); pretrain_configs: per pretrained init, its
    config (default `PRETRAIN_CONFIGS`); manifests: per cohort, an existing manifest instead of writing the
    cohort; pretrained: per cohort and init, an existing checkpoint instead of pretraining.
    pretrained_from / scratch_from: another benchmark folder whose pretrained checkpoints / finished scratch
    cells (copied in) this run reuses, so that a variant of the fine-tuning of the pretrained inits (e.g. a
    frozen-encoder warm-up) is compared with the same scratch runs, or a variant of the pretraining (e.g. a
    larger budget) with the same scratch runs; its cohorts are used too. The caller keeps the scratch
    fine-tuning settings the same."""
    out = Path(out_dir)
    manifests, pretrained = dict(manifests or {}), {k: dict(v) for k, v in (pretrained or {}).items()}
    configs = {**PRETRAIN_CONFIGS, **(pretrain_configs or {})}
    if not counts or min(counts) < 1 or not seeds:
        raise UserError(f"counts {list(counts)} / seeds {list(seeds)}: need at least one count >= 1 and one seed")
    unknown = [i for i in inits if i not in INITS]
    if unknown or not inits:
        raise UserError(f"--init: {unknown[0] if unknown else 'none'!r} is not one of {', '.join(INITS)}")
    runs, pretraining, tick = [], {}, time.perf_counter()
    for cohort in cohorts:
        earlier_cohorts = [Path(d) / "data" / cohort / "manifest.json" for d in (pretrained_from, scratch_from) if d]
        source = next((path for path in earlier_cohorts if path.is_file()), None)
        manifest = manifests.get(cohort) or source or make_cohort(cohort, out / "data" / cohort)
        if scratch_from is not None:
            _copy_scratch(Path(scratch_from) / cohort, out / cohort, counts, seeds)
        checkpoints: dict[str, Path | None] = {"scratch": None}
        for init in (i for i in inits if i != "scratch"):
            given = pretrained.get(cohort, {}).get(init)
            earlier = (Path(pretrained_from) / cohort / f"pretrain_{init}" / PRETRAINED_FILE[init]
                       if pretrained_from else None)
            given = given or (earlier if earlier is not None and earlier.is_file() else None)
            run_dir = out / cohort / f"pretrain_{init}"
            checkpoints[init] = given or pretrain_cohort(manifest, run_dir, init=init, config=Path(configs[init]),
                                                          steps=pretrain_steps, overrides=pretrain_overrides)
            if not given:
                done = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
                pretraining[f"{cohort}/{init}"] = {"steps": done.get("steps"), "seconds": done.get("seconds")}
        for labelled in counts:
            for seed in seeds:
                for init in inits:
                    run_dir = out / cohort / f"{init}_n{labelled}_seed{seed}"
                    summary = finetune_run(manifest, run_dir, labelled=labelled, seed=seed,
                                           pretrained=checkpoints[init], config=Path(finetune_config), steps=steps,
                                           overrides=overrides)
                    runs.append(_run_row(cohort, init, labelled, seed, summary, run_dir))
    rows, paired = summarise(runs), paired_differences(runs)
    budget = f"{runs[0]['steps']} fine-tuning steps, seeds {list(seeds)}"
    write_text(out / "label_efficiency_runs.csv", _csv_text(runs))
    write_text(out / "label_efficiency.csv", _csv_text(rows))
    if paired:
        write_text(out / "label_efficiency_paired.csv", _csv_text(paired))
    write_text(out / "label_efficiency.md", markdown(rows, paired))
    plot(out / "label_efficiency.png", rows, f"label efficiency ({budget}); error bars: std over seeds")
    curves = validation_curves(out, runs)
    if curves:
        plot_curves(out / "label_efficiency_curves.png", curves, f"validation Dice during fine-tuning ({budget}), "
                    "mean over seeds")
    write_json(out / "label_efficiency.json", {
        "settings": {"cohorts": list(cohorts), "counts": list(counts), "seeds": list(seeds), "inits": list(inits),
                     "steps": steps, "pretrain_steps": pretrain_steps, "finetune_config": str(finetune_config),
                     "pretrain_configs": {k: str(v) for k, v in configs.items() if k in inits},
                     "overrides": list(overrides), "pretrain_overrides": list(pretrain_overrides),
                     "pretrained": {c: {k: str(v) for k, v in d.items()} for c, d in pretrained.items()},
                     "threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu"},
        "seconds_this_call": time.perf_counter() - tick, "pretraining": pretraining, "summary": rows,
        "paired": paired, "runs": runs})
    if not quiet:
        print_label_efficiency(rows, paired, budget)
        print(f"wrote {out / 'label_efficiency.csv'}, {out / 'label_efficiency.md'}, {out / 'label_efficiency.png'}")
    return rows


def print_label_efficiency(rows: list[dict[str, Any]], paired: list[dict[str, Any]], budget: str) -> None:
    """Table: per cohort and n, each init's test Dice (mean +- std) and each pretrained init minus scratch
    (paired mean and 95 % interval)."""
    by_key = {(r["cohort"], r["labelled"], r["init"]): r for r in rows}
    diff = {(p["cohort"], p["labelled"], p["init"]): p for p in paired}
    inits = [i for i in INITS if any(r["init"] == i for r in rows)]
    compared = [i for i in inits if i != "scratch"]
    table = []
    for cohort, labelled in sorted({(r["cohort"], r["labelled"]) for r in rows}):
        cells = [by_key.get((cohort, labelled, init)) for init in inits]
        shown = [f"{c['dice_mean']:.3f} +- {c['dice_std']:.3f} (n={c['runs']})" if c else "-" for c in cells]
        deltas = [f"{p['diff_mean']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]" if p else "-"
                  for p in (diff.get((cohort, labelled, i)) for i in compared)]
        table.append([cohort, labelled, *shown, *deltas])
    print_table(f"label efficiency: test Dice ({budget})", ["cohort", "labelled", *inits,
                                                            *[f"{i} - scratch (95% CI)" for i in compared]], table)


# ------------------------------------------------------------------------------------------------ speed


def inference_speed(config: str | Path = FINETUNE_CONFIG, *, size: int = 64, classes: int = 10, volumes: int = 5,
                    overrides: Sequence[str] = ()) -> dict[str, float]:
    """Sliding-window inference of the fine-tuning network on `volumes` random (1, 1, size^3) volumes.

    Uses the config's model, crop size (ROI) and `seg.sw_*` settings (manifest not read); one warm-up
    volume is not timed. Prints and returns volumes/s and memory: the process's peak resident memory
    (imports included), its increase over the resident memory just before the first inference (what
    inference itself needed, when it set the peak), and on CUDA the peak allocated by torch."""
    from medssl.data.preprocessing import VolumePreprocessing
    from medssl.downstream.segmentation.config import FinetuneSegConfig
    from medssl.inference import SlidingWindowPredictor
    from medssl.models.volume_encoders import build_segmentation_network

    cfg = load_config(config, FinetuneSegConfig, list(overrides))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = build_segmentation_network(cfg.model, classes).to(device).eval()
    predictor = SlidingWindowPredictor(VolumePreprocessing(crop_size=cfg.data.crop_size),
                                       sw_batch_size=cfg.seg.sw_batch_size, overlap=cfg.seg.sw_overlap,
                                       mode=cfg.seg.sw_mode, device=device)
    image = torch.rand(1, size, size, size)
    before = current_rss_mib()
    predictor.probabilities(network, image)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tick = time.perf_counter()
    for _ in range(volumes):
        predictor.probabilities(network, image)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tick
    # the kernel's peak (ru_maxrss) and current (statm) counters are updated at different times and can
    # disagree by a fraction of a MiB, so a peak that did not move reads as a tiny negative increase
    figures = {"volumes_per_s": volumes / seconds, "seconds_per_volume": seconds / volumes,
               "peak_rss_mib": peak_rss_mib(), "inference_rss_increase_mib": max(0.0, peak_rss_mib() - before)}
    if device.type == "cuda":
        figures["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print_table(f"sliding-window inference ({cfg.model.name} width {cfg.model.width}, ROI {cfg.data.crop_size}, "
                f"overlap {cfg.seg.sw_overlap}, {device.type}, threads {torch.get_num_threads()})",
                ["volume", "volumes/s", "s/volume", "peak RSS MiB", "RSS increase MiB", "peak CUDA MiB"],
                [[f"{size}^3, {classes} classes", figures["volumes_per_s"], figures["seconds_per_volume"],
                  figures["peak_rss_mib"], figures["inference_rss_increase_mib"], figures.get("peak_cuda_mib", "-")]])
    return figures


def current_rss_mib() -> float:
    """Resident memory of this process now, in MiB (Linux /proc; NaN elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text(encoding="utf-8").split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
