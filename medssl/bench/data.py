"""`medssl bench data`: how fast the data layer is on this machine.

Measures, in one run on the synthetic hospital: writing it, checking its manifest, the volume
pipeline without cache and with a warm PersistentDataset cache (volumes/s), and signal windowing
plus patient x trial x sample batches (windows/s).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from medssl.bench.report import peak_rss_mib, print_table


def _timed(fn):
    tick = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - tick


def bench_data(*, patients: int = 8, size: int = 64, seed: int = 0) -> dict[str, float]:
    """Run the data benchmark and print its table; returns the figures."""
    from medssl.data.manifest import load_manifest
    from medssl.data.manifest_check import check_manifest
    from medssl.data.preprocessing import VolumePreprocessing
    from medssl.data.synthetic.hospital import make_hospital
    from medssl.data.timeseries import (
        HierarchicalBatchSampler,
        WindowDataset,
        load_recordings,
    )
    from medssl.data.volumes import (
        manifest_volume_entries,
        volume_dataset,
        volume_transforms,
    )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest_path, synth_s = _timed(lambda: make_hospital(tmp / "hospital", patients=patients, size=size,
                                                              seed=seed))
        problems, check_s = _timed(lambda: check_manifest(manifest_path))
        manifest = load_manifest(manifest_path)
        entries = manifest_volume_entries(manifest, "training")
        prep = VolumePreprocessing(crop_size=(size, size, size))
        transform = volume_transforms(prep)
        _, plain_s = _timed(lambda: [item for item in volume_dataset(entries, transform)])
        cached = volume_dataset(entries, transform, cache_dir=tmp / "cache")
        _, cold_s = _timed(lambda: [item for item in cached])
        _, warm_s = _timed(lambda: [item for item in cached])
        recordings, read_s = _timed(lambda: load_recordings(manifest, "training", fs=125.0, channels=["ECG", "PPG"]))
        windows = WindowDataset(recordings, window=500)
        sampler = HierarchicalBatchSampler(windows, patients=2, trials=2, samples=4, seed=seed)
        batches, batch_s = _timed(lambda: [[windows[i] for i in batch] for batch in sampler])
    n_windows = sum(len(b) for b in batches)
    figures = {
        "synth_s": synth_s, "check_s": check_s, "check_problems": float(len(problems)),
        "volumes_per_s_uncached": len(entries) / plain_s, "volumes_per_s_cache_cold": len(entries) / cold_s,
        "volumes_per_s_cache_warm": len(entries) / warm_s, "signal_read_s": read_s,
        "windows_per_s": n_windows / batch_s, "peak_rss_mib": peak_rss_mib(),
    }
    rows = [["synth (write the hospital)", f"{patients} patients, {size}^3", synth_s, ""],
            ["manifest check (open every file)", f"{len(problems)} problems", check_s, ""],
            ["volume pipeline, no cache", f"{len(entries)} volumes", plain_s, figures["volumes_per_s_uncached"]],
            ["volume pipeline, cache cold", f"{len(entries)} volumes", cold_s, figures["volumes_per_s_cache_cold"]],
            ["volume pipeline, cache warm", f"{len(entries)} volumes", warm_s, figures["volumes_per_s_cache_warm"]],
            ["signals: read + resample to 125 Hz", f"{len(recordings)} trials", read_s, ""],
            ["signals: P x R x S batches", f"{n_windows} windows", batch_s, figures["windows_per_s"]]]
    print_table("medssl bench data (synthetic hospital)", ["stage", "size", "seconds", "items/s"], rows)
    print(f"peak resident memory: {figures['peak_rss_mib']:.0f} MiB; cache speed-up (warm vs uncached): "
          f"{plain_s / warm_s:.1f}x")
    return figures
