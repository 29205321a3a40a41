"""Figures reproduce: the demo and the benches whose figures the README prints compute with one thread, whatever
`--threads`, OMP_NUM_THREADS or the machine's load say, so they give the same numbers everywhere."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medssl import threads
from medssl.cli import main
from medssl.data.synthetic.hospital import make_hospital


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 patients (2 validation patients for the organ probe), 32^3."""
    return make_hospital(tmp_path_factory.mktemp("threads") / "hospital", patients=8, studies=1, size=32, seed=0,
                         trials=1, signal_seconds=4.0)


def _probe_rows(manifest: Path, out: Path, threads_option: list[str], omp: str | None) -> list[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                            "MKL_NUM_THREADS")}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    done = subprocess.run([sys.executable, "-m", "medssl", *threads_option, "bench", "volume-probe", "--manifest",
                           str(manifest), "--steps", "3", "--batch-size", "2", "--seed", "0", "-o", str(out)],
                          capture_output=True, encoding="utf-8", env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with (out / "probe.csv").open(encoding="utf-8") as handle:
        return [{k: v for k, v in row.items() if k != "minutes"} for row in csv.DictReader(handle)]


def test_a_figure_is_the_same_with_one_and_two_threads(hospital: Path, tmp_path: Path) -> None:
    """`bench volume-probe` (3 pretraining steps, the organ probe before and after): the same digits under
    OMP_NUM_THREADS=1 and under --threads 2 with no OMP_NUM_THREADS."""
    one = _probe_rows(hospital, tmp_path / "one", [], "1")
    two = _probe_rows(hospital, tmp_path / "two", ["--threads", "2"], None)
    assert one == two and float(one[0]["pretrained_probe_dice"]) > 0


def test_two_threads_change_the_bits_of_a_training_step() -> None:
    """Why the count is pinned: the same convolution gradient with 1 and with 2 threads differs in its last bits
    (the reduction over the batch and the voxels is split by thread); training amplifies that."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 32, 32, 32, generator=generator)
    weight = torch.randn(16, 8, 3, 3, 3, generator=generator)
    before = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            w, inputs = weight.clone().requires_grad_(), x.clone().requires_grad_()
            out = torch.nn.functional.conv3d(inputs, w, padding=1)
            out.square().sum().backward()
            results.append(torch.cat([out.flatten(), w.grad.flatten(), inputs.grad.flatten()]))
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(results[0], results[1], rtol=1e-4, atol=1e-3) and not torch.equal(results[0], results[1])


FIGURE_COMMANDS = [  # (argv, the module and function that computes the figures)
    (["demo", "-o", "{tmp}/demo"], "medssl.demo", "run_demo"),
    (["bench", "volume-probe", "-o", "{tmp}/probe"], "medssl.bench.pretrain_volume", "probe_vs_random_init"),
    (["bench", "ts-label-efficiency", "-o", "{tmp}/tle"], "medssl.bench.timeseries", "label_efficiency"),
    (["bench", "label-efficiency", "-o", "{tmp}/le"], "medssl.bench.label_efficiency", "label_efficiency"),
    (["bench", "grounding", "-o", "{tmp}/g"], "medssl.bench.grounding", "grounding_benchmark"),
]


@pytest.mark.parametrize(("argv", "module", "function"), FIGURE_COMMANDS, ids=[" ".join(c[0][:2]) for c in
                                                                               FIGURE_COMMANDS])
def test_every_figure_command_computes_with_one_thread(argv: list[str], module: str, function: str, hospital: Path,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from threadpoolctl import threadpool_info, threadpool_limits

    for name in threads._THREAD_VARIABLES:  # what the command sets is undone after the test
        monkeypatch.setenv(name, "2")
    seen = {}

    def record(*args, **kwargs) -> None:
        seen["torch"] = torch.get_num_threads()
        seen["blas"] = {info["num_threads"] for info in threadpool_info()}
        seen["env"] = {os.environ[name] for name in threads._THREAD_VARIABLES}

    monkeypatch.setattr(importlib.import_module(module), function, record)
    before, limits = torch.get_num_threads(), threadpool_limits(2)
    try:
        torch.set_num_threads(2)
        main(["--threads", "2", *[a.format(tmp=tmp_path, manifest=hospital) for a in argv]])
    finally:
        torch.set_num_threads(before)
        limits.restore_original_limits()
    assert seen == {"torch": 1, "blas": {1}, "env": {"1"}}
