"""Transient or permanent (workers/faults.py), the backoff, and TransientFailure over AMP."""

from __future__ import annotations

import errno

import attrs
import pytest
from fakes import make_job
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath

from dpatia_daemon.config import WorkersConfig
from dpatia_daemon.jobs import DeferralKind
from dpatia_daemon.pipeline.failures import DownloadError
from dpatia_daemon.sps.errors import (
    SPSNotFound,
    SPSProtocolError,
    SPSTimeout,
    SPSUnauthorized,
    SPSUnavailable,
    error_for_status,
)
from dpatia_daemon.workers.commands import AnalysisFailed, TransientFailure
from dpatia_daemon.workers.faults import Fault, classify, next_try
from dpatia_daemon.workers.health import SPSHealth

CONFIG = WorkersConfig(
    work_directory=FilePath("/nonexistent"),
    min_backoff=30.0,
    max_backoff=600.0,
    max_deferral_age=3 * 86400.0,
)


@pytest.mark.parametrize(
    ("error", "transient", "sps"),
    [
        (SPSUnavailable("connection failed: ConnectionRefusedError", endpoint="GET x"), True, True),
        (SPSTimeout("no complete answer within 30 s", endpoint="GET x"), True, True),
        (error_for_status("GET x", 503, b"", (), conflict_aware=False, attempts=5), True, True),
        (error_for_status("GET x", 429, b"", (), conflict_aware=False, attempts=5), True, True),
        (error_for_status("PUT x", 500, b"", (), conflict_aware=False, attempts=None), True, True),
        (SPSUnauthorized("token rejected", endpoint="GET x", status=401), False, False),
        (
            error_for_status("GET x", 400, b"", (), conflict_aware=False, attempts=None),
            False,
            False,
        ),
        (
            error_for_status("GET x", 422, b"", (), conflict_aware=False, attempts=None),
            False,
            False,
        ),
        (SPSNotFound("not found", endpoint="GET x", status=404), False, False),
        (SPSProtocolError("malformed answer", endpoint="GET x", status=200), False, False),
        (DownloadError("s", "the connection closed early", transient=True), True, True),
        (DownloadError("s", "cannot write: No space left", disk=True), True, False),
        (DownloadError("s", "malformed multipart answer"), False, False),
        (OSError(errno.ENOSPC, "No space left on device"), True, False),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True, False),
        (OSError(errno.EACCES, "Permission denied"), False, False),
        (ValueError("the slide is corrupt"), False, False),
        (AnalysisFailed("ValueError: stain not recognised"), False, False),
    ],
)
def test_every_failure_is_classified_once(error: BaseException, transient: bool, sps: bool) -> None:
    """Connection errors, deadlines, 5xx, 429, broken downloads and full disks are
    transient (the SPS's fault or this host's); other 4xx (a token rejected with no
    other to try included), malformed answers, corrupt slides and analysis errors are
    permanent."""
    fault = classify(error)
    assert (fault.transient, fault.sps) == (transient, sps)


def test_a_404_is_transient_only_on_a_retry() -> None:
    """404 on a first attempt: the slide is not there (permanent); on a retry after an
    outage, an SPS that is not itself yet (transient)."""
    error = SPSNotFound("not found", endpoint="GET slides/{id}/info", status=404)
    assert classify(error).transient is False
    assert classify(error, retrying=True).transient is True
    # ...of this job only: one slide's 404 does not mark the SPS failing for all.
    assert classify(error, retrying=True).sps is False


def test_retry_after_rides_on_the_error_and_over_amp() -> None:
    """A 503's Retry-After is kept on the SPSError; TransientFailure carries it (and
    whose fault it was) through AMP's one description."""
    error = error_for_status(
        "GET x", 503, b"", (), conflict_aware=False, attempts=5, retry_after=42.0
    )
    assert classify(error) == Fault(True, str(error), 42.0, True)
    sent = TransientFailure("fetching the slide failed: down", 42.0, sps=True)
    received = TransientFailure(str(sent).encode("utf-8"))
    assert (received.message, received.retry_after, received.sps) == (
        "fetching the slide failed: down",
        42.0,
        True,
    )
    local = TransientFailure(str(TransientFailure("disk full", sps=False)).encode())
    assert (local.message, local.retry_after, local.sps) == ("disk full", None, False)
    assert classify(local) == Fault(True, "disk full", None, False)


def test_a_transient_fault_backs_off_doubling_to_the_cap_then_expires() -> None:
    """Postfix's backoff: the first wait is min_backoff, then as long as the job has
    been deferred (30, 30, 60, 120 ... s), never above max_backoff; past
    max_deferral_age there is no next try."""
    job = make_job("s")
    fault = Fault(True, "SPS unavailable", sps=True)
    now, waits = 1000.0, []
    for _ in range(9):
        later = next_try(CONFIG, job, fault, now)
        assert later is not None
        assert (later.kind, later.since) == (DeferralKind.SPS, 1000.0)
        waits.append(later.not_before - now)
        job = attrs.evolve(job, not_before=later.not_before, deferred_since=later.since)
        now = later.not_before
    assert waits == [30, 30, 60, 120, 240, 480, 600, 600, 600]
    assert next_try(CONFIG, job, fault, 1000.0 + 3 * 86400 - 1) is not None
    assert next_try(CONFIG, job, fault, 1000.0 + 3 * 86400) is None


def test_retry_after_is_honoured_up_to_max_backoff() -> None:
    """The SPS's Retry-After decides the wait (even below min_backoff), capped."""
    job = make_job("s")
    assert next_try(CONFIG, job, Fault(True, "x", 5.0, True), 0.0).not_before == 5.0  # type: ignore[union-attr]
    assert next_try(CONFIG, job, Fault(True, "x", 9999.0, True), 0.0).not_before == 600.0  # type: ignore[union-attr]


def test_a_permanent_failure_waits_doubling_per_attempt_spent() -> None:
    """A retry after a permanent failure waits min_backoff, then doubles per attempt."""
    waits = []
    for attempts in range(6):
        later = next_try(
            CONFIG, attrs.evolve(make_job("s"), attempts=attempts), Fault(False, "boom"), 0.0
        )
        assert later is not None and later.kind is DeferralKind.ERROR and later.since is None
        waits.append(later.not_before)
    assert waits == [30, 60, 120, 240, 480, 600]


def test_the_health_view_probes_a_failing_sps_and_clears_on_success() -> None:
    """failed() marks an SPS (by base URL) failing, probe due after the interval (or
    its Retry-After); one probe at a time; succeeded() clears it and tells listeners."""
    clock = Clock()
    health = SPSHealth(clock, probe_interval=10.0)
    recovered: list[str] = []
    health.subscribe(recovered.append)
    url = "http://127.0.0.1:1/sps/"
    health.failed(url, "HTTP 503", retry_after=20.0)
    assert health.down("http://127.0.0.1:1/sps") and not health.down("http://127.0.0.1:2/sps")
    clock.advance(19)
    assert not health.probe_due(url)
    clock.advance(1)
    assert health.probe_due(url)
    health.probing(url, "a" * 32)
    assert not health.probe_due(url) and health.is_probe(url, "a" * 32)
    health.failed(url, "HTTP 503")
    assert not health.probe_due(url)
    clock.advance(10)
    assert health.probe_due(url)
    health.succeeded(url)
    assert not health.down(url) and recovered == ["http://127.0.0.1:1/sps"]
    health.succeeded(url)  # already healthy: nobody is told again
    assert recovered == ["http://127.0.0.1:1/sps"]
