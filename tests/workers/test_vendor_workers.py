"""The vendor's workers: a plugin found by name, another interpreter, extra
environment variables, GPUs per slot, and the start-time check of ``[workers] python``.

What each worker process is given is checked on the fake process reactor (every
spawn's executable and environment, across restarts); one real worker, run through a
wrapper interpreter the test writes, proves the whole path end to end.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
import pytest_twisted
from conftest import success_result_of, write_config
from fakes import ProcessClock
from plugin_helpers import VENDOR_MODULE, install_plugin
from test_supervisor import Rig, only_result, rig  # noqa: F401 - rig is a fixture
from twisted.python.filepath import FilePath

from dpatia_daemon import __version__
from dpatia_daemon.config import ConfigError, WorkersConfig, load_config
from dpatia_daemon.jobs import JobState
from dpatia_daemon.sections import BadValue
from dpatia_daemon.spool import MemorySpool
from dpatia_daemon.workers.folders import WorkFolders
from dpatia_daemon.workers.interpreter import check_workers_python
from dpatia_daemon.workers.pool import PACKAGE_ROOT
from dpatia_daemon.workers.supervisor import Supervisor


def wrapper(tmp_path: Path, body: str | None = None) -> tuple[str, Path]:
    """A 'second interpreter': a script that records each run, then runs our Python
    (or ``body`` instead).  Returns its path and the record file."""
    record = tmp_path / "wrapper-ran.txt"
    script = tmp_path / "bin" / "python"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$$ $*" >> "{record}"\n'
        + (body if body is not None else f'exec "{sys.executable}" "$@"\n')
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script), record


def fake_supervisor(tmp_path: Path, reactor: ProcessClock, **config: object) -> Supervisor:
    spool = MemorySpool()
    spool.startService()
    work = FilePath(str(tmp_path / "work"))
    return Supervisor(
        reactor=reactor,
        spool=spool,
        writer=None,  # type: ignore[arg-type]  # no job runs in these tests
        config=WorkersConfig(work_directory=work, **config),  # type: ignore[arg-type]
        analysis="mymodel",
        folders=WorkFolders(work),
        env={"PATH": "/usr/bin", "PYTHONPATH": "/daemon/extra"},
        restart_initial=1.0,
    )


def test_each_slot_keeps_its_gpus_across_restarts(tmp_path: Path) -> None:
    """gpus = 0, 1, 2+3 with 4 workers: slots see 0, 1, "2,3", 0 (round-robin), each
    with its slot number; a worker that dies is replaced by one seeing the same GPUs."""
    reactor = ProcessClock()
    supervisor = fake_supervisor(tmp_path, reactor, count=4, gpus=("0", "1", "2+3"))
    supervisor.startService()

    def seen() -> list[tuple[str, str, str]]:
        return [
            (p.env["DPATIA_WORKER_SLOT"], p.env["CUDA_VISIBLE_DEVICES"], p.env["CUDA_DEVICE_ORDER"])
            for _, p, _, _ in reactor.spawned
        ]

    assert seen() == [
        ("1", "0", "PCI_BUS_ID"),
        ("2", "1", "PCI_BUS_ID"),
        ("3", "2,3", "PCI_BUS_ID"),
        ("4", "0", "PCI_BUS_ID"),
    ]
    reactor.spawned[1][1].end(code=1)  # slot 2's worker crashes
    reactor.spawned[2][1].end(code=1)  # and slot 3's
    reactor.advance(1.0)
    assert seen()[4:] == [("2", "1", "PCI_BUS_ID"), ("3", "2,3", "PCI_BUS_ID")]
    assert [s["gpus"] for s in supervisor.snapshot()] == ["0", "1", "2,3", "0"]
    stopped = supervisor.stopService()
    for _, process, _, _ in reactor.spawned:
        process.end(code=0)
    success_result_of(stopped)


def test_without_gpus_no_cuda_variable_is_set(tmp_path: Path) -> None:
    """No [workers] gpus: CUDA_VISIBLE_DEVICES is whatever the daemon's environment says
    (here nothing), and our code comes first on the workers' PYTHONPATH."""
    reactor = ProcessClock()
    supervisor = fake_supervisor(tmp_path, reactor, count=1)
    supervisor.startService()
    env = reactor.last.env
    assert "CUDA_VISIBLE_DEVICES" not in env
    assert env["PYTHONPATH"] == os.pathsep.join([PACKAGE_ROOT, "/daemon/extra"])
    assert reactor.last.executable == sys.executable
    supervisor.stopService()
    reactor.last.end(code=0)


def test_another_interpreter_gets_its_own_path_and_the_extra_variables(tmp_path: Path) -> None:
    """[workers] python: workers run that executable, without our code put on their
    PYTHONPATH (it has dpatia installed, and our site-packages must not mix with its
    own); [workers] environment adds variables, overriding the daemon's."""
    reactor = ProcessClock()
    supervisor = fake_supervisor(
        tmp_path,
        reactor,
        count=1,
        python="/opt/vendor/venv/bin/python",
        environment=(("PYTHONPATH", "/opt/vendor/models"), ("HF_HOME", "/opt/vendor/hf")),
    )
    supervisor.startService()
    process = reactor.last
    assert process.executable == "/opt/vendor/venv/bin/python"
    assert reactor.spawned[0][2][:3] == [
        "/opt/vendor/venv/bin/python",
        "-m",
        "dpatia_daemon.workers.child",
    ]
    assert (process.env["PYTHONPATH"], process.env["HF_HOME"]) == (
        "/opt/vendor/models",
        "/opt/vendor/hf",
    )
    supervisor.stopService()
    process.end(code=0)


def test_the_new_keys_parse_and_refuse_what_would_not_work(tmp_path: Path) -> None:
    """environment takes shell-quoted NAME=value words; python must be an executable;
    gpus groups need a slot each; the daemon's own variables cannot be overridden."""
    python, _ = wrapper(tmp_path)
    config = load_config(
        write_config(
            tmp_path,
            {
                "app": {"analysis": "demo"},
                "workers": {
                    "count": 2,
                    "python": python,
                    "gpus": "0, 1",
                    "environment": "\n  HF_HOME=/opt/hf 'NOTE=two words'\n  EMPTY=",
                },
            },
        )
    )
    workers = config.workers
    assert workers.python == python
    assert workers.environment == (("HF_HOME", "/opt/hf"), ("NOTE", "two words"), ("EMPTY", ""))
    assert [workers.devices(n) for n in (1, 2, 3)] == ["0", "1", "0"]

    def problem(**keys: object) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(write_config(tmp_path, {"workers": keys}))
        return str(info.value).split(": ", 1)[1]

    assert problem(python="bin/python") == "[workers] python: 'bin/python' is not an absolute path"
    assert problem(python="/nonexistent/python") == (
        "[workers] python: '/nonexistent/python' is not an executable file"
    )
    assert problem(environment="JUST_A_NAME") == "[workers] environment: 'JUST_A_NAME' is not NAME=value"
    assert problem(environment="DPATIA_SPS_CLIENT_SECRET=x") == (
        "[workers] environment: DPATIA_SPS_CLIENT_SECRET is set by the daemon"
    )
    assert problem(gpus="0", environment="CUDA_VISIBLE_DEVICES=1") == (
        "[workers] environment: CUDA_VISIBLE_DEVICES is set by [workers] gpus"
    )
    assert problem(gpus="0, 1, 2", count=2).startswith("[workers] gpus: 3 GPU groups but count is 2")
    assert problem(gpus="0;1").startswith("[workers] gpus: '0;1' is not a GPU index or UUID")
    with pytest.raises(BadValue, match="count is 1"):
        WorkersConfig(count=1, gpus=("0", "1"))


def test_the_start_check_passes_a_working_interpreter(tmp_path: Path) -> None:
    """The second interpreter runs the worker in --check mode and loads the plugin
    analysis (found by name on the PYTHONPATH [workers] environment gives it)."""
    site = install_plugin(
        tmp_path / "site", "mymodel", "vendor_model_w:analyse", module=("vendor_model_w.py", VENDOR_MODULE)
    )
    python, record = wrapper(tmp_path)
    config = load_config(
        write_config(
            tmp_path,
            {
                "app": {"analysis": "mymodel"},
                "workers": {"python": python, "environment": f"PYTHONPATH={site}"},
            },
        )
    )
    check_workers_python(config)
    assert "--check" in record.read_text()


@pytest.mark.parametrize(
    ("body", "analysis", "problem"),
    [
        (
            "echo \"ModuleNotFoundError: No module named 'dpatia_daemon'\" >&2; exit 1\n",
            "demo",
            "[workers] python: {python} cannot run the dpatia worker (ModuleNotFoundError: "
            "No module named 'dpatia_daemon'); install dpatia {version} there: {python} -m pip "
            "install 'dpatia=={version}'",
        ),
        (
            'echo \'{"version": "0.0.1", "error": ""}\'\n',
            "demo",
            "[workers] python: {python} has dpatia 0.0.1, the daemon runs {version} (their worker "
            "commands must match); install dpatia {version} there",
        ),
        (
            None,
            "notinstalled",
            "[app] analysis: unknown analysis 'notinstalled': use a built-in name",
        ),
    ],
    ids=["no-dpatia", "other-version", "unknown-analysis"],
)
def test_the_start_check_refuses_an_interpreter_that_cannot_run_the_analysis(
    tmp_path: Path, body: str | None, analysis: str, problem: str
) -> None:
    """One line naming the key and what to do: dpatia missing there, another version
    of it, or an analysis that interpreter does not know."""
    python, _ = wrapper(tmp_path, body)
    path = write_config(tmp_path, {"app": {"analysis": analysis}, "workers": {"python": python}})
    with pytest.raises(ConfigError) as info:
        check_workers_python(load_config(path))
    message = str(info.value)
    assert message.startswith(f"{path}: " + problem.format(python=python, version=__version__))
    assert "\n" not in message
    if analysis == "notinstalled":
        assert message.endswith(f"(in the workers' {python})")


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_a_plugin_runs_in_a_worker_under_another_interpreter(
    rig: Rig,  # noqa: F811 - the fixture
) -> None:
    """A real worker, through a wrapper interpreter that records it ran, loads the
    plugin by its name and completes a job, seeing [workers] environment and its GPU."""
    site = install_plugin(
        rig.tmp / "site", "mymodel", "vendor_model_r:analyse", module=("vendor_model_r.py", VENDOR_MODULE)
    )
    python, record = wrapper(rig.tmp)
    rig.start(
        analysis="mymodel",
        python=python,
        environment=(("PYTHONPATH", str(site)), ("VENDOR_MARKER", "from the config")),
        gpus=("7",),
    )
    job = await rig.add("slide-vendor")
    final = await rig.ended(job)
    assert final.state is JobState.DONE
    result = only_result(rig, "slide-vendor")
    assert result.displayResult == "vendor model answer"
    assert result.displayProperties == {
        "Executable": sys.executable,
        "CUDA_VISIBLE_DEVICES": "7",
        "Marker": "from the config",
        "Slot": "1",
    }
    assert "dpatia_daemon.workers.child --analysis mymodel" in record.read_text()
