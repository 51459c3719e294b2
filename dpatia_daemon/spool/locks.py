"""The process-wide lock table of each spool directory, this host's tag, pid liveness.

See the package docstring's "Locking protocol" for why every lock a process holds on
one spool directory lives in one table shared by all its stores.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import threading

from attrs import define, field
from twisted.python.filepath import FilePath

#: The mode of every file the spool creates: job files hold callback tokens.
FILE_MODE = 0o600


@define(eq=False)
class LockTable:
    """Every lock this process holds on one spool directory, shared by all its stores.

    NFS turns flock into POSIX locks, which are per process: two stores (or threads) of
    one process would not exclude each other through the file lock, and closing any
    descriptor of a lock file drops the process's lock on it.  So stripe locks are an
    in-process mutex around one long-lived descriptor per stripe, and held run locks are
    recorded here so that no store of this process ever tests or re-opens them.
    """

    locks_dir: FilePath[str]
    guard: threading.Lock = field(factory=threading.Lock)
    mutexes: dict[str, threading.Lock] = field(factory=dict)
    stripe_fds: dict[str, int] = field(factory=dict)
    runs: dict[str, int] = field(factory=dict)
    users: int = 0

    def acquire(self, stripe: str) -> None:
        """Take the stripe lock (mutex, then flock); blocks."""
        with self.guard:
            mutex = self.mutexes.setdefault(stripe, threading.Lock())
        mutex.acquire()
        try:
            fd = self.stripe_fds.get(stripe)
            if fd is None:
                path = self.locks_dir.child(f"{stripe}.lock").path
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
                self.stripe_fds[stripe] = fd
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            mutex.release()
            raise

    def release(self, stripe: str) -> None:
        """Drop the stripe lock taken by :meth:`acquire`."""
        try:
            fcntl.flock(self.stripe_fds[stripe], fcntl.LOCK_UN)
        finally:
            self.mutexes[stripe].release()

    def close(self) -> None:
        """Close the stripe descriptors (the last store of this directory is closing)."""
        for fd in self.stripe_fds.values():
            os.close(fd)
        self.stripe_fds.clear()


_TABLES: dict[str, LockTable] = {}
_TABLES_GUARD = threading.Lock()


def attach_table(directory: FilePath[str]) -> tuple[str, LockTable]:
    """Return the process's lock table for ``directory`` (by real path), counting a user."""
    real = os.path.realpath(directory.path)
    with _TABLES_GUARD:
        table = _TABLES.get(real)
        if table is None:
            table = _TABLES[real] = LockTable(FilePath(real).child("locks"))
        table.users += 1
    return real, table


def detach_table(real: str) -> None:
    """Forget one user of the lock table of ``real``; close it after the last one."""
    with _TABLES_GUARD:
        table = _TABLES[real]
        table.users -= 1
        if table.users == 0:
            del _TABLES[real]
            table.close()


def host_tag() -> str:
    """Return this host's name reduced to characters safe in a temp file name."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    """Return whether a process with ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def default_owner() -> str:
    """Return ``host:pid``, naming this process in logs."""
    return f"{socket.gethostname()}:{os.getpid()}"
