"""`medssl demo`: the main job end to end on the synthetic hospital, about 5 minutes on a 2-core CPU.

Steps: write a 20-patient synthetic hospital (64^3 CT, reports, lesion masks, ECG/PPG), check its manifest,
pretrain a tiny 3D encoder (with the frozen-feature organ probe against its random initialisation),
fine-tune organ segmentation with 2 labelled volumes from the pretrained encoder and from scratch (same
recipe, steps and seed), match one anatomical landmark between two held-out patients with the pretrained
encoder (and the affine baseline), pretrain a signal encoder with four-level contrast and probe the patient
condition on held-out patients, train report grounding (its organ head fine-tuned from the pretrained encoder
on 8 labelled volumes, its finding scorer from the reports) and ground the report of a held-out study (maps
written), then print a summary table and the `medssl app` command that opens the
result. Every run starts from the shipped configs (`medssl config show NAME`) with the demo's budget as
overrides, and writes under the output folder; every number is on *synthetic* data and labelled so.

Lanes: after the store is written, the steps run in up to two processes at once (`LANES`; one on a 1-core
machine), each as soon as the steps it needs are done (segmentation from the pretrained
encoder, the landmark and grounding wait for pretraining; the grounded report for grounding). Each step computes
with one thread and its own seeds, so its figures are the same in either lane or alone (single-threaded
processes sharing a busy core only take turns; they do not slow each other the way two multi-threaded ones do).
With two lanes a step's output goes to ``OUT/logs/<step>.log`` and the console says when each starts and ends.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medssl.config import load_config
from medssl.errors import UserError

console = Console()

PATIENTS = 20  # 12 / 4 / 4 patients in training / validation / test
RUNS = ("pretrain_volume", "finetune_seg", "finetune_seg_scratch", "pretrain_timeseries", "eval_timeseries",
        "grounding", "ground_infer")
LANES = 2  # steps run at once after the store is written (each with one thread)


def _step(title: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    console.rule(f"[bold]{title}")
    tick = time.perf_counter()
    result = fn()
    result["seconds"] = time.perf_counter() - tick
    return result


@dataclass(frozen=True)
class Step:
    """One step of the lanes: results[key] = fn(*args), after the steps `after`; `fn` a module-level function
    (it is sent to a worker process by name)."""

    key: str
    title: str
    fn: Callable[..., dict[str, Any]]
    args: tuple = ()
    after: tuple[str, ...] = ()


def _in_lane(step: Step, log: Path) -> dict[str, Any]:
    """Run `step` in a worker process with one thread, its output to `log`; its result with its seconds."""
    from medssl.threads import pin_figure_threads

    pin_figure_threads()
    with open(log, "w", encoding="utf-8") as handle, contextlib.redirect_stdout(handle), \
            contextlib.redirect_stderr(handle):
        tick = time.perf_counter()
        result = step.fn(*step.args)
    result["seconds"] = time.perf_counter() - tick
    return result


def run_steps(steps: list[Step], lanes: int, logs: Path) -> dict[str, dict[str, Any]]:
    """Every step's result by key: in order in this process (live output) with one lane, else in `lanes` worker
    processes, each step started when a lane is free and its `after` steps are done (in list order among the
    ready ones). A step's error (e.g. a UserError) is raised here once the running steps have ended."""
    if lanes <= 1:
        results: dict[str, dict[str, Any]] = {}
        for step in steps:
            results[step.key] = _step(step.title, lambda: step.fn(*step.args))
        return results
    logs.mkdir(parents=True, exist_ok=True)
    results, pending, running = {}, list(steps), {}  # type: ignore[var-annotated]
    with ProcessPoolExecutor(lanes, mp_context=get_context("spawn")) as pool:
        while pending or running:
            for step in [s for s in pending if all(key in results for key in s.after)][:lanes - len(running)]:
                pending.remove(step)
                console.print(f"[bold]started[/bold] {step.title} (log: {logs / step.key}.log)", soft_wrap=True)
                future: Future = pool.submit(_in_lane, step, logs / f"{step.key}.log")
                running[future] = step
            if not running:
                raise ValueError(f"run_steps: steps wait for steps that never run: {[s.key for s in pending]}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                step = running.pop(future)
                if future.exception() is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise future.exception()  # type: ignore[misc]
                results[step.key] = future.result()
                console.print(f"[bold]done[/bold] {step.title}: {results[step.key]['seconds']:.0f} s", soft_wrap=True)
    return results


def _synth(out: Path) -> dict[str, Any]:
    from medssl.data.synthetic.hospital import make_hospital

    manifest = make_hospital(out / "hospital", patients=PATIENTS, studies=2, size=64, seed=0, progress=True)
    return {"manifest": manifest}


def _check(manifest: Path) -> dict[str, Any]:
    from medssl.data.manifest_check import check_manifest

    problems = check_manifest(manifest, progress=True)
    if problems:
        raise UserError(f"{manifest}: {len(problems)} problem(s), first: {problems[0]}")
    return {"problems": 0}


def _preprocess(manifest: Path) -> dict[str, Any]:
    from medssl.data.store import PreprocessConfig, preprocess_data
    from medssl.threads import available_cores

    data = load_config("pretrain_volume", PreprocessConfig, [f"data.manifest={manifest}"]).data
    return preprocess_data(data, workers=min(2, available_cores()))  # the store pretraining and fine-tuning read


def _pretrain_volume(manifest: Path, run_dir: Path) -> dict[str, Any]:
    from medssl.pretrain.volume import PretrainVolumeConfig, pretrain_volume

    config = load_config("pretrain_volume", PretrainVolumeConfig, [
        f"data.manifest={manifest}", "train.steps=150", "train.batch_size=2", "train.warmup_steps=15",
        "train.checkpoint_every=50", "probe.every=75"])
    return pretrain_volume(config, run_dir)


def _finetune(manifest: Path, encoder: Path | None, run_dir: Path) -> dict[str, Any]:
    from medssl.downstream.segmentation.config import FinetuneSegConfig
    from medssl.downstream.segmentation.task import finetune_seg

    config = load_config("finetune_seg", FinetuneSegConfig, [
        f"data.manifest={manifest}", "train.steps=400", "train.checkpoint_every=100", "seg.labelled_volumes=2",
        "seg.eval_every=200", "seg.overlay_cases=2"])
    return finetune_seg(config, run_dir, pretrained=encoder)


def _match(manifest: Path, encoder: Path, landmark: str = "kidney_left_upper_pole") -> dict[str, Any]:
    """One landmark of the first test patient found in the second's scan (`medssl match`), against the truth."""
    import json

    import numpy as np

    from medssl.correspondence import build_correspondence, match_point

    first, second = [e for e in json.loads(manifest.read_text(encoding="utf-8"))["test"] if e["study_id"] == "S1"][:2]
    a, b = (str(manifest.parent / e["image"]) for e in (first, second))
    point, truth = first["landmarks"][landmark], np.asarray(second["landmarks"][landmark])
    matched, score = match_point(encoder, a, b, point)
    affine, _ = match_point(build_correspondence(None), a, b, point)
    return {"landmark": landmark, "from": Path(a).name, "to": Path(b).name, "point": point, "matched": matched,
            "score": score, "error_mm": float(np.linalg.norm(np.asarray(matched) - truth)),
            "affine_error_mm": float(np.linalg.norm(np.asarray(affine) - truth))}


def _timeseries(manifest: Path, pretrain_dir: Path, eval_dir: Path) -> dict[str, Any]:
    from medssl.downstream.ts_classification import EvalTimeseriesConfig, eval_timeseries
    from medssl.pretrain.timeseries import PretrainTimeseriesConfig, pretrain_timeseries

    data = [f"data.manifest={manifest}", "data.fs=125.0", "data.channels=[ECG, PPG]", "data.window_seconds=4.0",
            "data.stride_seconds=2.0"]
    pretrain = load_config("pretrain_timeseries", PretrainTimeseriesConfig, [
        *data, "train.steps=100", "train.batch_size=32", "train.warmup_steps=10", "train.checkpoint_every=50"])
    summary = pretrain_timeseries(pretrain, pretrain_dir, resume=False)
    evaluation = load_config("eval_timeseries", EvalTimeseriesConfig, [
        *data, "train.steps=50", "train.batch_size=32", "eval.fractions=[1.0]", "eval.modes=[probe]",
        "eval.test_splits=[validation, test]", "eval.bootstrap=500"])
    scores = eval_timeseries(evaluation, eval_dir, pretrained=pretrain_dir / "checkpoints" / "last.pt")
    return {"final_loss": summary["final_loss"], **scores}


def _grounding(manifest: Path, encoder: Path, run_dir: Path) -> dict[str, Any]:
    from medssl.downstream.grounding.config import GroundingConfig
    from medssl.downstream.grounding.task import ground_train

    config = load_config("grounding", GroundingConfig, [
        f"data.manifest={manifest}", "organs.train.steps=600", "organs.seg.eval_every=200", "train.steps=200",
        "train.checkpoint_every=100"])
    return ground_train(config, run_dir, pretrained=encoder)


def _ground_infer(manifest: Path, checkpoint: Path, out_dir: Path) -> dict[str, Any]:
    """Ground every finding of the first held-out study that has one; maps under `out_dir`."""
    from medssl.data.manifest import load_manifest
    from medssl.downstream.grounding.evaluate import eval_studies
    from medssl.downstream.grounding.infer import Grounder, report_phrases, write_results

    study = next((s for s in eval_studies(load_manifest(manifest), "test") if s.lesions), None)
    if study is None:
        raise UserError(f"{manifest}: no test study with a lesion to ground")
    grounder = Grounder.load(checkpoint)
    grounded = grounder.prepare(study.image)
    results = grounder.ground(grounded, report_phrases(study.report), strict=False)
    listing = write_results(grounder, grounded, results, out_dir)
    return {"image": study.image, "phrases": len(listing),
            "grounded": sum(bool(row["groundable"]) for row in listing)}


def run_demo(out: str | Path) -> dict[str, dict[str, Any]]:
    """Run every step under `out` and print the summary; returns each step's results."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another -o")
    if out.exists() and any(out.iterdir()) and not (out / "hospital" / "manifest.json").exists():
        raise UserError(f"{out}: folder exists and is not a previous demo output; choose another -o")
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    results["synth"] = _step(f"1. synthetic hospital ({PATIENTS} patients, 2 CT studies each, reports, ECG/PPG)",
                             lambda: _synth(out))
    manifest = results["synth"]["manifest"]
    results["check"] = _step("2. manifest check", lambda: _check(manifest))
    results["preprocess"] = _step("2b. preprocess the volumes once into the on-disk store",
                                  lambda: _preprocess(manifest))
    for run in RUNS:
        shutil.rmtree(out / run, ignore_errors=True)  # a previous demo's runs: the demo always starts fresh
    encoder = out / "pretrain_volume" / "encoder.pt"
    steps = [
        Step("pretrain_volume", "3. 3D pretraining (anatomical consistency, multi-level contrast)", _pretrain_volume,
             (manifest, out / "pretrain_volume")),
        Step("finetune_seg_scratch", "4b. organ segmentation, 2 labelled volumes: from scratch (same recipe)",
             _finetune, (manifest, None, out / "finetune_seg_scratch")),
        Step("grounding", "6. report grounding: organ head from the pretrained encoder (8 labelled volumes), "
             "finding scorer from reports only", _grounding, (manifest, encoder, out / "grounding"),
             ("pretrain_volume",)),
        Step("finetune_seg", "4a. organ segmentation, 2 labelled volumes: from the pretrained encoder", _finetune,
             (manifest, encoder, out / "finetune_seg"), ("pretrain_volume",)),
        Step("timeseries", "5. signal pretraining (four levels) and patient-level condition probe", _timeseries,
             (manifest, out / "pretrain_timeseries", out / "eval_timeseries")),
        Step("match", "4c. one landmark found in another patient's scan (pretrained encoder vs affine)", _match,
             (manifest, encoder), ("pretrain_volume",)),
        Step("ground_infer", "7. ground a held-out study's report (maps written)", _ground_infer,
             (manifest, out / "grounding" / "grounding.pt", out / "ground_infer"), ("grounding",)),
    ]
    from medssl.threads import available_cores

    shutil.rmtree(out / "logs", ignore_errors=True)
    results.update(run_steps(steps, min(LANES, available_cores()), out / "logs"))
    results["total"] = {"seconds": time.perf_counter() - start}
    _print_summary(out, results)
    return results


def _print_summary(out: Path, results: dict[str, dict[str, Any]]) -> None:
    table = Table(title="medssl demo: synthetic hospital, every number is on synthetic data")
    for column in ("step", "result (what the number is)", "seconds"):
        table.add_column(column)
    pre = results["pretrain_volume"]
    table.add_row("synthetic hospital", f"{PATIENTS} patients -> {results['synth']['manifest']}",
                  f"{results['synth']['seconds']:.0f}")
    table.add_row("manifest check", "0 problems", f"{results['check']['seconds']:.0f}")
    store = results["preprocess"]
    table.add_row("preprocess", f"{store['scans']} scans in {store['store']}", f"{store['seconds']:.0f}")
    table.add_row("3D pretraining", f"organ probe Dice {pre['final_probe_dice']:.3f} vs {pre['init_probe_dice']:.3f} "
                  "at random init (linear probe on frozen features, validation volumes)", f"{pre['seconds']:.0f}")
    for key, label in (("finetune_seg", "pretrained"), ("finetune_seg_scratch", "scratch")):
        seg = results[key]
        table.add_row(f"segmentation, {label}", f"test Dice {seg['test_dice_mean']:.3f} (mean over 9 organs of the "
                      "held-out patients; 2 labelled volumes, 400 steps)", f"{seg['seconds']:.0f}")
    match = results["match"]
    table.add_row("anatomy across patients", f"{match['landmark']} of {match['from']} found in {match['to']} at "
                  f"({', '.join(f'{v:.0f}' for v in match['matched'])}) mm, {match['error_mm']:.0f} mm from the "
                  f"truth (cosine {match['score']:.2f}; affine registration {match['affine_error_mm']:.0f} mm)",
                  f"{match['seconds']:.0f}")
    ts = results["timeseries"]
    auroc, low, high = (ts.get(f"probe_frac100_patient_auroc{s}") for s in ("", "_ci_low", "_ci_high"))
    interval = f" [{low:.2f}-{high:.2f}]" if low is not None and high is not None else ""
    table.add_row("signals: pretraining + probe", "condition AUROC per held-out patient "
                  f"{'n/a' if auroc is None else f'{auroc:.3f}'}{interval} (95 % bootstrap)", f"{ts['seconds']:.0f}")
    ground = results["grounding"]
    table.add_row("report grounding", f"lesion pointing game {ground.get('test_lesion_report_pointing_game', 0):.2f} "
                  f"(report wording; unseen wording {ground.get('test_lesion_unseen_pointing_game', 0):.2f}), hit rate "
                  f"{ground.get('test_lesion_report_hit', 0):.2f}, organ pointing game "
                  f"{ground.get('test_organ_report_pointing_game', 0):.2f} (organ head Dice "
                  f"{ground.get('organ_head_test_dice_mean') or 0:.2f}), absent/present balanced accuracy "
                  f"{ground.get('test_call_report_balanced_accuracy', 0):.2f} (held-out patients)",
                  f"{ground['seconds']:.0f}")
    infer = results["ground_infer"]
    table.add_row("grounded report", f"{infer['grounded']} of {infer['phrases']} statements grounded in "
                  f"{infer['image'].name}; maps in {out / 'ground_infer'}", f"{infer['seconds']:.0f}")
    table.add_row("total (wall clock; steps ran in two lanes where the cores allowed)", "",
                  f"{results['total']['seconds']:.0f}")
    console.print(table)
    for line in (f"outputs under {out}; training curves: tensorboard --logdir {out}",
                 f"open the result in the clinician app: medssl app {out / 'grounding'} --data-root {out}"):
        console.print(line, soft_wrap=True, markup=False, highlight=False)  # never wrap a command or a path
