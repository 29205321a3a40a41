"""`medssl bench data`: what the data path costs at hospital scale (issue 17, section 5).

Four measurements, each printed as a table (stages can be chosen with ``--stages``):

- ``scale``: (a) peak memory and (b) time to the first step of `medssl pretrain volume` (store built, the
  tiny config, DataLoader workers as configured) against manifests of 1k, 10k and 50k entries. A few real
  files (a small synthetic hospital) stand behind the many entries, each entry its own patient and study, so
  the store holds the few scans and an index of every entry. Memory is the peak over the run of the summed
  proportional set size (PSS, shared pages split between the processes that map them) of the command and its
  DataLoader workers, sampled every 20 ms from /proc; time to the first step is from the command's start to
  its first line in metrics.jsonl (import time included, the same for every size).
- ``cohort``: the same peak memory for cohorts of distinct 64^3 volumes (24 and 288 by default): the issue's
  "within 1.15x" aim.
- ``crops``: (c) crops per CPU second (and per wall second) of the data path alone
  (`VolumePretrainBatches.from_store`: body-point draw, matching, region reads, resampling, jitter, region
  maps) in this one process, one thread: one DataLoader worker's rate, for 96^3 crops from real-size
  (512 x 512 x 300) volumes; the in-memory path on the same volumes for comparison.
- ``preprocess``: (d) CPU (and wall) seconds per real-size scan of `medssl preprocess` on one core (read,
  reorient, window, body mask, class locations, compress, write).

The real-size volumes are synthetic CTs: a synthetic torso (`medssl.data.synthetic`) resampled to
512 x 512 x 300 int16 HU at 0.7 x 0.7 x 1.0 mm with Gaussian noise (sd 12 HU) added, so that they compress
about as badly as a real scan; written as .nii.gz.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from medssl.bench.report import print_table

STAGES = ("scale", "cohort", "crops", "preprocess")
REAL_SHAPE = (512, 512, 300)
H100_CROPS_PER_S = 150.0  # assumed consumption of one H100 pretraining on 96^3 crops (module docstring of README)


def bench_data(*, entries: tuple[int, ...] = (1000, 10000, 50000), cohorts: tuple[int, ...] = (24, 288),
               steps: int = 3, workers: int = 2, crops_batches: int = 6, stages: tuple[str, ...] = STAGES,
               folder: Path | None = None, seed: int = 0) -> dict[str, float]:
    """Run the chosen stages and print their tables; returns every figure by name."""
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tmp = Path(tmp)
        if "scale" in stages:
            figures.update(_scale(tmp / "scale", entries, steps, workers, seed))
        if "cohort" in stages:
            figures.update(_cohorts(tmp / "cohort", cohorts, steps, workers, seed))
        if "crops" in stages or "preprocess" in stages:
            figures.update(_real_size(tmp / "real", stages, crops_batches, seed))
    return figures


# ------------------------------------------------------------------------------------------------ (a), (b)


def _scale(tmp: Path, sizes: tuple[int, ...], steps: int, workers: int, seed: int) -> dict[str, float]:
    from medssl.data.synthetic.hospital import make_hospital

    hospital = make_hospital(tmp / "hospital", patients=4, studies=2, size=64, seed=seed, trials=1,
                             signal_seconds=2.0)
    files = json.loads(hospital.read_text(encoding="utf-8"))["training"]
    rows, figures = [], {}
    for n in sizes:
        manifest = tmp / f"entries_{n}" / "manifest.json"
        _many_entries(hospital, files, n, manifest)
        _preprocess(manifest)
        peak, first, total = _pretrain(manifest, tmp / f"run_{n}", steps, workers)
        figures[f"entries_{n}_peak_mib"], figures[f"entries_{n}_first_step_s"] = peak, first
        rows.append([f"{n} entries ({len(files)} files)", peak, first, total])
    base = figures[f"entries_{sizes[0]}_peak_mib"]
    print_table("pretrain volume against manifest size (store built; tiny config, "
                f"{steps} steps, {workers} workers)", ["manifest", "peak PSS MiB (all processes)",
                                                          "first step s", "run s"], rows)
    print(f"peak memory from {sizes[0]} to {sizes[-1]} entries: "
          f"{figures[f'entries_{sizes[-1]}_peak_mib'] - base:+.0f} MiB")
    return figures


def _many_entries(hospital: Path, files: list[dict], n: int, out: Path) -> None:
    """A manifest of `n` training entries cycling over `files`, each its own patient (so the draw of other
    patients ranges over every entry), the files' paths absolute."""
    out.parent.mkdir(parents=True, exist_ok=True)
    root = hospital.parent
    entries = [{"image": str(root / files[i % len(files)]["image"]), "patient_id": f"P{i:06d}", "study_id": "S1"}
               for i in range(n)]
    manifest = json.loads(hospital.read_text(encoding="utf-8"))
    manifest.update(training=entries, validation=[], test=[])
    out.write_text(json.dumps(manifest), encoding="utf-8")


def _preprocess(manifest: Path, *extra: str) -> float:
    tick = time.perf_counter()
    _run([sys.executable, "-m", "medssl", "preprocess", "-c", "pretrain_volume_tiny", f"data.manifest={manifest}",
          "--workers", "1", *extra])
    return time.perf_counter() - tick


def _pretrain(manifest: Path, run: Path, steps: int, workers: int) -> tuple[float, float, float]:
    """(peak summed PSS MiB, seconds to the first logged step, seconds in all) of a tiny `pretrain volume`."""
    command = [sys.executable, "-m", "medssl", "pretrain", "volume", "-c", "pretrain_volume_tiny", "-o", str(run),
               f"data.manifest={manifest}", f"train.steps={steps}", "train.log_every=1", "probe.enabled=false",
               f"train.checkpoint_every={steps}", f"train.num_workers={workers}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tick = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    sampler = _TreeMemory(process.pid)
    first = None
    metrics = run / "metrics.jsonl"
    while process.poll() is None:
        if first is None and metrics.is_file() and metrics.stat().st_size:
            first = time.perf_counter() - tick
        time.sleep(0.02)
    total = time.perf_counter() - tick
    sampler.stop()
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return sampler.peak / 2**20, first if first is not None else total, total


class _TreeMemory:
    """Samples every 20 ms the summed PSS of a process and its descendants; `peak` in bytes."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_pss(pid) for pid in _tree(self.pid)))
            time.sleep(0.02)


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cohorts(tmp: Path, sizes: tuple[int, ...], steps: int, workers: int, seed: int) -> dict[str, float]:
    from medssl.data.synthetic.hospital import make_hospital

    rows, figures = [], {}
    for n in sizes:
        manifest = make_hospital(tmp / f"hospital_{n}", patients=max(1, n // 2), studies=2, size=64, seed=seed,
                                 trials=1, signal_seconds=2.0)
        data = json.loads(manifest.read_text(encoding="utf-8"))
        data["training"] += data.pop("validation") + data.pop("test")  # every volume pretrains
        data.update(validation=[], test=[])
        manifest.write_text(json.dumps(data), encoding="utf-8")
        volumes = len(data["training"])
        preprocess_s = _preprocess(manifest)
        peak, first, total = _pretrain(manifest, tmp / f"run_{n}", steps, workers)
        figures[f"cohort_{volumes}_peak_mib"] = peak
        figures[f"cohort_{volumes}_first_step_s"] = first
        rows.append([f"{volumes} volumes of 64^3", preprocess_s, peak, first])
    print_table(f"pretrain volume against cohort size (store built; tiny config, {steps} steps, {workers} workers)",
                ["cohort", "preprocess s", "peak PSS MiB (all processes)", "first step s"], rows)
    keys = sorted((k for k in figures if k.endswith("_peak_mib")), key=lambda k: int(k.split("_")[1]))
    if len(keys) > 1:
        print(f"peak memory ratio, largest / smallest cohort: {figures[keys[-1]] / figures[keys[0]]:.2f}x")
    return figures


# ------------------------------------------------------------------------------------------------ (c), (d)


def _real_size(tmp: Path, stages: tuple[str, ...], batches: int, seed: int) -> dict[str, float]:
    import torch

    from medssl.data.manifest import write_manifest
    from medssl.data.preprocessing import VolumePreprocessing
    from medssl.data.store import open_store, preprocess
    from medssl.pretrain.volume_batches import VolumePretrainBatches

    torch.set_num_threads(1)
    tmp.mkdir(parents=True, exist_ok=True)
    paths = [_real_size_ct(tmp / f"ct_{k}.nii.gz", seed + k) for k in range(2)]
    manifest = tmp / "manifest.json"
    write_manifest({"name": "real-size", "modality": {"0": "CT"}, "labels": None,
                    "training": [{"image": p.name, "patient_id": f"P{k}", "study_id": "S1"}
                                 for k, p in enumerate(paths)], "validation": [], "test": []}, manifest)
    prep = VolumePreprocessing(crop_size=(96, 96, 96))
    figures: dict[str, float] = {}
    import medssl.data.checks  # noqa: F401  what a worker imports once, not per scan: before the clock
    import medssl.data.volumes  # noqa: F401
    tick, cpu = time.perf_counter(), time.process_time()
    preprocess(manifest, tmp / "store", prep, workers=1, quiet=True)
    seconds = (time.perf_counter() - tick) / len(paths)
    cpu_seconds = (time.process_time() - cpu) / len(paths)
    figures["preprocess_s_per_scan"], figures["preprocess_cpu_s_per_scan"] = seconds, cpu_seconds
    store_mib = sum(f.stat().st_size for f in (tmp / "store").rglob("*") if f.is_file()) / 2**20 / len(paths)
    if "preprocess" in stages:
        print_table("medssl preprocess, real-size CT (512 x 512 x 300 int16, one core)",
                    ["what", "value"], [["CPU seconds per scan (one core's work)", cpu_seconds],
                                        ["wall seconds per scan (on this machine's load)", seconds],
                                        ["store MiB per scan", store_mib],
                                        ["source .nii.gz MiB per scan",
                                         sum(p.stat().st_size for p in paths) / 2**20 / len(paths)]])
    if "crops" not in stages:
        return figures
    store = open_store(tmp / "store", prep, manifest)
    options = dict(batch_size=2, points=64, stride=4, grid=4, seed=seed)
    rates, wall = {}, {}
    for name, make in (("store", lambda: VolumePretrainBatches.from_store(store, "training", prep, **options)),
                       ("in memory", lambda: VolumePretrainBatches.from_manifest(manifest, "training", prep,
                                                                                   **options))):
        data = make()
        data[0]  # warm-up: opens the files
        tick, cpu = time.perf_counter(), time.process_time()
        crops = sum(4 * int(data[i]["a"].shape[0]) for i in range(1, batches + 1))
        rates[name] = crops / (time.process_time() - cpu)  # per core: CPU time, whatever else the machine runs
        wall[name] = crops / (time.perf_counter() - tick)
        del data
    figures["crops_per_s_store"], figures["crops_per_s_in_memory"] = rates["store"], rates["in memory"]
    print_table("data path alone, 96^3 crops from real-size CTs (one process, one thread = one worker)",
                ["path", "crops per CPU second", "crops per wall second", f"workers for an H100 "
                 f"(~{H100_CROPS_PER_S:.0f} crops/s, assumed)"],
                [[name, rate, wall[name], f"{np.ceil(H100_CROPS_PER_S / rate):.0f}"] for name, rate in rates.items()])
    return figures


def _real_size_ct(path: Path, seed: int) -> Path:
    """A 512 x 512 x 300 int16 CT (HU) at 0.7 x 0.7 x 1.0 mm: a synthetic torso, resampled, with noise."""
    from scipy import ndimage

    from medssl.data import io

    small = _synthetic_torso(seed)
    zoom = [t / s for t, s in zip(REAL_SHAPE, small.shape)]
    big = ndimage.zoom(small, zoom, order=1, prefilter=False)
    rng = np.random.default_rng(seed)
    big += rng.normal(0.0, 12.0, big.shape).astype(np.float32)
    affine = np.diag([0.7, 0.7, 1.0, 1.0])
    io.write_volume(path, np.clip(big, -1024, 3071).astype(np.int16), affine)
    return path


def _synthetic_torso(seed: int) -> np.ndarray:
    """(X, Y, Z) float32 HU of one synthetic hospital study (64^3)."""
    from medssl.data import io
    from medssl.data.synthetic.hospital import make_hospital

    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_hospital(Path(tmp) / "h", patients=3, studies=1, size=64, seed=seed, trials=1,
                                 signal_seconds=2.0)
        entry = json.loads(manifest.read_text(encoding="utf-8"))
        first = (entry["training"] or entry["validation"] or entry["test"])[0]
        return io.read_volume(manifest.parent / first["image"]).array.astype(np.float32)


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace",
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
