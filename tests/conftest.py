"""Shared fixtures: paths to the real data that lies beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PHYSIONET = SHARED / "data" / "physionet"
PHYSIONET_RECORDS = ("100", "s0010_re", "a103l", "v102s", "03700181")


@pytest.fixture(scope="session")
def physionet_dir() -> Path:
    """Folder of the five real PhysioNet WFDB records (../shared/data/physionet)."""
    assert PHYSIONET.is_dir(), f"{PHYSIONET} is missing: CI runs with ../shared beside the repository"
    return PHYSIONET
