"""Grounding benchmarks: `medssl bench grounding` (ours vs baselines over seeds), `grounding-speed` and
`grounding-ceiling` (a supervised probe on the frozen features: how far they can point at all).

`grounding_benchmark` trains, with the same config, budget and seeds:
- "ours": the grounding heads on the encoder pretrained by `medssl pretrain volume` on the cohort's
  training volumes, every alignment objective on;
- "random_init": the same heads and objectives on a randomly initialised encoder, trained at the full
  learning rate (`grounding.encoder_lr_scale=1`: a random encoder has everything to learn);
- "global_only": the pretrained encoder with the global report-volume objective alone (no local,
  anatomical or prior terms);
and collects each run's evaluation (held-out patients of the synthetic hospital; seen vs held-out
phrasings; the controls). Each run directory is written atomically and skipped when it exists, so an
interrupted benchmark resumes. Results: grounding_runs.csv (one row per run), grounding.csv (mean and
standard deviation over seeds per variant) and grounding.md (the README table).
"""

from __future__ import annotations

import csv
import io as textio
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medssl.atomic import atomic_dir, write_json, write_text
from medssl.bench.report import print_table
from medssl.config import load_config
from medssl.errors import UserError

GROUNDING_CONFIG = Path("configs/grounding.yaml")
PRETRAIN_CONFIG = Path("configs/pretrain_volume.yaml")
VARIANTS: dict[str, tuple[bool, list[str]]] = {  # name -> (pretrained encoder?, config overrides)
    "ours": (True, []),
    "random_init": (False, ["grounding.encoder_lr_scale=1.0"]),
    "global_only": (True, ["objectives.local.weight=0", "objectives.anatomy.weight=0", "objectives.prior.weight=0"]),
}
# (summary key, column title) of the README table
COLUMNS = (("test_lesion_seen_pointing_game", "pointing (seen)"),
           ("test_lesion_heldout_pointing_game", "pointing (held-out)"), ("test_lesion_heldout_hit", "hit (held-out)"),
           ("test_lesion_heldout_dice", "Dice (held-out)"),
           ("test_lesion_heldout_miou", "mIoU (held-out)"), ("test_lesion_heldout_cnr", "CNR (held-out)"),
           ("test_lesion_heldout_mass_inside", "mass inside (held-out)"),
           ("test_organ_heldout_pointing_game", "organ pointing (held-out)"),
           ("test_groundable_call_accuracy", "not-groundable call"), ("test_swap_mean_map_change", "swap change"),
           ("random_lesion_all_pointing_game", "randomised pointing"))


def _pretrain(manifest: Path, run_dir: Path, steps: int, overrides: Sequence[str]) -> Path:
    """The cohort's pretrained encoder (pretrained now unless run_dir/encoder.pt exists)."""
    from medssl.pretrain.volume import PretrainVolumeConfig, pretrain_volume

    encoder = run_dir / "encoder.pt"
    if not encoder.exists():
        config = load_config(PRETRAIN_CONFIG, PretrainVolumeConfig, [f"data.manifest={manifest}", "probe.enabled=false",
                                                                    f"train.steps={steps}", *overrides])
        with atomic_dir(run_dir) as tmp:
            pretrain_volume(config, tmp)
    return encoder


def _run(config_path: Path, manifest: Path, run_dir: Path, *, seed: int, pretrained: Path | None,
         overrides: Sequence[str]) -> dict[str, Any]:
    """One grounding run's summary (trained now unless run_dir/summary.json exists)."""
    from medssl.downstream.grounding.config import GroundingConfig
    from medssl.downstream.grounding.task import ground_train

    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text(encoding="utf-8"))
    config = load_config(config_path, GroundingConfig, [f"data.manifest={manifest}", f"train.seed={seed}", *overrides])
    tick = time.perf_counter()
    with atomic_dir(run_dir) as tmp:
        summary = ground_train(config, tmp, pretrained=pretrained, quiet=True)
        summary["seconds"] = time.perf_counter() - tick
        write_json(tmp / "summary.json", summary)
    return summary


def _table_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        row: dict[str, Any] = {"variant": variant, "runs": len(mine)}
        for key, _ in COLUMNS:
            values = [float(r[key]) for r in mine if r.get(key) is not None]
            row[f"{key}_mean"] = statistics.mean(values) if values else float("nan")
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = textio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def markdown(rows: list[dict[str, Any]]) -> str:
    """The README table: one row per variant, mean ± std over seeds of each column."""
    head = "| variant | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    for row in rows:
        cells = [f"{row[f'{k}_mean']:.2f} ± {row[f'{k}_std']:.2f}" for k, _ in COLUMNS]
        lines.append(f"| {row['variant']} ({row['runs']} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def grounding_benchmark(out_dir: str | Path, *, seeds: Sequence[int] = (0, 1, 2), manifest: Path | None = None,
                        patients: int = 60, pretrained: Path | None = None, pretrain_steps: int = 400,
                        variants: Sequence[str] = tuple(VARIANTS), config: Path = GROUNDING_CONFIG,
                        overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Run the benchmark (module docstring) under `out_dir`; returns the summary rows."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not seeds:
        raise UserError(f"--variant: {unknown or 'none'} (known: {', '.join(VARIANTS)}); give at least one seed")
    out = Path(out_dir)
    for given, what in ((manifest, "manifest"), (pretrained, "pretrained encoder")):
        if given is not None and not Path(given).is_file():
            raise UserError(f"{given}: no such {what} file")
    if manifest is None:
        from medssl.data.synthetic.cohorts import write_cohort

        manifest = out / "hospital" / "manifest.json"
        if not manifest.exists():
            write_cohort("hospital", out / "hospital", patients=patients, studies=2, size=64, seed=0)
    encoder = pretrained or _pretrain(manifest, out / "pretrain", pretrain_steps, [])
    runs = []
    for seed in seeds:
        for variant in variants:
            uses_encoder, extra = VARIANTS[variant]
            summary = _run(config, manifest, out / f"{variant}_seed{seed}", seed=seed,
                           pretrained=encoder if uses_encoder else None, overrides=[*extra, *overrides])
            runs.append({"variant": variant, "seed": seed, **{k: summary.get(k) for k, _ in COLUMNS},
                         "seconds": summary.get("seconds"), "steps": summary.get("steps")})
    rows = _table_rows(runs)
    write_text(out / "grounding_runs.csv", _csv(runs))
    write_text(out / "grounding.csv", _csv(rows))
    write_text(out / "grounding.md", markdown(rows))
    print_table("report grounding on held-out patients (synthetic hospital), mean over seeds",
                ["variant", *(title for _, title in COLUMNS)],
                [[r["variant"], *(r[f"{k}_mean"] for k, _ in COLUMNS)] for r in rows])
    return rows


def grounding_speed(checkpoint: Path, image: Path, report: Path, *, repeats: int = 3) -> dict[str, float]:
    """Seconds to ground one phrase in one volume (image pass included), and phrases per second for a
    whole report whose phrases share one image pass; the model is loaded once, before timing."""
    from medssl.downstream.grounding.infer import Grounder, read_report

    grounder = Grounder.load(checkpoint)
    phrases = read_report(report)
    grounder.ground(grounder.prepare(image), phrases[:1])  # warm-up
    one, whole = [], []
    for _ in range(repeats):
        tick = time.perf_counter()
        grounder.ground(grounder.prepare(image), phrases[:1])
        one.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        grounder.ground(grounder.prepare(image), phrases)
        whole.append(time.perf_counter() - tick)
    figures = {"seconds_one_phrase": min(one), "report_phrases": len(phrases),
               "seconds_whole_report": min(whole), "phrases_per_s_report": len(phrases) / min(whole)}
    print_table(f"grounding speed ({image.name}, best of {repeats})", ["figure", "value"],
                [[k, v] for k, v in figures.items()])
    return figures


def feature_ceiling(manifest: Path, pretrained: Path | None, *, config: Path = GROUNDING_CONFIG,
                    seed: int = 0) -> dict[str, float]:
    """How well the frozen encoder features the grounding head reads can point at lesions *with* labels: a
    class-balanced logistic regression (scikit-learn) on them, fitted on the lesion masks of two thirds of
    the training patients and scored on the other third: lesion-vs-body AUROC per cell of the feature grid (a
    cell is a lesion cell when any of its voxels is) and the pointing game of its top body cell per study
    with a lesion. A head trained from reports alone on the same features is not expected to beat it."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from medssl.data import io
    from medssl.data.manifest import load_manifest
    from medssl.downstream.grounding.config import GroundingConfig
    from medssl.downstream.grounding.data import grid_body
    from medssl.downstream.grounding.task import prepare

    cfg = load_config(config, GroundingConfig, [f"data.manifest={manifest}", "grounding.encoder_lr_scale=0"])
    ready = prepare(cfg, pretrained)
    masks = {str(ready.manifest.path(e.image)): ready.manifest.path(e.lesion_mask)
             for e in load_manifest(manifest).split(cfg.train_split) if e.image and e.lesion_mask}
    stride = cfg.grounding.feature_stride
    features, targets, patients, studies = [], [], [], []
    for k, study in enumerate(s for s in ready.studies if str(s.image_path) in masks):
        lesion = io.read_volume(masks[str(study.image_path)], label=True).array > 0
        on_grid = torch.nn.functional.max_pool3d(torch.from_numpy(lesion).float()[None, None], stride)[0, 0] > 0
        body = grid_body(study.body, stride).numpy()
        features.append(study.features.float().numpy()[:, body].T)
        targets.append(on_grid.numpy()[body])
        patients += [study.patient_id] * int(body.sum())
        studies += [k] * int(body.sum())
    if not features:
        raise UserError(f"{manifest}: no '{cfg.train_split}' study with a lesion mask")
    x, y, patients, studies = (np.concatenate(features), np.concatenate(targets), np.asarray(patients),
                               np.asarray(studies))
    rng = np.random.default_rng(seed)
    names = np.unique(patients)
    held_out = np.isin(patients, rng.choice(names, max(1, len(names) // 3), replace=False))
    fit = np.flatnonzero(~held_out)
    fit = np.union1d(rng.choice(fit, min(len(fit), 60_000), replace=False), fit[y[fit]])  # every lesion voxel
    score = LogisticRegression(max_iter=2000, class_weight="balanced").fit(x[fit], y[fit]).decision_function(
        x[held_out])
    y_test, study_test = y[held_out], studies[held_out]
    with_lesion = [k for k in np.unique(study_test) if y_test[study_test == k].any()]
    if not with_lesion or y_test.all() or not y_test.any():
        raise UserError(f"{manifest}: the held-out third of the training patients has no lesion to score; use a "
                        "larger cohort")
    hits = sum(bool(y_test[study_test == k][np.argmax(score[study_test == k])]) for k in with_lesion)
    figures = {"auroc_lesion_voxels": float(roc_auc_score(y_test, score)), "pointing_game": hits / len(with_lesion),
               "studies_with_lesion": len(with_lesion), "lesion_share_of_body": float(y.mean()),
               "feature_channels": int(x.shape[1])}
    print_table("supervised linear probe on the frozen grounding features (held-out training patients)",
                ["figure", "value"], [[k, v] for k, v in figures.items()])
    return figures
