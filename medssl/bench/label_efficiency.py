"""Segmentation benchmarks: `medssl bench label-efficiency` and the sliding-window inference speed.

Label efficiency: for each cohort (`BENCH_COHORTS`: the two-site hospital, the synthetic hospital, the
MNI152 tissue cohort) and each initialisation in `inits`:
- "scratch": the fine-tuning config's network at its random initialisation;
- "encoder": the encoder pretrained by the contrastive objectives (`configs/pretrain_volume.yaml`,
  probe off), loaded into the encoder only (the decoder starts random);
- "network": the whole network (encoder and decoder) pretrained by masked-volume reconstruction
  (`configs/pretrain_volume_mae.yaml`, probe off), loaded whole (but the output layer);
- "encoder_nopool", "network_nopool": the data-vs-steps control: the same pretrainings with the same steps
  on the labelled cohort's training volumes only (no pool), fine-tuned with the hyper-parameters chosen
  for "encoder" / "network";
then for every seed, every number n of labelled training volumes (chosen per patient by `select_labelled`,
nested over n for one seed) and every init, the network is fine-tuned with the same budget, crops,
augmentation and seed (the seed chooses the labelled volumes, the network's random layers and every crop,
so the inits of one seed see the same data). Pretraining reads the cohort's `pool.json` when it has one
(the two-site hospital's unlabelled pool: other patients, both sites), else its training split.

Tuning (`tuning`): before the grid, each init's learning rate and warm-up are chosen on the validation
split (site A only in the two-site cohort: a hospital labels and validates on its own scanner): every
(lr, warm-up) candidate is fine-tuned with `tuning.labelled` volumes and seed `tuning.seed`, and the best
validation Dice (the run's best.pt) wins (a candidate whose loss diverges is left out, and remembered);
for a pretrained init, the weight decay toward the pretrained weights (`seg.decay_to_pretrained`)
candidates are then tried at the chosen (lr, warm-up) and kept when better. The same candidates and budget for every
init; the test split is never read for a choice.

Scores: test Dice (mean over the foreground classes, then over the test cases) and per-class Dice per run,
per test site when the manifest's test entries say their `site` (one row per run and site), summarised per
(cohort, site, n, init) as mean, standard deviation (over seeds, ddof 1), min and max; each pretrained init
is compared with scratch seed by seed (paired difference: mean, standard deviation, the 95 % t interval and
the paired t test), with Holm's correction over the family of comparisons (`medssl.bench.stats.holm`), and
again per organ (kidneys, spleen) as a family of its own. Wall-clock seconds are recorded for every run, and
how far fine-tuning moved the encoder's and the decoder's weights from where they started (`weight_drift`).

Layout of `out_dir` (re-running skips what is already there, so an interrupted benchmark resumes where
it stopped: a pretraining from its last checkpoint, a fine-tuning cell from scratch (each run directory is
written atomically, and a half-written one left by a killed process is removed before its run starts
again); the tables are rewritten after every finished cell):

    data/<cohort>/                         the cohort, written when no manifest is given
    <cohort>/pretrain_<init>/              pretraining run (encoder.pt / network.pt), unless a checkpoint is given
    <cohort>/tune/<init>_lr<lr>_wu<w>[_dp<d>]/  the tuning runs
    <cohort>/<init>_n<n>_seed<seed>/       one fine-tuning run directory each
    label_efficiency_tuning.csv            every tuning run: init, lr, warm-up, decay, validation Dice, chosen
    label_efficiency_runs.csv              one row per run and test site (Dice overall and per class, seconds, drift)
    label_efficiency.csv                   mean / std / min / max of test Dice per (cohort, site, n, init), class means
    label_efficiency_paired.csv            pretrained minus scratch per (cohort, site, n, init): mean, std, 95 %
                                           interval, p value, Holm-adjusted p value, level and interval
    label_efficiency_paired_organs.csv     the same per organ (kidneys, spleen), Holm over that family
    label_efficiency.png                   Dice vs labelled volumes, one curve per init, one panel per cohort and site
    label_efficiency_curves.png            validation Dice vs fine-tuning step (mean over seeds) per cohort and init
    label_efficiency.md                    the tables as markdown
    label_efficiency.json                  the settings, the tuning, the pretraining runs and every row
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.atomic import atomic_dir, atomic_path, write_json, write_text
from medssl.bench.report import csv_text, peak_rss_mib, print_table
from medssl.bench.stats import ALL_SITES, holm
from medssl.bench.stats import paired_differences as _paired
from medssl.bench.stats import summarise as _summarise
from medssl.config import load_config
from medssl.errors import UserError

INITS = ("scratch", "encoder", "network", "encoder_nopool", "network_nopool")
INIT_NAMES = {"scratch": "scratch", "encoder": "encoder pretrained (contrastive)",
              "network": "whole network pretrained (masked)",
              "encoder_nopool": "encoder pretrained on the training split only (control)",
              "network_nopool": "whole network pretrained on the training split only (control)"}
CONTROL_SUFFIX = "_nopool"
COUNTS = (1, 2, 4, 8)
SEEDS = (0, 1, 2)
FINETUNE_CONFIG = Path("configs/finetune_seg.yaml")
PRETRAIN_CONFIGS = {"encoder": Path("configs/pretrain_volume.yaml"),
                    "network": Path("configs/pretrain_volume_mae.yaml")}
PRETRAINED_FILE = {"encoder": "encoder.pt", "network": "network.pt"}
BENCH_COHORTS = {  # "cohort": the writer (medssl.data.synthetic.cohorts); the rest its arguments
    "two_site": {"cohort": "hospital", "patients": 30, "studies": 2, "size": 64, "two_site": True, "pool": 160,
                 "trials": 1, "signal_seconds": 2.0},  # 36 / 12 labelled volumes (site A), test 12 + 12, pool 320
    "hospital": {"cohort": "hospital", "patients": 12, "studies": 2, "size": 64},  # 16 training volumes
    "mni152": {"cohort": "mni152", "patients": 16, "studies": 1, "size": 48}}  # 10 training volumes
ORGAN_METRICS = ("dice_kidney_left", "dice_kidney_right", "dice_spleen")  # the per-organ family, where present


def _base(init: str) -> str:
    """The pretraining an init loads: "encoder" or "network" (the control inits share their base's)."""
    return init.removesuffix(CONTROL_SUFFIX)


@dataclass(frozen=True)
class Tuning:
    """The fine-tuning hyper-parameters tried per init on the validation split (module docstring)."""

    lrs: tuple[float, ...] = (5e-4, 2e-3, 8e-3, 2e-2, 5e-2)
    warmups: tuple[int, ...] = (10, 200)
    decays: tuple[float, ...] = (1.0, 10.0)  # seg.decay_to_pretrained, pretrained inits only
    labelled: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lrs or not self.warmups or min(self.lrs) <= 0 or min(self.warmups) < 0 or self.labelled < 1:
            raise UserError(f"--tune-*: need lrs > 0, warm-ups >= 0 and a labelled count >= 1, got {self}")
        if any(d <= 0 for d in self.decays):
            raise UserError(f"--tune-decay: values must be > 0 (0, no decay toward the pretrained weights, is always "
                            f"tried), got {list(self.decays)}")


def make_cohort(name: str, folder: Path, *, seed: int = 0) -> Path:
    """Write a benchmark cohort (`BENCH_COHORTS`); returns its manifest. An existing complete cohort is reused."""
    from medssl.data.synthetic.cohorts import write_cohort

    if name not in BENCH_COHORTS:
        raise UserError(f"--cohort: {name!r} is not one of {', '.join(BENCH_COHORTS)}")
    if (folder / "manifest.json").is_file():
        return folder / "manifest.json"
    spec = dict(BENCH_COHORTS[name])
    return write_cohort(spec.pop("cohort"), folder, seed=seed, **spec)


def pretraining_manifest(manifest: Path, init: str) -> Path:
    """What an init pretrains on: the cohort's pool.json (beside its manifest) when it has one and the init is
    not a control, else the manifest (its training split)."""
    pool = manifest.parent / "pool.json"
    return pool if pool.is_file() and not init.endswith(CONTROL_SUFFIX) else manifest


def _clear_leftovers(run_dir: Path) -> None:
    """Remove the temporary folders a killed `atomic_dir(run_dir)` left beside it."""
    for stale in run_dir.parent.glob(f".{run_dir.name}.*"):
        if stale.is_dir() and (stale.name.endswith(".tmp") or stale.name.endswith(".old")):
            shutil.rmtree(stale, ignore_errors=True)


def pretrain_cohort(manifest: Path, run_dir: Path, *, init: str, config: Path, steps: int | None,
                    overrides: Sequence[str]) -> Path:
    """Pretrain for `init` on `manifest`'s training split (probe off) unless its checkpoint
    (`PRETRAINED_FILE`) exists; a run stopped half-way continues from its last checkpoint (a folder without
    one starts again). The run's summary.json gets the wall-clock `seconds` of the call that finished it.
    Returns the checkpoint."""
    from medssl.pretrain.volume import PretrainVolumeConfig, pretrain_volume

    name = PRETRAINED_FILE[_base(init)]
    checkpoint = run_dir / name
    if checkpoint.exists():
        return checkpoint
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # stopped before its first checkpoint: nothing to keep
    extra = [f"train.steps={steps}"] if steps is not None else []
    cfg = load_config(config, PretrainVolumeConfig,
                      [f"data.manifest={manifest}", "probe.enabled=false", *extra, *overrides])
    tick = time.perf_counter()
    summary = pretrain_volume(cfg, run_dir, resume=resume)
    if not checkpoint.exists():
        raise UserError(f"{config}: the pretraining for '{init}' wrote no {name} "
                        "(a whole-network objective such as objectives.masked needs a weight > 0)")
    write_json(run_dir / "summary.json", {**summary, "seconds": time.perf_counter() - tick, "resumed": resume})
    return checkpoint


def finetune_run(manifest: Path, run_dir: Path, *, labelled: int, seed: int, pretrained: Path | None, config: Path,
                 steps: int | None, overrides: Sequence[str], reused: bool = False) -> dict[str, Any]:
    """One fine-tuning run (its summary), skipped when run_dir/summary.json exists; a finished run made with
    other settings (its config.yaml's `train`, `seg` or `model` differ) is a UserError naming it, unless it is
    `reused` on purpose (a scratch cell copied from `scratch_from`)."""
    from medssl.downstream.segmentation.config import FinetuneSegConfig
    from medssl.downstream.segmentation.task import finetune_seg

    extra = [f"train.steps={steps}"] if steps is not None else []
    cfg = load_config(config, FinetuneSegConfig, [f"data.manifest={manifest}", f"seg.labelled_volumes={labelled}",
                                                  f"train.seed={seed}", *extra, *overrides])
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        done = load_config(run_dir / "config.yaml", FinetuneSegConfig, [])
        changed = [k for k in ("train", "seg", "model") if getattr(done, k) != getattr(cfg, k)]
        if changed and not reused:
            raise UserError(f"{run_dir}: finished with other {' and '.join(changed)} settings than this benchmark's "
                            "(remove the folder to run it again, or use another --output)")
        return json.loads(summary_path.read_text(encoding="utf-8"))
    _clear_leftovers(run_dir)
    with atomic_dir(run_dir) as tmp:
        summary = finetune_seg(cfg, tmp, pretrained=pretrained, quiet=True)
    return summary


def _candidate_overrides(lr: float, warmup: int, decay: float) -> list[str]:
    return [f"train.lr={lr:g}", f"train.warmup_steps={warmup}"] + ([f"seg.decay_to_pretrained={decay:g}"]
                                                                    if decay else [])


def tune(manifest: Path, folder: Path, *, init: str, pretrained: Path | None, tuning: Tuning, config: Path,
         steps: int | None, overrides: Sequence[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Choose `init`'s lr and warm-up (then, pretrained, its decay toward the pretrained weights) on the
    validation split (module docstring). Returns the chosen overrides and one row per tuning run."""
    rows = []

    def trial(lr: float, warmup: int, decay: float) -> dict[str, Any]:
        run_dir = folder / "tune" / (f"{init}_lr{lr:g}_wu{warmup}" + (f"_dp{decay:g}" if decay else ""))
        row = {"init": init, "lr": lr, "warmup": warmup, "decay_to_pretrained": decay, "val_dice": -math.inf,
               "run": str(run_dir), "chosen": False}
        rows.append(row)
        failed = run_dir.parent / f"{run_dir.name}.failed"
        if failed.is_file():  # a candidate that diverged before: it stays out
            row["failed"] = failed.read_text(encoding="utf-8").strip()
            return row
        try:
            summary = finetune_run(manifest, run_dir, labelled=tuning.labelled, seed=tuning.seed,
                                   pretrained=pretrained, config=config, steps=steps,
                                   overrides=[*overrides, *_candidate_overrides(lr, warmup, decay)])
        except UserError as err:
            if "non-finite loss" not in str(err):
                raise
            write_text(failed, f"{err}\n")  # too large a learning rate: the loss diverged
            row["failed"] = str(err)
            return row
        value = summary.get("best_val_dice_mean")
        if value is None or not math.isfinite(value):
            raise UserError(f"{manifest}: tuning needs a validation split with labelled volumes (run {run_dir} "
                            "has no validation Dice)")
        row["val_dice"] = float(value)
        return row

    best = max((trial(lr, w, 0.0) for lr in tuning.lrs for w in tuning.warmups), key=lambda r: r["val_dice"])
    if pretrained is not None:
        best = max([best, *(trial(best["lr"], best["warmup"], d) for d in tuning.decays)], key=lambda r: r["val_dice"])
    if not math.isfinite(best["val_dice"]):
        raise UserError(f"tuning '{init}': every candidate diverged; give smaller --tune-lr values")
    best["chosen"] = True
    return _candidate_overrides(best["lr"], best["warmup"], best["decay_to_pretrained"]), rows


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


def case_sites(manifest: Path) -> dict[str, str]:
    """Case name (image file name without extension) -> site of every test entry that states one."""
    data = json.loads(Path(manifest).read_text(encoding="utf-8"))
    return {Path(e["image"]).name.split(".")[0]: str(e["site"]) for e in data.get("test", []) if e.get("site")}


def _site_scores(run_dir: Path, sites: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per site: the mean over its test cases (test_cases.csv) of dice_mean and every dice_<class>."""
    with open(run_dir / "test_cases.csv", encoding="utf-8", newline="") as handle:
        cases = list(csv.DictReader(handle))
    scores = {}
    for site in sorted(set(sites.values())):
        mine = [c for c in cases if sites.get(c["case"]) == site]
        keys = [k for k in (mine[0] if mine else {}) if k.startswith("dice_")]
        scores[site] = {k: float(np.nanmean([float(c[k]) for c in mine])) for k in keys}
    return scores


def _run_rows(cohort: str, init: str, labelled: int, seed: int, summary: dict[str, Any], run_dir: Path,
              sites: dict[str, str]) -> list[dict[str, Any]]:
    """The run's rows: one per test site when the test entries state sites, else one (all test cases)."""
    drift = weight_drift(run_dir) if (run_dir / "checkpoints").is_dir() else {}
    common = {"cohort": cohort, "init": init, "labelled": labelled, "seed": seed,
              "labelled_patients": summary["labelled_patients"], "steps": summary["steps"],
              "seconds": summary.get("seconds", math.nan), "best_val_dice_mean": summary.get("best_val_dice_mean"),
              "test_checkpoint": summary.get("test_checkpoint"), **drift}
    if not sites:
        organs = {k.removeprefix("test_"): v for k, v in summary.items()
                  if k.startswith("test_dice_") and k != "test_dice_mean"}
        return [{**common, "test_dice_mean": summary["test_dice_mean"], "test_hd95_mean": summary["test_hd95_mean"],
                 **organs}]
    return [{**common, "site": site, "test_dice_mean": scores.pop("dice_mean"), **scores}
            for site, scores in _site_scores(run_dir, sites).items()]


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`medssl.bench.stats.summarise` in the order of `INITS`."""
    return _summarise(runs, INITS)


def paired_differences(runs: list[dict[str, Any]], **options: Any) -> list[dict[str, Any]]:
    """`medssl.bench.stats.paired_differences` against scratch, in the order of `INITS`."""
    return _paired(runs, order=INITS, **options)


def organ_differences(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired differences of the organ Dice scores `ORGAN_METRICS` present in the runs, Holm over that family."""
    present = [m for m in ORGAN_METRICS if any(m in r for r in runs)]
    return holm([row for metric in present for row in paired_differences(runs, metric=metric)])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")


def _panel(row: dict[str, Any]) -> str:
    """A cohort and test site as shown: "two_site, site B"; the cohort alone for one test set."""
    site = row.get("site", ALL_SITES)
    return row["cohort"] if site == ALL_SITES else f"{row['cohort']}, site {site}"


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """PNG: test Dice (mean +- std over seeds) vs labelled volumes, one curve per init, one panel per cohort and
    test site."""
    plt = _pyplot()
    panels = list(dict.fromkeys(_panel(r) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    inits = [i for i in INITS if any(r["init"] == i for r in rows)]
    for ax, panel in zip(axes[0], panels):
        for k, (init, marker) in enumerate(zip(inits, "osd^v")):
            mine = sorted((r for r in rows if _panel(r) == panel and r["init"] == init), key=lambda r: r["labelled"])
            if mine:
                shift = 1.0 + 0.04 * (k - (len(inits) - 1) / 2)  # side by side on the log axis
                ax.errorbar([r["labelled"] * shift for r in mine], [r["dice_mean"] for r in mine],
                            yerr=[r["dice_std"] for r in mine], marker=marker, capsize=3,
                            label=INIT_NAMES.get(init, init))
        counts = sorted({r["labelled"] for r in rows if _panel(r) == panel})
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_xlabel("labelled training volumes")
        ax.set_ylabel("test Dice (mean over classes)")
        ax.set_title(f"{panel} (synthetic subjects)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(textwrap.fill(title, width=62 * len(panels)), fontsize=9)  # never cut at the figure's edges
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def validation_curves(out: Path, runs: list[dict[str, Any]]) -> dict[tuple, list[tuple[int, float]]]:
    """Validation Dice vs step, mean over seeds, per (cohort, init, labelled), read from the runs' metrics.jsonl."""
    curves: dict[tuple, dict[int, list[float]]] = {}
    for cohort, init, labelled, seed in sorted({(r["cohort"], r["init"], r["labelled"], r["seed"]) for r in runs}):
        metrics = out / cohort / f"{init}_n{labelled}_seed{seed}" / "metrics.jsonl"
        if not metrics.exists():
            continue
        for record in map(json.loads, metrics.read_text(encoding="utf-8").splitlines()):
            if record.get("val_dice_mean") is not None:
                curves.setdefault((cohort, init, labelled), {}).setdefault(record["step"], []).append(
                    record["val_dice_mean"])
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
            ax.set_title(textwrap.fill(f"{cohort}: {INIT_NAMES.get(init, init)}", 40), fontsize=8)
            ax.set_xlabel("fine-tuning step", fontsize=8)
            ax.set_ylabel("validation Dice", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _interval(p: dict[str, Any] | None, low: str = "ci_low", high: str = "ci_high") -> str:
    if not p:
        return "-"
    if math.isnan(p[low]):
        return f"{100 * p['diff_mean']:+.1f}"
    return f"{100 * p['diff_mean']:+.1f} [{100 * p[low]:+.1f}, {100 * p[high]:+.1f}]"


def markdown(rows: list[dict[str, Any]], paired: list[dict[str, Any]], organs: Sequence[dict[str, Any]] = (),
             tuning: Sequence[dict[str, Any]] = ()) -> str:
    """The summary, the paired differences (Holm-adjusted intervals where computed), the per-class means, the
    per-organ paired differences and the tuning runs as markdown tables (Dice in points, i.e. x 100)."""
    by_key = {(_panel(r), r["labelled"], r["init"]): r for r in rows}
    diff = {(_panel(p), p["labelled"], p["init"]): p for p in paired}
    holm_done = any("holm_ci_low" in p for p in paired)
    ci, low, high = (("Holm-adjusted 95 % CI", "holm_ci_low", "holm_ci_high") if holm_done
                     else ("95 % CI", "ci_low", "ci_high"))
    inits = [i for i in INITS if any(r["init"] == i for r in rows)]
    compared = [i for i in inits if i != "scratch"] if "scratch" in inits else []
    head = ["cohort", "labelled", *[INIT_NAMES[i] for i in inits], *[f"{INIT_NAMES[i]} - scratch [{ci}]"
                                                                      for i in compared], "s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for panel, labelled in dict.fromkeys((_panel(r), r["labelled"]) for r in rows):
        cells = [by_key.get((panel, labelled, i)) for i in inits]
        shown = [f"{100 * c['dice_mean']:.1f} ± {100 * c['dice_std']:.1f} ({c['runs']})" if c else "-" for c in cells]
        deltas = [_interval(diff.get((panel, labelled, init)), low, high) for init in compared]
        seconds = np.nanmean([c["seconds_mean"] for c in cells if c])
        lines.append(f"| {panel} | {labelled} | " + " | ".join(shown + deltas) + f" | {seconds:.0f} |")
    if holm_done:
        lines += ["", "Paired t tests (per-seed differences, pretrained - scratch; Holm over the "
                  f"{sum(not math.isnan(p['p_value']) for p in paired)} comparisons):", "",
                  "| cohort | labelled | init | seeds | diff | 95 % CI | p | Holm p | Holm level | wins |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {_panel(p)} | {p['labelled']} | {p['init']} | {p['seeds']} | {100 * p['diff_mean']:+.1f} | "
                  f"{_interval(p)} | {p['p_value']:.3g} | {p['holm_p']:.3g} | {p['holm_level']:.3g} | {p['wins']} |"
                  for p in paired]
    organ_lines = []
    for panel in dict.fromkeys(_panel(r) for r in rows):
        classes = [k for k in next(r for r in rows if _panel(r) == panel) if k.startswith("dice_")
                   and k not in ("dice_mean", "dice_std", "dice_min", "dice_max")]
        organ_lines += ["", f"Per-class test Dice, {panel} (mean over seeds, points):", "",
                        "| labelled | init | " + " | ".join(o.removeprefix("dice_") for o in classes) + " |",
                        "|" + "---|" * (len(classes) + 2)]
        for r in (r for r in rows if _panel(r) == panel):
            organ_lines.append(f"| {r['labelled']} | {r['init']} | " + " | ".join(
                f"{100 * r[o]:.1f}" if not math.isnan(r[o]) else "-" for o in classes) + " |")
    if organs:
        organ_lines += ["", "Per organ, pretrained - scratch (Dice points, Holm-adjusted 95 % CI over the "
                        f"{sum(not math.isnan(p['p_value']) for p in organs)} organ comparisons):", "",
                        "| cohort | organ | labelled | init | seeds | diff [Holm CI] | Holm p |",
                        "|---|---|---|---|---|---|---|"]
        organ_lines += [f"| {_panel(p)} | {p['metric'].removeprefix('dice_')} | {p['labelled']} | {p['init']} | "
                        f"{p['seeds']} | {_interval(p, 'holm_ci_low', 'holm_ci_high')} | {p['holm_p']:.3g} |"
                        for p in organs]
    if tuning:
        organ_lines += ["", "Tuning on the validation split (best validation Dice of each run, points):", "",
                        "| init | lr | warm-up | decay to pretrained | validation Dice | chosen |",
                        "|---|---|---|---|---|---|"]
        organ_lines += [f"| {t['init']} | {t['lr']:g} | {t['warmup']} | {t['decay_to_pretrained']:g} | "
                        f"{100 * t['val_dice']:.1f} | {'yes' if t['chosen'] else ''} |" for t in tuning]
    return "\n".join(lines + organ_lines) + "\n"


def _copy_run(source: Path, target: Path) -> None:
    """Copy a finished run directory (atomically) unless the target exists."""
    if (source / "summary.json").is_file() and not target.exists():
        with atomic_dir(target) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)


def label_efficiency(out_dir: str | Path, *, cohorts: Sequence[str] = ("two_site",),
                     counts: Sequence[int] = COUNTS,
                     seeds: Sequence[int] = SEEDS, inits: Sequence[str] = INITS[:3], steps: int | None = None,
                     pretrain_steps: int | None = None, finetune_config: str | Path = FINETUNE_CONFIG,
                     pretrain_configs: dict[str, Path] | None = None, overrides: Sequence[str] = (),
                     pretrain_overrides: Sequence[str] = (), manifests: dict[str, Path] | None = None,
                     pretrained: dict[str, dict[str, Path]] | None = None, pretrained_from: Path | None = None,
                     scratch_from: Path | None = None, tuning: Tuning | None = None,
                     quiet: bool = False) -> list[dict[str, Any]]:
    """Run the label-efficiency benchmark (module docstring) and return the summary rows.

    steps / pretrain_steps: fine-tuning / pretraining steps (None: the configs' train.steps; pretrain_steps
    applies to both pretrainings); overrides / pretrain_overrides: `key=value` for the fine-tuning / both
    pretraining configs (their `model` sections must agree); pretrain_configs: per pretrained init ("encoder",
    "network"), its config (default `PRETRAIN_CONFIGS`); manifests: per cohort, an existing manifest instead of
    writing the cohort; pretrained: per cohort and init, an existing checkpoint instead of pretraining.
    tuning: choose each init's lr, warm-up and decay toward the pretrained weights on validation first (None:
    the fine-tuning config's values for every init).
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
    runs, pretraining, tuned, chosen, tick = [], {}, [], {}, time.perf_counter()
    settings = {"cohorts": list(cohorts), "counts": list(counts), "seeds": list(seeds), "inits": list(inits),
                "steps": steps, "pretrain_steps": pretrain_steps, "finetune_config": str(finetune_config),
                "pretrain_configs": {k: str(v) for k, v in configs.items() if k in {_base(i) for i in inits}},
                "overrides": list(overrides), "pretrain_overrides": list(pretrain_overrides),
                "tuning": asdict(tuning) if tuning else None,
                "pretrained": {c: {k: str(v) for k, v in d.items()} for c, d in pretrained.items()},
                "threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu"}

    def write_outputs() -> list[dict[str, Any]]:
        ordered = sorted(runs, key=lambda r: (r["cohort"], r["labelled"], r["seed"], INITS.index(r["init"]),
                                              r.get("site", "")))
        rows, paired, organs = summarise(ordered), holm(paired_differences(ordered)), organ_differences(ordered)
        budget = f"{ordered[0]['steps']} fine-tuning steps, seeds {sorted({r['seed'] for r in ordered})}"
        if tuned:
            write_text(out / "label_efficiency_tuning.csv", csv_text(tuned))
        write_text(out / "label_efficiency_runs.csv", csv_text(ordered))
        write_text(out / "label_efficiency.csv", csv_text(rows))
        if paired:
            write_text(out / "label_efficiency_paired.csv", csv_text(paired))
        if organs:
            write_text(out / "label_efficiency_paired_organs.csv", csv_text(organs))
        write_text(out / "label_efficiency.md", markdown(rows, paired, organs, tuned))
        plot(out / "label_efficiency.png", rows, f"label efficiency ({budget}); error bars: std over seeds")
        curves = validation_curves(out, ordered)
        if curves:
            plot_curves(out / "label_efficiency_curves.png", curves, f"validation Dice during fine-tuning ({budget}), "
                        "mean over seeds")
        write_json(out / "label_efficiency.json", {
            "settings": settings, "seconds_this_call": time.perf_counter() - tick, "pretraining": pretraining,
            "tuning": tuned, "chosen": chosen, "summary": rows, "paired": paired, "paired_organs": organs,
            "runs": ordered})
        return rows

    for cohort in cohorts:
        earlier_cohorts = [Path(d) / "data" / cohort / "manifest.json" for d in (pretrained_from, scratch_from) if d]
        source = next((path for path in earlier_cohorts if path.is_file()), None)
        manifest = manifests.get(cohort) or source or make_cohort(cohort, out / "data" / cohort)
        sites = case_sites(manifest)
        if scratch_from is not None:
            for labelled in counts:
                for seed in seeds:
                    name = f"scratch_n{labelled}_seed{seed}"
                    _copy_run(Path(scratch_from) / cohort / name, out / cohort / name)
        checkpoints: dict[str, Path | None] = {"scratch": None}
        for init in (i for i in inits if i != "scratch"):
            given = pretrained.get(cohort, {}).get(init)
            earlier = (Path(pretrained_from) / cohort / f"pretrain_{init}" / PRETRAINED_FILE[_base(init)]
                       if pretrained_from else None)
            given = given or (earlier if earlier is not None and earlier.is_file() else None)
            run_dir = out / cohort / f"pretrain_{init}"
            checkpoints[init] = given or pretrain_cohort(pretraining_manifest(manifest, init), run_dir, init=init,
                                                          config=Path(configs[_base(init)]), steps=pretrain_steps,
                                                          overrides=pretrain_overrides)
            if not given:
                done = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
                pretraining[f"{cohort}/{init}"] = {"steps": done.get("steps"), "seconds": done.get("seconds"),
                                                   "manifest": str(pretraining_manifest(manifest, init))}
        extra: dict[str, list[str]] = {init: [] for init in inits}
        if tuning is not None:
            for init in (i for i in inits if not i.endswith(CONTROL_SUFFIX)):
                extra[init], rows = tune(manifest, out / cohort, init=init, pretrained=checkpoints[init],
                                         tuning=tuning, config=Path(finetune_config), steps=steps, overrides=overrides)
                tuned += [{"cohort": cohort, **row} for row in rows]
                best = next(row for row in rows if row["chosen"])
                cell = out / cohort / f"{init}_n{tuning.labelled}_seed{tuning.seed}"
                if (cell / "config.yaml").is_file() and (cell / "config.yaml").read_bytes() != (
                        Path(best["run"]) / "config.yaml").read_bytes():
                    shutil.rmtree(cell)   # a copy of an earlier choice (the candidates changed since)
                _copy_run(Path(best["run"]), cell)
            for init in (i for i in inits if i.endswith(CONTROL_SUFFIX)):
                if _base(init) not in extra:
                    raise UserError(f"--init {init}: tuning takes the hyper-parameters chosen for '{_base(init)}'; "
                                    f"add --init {_base(init)}")
                extra[init] = extra[_base(init)]
            chosen[cohort] = extra
        for seed in seeds:  # seeds outermost: a partial grid has every (n, init) at the seeds done so far
            for labelled in counts:
                for init in inits:
                    run_dir = out / cohort / f"{init}_n{labelled}_seed{seed}"
                    fresh = not (run_dir / "summary.json").exists()
                    summary = finetune_run(manifest, run_dir, labelled=labelled, seed=seed,
                                           pretrained=checkpoints[init], config=Path(finetune_config), steps=steps,
                                           overrides=[*overrides, *extra[init]],
                                           reused=init == "scratch" and scratch_from is not None)
                    runs.extend(_run_rows(cohort, init, labelled, seed, summary, run_dir, sites))
                    if fresh:
                        write_outputs()
    rows = write_outputs()
    if not quiet:
        ordered = sorted(runs, key=lambda r: (r["cohort"], r["labelled"], r["seed"], INITS.index(r["init"])))
        print_label_efficiency(rows, holm(paired_differences(ordered)),
                               f"{ordered[0]['steps']} fine-tuning steps, seeds {list(seeds)}")
        print(f"wrote {out / 'label_efficiency.csv'}, {out / 'label_efficiency.md'}, {out / 'label_efficiency.png'}")
    return rows


def print_label_efficiency(rows: list[dict[str, Any]], paired: list[dict[str, Any]], budget: str) -> None:
    """Table: per cohort (and test site) and n, each init's test Dice (mean +- std) and each pretrained init minus
    scratch (paired mean and Holm-adjusted 95 % interval)."""
    by_key = {(_panel(r), r["labelled"], r["init"]): r for r in rows}
    diff = {(_panel(p), p["labelled"], p["init"]): p for p in paired}
    inits = [i for i in INITS if any(r["init"] == i for r in rows)]
    compared = [i for i in inits if i != "scratch"]
    table = []
    for panel, labelled in dict.fromkeys((_panel(r), r["labelled"]) for r in rows):
        cells = [by_key.get((panel, labelled, init)) for init in inits]
        shown = [f"{c['dice_mean']:.3f} +- {c['dice_std']:.3f} (n={c['runs']})" if c else "-" for c in cells]
        deltas = [f"{p['diff_mean']:+.3f} [{p['holm_ci_low']:+.3f}, {p['holm_ci_high']:+.3f}]" if p else "-"
                  for p in (diff.get((panel, labelled, i)) for i in compared)]
        table.append([panel, labelled, *shown, *deltas])
    print_table(f"label efficiency: test Dice ({budget})", ["cohort", "labelled", *inits,
                                                            *[f"{i} - scratch (Holm 95% CI)" for i in compared]], table)


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
