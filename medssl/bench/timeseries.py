"""Time-series benchmarks: step throughput of one pair of views vs per-level re-encoding; label efficiency.

`throughput`: a full pretraining step (views, encoder, four-level loss, backward, AdamW step) on the
same encoder and the same batch, in two implementations:
- ours: one pair of views, both encoded in ONE batched call, every level on the same outputs;
- per-level (the reference code's structure): for each active level, the two views are encoded again
  (two encoder calls per level, 8 for four levels) and only that level's loss is computed on them.
Each implementation runs in its own fresh Python process so that its peak memory is its own: on a GPU
`torch.cuda.max_memory_allocated`; on a CPU the growth of the process's peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) over the step loop. Both also report the bytes of
tensors saved for backward in one step (`torch.autograd.graph.saved_tensors_hooks`), which does not
depend on the allocator. Inputs are random signals with the config's window, channels and
patient x trial x sample batch layout (the speed of a step does not depend on the signal values).

`label_efficiency`: four-level pretraining vs two-level (observation + sample, TS2Vec-like) vs
scratch, evaluated with `eval_timeseries` at every label fraction, for several seeds, with the same
pretraining steps for both pretrained variants and the same fine-tuning budget for all three.
"""

from __future__ import annotations

import csv
import json
import math
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from medssl.atomic import atomic_path
from medssl.bench.report import print_table
from medssl.config import TrainConfig
from medssl.errors import UserError
from medssl.losses.hierarchical import LEVELS, HierarchicalContrast, HierarchyConfig, LevelConfig
from medssl.pretrain.timeseries import (
    HierarchicalObjective,
    PretrainTimeseriesConfig,
    TimeseriesPretrainer,
    ViewConfig,
    make_views,
    pretrain_timeseries,
)
from medssl.seeding import torch_generator
from medssl.training.loop import StepOutput

if TYPE_CHECKING:  # scikit-learn (imported by the evaluation) is only needed by label_efficiency
    from medssl.downstream.ts_classification import EvalTimeseriesConfig



# ------------------------------------------------------------------------------------------------ throughput


class PerLevelObjective:
    """The reference structure: each active level encodes the two views itself (2 encoder calls per level)."""

    def __init__(self, views: ViewConfig, objectives: HierarchyConfig):
        self.views = views
        off = LevelConfig(weight=0.0)
        self.levels = {level: HierarchicalContrast(objectives.model_copy(
            update={other: getattr(objectives, level) if other == level else off for other in LEVELS}))
            for level in objectives.active}

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> StepOutput:
        views = make_views(batch["x"], self.views, generator)
        x_a, x_b = views.x.chunk(2)
        m_a, m_b = views.mask.chunk(2)
        total, terms = 0.0, {}
        for level, loss_fn in self.levels.items():
            z_a, z_b = views.aligned(torch.cat([model(x_a, m_a), model(x_b, m_b)]))
            loss, level_terms = loss_fn(z_a, z_b, batch["sample"], batch["trial"], batch["patient"])
            total = total + loss
            terms[level] = level_terms[level]
        return StepOutput(loss=total, terms=terms, items=batch["x"].shape[0])


def random_batch(config: PretrainTimeseriesConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random windows (B, C, W) with patient-major IDs: P patients x R trials x S windows."""
    p, r, s = config.sampler.patients, config.sampler.trials, config.samples_per_trial
    window, _ = config.data.window_samples()
    g = torch_generator(seed, 0)
    index = torch.arange(p * r * s)
    return {"x": torch.randn(p * r * s, config.model.in_channels, window, generator=g),
            "sample": index, "trial": index // s, "patient": index // (r * s)}


def _measure(implementation: str, config_json: str, steps: int, warmup: int, device: str, seed: int,
             threads: int | None) -> dict[str, Any]:
    """Run `steps` timed training steps of one implementation in this (fresh) process; for "one_pair" also the
    step's breakdown (`_breakdown`)."""
    if threads is not None:
        torch.set_num_threads(threads)
    config = PretrainTimeseriesConfig.model_validate_json(config_json)
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = TimeseriesPretrainer(config.model, config.objectives).to(dev)
    objective = (HierarchicalObjective(config.views) if implementation == "one_pair"
                 else PerLevelObjective(config.views, config.objectives))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr)
    batch = {k: v.to(dev) for k, v in random_batch(config, seed).items()}
    calls = []
    model.encoder.register_forward_hook(lambda *args: calls.append(1))

    def step(i: int) -> None:
        out = objective(model, batch, torch_generator(seed, i, device=dev))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    saved = _saved_bytes(lambda: objective(model, batch, torch_generator(seed, 0, device=dev)))
    optimizer.zero_grad(set_to_none=True)
    calls.clear()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tick, cpu = time.perf_counter(), time.process_time()
    for i in range(warmup, warmup + steps):
        step(i)
    _sync(dev)
    seconds, cpu_seconds = time.perf_counter() - tick, time.process_time() - cpu
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    else:  # ru_maxrss is in KiB on Linux, bytes on macOS
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        peak = grown / 2**20 if sys.platform == "darwin" else grown / 2**10
    result = {"windows_per_s": batch["x"].shape[0] * steps / seconds, "step_ms": 1000 * seconds / steps,
              "cpu_ms_per_step": 1000 * cpu_seconds / steps, "torch_threads": torch.get_num_threads(),
              "peak_mib": peak, "saved_for_backward_mib": saved / 2**20, "encoder_calls_per_step": len(calls) / steps}
    if implementation == "one_pair":
        result["breakdown_ms"] = _breakdown(model, optimizer, config, batch, seed, dev)
    return result


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _breakdown(model: TimeseriesPretrainer, optimizer: torch.optim.Optimizer, config: PretrainTimeseriesConfig,
               batch: dict[str, torch.Tensor], seed: int, dev: torch.device) -> dict[str, float]:
    """Milliseconds of the parts of one step of ours (one pair of views), each timed alone: the views and the
    encoder's forward pass; each level's loss, forward and backward, on the encoder's outputs (that level alone,
    as `PerLevelObjective` builds it); the encoder's backward pass; the optimiser step. On a CPU the process's CPU
    time (what other jobs on the machine change least), on a GPU the wall clock."""
    clock = time.process_time if dev.type == "cpu" else time.perf_counter

    def timed(fn) -> tuple[float, Any]:
        _sync(dev)
        tick = clock()
        out = fn()
        _sync(dev)
        return 1000 * (clock() - tick), out

    parts: dict[str, float] = {}
    generator = torch_generator(seed, 10**6, device=dev)
    parts["views + encoder forward"], (views, z) = timed(lambda: _encoded(model, batch, config.views, generator))
    for level, loss_fn in PerLevelObjective(config.views, config.objectives).levels.items():
        leaf = z.detach().requires_grad_()
        parts[f"{level} level (loss forward + backward)"], _ = timed(
            lambda: loss_fn(*views.aligned(leaf), batch["sample"], batch["trial"], batch["patient"])[0].backward())
    parts["encoder backward"], _ = timed(lambda: z.backward(torch.ones_like(z)))
    parts["optimiser step"], _ = timed(optimizer.step)
    optimizer.zero_grad(set_to_none=True)
    return parts


def _encoded(model: TimeseriesPretrainer, batch: dict[str, torch.Tensor], views: ViewConfig,
             generator: torch.Generator) -> tuple[Any, torch.Tensor]:
    made = make_views(batch["x"], views, generator)
    return made, model(made.x, made.mask)


def _measure_comet(comet_dir: str, config_json: str, steps: int, warmup: int, device: str, seed: int,
                   threads: int | None) -> dict[str, Any]:
    """COMET's reference `fit` (github.com/DL4mHealth/COMET, a checkout at `comet_dir`, not part of medssl) on
    random windows of the config's shape: its encoder (`hidden`, `out_dim`, `depth - 1`: COMET's depth counts
    the blocks before the last), batch, window, the config's level weights as its `factors` and its published
    masks; P patients x R trials x S windows per trial as ours. Windows/s over the iterations after `warmup`."""
    sys.path.insert(0, comet_dir)
    from comet import COMET  # noqa: PLC0415 - the reference code, given by path

    if threads is not None:
        torch.set_num_threads(threads)
    config = PretrainTimeseriesConfig.model_validate_json(config_json)
    torch.manual_seed(seed)
    np.random.seed(seed)
    window, _ = config.data.window_samples()
    batch, per_trial = config.train.batch_size, config.samples_per_trial
    windows = batch * (warmup + steps + 2)
    trial = np.arange(windows) // per_trial
    y = np.stack([trial % 2, trial // config.sampler.trials, trial], axis=1).astype(np.float64)  # label, pid, tid
    x = np.random.default_rng(seed).standard_normal((windows, window, config.model.in_channels)).astype(np.float32)
    reference = COMET(input_dims=config.model.in_channels, output_dims=config.model.out_dim,
                      hidden_dims=config.model.hidden, depth=config.model.depth - 1, device=device,
                      lr=config.train.lr, batch_size=batch, flag_use_multi_gpu=False)
    ticks: list[tuple[float, float]] = []  # (wall, CPU time of this process) when each iteration ends
    reference.after_iter_callback = lambda *_: (_sync(torch.device(device)),
                                                ticks.append((time.perf_counter(), time.process_time())))
    factors = [getattr(config.objectives, level).weight for level in ("patient", "trial", "sample", "observation")]
    warmup = max(1, warmup)  # the clock starts when a warm-up iteration ends
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reference.fit(x, y, shuffle_function="trial", factors=factors, n_iters=warmup + steps + 1, verbose=False)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    (wall, cpu), (wall_end, cpu_end) = ticks[warmup - 1], ticks[warmup + steps - 1]
    seconds = wall_end - wall
    return {"windows_per_s": batch * steps / seconds, "step_ms": 1000 * seconds / steps,
            "cpu_ms_per_step": 1000 * (cpu_end - cpu) / steps,
            "torch_threads": torch.get_num_threads(), "peak_mib": grown / 2**10, "saved_for_backward_mib": math.nan,
            "encoder_calls_per_step": 2.0 * sum(f > 0 for f in factors)}


def _saved_bytes(forward) -> int:
    """Bytes of the distinct tensors autograd saves for backward during `forward()`."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def _in_fresh_process(function: str, args: list, label: str) -> dict[str, Any]:
    """`function(*args)` of this module in a new Python process (its own peak memory; no multiprocessing
    main-module re-import); `label` names what it measures in an error."""
    code = (f"import json, sys; from medssl.bench.timeseries import {function}; "
            f"print(json.dumps({function}(*json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], stdout=subprocess.PIPE, encoding="utf-8")
    if done.returncode == -signal.SIGKILL:
        raise UserError(f"the measurement of {label} was killed (SIGKILL: out of memory?); try a smaller "
                        "train.batch_size")
    if done.returncode != 0:
        raise RuntimeError(f"the measurement of {label} failed (exit {done.returncode}); see its error above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def throughput(config: PretrainTimeseriesConfig, *, steps: int = 20, warmup: int = 3, device: str | None = None,
               seed: int = 0, threads: int | None = None, against: Sequence[str] = ("per_level",),
               comet: Path | None = None, rounds: int = 1) -> dict[str, Any]:
    """Windows/s and peak memory of a pretraining step: ours (one pair of views) vs each of `against`:
    "per_level" (re-encoding per level, `PerLevelObjective`) and/or "comet" (COMET's reference `fit`, from the
    checkout at `comet`); and the breakdown of our step.

    Every measurement runs in a fresh Python process on `device` (default: cuda if available, else cpu) with
    `threads` CPU threads (default: torch's; 1 gives steadier numbers on a shared CPU); `rounds` > 1 repeats the
    whole set interleaved (ours, then each other, round after round) and reports medians and each round's
    ratios, so that a change in the machine's load hits both sides. Prints tables; returns flat figures, e.g.
    `one_pair_windows_per_s` (median), `speedup_per_level`, `speedup_comet` (median of the rounds' ratios of
    windows/s), `cpu_speedup_comet` (the same from each process's CPU time per step: what a machine shared with
    other jobs changes least), `one_pair_breakdown_ms`, `peak_memory` (how peak memory was measured).
    """
    if "comet" in against and comet is None:
        raise UserError("--against comet needs --comet DIR (a checkout of github.com/DL4mHealth/COMET)")
    if comet is not None and not (Path(comet) / "comet.py").is_file():
        raise UserError(f"--comet: {comet} holds no comet.py (expected a checkout of github.com/DL4mHealth/COMET)")
    if "comet" in against and config.model.kernel != 3:
        raise UserError(f"model.kernel: {config.model.kernel}; COMET's encoder has kernel 3")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = ["one_pair", *against]
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            args = [name, config.model_dump_json(), steps, warmup, device, seed, threads]
            if name == "comet":
                measured[name].append(_in_fresh_process("_measure_comet", [str(comet), *args[1:]], _LABELS[name]))
            else:
                measured[name].append(_in_fresh_process("_measure", args, _LABELS[name]))
    results: dict[str, Any] = {"device": device, "batch": config.train.batch_size, "rounds": rounds,
                               "window": config.data.window_samples()[0], "levels": ",".join(config.objectives.active),
                               "peak_memory": ("torch.cuda.max_memory_allocated" if device.startswith("cuda")
                                               else "growth of ru_maxrss (peak RSS) over the timed steps")}
    for name, runs in measured.items():
        for key in runs[0]:
            if key != "breakdown_ms":
                results[f"{name}_{key}"] = float(np.median([run[key] for run in runs]))
        results[f"{name}_windows_per_s_rounds"] = [run["windows_per_s"] for run in runs]
    results["one_pair_breakdown_ms"] = measured["one_pair"][-1]["breakdown_ms"]
    for name in against:
        ratios = [ours["windows_per_s"] / theirs["windows_per_s"]
                  for ours, theirs in zip(measured["one_pair"], measured[name])]
        results[f"speedup_{name}"] = float(np.median(ratios))
        results[f"speedup_{name}_rounds"] = ratios
        cpu_ratios = [theirs["cpu_ms_per_step"] / ours["cpu_ms_per_step"]
                      for ours, theirs in zip(measured["one_pair"], measured[name])]
        results[f"cpu_speedup_{name}"] = float(np.median(cpu_ratios))
        results[f"cpu_speedup_{name}_rounds"] = cpu_ratios
    if "per_level" in against:  # the names the README's earlier figures use
        results["speedup"] = results["speedup_per_level"]
        results["memory_ratio"] = results["per_level_peak_mib"] / max(results["one_pair_peak_mib"], 1e-9)
        results["saved_ratio"] = (results["per_level_saved_for_backward_mib"]
                                  / results["one_pair_saved_for_backward_mib"])
    _print_throughput(results, names)
    return results


_LABELS = {"one_pair": "one pair of views (ours)", "per_level": "per-level re-encoding",
           "comet": "COMET reference fit"}


def _print_throughput(results: dict[str, Any], names: list[str]) -> None:
    rounds = results["rounds"]
    rows = [[_LABELS[name], results[f"{name}_encoder_calls_per_step"], results[f"{name}_windows_per_s"],
             results[f"{name}_step_ms"], results[f"{name}_cpu_ms_per_step"], results[f"{name}_peak_mib"],
             results[f"{name}_saved_for_backward_mib"]] for name in names]
    print_table(f"time-series pretraining step on {results['device']}: batch {results['batch']} x window "
                f"{results['window']}, levels {results['levels']}" + (f"; medians of {rounds} interleaved rounds"
                                                                        if rounds > 1 else ""),
                ["implementation", "encoder calls", "windows/s", "ms/step", "CPU ms/step", "peak MiB",
                 "saved for backward MiB"], rows)
    breakdown = results["one_pair_breakdown_ms"]
    total, cpu = sum(breakdown.values()), results["device"] == "cpu"
    step = results["one_pair_cpu_ms_per_step" if cpu else "one_pair_step_ms"]
    unit = "CPU ms" if cpu else "ms"
    print_table(f"our step, part by part (each timed alone; the parts sum to {total:.0f} {unit}, the step measured "
                f"{step:.0f} {unit})", ["part", unit, "share"],
                [[part, ms, f"{ms / total:.0%}"] for part, ms in breakdown.items()])
    for name in names[1:]:
        each = ", ".join(f"{r:.2f}x" for r in results[f"speedup_{name}_rounds"])
        each_cpu = ", ".join(f"{r:.2f}x" for r in results[f"cpu_speedup_{name}_rounds"])
        print(f"ours vs {_LABELS[name]}: {results[f'speedup_{name}']:.2f}x windows/s"
              + (f" (median; rounds {each})" if rounds > 1 else "")
              + f"; {results[f'cpu_speedup_{name}']:.2f}x in CPU time per step"
              + (f" (rounds {each_cpu})" if rounds > 1 else ""))
    if "per_level" in names:
        print(f"per-level needs {results['memory_ratio']:.2f}x peak memory ({results['peak_memory']}) and "
              f"{results['saved_ratio']:.2f}x activation memory")


# ------------------------------------------------------------------------------------------------ label efficiency


METHODS = ("four-level", "two-level", "scratch")
TABLE_METRICS = ("patient_auroc", "patient_accuracy", "patient_macro_f1", "patient_auprc", "window_auroc")
PRINTED = {"patient_auroc": "patient AUROC", "patient_macro_f1": "patient F1", "window_auroc": "window AUROC"}  # + CSV


def two_level(objectives: HierarchyConfig) -> HierarchyConfig:
    """Observation + sample only (TS2Vec-like), each with the weight the four levels share on average."""
    weight = sum(getattr(objectives, level).weight for level in LEVELS) / 2
    return objectives.model_copy(update={
        "observation": objectives.observation.model_copy(update={"weight": weight}),
        "sample": objectives.sample.model_copy(update={"weight": weight}),
        "trial": LevelConfig(weight=0.0), "patient": LevelConfig(weight=0.0)})


def label_efficiency(pretrain: PretrainTimeseriesConfig, evaluation: EvalTimeseriesConfig, out_dir: Path, *,
                     seeds: Sequence[int] = (0, 1, 2)) -> list[dict[str, Any]]:
    """Four-level vs two-level pretraining vs scratch at every label fraction of `evaluation.eval`, per seed.

    The evaluation uses the pretraining config's data and model sections (so preprocessing matches);
    pretraining steps are `pretrain.train.steps` for both pretrained variants, fine-tuning steps
    `evaluation.train.steps` for all. Runs go to out_dir/<method>/seed<k>/{pretrain,eval}; writes
    out_dir/ts_label_efficiency_runs.csv (one row per method, seed, mode, fraction) and
    out_dir/ts_label_efficiency.csv (mean and std over seeds), prints the table, returns the summary rows.
    """
    from medssl.downstream.ts_classification import eval_timeseries, fraction_key

    out_dir = Path(out_dir)
    evaluation = evaluation.model_copy(update={"data": pretrain.data, "model": pretrain.model})
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for method in METHODS:
            base = out_dir / method / f"seed{seed}"
            checkpoint = None
            if method != "scratch":
                objectives = pretrain.objectives if method == "four-level" else two_level(pretrain.objectives)
                config = pretrain.model_copy(update={"objectives": objectives,
                                                     "train": _seeded(pretrain.train, seed)})
                pretrain_timeseries(config, base / "pretrain", resume=False)
                checkpoint = base / "pretrain" / "checkpoints" / "last.pt"
            summary = eval_timeseries(evaluation.model_copy(update={"train": _seeded(evaluation.train, seed)}),
                                      base / "eval", pretrained=checkpoint, quiet=True)
            for mode in evaluation.eval.modes:
                for fraction in evaluation.eval.fractions:
                    key = fraction_key(fraction)
                    runs.append({"method": method, "seed": seed, "mode": mode, "fraction": fraction,
                                 "patients": summary[f"{key}_patients"],
                                 **{m: summary[f"{mode}_{key}_{m}"] for m in TABLE_METRICS}})
    rows = _aggregate(runs)
    _write_csv(out_dir / "ts_label_efficiency_runs.csv", runs)
    _write_csv(out_dir / "ts_label_efficiency.csv", rows)
    print_table(f"label efficiency on {evaluation.data.manifest.parent.name}: mean ± std over {len(seeds)} seed(s)",
                ["mode", "labels", "patients", "method", *PRINTED.values()], [
                    [r["mode"], f"{r['fraction']:.0%}", r["patients"], r["method"],
                     *(f"{r[f'{m}_mean']:.3f}±{r[f'{m}_std']:.3f}" for m in PRINTED)] for r in rows])
    return rows


def _seeded(train: TrainConfig, seed: int) -> TrainConfig:
    return train.model_copy(update={"seed": seed})


def _aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std (ddof 1; 0 for one seed) over seeds per (mode, fraction, method); NaN runs left out."""
    rows = []
    keys = dict.fromkeys((r["mode"], r["fraction"], r["method"]) for r in runs)
    for mode, fraction, method in sorted(keys, key=lambda k: (k[0], -k[1], METHODS.index(k[2]))):
        group = [r for r in runs if (r["mode"], r["fraction"], r["method"]) == (mode, fraction, method)]
        row: dict[str, Any] = {"mode": mode, "fraction": fraction, "method": method, "seeds": len(group),
                               "patients": group[0]["patients"]}
        for metric in TABLE_METRICS:
            values = np.array([r[metric] for r in group], dtype=float)
            values = values[np.isfinite(values)]
            row[f"{metric}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
