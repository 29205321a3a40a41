"""Printing benchmark results: a rich table plus peak memory, the same way for every benchmark."""

from __future__ import annotations

import csv
import io
import resource
import sys
from typing import Any

from rich.console import Console
from rich.table import Table


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    """Print a table of results to stdout."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column != columns[0] else "left")
    for row in rows:
        table.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row])
    Console(width=None if sys.stdout.isatty() else 250).print(table)  # a log file gets every column


def csv_text(rows: list[dict[str, Any]]) -> str:
    """CSV of dict rows (columns: every key, in order of appearance; floats with 6 significant digits)."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows([{k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows])
    return buffer.getvalue()
