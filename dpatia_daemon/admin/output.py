"""How the admin commands print: tables for people, JSON for scripts, times as both.

Times in the spool are wall-clock seconds (the daemon's reactor time is ``time.time``);
JSON carries them as ISO 8601 UTC strings, tables as "3 min ago" / "in 25 s".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO


def iso(seconds: float | None) -> str | None:
    """``seconds`` since the epoch as ISO 8601 UTC (to the second), None stays None."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def span(seconds: float) -> str:
    """A duration the way an operator reads it: 42 s, 5 min, 3 h, 2 d."""
    seconds = abs(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def ago(then: float | None, now: float) -> str:
    """ "5 min ago" ("-" for None)."""
    return "-" if then is None else f"{span(now - then)} ago"


def until(then: float | None, now: float) -> str:
    """ "in 25 s", or "now" once passed ("-" for None)."""
    if then is None:
        return "-"
    return "now" if then <= now else f"in {span(then - now)}"


def size(count: int) -> str:
    """Bytes as KiB/MiB/GiB/TiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def clip(text: str | None, width: int = 60) -> str:
    """One line of at most ``width`` characters ("-" for nothing)."""
    if not text:
        return "-"
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def table(out: TextIO, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Columns padded to their widest cell, the last one left ragged."""
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        out.write("  ".join(padded).rstrip() + "\n")


def write_json(out: TextIO, value: Any) -> None:
    """``value`` as indented JSON, one document, a newline at the end."""
    out.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
