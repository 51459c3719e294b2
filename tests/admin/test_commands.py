"""The operator's commands against a spool with jobs in every state (no daemon running)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_spool import TOKEN, Spool, job, record, run, run_json, spool_in_every_state
from conftest import write_config

from dpatia_daemon.jobs import JobState

DAY = 86400.0


@pytest.fixture
def config(tmp_path: Path) -> str:
    return write_config(tmp_path, {"app": {"analysis": "tests.analyses_for_tests:noop"}})


@pytest.fixture
def spool(tmp_path: Path, config: str) -> Iterator[Spool]:
    with spool_in_every_state(tmp_path / "spool") as s:
        yield s


def test_status_counts_every_state_and_shows_the_deferred_job_with_its_next_try(
    config: str, spool: Spool
) -> None:
    """status: the counts, the deferred job and its next try, running jobs, failures."""
    status, report = run_json("status", "--config", config)
    assert status == 0
    assert report["counts"] == {"queued": 2, "running": 1, "done": 1, "failed": 1, "cancelled": 1}
    assert report["deferred"] == 1 and report["corrupt"] == 0
    [deferred] = report["deferred_jobs"]
    assert deferred["job_id"] == spool.deferred
    assert 3500 < deferred["next_try_in"] <= 3600
    assert deferred["deferred_reason"] == "the SPS answered 503"
    assert [j["job_id"] for j in report["running_jobs"]] == [spool.running]
    assert [j["job_id"] for j in report["recent_failures"]] == [spool.failed]
    assert report["oldest_queued_age"] >= 590

    status, text = run("status", "--config", config)
    assert status == 0
    assert "1 deferred, next try in 60 min" in text
    assert spool.running in text and "the analysis raised ValueError" in text


def test_status_reports_corrupt_records(config: str, spool: Spool, tmp_path: Path) -> None:
    """Files quarantined in corrupt/ are counted (they are kept, never pruned)."""
    (tmp_path / "spool" / "corrupt" / "queued.ab.json.1").write_bytes(b"{")
    assert run_json("status", "--config", config)[1]["corrupt"] == 1
    assert "kept: look at corrupt/" in run("status", "--config", config)[1]


def test_no_command_prints_a_token_or_the_context(config: str, spool: Spool) -> None:
    """Views carry no callback token and no request context, in tables or JSON."""
    for argv in (
        ("status",),
        ("jobs", "--state", "all"),
        ("show", spool.queued),
        ("show", spool.running),
    ):
        for extra in ((), ("--json",)):
            _, text = run(*argv, "--config", config, *extra)
            assert TOKEN not in text and "private" not in text


def test_jobs_lists_the_queue_by_default_and_filters_by_state_and_slide(
    config: str, spool: Spool
) -> None:
    """jobs: queued (dispatch order) and running by default; --state, --slide filter."""
    _, views = run_json("jobs", "--config", config)
    assert [v["job_id"] for v in views] == [spool.deferred, spool.queued, spool.running]
    assert views[0]["deferred"] and views[0]["next_try"] is not None
    _, views = run_json("jobs", "--config", config, "--state", "all")
    assert len(views) == 6
    _, views = run_json("jobs", "--config", config, "--state", "failed")
    assert [(v["job_id"], v["attempts"]) for v in views] == [(spool.failed, 1)]
    _, views = run_json("jobs", "--config", config, "--state", "all", "--slide", "slide-done")
    assert [v["job_id"] for v in views] == [spool.done]
    status, text = run("jobs", "--config", config)
    assert status == 0 and text.splitlines()[0].split() == [
        "JOB",
        "STATE",
        "SLIDE",
        "ATTEMPTS",
        "UPDATED",
        "NOTE",
    ]
    assert "deferred, next try in 60 min: the SPS answered 503" in text


def test_show_prints_one_job_and_says_when_there_is_none(
    config: str, spool: Spool, capsys: pytest.CaptureFixture[str]
) -> None:
    """show: every field; an unknown id exits 1, a malformed one 2, both on stderr."""
    status, view = run_json("show", spool.failed, "--config", config)
    assert status == 0
    assert (view["state"], view["last_error"], view["image_size"]) == (
        "failed",
        "the analysis raised ValueError",
        "4000 x 3000",
    )
    assert run("show", "ab" * 16, "--config", config)[0] == 1
    assert "no job abab" in capsys.readouterr().err
    assert run("show", "../etc", "--config", config)[0] == 2
    assert "not a job id" in capsys.readouterr().err


def test_retry_puts_a_failed_job_back_in_the_queue(
    config: str, spool: Spool, tmp_path: Path
) -> None:
    """retry JOB of a failed job: queued again, attempts from 0, the failed record gone."""
    status, text = run("retry", spool.failed, "--config", config)
    assert status == 0 and "queued again" in text
    queued = record(tmp_path / "spool", "queued", spool.failed)
    assert queued is not None and queued.attempts == 0 and queued.not_before is None
    assert record(tmp_path / "spool", "failed", spool.failed) is None
    # The next claim (a daemon's) takes it.
    assert spool.store.claim(spool.failed) is not None


def test_retry_lifts_a_deferral_and_refuses_other_states(
    config: str, spool: Spool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """retry of a deferred job: it may run now; of a done or running job: exit 1, unchanged."""
    assert run("retry", spool.deferred, "--config", config)[0] == 0
    lifted = record(tmp_path / "spool", "queued", spool.deferred)
    assert lifted is not None and lifted.not_before is None and lifted.deferred_reason is None
    for job_id in (spool.done, spool.running, spool.cancelled):
        status, text = run("retry", job_id, "--config", config)
        assert status == 1
    assert record(tmp_path / "spool", "done", spool.done) is not None
    assert run("retry", "--config", config)[0] == 2  # neither JOB nor --failed


def test_retry_failed_retries_every_failed_job_but_not_over_a_queued_one(
    config: str, spool: Spool, tmp_path: Path
) -> None:
    """retry --failed: each failed job is queued, unless its slide already has a queued
    job (the failed record is then kept, and the exit status says so)."""
    now = time.time()
    other = spool.store.add(job("slide-again", now))
    spool.store.claim(other.job_id)
    spool.store.finish(other.job_id, JobState.FAILED, "boom")
    newer = spool.store.add(job("slide-again", now + 1))
    status, results = run_json("retry", "--failed", "--config", config)
    assert status == 1
    by_id = {r["job_id"]: r for r in results}
    assert by_id[spool.failed]["ok"] and not by_id[other.job_id]["ok"]
    assert newer.job_id in by_id[other.job_id]["message"]
    assert record(tmp_path / "spool", "failed", other.job_id) is not None
    assert record(tmp_path / "spool", "queued", spool.failed) is not None


def test_cancel_a_queued_job_cancels_it_and_a_running_one_asks_its_holder(
    config: str, spool: Spool, tmp_path: Path
) -> None:
    """cancel: a queued job ends CANCELLED at once; a running one gets the marker its
    holder acts on (here: its release ends it CANCELLED); an ended one exits 1."""
    status, text = run("cancel", spool.queued, "--config", config)
    assert status == 0 and "cancelled" in text
    cancelled = record(tmp_path / "spool", "cancelled", spool.queued)
    assert (
        cancelled is not None and cancelled.last_error == "cancelled by an operator (dpatia cancel)"
    )

    status, text = run("cancel", spool.running, "--config", config)
    assert status == 0 and "cancellation requested" in text
    assert spool.store.cancel_requested(spool.running)
    assert run_json("show", spool.running, "--config", config)[1]["cancel_requested"]
    assert spool.store.release(spool.running, count_attempt=False).state is JobState.CANCELLED

    assert run("cancel", spool.done, "--config", config)[0] == 1


def _age(path: Path, days: float) -> None:
    then = time.time() - days * DAY
    os.utime(path, (then, then))


def test_purge_removes_old_history_and_work_folders_only(
    config: str, spool: Spool, tmp_path: Path
) -> None:
    """purge --older-than: history records and retired work folders older than DAYS go;
    younger ones, active jobs and their folders stay."""
    root = tmp_path / "spool"
    _age(next((root / "done").glob("*.json")), 40)
    _age(next((root / "failed").glob("*.json")), 40)
    work = tmp_path / "work"
    old_folder, young_folder = work / ("a" * 32), work / ("b" * 32)
    for folder in (old_folder, young_folder):
        (folder / "wsi").mkdir(parents=True)
        (folder / "wsi" / "slide.svs").write_bytes(b"x" * 1000)
    _age(old_folder, 40)
    status, report = run_json("purge", "--older-than", "30", "--config", config)
    assert status == 0
    assert (report["history_removed"], report["work_folders_removed"]) == (2, 1)
    assert not list((root / "done").glob("*.json")) and not list((root / "failed").glob("*.json"))
    assert len(list((root / "cancelled").glob("*.json"))) == 1
    assert not old_folder.exists() and young_folder.exists()
    assert run_json("status", "--config", config)[1]["counts"]["queued"] == 2


def test_changing_commands_refuse_to_run_as_another_user(
    config: str, spool: Spool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """retry, cancel and purge as a user not owning the spool (root, say) exit 2 and
    change nothing: the files they would create must stay the daemon's."""
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    assert run("cancel", spool.queued, "--config", config)[0] == 2
    assert "run this as that user" in capsys.readouterr().err
    assert run("status", "--config", config)[0] == 0  # reading is fine
    monkeypatch.undo()
    assert run_json("show", spool.queued, "--config", config)[1]["state"] == "queued"


def test_commands_on_a_missing_spool_or_bad_config_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No spool yet, or a config with an error: one line on stderr, exit status 2."""
    config = write_config(tmp_path)
    assert run("status", "--config", config)[0] == 2
    assert "no spool at" in capsys.readouterr().err
    bad = write_config(tmp_path, {"spool": {"sweep_interval": "soon"}}, name="bad.ini")
    assert run("jobs", "--config", bad)[0] == 2
    assert "configuration error" in capsys.readouterr().err


def test_check_config_passes_a_good_config_and_names_what_fails(tmp_path: Path) -> None:
    """check-config: every check ok for a usable config (exit 0); a spool path that is
    a file, or an unloadable config, fails with the reason (exit 1)."""
    good = write_config(tmp_path, {"app": {"analysis": "tests.analyses_for_tests:noop"}})
    status, checks = run_json("check-config", "--config", good)
    assert status == 0, checks
    assert {c["check"] for c in checks} >= {"config file", "listen", "spool directory", "analysis"}
    [filesystem] = [c for c in checks if c["check"] == "spool filesystem"]
    assert filesystem["result"] in ("ok", "warn")  # (warn: this disk's own mount, say)
    assert not (tmp_path / "spool").exists()  # nothing was created

    (tmp_path / "file").write_text("")
    bad = write_config(tmp_path, {"spool": {"directory": "{tmp}/file"}}, name="bad.ini")
    status, checks = run_json("check-config", "--config", bad)
    assert status == 1
    [spool_check] = [c for c in checks if c["check"] == "spool directory"]
    assert spool_check["result"] == "fail" and "not a directory" in spool_check["detail"]

    status, text = run("check-config", "--config", str(tmp_path / "none.ini"))
    assert status == 1 and "no such file" in text


def test_check_config_warns_when_the_port_is_taken(tmp_path: Path, reactor: object) -> None:
    """A listen port already in use (the running daemon's, say) is a warning, not a failure."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path,
            {
                "app": {"analysis": "tests.analyses_for_tests:noop"},
                "server": {"listen": f"tcp:{port}:interface=127.0.0.1"},
            },
        )
        status, checks = run_json("check-config", "--config", config)
    [listen] = [c for c in checks if c["check"] == "listen"]
    assert status == 0 and listen["result"] == "warn" and "in use" in listen["detail"]
