"""Safe local names for files an SPS names: sanitising, de-duplicating, containment.

A file name in ``Content-Disposition`` is text chosen by the far end (IA-API.md §2.4):
Sectra's own single-file branch writes it unsanitised, and ``Path(name).name`` alone
lets ``..\\..\\x`` through on Windows-style names.  Everything that becomes a path in
a job's folder goes through here:

* :func:`safe_name` reduces any text to one harmless base name (or a fallback);
* :class:`NameAllocator` keeps names unique within one download (``x.dcm``,
  ``x (2).dcm``), deterministically, so a retried download maps each file to the same
  name as the first attempt;
* :func:`contained_child` turns a name into a :class:`FilePath` and proves it lies
  directly inside the folder (``FilePath.child`` plus a ``realpath`` check, so a
  planted symlink cannot lead a write outside).

Sanitised names never start with ``.``: names starting with a dot are reserved for
dpatia's own bookkeeping in the folder (the download manifest), so a server-given
name can never collide with them.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections.abc import Iterable

from twisted.python.filepath import FilePath, InsecurePath

from .multipart import parse_content_type

__all__ = [
    "MAX_NAME_BYTES",
    "NameAllocator",
    "UnsafePath",
    "contained_child",
    "extension_for",
    "fallback_name",
    "safe_name",
]

#: Longest base name kept, in UTF-8 bytes.  Filesystems allow 255; the margin leaves
#: room for `` (12)`` de-duplication and the ``.part`` suffix of the temporary file.
MAX_NAME_BYTES = 200

#: An extension is kept through truncation when it is this short (``.dcm``, ``.tiff``).
_MAX_EXTENSION_BYTES = 16

#: Characters Windows (and SMB shares) refuse in names; replaced so a job folder can be
#: copied anywhere.  ``/`` and ``\\`` never get here (they separate segments).
_FORBIDDEN = re.compile(r'[<>:"|?*]')

#: Device names Windows resolves whatever the extension (``CON.txt`` is the console),
#: also with the superscript digits it counts as digits (``COM¹``) and with spaces or
#: dots before the extension (``CON .txt``: see :func:`_is_device`).
_WINDOWS_DEVICES = frozenset(
    {"con", "prn", "aux", "nul", "conin$", "conout$"}
    | {f"{kind}{n}" for kind in ("com", "lpt") for n in "0123456789\u00b9\u00b2\u00b3"}
)


def _is_device(name: str) -> bool:
    """Whether Windows would open a device for ``name`` (its part before the first
    dot, without trailing spaces and dots, is a device name)."""
    return name.split(".")[0].rstrip(" .").casefold() in _WINDOWS_DEVICES


class UnsafePath(ValueError):
    """A name would resolve outside the folder it is meant for."""


#: Extensions for a nameless single file, by media type (OpenSlide looks at some).
_EXTENSIONS = {
    "image/tiff": ".tiff",
    "image/tif": ".tiff",
    "application/dicom": ".dcm",
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "application/zip": ".zip",
}


def extension_for(content_type: str | None) -> str:
    """The extension a nameless file of ``content_type`` gets (``""`` if none fits)."""
    return _EXTENSIONS.get(parse_content_type(content_type or "")[0], "")


def fallback_name(slide_id: str, suffix: str = "") -> str:
    """A name for a file the server did not name: derived from a hash of the slide id.

    Never the slide id itself (it is the SPS's string, possibly long or odd), and
    never anything from metadata (which may be PHI).
    """
    digest = hashlib.sha256(slide_id.encode("utf-8")).hexdigest()[:16]
    return f"slide-{digest}{suffix}"


def _clean(segment: str) -> str:
    """Drop control and format characters, replace forbidden ones, trim the ends."""
    segment = unicodedata.normalize("NFC", segment)
    # Cc: NUL, CR, LF, DEL...; Cf: bidi overrides that disguise an extension
    # ("x\u202egpj.exe"), zero-width characters.
    segment = "".join(c for c in segment if unicodedata.category(c) not in ("Cc", "Cf"))
    segment = _FORBIDDEN.sub("_", segment)
    # Windows drops trailing dots and spaces, which would make two names collide.
    return segment.strip().rstrip(". ")


def _truncate(name: str, limit: int) -> str:
    """Cut ``name`` to ``limit`` UTF-8 bytes at a character boundary, keeping a short
    extension."""
    if len(name.encode("utf-8")) <= limit:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext.encode("utf-8")) + 1 > _MAX_EXTENSION_BYTES:
        stem, ext = name, ""
    else:
        ext = "." + ext
    room = limit - len(ext.encode("utf-8"))
    cut = stem.encode("utf-8")[:room].decode("utf-8", errors="ignore").rstrip(". ")
    return (cut or "_") + ext


def safe_name(raw: str | None, fallback: str) -> str:
    """Reduce a server-given file name to one safe base name (``fallback`` if nothing is left).

    Backslashes count as separators and only the last non-empty segment is kept, so
    ``../../x``, ``/etc/passwd``, ``C:\\dir\\x.svs`` become ``x``, ``passwd``,
    ``x.svs``; control and bidi characters are dropped; a leading ``.`` or ``-`` (a
    hidden file, a reserved dpatia name, an option to a tool) becomes ``_``; Windows
    device names get a ``_`` prefix; names are capped at :data:`MAX_NAME_BYTES` bytes
    of UTF-8, keeping a short extension.  ``""``, ``.``, ``..`` and names with nothing
    left yield ``fallback`` (which must itself be safe).
    """
    if raw:
        segments = [s for s in raw.replace("\\", "/").split("/") if _clean(s)]
        name = _clean(segments[-1]) if segments else ""
        if name in ("", ".", ".."):
            name = ""
        if name[:1] in (".", "-"):
            body = name.lstrip(".-")
            name = "_" + body if body else ""
        if name:
            # Truncation first: a cut that ends in spaces can leave "con.txt".
            name = _truncate(name, MAX_NAME_BYTES)
            if _is_device(name):
                name = "_" + _truncate(name, MAX_NAME_BYTES - 1)
            return name
    return fallback


class NameAllocator:
    """Unique safe names within one download, in the order files arrive.

    The second ``x.dcm`` becomes ``x (2).dcm``, the third ``x (3).dcm``; comparison is
    case-insensitive, so the folder stays valid on case-insensitive filesystems.
    Names in ``reserved`` are never handed out.  The same sequence of raw names always
    yields the same sequence of local names (a retry finds its files again).
    """

    def __init__(self, reserved: Iterable[str] = ()) -> None:
        """Start with no names taken except ``reserved``."""
        self._taken = {name.casefold() for name in reserved}

    def allocate(self, raw: str | None, fallback: str) -> str:
        """The safe, unique local name for the next file (see :func:`safe_name`)."""
        name = safe_name(raw, fallback)
        candidate = name
        n = 1
        while candidate.casefold() in self._taken:
            n += 1
            stem, dot, ext = name.rpartition(".")
            if not dot or not stem:
                stem, dot, ext = name, "", ""
            candidate = _truncate(f"{stem} ({n}){dot}{ext}", MAX_NAME_BYTES + 12)
        self._taken.add(candidate.casefold())
        return candidate


def contained_child(folder: FilePath[str], name: str) -> FilePath[str]:
    """``folder.child(name)``, proven to lie directly inside ``folder``.

    Raises :class:`UnsafePath` when ``name`` is not a single segment or when the child
    (or the folder's real location) would put it elsewhere, e.g. through a symlink
    planted where the file goes.
    """
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UnsafePath(f"not a plain file name: {name!r}")
    try:
        child = folder.child(name)
    except InsecurePath:
        raise UnsafePath(f"not a plain file name: {name!r}") from None
    real_folder = os.path.realpath(folder.path)
    if os.path.dirname(os.path.realpath(child.path)) != real_folder:
        raise UnsafePath(f"{name!r} resolves outside its folder")
    return child
