"""User errors and their one-line messages.

A `UserError` is something the user can fix: a missing or corrupt file, a bad manifest, a bad
config value. Its message is one line that names the file or field and the problem. The CLI
prints it without a traceback and exits with code 2. `one_line` and `validation_message` are the
only places where exceptions of other libraries become such text.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class UserError(Exception):
    """A user-fixable problem; `str(err)` is a one-line message naming the file or field."""


def without_worker_traceback(err: UserError) -> UserError:
    """A UserError raised in a DataLoader worker reaches the main process with the worker's traceback in its
    message ("Caught UserError in DataLoader worker process 0. Original Traceback ..."): the original
    message alone, saying where it arose. Any other UserError is returned as it is."""
    text = str(err)
    if "Original Traceback" not in text:
        return err
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    message = last.split(f"{UserError.__name__}: ", 1)[-1]
    return UserError(f"{message} (in a data-loading worker)")


def one_line(err: BaseException, *, with_type: bool = False) -> str:
    """`err`'s message with every run of whitespace (newlines included) collapsed to one space."""
    text = f"{type(err).__name__}: {err}" if with_type else str(err)
    return " ".join(text.split())


def location(loc: tuple[Any, ...], prefix: str = "") -> str:
    """A pydantic location as the key the user wrote: ('training', 3, 'patient_id') -> 'training[3].patient_id';
    `prefix` names the section that was validated alone (e.g. "data")."""
    text = prefix
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def describe_error(error: dict[str, Any], prefix: str = "") -> str:
    """One pydantic error (an item of `ValidationError.errors()`) as 'unknown key ...', 'missing key ...',
    "field '...': what is wrong (got <type> <value>)", or a cross-field check's own message."""
    if not error["loc"]:  # a check across fields (a model validator): its message names the fields itself
        return error["msg"].removeprefix("Value error, ")
    key = location(error["loc"], prefix)
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if error["type"] == "missing":
        return f"missing key '{key}'"
    got = error.get("input")
    shown = repr(got) if len(repr(got)) <= 40 else repr(got)[:37] + "..."
    message = error["msg"].removeprefix("Value error, ")
    return f"field '{key}': {message} (got {type(got).__name__} {shown})"


def validation_message(err: ValidationError, prefix: str = "") -> str:
    """Every error of a pydantic validation on one line, separated by '; '; keys start with `prefix`."""
    return "; ".join(describe_error(e, prefix) for e in err.errors())
