"""Replacing a small file atomically: the one way dpatia writes its records.

A reader (another process, a restarted daemon) sees the old content or the new, never a
mix: the data goes to a private temporary sibling (0600, created fresh, links never
followed), optionally fsynced, then renamed over the target.  Whether the directory is
fsynced too depends on whether the caller needs the rename itself to survive a crash.
"""

from __future__ import annotations

import os


def write_atomically(
    path: str, data: bytes, *, fsync: bool = True, fsync_dir: bool = False, mode: int = 0o600
) -> str:
    """Replace ``path`` with ``data``; return ``path``.

    ``fsync``: the content is on disk before the rename; ``fsync_dir``: the rename is
    too.  Without either, a crash may leave the old content — fine for files that are
    not the durable copy of anything.
    """
    folder = os.path.dirname(path) or "."
    temp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)
    os.rename(temp, path)
    if fsync_dir:
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path
