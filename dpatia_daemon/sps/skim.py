"""Parse a large SPS answer without parsing the result contents in it.

The SPS answers every result call with the whole result (``ResultResponse``), and a
model's result content can be many MiB: thousands of shapes.  The daemon never reads a
stored result's content (it needs ids, versions, contexts and display properties), but
``json.loads`` of a 5.5 MB echo builds about 45 MB of lists and dicts on the reactor
thread.  :func:`skim` finds where each ``data.result.content`` value begins and ends
with a vectorised scan of the bytes (numpy: strings and brackets, then depths), parses
only the rest, and puts each content back as :class:`~dpatia_daemon.models.RawJSON`,
its text as the SPS sent it, which :func:`~dpatia_daemon.models.dumps` splices back
unchanged if the result is ever sent on.

A skimmed content is checked only for balanced brackets and strings and valid UTF-8,
not parsed.  Whenever the scan cannot vouch for a span (odd quotes, unbalanced
brackets, anything unexpected), :func:`skim` parses the whole body instead: it never
answers differently from ``json.loads`` except that the contents stay text.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any

from ..models import RawJSON

#: Below this, an answer is parsed whole: the scan would not pay for itself.
SKIM_BYTES = 1 << 20

#: Where a result's content sits in a ``ResultResponse``.
CONTENT_PATH = ("data", "result", "content")

#: A body with more backslashes than this is parsed whole (the escapes are found one by
#: one in Python; a result body has almost none).
_MAX_BACKSLASHES = 100_000

_WHITESPACE = b" \t\r\n"


def skim(body: bytes, *, array: bool = False, min_bytes: int = SKIM_BYTES) -> Any:
    """``json.loads(body)``, with the content of the result (``array``: of each result
    of the array) left as RawJSON text when ``body`` is at least ``min_bytes`` long.

    Raises ValueError for a body that is not JSON, as ``json.loads`` does.
    """
    if len(body) < min_bytes:
        return json.loads(body)
    spans = _content_spans(body, array)
    if not spans:
        return json.loads(body)
    nonce = secrets.token_hex(16)
    pieces: list[bytes] = []
    texts: dict[str, RawJSON] = {}
    at = 0
    for n, (start, end) in enumerate(spans):
        marker = f"{nonce}:{n}"
        try:
            texts[marker] = RawJSON(body[start:end].decode("utf-8"))
        except UnicodeDecodeError:
            return json.loads(body)  # raises as json.loads does for bad UTF-8
        pieces += [body[at:start], b'"', marker.encode("ascii"), b'"']
        at = end
    pieces.append(body[at:])
    try:
        data = json.loads(b"".join(pieces))
    except ValueError:
        return json.loads(body)  # the plain parse says what is wrong (or copes: UTF-16)
    found = 0
    for item in data if array and isinstance(data, list) else [data]:
        holder = _holder(item)
        value = holder.get(CONTENT_PATH[-1]) if holder is not None else None
        if isinstance(value, str) and value in texts:
            holder[CONTENT_PATH[-1]] = texts[value]  # type: ignore[index]
            found += 1
    if found != len(spans):
        # A span the parse did not put where the scan said (cannot happen for valid
        # JSON; never guess): the plain parse.
        return json.loads(body)
    return data


def _holder(item: Any) -> dict[str, Any] | None:
    """The ``data.result`` object of a parsed result, if it has one."""
    for key in CONTENT_PATH[:-1]:
        if not isinstance(item, dict):
            return None
        item = item.get(key)
    return item if isinstance(item, dict) else None


def _content_spans(body: bytes, array: bool) -> list[tuple[int, int]]:
    """The byte spans of the content values worth leaving as text ([] if none, or if
    the scan cannot vouch for the body's structure)."""
    import numpy as np  # only the daemon's large answers need it

    a = np.frombuffer(body, np.uint8)
    quotes = np.flatnonzero(a == ord('"'))
    slashes = np.flatnonzero(a == ord("\\"))
    if slashes.size:
        if slashes.size > _MAX_BACKSLASHES:
            return []
        quotes = np.setdiff1d(quotes, _escaped_quotes(body, slashes.tolist()), assume_unique=True)
    if quotes.size % 2:
        return []
    table = np.zeros(256, np.int8)
    table[[ord("{"), ord("[")]] = 1
    table[[ord("}"), ord("]")]] = -1
    brackets = np.flatnonzero(table[a])
    # A bracket after an odd number of quotes is inside a string.
    brackets = brackets[np.searchsorted(quotes, brackets) % 2 == 0]
    steps = table[a[brackets]].astype(np.int32)
    depths = np.cumsum(steps)  # the depth after each bracket
    if depths.size == 0 or depths[-1] != 0 or depths.min() < 0:
        return []
    scan = _Scan(body, quotes, brackets, depths)
    top = scan.first_value(0)
    if top is None:
        return []
    spans: list[tuple[int, int]] = []
    if array:
        if body[top : top + 1] != b"[":
            return []
        for item in scan.items(scan.index_of(top)):
            span = scan.path(item, CONTENT_PATH)
            if span is not None:
                spans.append(span)
    elif body[top : top + 1] == b"{":
        span = scan.path(scan.index_of(top), CONTENT_PATH)
        if span is not None:
            spans.append(span)
    return spans


def _escaped_quotes(body: bytes, slashes: Sequence[int]) -> list[int]:
    """The positions of the quotes escaped by a backslash (``\\\\"`` is not one)."""
    escaped: list[int] = []
    taken = -1  # the position the last escaping backslash escapes
    for i in slashes:
        if i == taken:
            continue  # an escaped backslash escapes nothing
        taken = i + 1
        if body[taken : taken + 1] == b'"':
            escaped.append(taken)
    return escaped


class _Scan:
    """Navigation over a body's structure: its unescaped quotes, its brackets outside
    strings, and the depth after each bracket."""

    def __init__(self, body: bytes, quotes: Any, brackets: Any, depths: Any) -> None:
        self.body = body
        self.quotes = quotes
        self.brackets = brackets
        self.depths = depths

    def first_value(self, at: int) -> int | None:
        """The position of the first non-whitespace byte from ``at``."""
        body = self.body
        while at < len(body) and body[at] in _WHITESPACE:
            at += 1
        return at if at < len(body) else None

    def index_of(self, position: int) -> int:
        """The index, among the brackets, of the bracket at ``position``."""
        return int(self.brackets.searchsorted(position))

    def close_of(self, k: int) -> int:
        """The index of the bracket closing the one opened at index ``k``."""
        level = self.depths[k] - 1
        after = (self.depths[k + 1 :] == level).nonzero()[0]
        return k + 1 + int(after[0])

    def items(self, k: int) -> list[int]:
        """The bracket indices of the objects directly inside the array opened at ``k``."""
        close = self.close_of(k)
        level = self.depths[k] + 1
        opens = (self.depths[k + 1 : close] == level).nonzero()[0] + k + 1
        return [int(i) for i in opens if self.body[self.brackets[i]] == ord("{")]

    def path(self, k: int, keys: Sequence[str]) -> tuple[int, int] | None:
        """The span of the object or array at ``keys`` below the object opened at
        ``k`` (None if it is missing, or a scalar: nothing worth skimming)."""
        body = self.body
        for i, key in enumerate(keys):
            value = self._member(k, key)
            if value is None:
                return None
            if i == len(keys) - 1:
                if body[value] not in b"{[":
                    return None
                return value, int(self.brackets[self.close_of(self.index_of(value))]) + 1
            if body[value] != ord("{"):
                return None
            k = self.index_of(value)
        return None

    def _member(self, k: int, key: str) -> int | None:
        """Where the value of ``key`` begins in the object opened at index ``k`` (its
        last occurrence, as ``json.loads`` keeps the last of repeated keys)."""
        start = int(self.brackets[k])
        end = int(self.brackets[self.close_of(k)])
        level = self.depths[k]
        opening = self.quotes[0::2]
        lo, hi = opening.searchsorted([start, end])
        # A string directly in this object: the bracket before it leaves the object's depth.
        before = self.brackets.searchsorted(opening[lo:hi]) - 1
        direct = (self.depths[before] == level).nonzero()[0] + lo
        found = None
        body = self.body
        wanted = json.dumps(key).encode("utf-8")
        for s in direct.tolist():
            q0, q1 = int(self.quotes[2 * s]), int(self.quotes[2 * s + 1])
            colon = self.first_value(q1 + 1)
            if colon is None or body[colon] != ord(":"):
                continue  # a string value, not a key
            text = body[q0 : q1 + 1]
            if text == wanted or (b"\\" in text and _key(text) == key):
                found = self.first_value(colon + 1)
        return found


def _key(text: bytes) -> str | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


__all__ = ["CONTENT_PATH", "SKIM_BYTES", "skim"]
