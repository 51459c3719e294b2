"""DirectorySpool on real files and across processes.

What only real files can show: permissions, durability, group commit, temp-file
cleanup, quarantine, and exclusion and recovery across processes
(``tests/spool/spool_claimer.py`` is the other process).  The contract both spools
share is in ``test_contract.py``.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from spool_helpers import make_job, other_store, start_directory_spool
from twisted.internet import protocol
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.filepath import FilePath

from dpatia_daemon.jobs import Deferral, DeferralKind, Job, JobState
from dpatia_daemon.spool import DirectorySpool, NotHeld, SpoolNotRunning, _host_tag

CLAIMER = str(Path(__file__).with_name("spool_claimer.py"))
TIMEOUT = 20.0


@pytest_twisted.async_yield_fixture()
async def dspool(tmp_path: Path, reactor: Any) -> AsyncIterator[DirectorySpool]:
    """A started DirectorySpool on ``tmp_path / "spool"`` whose start-up sweep is done."""
    s = start_directory_spool(tmp_path / "spool", reactor)
    await s.sweep()
    yield s
    await s.stopService()


# --- DirectorySpool on real files -----------------------------------------------------


def test_the_real_reactor_is_a_spool_reactor(reactor: Any) -> None:
    """Every interface ISpoolReactor names (for typing) is provided by the real reactor."""
    from dpatia_daemon.spool import ISpoolReactor

    assert ISpoolReactor.__bases__
    assert all(base.providedBy(reactor) for base in ISpoolReactor.__bases__)


def modes(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Return the permission bits of every directory and file under ``root``."""
    dirs = {str(root): stat.S_IMODE(root.stat().st_mode)}
    files = {}
    for path in root.rglob("*"):
        (dirs if path.is_dir() else files)[str(path)] = stat.S_IMODE(path.stat().st_mode)
    return dirs, files


@pytest_twisted.ensureDeferred
async def test_permissions_are_private(dspool: DirectorySpool, tmp_path: Path) -> None:
    """Every directory is 0700 and every file (tokens, locks, markers) 0600."""
    a = await dspool.add(make_job("a"))
    await dspool.add(make_job("b"))
    await dspool.claim(a.job_id)
    await dspool.request_cancel(a.job_id)
    dirs, files = modes(tmp_path / "spool")
    assert len(files) >= 4
    assert set(dirs.values()) == {0o700}
    assert set(files.values()) == {0o600}


@pytest_twisted.ensureDeferred
async def test_history_records_hold_no_token(dspool: DirectorySpool, tmp_path: Path) -> None:
    """Done, failed and cancelled records on disk no longer carry the callback token."""
    done = await dspool.add(make_job("a", token="secret-done"))
    failed = await dspool.add(make_job("b", token="secret-failed"))
    await dspool.add(make_job("c", token="secret-cancelled"))
    for job, state in ((done, JobState.DONE), (failed, JobState.FAILED)):
        await dspool.claim(job.job_id)
        await dspool.finish(job.job_id, state, "x")
    (queued,) = await dspool.find(slide_id="c")
    await dspool.cancel(queued.job_id)
    history = [
        p
        for state in ("done", "failed", "cancelled")
        for p in (tmp_path / "spool" / state).iterdir()
    ]
    assert len(history) == 3
    for path in history:
        assert b"secret-" not in path.read_bytes()


@pytest_twisted.ensureDeferred
async def test_loose_tree_is_tightened(tmp_path: Path, reactor: Any) -> None:
    """An existing tree readable by others is tightened to 0700, with a warning."""
    root = tmp_path / "spool"
    (root / "queued").mkdir(parents=True)
    os.chmod(root, 0o755)
    os.chmod(root / "queued", 0o777)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    spool = start_directory_spool(root, reactor)
    try:
        await spool.queued()
    finally:
        globalLogPublisher.removeObserver(events.append)
        await spool.stopService()
    dirs, _ = modes(root)
    assert set(dirs.values()) == {0o700}
    warned = {e.get("path") for e in events if e.get("log_level") == LogLevel.warn}
    assert {str(root), str(root / "queued")} <= warned


@pytest_twisted.ensureDeferred
async def test_add_is_on_disk_when_it_fires(dspool: DirectorySpool, tmp_path: Path) -> None:
    """When add() fires, another store on the directory already sees the job."""
    job = await dspool.add(make_job())
    with other_store(tmp_path / "spool") as store:
        assert store.get(job.job_id) == job
    assert (tmp_path / "spool" / "queued" / f"{job.key}.json").exists()


@pytest_twisted.ensureDeferred
async def test_add_fsyncs_file_and_directory_before_firing(tmp_path: Path, reactor: Any) -> None:
    """add() fires only after the job's file and the queued/ directory were fsynced."""
    spool = start_directory_spool(tmp_path / "spool", reactor)
    synced: list[str] = []

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        os.fsync(fd)

    spool.store.fsync = fsync
    try:
        job = await spool.add(make_job())
    finally:
        await spool.stopService()
    assert any("/tmp/" in p for p in synced)
    assert str(tmp_path / "spool" / "queued") in synced
    assert job.job_id


@pytest_twisted.ensureDeferred
async def test_concurrent_adds_are_group_committed(dspool: DirectorySpool, tmp_path: Path) -> None:
    """500 concurrent adds all land exactly once, with far fewer than 500 directory fsyncs."""
    jobs = [make_job(f"slide-{i}") for i in range(500)]
    before = dspool.store.dir_fsyncs
    stored = await gatherResults([dspool.add(job) for job in jobs])
    fsyncs = dspool.store.dir_fsyncs - before
    assert [j.job_id for j in stored] == [j.job_id for j in jobs]
    with other_store(tmp_path / "spool") as store:
        on_disk = [j.job_id for j in store.queued()]
    assert sorted(on_disk) == sorted(j.job_id for j in jobs)
    assert fsyncs < 50


@pytest_twisted.ensureDeferred
async def test_batch_with_one_key_twice_merges(dspool: DirectorySpool) -> None:
    """Two adds for one key in the same batch merge in arrival order."""
    first, second = await gatherResults(
        [dspool.add(make_job(token="a")), dspool.add(make_job(token="b", created=200.0))]
    )
    assert second.job_id == first.job_id
    [job] = await dspool.queued()
    assert job.callback.token == "b"


@pytest_twisted.ensureDeferred
async def test_two_spools_in_one_process_exclude_each_other(
    dspool: DirectorySpool, tmp_path: Path, reactor: Any
) -> None:
    """A second spool (same process, same directory) can neither claim, recover nor
    finish the first one's job."""
    other = start_directory_spool(tmp_path / "spool", reactor)
    try:
        job = await dspool.add(make_job())
        assert await dspool.claim(job.job_id) is not None
        assert await other.claim(job.job_id) is None
        assert await other.recover() == []
        with pytest.raises(NotHeld):
            await other.finish(job.job_id, JobState.DONE)
        assert (await dspool.finish(job.job_id, JobState.DONE)).state is JobState.DONE
    finally:
        await other.stopService()


@pytest_twisted.ensureDeferred
async def test_stop_abandons_held_jobs_to_recovery(tmp_path: Path, reactor: Any) -> None:
    """A job still held at stop stays RUNNING; the next start recovers it, one attempt more."""
    first = start_directory_spool(tmp_path / "spool", reactor)
    job = await first.add(make_job())
    await first.claim(job.job_id)
    await first.stopService()
    with pytest.raises(SpoolNotRunning):
        await first.add(make_job("other"))
    second = start_directory_spool(tmp_path / "spool", reactor)
    try:
        await second.sweep()
        stored = await second.get(job.job_id)
    finally:
        await second.stopService()
    assert (stored.state, stored.attempts) == (JobState.QUEUED, 1)


@pytest_twisted.ensureDeferred
async def test_sweep_announces_jobs_added_elsewhere(dspool: DirectorySpool, tmp_path: Path) -> None:
    """The sweep announces a job another process queued, once."""
    seen: list[Job] = []
    dspool.watch(seen.append)
    with other_store(tmp_path / "spool") as store:
        job = store.add(make_job())
    await dspool.sweep()
    await dspool.sweep()
    assert seen == [job]


@pytest_twisted.ensureDeferred
async def test_sweep_does_not_reannounce_own_adds(dspool: DirectorySpool) -> None:
    """A job this spool announced when adding it is not announced again by the sweep."""
    seen: list[Job] = []
    dspool.watch(seen.append)
    job = await dspool.add(make_job())
    await dspool.sweep()
    assert seen == [job]


@pytest_twisted.ensureDeferred
async def test_torn_temp_files_are_ignored_and_cleaned(tmp_path: Path, reactor: Any) -> None:
    """Temp files of dead writers are ignored and removed at start; a live writer's stays."""
    root = tmp_path / "spool"
    with other_store(root):
        pass
    dead_pid = int(Path("/proc/sys/kernel/pid_max").read_text())  # never a live pid
    torn = root / "tmp" / f"{_host_tag()}.{dead_pid}.{'a' * 32}.tmp"
    torn.write_bytes(b'{"slide_id": "half')
    old = root / "tmp" / "elsewhere.123.bb.tmp"
    old.write_bytes(b"{")
    os.utime(old, (1000.0, 1000.0))
    live = root / "tmp" / f"{_host_tag()}.{os.getppid()}.{'c' * 32}.tmp"
    live.write_bytes(b"{")
    spool = start_directory_spool(root, reactor)
    try:
        assert await spool.queued() == []
    finally:
        await spool.stopService()
    assert not torn.exists()
    assert not old.exists()
    assert live.exists()


@pytest_twisted.ensureDeferred
async def test_stale_temp_files_are_judged_by_the_wall_clock(tmp_path: Path, reactor: Any) -> None:
    """Another host's temp file is stale when the injected wall clock says it is an hour
    old (file mtimes are wall-clock times), and kept while it is fresh."""
    root = tmp_path / "spool"
    with other_store(root):
        pass
    fresh = root / "tmp" / "elsewhere.123.cc.tmp"
    fresh.write_bytes(b"{")
    mtime = fresh.stat().st_mtime
    for offset, survives in ((60.0, True), (3601.0, False)):
        spool = DirectorySpool(
            directory=FilePath(str(root)),
            reactor=reactor,
            sweep_interval=3600.0,
            owner="test",
            wall_clock=lambda offset=offset: mtime + offset,
        )
        spool.startService()
        try:
            await spool.sweep()
        finally:
            await spool.stopService()
        assert fresh.exists() is survives


@pytest_twisted.ensureDeferred
async def test_directory_fsync_refused_by_the_filesystem_is_tolerated(
    tmp_path: Path, reactor: Any
) -> None:
    """A filesystem that refuses fsync on directories (EINVAL, as some NFS and SMB
    servers do) does not fail an add; every directory fsync is still counted."""
    spool = start_directory_spool(tmp_path / "spool", reactor)

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        os.fsync(fd)

    spool.store.fsync = fsync
    try:
        await spool.sweep()
        before = (spool.store.dir_fsyncs, spool.store.file_fsyncs)
        job = await spool.add(make_job())
        assert await spool.claim(job.job_id) is not None
        assert (await spool.finish(job.job_id, JobState.DONE)).state is JobState.DONE
    finally:
        await spool.stopService()
    assert spool.store.dir_fsyncs - before[0] >= 5
    assert spool.store.file_fsyncs - before[1] >= 2


@pytest_twisted.ensureDeferred
async def test_corrupt_record_is_skipped_then_quarantined(
    dspool: DirectorySpool, tmp_path: Path
) -> None:
    """An unparsable queued record is skipped by listings and moved aside by an add."""
    job = make_job()
    path = tmp_path / "spool" / "queued" / f"{job.key}.json"
    path.write_bytes(b"not json")
    assert await dspool.queued() == []
    stored = await dspool.add(job)
    assert await dspool.queued() == [stored]
    assert [p.read_bytes() for p in (tmp_path / "spool" / "corrupt").iterdir()] == [b"not json"]


@pytest_twisted.ensureDeferred
async def test_recover_finishes_an_interrupted_release(
    dspool: DirectorySpool, tmp_path: Path
) -> None:
    """A crash between a release's queued write and its running delete loses nothing:
    recover() keeps the queued copy and counts no extra attempt."""
    root = tmp_path / "spool"
    with other_store(root) as store:
        job = store.add(make_job())
        store.claim(job.job_id)
        # The release's first half: the queued copy, without deleting the running one.
        (root / "queued" / f"{job.key}.json").write_bytes(job.to_json())
    assert await dspool.recover() == []
    assert await dspool.queued() == [job]
    assert (await dspool.counts())[JobState.RUNNING] == 0


# --- several processes ----------------------------------------------------------------


class Child(protocol.ProcessProtocol):
    """A spool_claimer.py process: its output lines, and events to wait on."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.lines: list[str] = []
        self.stderr = b""
        self._buffer = b""
        self._waiting: list[tuple[str, Deferred[None]]] = []
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *complete, self._buffer = self._buffer.split(b"\n")
        for raw in complete:
            line = raw.decode()
            self.lines.append(line)
            for waited in [w for w in self._waiting if w[0] == line]:
                self._waiting.remove(waited)
                waited[1].callback(None)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def wait_for(self, line: str) -> Deferred[None]:
        """Fire when ``line`` is printed (or has been); time out after TIMEOUT."""
        d: Deferred[None] = Deferred()
        if line in self.lines:
            d.callback(None)
        else:
            self._waiting.append((line, d))
        return d.addTimeout(TIMEOUT, self.reactor)

    def wait_ended(self) -> Deferred[None]:
        return self.ended.addTimeout(TIMEOUT, self.reactor)


def spawn(reactor: Any, directory: Path, *args: str) -> Child:
    child = Child(reactor)
    reactor.spawnProcess(
        child,
        sys.executable,
        [sys.executable, CLAIMER, str(directory), *args],
        env=dict(os.environ),
    )
    return child


@pytest_twisted.ensureDeferred
async def test_killed_holder_is_recovered(
    dspool: DirectorySpool, tmp_path: Path, reactor: Any
) -> None:
    """After a holder process is SIGKILLed, recover() requeues its job with attempts 1."""
    job = await dspool.add(make_job())
    child = spawn(reactor, tmp_path / "spool", "hold", job.job_id)
    await child.wait_for(f"claimed {job.job_id}")
    os.kill(child.transport.pid, signal.SIGKILL)
    await child.wait_ended()
    [recovered] = await dspool.recover()
    assert (recovered.job_id, recovered.state, recovered.attempts) == (
        job.job_id,
        JobState.QUEUED,
        1,
    )
    assert await dspool.queued() == [recovered]


@pytest_twisted.ensureDeferred
async def test_live_holder_is_not_recovered(
    dspool: DirectorySpool, tmp_path: Path, reactor: Any
) -> None:
    """A job held by a live process stays RUNNING through recover()."""
    job = await dspool.add(make_job())
    child = spawn(reactor, tmp_path / "spool", "hold", job.job_id)
    try:
        await child.wait_for(f"claimed {job.job_id}")
        assert await dspool.recover() == []
        assert await dspool.claim(job.job_id) is None
        assert (await dspool.get(job.job_id)).state is JobState.RUNNING
    finally:
        child.transport.closeStdin()
        await child.wait_ended()


@pytest_twisted.ensureDeferred
async def test_processes_claim_disjoint_sets(
    dspool: DirectorySpool, tmp_path: Path, reactor: Any
) -> None:
    """Four processes racing over 200 queued jobs claim disjoint sets covering all 200."""
    jobs = await gatherResults([dspool.add(make_job(f"slide-{i}")) for i in range(200)])
    children = [spawn(reactor, tmp_path / "spool", "race") for _ in range(4)]
    await gatherResults([c.wait_for("ready") for c in children])
    for c in children:
        c.transport.write(b"go\n")
    await gatherResults([c.wait_for("done") for c in children])
    await gatherResults([c.wait_ended() for c in children])
    claimed = [
        {line.split()[1] for line in c.lines if line.startswith("claimed ")} for c in children
    ]
    assert sum(len(s) for s in claimed) == 200
    assert set().union(*claimed) == {j.job_id for j in jobs}
    assert all(c.stderr == b"" for c in children), [c.stderr for c in children]


@pytest_twisted.ensureDeferred
async def test_notice_announces_a_job_another_process_queued(tmp_path: Path, reactor: Any) -> None:
    """An extra front door's job reaches this spool's watchers on notice(), without a
    sweep; a notice of an unknown, already announced or no longer queued job is
    silent."""
    spool = start_directory_spool(tmp_path / "spool", reactor)
    try:
        seen: list[Job] = []
        spool.watch(seen.append)
        with other_store(tmp_path / "spool") as other:
            theirs = other.add(make_job("slide-theirs"))
            gone = other.add(make_job("slide-gone"))
            other.cancel(gone.job_id)
        assert seen == []
        await spool.notice(theirs.job_id, theirs.key)
        assert [job.job_id for job in seen] == [theirs.job_id]
        await spool.notice(theirs.job_id, theirs.key)
        await spool.notice(gone.job_id, gone.key)
        await spool.notice("0123456789abcdef0123456789abcdef", theirs.key)
        assert [job.job_id for job in seen] == [theirs.job_id]
        with pytest.raises(ValueError):
            await spool.notice("../x", theirs.key)
    finally:
        await spool.stopService()


def _full_after(allowed: int) -> Any:
    """An fsync whose file fsyncs fail with ENOSPC after the first ``allowed``."""
    count = [0]

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            count[0] += 1
            if count[0] > allowed:
                raise OSError(errno.ENOSPC, "No space left on device")
        os.fsync(fd)

    return fsync


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.parent.name != "locks"
    }


@pytest.mark.parametrize("merge", [False, True], ids=["new-key", "merge"])
@pytest_twisted.ensureDeferred
async def test_a_full_disk_at_commit_leaves_nothing_behind(
    dspool: DirectorySpool, tmp_path: Path, merge: bool
) -> None:
    """ENOSPC while adding (a new key, or the rewrite of a merge): the add fails with
    ENOSPC, no temp file stays, the queued job already there is unchanged; with space
    back, the same add succeeds."""
    root = tmp_path / "spool"
    first = await dspool.add(make_job("slide-1"))
    before = _files(root)
    again = make_job("slide-1" if merge else "slide-2", token="token-2", created=150.0)
    # The merge writes the new request's temp file, then the merged record.
    dspool.store.fsync = _full_after(1 if merge else 0)
    with pytest.raises(OSError) as raised:
        await dspool.add(again)
    assert raised.value.errno == errno.ENOSPC
    assert _files(root) == before
    assert list((root / "tmp").iterdir()) == []
    dspool.store.fsync = os.fsync
    stored = await dspool.add(again)
    assert (stored.job_id == first.job_id) is merge
    assert len(await dspool.queued()) == (1 if merge else 2)


@pytest_twisted.ensureDeferred
async def test_a_deferral_survives_a_restart_and_binds_every_daemon(
    tmp_path: Path, reactor: Any
) -> None:
    """A deferred job's not_before is on disk: after a restart the job is still deferred,
    and another daemon's store refuses to claim it before not_before too."""
    first = start_directory_spool(tmp_path / "spool", reactor)
    job = await first.add(make_job())
    await first.claim(job.job_id)
    await first.release(
        job.job_id,
        count_attempt=False,
        error="SPS down",
        deferral=Deferral(500.0, "SPS unavailable", DeferralKind.SPS, since=120.0),
    )
    await first.stopService()
    second = start_directory_spool(tmp_path / "spool", reactor)
    try:
        await second.sweep()
        stored = await second.get(job.job_id)
        assert stored is not None
        assert (stored.not_before, stored.deferral_kind, stored.deferred_since) == (
            500.0,
            DeferralKind.SPS,
            120.0,
        )
        assert stored.attempts == 0
        assert await second.claim(job.job_id, now=499.0) is None
        with other_store(tmp_path / "spool") as store:
            assert store.claim(job.job_id, now=499.0) is None
        assert await second.claim(job.job_id, now=500.0) is not None
    finally:
        await second.stopService()
