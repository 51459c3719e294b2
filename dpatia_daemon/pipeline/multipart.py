"""An incremental ``multipart/*`` parser: bytes in, in any chunking; part events out.

``GET slides/{id}/files`` answers several files as ``multipart/related`` (IA-API.md
§2.4; some SPS stand-ins send ``multipart/form-data``), and a whole-slide image can be
many GiB, so the body is parsed as it arrives.  :class:`MultipartParser` is a small
push parser with no I/O and no Twisted: :meth:`~MultipartParser.feed` takes the next
bytes (one byte or a megabyte) and returns the events they complete, in order:

    :class:`PartStart` (the part's parsed headers) → :class:`PartData` … →
    :class:`PartEnd`, once per part.

Memory stays bounded whatever the body weighs: inside a part it holds back at most
``len(delimiter) - 1`` bytes (a delimiter may be split across chunks), part headers
are capped (``max_header_bytes``), the preamble is discarded as it streams past (and
capped, ``max_preamble_bytes``, so a body that is not multipart fails fast).

What it accepts and refuses (RFC 2046 §5.1.1, and what Sectra's own parser trips on):

* The body may start with the dash-boundary at once, or after a preamble (for
  example the stray leading CRLF some servers send); the preamble is ignored.
* Transport padding (spaces, tabs) after a delimiter is allowed; anything else on
  the delimiter line is an error.
* A part's ``Content-Length``, when given, must match the bytes between its headers
  and the next delimiter (checked as the bytes arrive, so a lie fails early).
* The closing delimiter ``--boundary--`` ends the body; whatever follows it (CRLF,
  an epilogue) is **tolerated and discarded**, as RFC 2046 says it must be ignored.
  The Sectra example parser rejects an epilogue; nothing is gained by being stricter
  than the RFC after the last byte we need has arrived.
* **Truncation is an error**: :meth:`~MultipartParser.close` raises
  :class:`MultipartError` unless the closing delimiter was seen.

The header helpers (:func:`parse_content_type`, :func:`disposition_filename`,
:func:`decode_header`) are shared with the single-file download, whose name also
comes from a ``Content-Disposition`` header; :class:`SinglePart` presents such a body
as the events of one part.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import unquote

from attrs import frozen

__all__ = [
    "Event",
    "MultipartError",
    "MultipartParser",
    "PartData",
    "PartEnd",
    "PartHeaders",
    "PartStart",
    "SinglePart",
    "decode_header",
    "disposition_filename",
    "multipart_boundary",
    "parse_content_type",
    "parse_params",
]

_CRLF: Final = b"\r\n"
_WSP: Final = b" \t"
#: RFC 2046 caps boundaries at 70 characters; some servers use longer ones.
_MAX_BOUNDARY: Final = 200
#: How long the rest of a delimiter line (transport padding) may be.
_MAX_PADDING: Final = 1024
#: A part's Content-Length has at most this many digits (up to an exabyte).
_MAX_LENGTH_DIGITS: Final = 18


class MultipartError(ValueError):
    """The body is not a well-formed ``multipart/*`` body (or breaks a limit)."""


# --- header values ----------------------------------------------------------------------


def parse_params(text: str) -> list[tuple[str, str]]:
    """Parse ``; name=value; name="quoted"`` parameters into ``(lower name, value)``.

    Inside a quoted string ``\\"`` and ``\\\\`` are escapes; a backslash before any
    other character is kept as it is, because some senders put unescaped Windows paths
    (``"C:\\dir\\x.dcm"``) in ``filename`` and the sanitiser must still see the
    backslashes.  A parameter without ``=`` is kept with an empty value.
    """
    params: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t;":
            i += 1
        if i >= n:
            break
        start = i
        while i < n and text[i] not in "=;":
            i += 1
        name = text[start:i].strip().lower()
        value = ""
        if i < n and text[i] == "=":
            i += 1
            while i < n and text[i] in " \t":
                i += 1
            if i < n and text[i] == '"':
                i += 1
                out: list[str] = []
                while i < n and text[i] != '"':
                    c = text[i]
                    if c == "\\" and i + 1 < n and text[i + 1] in '"\\':
                        out.append(text[i + 1])
                        i += 2
                        continue
                    out.append(c)
                    i += 1
                i += 1  # the closing quote (a missing one ends the value at the end)
                value = "".join(out)
                while i < n and text[i] != ";":
                    i += 1
            else:
                start = i
                while i < n and text[i] != ";":
                    i += 1
                value = text[start:i].strip()
        if name:
            params.append((name, value))
    return params


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a ``Content-Type`` into its lower-case media type and parameters.

    Parameter names are lower-cased; the first occurrence of a name wins.
    """
    media, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for name, val in parse_params(rest):
        params.setdefault(name, val)
    return media.strip().lower(), params


def multipart_boundary(content_type: str | None) -> str | None:
    """The boundary of a ``multipart/*`` content type, or ``None`` if it is not multipart.

    Any ``multipart/*`` subtype is accepted (``related``, ``form-data``, ``mixed``…).
    Raises :class:`MultipartError` for a multipart type without a usable boundary.
    """
    if not content_type:
        return None
    media, params = parse_content_type(content_type)
    if not media.startswith("multipart/"):
        return None
    boundary = params.get("boundary", "")
    _check_boundary(boundary)
    return boundary


def _check_boundary(boundary: str) -> bytes:
    """The boundary as bytes, or :class:`MultipartError` if it cannot be one."""
    if not boundary:
        raise MultipartError("multipart content type without a boundary")
    if len(boundary) > _MAX_BOUNDARY:
        raise MultipartError(f"multipart boundary longer than {_MAX_BOUNDARY} characters")
    try:
        raw = boundary.encode("ascii")
    except UnicodeEncodeError:
        raise MultipartError("multipart boundary is not ASCII") from None
    if any(b < 0x20 or b == 0x7F for b in raw):
        raise MultipartError("multipart boundary contains control characters")
    return raw


def _decode_ext_value(value: str) -> str | None:
    """Decode an RFC 5987 ext-value (``UTF-8''%e2%82%ac.svs``); ``None`` if malformed."""
    charset, sep, rest = value.partition("'")
    if not sep:
        return None
    _lang, sep, encoded = rest.partition("'")
    if not sep:
        return None
    charset = charset.strip().lower() or "utf-8"
    if charset not in ("utf-8", "utf8", "iso-8859-1", "latin-1", "latin1", "us-ascii"):
        return None
    try:
        return unquote(encoded, encoding=charset, errors="strict")
    except (UnicodeDecodeError, LookupError):
        return None


def decode_header(raw: bytes) -> str:
    """A header value as text: UTF-8 if it is, else latin-1 (which keeps every byte)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def disposition_filename(value: str | None) -> str | None:
    """The file name a ``Content-Disposition`` value gives, unsanitised, or ``None``.

    ``filename*`` (RFC 5987/6266, e.g. ``filename*=UTF-8''x%20y.svs``) wins over
    ``filename`` when it decodes.  The result is whatever the server sent: pass it
    through :func:`dpatia_daemon.pipeline.filenames.safe_name` before it touches a path.
    """
    if not value:
        return None
    _, _, rest = value.partition(";")
    params = dict(reversed(parse_params(rest)))  # first occurrence wins
    extended = params.get("filename*")
    if extended is not None:
        decoded = _decode_ext_value(extended)
        if decoded is not None:
            return decoded
    return params.get("filename")


# --- part headers -----------------------------------------------------------------------


@frozen
class PartHeaders:
    """The headers of one part, in order, names lower-cased."""

    fields: tuple[tuple[str, str], ...] = ()

    def get(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        name = name.lower()
        for key, value in self.fields:
            if key == name:
                return value
        return None

    @property
    def content_type(self) -> str | None:
        """The part's ``Content-Type`` value, or ``None``."""
        return self.get("content-type")

    @property
    def content_length(self) -> int | None:
        """The part's ``Content-Length``, or ``None`` (validated when parsed)."""
        value = self.get("content-length")
        return None if value is None else int(value)

    @property
    def filename(self) -> str | None:
        """The unsanitised file name: ``Content-Disposition`` ``filename*``/``filename``,
        else a ``name`` parameter of ``Content-Type`` (older senders), else ``None``."""
        name = disposition_filename(self.get("content-disposition"))
        if name is None and self.content_type:
            name = parse_content_type(self.content_type)[1].get("name")
        return name

    @classmethod
    def parse(cls, block: bytes) -> PartHeaders:
        """Parse a header block (without its final empty line); obsolete folding allowed."""
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            # Raw 8-bit file names are common; latin-1 never fails and keeps every byte.
            text = block.decode("latin-1")
        fields: list[tuple[str, str]] = []
        for line in text.split("\r\n"):
            if not line:
                continue
            if line[0] in " \t":
                if not fields:
                    raise MultipartError("part headers start with a continuation line")
                name, value = fields[-1]
                fields[-1] = (name, f"{value} {line.strip()}")
                continue
            name, colon, value = line.partition(":")
            name = name.strip()
            if not colon or not name or any(c in name for c in " \t"):
                raise MultipartError(f"malformed part header line {line[:80]!r}")
            fields.append((name.lower(), value.strip()))
        headers = cls(tuple(fields))
        length = headers.get("content-length")
        if length is not None and not (length.isascii() and length.isdigit()):
            raise MultipartError(f"part Content-Length is not a number: {length[:40]!r}")
        if length is not None and len(length) > _MAX_LENGTH_DIGITS:
            # int() of thousands of digits is a ValueError of its own (and no part
            # is an exabyte).
            raise MultipartError(f"part Content-Length is too large: {length[:40]}...")
        return headers


# --- events -----------------------------------------------------------------------------


@frozen
class PartStart:
    """A part begins; ``index`` counts parts from 0."""

    index: int
    headers: PartHeaders


@frozen
class PartData:
    """The next bytes of part ``index`` (never empty)."""

    index: int
    data: bytes


@frozen
class PartEnd:
    """Part ``index`` is complete; ``size`` is its body length in bytes."""

    index: int
    size: int


Event = PartStart | PartData | PartEnd

# Parser states.
_PREAMBLE: Final = 0
_AFTER_DELIMITER: Final = 1
_HEADERS: Final = 2
_BODY: Final = 3
_EPILOGUE: Final = 4


class MultipartParser:
    """Push parser of one ``multipart/*`` body delimited by ``boundary``.

    Call :meth:`feed` with each chunk as it arrives and act on the events it returns;
    call :meth:`close` when the body ended, which raises :class:`MultipartError` if the
    closing delimiter never came.  Any malformation raises :class:`MultipartError`
    from :meth:`feed`, after which the parser must not be fed again.
    """

    def __init__(
        self,
        boundary: str | bytes,
        *,
        max_header_bytes: int = 16 * 1024,
        max_preamble_bytes: int = 64 * 1024,
        max_parts: int = 1_000_000,
    ) -> None:
        """Prepare to parse a body with ``boundary`` (without the leading ``--``)."""
        if isinstance(boundary, bytes):
            boundary = boundary.decode("ascii", errors="replace")
        self._delimiter = _CRLF + b"--" + _check_boundary(boundary)
        self._max_header_bytes = max_header_bytes
        self._max_preamble_bytes = max_preamble_bytes
        self._max_parts = max_parts
        # A virtual CRLF in front of the body: the dash-boundary at the very start is
        # then found by the same search as every later delimiter.
        self._buffer = _CRLF
        self._state = _PREAMBLE
        self._preamble = -len(_CRLF)
        self._index = -1
        self._size = 0
        self._declared: int | None = None

    @property
    def finished(self) -> bool:
        """Whether the closing delimiter has been seen (the rest is epilogue)."""
        return self._state == _EPILOGUE

    @property
    def parts(self) -> int:
        """How many parts have started so far."""
        return self._index + 1

    @property
    def buffered(self) -> int:
        """How many bytes the parser holds back right now (for tests of its bound)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Event]:
        """Consume ``data``; return the events it completes, in order."""
        if self._state == _EPILOGUE:
            return []
        events: list[Event] = []
        buffer = self._buffer + data if self._buffer else bytes(data)
        while True:
            state = self._state
            if state == _BODY:
                buffer = self._body(buffer, events)
            elif state == _AFTER_DELIMITER:
                buffer = self._after_delimiter(buffer)
            elif state == _HEADERS:
                buffer = self._headers(buffer, events)
            elif state == _PREAMBLE:
                buffer = self._preamble_step(buffer)
            else:  # _EPILOGUE: ignored, not kept
                buffer = b""
            if self._state == state:
                break  # no progress without more bytes
        self._buffer = buffer
        return events

    def close(self) -> list[Event]:
        """The body ended: return nothing more, or raise if it was cut short."""
        if self._state == _EPILOGUE:
            return []
        part = self._index + 1
        where = {
            _PREAMBLE: "before the first boundary",
            _AFTER_DELIMITER: f"right after the boundary of part {part}",
            _HEADERS: f"in the headers of part {part}",
            _BODY: f"in part {part} after {self._size} bytes",
        }[self._state]
        raise MultipartError(f"truncated multipart body: it ended {where}")

    # --- states -------------------------------------------------------------------------

    def _preamble_step(self, buffer: bytes) -> bytes:
        i = buffer.find(self._delimiter)
        if i < 0:
            keep = len(self._delimiter) - 1
            dropped = max(0, len(buffer) - keep)
            self._preamble += dropped
            if self._preamble > self._max_preamble_bytes:
                raise MultipartError(
                    f"no multipart boundary in the first {self._max_preamble_bytes} bytes"
                )
            return buffer[dropped:]
        self._state = _AFTER_DELIMITER
        return buffer[i + len(self._delimiter) :]

    def _after_delimiter(self, buffer: bytes) -> bytes:
        if buffer[:2] == b"--":
            self._state = _EPILOGUE
            return b""
        if buffer[:1] == b"-" and len(buffer) == 1:
            return buffer  # "--" split across chunks
        eol = buffer.find(_CRLF)
        if eol < 0:
            if len(buffer) > _MAX_PADDING or buffer.strip(_WSP + b"\r"):
                raise MultipartError(
                    "unexpected bytes after a multipart boundary (a boundary inside the data?)"
                )
            return buffer
        if buffer[:eol].strip(_WSP):
            raise MultipartError(
                "unexpected bytes after a multipart boundary (a boundary inside the data?)"
            )
        if self._index + 1 >= self._max_parts:
            raise MultipartError(f"more than {self._max_parts} parts")
        self._state = _HEADERS
        return buffer[eol + 2 :]

    def _headers(self, buffer: bytes, events: list[Event]) -> bytes:
        if buffer[:2] == _CRLF:
            block, rest = b"", buffer[2:]
        elif len(buffer) < 2:
            return buffer
        else:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > self._max_header_bytes:
                    raise MultipartError(f"part headers longer than {self._max_header_bytes} bytes")
                return buffer
            if end > self._max_header_bytes:
                raise MultipartError(f"part headers longer than {self._max_header_bytes} bytes")
            block, rest = buffer[:end], buffer[end + 4 :]
        headers = PartHeaders.parse(block)
        self._index += 1
        self._size = 0
        self._declared = headers.content_length
        self._state = _BODY
        events.append(PartStart(self._index, headers))
        return rest

    def _body(self, buffer: bytes, events: list[Event]) -> bytes:
        delimiter = self._delimiter
        i = buffer.find(delimiter)
        if i >= 0:
            if i:
                self._emit(buffer[:i], events)
            if self._declared is not None and self._size != self._declared:
                raise MultipartError(
                    f"part {self._index + 1} has {self._size} bytes, "
                    f"its Content-Length says {self._declared}"
                )
            events.append(PartEnd(self._index, self._size))
            self._state = _AFTER_DELIMITER
            return buffer[i + len(delimiter) :]
        # No whole delimiter: everything is data except a tail that could be the
        # start of one (split across chunks): one that begins with CR and is a prefix
        # of the delimiter.  Usually there is none and the chunk goes on as it is,
        # uncopied (copying MiB chunks cost more CPU than the parsing).
        cr = buffer.find(b"\r", max(0, len(buffer) - len(delimiter) + 1))
        while cr >= 0 and not delimiter.startswith(buffer[cr:]):
            cr = buffer.find(b"\r", cr + 1)
        if cr < 0:
            if buffer:
                self._emit(buffer, events)
            return b""
        if cr:
            self._emit(buffer[:cr], events)
        return buffer[cr:]

    def _emit(self, data: bytes, events: list[Event]) -> None:
        self._size += len(data)
        if self._declared is not None and self._size > self._declared:
            raise MultipartError(
                f"part {self._index + 1} is longer than its Content-Length ({self._declared})"
            )
        events.append(PartData(self._index, data))


class SinglePart:
    """Presents a non-multipart body as the events of one part (a parser look-alike).

    The download handles both answer forms alike: a single file is part 0, its headers
    the ones the caller builds from the response's.
    """

    def __init__(self, headers: PartHeaders) -> None:
        self._headers = headers
        self._started = False
        self._size = 0

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        if not self._started:
            self._started = True
            events.append(PartStart(0, self._headers))
        self._size += len(data)
        events.append(PartData(0, data))
        return events

    def close(self) -> list[Event]:
        events: list[Event] = []
        if not self._started:
            self._started = True
            events.append(PartStart(0, self._headers))
        events.append(PartEnd(0, self._size))
        return events
