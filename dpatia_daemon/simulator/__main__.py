"""``python -m dpatia_daemon.simulator COMMAND``: run the SPS simulator or drive it.

Commands::

    serve [options]                  run the simulator (same options as twistd dpatia-sps)
    generate [--data D] [--scale S|full]  generate the slides only (full: real size, cached)
    register [--app-url URL]         fetch the app's registration (the SPS config button)
    create SLIDE [--region X0 Y0 X1 Y1]   a user asks for an analysis of SLIDE (a region app:
                                     of that rectangle, width-normalised)
    notify SLIDE                     SLIDE was imported: an image notification
    cancel SLIDE [--result ID]       the user cancels SLIDE's (last, or result ID's) analysis
    results [SLIDE] [--json]         the stored results
    overlay SLIDE --out FILE.png     the slide's thumbnail with its latest result
    faults [--latency S ...]         show or change the fault knobs of a running simulator

Every command but ``serve`` and ``generate`` talks to a running simulator at
``--sps-url`` (default http://127.0.0.1:8086), which owns the slides and tokens and calls
the app; ``--app-url`` changes which app it calls.  Exit status 0 on success, 1 when the
app or simulator refused or could not be reached, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .server import DEFAULT_DATA

DEFAULT_SPS_URL = "http://127.0.0.1:8086"


def _serve(argv: Sequence[str]) -> int:
    """Run the simulator in the foreground until interrupted."""
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.python import usage

    from .tap import Options, make_service

    options = Options()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        print(f"{options}\nerror: {e}", file=sys.stderr)
        return 2
    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    service = make_service(options.config, reactor)
    status = {"code": 0}

    def start() -> None:
        service.startService()
        sps: Any = service.getServiceNamed("sps")

        def failed(failure: Any) -> None:
            status["code"] = 1
            reactor.stop()  # type: ignore[attr-defined]

        sps.ready.addErrback(failed)

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return status["code"]


def _generate(args: argparse.Namespace) -> int:
    from .large import default_cache, full_specs
    from .slides import default_specs, load_or_generate

    if args.scale == "full":
        # Minutes the first time: cached (by default in ~/.cache/dpatia) and reused.
        slide_set = load_or_generate(args.data or default_cache(), full_specs(default_specs()))
    else:
        slide_set = load_or_generate(args.data or DEFAULT_DATA, default_specs(float(args.scale)))
    print(
        ("generated" if slide_set.generated else "reused")
        + f" {len(slide_set.slides)} slides in {slide_set.directory}"
    )
    for slide in slide_set.slides:
        size = slide.info["imageSize"]
        print(
            f"  {slide.slide_id}: {size['width']}x{size['height']} px, "
            f"tissue {slide.truth['tissueAreaMm2']:.3f} mm², {slide.layout}"
        )
    return 0


def _scale(text: str) -> str:
    """``full`` or a positive number, for ``generate --scale``."""
    if text == "full":
        return text
    try:
        if float(text) > 0:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is neither 'full' nor a positive number")


def _print_result(result: dict[str, Any]) -> None:
    print(f"#{result.get('id')} {result.get('slideId')}: {result.get('displayResult', '')}")
    for key, value in (result.get("displayProperties") or {}).items():
        print(f"    {key}: {value}")


async def _client(reactor: Any, args: argparse.Namespace) -> int:
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    from .driver import ControlClient, DriverError

    pool = HTTPConnectionPool(reactor, persistent=False)
    control = ControlClient(HTTPClient(Agent(reactor, pool=pool)), reactor, args.sps_url)
    try:
        if args.command == "register":
            answer = await control.call("POST", "/ui/register", {"url": args.app_url})
        elif args.command in ("create", "notify", "cancel"):
            body: dict[str, Any] = {"appUrl": args.app_url} if args.app_url else {}
            if getattr(args, "region", None) is not None:
                body["region"] = args.region
            if getattr(args, "result", None) is not None:
                body["resultId"] = args.result
            answer = await control.call("POST", f"/ui/slides/{args.slide}/{args.command}", body)
        elif args.command == "results":
            path = "/ui/results" + (f"?slide={args.slide}" if args.slide else "")
            answer = await control.call("GET", path)
            if answer.ok and not args.json:
                for result in answer.body:
                    _print_result(result)
                return 0
        elif args.command == "faults":
            changes = {
                key: value
                for key, value in (
                    ("latency", args.latency),
                    ("errorRate", args.error_rate),
                    ("seed", args.seed),
                    ("dropAfterBytes", args.drop_download_after),
                    ("dropCount", args.drop_downloads),
                    ("tokenLifetime", args.token_lifetime),
                    ("downFor", args.down_for),
                )
                if value is not None
            }
            if args.down_for is not None:
                changes["downMode"] = args.down_mode
            answer = await control.call("POST" if changes else "GET", "/ui/faults", changes or None)
        elif args.command == "overlay":
            data = await control.fetch(f"/ui/slides/{args.slide}/overlay.png")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_bytes(data)
            print(f"wrote {args.out}")
            return 0
        else:  # pragma: no cover - argparse only allows the commands above
            raise AssertionError(args.command)
    except DriverError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        await pool.closeCachedConnections()
    print(json.dumps(answer.body, indent=2))
    if not answer.ok:
        print(f"error: HTTP {answer.status}", file=sys.stderr)
        return 1
    inner = answer.body.get("status") if isinstance(answer.body, dict) else None
    if isinstance(inner, int) and not 200 <= inner < 300:
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dpatia_daemon.simulator", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the simulator (see: serve --help)", add_help=False)
    gen = sub.add_parser("generate", help="generate the slides only")
    gen.add_argument(
        "--data", default=None, help=f"where (default {DEFAULT_DATA}; for --scale full, "
        "$DPATIA_SLIDE_CACHE or ~/.cache/dpatia/full-slides)"
    )
    gen.add_argument(
        "--scale", type=_scale, default="1.0", help="a factor of the stock sizes, or "
        "'full': 100 000 x 80 000 px at 0.25 um/px, one slide per format (cached)"
    )

    def client(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--sps-url", default=DEFAULT_SPS_URL, help="the running simulator")
        p.add_argument("--app-url", default=None, help="the app's registration URL")
        return p

    client("register", "fetch the app's registration")
    commands: dict[str, argparse.ArgumentParser] = {}
    for name, text in (
        ("create", "ask the app to analyse a slide"),
        ("notify", "tell the app a slide was imported"),
        ("cancel", "cancel a slide's analysis"),
    ):
        commands[name] = client(name, text)
        commands[name].add_argument("slide")
    commands["create"].add_argument(
        "--region",
        type=float,
        nargs=4,
        metavar=("X0", "Y0", "X1", "Y1"),
        help="for a region app: the rectangle to analyse (width-normalised)",
    )
    commands["cancel"].add_argument(
        "--result", type=int, help="cancel the analysis of this result (a region's)"
    )
    results = client("results", "list stored results")
    results.add_argument("slide", nargs="?")
    results.add_argument("--json", action="store_true")
    overlay = client("overlay", "write a slide's thumbnail with its latest result as PNG")
    overlay.add_argument("slide")
    overlay.add_argument("--out", required=True)
    faults = client("faults", "show or change the fault knobs")
    faults.add_argument("--latency", type=float)
    faults.add_argument("--error-rate", type=float)
    faults.add_argument("--seed", type=int)
    faults.add_argument("--drop-download-after", type=int)
    faults.add_argument("--drop-downloads", type=int)
    faults.add_argument("--token-lifetime", type=float)
    faults.add_argument("--down-for", type=float)
    faults.add_argument("--down-mode", choices=("503", "refuse"), default="503")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    codes: list[int] = []

    async def run(reactor: Any) -> None:
        codes.append(await _client(reactor, args))

    try:
        react(lambda reactor: ensureDeferred(run(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    return codes[0] if codes else 1


if __name__ == "__main__":
    sys.exit(main())
