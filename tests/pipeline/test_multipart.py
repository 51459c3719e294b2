"""The incremental multipart parser (:mod:`dpatia_daemon.pipeline.multipart`): any chunking,
boundary look-alikes in the data, truncation, limits, header parsing."""

from __future__ import annotations

import email
import email.policy
import random

import pytest

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

BOUNDARY = "b0undary"
DELIMITER = b"\r\n--" + BOUNDARY.encode()

# Data full of near-misses: CRs, CRLFs, dashes, every proper prefix of the delimiter.
TRICKY = b"".join(DELIMITER[:i] + b"x" for i in range(1, len(DELIMITER))) + b"\r\r\n--\r\n-"


def body(
    parts: list[tuple[str, bytes]],
    *,
    boundary: str = BOUNDARY,
    preamble: bytes = b"",
    epilogue: bytes = b"\r\n",
    lengths: bool = True,
) -> bytes:
    """Frame ``parts`` as the SPS does (optionally with a preamble and an epilogue)."""
    out = [preamble]
    for i, (name, data) in enumerate(parts):
        out.append(b"" if i == 0 and not preamble else b"\r\n")
        out.append(f"--{boundary}\r\n".encode())
        out.append(f'Content-Disposition: attachment; filename="{name}"\r\n'.encode())
        out.append(b"Content-Type: application/octet-stream\r\n")
        if lengths:
            out.append(f"Content-Length: {len(data)}\r\n".encode())
        out.append(b"\r\n")
        out.append(data)
    out.append(f"\r\n--{boundary}--".encode())
    out.append(epilogue)
    return b"".join(out)


def parse(raw: bytes, chunks: list[int] | None = None, boundary: str = BOUNDARY) -> list:
    """Feed ``raw`` in pieces of the given sizes (the last size repeats); close."""
    parser = MultipartParser(boundary)
    events = []
    sizes = list(chunks or [len(raw) or 1])
    i = 0
    while i < len(raw):
        n = sizes.pop(0) if len(sizes) > 1 else sizes[0]
        events += parser.feed(raw[i : i + n])
        i += n
    events += parser.close()
    return events


def files(events: list) -> list[tuple[str | None, bytes]]:
    """Reassemble parts from events, checking their order and sizes."""
    out: list[tuple[str | None, bytearray]] = []
    current = None
    for event in events:
        if isinstance(event, PartStart):
            assert current is None and event.index == len(out)
            out.append((event.headers.filename, bytearray()))
            current = event.index
        elif isinstance(event, PartData):
            assert event.index == current and event.data
            out[-1][1].extend(event.data)
        else:
            assert isinstance(event, PartEnd) and event.index == current
            assert event.size == len(out[-1][1])
            current = None
    assert current is None
    return [(name, bytes(data)) for name, data in out]


THREE = [("a.dcm", b"first file " + TRICKY), ("b.dcm", b""), ("c.dcm", bytes(range(256)) * 3)]


# --- chunking -------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, len(DELIMITER) - 1, len(DELIMITER), 64])
def test_three_parts_split_at_every_offset(chunk: int) -> None:
    """A 3-part body parses identically whatever the chunk size and wherever the first
    split falls, so every delimiter is cut at every offset at least once."""
    raw = body(THREE)
    for offset in range(1, chunk + 1):
        assert files(parse(raw, [offset, chunk])) == THREE


def test_every_two_way_split() -> None:
    """Cutting the body in two anywhere gives the same parts."""
    raw = body(THREE, preamble=b"preamble\r\n")
    for cut in range(len(raw) + 1):
        parser = MultipartParser(BOUNDARY)
        events = parser.feed(raw[:cut]) + parser.feed(raw[cut:]) + parser.close()
        assert files(events) == THREE


def test_one_byte_at_a_time_holds_back_little() -> None:
    """Fed byte by byte, the parser never holds more than len(delimiter)-1 bytes of data."""
    payload = (b"y" * 1000 + TRICKY) * 20
    raw = body([("big.bin", payload)])
    parser = MultipartParser(BOUNDARY)
    events = []
    in_body = False
    for i in range(len(raw)):
        for event in parser.feed(raw[i : i + 1]):
            events.append(event)
            in_body = isinstance(event, PartStart | PartData)
        if in_body:
            assert parser.buffered <= len(DELIMITER) - 1
    events += parser.close()
    assert files(events) == [("big.bin", payload)]


def test_chunk_is_passed_on_uncopied_unless_its_tail_may_start_a_delimiter() -> None:
    """Inside a part, a chunk whose last bytes cannot begin the delimiter (a CR near
    the end followed by anything else) comes out whole, as the very object fed; a tail
    that is a prefix of the delimiter is held back until the next chunk decides."""
    parser = MultipartParser(BOUNDARY)
    parser.feed(f"--{BOUNDARY}\r\nContent-Type: x/y\r\n\r\n".encode())
    chunk = b"z" * 1000 + b"\r-x"  # a CR in reach of the end, but no delimiter
    assert [e.data for e in parser.feed(chunk) if isinstance(e, PartData)][0] is chunk
    held = b"z" * 1000 + DELIMITER[:5]
    assert [e.data for e in parser.feed(held) if isinstance(e, PartData)] == [b"z" * 1000]
    assert parser.buffered == 5
    events = parser.feed(DELIMITER[5:] + b"--\r\n") + parser.close()
    assert [type(e) for e in events] == [PartEnd]


def test_random_bodies_agree_with_the_email_package() -> None:
    """Random binary parts (biased to CR, LF, "-") parse back exactly, with any chunking;
    Python's email parser finds the same parts."""
    rng = random.Random(4)
    alphabet = b"\r\n-xb0undary"
    for _ in range(60):
        parts = [
            (f"f{i}.bin", bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 200))))
            for i in range(rng.randrange(1, 5))
        ]
        raw = body(parts, lengths=False)
        if raw.count(DELIMITER) != len(parts):  # a random part happens to hold a delimiter
            continue
        chunk = rng.randrange(1, 40)
        assert files(parse(raw, [chunk])) == parts
        message = email.message_from_bytes(
            b"Content-Type: multipart/related; boundary=" + BOUNDARY.encode() + b"\r\n\r\n" + raw,
            policy=email.policy.HTTP,
        )
        # The email package keeps a part's trailing CRLF/CR only when not before a delimiter.
        assert [p.get_filename() for p in message.iter_parts()] == [n for n, _ in parts]


# --- framing --------------------------------------------------------------------------------


def test_leading_crlf_and_preamble_are_skipped() -> None:
    """A preamble (e.g. the stray leading CRLF some servers send) is ignored."""
    for preamble in (b"\r\n", b"This is a multipart message.\r\n", b"--b0undar\r\n"):
        assert files(parse(body(THREE, preamble=preamble), [3])) == THREE


def test_epilogue_is_tolerated() -> None:
    """After the closing delimiter anything goes (RFC 2046: ignored), even nothing."""
    for epilogue in (b"", b"\r\n", b"\r\nepilogue\r\n--b0undary\r\n garbage"):
        assert files(parse(body(THREE, epilogue=epilogue), [4])) == THREE


def test_transport_padding_after_boundary() -> None:
    """Spaces and tabs after a delimiter are transport padding."""
    raw = body(THREE).replace(b"--b0undary\r\n", b"--b0undary \t \r\n")
    assert files(parse(raw, [5])) == THREE


def test_part_without_headers() -> None:
    """A part with an empty header block has no file name and its data intact."""
    raw = b"--b0undary\r\n\r\nhello\r\n--b0undary--\r\n"
    assert files(parse(raw, [1])) == [(None, b"hello")]


def test_body_with_no_parts() -> None:
    """Only a closing delimiter: zero parts, not an error for the parser."""
    parser = MultipartParser(BOUNDARY)
    assert parser.feed(b"--b0undary--\r\n") == [] and parser.close() == []
    assert parser.finished and parser.parts == 0


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_truncation_anywhere_is_an_error(chunk: int) -> None:
    """A body cut anywhere before its closing delimiter fails at close()."""
    raw = body([("a", b"x\r\n--b0und"), ("b", b""), ("c", b"yz\r")], epilogue=b"")
    for cut in range(len(raw) - 1):  # up to "--b0undary-"
        parser = MultipartParser(BOUNDARY)
        for i in range(0, cut, chunk):
            parser.feed(raw[i : min(cut, i + chunk)])
        with pytest.raises(MultipartError, match="truncated"):
            parser.close()
    parser = MultipartParser(BOUNDARY)
    parser.feed(raw)
    assert parser.close() == []


def test_delimiter_followed_by_garbage_is_an_error() -> None:
    """A full delimiter followed by other text is a boundary inside the data: refused."""
    raw = body([("a", b"x\r\n--b0undaryX-not-a-boundary\r\n")], lengths=False)
    with pytest.raises(MultipartError, match="after a multipart boundary"):
        parse(raw, [7])


def test_missing_first_boundary_is_an_error() -> None:
    """A body that is not multipart fails once the preamble limit is passed."""
    parser = MultipartParser(BOUNDARY, max_preamble_bytes=1000)
    with pytest.raises(MultipartError, match="no multipart boundary"):
        for _ in range(100):
            parser.feed(b"x" * 100)


def test_too_long_headers_are_an_error() -> None:
    """Part headers past max_header_bytes fail (memory stays bounded)."""
    raw = b"--b0undary\r\nX-Long: " + b"a" * 5000
    parser = MultipartParser(BOUNDARY, max_header_bytes=1024)
    with pytest.raises(MultipartError, match="headers longer"):
        for i in range(0, len(raw), 100):
            parser.feed(raw[i : i + 100])


def test_malformed_header_line_is_an_error() -> None:
    """A header line without a colon is refused."""
    with pytest.raises(MultipartError, match="malformed part header"):
        parse(b"--b0undary\r\nno colon here\r\n\r\nx\r\n--b0undary--")


@pytest.mark.parametrize("declared", [0, 3, 4, 100])
def test_part_content_length_must_match(declared: int) -> None:
    """A part whose Content-Length disagrees with its bytes is refused (early if longer)."""
    raw = b"--b0undary\r\nContent-Length: %d\r\n\r\nabcde\r\n--b0undary--" % declared
    with pytest.raises(MultipartError, match="Content-Length"):
        parse(raw, [2])


def test_part_content_length_not_a_number() -> None:
    """A non-numeric part Content-Length is refused."""
    with pytest.raises(MultipartError, match="not a number"):
        parse(b"--b0undary\r\nContent-Length: -5\r\n\r\nabcde\r\n--b0undary--")


def test_max_parts() -> None:
    """More parts than max_parts is an error."""
    parser = MultipartParser(BOUNDARY, max_parts=2)
    with pytest.raises(MultipartError, match="more than 2 parts"):
        parser.feed(body(THREE))


def test_feed_after_finish_is_ignored() -> None:
    """Bytes after the closing delimiter are dropped, not kept."""
    parser = MultipartParser(BOUNDARY)
    parser.feed(body(THREE))
    assert parser.feed(b"x" * 10_000) == [] and parser.buffered == 0


# --- headers and content types -------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        ("multipart/related; boundary=abc", "abc"),
        ('multipart/related; type="application/dicom"; boundary="a b;c"', "a b;c"),
        ("Multipart/Form-Data;boundary=xyz;charset=utf-8", "xyz"),
        ("multipart/mixed; BOUNDARY = q", "q"),
        ("application/octet-stream", None),
        ("image/tiff; boundary=abc", None),
        ("", None),
        (None, None),
    ],
)
def test_multipart_boundary(content_type: str | None, boundary: str | None) -> None:
    """Any multipart/* type gives its boundary (quoted or not); others give None."""
    assert multipart_boundary(content_type) == boundary


@pytest.mark.parametrize(
    "content_type", ["multipart/related", "multipart/related; boundary=", "multipart/x; boundary=ä"]
)
def test_multipart_without_usable_boundary(content_type: str) -> None:
    """A multipart type without a usable boundary is an error."""
    with pytest.raises(MultipartError):
        multipart_boundary(content_type)


def test_quoted_boundary_parses_a_body() -> None:
    """A boundary with spaces and punctuation (legal when quoted) works end to end."""
    boundary = multipart_boundary('multipart/related; boundary="odd boundary:=?"')
    assert boundary is not None
    assert files(parse(body(THREE, boundary=boundary), [3], boundary=boundary)) == THREE


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ('attachment; filename="slide.svs"', "slide.svs"),
        ("attachment; filename=slide.svs; size=10", "slide.svs"),
        ('attachment; filename="a \\"quoted\\" name.svs"', 'a "quoted" name.svs'),
        ('attachment; filename="C:\\dir\\x.dcm"', "C:\\dir\\x.dcm"),
        ("attachment; filename*=UTF-8''%E2%82%AC%20rates.svs", "€ rates.svs"),
        ("attachment; filename=\"fallback.svs\"; filename*=utf-8''%C3%A9.svs", "é.svs"),
        ("attachment; filename*=UTF-8''%FF%FE.svs; filename=ok.svs", "ok.svs"),
        ("attachment; filename*=iso-8859-1'en'%E9.svs", "é.svs"),
        ("attachment", None),
        ("", None),
        (None, None),
    ],
)
def test_disposition_filename(value: str | None, name: str | None) -> None:
    """filename (quoted, escaped, unquoted) and RFC 5987 filename* (preferred)."""
    assert disposition_filename(value) == name


def test_part_headers_are_case_insensitive_and_folded() -> None:
    """Header names match case-insensitively; folded lines are joined; UTF-8 or latin-1."""
    headers = PartHeaders.parse(
        b'CONTENT-TYPE: application/dicom;\r\n name="x.dcm"\r\ncontent-length: 12'
    )
    assert headers.content_type == 'application/dicom; name="x.dcm"'
    assert headers.content_length == 12
    assert headers.filename == "x.dcm"
    assert PartHeaders.parse(b'Content-Disposition: form-data; filename="\xe9.svs"').filename == (
        "é.svs"
    )
    assert PartHeaders.parse('Content-Disposition: a; filename="ü.svs"'.encode()).filename == (
        "ü.svs"
    )


def test_parse_content_type() -> None:
    """The media type is lower-cased; the first of repeated parameters wins."""
    assert parse_content_type('Multipart/Related; Boundary="x"; boundary=y') == (
        "multipart/related",
        {"boundary": "x"},
    )
