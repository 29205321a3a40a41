"""`medssl bench threads`: what torch threads do to training speed when jobs share the CPU.

Runs `medssl pretrain volume` (the tiny config, probe off) alone and as two concurrent jobs under four
thread settings: alone with every core, two jobs with every core each, two jobs with one thread each and
two jobs with medssl's default (`medssl.threads`). Each job is a separate process started at the same
time; the figure is the jobs' summed items/s (each run's `final_items_per_s`, measured over its last log
window, so start-up is left out).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from medssl.atomic import write_json
from medssl.bench.report import print_table
from medssl.data.manifest import require_manifest_file
from medssl.errors import UserError
from medssl.threads import available_cores

CORES = available_cores()
SETTINGS = (  # (name, concurrent jobs, --threads or None for medssl's default)
    ("alone, every core", 1, CORES),
    ("two jobs, every core each", 2, CORES),
    ("two jobs, one thread each", 2, 1),
    ("two jobs, medssl default", 2, None),
)


def _job(manifest: Path, run_dir: Path, steps: int, threads: int | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    command = [sys.executable, "-m", "medssl", *(["--threads", str(threads)] if threads else []), "pretrain",
               "volume", "-c", "pretrain_volume_tiny", "-o", str(run_dir), f"data.manifest={manifest}",
               f"train.steps={steps}", f"train.log_every={max(1, steps // 2)}", f"train.checkpoint_every={steps}",
               "probe.enabled=false"]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            encoding="utf-8", errors="replace")


def thread_benchmark(out: str | Path | None = None, *, steps: int = 40, manifest: Path | None = None) -> list[dict]:
    """Run the four settings one after another; print the table, write `threads.json` under `out` (when
    given) and return the rows {setting, jobs, threads, items_per_s}."""
    import json

    from medssl.data.synthetic.hospital import make_hospital

    if steps < 2:
        raise UserError(f"--steps: {steps}; at least 2 (the speed is read from the last log window)")
    require_manifest_file(manifest)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="medssl-threads-") as tmp:
        manifest = manifest or make_hospital(Path(tmp) / "hospital", patients=4, studies=2, size=32, seed=0)
        for k, (name, jobs, threads) in enumerate(SETTINGS):
            runs = [Path(tmp) / f"s{k}_job{j}" for j in range(jobs)]
            procs = [_job(Path(manifest), run, steps, threads) for run in runs]
            for proc, run in zip(procs, runs):
                _, err = proc.communicate()
                if proc.returncode:
                    raise RuntimeError(f"{name}: pretrain volume exited {proc.returncode}: {err.strip()[-500:]}")
            speed = sum(json.loads((run / "summary.json").read_text(encoding="utf-8"))["final_items_per_s"]
                        for run in runs)
            rows.append({"setting": name, "jobs": jobs, "threads": threads or "default", "items_per_s": speed})
    print_table(f"pretrain volume (tiny config, {steps} steps) on {CORES} cores: items/s of all jobs together",
                ["setting", "jobs", "threads per job", "items/s"],
                [[r["setting"], r["jobs"], r["threads"], r["items_per_s"]] for r in rows])
    if out is not None:
        write_json(Path(out) / "threads.json", {"cores": CORES, "steps": steps, "rows": rows})
    return rows
