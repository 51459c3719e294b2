"""The twistd adapter of the simulator: ``twistd -n dpatia-sps [options]``.

The same :class:`Options` parse ``python -m dpatia_daemon.simulator serve [options]``;
both end in :func:`make_service`.  Options are checked in ``postOptions`` and become a
frozen :class:`~.server.SimulatorConfig`.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService
from twisted.python import usage

from ..sps.info import parse_version
from .faults import DOWN_MODES
from .server import DEFAULT_DATA, DEFAULT_LISTEN, SimulatorConfig, SimulatorService


class Options(usage.Options):
    """Options of the simulator (``serve`` and ``twistd dpatia-sps``)."""

    optParameters = [
        ["listen", "l", DEFAULT_LISTEN, "Where to listen: a Twisted endpoint, e.g. tcp:8086."],
        ["data", "d", DEFAULT_DATA, "Directory of the generated slides (made on first start)."],
        ["scale", None, "1.0", "Scale of the generated slides (1.0: about 9000 px wide)."],
        ["public-url", None, None, "Base URL apps call back (default: from the listening port)."],
        ["app-url", None, None, "The app's registration URL; registers with it at start."],
        ["latency", None, "0", "Fault: seconds added to every callback request."],
        ["error-rate", None, "0", "Fault: fraction (0..1) of callback requests answered 5xx."],
        ["seed", None, "0", "Seed of the 5xx fraction's random numbers."],
        ["drop-download-after", None, None, "Fault: cut slide downloads after this many bytes."],
        ["drop-downloads", None, None, "Cut only this many downloads (default: all)."],
        ["token-lifetime", None, None, "Fault: callback tokens expire after these seconds."],
        ["down-after", None, "0", "Fault: seconds after start when the SPS goes down."],
        ["down-for", None, None, "Fault: how many seconds the SPS stays down."],
        ["down-mode", None, "503", "How it is down: 503 (with Retry-After) or refuse."],
        ["api-version", None, "1.10", "The SPS's IA-API version (QC from 1.10, cases 1.9)."],
    ]

    config: SimulatorConfig

    def postOptions(self) -> None:
        """Check every value and build ``config``."""

        def number(
            name: str, *, minimum: float = 0.0, maximum: float | None = None
        ) -> float | None:
            raw = self[name]
            if raw is None:
                return None
            try:
                value = float(raw)
            except ValueError:
                raise usage.UsageError(f"--{name}: {raw!r} is not a number") from None
            if value < minimum or (maximum is not None and value > maximum):
                bound = (
                    f"between {minimum:g} and {maximum:g}"
                    if maximum is not None
                    else f">= {minimum:g}"
                )
                raise usage.UsageError(f"--{name}: must be {bound}")
            return value

        def integer(name: str) -> int | None:
            value = number(name)
            if value is None:
                return None
            if value != int(value):
                raise usage.UsageError(f"--{name}: {self[name]!r} is not a whole number")
            return int(value)

        if self["down-mode"] not in DOWN_MODES:
            raise usage.UsageError(f"--down-mode: use one of {', '.join(DOWN_MODES)}")
        scale = number("scale", minimum=0.01, maximum=4.0)
        if parse_version(self["api-version"]) is None:
            raise usage.UsageError(f"--api-version: {self['api-version']!r} is not a version")
        self.config = SimulatorConfig(
            listen=self["listen"],
            data=self["data"],
            scale=scale if scale is not None else 1.0,
            public_url=self["public-url"],
            app_url=self["app-url"],
            latency=number("latency") or 0.0,
            error_rate=number("error-rate", maximum=1.0) or 0.0,
            seed=integer("seed") or 0,
            drop_after_bytes=integer("drop-download-after"),
            drop_count=integer("drop-downloads"),
            token_lifetime=number("token-lifetime"),
            down_after=number("down-after"),
            down_for=number("down-for"),
            down_mode=self["down-mode"],
            api_version=self["api-version"],
        )


def make_service(config: SimulatorConfig, reactor: Any) -> MultiService:
    """The simulator's service tree: one named ``sps`` service."""
    top = MultiService()
    SimulatorService(config=config, reactor=reactor).setServiceParent(top)
    return top


def makeService(options: Any) -> IService:
    """Build the service for twistd (the only place the reactor is imported)."""
    from twisted.internet import reactor

    return make_service(options.config, reactor)
