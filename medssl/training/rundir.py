"""The run directory of ../shared/DESIGN.md 3.2: config.yaml, metrics.jsonl, summary.json, checkpoints/, tb/."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from medssl.atomic import write_json, write_text
from medssl.errors import UserError


FAILED = "FAILED"  # marks a run folder whose training stopped on an error or an interrupt


class RunDir:
    """Writes one run's files. Only the process with `enabled=True` (rank 0) writes anything."""

    def __init__(self, path: str | Path, *, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.checkpoints.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, text: str) -> None:
        if self.enabled:
            write_text(self.path / "config.yaml", text)

    def mark_failed(self, reason: str) -> None:
        """Write FAILED (one line: where and why the run stopped), so that it is never taken for a good run."""
        if self.enabled:
            write_text(self.path / FAILED, reason + "\n")

    def clear_failed(self) -> None:
        if self.enabled:
            (self.path / FAILED).unlink(missing_ok=True)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.enabled:
            write_json(self.path / "summary.json", summary)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one JSON line `{"step": step, **metrics}` and the same scalars to TensorBoard."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _finite_or_none(v) for k, v in metrics.items()}}
        with self.metrics_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        writer = self._writer()
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)

    def truncate_metrics(self, after_step: int) -> None:
        """Keep only records with step <= `after_step` (on resume, the log matches the checkpoint)."""
        if not self.enabled or not self.metrics_file.exists():
            return
        kept = [line for line in self.metrics_file.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= after_step]
        write_text(self.metrics_file, "".join(line + "\n" for line in kept))
        self._purge_step = after_step + 1

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _writer(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path / "tb"), purge_step=getattr(self, "_purge_step", None))
        return self._tb


def prepare_run_dir(path: Path, *, resume: bool) -> None:
    """Refuse to mix runs: a fresh run needs an empty (or new) folder, --resume needs last.pt; a path that is a
    file, lies under a file or cannot be written is refused too. Nothing is created here."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a folder; -o names the run folder")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{path}: {existing} is a file, so the run folder cannot be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot write in {existing} (permission denied); choose another -o")
    last = path / "checkpoints" / "last.pt"
    failed = path / FAILED
    if failed.is_file() and not (resume and last.exists()):
        reason = failed.read_text(encoding="utf-8").strip()
        hint = "--resume continues it from its last checkpoint" if last.exists() else "it has no checkpoint"
        raise UserError(f"{path}: a failed run ({reason}); {hint}, or remove the folder")
    if resume:
        if not last.exists():
            raise UserError(f"{last}: no checkpoint to resume from")
    elif path.exists() and any(path.iterdir()):
        raise UserError(f"{path}: run directory is not empty (use --resume to continue it, or another -o)")


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
