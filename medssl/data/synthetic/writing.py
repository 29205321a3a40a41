"""Checks shared by the cohort writers: integer arguments, and a target folder that may be replaced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medssl.errors import UserError


def check_int_arguments(specs: tuple[tuple[str, object, int, int | None], ...]) -> None:
    """Each (name, value, low, high) must be an integer in [low, high] (high None: no upper bound)."""
    for name, value, low, high in specs:
        if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low
                or (high is not None and value > high)):
            bound = f"between {low} and {high}" if high else f">= {low}"
            raise UserError(f"{name}: must be an integer {bound}, got {value!r}")


def check_replaceable(out: Path, manifest_name: str, what: str) -> None:
    """Refuse to write into `out` unless it is new, empty, or a previous cohort whose manifest is named
    `manifest_name` (`what` names that cohort in the message)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        previous = json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("name") == manifest_name
    except (OSError, ValueError, AttributeError):
        previous = False
    if not previous:
        raise UserError(f"{out}: folder is not empty and is not a previous {what} (no manifest.json named "
                        f"{manifest_name!r}); choose a new or empty folder")
