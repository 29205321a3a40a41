"""CPU threads for torch: a default that does not oversubscribe a shared machine.

Two torch processes with one thread per core each slow each other 3x-20x on a 2-core machine (measured in
the README's "Threads" figures), so medssl takes, unless told (`--threads N` or OMP_NUM_THREADS), the cores
that the last minute's load average leaves free, at least one.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads() -> int:
    """Cores not busy with other processes (cpu count minus the 1-minute load average, rounded), >= 1."""
    cores = available_cores()
    try:
        busy = os.getloadavg()[0]
    except OSError:  # pragma: no cover - no load average on this platform
        busy = 0.0
    return max(1, min(cores, round(cores - busy)))


def choose_threads(requested: int | None) -> int | None:
    """The thread count to set: `requested`, else None when OMP_NUM_THREADS decides, else `default_threads()`."""
    if requested is not None:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return default_threads()
