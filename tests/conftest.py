"""Shared fixtures: paths to the real data that lies beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PHYSIONET = SHARED / "data" / "physionet"
PHYSIONET_RECORDS = ("100", "s0010_re", "a103l", "v102s", "03700181")


@pytest.fixture(scope="session")
def physionet_dir() -> Path:
    """Folder of the five real PhysioNet WFDB records (../shared/data/physionet)."""
    assert PHYSIONET.is_dir(), f"{PHYSIONET} is missing: CI runs with ../shared beside the repository"
    return PHYSIONET


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: on a shared 2-core machine two threads wait on each other
    (10x slower). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
