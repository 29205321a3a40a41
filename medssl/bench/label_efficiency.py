"""Segmentation benchmarks: `medssl bench label-efficiency` and the sliding-window inference speed.

Label efficiency: for each cohort (the synthetic hospital, the MNI152 tissue cohort), the encoder is
pretrained once on the cohort's unlabelled training volumes (`medssl pretrain volume`, probe off), then
for every number n of labelled training volumes (chosen per patient by `select_labelled`, nested over
n for one seed) and every seed, the same network is fine-tuned from scratch and from the pretrained
encoder with the same budget (the fine-tuning config's `train.*`). Test Dice (mean over the foreground
classes, then over the test cases) is collected per run and summarised per (cohort, n, init) as mean,
standard deviation (over seeds, ddof 1), min and max.

Layout of `out_dir` (re-running skips what is already there, so an interrupted benchmark resumes):

    data/<cohort>/                         the cohort, written when no manifest is given
    <cohort>/pretrain/                     pretraining run (encoder.pt), unless a checkpoint is given
    <cohort>/<init>_n<n>_seed<seed>/       one fine-tuning run directory each (written atomically)
    label_efficiency_runs.csv              one row per run
    label_efficiency.csv                   mean / std / min / max of test Dice per (cohort, n, init)
    label_efficiency.png                   Dice vs labelled volumes, scratch and pretrained, one panel per cohort
    label_efficiency.json                  the settings and the summary rows
"""

from __future__ import annotations

import csv
import io as textio
import json
import os
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

INITS = ("scratch", "pretrained")
COUNTS = (1, 2, 4, 8)
SEEDS = (0, 1, 2)
FINETUNE_CONFIG = Path("configs/finetune_seg.yaml")
PRETRAIN_CONFIG = Path("configs/pretrain_volume.yaml")
BENCH_COHORTS = {"hospital": {"patients": 12, "studies": 2, "size": 64},  # 16 training volumes
                 "mni152": {"patients": 16, "studies": 1, "size": 48}}  # 10 training volumes


def make_cohort(name: str, folder: Path, *, seed: int = 0) -> Path:
    """Write a benchmark cohort with at least 8 training volumes from 8 patients (`BENCH_COHORTS`);
    returns its manifest."""
    from medssl.data.synthetic.cohorts import write_cohort

    if name not in BENCH_COHORTS:
        raise UserError(f"--cohort: {name!r} is not one of {', '.join(BENCH_COHORTS)}")
    return write_cohort(name, folder, seed=seed, **BENCH_COHORTS[name])


def pretrain_cohort(manifest: Path, run_dir: Path, *, config: Path, steps: int | None,
                    overrides: Sequence[str]) -> Path:
    """Pretrain on the cohort's training split (probe off) unless run_dir/encoder.pt exists; returns it."""
    from medssl.pretrain.volume import PretrainVolumeConfig, pretrain_volume

    encoder = run_dir / "encoder.pt"
    if not encoder.exists():
        extra = [f"train.steps={steps}"] if steps is not None else []
        cfg = load_config(config, PretrainVolumeConfig,
                          [f"data.manifest={manifest}", "probe.enabled=false", *extra, *overrides])
        with atomic_dir(run_dir) as tmp:
            pretrain_volume(cfg, tmp)
    return encoder


def finetune_run(manifest: Path, run_dir: Path, *, labelled: int, seed: int, pretrained: Path | None, config: Path,
                 steps: int | None, overrides: Sequence[str]) -> dict[str, Any]:
    """One fine-tuning run (its summary), skipped when run_dir/summary.json exists."""
    from medssl.downstream.segmentation.config import FinetuneSegConfig
    from medssl.downstream.segmentation.task import finetune_seg

    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    extra = [f"train.steps={steps}"] if steps is not None else []
    cfg = load_config(config, FinetuneSegConfig, [f"data.manifest={manifest}", f"seg.labelled_volumes={labelled}",
                                                  f"train.seed={seed}", *extra, *overrides])
    with atomic_dir(run_dir) as tmp:
        summary = finetune_seg(cfg, tmp, pretrained=pretrained, quiet=True)
    return summary


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (cohort, labelled, init): runs, mean, std (ddof 1; 0 for one run), min, max of test_dice_mean."""
    groups: dict[tuple, list[float]] = {}
    for run in runs:
        groups.setdefault((run["cohort"], run["labelled"], run["init"]), []).append(run["test_dice_mean"])
    rows = []
    for (cohort, labelled, init), values in groups.items():
        v = np.asarray(values, dtype=float)
        rows.append({"cohort": cohort, "labelled": labelled, "init": init, "runs": len(v), "dice_mean": float(v.mean()),
                     "dice_std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "dice_min": float(v.min()),
                     "dice_max": float(v.max())})
    return sorted(rows, key=lambda r: (r["cohort"], r["labelled"], INITS.index(r["init"])))


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = textio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows([{k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows])
    return buffer.getvalue()


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """PNG: test Dice (mean +- std over seeds) vs labelled volumes, one curve per init, one panel per cohort."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cohorts = sorted({r["cohort"] for r in rows})
    fig, axes = plt.subplots(1, len(cohorts), figsize=(4.5 * len(cohorts), 3.6), squeeze=False)
    for ax, cohort in zip(axes[0], cohorts):
        for init, marker in zip(INITS, "os"):
            mine = sorted((r for r in rows if r["cohort"] == cohort and r["init"] == init), key=lambda r: r["labelled"])
            if mine:
                ax.errorbar([r["labelled"] for r in mine], [r["dice_mean"] for r in mine],
                            yerr=[r["dice_std"] for r in mine], marker=marker, capsize=3, label=init)
        counts = sorted({r["labelled"] for r in rows if r["cohort"] == cohort})
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_xlabel("labelled training volumes")
        ax.set_ylabel("test Dice (mean over classes)")
        ax.set_title(cohort)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def label_efficiency(out_dir: str | Path, *, cohorts: Sequence[str] = tuple(BENCH_COHORTS), counts: Sequence[int] = COUNTS,
                     seeds: Sequence[int] = SEEDS, steps: int | None = None, pretrain_steps: int | None = None,
                     finetune_config: str | Path = FINETUNE_CONFIG, pretrain_config: str | Path = PRETRAIN_CONFIG,
                     overrides: Sequence[str] = (), pretrain_overrides: Sequence[str] = (),
                     manifests: dict[str, Path] | None = None, pretrained: dict[str, Path] | None = None,
                     quiet: bool = False) -> list[dict[str, Any]]:
    """Run the label-efficiency benchmark (module docstring) and return the summary rows.

    steps / pretrain_steps: fine-tuning / pretraining steps (None: the configs' train.steps);
    overrides / pretrain_overrides: `key=value` for the fine-tuning / pretraining configs (their `model`
    sections must agree); manifests / pretrained: per cohort, an existing manifest / encoder checkpoint
    instead of writing the cohort / pretraining."""
    out = Path(out_dir)
    manifests, pretrained = dict(manifests or {}), dict(pretrained or {})
    if not counts or min(counts) < 1 or not seeds:
        raise UserError(f"counts {list(counts)} / seeds {list(seeds)}: need at least one count >= 1 and one seed")
    runs, tick = [], time.perf_counter()
    for cohort in cohorts:
        manifest = manifests.get(cohort) or make_cohort(cohort, out / "data" / cohort)
        encoder = pretrained.get(cohort) or pretrain_cohort(manifest, out / cohort / "pretrain",
                                                             config=Path(pretrain_config), steps=pretrain_steps,
                                                             overrides=pretrain_overrides)
        for labelled in counts:
            for seed in seeds:
                for init in INITS:
                    summary = finetune_run(manifest, out / cohort / f"{init}_n{labelled}_seed{seed}",
                                           labelled=labelled, seed=seed,
                                           pretrained=encoder if init == "pretrained" else None,
                                           config=Path(finetune_config), steps=steps, overrides=overrides)
                    runs.append({"cohort": cohort, "init": init, "labelled": labelled, "seed": seed,
                                 "labelled_patients": summary["labelled_patients"], "steps": summary["steps"],
                                 "test_dice_mean": summary["test_dice_mean"],
                                 "test_hd95_mean": summary["test_hd95_mean"]})
    rows = summarise(runs)
    budget = f"{runs[0]['steps']} fine-tuning steps, seeds {list(seeds)}"
    write_text(out / "label_efficiency_runs.csv", _csv_text(runs))
    write_text(out / "label_efficiency.csv", _csv_text(rows))
    plot(out / "label_efficiency.png", rows, f"label efficiency ({budget}); error bars: std over seeds")
    write_json(out / "label_efficiency.json", {
        "settings": {"cohorts": list(cohorts), "counts": list(counts), "seeds": list(seeds), "steps": steps,
                     "pretrain_steps": pretrain_steps, "finetune_config": str(finetune_config),
                     "pretrain_config": str(pretrain_config), "overrides": list(overrides),
                     "pretrain_overrides": list(pretrain_overrides),
                     "pretrained": {k: str(v) for k, v in pretrained.items()}},
        "seconds": time.perf_counter() - tick, "summary": rows, "runs": runs})
    if not quiet:
        print_label_efficiency(rows, budget)
        print(f"wrote {out / 'label_efficiency.csv'}, {out / 'label_efficiency.png'}")
    return rows


def print_label_efficiency(rows: list[dict[str, Any]], budget: str) -> None:
    """Table: per cohort and n, scratch and pretrained test Dice (mean +- std) and their difference."""
    by_key = {(r["cohort"], r["labelled"], r["init"]): r for r in rows}
    table = []
    for cohort, labelled in sorted({(r["cohort"], r["labelled"]) for r in rows}):
        cells = [by_key.get((cohort, labelled, init)) for init in INITS]
        shown = [f"{c['dice_mean']:.3f} +- {c['dice_std']:.3f} (n={c['runs']})" if c else "-" for c in cells]
        delta = f"{cells[1]['dice_mean'] - cells[0]['dice_mean']:+.3f}" if all(cells) else "-"
        table.append([cohort, labelled, *shown, delta])
    print_table(f"label efficiency: test Dice ({budget})", ["cohort", "labelled", *INITS, "pretrained - scratch"],
                table)


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
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
