"""Bounded texts: every message that crosses a pipe, a log line or the SPS is cut here."""

from __future__ import annotations

#: Longest error message sent over AMP (characters); the rest is cut.
MAX_MESSAGE = 4000
#: Longest progress text sent over AMP (characters).
MAX_PROGRESS_TEXT = 200


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when it was longer."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
