"""The SPS version cache (sps/info.py) and quality control only where the SPS has it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import failure_result_of, success_result_of
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from dpatia_daemon.jobs import Callback, Job, JobKind
from dpatia_daemon.models import VersionInfo
from dpatia_daemon.simulator.fake import BASE_PATH, FakeSPS
from dpatia_daemon.simulator.versions import version_info
from dpatia_daemon.sps.client import SPSClient
from dpatia_daemon.sps.info import SPSVersions, at_least, parse_version
from dpatia_daemon.sps.writer import ResultWriter

BASE = "http://sps.test" + BASE_PATH
SLIDE = "slide-qc"


def _setup(api_version: str = "1.10") -> tuple[FakeSPS, Clock, SPSClient, Callback]:
    fake = FakeSPS(version=version_info(api_version))
    fake.add_slide(SLIDE)
    clock = Clock()
    client = SPSClient(
        http=HTTPClient(RequestTraversalAgent(fake.resource())),
        clock=clock,
        software_version="1.0",
        retries=0,
    )
    return fake, clock, client, Callback(BASE, fake.issue_token())


def _paths(fake: FakeSPS, method: str = "") -> list[str]:
    return [r.path.rsplit("/v1/", 1)[-1] for r in fake.requests if not method or r.method == method]


def test_versions_compare_numerically() -> None:
    """1.10 is newer than 1.9 (not a string comparison); junk is unknown."""
    assert parse_version("1.10") == (1, 10)
    assert at_least("1.10", "1.9") is True
    assert at_least("1.9", "1.10") is False
    assert at_least("2", "1.10") is True
    assert at_least("1.10.0", "1.10") is True
    assert at_least("beta", "1.10") is None
    assert at_least(None, "1.10") is None


def test_info_is_asked_once_per_base_and_shared_by_concurrent_askers() -> None:
    """Two concurrent askers and a later one: one GET /info for the base URL."""
    fake, clock, client, callback = _setup("1.9")
    versions = SPSVersions(client, clock)
    first = ensureDeferred(versions.version(callback))
    second = ensureDeferred(versions.version(Callback(BASE + "/", callback.token)))
    assert success_result_of(first) == VersionInfo("1.9", "4.1.0.0")
    assert success_result_of(second) == VersionInfo("1.9", "4.1.0.0")
    assert success_result_of(ensureDeferred(versions.supports(callback, "1.10"))) is False
    assert _paths(fake) == ["info"]
    clock.advance(versions.ttl + 1)
    success_result_of(ensureDeferred(versions.version(callback)))
    assert _paths(fake) == ["info", "info"]


def test_a_failed_info_is_unknown_and_asked_again_later() -> None:
    """An SPS whose /info fails is 'unknown' (None), remembered for retry_after only."""
    fake, clock, client, callback = _setup()
    fake.fail_next = [404]
    versions = SPSVersions(client, clock)
    with capturedLogs() as events:
        assert success_result_of(ensureDeferred(versions.supports(callback, "1.10"))) is None
    assert any("version is unknown" in formatEvent(e) for e in events)
    assert success_result_of(ensureDeferred(versions.version(callback))) is None
    assert _paths(fake) == ["info"]
    clock.advance(versions.retry_after + 1)
    assert success_result_of(ensureDeferred(versions.version(callback))) == fake.version


def _writer(client: SPSClient, clock: Clock, *, versions: bool = True) -> ResultWriter:
    writer = ResultWriter(sps=client, clock=clock, display_name="QC app")
    if versions:
        writer.versions = SPSVersions(client, clock)
    return writer


def _job(callback: Callback) -> Job:
    return Job(
        slide_id=SLIDE, application_id="app", kind=JobKind.CREATE, callback=callback, created=0.0
    )


def test_qc_with_a_version_reads_it_again_just_before_writing() -> None:
    """IA-API 1.10: the verdict goes out with the slide's *current* QC versionId, read
    just before the PUT, even when the job's metadata had an older one."""
    fake, clock, client, callback = _setup("1.10")
    stale = fake.slides[SLIDE].info["qualityControl"]["versionId"]
    fake.slides[SLIDE].info["qualityControl"]["versionId"] = "changed-by-a-user"
    done = success_result_of(
        ensureDeferred(_writer(client, clock).quality_control(_job(callback), "Rejected", stale))
    )
    assert done == "stored"
    [put] = [r for r in fake.requests if r.method == "PUT"]
    body = json.loads(put.body)
    assert body["qualityControl"] == {"status": "Rejected", "versionId": "changed-by-a-user"}
    assert fake.slides[SLIDE].info["qualityControl"]["status"] == "Rejected"


@pytest.mark.parametrize("versions", [True, False])
def test_qc_without_a_version_is_skipped_never_sent_with_null(versions: bool) -> None:
    """An SPS 4.1 (IA-API 1.9): no quality control.  With the version cache the verdict
    is skipped without a call; without it, the slide info has no qualityControl
    versionId, so it is skipped too: no PUT, and never ``versionId: null``."""
    fake, clock, client, callback = _setup("1.9")
    writer = _writer(client, clock, versions=versions)
    done = success_result_of(
        ensureDeferred(writer.quality_control(_job(callback), "QualityOk", None))
    )
    assert done.startswith("skipped")
    assert _paths(fake, "PUT") == []
    expected = ["info"] if versions else [f"slides/{SLIDE}/info"]
    assert _paths(fake) == expected


def test_qc_with_unknown_sps_version_follows_the_slide_info() -> None:
    """/info failing: the slide info decides (it has qualityControl: the PUT is made)."""
    fake, clock, client, callback = _setup("1.10")
    fake.fail_next = [500]
    done = success_result_of(
        ensureDeferred(_writer(client, clock).quality_control(_job(callback), "NotSet", None))
    )
    assert done == "stored"
    assert _paths(fake, "PUT") == [f"slides/{SLIDE}/qualityControl"]


def test_the_simulator_serves_qc_and_case_lists_only_where_its_version_has_them() -> None:
    """dpatia-sps at 1.8: no qualityControl in slide info, 404 on QC and case lists."""
    fake, clock, client, callback = _setup("1.8")
    info: Any = success_result_of(ensureDeferred(client.slide_info(callback, SLIDE)))
    assert "qualityControl" not in info
    from dpatia_daemon.sps.client import SPSNotFound

    for call in (
        client.set_quality_control(
            callback, SLIDE, status="NotSet", version_id="x", application_version="1"
        ),
        client.slide_request_images(callback, SLIDE),
    ):
        failure_result_of(ensureDeferred(call), SPSNotFound)
