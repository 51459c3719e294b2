"""The SPS side of the conversation: drive an IA-API app the way a Sectra server does.

:class:`AppDriver` fetches the app's registration (``GET {url}``, the "Retrieve
registration info" button), then sends user invocations (``create`` of the whole slide
or, for a taggedPolygon / multiArea app, of a region; ``cancel`` of one of them) and
image notifications (``POST {url}/imagenotification`` with the slide's info as
``imageInfo``) to the URL the registration names, each with a fresh callback token
from the simulated SPS, and keeps a short log of what happened for the web page.

It talks HTTP through an injected treq ``HTTPClient``; every call has a deadline on
the injected clock.  :class:`ControlClient` is the command line's way to ask a running
simulator to do the same (the simulator owns the tokens, so the CLI cannot call the app
itself).
"""

from __future__ import annotations

import json
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from attrs import define, field, frozen
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .buttons import pressed
from .fake import PHI_FIELDS, FakeSPS, Watchers

log = Logger()

DEFAULT_APP_URL = "http://127.0.0.1:5006/dpatia"
DEFAULT_APPLICATION_ID = "dpatia"


class DriverError(Exception):
    """The app could not be reached, or answered something that is not JSON."""


@frozen
class Answer:
    """The app's answer: status and parsed JSON body (``None`` if empty)."""

    status: int
    body: Any

    @property
    def ok(self) -> bool:
        """A 2xx answer."""
        return 200 <= self.status < 300

    def to_json(self) -> dict[str, Any]:
        """For the control API."""
        return {"status": self.status, "body": self.body}


@frozen
class Event:
    """One thing the driver did, for the page's log."""

    time: float
    action: str
    slide_id: str | None
    status: int | None
    summary: str

    def to_json(self) -> dict[str, Any]:
        """For the page."""
        return {
            "time": self.time,
            "action": self.action,
            "slideId": self.slide_id,
            "status": self.status,
            "summary": self.summary,
        }


def _registration_problem(answer: Answer, url: str) -> str | None:
    """Why ``answer`` is not a registration (None if it is one)."""
    if not answer.ok or not isinstance(answer.body, dict):
        return f"registration at {url} answered {answer.status}: {answer.body!r}"
    for key in ("applicationId", "url"):
        if not isinstance(answer.body.get(key), str):
            return f"registration at {url} lacks {key!r}: {answer.body!r}"
    return None


def rectangle_input(
    kind: str, box: tuple[float, float, float, float], tags: Sequence[str] = ()
) -> dict[str, Any]:
    """The create ``input`` of a taggedPolygon or multiArea selection of the rectangle
    ``box`` (x0, y0, x1, y1, width-normalised), as the SPS sends it (IA-API.md §1.3)."""
    x0, y0, x1, y1 = box
    corners = ((x0, y0), (x1, y0), (x1, y1), (x0, y1))
    polygon = {"points": [{"x": x, "y": y} for x, y in corners]}
    if kind == "multiArea":
        return {"type": "multiArea", "content": {"polygons": [polygon]}}
    content: dict[str, Any] = {"polygon": polygon, "tags": list(tags)}
    if tags:
        content["tagIndex"] = 0  # [contrib] requires it whenever tags are sent
    return {"type": "taggedPolygon", "content": content}


@define
class AppDriver:
    """Sends what an SPS sends to one registered app.

    Collaborators: ``http`` (treq client), ``sps`` (the simulated SPS: slide info and
    tokens), ``clock``, and ``callback_url`` (the SPS base URL put in ``callbackInfo``;
    known once the simulator listens).  ``app_url`` is the URL to register; after
    :meth:`register`, invocations go to the URL the registration returns.
    """

    http: HTTPClient
    sps: FakeSPS
    clock: IReactorTime
    callback_url: str = ""
    app_url: str | None = None
    timeout: float = 30.0
    registration: dict[str, Any] | None = None
    last_error: str | None = None
    cancellation_tokens: dict[str, str] = field(factory=dict)
    #: The ``cancellationToken`` of the create each result id answered (region apps
    #: have several results per slide, each cancelled on its own).
    result_tokens: dict[int, str] = field(factory=dict)
    events: deque[Event] = field(factory=lambda: deque(maxlen=100))
    _logged: Watchers[Event] = field(factory=lambda: Watchers[Event](), init=False)

    # --- what the SPS would do ---

    async def register(self, app_url: str | None = None) -> dict[str, Any]:
        """``GET {url}``: fetch and keep the registration (raises :class:`DriverError`)."""
        url = app_url or self.app_url
        if not url:
            raise DriverError("no app URL to register (use --app-url)")
        self.app_url = url
        answer = await self._call("GET", url, None)
        problem = _registration_problem(answer, url)
        if problem is None:
            # Before the event: whoever waits for it sees the driver registered.
            self.registration = answer.body
            self.last_error = None
        self._log("register", None, answer, url)
        if problem is not None:
            raise DriverError(problem)
        log.info(
            "registered app {application_id} at {url}",
            application_id=answer.body["applicationId"],
            url=answer.body["url"],
        )
        return answer.body

    async def create(
        self,
        slide_id: str,
        input: dict[str, Any] | None = None,
        region: tuple[float, float, float, float] | None = None,
    ) -> Answer:
        """A user asks for an analysis: of ``input`` if given; else, for an app whose
        registration asks for a region (taggedPolygon, multiArea), of the rectangle
        ``region`` (x0, y0, x1, y1, width-normalised; default the slide's centre); else
        of the whole slide.  Each create has its own ``cancellationToken``."""
        token = secrets.token_hex(8)
        self.cancellation_tokens[slide_id] = token
        body = self._invocation("create", slide_id, token)
        if input is None:
            input = self._region_input(slide_id, region)
        body["input"] = input or {"type": "wholeSlide"}
        answer = await self._call("POST", self._target(), body)
        if answer.ok and isinstance(answer.body, dict) and isinstance(answer.body.get("id"), int):
            self.result_tokens[answer.body["id"]] = token
        self._log("create", slide_id, answer)
        return answer

    @property
    def input_type(self) -> str:
        """What the registered app asks the user to select (``wholeSlide`` by default)."""
        template = (self.registration or {}).get("inputTemplate")
        kind = template.get("type") if isinstance(template, dict) else None
        return kind if isinstance(kind, str) else "wholeSlide"

    def _region_input(
        self, slide_id: str, region: tuple[float, float, float, float] | None
    ) -> dict[str, Any] | None:
        """The create ``input`` a region app gets for the rectangle ``region``."""
        kind = self.input_type
        if kind not in ("taggedPolygon", "multiArea"):
            return None
        if region is None:
            size = self.sps.slides[slide_id].info.get("imageSize") or {}
            max_y = float(size.get("height") or 1) / float(size.get("width") or 1)
            region = (0.25, 0.25 * max_y, 0.75, 0.75 * max_y)
        template = (self.registration or {}).get("inputTemplate") or {}
        tags = list((template.get("content") or {}).get("tags") or [])
        return rectangle_input(kind, region, tags)

    async def cancel(self, slide_id: str, result_id: int | None = None) -> Answer:
        """A user cancels an analysis: the one that made result ``result_id`` if given,
        else the slide's last one (with that create's ``cancellationToken``; a result
        no create of this driver made gets a token that matches nothing)."""
        if result_id is not None:
            token = self.result_tokens.get(result_id) or secrets.token_hex(8)
        else:
            token = self.cancellation_tokens.get(slide_id) or secrets.token_hex(8)
        answer = await self._call(
            "POST", self._target(), self._invocation("cancel", slide_id, token)
        )
        self._log("cancel", slide_id, answer)
        return answer

    async def press(self, slide_id: str, result_id: int, action_id: str) -> Answer:
        """A user presses button ``action_id`` of the patchCollection ``result_id``: a
        ``modify`` whose input is the stored result with that action's state 1."""
        stored = self.sps.results.get(result_id)
        if stored is None or stored.slideId != slide_id:
            raise DriverError(f"no result {result_id} on slide {slide_id!r}")
        try:
            input = pressed(stored, action_id)
        except KeyError:
            raise DriverError(f"result {result_id} has no button {action_id!r}") from None
        body = self._invocation("modify", slide_id, secrets.token_hex(8))
        body["input"] = input
        answer = await self._call("POST", self._target(), body)
        self._log("press", slide_id, answer, action_id)
        return answer

    async def notify(self, slide_id: str) -> Answer:
        """The SPS imported ``slide_id``: ``newImageFiles`` with its (PHI-free) info."""
        token = secrets.token_hex(8)
        self.cancellation_tokens.setdefault(slide_id, token)
        body = self._invocation("newImageFiles", slide_id, token)
        body["input"] = {"type": "wholeSlide"}
        info = self.sps.slides[slide_id].info
        body["imageInfo"] = {k: v for k, v in info.items() if k not in PHI_FIELDS}
        answer = await self._call("POST", self._target() + "/imagenotification", body)
        self._log("notify", slide_id, answer)
        return answer

    def results(self, slide_id: str | None = None) -> list[dict[str, Any]]:
        """The stored results (of the registered app, if any), oldest first."""
        from ..models import unstructure

        app = self.application_id if self.registration else None
        slides = [slide_id] if slide_id else list(self.sps.slides)
        return [unstructure(r) for s in slides for r in self.sps.results_for(s, app)]

    # --- plumbing ---

    @property
    def application_id(self) -> str:
        """The registered application id (``dpatia`` before registration)."""
        if self.registration:
            return str(self.registration["applicationId"])
        return DEFAULT_APPLICATION_ID

    def _target(self) -> str:
        if self.registration:
            return str(self.registration["url"]).rstrip("/")
        if self.app_url:
            return self.app_url.rstrip("/")
        raise DriverError("no app registered (register first, or pass --app-url)")

    def _invocation(self, action: str, slide_id: str, cancellation_token: str) -> dict[str, Any]:
        if slide_id not in self.sps.slides:
            raise DriverError(f"unknown slide {slide_id!r}")
        context = (self.registration or {}).get("context")
        return {
            "action": action,
            "applicationId": self.application_id,
            "slideId": slide_id,
            "callbackInfo": {"url": self.callback_url, "token": self.sps.issue_token()},
            "context": context if isinstance(context, dict) else {},
            "cancellationToken": cancellation_token,
        }

    async def _call(self, method: str, url: str, body: Any) -> Answer:
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode()
            kwargs["headers"] = {"Content-Type": ["application/json"]}

        async def exchange() -> Answer:
            response = await self.http.request(method, url, **kwargs)
            raw = await response.content()
            try:
                parsed = json.loads(raw) if raw.strip() else None
            except ValueError:
                parsed = raw.decode("utf-8", "replace")[:500]
            return Answer(response.code, parsed)

        try:
            answer: Answer = await ensureDeferred(exchange()).addTimeout(self.timeout, self.clock)
        except Exception as e:
            self.last_error = f"{method} {url}: {e.__class__.__name__}: {e}"
            self._record(Event(self.clock.seconds(), method, None, None, self.last_error))
            raise DriverError(self.last_error) from e
        return answer

    def next_event(self, matching: Callable[[Event], bool] = lambda event: True) -> Deferred[Event]:
        """Fire with the next event logged that ``matching`` accepts (for harnesses that
        wait for the driver instead of sleeping); cancelling it stops the wait."""
        return self._logged.next(matching)

    def _record(self, event: Event) -> None:
        self.events.append(event)
        self._logged.fire(event)

    def _log(self, action: str, slide_id: str | None, answer: Answer, detail: str = "") -> None:
        body = answer.body
        if isinstance(body, dict) and "displayResult" in body:
            summary = str(body["displayResult"])
        elif isinstance(body, dict) and "error" in body:
            summary = f"error: {body['error']}"
        else:
            summary = detail or json.dumps(body)[:200]
        self._record(Event(self.clock.seconds(), action, slide_id, answer.status, summary))
        log.info(
            "{action} {slide}: app answered {status}",
            action=action,
            slide=slide_id or "",
            status=answer.status,
        )


@define
class ControlClient:
    """The command line's client of a running simulator's control API (``/ui/...``)."""

    http: HTTPClient
    clock: IReactorTime
    sps_url: str
    timeout: float = 60.0

    async def call(self, method: str, path: str, body: Any = None) -> Answer:
        """One request to the simulator; the JSON answer."""
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode()
            kwargs["headers"] = {"Content-Type": ["application/json"]}

        async def exchange() -> Answer:
            response = await self.http.request(method, self.sps_url.rstrip("/") + path, **kwargs)
            raw = await response.content()
            try:
                return Answer(response.code, json.loads(raw) if raw.strip() else None)
            except ValueError:
                return Answer(response.code, raw.decode("utf-8", "replace")[:500])

        try:
            result: Answer = await ensureDeferred(exchange()).addTimeout(self.timeout, self.clock)
        except Exception as e:
            raise DriverError(f"cannot reach the simulator at {self.sps_url}: {e}") from e
        return result

    async def fetch(self, path: str) -> bytes:
        """The raw body of ``GET path`` (e.g. an overlay PNG); raises on non-200."""

        async def exchange() -> bytes:
            response = await self.http.get(self.sps_url.rstrip("/") + path)
            data: bytes = await response.content()
            if response.code != 200:
                raise DriverError(f"GET {path} answered {response.code}: {data[:200]!r}")
            return data

        result: bytes = await ensureDeferred(exchange()).addTimeout(self.timeout, self.clock)
        return result


__all__ = [
    "DEFAULT_APP_URL",
    "Answer",
    "AppDriver",
    "ControlClient",
    "DriverError",
    "Event",
]
