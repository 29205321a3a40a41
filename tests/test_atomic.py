"""Atomic writes: modes follow the umask, a write killed half-way never replaces the previous file."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medssl import atomic
from medssl.atomic import atomic_dir, atomic_path, write_text
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


@pytest.mark.parametrize(("code", "reason"), [(errno.EROFS, "read-only file system"),
                                              (errno.EACCES, "permission denied"),
                                              (errno.ENOSPC, "no space left on device")])
@pytest.mark.parametrize("step", ["mkstemp", "write", "replace"])
def test_a_refused_write_is_one_line_naming_the_file_and_keeps_the_old_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, reason: str, step: str) -> None:
    target = tmp_path / "out" / "summary.json"
    write_text(target, "old")

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(args[0]) if args else None)

    if step == "mkstemp":
        monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
        with pytest.raises(UserError) as info:
            write_text(target, "new")
    elif step == "replace":
        monkeypatch.setattr(atomic.os, "replace", refuse)
        with pytest.raises(UserError) as info:
            write_text(target, "new")
    else:
        with pytest.raises(UserError) as info, atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(code, os.strerror(code))  # what a full disk does in the middle of a write
    assert str(info.value) == f"{target}: cannot write: {reason}"
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_a_refused_write_inside_an_atomic_folder_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info, atomic_dir(tmp_path / "cohort") as tmp:
        (tmp / "vol").mkdir()
        with atomic_path(tmp / "vol" / "a.nii.gz"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(info.value) == f"{tmp_path / 'cohort'}: cannot write: no space left on device"
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_user_error_about_a_file_of_an_atomic_folder_names_its_final_place(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info, atomic_dir(tmp_path / "cohort") as tmp:
        raise UserError(f"{tmp / 'sig' / 'P1'}: cannot write WFDB record (OSError: 20 requested and 12 written)")
    assert str(info.value).startswith(f"{tmp_path / 'cohort' / 'sig' / 'P1'}: cannot write WFDB record")


def test_an_error_about_another_file_is_not_called_a_refused_write(tmp_path: Path) -> None:
    elsewhere = OSError(errno.EACCES, "Permission denied", "/etc/shadow")
    assert atomic.unwritable(elsewhere, tmp_path / "out.json") is None
    with pytest.raises(PermissionError), atomic_path(tmp_path / "out.json"):
        raise elsewhere
    assert not list(tmp_path.iterdir())
