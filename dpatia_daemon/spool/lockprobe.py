"""Whether file locks work on the spool's filesystem: a start-time probe.

Everything the spool promises with several processes on it (one run of each job, one
queued record per key, a dead holder's jobs recovered) rests on ``flock``: stripe
locks around every transition and a run lock held for each running job (see the
package docstring).  A filesystem where locks are silently no-ops (some FUSE and SMB
mounts, an NFS mount whose lock daemon is missing) would let two daemons, or a daemon
and its own front-door processes, run one job twice and overwrite each other's
records, with no error anywhere.

:func:`probe_locks` takes ``flock(LOCK_EX)`` on ``locks/probe.lock`` and has a child
process (a second open file description, in another process as a second daemon would
be) try the same lock with ``LOCK_NB``.  If the child gets it, or locks fail outright
(``ENOLCK``), locks do not work: :class:`LocksNotWorking`, and the daemon refuses to
start.  One small subprocess at start: a few tens of milliseconds.

What the probe cannot see: locks that work on this host only (NFS ``nolock`` or
``local_lock=flock|all``, SMB ``nobrl``) exclude this host's processes from each
other but not another host's.  :func:`mount_warnings` reads the mount options of the
spool's filesystem (``/proc/self/mountinfo``) and names those; the daemon logs them as
a warning at every start (one host on such a mount is safe; several are not).
:func:`journal_warning` names an ext4 without a journal, logged the same way.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys

#: The child: open the file anew, try the lock without blocking; its exit code says.
_CHILD = """
import errno, fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError as e:
    sys.exit(1 if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else 3)
sys.exit(0)
"""
_TAKEN, _REFUSED = 0, 1

#: Seconds the child gets (a hung lock manager must not hang the start for ever).
PROBE_TIMEOUT = 30.0

#: Mount options under which locks work on this host only.
_LOCAL_ONLY = {
    "nolock": "NFS nolock: locks are local to this host",
    "local_lock=flock": "NFS local_lock=flock: flock locks are local to this host",
    "local_lock=all": "NFS local_lock=all: locks are local to this host",
    "nobrl": "SMB nobrl: byte-range locks are not sent to the server",
}


class LocksNotWorking(Exception):
    """File locks on the spool's filesystem do not exclude another process."""


def probe_locks(directory: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Check that an exclusive ``flock`` on ``directory``'s filesystem keeps another
    process out; raise :class:`LocksNotWorking` (the message says what to do) if not.

    Creates ``directory`` and its ``locks/`` (0700) when missing, as the spool would.
    """
    locks = os.path.join(directory, "locks")
    os.makedirs(locks, mode=0o700, exist_ok=True)
    path = os.path.join(locks, "probe.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return  # another daemon's probe holds it right now: locks work
            raise LocksNotWorking(
                f"file locks fail on {directory} ({e.strerror or e}); {_WHAT_TO_DO}"
            ) from None
        try:
            child = subprocess.run(
                [sys.executable, "-I", "-S", "-c", _CHILD, path],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise LocksNotWorking(
                f"testing a file lock on {directory} hung for {timeout:g} s; {_WHAT_TO_DO}"
            ) from None
        if child.returncode == _TAKEN:
            raise LocksNotWorking(
                f"file locks on {directory} do not work: a second process took an "
                f"exclusive flock this process holds; {_WHAT_TO_DO}"
            )
        if child.returncode != _REFUSED:
            why = child.stderr.decode("utf-8", "replace").strip().splitlines()
            raise LocksNotWorking(
                f"could not test file locks on {directory} "
                f"({why[-1] if why else f'exit code {child.returncode}'}); {_WHAT_TO_DO}"
            )
    finally:
        os.close(fd)  # drops the lock


_WHAT_TO_DO = (
    "the spool needs working flock/byte-range locks (a local disk, NFSv4, or SMB "
    "without nobrl; README: The spool)"
)


def _mount(directory: str, mountinfo: str) -> tuple[str, str, list[str]] | None:
    """The mount holding ``directory`` (the longest mount point that holds it): its
    ``major:minor``, filesystem type and options (mount and superblock), or None."""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    real = os.path.realpath(directory)
    best: tuple[int, tuple[str, str, list[str]]] | None = None
    for line in lines:
        # id parent major:minor root mountpoint options [optional...] - fstype source super
        fields = line.split()
        if "-" not in fields or len(fields) < 6:
            continue
        point = fields[4].replace("\\040", " ")
        if real != point and not real.startswith(point.rstrip("/") + "/"):
            continue
        dash = fields.index("-")
        options = fields[5].split(",") + (
            fields[dash + 3].split(",") if len(fields) > dash + 3 else []
        )
        fstype = fields[dash + 1] if len(fields) > dash + 1 else ""
        if best is None or len(point) >= best[0]:
            best = (len(point), (fields[2], fstype, options))
    return None if best is None else best[1]


def mount_warnings(directory: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """The mount options of ``directory``'s filesystem under which locks work on this
    host only (empty: none, or not Linux)."""
    mount = _mount(directory, mountinfo)
    if mount is None:
        return []
    return [why for option, why in _LOCAL_ONLY.items() if option in mount[2]]


def journal_warning(
    directory: str,
    mountinfo: str = "/proc/self/mountinfo",
    jbd2: str = "/proc/fs/jbd2",
    block_devices: str = "/sys/dev/block",
) -> str | None:
    """Why ``directory``'s filesystem is a poor spool, if it is an ext4 without a
    journal (None otherwise, or when it cannot be told).

    A mounted ext4 with a journal has ``/proc/fs/jbd2/<device>-8``.  Without one, a
    crash or power loss leaves the spool's renames to fsck, and each new file costs
    ext4 a scan for an inode not deleted in the last minute: about 0.9 ms of kernel
    CPU per file on the machine this was measured on, most of an acknowledgement's.
    """
    mount = _mount(directory, mountinfo)
    if mount is None or mount[1] != "ext4" or not os.path.isdir(jbd2):
        return None
    try:
        device = os.path.basename(os.path.realpath(os.path.join(block_devices, mount[0])))
    except OSError:
        return None
    if not device or os.path.exists(os.path.join(jbd2, f"{device}-8")):
        return None
    return (
        f"ext4 without a journal ({device}): after a crash or power loss fsck decides "
        "which spool renames survive, and every new file costs a scan for a free inode "
        "(most of an acknowledgement's CPU); put the spool on a journaled filesystem"
    )


__all__ = ["PROBE_TIMEOUT", "LocksNotWorking", "journal_warning", "mount_warnings", "probe_locks"]
