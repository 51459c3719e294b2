"""How a slide's download fails: :class:`DownloadError`, transient or not.

A leaf of the pipeline (it imports nothing of dpatia's), so that the workers can judge
a failure (:mod:`dpatia_daemon.workers.faults`) without the download machinery.
"""

from __future__ import annotations

import errno
from typing import Final


class DownloadError(Exception):
    """A WSI download failed; the message names the slide and what went wrong.

    Files completed before the failure stay (and are recorded in the manifest); the
    file being written stays as ``<name>.part`` for the next attempt (except on a full
    disk, where the download removes its ``.part`` files to give the space back).  ``transient``:
    the same download may well work later (the connection broke, no data came in
    time, the SPS answered 5xx or 429, the disk is full); otherwise the answer itself
    was unusable.  ``disk``: the disk (or quota) is full, a transient fault of this
    host, not of the SPS.
    """

    def __init__(
        self, slide_id: str, message: str, *, transient: bool = False, disk: bool = False
    ) -> None:
        """Keep the slide id and the problem (never a token or a URL)."""
        super().__init__(f"download of slide {slide_id!r} failed: {message}")
        self.slide_id = slide_id
        self.message = message
        self.transient = transient or disk
        self.disk = disk


#: The errnos of a full disk (or quota): transient, the space may come back.
DISK_FULL: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full(error: object) -> bool:
    """Whether ``error`` is an OSError of a full disk or an exhausted quota."""
    return isinstance(error, OSError) and error.errno in DISK_FULL


__all__ = ["DISK_FULL", "DownloadError", "disk_full"]
