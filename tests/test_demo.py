"""``make demo`` in its reduced form (``--quick``), as CI runs it: the real script in a
subprocess, with the in-process simulator and a real ``twistd dpatia`` child on
loopback, on the shipped config (``etc/dpatia.ini``, whatever analysis it names).

Each run is bounded twice: the demo's own ``--timeout`` and a hard kill of its whole
process group here.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import write_config
from PIL import Image, ImageColor

from dpatia_daemon.demo import SLIDES, ini_with

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "etc" / "dpatia.ini"
#: write_config's arguments for the shipped config with a few keys changed (the demo
#: puts the spool and work folders under its --out itself).
SHIPPED_BASE: dict[str, Any] = {"start": SHIPPED.read_text(), "base": False}


def run_demo(out: Path, *args: str, timeout: float = 30) -> tuple[int, str]:
    """``python -m dpatia_daemon.demo --quick --out OUT --sps-port 0 ARGS``: status, output."""
    command = [
        sys.executable,
        "-m",
        "dpatia_daemon.demo",
        "--quick",
        "--out",
        str(out),
        "--sps-port",
        "0",
        "--timeout",
        str(timeout),
        *args,
    ]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # one group: the daemon and its workers go with it
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        output, _ = proc.communicate(timeout=timeout + 20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail("the demo did not end:\n" + output.decode("utf-8", "replace"))
    return proc.returncode, output.decode("utf-8", "replace")


def progress_lines(output: str, slide_id: str) -> list[str]:
    """The step-4 lines of one slide: ``[ 1.2s] SLIDE  STATUS ...``."""
    return re.findall(rf"^\s+\[\s*[\d.]+s\] {re.escape(slide_id)} +(\S.*)$", output, re.M)


def result_colours(result: dict[str, Any]) -> set[tuple[int, int, int]]:
    """The stroke colours of the result's primitive items that draw something."""
    payload = result["data"]["result"]
    content = payload["content"]
    items = content if isinstance(content, list) else [content]
    return {
        ImageColor.getrgb(item["style"]["strokeStyle"])[:3]
        for item in items
        if item.get("style", {}).get("strokeStyle") and (item.get("polygons") or item.get("labels"))
    }


@pytest.mark.parametrize("analysis", [None, "demo"], ids=["shipped", "demo"])
def test_quick_demo_registers_analyses_three_slides_and_draws_their_results(
    tmp_path: Path, analysis: str | None
) -> None:
    """On the shipped config (tissue) and with the demo analysis: exit 0; every job printed progress and ended Done; results.json holds the
    final results; each slide's PNG is a valid image with its result's colour on it."""
    args: list[str] = []
    if analysis is not None:
        config = write_config(
            tmp_path, {"app": {"analysis": analysis}}, name=f"{analysis}.ini", **SHIPPED_BASE
        )
        args = ["--config", config]
    code, output = run_demo(tmp_path / "out", *args)
    assert code == 0, output
    for step in range(1, 8):
        assert re.search(rf"^{step}\. ", output, re.M), f"step {step} missing:\n{output}"
    assert '"applicationId": "dpatia"' in output or "applicationId: dpatia" in output
    assert "Demo finished in" in output, output
    assert "stopped: dpatia daemon (SIGTERM, stopped cleanly); SPS simulator" in output, output

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results) == list(SLIDES)
    for slide_id in SLIDES:
        lines = progress_lines(output, slide_id)
        assert len(lines) >= 2, f"{slide_id}: no progress before the end:\n{output}"
        assert not lines[0].startswith("Done") and lines[-1].startswith("Done"), lines
        result = results[slide_id]
        assert result["data"]["context"]["dpatia"]["status"] == "Done"
        assert f"{slide_id}  (result #{result['id']}): {result['displayResult']}" in output
        for key, value in (result.get("displayProperties") or {}).items():
            assert f"{key}: " in output and str(value)[:40] in output

        png = tmp_path / "out" / f"{slide_id}.png"
        with Image.open(png) as image:
            image.verify()  # a complete, valid PNG
        pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
        colours = result_colours(result)
        assert colours, f"{slide_id}: the result draws nothing: {result}"
        for colour in colours:
            near = np.abs(pixels - np.array(colour)).max(axis=2) <= 12
            assert near.sum() >= 20, f"{slide_id}: no {colour} in {png}"

    if analysis is None:
        same_as_stored_by_the_daemon(tmp_path, results)

    # The daemon's and the simulator's logs are kept for whoever looks next.
    assert b"dpatia ready" in (tmp_path / "out" / "run" / "dpatia.log").read_bytes()
    assert "dpatia-sps ready" in (tmp_path / "out" / "run" / "demo.log").read_text()


def same_as_stored_by_the_daemon(tmp_path: Path, results: dict[str, Any]) -> None:
    """``dpatia analyse`` on each slide file the simulator served, with the config the
    daemon ran: the result JSON is what the daemon stored at the SPS (but the ids the
    SPS gave it and the job id)."""
    from dpatia_daemon.cli import main

    run = tmp_path / "out" / "run"
    for slide_id in SLIDES:
        out = tmp_path / "cli"
        status = main(
            [
                "analyse",
                str(run / "sps-small" / slide_id / f"{slide_id}.tif"),
                "--config",
                str(run / "dpatia-quick.ini"),
                "--out",
                str(out),
            ],
            out=io.StringIO(),
        )
        assert status == 0
        local = json.loads((out / f"{slide_id}.result.json").read_text())
        stored = dict(results[slide_id])
        for the in (local, stored):
            for key in ("id", "versionId"):
                the.pop(key, None)
            the["data"]["context"]["dpatia"].pop("jobId")
        assert local == stored, slide_id
        assert (out / f"{slide_id}.overlay.png").exists()


def test_a_broken_analysis_fails_the_demo_at_the_analysis_step(tmp_path: Path) -> None:
    """A config whose analysis cannot be loaded: every job ends Failed, the demo exits
    1 naming step 4 and the reason, and still stops what it started."""
    config = write_config(
        tmp_path,
        {"app": {"analysis": "no.such:module"}, "workers": {"max_attempts": 1}},
        name="broken.ini",
        **SHIPPED_BASE,
    )
    code, output = run_demo(tmp_path / "out", "--config", config, timeout=25)
    assert code == 1, output
    assert "FAILED at step 4 (analyse): 3 of 3 analyses did not end Done" in output, output
    assert re.search(r"ended Failed: analysis 'no\.such:module': cannot import", output), output
    assert "stopped: dpatia daemon (SIGTERM, stopped cleanly); SPS simulator" in output, output
    assert "Demo failed after" in output, output


def test_a_daemon_that_cannot_start_fails_step_1_with_its_last_log_lines(
    tmp_path: Path,
) -> None:
    """The daemon exits at start (its spool path is a file): step 1 fails, the message
    says how it exited and shows its log, and the simulator is stopped."""
    run = tmp_path / "out" / "run"
    run.mkdir(parents=True)
    (run / "spool").write_text("not a directory")
    code, output = run_demo(tmp_path / "out", timeout=20)
    assert code == 1, output
    assert "FAILED at step 1 (start): the dpatia daemon did not start (it exited" in output, output
    assert "    | " in output and "spool directory" in output, output
    assert "stopped: SPS simulator" in output, output


def test_a_bad_config_fails_before_anything_starts(tmp_path: Path) -> None:
    """A config the daemon would refuse is reported as such, with its one-line error."""
    config = write_config(tmp_path, {"workers": {"count": "two"}}, name="bad.ini", **SHIPPED_BASE)
    code, output = run_demo(tmp_path / "out", "--config", config, timeout=10)
    assert code == 1, output
    assert "FAILED at step 0 (read the configuration)" in output, output
    assert "[workers] count: 'two' is not a number" in output, output


def test_ini_with_replaces_adds_and_keeps_comments() -> None:
    """Keys set in place, missing keys under their header, missing sections at the end;
    comments (and commented-out keys) untouched."""
    text = "# top\n[a]\n# x = 0\nx = 1\ny: 2\n  continued\n[b]\nz = 3\n"
    changed = ini_with(text, {("a", "x"): "9", ("b", "w"): "4", ("c", "v"): "5"})
    assert changed == (
        "# top\n[a]\n# x = 0\nx = 9\ny: 2\n  continued\n[b]\nw = 4\nz = 3\n\n[c]\nv = 5\n"
    )
