"""The start-time probe of the spool's file locks (:mod:`dpatia_daemon.spool.lockprobe`).

The probe's second process is real.  A filesystem whose locks are no-ops is played by
making this process's ``flock`` a no-op: it then holds nothing, and the real child
takes the "same" lock, exactly what such a filesystem shows from outside.
"""

from __future__ import annotations

import errno
import fcntl
from pathlib import Path
from typing import Any

import pytest
from twisted.python.filepath import FilePath

from dpatia_daemon.spool import DirectorySpool, SpoolError, lockprobe
from dpatia_daemon.spool.lockprobe import (
    LocksNotWorking,
    journal_warning,
    mount_warnings,
    probe_locks,
)


def test_working_locks_pass_and_the_lock_is_dropped(tmp_path: Path) -> None:
    """On a local disk the child is refused the lock; afterwards the lock is free."""
    probe_locks(str(tmp_path / "spool"))
    probe = tmp_path / "spool" / "locks" / "probe.lock"
    assert (probe.stat().st_mode & 0o777) == 0o600
    with open(probe, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # not left held


def test_locks_that_are_no_ops_are_refused(tmp_path: Path, monkeypatch: Any) -> None:
    """A second process takes the exclusive lock this one holds: LocksNotWorking,
    naming the directory and what the spool needs."""
    monkeypatch.setattr(lockprobe.fcntl, "flock", lambda fd, op: None)
    with pytest.raises(LocksNotWorking) as caught:
        probe_locks(str(tmp_path))
    message = str(caught.value)
    assert str(tmp_path) in message
    assert "a second process took an exclusive flock" in message
    assert "NFSv4" in message


def test_locks_that_fail_are_refused(tmp_path: Path, monkeypatch: Any) -> None:
    """flock failing outright (ENOLCK: no lock manager) is refused too."""

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lockprobe.fcntl, "flock", no_locks)
    with pytest.raises(LocksNotWorking, match="No locks available"):
        probe_locks(str(tmp_path))


def test_a_probe_already_held_elsewhere_counts_as_working(tmp_path: Path) -> None:
    """Another daemon probing at the same moment holds the probe lock: that is a lock
    that works, not an error."""
    (tmp_path / "locks").mkdir()
    with open(tmp_path / "locks" / "probe.lock", "wb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        probe_locks(str(tmp_path))


def test_the_daemons_spool_refuses_to_start_without_working_locks(
    tmp_path: Path, reactor: Any, monkeypatch: Any
) -> None:
    """A DirectorySpool with ``check_locks`` stops the start with one clear line; one
    without (tests, extra front doors) does not probe."""
    monkeypatch.setattr(lockprobe.fcntl, "flock", lambda fd, op: None)
    spool = DirectorySpool(
        directory=FilePath(str(tmp_path / "spool")), reactor=reactor, check_locks=True
    )
    with pytest.raises(SpoolError, match="is not usable: file locks on .* do not work"):
        spool.startService()
    assert not spool.running


def test_mount_options_with_host_only_locks_are_named(tmp_path: Path) -> None:
    """nolock / local_lock / nobrl on the spool's mount (the longest mount point that
    holds it) are named; other mounts' options are not."""
    spool = tmp_path / "share" / "spool"
    spool.mkdir(parents=True)
    share = str(tmp_path / "share")
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / / rw,relatime - ext4 /dev/sda1 rw\n"
        f"40 22 0:50 / {tmp_path} rw,relatime - cifs //srv/x rw,nobrl\n"
        f"41 40 0:51 / {share} rw,relatime shared:7 - nfs4 srv:/x rw,vers=4.2,local_lock=flock\n"
    )
    assert mount_warnings(str(spool), str(info)) == [
        "NFS local_lock=flock: flock locks are local to this host"
    ]
    assert mount_warnings(str(tmp_path / "elsewhere"), str(info)) == [
        "SMB nobrl: byte-range locks are not sent to the server"
    ]
    info.write_text(f"41 22 0:51 / {share} rw - nfs4 srv:/x rw,vers=4.2,local_lock=none\n")
    assert mount_warnings(str(spool), str(info)) == []
    assert mount_warnings(str(spool), str(tmp_path / "missing")) == []


def test_an_ext4_without_a_journal_is_named(tmp_path: Path) -> None:
    """The spool's mount (by its device number, through /sys/dev/block) is an ext4
    with no /proc/fs/jbd2 entry: named; with one, another filesystem, or no jbd2 at
    all (nothing to tell by), nothing is said."""
    spool = tmp_path / "data" / "spool"
    spool.mkdir(parents=True)
    (tmp_path / "devices" / "vdb").mkdir(parents=True)
    (tmp_path / "devices" / "dm-3").mkdir()
    block = tmp_path / "block"
    block.mkdir()
    (block / "254:16").symlink_to(tmp_path / "devices" / "vdb")
    (block / "253:3").symlink_to(tmp_path / "devices" / "dm-3")
    jbd2 = tmp_path / "jbd2"
    (jbd2 / "dm-3-8").mkdir(parents=True)
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 253:3 / / rw,relatime - ext4 /dev/mapper/root rw\n"
        f"40 22 254:16 / {tmp_path / 'data'} rw,relatime - ext4 /dev/vdb rw,discard\n"
    )

    def warning(directory: Path, jbd2_dir: Path = jbd2) -> str | None:
        return journal_warning(str(directory), str(info), str(jbd2_dir), str(block))

    found = warning(spool)
    assert found is not None and found.startswith("ext4 without a journal (vdb): ")
    assert "journaled filesystem" in found
    assert warning(tmp_path / "elsewhere") is None  # on the root: dm-3 has its journal
    assert warning(spool, tmp_path / "no-jbd2") is None
    info.write_text(f"40 22 254:16 / {tmp_path / 'data'} rw - xfs /dev/vdb rw\n")
    assert warning(spool) is None
    assert journal_warning(str(spool), str(tmp_path / "missing"), str(jbd2), str(block)) is None


def test_the_daemons_main_process_probes_and_an_extra_front_door_does_not(
    tmp_path: Path,
) -> None:
    """build_service sets ``check_locks`` on the main process's spool only."""
    from conftest import write_config
    from twisted.internet.testing import MemoryReactorClock

    from dpatia_daemon.config import load_config
    from dpatia_daemon.service import build_service

    config = load_config(write_config(tmp_path, {"server": {"listen": "tcp:0"}}))
    main = build_service(config, MemoryReactorClock())
    door = build_service(config, MemoryReactorClock(), front_door=1)
    assert main.getServiceNamed("spool").check_locks is True
    assert door.getServiceNamed("spool").check_locks is False
