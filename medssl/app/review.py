"""The clinician review table: one CSV row per verdict on a map.

Columns (`COLUMNS`): time (ISO 8601), run, checkpoint, image, phrase, verdict (one of `VERDICTS`),
comment, reviewer (who judged; required), true_location_mm (the RAS point where the reviewer says the
finding is, "x y z", or empty). A table written before the last two columns existed (`LEGACY_COLUMNS`) is
read with them empty and rewritten with them at the next append. Appending is atomic and safe across processes: an
exclusive `fcntl.flock` on `<csv>.lock`
serialises writers, each of which reads the table, writes it plus the new row to a temporary sibling and
renames it over the table (`medssl.atomic`). Readers need no lock: they always see a complete file.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medssl.atomic import atomic_path
from medssl.errors import UserError, validation_message

VERDICTS = ("right", "wrong_region", "should_not_be_groundable")
LEGACY_COLUMNS = ("time", "run", "checkpoint", "image", "phrase", "verdict", "comment")
COLUMNS = (*LEGACY_COLUMNS, "reviewer", "true_location_mm")


def _is_number(text: str) -> bool:
    try:
        return abs(float(text)) < float("inf")
    except ValueError:
        return False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ReviewRow(BaseModel):
    """One verdict. `time` defaults to now (UTC); `comment` may be empty, the other fields may not."""

    model_config = ConfigDict(extra="forbid")

    time: str = Field(default_factory=_now)
    run: str = Field(min_length=1)
    checkpoint: str = Field(min_length=1)
    image: str = Field(min_length=1)
    phrase: str = Field(min_length=1)
    verdict: Literal["right", "wrong_region", "should_not_be_groundable"]
    comment: str = ""
    reviewer: str = ""
    true_location_mm: str = ""

    @field_validator("true_location_mm")
    @classmethod
    def _point(cls, value: str) -> str:
        parts = value.split()
        if value and (len(parts) != 3 or not all(_is_number(p) for p in parts)):
            raise ValueError(f"expected 'x y z' in mm or nothing, got {value!r}")
        return value

    @field_validator("time")
    @classmethod
    def _iso(cls, value: str) -> str:
        try:
            datetime.fromisoformat(value)
        except ValueError as err:
            raise ValueError(f"not an ISO 8601 time: {value!r}") from err
        return value


def _row(row: ReviewRow | Mapping[str, Any], where: str) -> ReviewRow:
    if isinstance(row, ReviewRow):
        return row
    try:
        return ReviewRow.model_validate(dict(row))
    except ValidationError as err:
        raise UserError(f"{where}: review row: {validation_message(err)}") from err


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock on `<path>.lock` (created if needed) for the duration of the block."""
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_header(path: Path, text: str) -> tuple[str, ...]:
    """The table's columns: `COLUMNS` or `LEGACY_COLUMNS`; UserError for anything else."""
    header = tuple(next(csv.reader(io.StringIO(text)), []))
    if header not in (COLUMNS, LEGACY_COLUMNS):
        raise UserError(f"{path}: not a review table (header {','.join(header)!r}, expected {','.join(COLUMNS)!r})")
    return header


def append_review(csv_path: str | os.PathLike, row: ReviewRow | Mapping[str, Any]) -> ReviewRow:
    """Append one verdict to the table at `csv_path` (created with a header if missing); returns the row
    as stored. UserError for a bad row (naming the field) or a file that is not a review table."""
    path = Path(csv_path)
    row = _row(row, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    with _locked(path):
        existing = read_reviews(path) if path.exists() else []
        writer.writerow(COLUMNS)
        for stored in [*existing, row]:
            writer.writerow([getattr(stored, column) for column in COLUMNS])
        with atomic_path(path) as tmp:
            tmp.write_text(out.getvalue(), encoding="utf-8")
    return row


def read_reviews(csv_path: str | os.PathLike) -> list[ReviewRow]:
    """All rows of the table, in file order; [] when the file does not exist yet."""
    path = Path(csv_path)
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the review table ({type(err).__name__}: {err})") from err
    if not text:
        return []
    columns = _check_header(path, text)
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader)
    rows = []
    for values in reader:
        if len(values) != len(columns):
            raise UserError(f"{path}: line {reader.line_num} has {len(values)} fields, expected {len(columns)}")
        rows.append(_row(dict(zip(columns, values)), f"{path}:{reader.line_num}"))
    return rows


def review_summary(rows: Iterable[ReviewRow | Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per checkpoint: the count of each verdict, "total" and "share_right" (right / total)."""
    summary: dict[str, dict[str, Any]] = {}
    for row in rows:
        row = _row(row, "rows")
        entry = summary.setdefault(row.checkpoint, {**{verdict: 0 for verdict in VERDICTS}, "total": 0})
        entry[row.verdict] += 1
        entry["total"] += 1
    for entry in summary.values():
        entry["share_right"] = entry["right"] / entry["total"]
    return summary
