"""What the app may read: paths under its data roots, and uploads within a size limit.

`resolve_under` is the only way the app turns a user-typed path into a file to open: it returns the
real (symlink-free) path, and refuses `..` escapes, absolute paths outside the roots and symlinks that
lead outside. Uploads are checked by name and size before they are written anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from medssl.errors import UserError

UPLOAD_LIMIT_BYTES = 512 * 1024 * 1024  # 512 MiB; Streamlit's own server.maxUploadSize (MB) must be >= this
UPLOAD_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")  # single-file volume formats (no detached data files)


def _roots(roots: Sequence[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """(as given, absolute, without symlinks) pairs; each root must be an existing folder."""
    if not roots:
        raise UserError("roots: the app was started without any data folder")
    out = []
    for root in roots:
        given = Path(os.path.abspath(root))
        if not given.is_dir():
            raise UserError(f"{root}: data root is not an existing folder")
        out.append((given, given.resolve()))
    return out


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def resolve_under(roots: Sequence[str | os.PathLike], user_path: str) -> Path:
    """The real path of `user_path` (relative to the first root where it exists, or absolute) when it
    lies under one of `roots`; UserError (one line) for an escape, an outside path or a missing file."""
    folders = _roots(roots)
    if not isinstance(user_path, str) or not user_path.strip():
        raise UserError("path: empty; give a file under the data folders")
    if "\x00" in user_path:
        raise UserError(f"{user_path!r}: path contains a NUL character")
    requested = Path(user_path)
    if requested.is_absolute():
        lexical = Path(os.path.normpath(requested))
        if not any(_inside(lexical, given) or _inside(lexical, real) for given, real in folders):
            raise UserError(f"{user_path}: outside the allowed data folders")
        candidates = [lexical]
    else:
        if os.path.normpath(requested).split(os.sep)[0] == "..":
            raise UserError(f"{user_path}: '..' leads outside the allowed data folders")
        candidates = [Path(os.path.normpath(given / requested)) for given, _ in folders]
    for candidate in candidates:
        if not os.path.lexists(candidate):
            continue
        real = candidate.resolve()
        if not any(_inside(real, root) for _, root in folders):
            raise UserError(f"{user_path}: a symbolic link leads outside the allowed data folders")
        if not real.exists():
            raise UserError(f"{user_path}: broken symbolic link")
        return real
    raise UserError(f"{user_path}: no such file under the data folders")


def check_upload(name: str, size: int, *, suffixes: tuple[str, ...] = UPLOAD_SUFFIXES) -> str:
    """Check an uploaded file's name (a plain file name with one of `suffixes`, by default a volume suffix)
    and size in bytes (1 to `UPLOAD_LIMIT_BYTES`); returns the name. UserError (one line) otherwise."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise UserError(f"upload {name!r}: needs a plain file name")
    if "/" in name or "\\" in name or "\x00" in name or name in (".", "..") or name.startswith("."):
        raise UserError(f"upload {name!r}: a file name must not contain path separators or start with '.'")
    if not name.lower().endswith(suffixes):
        raise UserError(f"upload {name}: unsupported type; expected one of {', '.join(suffixes)}")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise UserError(f"upload {name}: empty file (size {size!r} bytes)")
    if size > UPLOAD_LIMIT_BYTES:
        raise UserError(f"upload {name}: {size / 2**20:.1f} MiB exceeds the limit of "
                        f"{UPLOAD_LIMIT_BYTES / 2**20:.0f} MiB")
    return name
