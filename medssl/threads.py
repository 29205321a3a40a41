"""CPU threads for torch: a default that does not oversubscribe a shared machine, set without importing torch,
and a pinned count wherever a figure is computed.

Two torch processes with one thread per core each slow each other 3x-20x on a 2-core machine (measured in
the README's "Threads" figures), so medssl takes, unless told (`--threads N` or OMP_NUM_THREADS), the cores
that the last minute's load average leaves free, at least one.

The count is given to torch when torch is imported (`request_threads`): a command that never needs torch
(`medssl --help`, `config list`, a refused option) does not pay seconds to import it, and nothing is put in
the environment (an OMP_NUM_THREADS set there would reach every child process, e.g. the app's Streamlit
server).

Float reductions (convolution gradients, matrix products) split their sums by thread, so a result computed
with 2 threads differs in its last bits from one computed with 1, and training amplifies the difference.
The demo and the benches whose figures the README prints therefore compute with `FIGURE_THREADS`, whatever
`--threads`, OMP_NUM_THREADS or the load say (`pin_figure_threads`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType

FIGURE_THREADS = 1  # one thread: the same figures on every machine, and no slowdown when the CPU is shared


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


class _SetThreadsOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when torch is about to be imported, wraps its loader so that
    `torch.set_num_threads(threads)` runs right after torch's own import."""

    def __init__(self, threads: int):
        self.threads = threads

    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if name != "torch":
            return None
        _remove_hook()  # one use; the finders below are the others
        spec = next((found for finder in sys.meta_path if hasattr(finder, "find_spec")
                     and (found := finder.find_spec(name, path, target)) is not None), None)
        if spec is None or spec.loader is None:
            return spec
        threads, exec_module = self.threads, spec.loader.exec_module

        def exec_then_set_threads(module: ModuleType) -> None:
            exec_module(module)
            module.set_num_threads(threads)

        spec.loader.exec_module = exec_then_set_threads  # this spec's own loader instance
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _SetThreadsOnImport)]


def set_torch_threads(threads: int) -> None:
    """torch.set_num_threads(threads) now if torch is imported, else as soon as it is (without importing it)."""
    _remove_hook()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    else:
        sys.meta_path.insert(0, _SetThreadsOnImport(threads))


def request_threads(requested: int | None) -> None:
    """The CLI's `--threads`: `choose_threads(requested)` for torch (nothing when OMP_NUM_THREADS decides)."""
    chosen = choose_threads(requested)
    if chosen is not None:
        set_torch_threads(chosen)


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def pin_figure_threads() -> None:
    """Compute with `FIGURE_THREADS` from here on (the demo and the benches that print figures): their numbers
    then do not depend on the machine's cores, its load, `--threads` or OMP_NUM_THREADS. torch, and the BLAS and
    OpenMP libraries of numpy, scipy and scikit-learn (the probes' fits): those loaded already through
    threadpoolctl, those loaded later (and the command's own worker processes) through the environment. Only
    these commands set the environment, and they start no server."""
    for name in _THREAD_VARIABLES:
        os.environ[name] = str(FIGURE_THREADS)
    if any(name in sys.modules for name in ("numpy", "torch")):
        from threadpoolctl import threadpool_limits

        threadpool_limits(FIGURE_THREADS)
    set_torch_threads(FIGURE_THREADS)
