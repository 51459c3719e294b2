"""Safe local names for files an SPS names (:mod:`dpatia_daemon.pipeline.filenames`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.python.filepath import FilePath

from dpatia_daemon.pipeline.filenames import (
    MAX_NAME_BYTES,
    NameAllocator,
    UnsafePath,
    contained_child,
    fallback_name,
    safe_name,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("slide.svs", "slide.svs"),
        ("../../x", "x"),
        ("/etc/passwd", "passwd"),
        ("..\\..\\windows\\x.dcm", "x.dcm"),
        ("C:\\Users\\me\\x.svs", "x.svs"),
        ("a/b/", "b"),
        ("x/..", "x"),
        ("", "FALLBACK"),
        (".", "FALLBACK"),
        ("..", "FALLBACK"),
        ("...", "FALLBACK"),
        ("/", "FALLBACK"),
        ("\\\\server\\share\\", "share"),
        (None, "FALLBACK"),
        (".hidden", "_hidden"),
        (".dpatia-files.json", "_dpatia-files.json"),
        ("-rf", "_rf"),
        ("nul\x00byte\n.svs", "nulbyte.svs"),
        ("x\u202egpj.exe", "xgpj.exe"),
        ('a<b>c:d|e?f*g".svs', "a_b_c_d_e_f_g_.svs"),
        ("CON.txt", "_CON.txt"),
        ("trailing. . ", "trailing"),
        ("  spaced name.svs ", "spaced name.svs"),
        ("Präparat_ü.svs", "Präparat_ü.svs"),
    ],
)
def test_safe_name(raw: str | None, expected: str) -> None:
    """Server names are reduced to one harmless base name, or the fallback."""
    assert safe_name(raw, "FALLBACK") == expected


def test_safe_name_caps_length_keeping_extension() -> None:
    """Over-long names are cut to MAX_NAME_BYTES of UTF-8, at a character, keeping .dcm."""
    name = safe_name("é" * 300 + ".dcm", "F")
    assert name.endswith(".dcm") and len(name.encode()) <= MAX_NAME_BYTES
    assert name.startswith("é" * 10)
    assert len(safe_name("x" * 1000, "F").encode()) == MAX_NAME_BYTES


def test_name_allocator_deduplicates_deterministically() -> None:
    """Collisions get " (2)", " (3)" before the extension, case-insensitively."""
    names = ["x.dcm", "X.DCM", "x.dcm", "../x.dcm", "", "", "noext", "noext"]
    first = NameAllocator(reserved=[".manifest"])
    second = NameAllocator(reserved=[".manifest"])
    allocated = [first.allocate(n, "fb") for n in names]
    assert allocated == [
        "x.dcm",
        "X (2).DCM",
        "x (3).dcm",
        "x (4).dcm",
        "fb",
        "fb (2)",
        "noext",
        "noext (2)",
    ]
    assert [second.allocate(n, "fb") for n in names] == allocated


def test_contained_child_refuses_escapes(tmp_path: Path) -> None:
    """Only plain names directly in the folder pass; a planted symlink is refused."""
    folder = FilePath(str(tmp_path / "f"))
    folder.makedirs()
    assert contained_child(folder, "ok.svs") == folder.child("ok.svs")
    for bad in ("", ".", "..", "a/b", "../x", "x\0y"):
        with pytest.raises(UnsafePath):
            contained_child(folder, bad)
    os.symlink(str(tmp_path / "outside"), folder.child("link.svs").path)
    with pytest.raises(UnsafePath):
        contained_child(folder, "link.svs")


def test_fallback_name_hides_the_slide_id() -> None:
    """A nameless file is named by a hash of the slide id, not the id itself."""
    name = fallback_name("ACC-123/secret", ".tiff")
    assert name.startswith("slide-") and name.endswith(".tiff") and "ACC" not in name
    assert safe_name(name, "x") == name
