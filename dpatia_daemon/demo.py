"""``make demo``: the whole product in one command, against the bundled SPS simulator.

``python -m dpatia_daemon.demo [--config etc/dpatia.ini] [--out demo-out] [--quick]
[--keep-running] [--timeout S] [--sps-port N]``

1. starts the SPS simulator in this process (three synthetic slides, generated into
   ``OUT/run/sps`` on the first run) and the daemon as a real ``twistd dpatia`` child
   with the given config (the shipped one by default: its analysis, its workers), its
   working directory ``OUT/run`` and ``--spool OUT/run/spool``, on a free loopback port;
2. registers the app, as the SPS's "Retrieve registration info" button does;
3. sends one user request (``create`` on sim-colon-1) and two image notifications
   (sim-colon-2, sim-breast-1);
4. prints a line per job each time the result the pathologist sees changes: every
   result the simulator stores is recorded as it is stored (so no frame is missed) and
   shown at the next poll (every 0.3 s), stamped with the time it was stored;
5. prints each final result (``displayResult`` and ``displayProperties``) and writes
   them to ``OUT/results.json``;
6. writes each slide's thumbnail with its result drawn over it to ``OUT/<slide>.png``;
7. prints the URL of the simulator's live page and stops the daemon (SIGTERM, waited
   for) and the simulator -- or, with ``--keep-running``, leaves both running until
   Ctrl-C.

Exit status 0 when all three analyses are done; 1 when a step fails (the message names
the step; a daemon that died is shown with its last log lines); 2 on bad usage; 130 if
interrupted.  The daemon's log is kept in ``OUT/run/dpatia.log``, the simulator's in
``OUT/run/demo.log``.

``--quick`` is the reduced form CI runs (``tests/test_demo.py``): slides at a quarter
of their size (``OUT/run/sps-small``) and a copy of the config with ``[demo]
step_seconds`` shortened, so it takes seconds whatever ``[app] analysis`` names.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from attrs import define, field, frozen

from .models import Result, unstructure
from .sps.results import Status, frame_status

#: Who does what: one user request, two imports.
CREATED = ("sim-colon-1",)
NOTIFIED = ("sim-colon-2", "sim-breast-1")
SLIDES = (*CREATED, *NOTIFIED)

DEFAULT_CONFIG = "etc/dpatia.ini"
DEFAULT_OUT = "demo-out"
DEFAULT_TIMEOUT = 90.0
DEFAULT_SPS_PORT = 8086
POLL_SECONDS = 0.3
#: The reduced form: slides at this scale, and these config changes.
QUICK_SCALE = 0.25
QUICK_SETTINGS: Mapping[tuple[str, str], str] = {("demo", "step_seconds"): "0.5"}
#: Log lines of a failed daemon shown in the terminal.
TAIL_LINES = 25
FINAL = frozenset({Status.DONE, Status.FAILED, Status.CANCELLED})


class StepFailed(Exception):
    """A demo step failed: ``step`` is its number and short name, ``detail`` extra lines
    (a daemon's last log lines)."""

    def __init__(self, step: str, message: str, detail: str = "") -> None:
        super().__init__(f"at step {step}: {message}")
        self.step = step
        self.message = message
        self.detail = detail


# --- config copies --------------------------------------------------------------------

_SECTION = re.compile(r"^\[([^\]]+)\]\s*$")
_KEY = re.compile(r"^([^\s#;\[][^=:]*?)\s*[=:]")


def ini_with(text: str, changes: Mapping[tuple[str, str], str]) -> str:
    """``text`` (an INI file) with ``changes`` ``{(section, key): value}`` applied: a key
    the file sets is replaced in place, a missing one is added under its section's
    header, a missing section at the end.  Comments and everything else are kept."""
    pending = dict(changes)
    replaced: list[str] = []
    section: str | None = None
    for line in text.splitlines():
        header, key = _SECTION.match(line), _KEY.match(line)
        if header:
            section = header.group(1).strip()
        elif key and section is not None and (section, key.group(1)) in pending:
            line = f"{key.group(1)} = {pending.pop((section, key.group(1)))}"
        replaced.append(line)
    out: list[str] = []
    for line in replaced:
        out.append(line)
        header = _SECTION.match(line)
        if header:
            name = header.group(1).strip()
            out += [f"{k} = {pending.pop((s, k))}" for (s, k) in list(pending) if s == name]
    for name in dict.fromkeys(s for s, _ in pending):
        out += ["", f"[{name}]"]
        out += [f"{k} = {v}" for (s, k), v in pending.items() if s == name]
    return "\n".join(out) + "\n"


# --- options --------------------------------------------------------------------------


@frozen
class DemoOptions:
    """What a demo run is configured with (the command line builds it)."""

    config: str = DEFAULT_CONFIG
    out: str = DEFAULT_OUT
    timeout: float = DEFAULT_TIMEOUT
    keep_running: bool = False
    quick: bool = False
    sps_port: int = DEFAULT_SPS_PORT


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ended_how(daemon: Any) -> str:
    if daemon.exit_signal is not None:
        return f"was killed by signal {daemon.exit_signal}"
    return f"exited with status {daemon.exit_code}"


def _tail(output: bytes, lines: int = TAIL_LINES) -> str:
    text = output.decode("utf-8", "replace").rstrip("\n").splitlines()
    return "\n".join("    | " + line for line in text[-lines:])


def _short(value: Any, limit: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _WriteLog(dict[int, Result]):
    """The simulated SPS's result store (``FakeSPS.results``, which every create and
    update assigns to), recording each stored result with the time it was stored."""

    def __init__(self, store: Mapping[int, Result]) -> None:
        super().__init__(store)
        self.writes: list[tuple[float, Result]] = []

    def __setitem__(self, key: int, value: Result) -> None:
        super().__setitem__(key, value)
        self.writes.append((time.monotonic(), value))


# --- the demo ---------------------------------------------------------------------------


@define
class Demo:
    """One demo run on ``reactor``, printing through ``write``.

    ``run()`` performs the steps (raising :class:`StepFailed`); ``stop()`` stops what it
    started (idempotent; also run by the reactor's shutdown on Ctrl-C).
    """

    reactor: Any
    options: DemoOptions
    write: Callable[[str], None]
    started: float = field(factory=time.monotonic)
    daemon: Any = None
    sps: Any = None
    keeping: bool = False
    writes: _WriteLog = field(factory=lambda: _WriteLog({}))
    results: dict[str, Result] = field(factory=dict)
    _stopping: Any = None
    _display_name: str = ""

    # --- paths ---

    @property
    def out(self) -> Path:
        return Path(self.options.out).resolve()

    @property
    def run_dir(self) -> Path:
        return self.out / "run"

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def step(self, number: int, title: str, short: str) -> str:
        """Print the step's heading; return its name for error messages."""
        self.write(f"\n{number}. {title}")
        return f"{number} ({short})"

    # --- steps ---

    async def run(self) -> None:
        """All the steps; raises :class:`StepFailed` naming the first that failed."""
        from .config import ConfigError, load_config

        config_path = Path(self.options.config).resolve()
        try:
            config = load_config(str(config_path))
        except ConfigError as e:
            raise StepFailed("0 (read the configuration)", str(e)) from None
        self._display_name = config.app.display_name
        self.write(
            "dpatia demo: a simulated Sectra Pathology Server (SPS) asks dpatia to analyse "
            f"{len(SLIDES)} synthetic slides."
        )
        self.write(
            f"config {self.options.config} (analysis {config.app.analysis!r}, "
            f"{config.workers.count} workers){', quick form' if self.options.quick else ''}; "
            f"output in {self.options.out}/"
        )
        await self.start(config_path, config.server.route)
        registration = await self.register(config.server.route)
        await self.trigger()
        await self.watch()
        self.report()
        await self.overlays()
        await self.finish(registration)

    async def start(self, config_path: Path, route: str) -> None:
        from twisted.internet.defer import ensureDeferred

        from .simulator.daemon_process import DaemonExited, DaemonProcess
        from .simulator.server import SimulatorConfig, start_simulator

        step = self.step(1, "Start the SPS simulator and the dpatia daemon", "start")
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        # Jobs of an earlier (interrupted) run would call back a simulator that is gone.
        for stale in (run_dir / "spool", run_dir / "var" / "work"):
            shutil.rmtree(stale, ignore_errors=True)
        if self.options.quick:
            quick = run_dir / "dpatia-quick.ini"
            quick.write_text(ini_with(config_path.read_text(encoding="utf-8"), QUICK_SETTINGS))
            config_path = quick
            changed = ", ".join(f"[{s}] {k} = {v}" for (s, k), v in QUICK_SETTINGS.items())
            self.write(f"   quick form: {self._rel(config_path)} ({changed})")

        remaining = self.remaining()
        self.daemon = DaemonProcess(
            reactor=self.reactor,
            config=str(config_path),
            args=["--spool", str(run_dir / "spool")],
            cwd=str(run_dir),
        )
        daemon_ready = self.daemon.start(timeout=remaining)

        port = self.options.sps_port
        if port and not _port_free(port):
            self.write(f"   port {port} is in use: the simulator takes a free port instead")
            port = 0
        scale = QUICK_SCALE if self.options.quick else 1.0
        data = run_dir / ("sps-small" if self.options.quick else "sps")
        fresh = not (data / "manifest.json").exists()
        t0 = time.monotonic()
        try:
            self.sps = await ensureDeferred(
                start_simulator(
                    self.reactor,
                    SimulatorConfig(
                        listen=f"tcp:{port}:interface=127.0.0.1", data=str(data), scale=scale
                    ),
                )
            )
        except Exception as e:
            daemon_ready.addErrback(lambda _: None)  # not awaited any more
            raise StepFailed(step, f"the SPS simulator did not start: {e}") from None
        self.writes = _WriteLog(self.sim.sps.results)
        self.sim.sps.results = self.writes
        how = "generated" if fresh else "reused"
        self.write(
            f"   SPS simulator  {self.sps.url}  ({len(SLIDES)} slides {how} in "
            f"{self._rel(data)}, {time.monotonic() - t0:.1f} s)"
        )
        try:
            await daemon_ready
        except DaemonExited as e:
            raise StepFailed(
                step,
                "the dpatia daemon did not start ("
                + (
                    f"it {_ended_how(self.daemon)}"
                    if self.daemon_ended
                    else f"no 'dpatia ready' within {remaining:.0f} s"
                )
                + "); its last log lines:",
                _tail(e.output),
            ) from None
        self.write(
            f"   dpatia daemon  {self.daemon.url}{route}  (twistd dpatia, pid {self.daemon.pid}, "
            f"log {self._rel(run_dir / 'dpatia.log')})"
        )

    async def register(self, route: str) -> dict[str, Any]:
        from .simulator.driver import DriverError

        step = self.step(
            2, 'Register the app (the SPS\'s "Retrieve registration info" button)', "register"
        )
        url = self.daemon.url + route
        try:
            registration: dict[str, Any] = await self.sim.driver.register(url)
        except DriverError as e:
            raise StepFailed(step, str(e)) from None
        self.write(f"   GET {url} →")
        for key, value in registration.items():
            self.write(f"     {key}: {_short(value)}")
        self._display_name = str(registration.get("displayName") or self._display_name)
        return registration

    async def trigger(self) -> None:
        from .simulator.driver import DriverError

        step = self.step(
            3, "Ask for analyses: one by a pathologist, two by image import", "request"
        )
        driver = self.sim.driver
        for slide_id in SLIDES:
            action = "create" if slide_id in CREATED else "notify"
            try:
                answer = await (
                    driver.create(slide_id) if action == "create" else driver.notify(slide_id)
                )
            except DriverError as e:
                raise StepFailed(step, f"{action} {slide_id}: {e}") from None
            if not answer.ok:
                raise StepFailed(step, f"{action} {slide_id}: HTTP {answer.status} {answer.body!r}")
            if action == "create":
                body = answer.body if isinstance(answer.body, dict) else {}
                what = f'result #{body.get("id")} "{body.get("displayResult", "")}"'
                self.write(f"   create  {slide_id:<13} (user request)  → {answer.status} {what}")
            else:
                self.write(
                    f"   notify  {slide_id:<13} (new image)     → {answer.status} "
                    f"{json.dumps(answer.body)}"
                )

    async def watch(self) -> None:
        from twisted.internet.task import deferLater

        step = self.step(4, "Progress, as the pathologist sees it on each slide", "analyse")
        deadline = self.started + self.options.timeout
        shown: dict[str, str] = {}
        final: dict[str, Result] = {}
        latest_id: dict[str, int] = {}
        app = self.sim.driver.application_id
        seen = 0
        while len(final) < len(SLIDES):
            # Every result stored since the last poll, in order: a frame replaced
            # between two polls is shown too.
            writes = self.writes.writes[seen:]
            seen += len(writes)
            for at, result in writes:
                slide_id, result_id = result.slideId, result.id or 0
                if slide_id not in SLIDES or slide_id in final:
                    continue
                if self.sim.sps.result_apps.get(result_id) != app:
                    continue
                if result_id < latest_id.get(slide_id, 0):
                    continue  # not the slide's latest result: the viewer shows that one
                latest_id[slide_id] = result_id
                status, line = self.describe(result)
                if shown.get(slide_id) != line:
                    shown[slide_id] = line
                    self.write(f"   [{at - self.started:5.1f}s] {slide_id:<13} {line}")
                if status in FINAL:
                    final[slide_id] = result
            if len(final) == len(SLIDES):
                break
            if self.daemon_ended:
                raise StepFailed(
                    step,
                    f"the dpatia daemon {_ended_how(self.daemon)} while the analyses ran; "
                    "its last log lines:",
                    _tail(bytes(self.daemon.output)),
                )
            if time.monotonic() > deadline:
                waiting = ", ".join(
                    f"{s} ({shown.get(s, 'no result yet')})" for s in SLIDES if s not in final
                )
                raise StepFailed(
                    step, f"timed out after {self.options.timeout:g} s waiting for {waiting}"
                )
            await deferLater(self.reactor, POLL_SECONDS, lambda: None)
        self.results = {s: final[s] for s in SLIDES}
        bad = [(s, r) for s, r in self.results.items() if frame_status(r) is not Status.DONE]
        path = self.save_results()
        if bad:
            # One line per distinct reason (a broken analysis fails every job alike).
            reasons: dict[str, list[str]] = {}
            for slide_id, result in bad:
                why = (result.displayProperties or {}).get("Error") or result.displayResult
                reasons.setdefault(f"{frame_status(result)}: {why}", []).append(slide_id)
            raise StepFailed(
                step,
                f"{len(bad)} of {len(SLIDES)} analyses did not end Done",
                "\n".join(f"    {', '.join(s)} ended {why}" for why, s in reasons.items())
                + f"\n    (the results: {self._rel(path)}; the daemon's log: "
                f"{self._rel(self.run_dir / 'dpatia.log')})",
            )

    def describe(self, result: Result) -> tuple[Status | None, str]:
        """The job's status and its progress line: status, progress, the text shown."""
        properties = result.displayProperties or {}
        status = frame_status(result)
        shown = str(properties.get("Status") or (status.value if status else "?"))
        progress = str(properties.get("Progress") or "")
        text = result.displayResult or ""
        prefix = f"{self._display_name}: "
        if self._display_name and text.startswith(prefix):
            text = text[len(prefix) :]
        if progress and text.endswith(f" ({progress})"):
            text = text[: -len(progress) - 3]
        return (
            status,
            f"{shown:<9} {progress:>5}  {json.dumps(_short(text, 90), ensure_ascii=False)}",
        )

    def save_results(self) -> Path:
        """Write the final results, as stored at the SPS, to ``OUT/results.json``."""
        path = self.out / "results.json"
        path.write_text(
            json.dumps({s: unstructure(r) for s, r in self.results.items()}, indent=2) + "\n"
        )
        return path

    def report(self) -> None:
        self.step(5, "Final results (what the analysis reported)", "results")
        for slide_id, result in self.results.items():
            self.write(f"   {slide_id}  (result #{result.id}): {result.displayResult}")
            for key, value in (result.displayProperties or {}).items():
                self.write(f"       {key}: {_short(value)}")
        self.write(
            f"   (as stored at the SPS, polygons included: {self._rel(self.out / 'results.json')})"
        )

    async def overlays(self) -> None:
        step = self.step(6, "Each slide with its result drawn over it", "overlays")
        for slide_id in SLIDES:
            path = self.out / f"{slide_id}.png"
            try:
                await self.sim.overlay_png(slide_id, path)
            except Exception as e:
                raise StepFailed(step, f"cannot write {path}: {e}") from None
            self.write(f"   {self._rel(path)}")

    async def finish(self, registration: dict[str, Any]) -> None:
        from twisted.internet.defer import Deferred

        self.step(7, "The simulator's live page", "live page")
        self.write(f"   {self.sps.url}   (slides, results drawn live, buttons to try things)")
        if not self.options.keep_running:
            self.write("   stopping it now: run `make demo DEMO_ARGS=--keep-running` to explore it")
            return
        self.write(
            f"   both keep running (the app is registered at {registration.get('url')}); "
            "press Ctrl-C to stop them"
        )
        self.write(
            "   or drive it from another shell: .venv/bin/python -m dpatia_daemon.simulator "
            f"create sim-colon-1 --sps-url {self.sps.url.rstrip('/')}"
        )
        self.keeping = True  # from now on Ctrl-C is the normal end
        ended: Deferred[int | None] = self.daemon.ended()
        await ended
        self.keeping = False
        raise StepFailed(
            "7 (keep running)",
            f"the dpatia daemon {_ended_how(self.daemon)}; its last log lines:",
            _tail(self.daemon.output),
        )

    # --- stopping ---

    def remaining(self) -> float:
        return max(1.0, self.started + self.options.timeout - time.monotonic())

    @property
    def sim(self) -> Any:
        """The in-process :class:`~.simulator.server.Simulator`."""
        assert self.sps is not None and self.sps.simulator is not None
        return self.sps.simulator

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return str(path)

    @property
    def daemon_ended(self) -> bool:
        """Whether the daemon has exited (known before its ``ended()`` Deferreds fire)."""
        return self.daemon is not None and (
            self.daemon.exit_code is not None or self.daemon.exit_signal is not None
        )

    def stop(self) -> Any:
        """Stop the daemon (SIGTERM, waited for; SIGKILL after a bound) and the simulator."""
        from twisted.internet.defer import ensureDeferred

        if self._stopping is None:
            self._stopping = ensureDeferred(self._stop())
        return self._stopping

    async def _stop(self) -> None:
        from twisted.internet.defer import Deferred

        stopped = []
        if self.daemon is not None and self.daemon.pid is not None:
            if not self.daemon_ended:
                done = self.daemon.kill(signal.SIGTERM)
                timer = self.reactor.callLater(45, self.daemon.kill, signal.SIGKILL)
                await done
                if timer.active():
                    timer.cancel()
                clean = self.daemon.exit_code == 0 or self.daemon.exit_signal == signal.SIGTERM
                how = "stopped cleanly" if clean else _ended_how(self.daemon)
                stopped.append(f"dpatia daemon (SIGTERM, {how})")
            (self.run_dir / "dpatia.log").write_bytes(bytes(self.daemon.output))
        if self.sps is not None:
            d: Deferred[None] = self.sps.stopService()
            await d
            stopped.append("SPS simulator")
        if stopped:
            self.write("   stopped: " + "; ".join(stopped))


# --- the command line -----------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> DemoOptions:
    """The command line → :class:`DemoOptions` (exits 2 on bad usage)."""
    parser = argparse.ArgumentParser(
        prog="python -m dpatia_daemon.demo",
        description="Run dpatia against the bundled SPS simulator: register, analyse "
        "three slides, show progress and results, write overlay PNGs.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="daemon config (%(default)s)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (%(default)s)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds the whole run may take before it fails (%(default)s)",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the simulator and daemon running until Ctrl-C",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the reduced form CI runs: small slides, short [demo] steps",
    )
    parser.add_argument(
        "--sps-port",
        type=int,
        default=DEFAULT_SPS_PORT,
        help="the simulator's port on 127.0.0.1; 0 = any free one (%(default)s)",
    )
    args = parser.parse_args(list(argv))
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return DemoOptions(
        config=args.config,
        out=args.out,
        timeout=args.timeout,
        keep_running=args.keep_running,
        quick=args.quick,
        sps_port=args.sps_port,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the exit status."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.logger import globalLogBeginner, textFileLogObserver

    def write(line: str) -> None:
        print(line, flush=True)

    run_dir = Path(options.out).resolve() / "run"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(run_dir / "demo.log", "w", encoding="utf-8")  # noqa: SIM115
    except OSError as e:
        write(f"FAILED at step 0 (prepare the output folder): {e}")
        return 1
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)

    demo = Demo(reactor=reactor, options=options, write=write)
    #: The exit status, once known: set by the run's end, or by an interruption.
    status: dict[str, int] = {}

    def on_shutdown() -> Any:
        if "code" not in status:  # Ctrl-C (or SIGTERM) before the run ended by itself
            status["code"] = 0 if demo.keeping else 130
            write(
                "\nCtrl-C: stopping the daemon and the simulator"
                if demo.keeping
                else "\ninterrupted: stopping what the demo started"
            )
        return demo.stop()

    reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)  # type: ignore[attr-defined]

    async def go() -> None:
        failure: list[str] = []
        try:
            await demo.run()
        except StepFailed as e:
            failure += [f"\nFAILED {e}", *([e.detail] if e.detail else [])]
        except Exception as e:  # a bug here, not in the daemon: say so, with the type
            failure.append(f"\nFAILED: the demo script itself: {type(e).__name__}: {e}")
        if "code" in status:
            return  # interrupted: the shutdown trigger stops everything
        status["code"] = 1 if failure else 0
        for line in failure:
            write(line)
        await demo.stop()
        if failure:
            write(f"\nDemo failed after {demo.elapsed():.1f} s (logs in {demo._rel(run_dir)}/).")
        else:
            write(f"\nDemo finished in {demo.elapsed():.1f} s: all {len(SLIDES)} analyses done.")
        reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(lambda: ensureDeferred(go()))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    log_file.close()
    return status.get("code", 1)


if __name__ == "__main__":
    sys.exit(main())
