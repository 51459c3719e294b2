"""The multipart parser under adversarial input: any bytes in any chunking raise
nothing but :class:`MultipartError`, memory stays bounded, well-formed bodies come
back exactly whatever the chunking, and a boundary inside a part's content never
passes unnoticed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpatia_daemon.pipeline.multipart import (
    MultipartError,
    MultipartParser,
    PartData,
    PartEnd,
    PartHeaders,
    PartStart,
    disposition_filename,
    multipart_boundary,
    parse_content_type,
)

from .conftest import PROFILE

BOUNDARY = "b0und4ry"
DELIMITER = b"\r\n--" + BOUNDARY.encode()
HEADER_CAP = 1024


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def _parse(data: bytes, cuts: list[int]) -> list[tuple[tuple[tuple[str, str], ...], bytes]]:
    """The parts of ``data`` fed in the chunks ``cuts`` make; checks the bound."""
    parser = MultipartParser(BOUNDARY, max_header_bytes=HEADER_CAP, max_preamble_bytes=4096)
    parts: list[tuple[tuple[tuple[str, str], ...], bytes]] = []
    current = b""
    events = []
    for chunk in _chunks(data, cuts):
        events += parser.feed(chunk)
        # Held back: a possible delimiter, a header block, or transport padding.
        assert parser.buffered <= max(HEADER_CAP + 4, len(DELIMITER) + 1024 + 2, len(chunk) + 2)
    events += parser.close()
    for event in events:
        if isinstance(event, PartStart):
            parts.append((event.headers.fields, b""))
            current = b""
        elif isinstance(event, PartData):
            assert event.data
            current += event.data
        elif isinstance(event, PartEnd):
            assert event.size == len(current)
            parts[-1] = (parts[-1][0], current)
    return parts


def _body(parts: list[tuple[list[tuple[str, str]], bytes]], preamble: bytes = b"") -> bytes:
    out = preamble + b"--" + BOUNDARY.encode()
    for headers, content in parts:
        out += b"\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers) + b"\r\n"
        out += content + DELIMITER
    return out + b"--\r\n"


content = st.binary(max_size=300).filter(
    lambda b: DELIMITER not in b + b"\r\n--"
) | st.sampled_from(
    [b"--" + BOUNDARY.encode(), b"\r\n--" + BOUNDARY[:-1].encode(), b"\r\n-", b"\r", b"\r\n"]
).filter(lambda b: DELIMITER not in b + DELIMITER[:-1])
header_value = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=40).map(str.strip)
headers = st.lists(
    st.tuples(st.sampled_from(["content-type", "content-disposition", "x-thing"]), header_value),
    max_size=3,
)


@PROFILE
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 4000), max_size=8))
def test_any_bytes_raise_only_multipart_error(data: bytes, cuts: list[int]) -> None:
    """Random bytes, any chunking: either parts or MultipartError, never another error."""
    try:
        _parse(data, cuts)
    except MultipartError:
        pass


@PROFILE
@given(
    pieces=st.lists(
        st.sampled_from(
            [
                b"--" + BOUNDARY.encode(),
                DELIMITER,
                b"--",
                b"\r\n",
                b"\r\n\r\n",
                b" \t",
                b"Content-Length: 3",
                b"Content-Length: " + b"9" * 5000,
                b"Content-Length: -1",
                b"Content-Length: \xd9\xa3",
                b"content-disposition: form-data; filename*=x''%ff",
                b'Content-Type: text/plain; name="a\\"b"',
                b": novalue",
                b" folded",
                b"\x00",
                b"\xff\xfe",
                b"x" * 100,
            ]
        ),
        max_size=20,
    ),
    cuts=st.lists(st.integers(0, 4000), max_size=6),
)
def test_structured_garbage_raises_only_multipart_error(
    pieces: list[bytes], cuts: list[int]
) -> None:
    """Delimiters, header lines, lies about lengths and odd bytes glued together:
    parts or MultipartError, nothing else."""
    try:
        _parse(b"".join(pieces), cuts)
    except MultipartError:
        pass


@PROFILE
@given(
    parts=st.lists(st.tuples(headers, content), min_size=1, max_size=4),
    preamble=st.sampled_from([b"", b"\r\n", b"preamble text\r\n"]),
    cuts=st.lists(st.integers(0, 4000), max_size=10),
)
def test_well_formed_bodies_come_back_exactly_in_any_chunking(
    parts: list[tuple[list[tuple[str, str]], bytes]], preamble: bytes, cuts: list[int]
) -> None:
    """Any contents (boundary look-alikes included), any headers (none at all
    included), any chunking: the same parts, byte for byte."""
    parsed = _parse(_body(parts, preamble), cuts)
    assert [data for _, data in parsed] == [data for _, data in parts]
    assert [fields for fields, _ in parsed] == [tuple((k, v) for k, v in h) for h, _ in parts]


@PROFILE
@given(
    before=st.binary(max_size=50).filter(lambda b: DELIMITER not in b),
    after=st.binary(min_size=1, max_size=50),
    cuts=st.lists(st.integers(0, 400), max_size=5),
)
def test_a_boundary_inside_content_is_never_silently_absorbed(
    before: bytes, after: bytes, cuts: list[int]
) -> None:
    """A part whose content holds the delimiter is not read back as that content:
    the parse fails or yields other parts (the delimiter always ends a part)."""
    original = before + DELIMITER + after
    body = _body([([("content-type", "application/octet-stream")], original)])
    try:
        parsed = _parse(body, cuts)
    except MultipartError:
        return
    assert [data for _, data in parsed] != [original]


def test_a_huge_content_length_is_a_multipart_error() -> None:
    """Regression: a Content-Length of 5000 digits was a bare ValueError (Python's
    limit on int() of long strings), which callers do not expect."""
    body = (
        b"--"
        + BOUNDARY.encode()
        + b"\r\nContent-Length: "
        + b"9" * 5000
        + b"\r\n\r\nx"
        + DELIMITER
        + b"--"
    )
    parser = MultipartParser(BOUNDARY)
    with pytest.raises(MultipartError):
        parser.feed(body)
        parser.close()


@PROFILE
@given(
    value=st.text(max_size=80)
    | st.sampled_from(
        [
            "multipart/related",
            "multipart/related; boundary=",
            'multipart/x; boundary="' + "a" * 300 + '"',
            "multipart/x; boundary=\u00e9",
            'multipart/x; boundary="a\x01b"',
            "MULTIPART/RELATED; BOUNDARY=Ab",
        ]
    )
)
def test_content_type_helpers_never_raise_but_multipart_error(value: str) -> None:
    """Any Content-Type text: a media type and parameters, a boundary or a
    MultipartError; any Content-Disposition: a name or None."""
    media, params = parse_content_type(value)
    assert media == media.lower()
    try:
        multipart_boundary(value)
    except MultipartError:
        pass
    name = disposition_filename(value)
    assert name is None or isinstance(name, str)
    PartHeaders(fields=(("content-type", value),)).filename  # noqa: B018 (must not raise)
