"""Volume pretraining benchmarks.

- `bench_pretrain_volume`: throughput (crops/s, voxels/s), peak memory, and the time spent drawing
  batches (data) versus forward + backward + optimiser step (compute), for one config.
- `probe_vs_random_init`: does pretraining help? For each seed, the frozen-feature organ probe of
  the randomly initialised encoder and of the same encoder after pretraining (same seed, same
  probe volumes); mean and spread over seeds, printed and saved as CSV.
"""

from __future__ import annotations

import csv
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from medssl.bench.report import peak_rss_mib, print_table
from medssl.config import validate_config
from medssl.errors import UserError


def _config(manifest: Path, *, steps: int, batch_size: int, seed: int, crop: int, model: str, probe: bool,
            probe_every: int = 50, overrides: Sequence[str] = ()) -> object:
    from medssl.config import apply_overrides, parse_overrides
    from medssl.pretrain.volume import PretrainVolumeConfig

    return validate_config(apply_overrides({
        "data": {"manifest": str(manifest), "crop_size": [crop] * 3},
        "train": {"steps": steps, "batch_size": batch_size, "seed": seed, "warmup_steps": max(1, steps // 10),
                  "log_every": max(1, steps // 20), "checkpoint_every": steps},
        "model": {"name": model},
        "probe": {"enabled": probe, "every": probe_every},
    }, parse_overrides(list(overrides))), PretrainVolumeConfig, source="benchmark config")


def _hospital(manifest: Path | None, workdir: Path, size: int) -> Path:
    if manifest is not None:
        return manifest
    from medssl.data.synthetic.hospital import make_hospital

    return make_hospital(workdir / "hospital", patients=8, size=size, seed=0)


# Objective sets the step of the shipped objectives is compared with (`--against`): overrides of the config
OFF = {name: f"objectives.{name}.weight=0" for name in ("voxel", "region", "patient", "part_whole")}
AGAINST = {"crop-only": tuple(OFF.values()), "no-part-whole": (OFF["part_whole"],),
           "part-whole-isolated": ("objectives.part_whole.parts=isolated",)}


def bench_pretrain_volume(*, manifest: Path | None = None, steps: int = 10, batch_size: int = 2, crop: int = 32,
                          model: str = "basicunet", size: int = 64, against: Sequence[str] = (),
                          rounds: int = 1) -> dict[str, float]:
    """Time `steps` training steps of the default objectives (all of them); print and return the figures. With
    `against` (names of AGAINST), the same for each of those objective sets, interleaved over `rounds` (each round
    times every set once, all models built first), with each round's ratio of step times, wall clock and CPU time
    of this process (the CPU time is what a shared machine's load changes least)."""
    from medssl.data.manifest import load_manifest
    from medssl.pretrain.volume import VolumePretrainModel
    from medssl.pretrain.volume_batches import VolumePretrainBatches

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variants = {"all objectives": (), **{name: AGAINST[name] for name in against}}
    with tempfile.TemporaryDirectory() as tmp:
        hospital = _hospital(manifest, Path(tmp), size)
        runs = {}
        for name, overrides in variants.items():
            config = _config(hospital, steps=steps, batch_size=batch_size, seed=0, crop=crop, model=model,
                             probe=False, overrides=overrides)
            loaded = load_manifest(config.data.manifest)
            batches = VolumePretrainBatches.from_manifest(loaded, "training",
                                                          config.data.preprocessing(loaded.modality.get("0")),
                                                          batch_size=batch_size, points=config.views.points,
                                                          stride=config.views.feature_stride)
            torch.manual_seed(0)
            net = VolumePretrainModel(config).to(device)
            optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
            runs[name] = (net, optimizer, batches)
        timings: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, run in runs.items():
                timings[name].append(_timed_steps(*run, steps=steps, device=device))
    first = timings["all objectives"]
    figures = {key: statistics.median(t[key] for t in first) for key in first[0]}
    figures.update({"crops_per_s": figures["crops"] / figures["wall_s"],
                    "voxels_per_s": figures["crops"] * crop ** 3 / figures["wall_s"],
                    "steps_per_s": steps / figures["wall_s"], "data_fraction": figures["data_s"] / figures["wall_s"],
                    "peak_rss_mib": peak_rss_mib()})
    if device.type == "cuda":
        figures["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(f"{model} encoder, {crop}^3 crops, {batch_size} anchors per step = {4 * batch_size} crops, {steps} timed "
          f"steps on {device.type}" + (f", {rounds} interleaved rounds (medians)" if rounds > 1 else ""))
    print_table("medssl bench pretrain-volume: all objectives", ["figure", "value"],
                [[k, figures[k]] for k in ("crops_per_s", "voxels_per_s", "steps_per_s", "data_fraction",
                                           "peak_rss_mib", *(["peak_gpu_mib"] if device.type == "cuda" else []))])
    if against:
        rows = []
        for name in variants:
            wall = [t["wall_s"] / steps for t in timings[name]]
            cpu = [t["cpu_s"] / steps for t in timings[name]]
            ratio_wall = [a["wall_s"] / b["wall_s"] for a, b in zip(first, timings[name])]
            ratio_cpu = [a["cpu_s"] / b["cpu_s"] for a, b in zip(first, timings[name])]
            figures[f"ratio_wall_vs_{name}"] = statistics.median(ratio_wall)
            figures[f"ratio_cpu_vs_{name}"] = statistics.median(ratio_cpu)
            rows.append([name, statistics.median(wall), statistics.median(cpu), statistics.median(ratio_wall),
                         statistics.median(ratio_cpu), ", ".join(f"{r:.2f}" for r in ratio_cpu)])
        print_table("step time of all objectives / step time of each set (medians of the rounds)",
                    ["objectives", "s/step (wall)", "CPU s/step", "all / this (wall)", "all / this (CPU)",
                     "all / this (CPU), each round"], rows)
    return figures


def _timed_steps(net, optimizer, batches, *, steps: int, device: torch.device) -> dict[str, float]:
    """One warm-up step (first-call allocations, lazy imports), then `steps` timed ones: wall and CPU seconds of
    the steps, seconds drawing batches, crops encoded."""
    generator = torch.Generator(device=device).manual_seed(0)
    data_s = crops = 0.0
    for step in range(steps + 1):
        if step == 1:
            wall, cpu = time.perf_counter(), time.process_time()
        tick = time.perf_counter()
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batches[step].items()}
        tock = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = net(batch, generator)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        net.update_teacher(step + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            data_s += tock - tick
            crops += out.items
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "data_s": data_s,
            "crops": crops}


def probe_vs_random_init(*, seeds: tuple[int, ...] = (0, 1, 2), steps: int = 150, batch_size: int = 4,
                         crop: int = 32, model: str = "basicunet", manifest: Path | None = None,
                         out: Path = Path("runs/bench_volume_probe"), overrides: Sequence[str] = ()
                         ) -> list[dict[str, float]]:
    """Pretrain once per seed (the bench config plus `overrides`, dotted key=value); compare the organ probe
    before (random init) and after. Writes out/probe.csv."""
    from medssl.pretrain.volume import pretrain_volume

    out.mkdir(parents=True, exist_ok=True)
    manifest = _hospital(manifest, out, 64)
    rows = []
    for seed in seeds:
        run_dir = out / f"seed{seed}"
        config = _config(manifest, steps=steps, batch_size=batch_size, seed=seed, crop=crop, model=model, probe=True,
                         probe_every=steps, overrides=overrides)
        tick = time.perf_counter()
        summary = pretrain_volume(config, run_dir)
        if "init_probe_dice" not in summary:
            raise UserError(f"{manifest}: no organ probe to compare ({summary.get('probe_off', 'probe off')})")
        rows.append({"seed": seed, "random_init_probe_dice": summary["init_probe_dice"],
                     "pretrained_probe_dice": summary["final_probe_dice"],
                     "random_init_probe_accuracy": summary["init_probe_accuracy"],
                     "pretrained_probe_accuracy": summary["final_probe_accuracy"],
                     "minutes": (time.perf_counter() - tick) / 60})
    with (out / "probe.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = [[f"seed {r['seed']}", r["random_init_probe_dice"], r["pretrained_probe_dice"]] for r in rows]
    for name, fn in (("mean", statistics.mean), ("std", statistics.stdev if len(rows) > 1 else lambda v: 0.0)):
        table.append([name, fn([r["random_init_probe_dice"] for r in rows]),
                      fn([r["pretrained_probe_dice"] for r in rows])])
    print_table(f"organ probe Dice, synthetic hospital ({steps} steps x {batch_size} anchors, {model})",
                ["", "random init", "pretrained"], table)
    print(f"saved {out / 'probe.csv'}")
    return rows
