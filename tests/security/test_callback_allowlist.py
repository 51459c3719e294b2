"""The callback allowlist (``[sps] allowed_callback_urls``) against tricky URLs.

Two kinds of test: spellings that must be refused (userinfo, other spellings of
loopback, trailing dots, path-prefix tricks, hidden whitespace, query and fragment),
and a differential property: whenever the allowlist admits a URL, the address the
HTTP client would actually connect to (treq's hyperlink, then Twisted's ``URI``) is
one the allowlist names, and the path it asks for stays under the allowed prefix.
Every URL here is loopback or an unresolvable ``.example`` name; nothing is sent.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import pytest
from hyperlink import EncodedURL
from hypothesis import given
from hypothesis import strategies as st
from twisted.web.client import URI

from dpatia_daemon.config import SPSConfig, URLPrefix

from .conftest import PROFILE

PREFIXES = ("http://127.0.0.1:8080/SPS/v1", "http://localhost:*/", "http://[::1]:*/")
SPS = SPSConfig(allowed_callback_urls=tuple(URLPrefix.parse(p) for p in PREFIXES))

REFUSED = [
    # userinfo: whatever precedes @ is not the host
    "http://127.0.0.1:8080@evil.example/SPS/v1",
    "http://evil.example@127.0.0.1:8080/SPS/v1",
    "http://user:pw@127.0.0.1:8080/SPS/v1",
    "http://@127.0.0.1:8080/SPS/v1",
    "http://127.0.0.1:8080\\@evil.example/SPS/v1",
    "http://127.0.0.1:8080%40evil.example/SPS/v1",
    # loopback in other spellings: only the listed spelling is the listed host
    "http://2130706433:8080/SPS/v1",
    "http://0177.0.0.1:8080/SPS/v1",
    "http://017700000001:8080/SPS/v1",
    "http://0x7f000001:8080/SPS/v1",
    "http://0x7f.0.0.1:8080/SPS/v1",
    "http://127.1:8080/SPS/v1",
    "http://127.0.1:8080/SPS/v1",
    "http://127.000.000.001:8080/SPS/v1",
    "http://[::ffff:127.0.0.1]:8080/SPS/v1",
    "http://[::ffff:7f00:1]:8080/SPS/v1",
    "http://[0:0:0:0:0:0:0:1]:8080/x",
    "http://[::1%25lo]:8080/x",
    "http://0.0.0.0:8080/SPS/v1",
    "http://127.0.0.2:8080/SPS/v1",
    "http://\uff11\uff12\uff17.0.0.1:8080/SPS/v1",
    "http://127\u30020.0.1:8080/SPS/v1",
    "http://\u24dbocalhost:8080/x",
    # trailing dots
    "http://127.0.0.1.:8080/SPS/v1",
    "http://localhost.:8080/x",
    "http://localhost..:8080/x",
    # look-alike hosts
    "http://127.0.0.1.evil.example:8080/SPS/v1",
    "http://localhost.evil.example/x",
    "http://evil.example/127.0.0.1:8080/SPS/v1",
    # ports and schemes
    "http://127.0.0.1:8081/SPS/v1",
    "http://127.0.0.1/SPS/v1",
    "https://127.0.0.1:8080/SPS/v1",
    "ftp://127.0.0.1:8080/SPS/v1",
    "http://127.0.0.1:+8080/SPS/v1",
    "http://127.0.0.1:8080:8080/SPS/v1",
    "//127.0.0.1:8080/SPS/v1",
    "http:127.0.0.1:8080/SPS/v1",
    # path-prefix tricks
    "http://127.0.0.1:8080/SPS/v10",
    "http://127.0.0.1:8080/SPS/v1-evil",
    "http://127.0.0.1:8080/SPS/v1;x",
    "http://127.0.0.1:8080/sps/v1",
    "http://127.0.0.1:8080//SPS/v1",
    "http://127.0.0.1:8080/SPS/v1/../admin",
    "http://127.0.0.1:8080/SPS/v1/%2e%2e/admin",
    "http://127.0.0.1:8080/SPS/v1/%2E%2E",
    "http://127.0.0.1:8080/SPS/v1/..%2fadmin",
    "http://127.0.0.1:8080/SPS/v1/%252e%252e/admin",
    "http://127.0.0.1:8080/SPS/v1\\..\\admin",
    "http://127.0.0.1:8080/SPS/v1/./x",
    "http://127.0.0.1:8080/SPS/%76%31",
    # hidden whitespace and controls (urlsplit silently drops some of them)
    "http://127.0.0.1:80\t80/SPS/v1",
    "http://127.0.0.1:8080/SPS/v1\n",
    "http://127.0.0.1:8080/SPS/v1\r\nX-Injected: 1",
    " http://127.0.0.1:8080/SPS/v1",
    "\x00http://127.0.0.1:8080/SPS/v1",
    "http://127.0.0.1:8080/SPS/v1 ",
    "http://127.0.0.1:8080/SPS/v1/\x00",
    "http://local\thost:8080/x",
    # a base URL has no query or fragment (the client appends paths to it)
    "http://127.0.0.1:8080/SPS/v1?x=1",
    "http://127.0.0.1:8080/SPS/v1#f",
    "http://127.0.0.1:8080/SPS/v1#@evil.example",
    "http://127.0.0.1:8080?@evil.example/SPS/v1",
    # not URLs
    "",
    "127.0.0.1:8080/SPS/v1",
    "http://",
    "http:///SPS/v1",
]


@pytest.mark.parametrize("url", REFUSED)
def test_tricky_spellings_are_refused(url: str) -> None:
    """Each is refused: no spelling but the listed one reaches a listed host."""
    assert not SPS.allows(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/SPS/v1",
        "http://127.0.0.1:8080/SPS/v1/",
        "HTTP://127.0.0.1:8080/SPS/v1",
        "http://localhost:1/x",
        "http://LOCALHOST:65535/",
        "http://[::1]:5000/SPS",
    ],
)
def test_the_listed_forms_are_allowed(url: str) -> None:
    """The refusals above are not a list that refuses everything."""
    assert SPS.allows(url)


def _sent_to(url: str) -> tuple[bytes, str, int, bytes] | None:
    """Where treq and Twisted would send ``url`` + a path, or None if they would not."""
    joined = url.rstrip("/") + "/slides/x/info"
    try:
        uri = EncodedURL.from_text(joined).to_uri().to_text().encode("ascii")
        parsed = URI.fromBytes(uri)
    except Exception:  # noqa: BLE001 (any refusal by the client is fine here)
        return None
    host = parsed.host.decode("ascii").strip("[]").lower()
    return parsed.scheme, host, parsed.port, parsed.path


def _admitted(scheme: bytes, host: str, port: int, path: bytes) -> bool:
    for prefix in SPS.allowed_callback_urls:
        if (scheme.decode(), host) != (prefix.scheme, prefix.host):
            continue
        if prefix.port is not None and port != prefix.port:
            continue
        text = unquote(path.decode("ascii")).replace("\\", "/")
        if any(seg in (".", "..") for seg in text.split("/")):
            return False
        if prefix.path == "" or text.startswith(prefix.path + "/"):
            return True
    return False


pieces = st.tuples(
    st.sampled_from(["", " ", "\t", "\x00", "\n"]),
    st.sampled_from(["http", "https", "HTTP", "hTtp", "http ", "ftp"]),
    st.sampled_from(["://", ":/", ":///", ":\\\\", "://\t", ":"]),
    st.sampled_from(["", "u@", "u:p@", "127.0.0.1:8080@", "@", ":@", "localhost@", "%40"]),
    st.sampled_from(
        [
            "127.0.0.1",
            "localhost",
            "[::1]",
            "evil.example",
            "127.0.0.1.evil.example",
            "2130706433",
            "0177.0.0.1",
            "0x7f.1",
            "127.1",
            "[::ffff:127.0.0.1]",
            "127.0.0.1.",
            "LOCALHOST",
            "127.0.0.1\\@evil.example",
            "127.0.0.1%00",
            "127.0.0.1\t",
            "\u24dbocalhost",
            "127\u30020.0.1",
            "localhost\u3002",
            "[::1%25eth0]",
            "[::1",
        ]
    ),
    st.sampled_from(
        [
            "",
            ":8080",
            ":8081",
            ":08080",
            ":+8080",
            ":8080\t",
            ":",
            ":0x1f90",
            ":-1",
            ":99999",
            ":8080:1",
        ]
    ),
    st.sampled_from(
        [
            "",
            "/SPS/v1",
            "/SPS/v1/",
            "/SPS/v10",
            "/SPS/v1/..",
            "/SPS/v1/%2e%2e",
            "/SPS/v1/x",
            "/sps/v1",
            "/SPS/v1\\..",
            "/SPS/v1;",
            "//SPS/v1",
            "/..",
            "/%2e%2e/SPS/v1",
            "/SPS/v1/%2f..",
            "/SPS/v1/\u00e9",
            "/\t../SPS/v1",
        ]
    ),
    st.sampled_from(["", "?x=1", "#f", "#@evil.example", "?@evil.example/", "\n", " ", "\r\n"]),
    st.text(max_size=4),
)


@PROFILE
@given(parts=pieces)
def test_whatever_is_admitted_goes_only_where_the_list_says(parts: tuple[str, ...]) -> None:
    """A URL put together from tricky pieces: if admitted, the client would connect
    to a listed scheme, host and port and ask for a path under the listed prefix."""
    url = "".join(parts)
    if not SPS.allows(url):
        return
    target = _sent_to(url)
    assert target is not None, url
    assert _admitted(*target), (url, target)


@PROFILE
@given(url=st.text(max_size=60).map(lambda t: "http://127.0.0.1:8080/SPS/v1" + t))
def test_any_suffix_of_an_allowed_url(url: str) -> None:
    """Any text after an allowed base: admitted only if the client stays under it."""
    if SPS.allows(url):
        target: Any = _sent_to(url)
        assert target is not None and _admitted(*target), (url, target)
