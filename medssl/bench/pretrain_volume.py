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
from pathlib import Path

import torch

from medssl.bench.report import peak_rss_mib, print_table
from medssl.config import validate_config
from medssl.errors import UserError


def _config(manifest: Path, *, steps: int, batch_size: int, seed: int, crop: int, model: str, probe: bool,
            probe_every: int = 50) -> object:
    from medssl.pretrain.volume import PretrainVolumeConfig

    return validate_config({
        "data": {"manifest": str(manifest), "crop_size": [crop] * 3},
        "train": {"steps": steps, "batch_size": batch_size, "seed": seed, "warmup_steps": max(1, steps // 10),
                  "log_every": max(1, steps // 20), "checkpoint_every": steps},
        "model": {"name": model},
        "probe": {"enabled": probe, "every": probe_every},
    }, PretrainVolumeConfig, source="benchmark config")


def _hospital(manifest: Path | None, workdir: Path, size: int) -> Path:
    if manifest is not None:
        return manifest
    from medssl.data.synthetic.hospital import make_hospital

    return make_hospital(workdir / "hospital", patients=8, size=size, seed=0)


def bench_pretrain_volume(*, manifest: Path | None = None, steps: int = 10, batch_size: int = 2, crop: int = 32,
                          model: str = "basicunet", size: int = 64) -> dict[str, float]:
    """Time `steps` training steps of the default objectives; print and return the figures."""
    from medssl.data.manifest import load_manifest
    from medssl.pretrain.volume import VolumePretrainModel
    from medssl.pretrain.volume_batches import VolumePretrainBatches

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        config = _config(_hospital(manifest, Path(tmp), size), steps=steps, batch_size=batch_size, seed=0, crop=crop,
                         model=model, probe=False)
        loaded = load_manifest(config.data.manifest)
        batches = VolumePretrainBatches.from_manifest(loaded, "training",
                                                      config.data.preprocessing(loaded.modality.get("0")),
                                                      batch_size=batch_size, points=config.views.points,
                                                      stride=config.views.feature_stride)
    torch.manual_seed(0)
    net = VolumePretrainModel(config).to(device)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator(device=device).manual_seed(0)
    data_s = compute_s = 0.0
    crops = 0
    for step in range(steps + 1):  # step 0 warms up (first-call allocations, lazy imports)
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
            compute_s += time.perf_counter() - tock
            crops += out.items
    total = data_s + compute_s
    voxels_per_crop = crop ** 3
    figures = {"crops_per_s": crops / total, "voxels_per_s": crops * voxels_per_crop / total,
               "steps_per_s": steps / total, "data_fraction": data_s / total, "peak_rss_mib": peak_rss_mib()}
    if device.type == "cuda":
        figures["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(f"{model} encoder, {crop}^3 crops, {batch_size} anchors per step = {4 * batch_size} crops "
          f"+ {8 * batch_size} octants (part-whole), {steps} timed steps on {device.type}")
    print_table("medssl bench pretrain-volume", ["figure", "value"], [[k, v] for k, v in figures.items()])
    return figures


def probe_vs_random_init(*, seeds: tuple[int, ...] = (0, 1, 2), steps: int = 150, batch_size: int = 4,
                         crop: int = 32, model: str = "basicunet", manifest: Path | None = None,
                         out: Path = Path("runs/bench_volume_probe")) -> list[dict[str, float]]:
    """Pretrain once per seed; compare the organ probe before (random init) and after. Writes out/probe.csv."""
    from medssl.pretrain.volume import pretrain_volume

    out.mkdir(parents=True, exist_ok=True)
    manifest = _hospital(manifest, out, 64)
    rows = []
    for seed in seeds:
        run_dir = out / f"seed{seed}"
        config = _config(manifest, steps=steps, batch_size=batch_size, seed=seed, crop=crop, model=model, probe=True,
                         probe_every=steps)
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
