"""What each SPS can do: its ``GET /info`` version, cached per callback base URL.

IA-API.md §1.5 dates the endpoints dpatia may use beyond the 1.5 baseline:

* ``PUT slides/{id}/qualityControl`` and ``qualityControl`` in slide info: **1.10**
  (DPAT 4.2), :data:`QUALITY_CONTROL`;
* the case-level image lists (``slides/{id}/request/images/info``): **1.9** (DPAT
  4.1), :data:`CASE_LISTS`;
* ``POST /token`` (client credentials): DPAT 4.1, so **1.9** [inferred],
  :data:`TOKEN`.

dpatia declares 1.5 (``[server] api_version``) and uses a newer endpoint only where
the SPS says it has it.  :class:`SPSVersions` asks ``GET /info`` once per callback
base URL and keeps the answer (``ttl``, an hour, as [pypi] does); concurrent askers
share one call.  It is never asked on the click path (the front door does not use
it): the workers' writes and the pipeline ask it, after the request was answered.
An SPS whose ``/info`` fails (older ones may lack it, a blip) is *unknown*, remembered
for ``retry_after`` only: callers then fall back on what the data itself says (a
``qualityControl`` object in the slide info is the 1.10 marker, §2.2).
"""

from __future__ import annotations

from typing import Any, Final, Protocol

from attrs import define, field
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..jobs import Callback
from ..models import VersionInfo
from .errors import SPSError

log = Logger()

#: The IA-API version that has ``PUT slides/{id}/qualityControl`` (IA-API.md §1.5).
QUALITY_CONTROL: Final = "1.10"
#: The IA-API version that has the case-level image lists (IA-API.md §1.5, §2.8).
CASE_LISTS: Final = "1.9"
#: The IA-API version of DPAT 4.1, the first with ``POST /token`` [inferred] (§2.9).
TOKEN: Final = "1.9"


def parse_version(text: str) -> tuple[int, ...] | None:
    """``"1.10"`` → ``(1, 10)``: numeric, so 1.10 sorts after 1.9; None if not a version."""
    parts = str(text).strip().split(".")
    try:
        numbers = tuple(int(p) for p in parts)
    except ValueError:
        return None
    return numbers if numbers and all(n >= 0 for n in numbers) else None


def at_least(version: str | None, minimum: str) -> bool | None:
    """Whether ``version`` is ``minimum`` or newer; None if ``version`` is unknown."""
    have = parse_version(version) if version is not None else None
    need = parse_version(minimum)
    if have is None or need is None:
        return None
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


class _Fetcher(Protocol):
    """What :class:`SPSVersions` needs of the SPS client (``SPSClient.get_info``)."""

    async def get_info(self, callback: Callback) -> VersionInfo:
        """``GET /info``."""
        ...


@define
class SPSVersions:
    """The ``GET /info`` answer of each SPS, keyed by callback base URL.

    Collaborators: ``sps`` (anything with ``async get_info(callback)``: the
    :class:`~.client.SPSClient`) and ``clock``.  ``ttl``: how long an answer is kept;
    ``retry_after``: how long a failure is (so a missing ``/info`` costs one call per
    ``retry_after``, not one per job).
    """

    sps: _Fetcher
    clock: IReactorTime
    ttl: float = 3600.0
    retry_after: float = 300.0
    _known: dict[str, tuple[float, VersionInfo | None]] = field(factory=dict, init=False)
    _asking: dict[str, Deferred[VersionInfo | None]] = field(factory=dict, init=False)

    @staticmethod
    def _base(callback: Callback) -> str:
        return callback.url.rstrip("/")

    def known(self, callback: Callback) -> VersionInfo | None:
        """The cached version of ``callback``'s SPS (no call), None if not known now."""
        entry = self._known.get(self._base(callback))
        if entry is None or entry[0] <= self.clock.seconds():
            return None
        return entry[1]

    async def version(self, callback: Callback) -> VersionInfo | None:
        """The SPS's version: cached, else one ``GET /info`` (None if it failed)."""
        base = self._base(callback)
        entry = self._known.get(base)
        if entry is not None and entry[0] > self.clock.seconds():
            return entry[1]
        asking = self._asking.get(base)
        if asking is None:
            asking = ensureDeferred(self._ask(base, callback))
            if not asking.called:  # an answer in the cache already needs no sharing
                self._asking[base] = asking

                def done(result: object) -> object:
                    self._asking.pop(base, None)
                    return result

                asking.addBoth(done)
        # Each waiter gets its own Deferred: one caller's cancel stops only its wait.
        mine: Deferred[VersionInfo | None] = Deferred()

        def hand_over(result: Any) -> Any:
            if not mine.called:
                mine.callback(result)
            return result

        asking.addBoth(hand_over)
        return await mine

    async def _ask(self, base: str, callback: Callback) -> VersionInfo | None:
        info: VersionInfo | None = None
        try:
            answer = await self.sps.get_info(callback)
        except SPSError as e:
            log.warn(
                "SPS GET info failed ({error}): its IA-API version is unknown for "
                "{seconds} s; newer endpoints are used only where the data shows them",
                error=str(e),
                seconds=self.retry_after,
            )
            lifetime = self.retry_after
        else:
            info, lifetime = answer, self.ttl
            log.info(
                "SPS IA-API version {api_version} (software {software_version})",
                api_version=answer.apiVersion,
                software_version=answer.softwareVersion,
            )
        self._known[base] = (self.clock.seconds() + lifetime, info)
        return info

    async def supports(self, callback: Callback, minimum: str) -> bool | None:
        """Whether ``callback``'s SPS has IA-API ``minimum``; None if its version is unknown."""
        info = await self.version(callback)
        return at_least(info.apiVersion if info is not None else None, minimum)


__all__ = [
    "CASE_LISTS",
    "QUALITY_CONTROL",
    "SPSVersions",
    "TOKEN",
    "at_least",
    "parse_version",
]
