"""Atomic writes: write to a temporary sibling, then rename over the target.

A reader never sees a half-written file, and a failure (even a SIGKILL half-way) leaves the target as it
was. Written files and folders get the modes the umask gives (mkstemp/mkdtemp alone would make them 0600 /
0700, unreadable to colleagues on a shared server). A write the file system refuses (read-only, permission
denied, disk full or over quota) is an `UnwritableError`: a one-line UserError naming the target.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medssl.errors import UserError

_UNWRITABLE = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.ENOSPC: "no space left on device",
               errno.EDQUOT: "disk quota exceeded"}


class UnwritableError(UserError):
    """The file system refused a write (`reason`: read-only, permission, no space); names the target."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: cannot write: {reason}")
        self.reason = reason


def unwritable(err: BaseException, path: str | os.PathLike) -> UnwritableError | None:
    """`err` as an UnwritableError naming `path` when it is the file system refusing a write under `path`'s folder
    (an OSError with one of the errnos above, or torch.save's failed write), else None."""
    if isinstance(err, UnwritableError):
        return UnwritableError(path, err.reason)
    if isinstance(err, OSError) and err.errno in _UNWRITABLE:
        folder, where = os.path.abspath(Path(path).parent), os.path.abspath(err.filename or path)
        concerns = os.path.commonpath([folder, where]) in (folder, where)  # inside the folder, or one it creates
        return UnwritableError(path, _UNWRITABLE[err.errno]) if concerns else None
    if isinstance(err, RuntimeError) and "file write failed" in str(err):  # torch.save (its zip writer) on a full disk
        return UnwritableError(path, "the write failed (is the disk full?)")
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _suffixes(path: Path) -> str:
    # keep the full suffix (".nii.gz") so that writers that dispatch on it still work
    return "".join(path.suffixes)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on failure delete it."""
    path = Path(path)
    with _refused_as_user_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".tmp{_suffixes(path)}",
                                   dir=path.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _refused_as_user_error(path):
            os.chmod(tmp_path, 0o666 & ~_umask())
            yield tmp_path
            if tmp_path.is_file():  # on disk before the rename: a crash never leaves a renamed, empty file
                with open(tmp_path, "rb") as handle:
                    os.fsync(handle.fileno())
            os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _refused_as_user_error(path: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, RuntimeError, UnwritableError) as err:
        refused = unwritable(err, path)
        if refused is None:
            raise
        raise refused from err


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write `text` to `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`, on failure it is removed.

    An existing `path` is only removed once the new content is complete.
    """
    path = Path(path)
    with _refused_as_user_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _refused_as_user_error(path):  # also a refused write of a file inside: it names the folder
            os.chmod(tmp, 0o777 & ~_umask())
            yield tmp
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    except UserError as err:  # a file of the temporary folder is named where it was to be
        shutil.rmtree(tmp, ignore_errors=True)
        if str(tmp) not in str(err):
            raise
        raise UserError(str(err).replace(str(tmp), str(path))) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
