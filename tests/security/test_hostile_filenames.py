"""The file-name sanitizer under adversarial names: whatever the SPS puts in a
``Content-Disposition``, the local name is one harmless segment that stays inside its
folder, and normalisation forms of one name give one name."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.python.filepath import FilePath

from dpatia_daemon.pipeline.filenames import (
    MAX_NAME_BYTES,
    NameAllocator,
    UnsafePath,
    contained_child,
    safe_name,
)

from .conftest import PROFILE

FALLBACK = "slide-0123456789abcdef"

#: Names Windows resolves to a device whatever follows (and SMB shares pass on).
DEVICES = {"con", "prn", "aux", "nul", "conin$", "conout$"} | {
    f"{d}{n}" for d in ("com", "lpt") for n in "0123456789\u00b9\u00b2\u00b3"
}

pieces = st.sampled_from(
    [
        "..",
        ".",
        "/",
        "\\",
        "\x00",
        "C:",
        "CON",
        "nul",
        "Com1",
        "LPT\u00b9",
        "conin$",
        " ",
        ".txt",
        ".dcm",
        "\u202e",
        "\u200b",
        "\ufeff",
        "e\u0301",
        "\u00e9",
        "\uff0e",
        "~",
        ":",
        "*",
        "?",
        '"',
        "<",
        ">",
        "|",
        "-",
        "x" * 120,
        "\U0001f642" * 20,
        "\r\n",
        "\t",
        "\u0130",
        "\u212a",
        "\ufb01",
        "%2e%2e%2f",
    ]
)
names = st.lists(pieces | st.text(max_size=12), max_size=8).map("".join) | st.text(max_size=300)


def _is_device(name: str) -> bool:
    stem = name.split(".")[0].rstrip(" .").casefold()
    return stem in DEVICES


@PROFILE
@given(raw=st.none() | names)
def test_a_safe_name_is_one_harmless_segment(raw: str | None) -> None:
    """No separator, NUL, control or format character, forbidden Windows character
    or leading dot or dash; not a device name; at most MAX_NAME_BYTES of UTF-8."""
    name = safe_name(raw, FALLBACK)
    assert name and name not in (".", "..")
    assert "/" not in name and "\\" not in name
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in name)
    assert not set(name) & set('<>:"|?*')
    assert name[0] not in ".-" and name == name.strip() and not name.endswith(".")
    assert not _is_device(name), name
    assert len(name.encode("utf-8")) <= MAX_NAME_BYTES


@PROFILE
@given(raw=names)
def test_sanitising_is_idempotent(raw: str) -> None:
    """A safe name is its own safe name (a retry maps a file to the same name)."""
    once = safe_name(raw, FALLBACK)
    assert safe_name(once, FALLBACK) == once


@PROFILE
@given(raw=names)
def test_normalisation_forms_of_a_name_give_one_name(raw: str) -> None:
    """NFC and NFD spellings of a name (macOS and Windows senders differ) map to the
    same local name."""
    nfc = unicodedata.normalize("NFC", raw)
    nfd = unicodedata.normalize("NFD", raw)
    assert safe_name(nfc, FALLBACK) == safe_name(nfd, FALLBACK)


@PROFILE
@given(raws=st.lists(st.none() | names, max_size=12))
def test_allocated_names_are_unique_and_stay_in_the_folder(
    raws: list[str | None], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Any sequence of names: unique (case-insensitively), each a child of the folder
    that can be created there."""
    folder = tmp_path_factory.mktemp("names")
    allocator = NameAllocator(reserved=[".manifest"])
    given_out = [allocator.allocate(raw, FALLBACK) for raw in raws]
    assert len({n.casefold() for n in given_out}) == len(given_out)
    for name in given_out:
        child = contained_child(FilePath(str(folder)), name)
        assert os.path.dirname(child.path) == str(folder)
        child.setContent(b"x")
    assert len(os.listdir(folder)) == len(given_out)


@pytest.mark.parametrize(
    "name",
    ["con" + " " * 300 + "y.txt", "AUX" + "." * 250 + "z", "nul" + " " * 198 + "abc.dcm"],
)
def test_truncation_never_leaves_a_device_name(name: str) -> None:
    """Regression: the device check ran before truncation, so a long name whose cut
    ended in spaces became ``con.txt``."""
    assert not _is_device(safe_name(name, FALLBACK))


@pytest.mark.parametrize(
    "name",
    [
        "COM\u00b9.txt",
        "lpt\u00b2",
        "COM0.log",
        "LPT0",
        "CONIN$",
        "conout$.x",
        "CON .txt",
        "nul..txt",
    ],
)
def test_every_windows_device_spelling_is_defused(name: str) -> None:
    """Regression: superscript digits, 0, CONIN$/CONOUT$ and a space or dot before the
    extension were not recognised as device names."""
    assert safe_name(name, FALLBACK).startswith("_")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\x00b", "../x"])
def test_contained_child_refuses_what_is_not_one_segment(tmp_path: Path, name: str) -> None:
    """Anything but one plain segment is UnsafePath."""
    with pytest.raises(UnsafePath):
        contained_child(FilePath(str(tmp_path)), name)


def test_contained_child_refuses_a_planted_symlink(tmp_path: Path) -> None:
    """A symlink where the file goes, pointing outside, is UnsafePath."""
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "x.dcm").symlink_to(tmp_path / "outside.dcm")
    with pytest.raises(UnsafePath):
        contained_child(FilePath(str(tmp_path / "inside")), "x.dcm")
