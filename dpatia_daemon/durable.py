"""Durable file writes: the one place dpatia fsyncs a file or a directory.

* :func:`fsync_directory` makes renames, links and unlinks in a directory durable.  Some
  network filesystems (NFS, SMB) refuse ``fsync`` on a directory with EINVAL or
  ENOTSUP; their metadata operations are synchronous on the server anyway, so that
  refusal is tolerated (and said once per filesystem), never an error.
* :func:`write_new_file` creates a file holding some bytes, optionally fsynced, and
  removes it again if anything fails; the spool's temp files and
  :func:`write_atomically`'s are written by it.
* :func:`write_atomically` replaces a small file: a reader (another process, a restarted
  daemon) sees the old content or the new, never a mix.  The data goes to a private
  temporary sibling (0600, created fresh, links never followed), optionally fsynced,
  then renamed over the target; whether the directory is fsynced too depends on whether
  the caller needs the rename itself to survive a crash.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable

from twisted.logger import Logger

log = Logger()

#: The errors a filesystem answers a directory fsync with when it cannot do one.
_NO_DIRECTORY_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})

# Filesystems (st_dev) already reported as unable to fsync a directory: said once each.
_reported: set[int] = set()
_reported_guard = threading.Lock()


def fsync_directory(path: str, fsync: Callable[[int], None] = os.fsync) -> bool:
    """Make the entries of directory ``path`` durable; False if its filesystem cannot.

    ``fsync`` is injectable so the spool can count calls and tests can fail them.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync(fd)
    except OSError as e:
        if e.errno not in _NO_DIRECTORY_FSYNC:
            raise
        _report(fd, path, e)
        return False
    finally:
        os.close(fd)
    return True


def _report(fd: int, path: str, error: OSError) -> None:
    try:
        device = os.fstat(fd).st_dev
    except OSError:
        device = -1
    with _reported_guard:
        if device in _reported:
            return
        _reported.add(device)
    log.warn(
        "the filesystem of {path} cannot fsync directories ({error}); "
        "relying on the server for metadata durability",
        path=path,
        error=str(error),
    )


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_new_file(
    path: str,
    data: bytes,
    *,
    fsync: Callable[[int], None] | None = os.fsync,
    mode: int = 0o600,
    replace: bool = False,
) -> None:
    """Create ``path`` holding ``data``, fsynced by ``fsync`` (None: not fsynced).

    The file is created fresh with ``mode`` and never through a link; with ``replace``
    a leftover file of that name is truncated instead of being an error (FileExistsError).
    If writing or fsyncing fails, the file is removed and the error raised.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags | (os.O_TRUNC if replace else os.O_EXCL), mode)
    try:
        write_all(fd, data)
        if fsync is not None:
            fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError as e:
            # Already gone (ESTALE: deleted on an NFS server): the first error matters.
            if e.errno not in (errno.ENOENT, errno.ESTALE):
                raise
        raise
    os.close(fd)


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
    write_new_file(temp, data, fsync=os.fsync if fsync else None, mode=mode, replace=True)
    os.rename(temp, path)
    if fsync_dir:
        fsync_directory(folder)
    return path
