"""Atomic writes: modes follow the umask, a write killed half-way never replaces the previous file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medssl.atomic import atomic_dir, write_text
from medssl.errors import UserError
from medssl.training.checkpoint import load_checkpoint, save_checkpoint


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_and_folders_follow_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "run") as tmp:
            (tmp / "b.txt").write_text("y")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o777 & ~umask


_SLOW_SAVE = """
import sys, torch
from medssl.training.checkpoint import save_checkpoint
print("saving", flush=True)
save_checkpoint(sys.argv[1], kind="test", step=2, model={"w": torch.ones(20_000_000)}, arch={}, preprocessing={},
                config={})
"""


def test_a_checkpoint_write_killed_half_way_leaves_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, kind="test", step=1, model={"w": torch.zeros(3)}, arch={}, preprocessing={}, config={})
    process = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(path)], stdout=subprocess.PIPE,
                               encoding="utf-8")
    assert process.stdout.readline().strip() == "saving"
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".last.*.tmp.pt")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)  # wait until the temporary file exists, i.e. the write has begun
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the save finished before it could be killed"
    payload = load_checkpoint(path, kind="test")
    assert payload["step"] == 1 and payload["model"]["w"].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"not a checkpoint at all"])
def test_an_unreadable_checkpoint_is_one_line_without_unsafe_advice(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: not a readable checkpoint (") and "\n" not in message
    assert "weights_only" not in message and "()" not in message
