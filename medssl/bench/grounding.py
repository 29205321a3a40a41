"""Grounding benchmarks: `medssl bench grounding` (ours vs baselines over seeds) and `grounding-speed`.

`grounding_benchmark`, with the same config, budget and seeds, on held-out patients of the cohort:
- trained runs per seed: "ours" (`ground train` with the encoder pretrained by `medssl pretrain volume` on the
  cohort's training volumes: the organ head is fine-tuned from it) and "random_init" (the same from a randomly
  initialised encoder: does pretraining help grounding?);
- baselines evaluated with each "ours" model, so that they see the same held-out cases: "untrained" (our organ
  head with the finding scorer at its untrained start: the organ-normalised anomaly score, calibrated on its
  own), "oracle_organs" (the true organ masks instead of the organ head's: the where-oracle),
  "oracle_untrained" (true organs and the untrained score: no learning at all) and "atlas" (a training-label
  atlas of the organ head's labelled volumes instead of the organ head, `baselines.LabelAtlas`).
With `run` (a finished `ground train` folder), "ours" is that run's model evaluated again by this code and
the baselines are evaluated with its organ head, on its manifest and seed (no training).
Each run's folder is written atomically and skipped when it exists, so an interrupted benchmark resumes.
Results: grounding_runs.csv (one row per run), grounding.csv (mean and standard deviation over seeds),
grounding.md (the README table) and the paired difference ours - random_init per seed with a 95 % t interval.
"""

from __future__ import annotations

import csv
import io as textio
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from medssl.atomic import atomic_dir, write_json, write_text
from medssl.bench.report import print_table
from medssl.config import load_config
from medssl.errors import UserError

GROUNDING_CONFIG = Path("configs/grounding.yaml")
PRETRAIN_CONFIG = Path("configs/pretrain_volume.yaml")
TRAINED = ("ours", "random_init")
BASELINES = ("untrained", "oracle_organs", "oracle_untrained", "atlas")
# (summary key, column title) of the README table
COLUMNS = (("test_lesion_report_pointing_game", "lesion pointing (report)"),
           ("test_lesion_report_hit", "hit (report)"), ("test_lesion_report_dice", "Dice (report)"),
           ("test_lesion_heldout_pointing_game", "pointing (held-out grammar)"),
           ("test_lesion_unseen_pointing_game", "pointing (unseen words)"),
           ("test_lesion_report_lung_pointing_game", "lung nodules pointing"),
           ("test_lesion_report_miou", "mIoU"), ("test_lesion_report_cnr", "CNR"),
           ("test_organ_report_pointing_game", "organ pointing"), ("test_organ_unseen_pointing_game",
                                                                    "organ pointing (unseen)"),
           ("test_organ_report_dice", "organ Dice"),
           ("test_call_report_balanced_accuracy", "absent/present"),
           ("test_call_unseen_balanced_accuracy", "absent/present (unseen)"),
           ("test_follow_up_report_pointing_game", "follow-up pointing"),
           ("test_swap_mean_map_change", "swap change"))
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _pretrain(manifest: Path, run_dir: Path, steps: int) -> Path:
    """The cohort's pretrained encoder (pretrained now unless run_dir/encoder.pt exists)."""
    from medssl.pretrain.volume import PretrainVolumeConfig, pretrain_volume

    encoder = run_dir / "encoder.pt"
    if not encoder.exists():
        config = load_config(PRETRAIN_CONFIG, PretrainVolumeConfig, [f"data.manifest={manifest}", "probe.enabled=false",
                                                                    f"train.steps={steps}", "train.batch_size=4"])
        with atomic_dir(run_dir) as tmp:
            pretrain_volume(config, tmp)
    return encoder


def _cached(path: Path, compute) -> dict[str, Any]:
    """summary.json of a folder, computed (and written atomically with the folder) unless it exists."""
    if (path / "summary.json").exists():
        return json.loads((path / "summary.json").read_text(encoding="utf-8"))
    tick = time.perf_counter()
    with atomic_dir(path) as tmp:
        summary = compute(tmp)
        summary["seconds"] = time.perf_counter() - tick
        write_json(tmp / "summary.json", summary)
    return summary


def _train(config_path: Path, manifest: Path, run_dir: Path, *, seed: int, pretrained: Path | None,
           overrides: Sequence[str]) -> dict[str, Any]:
    from medssl.downstream.grounding.config import GroundingConfig
    from medssl.downstream.grounding.task import ground_train

    config = load_config(config_path, GroundingConfig, [f"data.manifest={manifest}", f"train.seed={seed}",
                                                        f"organs.train.seed={seed}", *overrides])
    return _cached(run_dir, lambda tmp: ground_train(config, tmp, pretrained=pretrained, quiet=True))


def _baselines(model_dir: Path, out: Path, seed: int, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The baselines' summaries on the held-out split of the run in `model_dir` ("ours": its model as it is)."""
    from medssl.data.manifest import load_manifest
    from medssl.downstream.grounding.baselines import LabelAtlas, TrueOrgans, volume_pairs
    from medssl.downstream.grounding.config import GroundingConfig
    from medssl.downstream.grounding.evaluate import calibrate, eval_studies, evaluate
    from medssl.downstream.grounding.infer import Grounder
    from medssl.downstream.grounding.task import organ_head_entries

    config = load_config(model_dir / "config.yaml", GroundingConfig, [])
    manifest = load_manifest(config.data.manifest)
    trained = Grounder.load(model_dir / "grounding.pt")
    results = {}
    for name in names:
        def compute(tmp: Path, name: str = name) -> dict[str, Any]:
            grounder = trained
            if name in ("untrained", "oracle_untrained"):  # its own not-found threshold, from reports
                grounder = trained.untrained()
                calibration = calibrate(grounder, eval_studies(manifest, config.eval.calibration_split),
                                        per_study=config.eval.calibration_per_study, seed=seed)
                grounder.settings = replace(grounder.settings, threshold=calibration["threshold"])
            where = None
            if name.startswith("oracle"):
                where = TrueOrgans(grounder)
            elif name == "atlas":
                where = LabelAtlas.fit(grounder, volume_pairs(organ_head_entries(config, manifest), manifest))
            scores, _ = evaluate(grounder, manifest, config.eval.split, absent_per_study=config.eval.absent_per_study,
                                 swap_per_study=config.eval.swap_per_study, seed=seed, where=where)
            return {f"test_{k}": v for k, v in scores.items()}
        results[name] = _cached(out / f"{name}_seed{seed}", compute)
    return results


def _table_rows(runs: list[dict[str, Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        row: dict[str, Any] = {"variant": variant, "runs": len(mine)}
        for key, _ in COLUMNS:
            values = [float(r[key]) for r in mine if r.get(key) is not None and math.isfinite(float(r[key]))]
            row[f"{key}_mean"] = statistics.mean(values) if values else float("nan")
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def paired_difference(runs: list[dict[str, Any]], key: str, a: str = "ours", b: str = "random_init"
                      ) -> dict[str, float]:
    """Mean over seeds of runs[a][key] - runs[b][key] with its 95 % t interval (seeds present in both)."""
    by_seed = {(r["variant"], r["seed"]): r.get(key) for r in runs}
    diffs = [float(by_seed[(a, s)]) - float(by_seed[(b, s)]) for v, s in by_seed if v == a and (b, s) in by_seed
             and by_seed[(a, s)] is not None and by_seed[(b, s)] is not None]
    if not diffs:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "seeds": 0}
    mean = statistics.mean(diffs)
    half = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 \
        else float("nan")
    return {"mean": mean, "low": mean - half, "high": mean + half, "seeds": len(diffs)}


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = textio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def markdown(rows: list[dict[str, Any]], differences: dict[str, dict[str, float]]) -> str:
    """The README table (mean ± std over seeds per variant) and the paired differences."""
    head = "| variant | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    for row in rows:
        cells = [f"{row[f'{k}_mean']:.2f} ± {row[f'{k}_std']:.2f}" for k, _ in COLUMNS]
        lines.append(f"| {row['variant']} ({row['runs']} seeds) | " + " | ".join(cells) + " |")
    lines += ["", "| ours - random_init (paired over seeds) | mean | 95 % interval |", "|---|---|---|"]
    for key, title in COLUMNS:
        d = differences[key]
        lines.append(f"| {title} | {d['mean']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] |")
    return "\n".join(lines) + "\n"


def grounding_benchmark(out_dir: str | Path, *, seeds: Sequence[int] = (0, 1, 2), manifest: Path | None = None,
                        patients: int = 60, pretrained: Path | None = None, pretrain_steps: int = 400,
                        variants: Sequence[str] | None = None, config: Path = GROUNDING_CONFIG,
                        overrides: Sequence[str] = (), run: Path | None = None) -> list[dict[str, Any]]:
    """Run the benchmark (module docstring) under `out_dir`; returns the summary rows. variants: default all (with
    `run`: all but random_init, which trains its own run)."""
    known = TRAINED + BASELINES
    if variants is None:
        variants = tuple(v for v in known if run is None or v != "random_init")
    unknown = [v for v in variants if v not in known]
    if unknown or not seeds:
        raise UserError(f"--variant: {unknown or 'none'} (known: {', '.join(known)}); give at least one seed")
    out = Path(out_dir)
    if run is not None:
        return _on_run(Path(run), out, variants)
    for given, what in ((manifest, "manifest"), (pretrained, "pretrained encoder")):
        if given is not None and not Path(given).is_file():
            raise UserError(f"{given}: no such {what} file")
    if manifest is None:
        from medssl.data.synthetic.cohorts import write_cohort

        manifest = out / "hospital" / "manifest.json"
        if not manifest.exists():
            write_cohort("hospital", out / "hospital", patients=patients, studies=2, size=64, seed=0)
    baselines = [v for v in variants if v in BASELINES]
    needs_encoder = "ours" in variants or bool(baselines)
    encoder = pretrained or (_pretrain(manifest, out / "pretrain", pretrain_steps) if needs_encoder else None)
    runs = []
    for seed in seeds:
        summaries = {}
        for variant in (v for v in TRAINED if v in variants or (v == "ours" and baselines)):
            summaries[variant] = _train(config, manifest, out / f"{variant}_seed{seed}", seed=seed,
                                        pretrained=encoder if variant == "ours" else None, overrides=overrides)
        if baselines:
            summaries.update(_baselines(out / f"ours_seed{seed}", out, seed, baselines))
        runs += _run_rows(summaries, seed, variants)
    return _write_tables(out, runs, [v for v in known if v in variants])


def _on_run(run: Path, out: Path, variants: Sequence[str]) -> list[dict[str, Any]]:
    """The baselines evaluated with a finished grounding run's organ head; "ours" is the run's model itself."""
    if not (run / "grounding.pt").is_file() or not (run / "config.yaml").is_file():
        raise UserError(f"{run}: not a finished 'ground train' run (no grounding.pt and config.yaml)")
    if "random_init" in variants:
        raise UserError("--variant random_init: trains its own run; it cannot be given with --run")
    from medssl.downstream.grounding.config import GroundingConfig

    seed = load_config(run / "config.yaml", GroundingConfig, []).train.seed
    summaries = _baselines(run, out, seed, [v for v in ("ours", *BASELINES) if v in variants])
    return _write_tables(out, _run_rows(summaries, seed, variants), [v for v in TRAINED + BASELINES if v in variants])


def _run_rows(summaries: dict[str, dict[str, Any]], seed: int, variants: Sequence[str]) -> list[dict[str, Any]]:
    """One row per asked variant of one seed: its table columns and seconds."""
    return [{"variant": v, "seed": seed, **{k: s.get(k) for k, _ in COLUMNS}, "seconds": s.get("seconds")}
            for v, s in summaries.items() if v in variants]


def _write_tables(out: Path, runs: list[dict[str, Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    rows = _table_rows(runs, variants)
    differences = {key: paired_difference(runs, key) for key, _ in COLUMNS}
    write_text(out / "grounding_runs.csv", _csv(runs))
    write_text(out / "grounding.csv", _csv(rows))
    write_text(out / "grounding.md", markdown(rows, differences))
    print_table("report grounding on held-out patients (synthetic hospital), mean over seeds",
                ["variant", *(title for _, title in COLUMNS)],
                [[r["variant"], *(r[f"{k}_mean"] for k, _ in COLUMNS)] for r in rows])
    return rows


def grounding_speed(checkpoint: Path, image: Path, report: Path, *, repeats: int = 3) -> dict[str, float]:
    """Seconds to ground one phrase in one volume (organ head pass included), and for a whole report whose
    phrases share one pass; the model is loaded (and MiniLM, when the report needs it) before timing."""
    from medssl.downstream.grounding.infer import Grounder, read_report

    grounder = Grounder.load(checkpoint)
    phrases = read_report(report)
    grounder.ground(grounder.prepare(image), phrases, strict=False)  # warm-up
    one, whole = [], []
    for _ in range(repeats):
        tick = time.perf_counter()
        grounder.ground(grounder.prepare(image), phrases[:1], strict=False)
        one.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        grounder.ground(grounder.prepare(image), phrases, strict=False)
        whole.append(time.perf_counter() - tick)
    figures = {"seconds_one_phrase": min(one), "report_phrases": len(phrases),
               "seconds_whole_report": min(whole), "phrases_per_s_report": len(phrases) / min(whole)}
    print_table(f"grounding speed ({image.name}, best of {repeats})", ["figure", "value"],
                [[k, v] for k, v in figures.items()])
    return figures
