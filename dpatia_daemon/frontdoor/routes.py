"""The IA-API front door: the Klein routes the SPS calls.

Routes (``{route}`` is ``[server] route``, default ``/dpatia``):

- ``GET /``                           service name, version, route (for admins)
- ``GET {route}``                     registration info
- ``GET {route}/info``                app version info
- ``POST {route}``                    user invocation: create, modify, delete, cancel
- ``POST {route}/imagenotification``  a new slide was imported

Order of work for a request, so that nothing accepted is lost and nothing rejected is
written: parse and validate everything (body size, content type, JSON, shape,
application id, callback URL allowlist) → ask the spool's :class:`~.capacity.AcceptGate`
(free space, queue length: 503 with Retry-After) → commit the job to the spool
(durable) → only then talk to the SPS or answer.  A body larger than
:data:`INLINE_PARSE_BYTES` (a modify or delete carrying a big stored result) is parsed
in a thread (``run_blocking``), so the other requests are answered meanwhile.  A
client disconnect cancels a Klein route, so nothing long hangs on the request:
notifications answer at once and store their in-progress frame in the background.

The HTTP around the routes (the request and site, JSON answers, the mapping of errors
to HTTP) is :mod:`dpatia_daemon.frontdoor.site`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import attrs
from attrs import Factory, define, field
from klein import Klein
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from .._version import __version__
from ..config import Config
from ..jobs import REGION_INPUT_TYPES, Callback, Job, JobKind, JobState
from ..models import (
    Action,
    AnalysisInput,
    ImageNotification,
    InputTemplate,
    InputType,
    InvalidInput,
    Invocation,
    Registration,
    Result,
    VersionInfo,
    parse,
    parse_invocation,
    unstructure,
)
from ..spool import ISpool, JobMoved
from ..sps.client import SPSClient, SPSConflict, SPSError
from ..sps.results import Status, image_size_of, result_key
from ..sps.tokens import TokenBook
from ..sps.writer import ReadAhead, ResultGone, ResultWriter
from ..workers.health import SPSHealth
from .background import BackgroundQueue, reporting
from .capacity import NO_ROOM, AcceptGate
from .notifications import NotificationCounts
from .offload import OFFLOAD_BYTES
from .site import (
    JSON_TYPE,
    BodyLimits,
    CallbackNotAllowed,
    handle_errors,
    json_answer,
    parse_json,
    read_body,
    too_large,
)

log = Logger()


#: Bodies up to this size are parsed at once; larger ones in ``run_blocking``'s thread.
INLINE_PARSE_BYTES = 64 * 1024


#: What a callback token may hold: it is sent as ``Authorization: Bearer <token>``.
_BEARER_TOKEN = re.compile(r"[\x21-\x7e]*")

#: The reason a running job of this daemon is stopped with (the same as the poll's).
CANCEL_REQUESTED = "cancellation requested"


def no_tally(*labels: str) -> None:
    """``IAAPI.tally`` when nothing counts (no admin listener)."""


class _NotQueued(Exception):
    """The job left the queue before its "queued" frame was written: skip the frame."""


@define
class IAAPI:
    """The Klein app answering the SPS.

    Collaborators: the frozen ``config``, the ``spool`` jobs are committed to, the
    ``sps`` client for in-progress frames, and the ``clock`` that stamps jobs.  Every
    accepted request's callback goes into ``tokens``: the newest token for its slide is
    what running jobs write with.  ``run_blocking(f, *args)`` runs the parse of a large
    body off the reactor thread (the reactor's thread pool in the daemon; at once by
    default), and ``gate`` refuses new jobs while the spool has no room.
    ``cancel_running(job_id, reason)``, where this daemon has workers, stops a running
    job of its own at once after its cancellation is durable (the spool's cancel marker
    still reaches jobs held by other processes, which poll for it).
    """

    config: Config
    spool: ISpool
    sps: SPSClient
    clock: IReactorTime
    writer: ResultWriter
    notification_counts: NotificationCounts = field(factory=NotificationCounts)
    _answering: int = field(default=0, init=False)
    #: The result notes (:meth:`_note_result`) written after the answer, in flight.
    _notes: set[Deferred[None]] = field(factory=set, init=False)
    #: The in-progress frames written after the answer; by default on ``clock``.
    background: BackgroundQueue = field(
        default=Factory(lambda self: BackgroundQueue(clock=self.clock), takes_self=True)
    )
    tokens: TokenBook = field(factory=TokenBook)
    run_blocking: Callable[..., Deferred[Any]] = maybeDeferred
    #: Runs ``parse(raw, limits)`` in a child process, for bodies of at least
    #: :data:`~dpatia_daemon.frontdoor.offload.OFFLOAD_BYTES` (None: in ``run_blocking``).
    parse_outside: Callable[..., Deferred[Any]] | None = None
    cancel_running: Callable[[str, str], object] | None = None
    #: The shared view of each SPS's health (the workers'): the queued frames feed it.
    health: SPSHealth | None = None
    #: Counts what the front door did: ``tally("accepted", kind)``, ``tally("filtered")``
    #: (a notification not taken), ``tally("cancelled")`` (a queued job); the metrics'.
    tally: Callable[..., None] = field(default=no_tally, repr=False)
    gate: AcceptGate = field(
        default=Factory(
            lambda self: AcceptGate(
                self.spool,
                self.clock,
                min_free_bytes=self.config.spool.min_free_bytes,
                max_queued=self.config.spool.max_queued,
            ),
            takes_self=True,
        )
    )
    app: Klein = field(init=False)

    def __attrs_post_init__(self) -> None:
        # Background SPS writes yield to requests being answered (see BackgroundQueue).
        self.background.busy = lambda: self._answering > 0
        # Routes depend on the configured route, so the app is built per instance.
        app = self.app = Klein()
        route = self.config.server.route
        app.route("/", methods=["GET"])(self.root)
        app.route(route, methods=["GET"])(self.registration)
        app.route(route + "/info", methods=["GET"])(self.info)
        app.route(route, methods=["POST"])(self.invoke)
        app.route(route + "/imagenotification", methods=["POST"])(self.image_notification)
        handle_errors(app)

    def resource(self) -> IResource:
        """The Klein resource to put in a site (:func:`~.site.make_site`)."""
        return self.app.resource()

    # --- routes ---

    async def root(self, request: IRequest) -> bytes:
        counts = await self.spool.counts()
        return json_answer(
            request,
            {
                "service": "dpatia",
                "version": __version__,
                "route": self.config.server.route,
                "applicationId": self.config.app.application_id,
                "jobs": {state.value: counts.get(state, 0) for state in JobState},
                "notifications": self.notification_counts.as_dict(),
            },
        )

    def registration(self, request: IRequest) -> bytes:
        app = self.config.app
        content = {"tags": list(app.tags)} if app.input_type is InputType.TAGGED_POLYGON else None
        body = unstructure(
            Registration(
                applicationId=app.application_id,
                displayName=app.display_name,
                manufacturer=app.manufacturer,
                url=self._registered_url(request),
                inputTemplate=InputTemplate(type=app.input_type, content=content),
                context={},
            )
        )
        if content is None:
            del body["inputTemplate"]["content"]  # wholeSlide has none (IA-API.md §1.1)
        return json_answer(request, body)

    def info(self, request: IRequest) -> bytes:
        return json_answer(
            request,
            unstructure(
                VersionInfo(apiVersion=self.config.server.api_version, softwareVersion=__version__)
            ),
        )

    async def invoke(self, request: IRequest) -> bytes:
        with self._answering_request():
            return await self._invoke(request)

    async def _invoke(self, request: IRequest) -> bytes:
        limits = BodyLimits.of(self.config)
        raw = read_body(
            request, limits.max_result_body_bytes, "modify and delete", "max_result_body_bytes"
        )
        stripped = False
        if self.parse_outside is not None and len(raw) >= OFFLOAD_BYTES:
            # The largest bodies in the child process; the stored result comes back
            # without its content (the route needs its id, the PUT its bytes).
            outcome = await self.parse_outside(_parse_light, raw, limits)
            invocation, parsed, put_body, stripped = outcome
        else:
            invocation, parsed, put_body = await self._parsed(raw, _parse_for_put, limits)
        self._check_invocation(invocation)
        if invocation.action is Action.CREATE:
            return await self._create(request, invocation, parsed)
        if invocation.action is Action.MODIFY:
            assert isinstance(parsed, Result)
            whole = (raw, limits) if stripped else None
            return await self._modify(request, invocation, parsed, put_body, whole)
        if invocation.action is Action.DELETE:
            return await self._delete(request, invocation, parsed)
        return await self._cancel(request, invocation)

    async def image_notification(self, request: IRequest) -> bytes:
        with self._answering_request():
            return await self._image_notification(request)

    async def _parsed(
        self, raw: bytes, parse: Callable[[bytes, BodyLimits], Any], limits: BodyLimits
    ) -> Any:
        """``parse(raw, limits)``: at once for a small body, in a thread for a large one."""
        if len(raw) <= INLINE_PARSE_BYTES:
            return parse(raw, limits)
        return await self.run_blocking(parse, raw, limits)

    @contextmanager
    def _answering_request(self) -> Iterator[None]:
        self._answering += 1
        try:
            yield
        finally:
            self._answering -= 1
            if not self._answering:
                self.background.wake()

    async def _image_notification(self, request: IRequest) -> bytes:
        limits = BodyLimits.of(self.config)
        body = read_body(request, limits.max_body_bytes, "image notifications", "max_body_bytes")
        data = await self._parsed(body, parse_json, limits)
        notification: ImageNotification = parse(ImageNotification, data)
        self._check_invocation(notification)
        if notification.input is not None:
            # Only whole-slide analyses make sense for a freshly imported slide.
            if (
                not isinstance(notification.input, dict)
                or notification.input.get("type", InputType.WHOLE_SLIDE.value)
                != InputType.WHOLE_SLIDE.value
            ):
                raise InvalidInput("image notifications support only wholeSlide input", "$.input")
        priority = 0
        if notification.imageInfo is not None:
            raw = notification.imageInfo.get("priority")
            if raw is not None:
                if isinstance(raw, bool) or not isinstance(raw, int):
                    raise InvalidInput("expected an integer", "$.imageInfo.priority")
                priority = raw
        refusal = self.config.notifications.refusal(notification.imageInfo)
        self.notification_counts.count(taken=refusal is None)
        if refusal is not None:
            self.tally("filtered")
            # Nothing stored, nothing fetched: the SPS sends one for every imported slide.
            log.debug(
                "image notification for slide {slide_id} not taken: {reason}",
                slide_id=notification.slideId,
                reason=refusal,
            )
            return json_answer(request, {})
        job = await self._accept(
            notification,
            JobKind.NOTIFICATION,
            "image notification",
            image_info=notification.imageInfo,
            priority=priority,
        )
        self.background.submit(
            f"queued frame of job {job.job_id}", lambda: self._frame_for_notification(job)
        )
        return json_answer(request, {})

    # --- actions ---

    async def _create(self, request: IRequest, invocation: Invocation, parsed: Any) -> bytes:
        declared = self.config.app.input_type.value
        # A region app takes either region type: the SPS admin may configure the app
        # as taggedPolygon or multiArea whatever the registration pre-filled, and the
        # Sectra example app supports both (IA-API.md §1.1).  Whole-slide stays exact.
        region_app = declared in REGION_INPUT_TYPES
        if parsed.type != declared and not (region_app and parsed.type in REGION_INPUT_TYPES):
            raise InvalidInput(
                f"this app is registered for {declared} input, not {parsed.type}",
                "$.input.type",
            )
        incoming = await self._admit(invocation, JobKind.CREATE, input=unstructure(parsed))
        # The slide's results (and size) are read while the job is committed: reads
        # only, so nothing is written at the SPS before the job is safe on disk.
        ahead = self.writer.read_ahead(incoming, self._size_reader(incoming))
        try:
            job = await self._commit(incoming, "analysis requested")
        except BaseException:
            if ahead is not None:
                ahead.discard()
            raise
        # The SPS wants the stored result (with id and versionId) as the answer.  The job
        # is already safe on disk: if the SPS cannot be reached, the analysis still runs
        # and writes its result later; the user sees this error now.
        stored = await self._store_frame(job, None, only_if_queued=False, ahead=ahead)
        return json_answer(request, unstructure(stored))

    async def _accept(
        self, call: Invocation | ImageNotification, kind: JobKind, what: str, **fields: Any
    ) -> Job:
        """Commit the job a validated request asks for to the spool (durably)."""
        return await self._commit(await self._admit(call, kind, **fields), what)

    async def _admit(
        self, call: Invocation | ImageNotification, kind: JobKind, **fields: Any
    ) -> Job:
        """The job a validated request asks for, once the spool may take it; its token
        is from now on the slide's newest."""
        incoming = Job(
            slide_id=call.slideId,
            application_id=call.applicationId,
            kind=kind,
            callback=Callback(call.callbackInfo.url, call.callbackInfo.token),
            created=self.clock.seconds(),
            context=call.context or {},
            cancellation_token=call.cancellationToken,
            **fields,
        )
        await self.gate.check()
        # Before the commit: a job of this slide may be running (then this request
        # queues behind it) and its writes should use the new token from now on.  A
        # failed commit does not make the token any less new.
        self.tokens.record(
            incoming.application_id, incoming.slide_id, incoming.callback, incoming.created
        )
        return incoming

    async def _commit(self, incoming: Job, what: str) -> Job:
        """Commit ``incoming`` (from :meth:`_admit`) to the spool, durably."""
        job = await self.gate.commit(self.spool.add(incoming))
        self.tally("accepted", incoming.kind.value)
        log.info(
            "job {job_id} accepted: {what} for slide {slide_id}",
            job_id=job.job_id,
            what=what,
            slide_id=job.slide_id,
        )
        return job

    async def _modify(
        self,
        request: IRequest,
        invocation: Invocation,
        result: Result,
        body: bytes | None,
        whole: tuple[bytes, BodyLimits] | None = None,
    ) -> bytes:
        """``whole``: the body and limits to parse ``result`` again from, when it came
        without its content (:func:`_parse_light`)."""
        if result.id is None:
            raise InvalidInput("a modified result must carry its id", "$.input.id")
        if _button_pressed(result):
            # A patchCollection button press: acknowledge it without storing anything,
            # as the Sectra example does; the state goes back to 0.  With [app]
            # on_action, the press also becomes a job (after the answer's commit).
            if self.config.app.on_action:
                await self._accept_action(invocation, result, unstructure(result))
            return json_answer(request, _reset_buttons(unstructure(result)))
        callback = self._remember_callback(invocation)
        if body is not None and result.id is not None:
            # A stored result of many MiB: serialised in the parse's thread, and the
            # SPS's answer handed back as it came: the reactor thread builds and parses
            # none of it.
            try:
                answer = await self.sps.update_result_body(
                    callback, invocation.applicationId, result.id, body
                )
            except SPSConflict:
                # The path below re-reads the result and tries once more, with the
                # whole result (parsed again if the child process stripped it).
                if whole is not None:
                    _, full, _ = await self._parsed(whole[0], _parse_for_put, whole[1])
                    assert isinstance(full, Result)
                    result = full
            else:
                log.info(
                    "result {result_id} of slide {slide_id} modified by a user",
                    result_id=result.id,
                    slide_id=invocation.slideId,
                )
                return _raw_json_answer(request, answer)
        stored = await self.sps.update_result(callback, invocation.applicationId, result)
        log.info(
            "result {result_id} of slide {slide_id} modified by a user",
            result_id=result.id,
            slide_id=invocation.slideId,
        )
        return json_answer(request, unstructure(stored))

    async def _accept_action(
        self, invocation: Invocation, result: Result, pressed: dict[str, Any]
    ) -> Job:
        """Spool the job that runs ``[app] on_action`` for a button press."""
        content = pressed["data"]["result"]["content"]
        action_id = next(
            (
                str(a.get("id", ""))
                for a in content.get("actions") or []
                if isinstance(a, dict) and a.get("state") == 1
            ),
            "",
        )
        return await self._accept(
            invocation,
            JobKind.ACTION,
            f"button {action_id!r} pressed on result {result.id}",
            input={
                "type": "action",
                "actionId": action_id,
                "result": pressed,
                "resultKey": result_key(result),
                "handler": self.config.app.on_action,
            },
            result_id=result.id,
        )

    async def _delete(self, request: IRequest, invocation: Invocation, result: Any) -> bytes:
        # The SPS deletes the result itself; the app stops any work that would write it.
        if not isinstance(result, Result) or result.id is None:
            return json_answer(request, {})
        await self.notes_written()  # a job's result id may be on its way to the spool
        jobs = await self.spool.find(slide_id=invocation.slideId, result_id=result.id)
        for job in jobs:
            await self._stop(job, "the result was deleted")
        return json_answer(request, {})

    async def _cancel(self, request: IRequest, invocation: Invocation) -> bytes:
        # Only the job the cancel was issued for: the one whose request (or a request
        # merged into it) carried this cancellationToken.  Never every job of the
        # slide: on a region app that would stop the other regions' analyses.
        jobs: list[Job] = []
        if invocation.cancellationToken:
            await self.notes_written()  # a result id on its way: the Cancelled frame's
            jobs = await self.spool.find(
                slide_id=invocation.slideId, cancellation_token=invocation.cancellationToken
            )
        callback = self._remember_callback(invocation)
        if not jobs:
            log.info(
                "cancel for slide {slide_id} matched no queued or running job{why}; "
                "nothing cancelled",
                slide_id=invocation.slideId,
                why="" if invocation.cancellationToken else " (it carried no cancellationToken)",
            )
        for job in jobs:
            cancelled = await self._stop(job, "cancelled by the user")
            if cancelled is not None and cancelled.result_id is not None:
                # The newest token is the one in this request.
                self.background.submit(
                    f"cancelled frame of job {cancelled.job_id}",
                    partial(
                        self._write_final_frame,
                        attrs.evolve(cancelled, callback=callback),
                        Status.CANCELLED,
                        "Cancelled",
                    ),
                )
        return json_answer(request, [])

    def _remember_callback(self, invocation: Invocation) -> Callback:
        """The request's callback, recorded as the newest for its slide."""
        callback = Callback(invocation.callbackInfo.url, invocation.callbackInfo.token)
        self.tokens.record(
            invocation.applicationId, invocation.slideId, callback, self.clock.seconds()
        )
        return callback

    async def _stop(self, job: Job, reason: str) -> Job | None:
        """Cancel a queued job now; ask the holder of a running job to stop it."""
        if job.state is JobState.QUEUED:
            cancelled = await self.spool.cancel(job.job_id, reason)
            if cancelled is not None:
                self.tally("cancelled")
                log.info("job {job_id} cancelled: {reason}", job_id=job.job_id, reason=reason)
                return cancelled
            job = await self.spool.get(job.job_id) or job
        if job.state is JobState.RUNNING:
            await self.spool.request_cancel(job.job_id)
            if self.cancel_running is not None:
                self.cancel_running(job.job_id, CANCEL_REQUESTED)
            log.info(
                "job {job_id} is running; cancellation requested: {reason}",
                job_id=job.job_id,
                reason=reason,
            )
        return None

    # --- in-progress frames ---

    async def _frame_for_notification(self, job: Job) -> None:
        if self.health is not None and self.health.down(job.callback.url):
            log.info(
                "job {job_id}: no queued frame, its SPS is failing (the worker writes one)",
                job_id=job.job_id,
            )
            return
        try:
            frame = self._store_frame(job, image_size_of(job.image_info), only_if_queued=True)
            await reporting(self.health, job.callback.url, frame)
        except _NotQueued:
            pass  # a worker has it already and shows its own progress
        except SPSError as e:
            _could_not(job, "store the queued frame at the SPS", e, "; the analysis will still run")

    async def _store_frame(
        self,
        job: Job,
        image_size: tuple[int, int] | None,
        *,
        only_if_queued: bool,
        ahead: ReadAhead | None = None,
    ) -> Result:
        """Create or update the job's result (the slide's latest for a whole-slide job,
        the region's own for a region job) to say "queued".

        Through the shared :class:`ResultWriter`, under the job key's lock, so a worker
        that already has the job never sees its progress or answer overwritten.
        Without ``image_size`` the slide's info is read for the full-slide frame.
        """
        if only_if_queued:
            current = await self.spool.get(job.job_id)
            if current is None or current.state is not JobState.QUEUED:
                raise _NotQueued()
        size = image_size if image_size is not None else self._size_reader(job)

        async def still_queued() -> bool:
            current = await self.spool.get(job.job_id)
            return current is not None and current.state is JobState.QUEUED

        stored = await self.writer.store_queued_frame(job, size, still_queued, ahead)
        if stored.id is not None and stored.id != job.result_id:
            # Not awaited: the answer need not wait for a second durable write.  A
            # delete waits for it (it finds jobs by result id), and so does a stop.
            note = Deferred.fromCoroutine(self._note_result(job, stored))
            self._notes.add(note)
            note.addErrback(self._note_failed, job, stored)
            note.addBoth(lambda _: self._notes.discard(note))
        return stored

    @staticmethod
    def _note_failed(failure: Failure, job: Job, stored: Result) -> None:
        log.failure(
            "job {job_id}: could not note result {result_id} in the spool (the worker "
            "finds the result itself)",
            failure,
            job_id=job.job_id,
            result_id=stored.id,
        )

    def _size_reader(
        self, job: Job
    ) -> tuple[int, int] | None | Callable[[], Deferred[tuple[int, int] | None]]:
        """What the frame needs to know of the slide's size: nothing for a region (its
        frame outlines the region), else a function reading the slide's info, which
        the writer calls while it reads the slide's results (two round trips one after
        another, not three), or not at all when it knows the size."""
        if job.is_region:
            return None
        return lambda: Deferred.fromCoroutine(self._image_size(job))

    def notes_written(self) -> Deferred[None]:
        """Fire once every result note in flight is written (or has failed)."""
        pending = list(self._notes)
        return DeferredList(pending, consumeErrors=True).addCallback(lambda _: None)

    async def _image_size(self, job: Job) -> tuple[int, int] | None:
        info = await self.sps.slide_info(job.callback, job.slide_id, extended=False)
        return image_size_of(info)

    async def _note_result(self, job: Job, stored: Result) -> None:
        """Note the job's result id in its spool record (a rewrite of the record)."""
        if stored.id is not None:
            try:
                await self.spool.update(attrs.evolve(job, result_id=stored.id))
            except JobMoved:
                # Claimed (or merged) meanwhile: the worker finds the result itself.
                pass
            except OSError as e:
                if e.errno not in NO_ROOM:
                    raise
                # The job is safe on disk; only its note of the result is not, and the
                # worker finds the result itself.  The answer need not fail for it.
                log.warn(
                    "job {job_id}: could not note result {result_id} in the spool ({error})",
                    job_id=job.job_id,
                    result_id=stored.id,
                    error=e.strerror or str(e),
                )

    async def _write_final_frame(self, job: Job, status: Status, text: str) -> None:
        assert job.result_id is not None
        try:
            await self.writer.update_current(
                job, job.result_id, self.writer.frame(job, status, text), keep=None
            )
        except (SPSError, ResultGone) as e:
            _could_not(job, f"mark its result {status.value.lower()}", e)

    # --- validation ---

    def _check_invocation(self, invocation: Invocation | ImageNotification) -> None:
        expected = self.config.app.application_id
        if invocation.applicationId != expected:
            raise InvalidInput(
                f"applicationId {invocation.applicationId!r} is not this app's ({expected!r}); "
                "check the registration at the SPS",
                "$.applicationId",
            )
        if not invocation.slideId:
            raise InvalidInput("slideId must not be empty", "$.slideId")
        if invocation.slideId in (".", ".."):
            # It becomes a path segment of every SPS call (slides/{id}/...), where a
            # dot segment would name another resource.
            raise InvalidInput("slideId must not be . or ..", "$.slideId")
        token = invocation.callbackInfo.token
        if not _BEARER_TOKEN.fullmatch(token):
            # It goes out in an Authorization header: no controls, no line breaks.
            raise InvalidInput(
                "callbackInfo.token must be printable ASCII without spaces (a Bearer token)",
                "$.callbackInfo.token",
            )
        url = invocation.callbackInfo.url
        if not self.config.sps.allows(url):
            log.warn(
                "refused a request whose callback URL is not allowed: {url}",
                url=url.split("?", 1)[0],
            )
            raise CallbackNotAllowed(
                "callbackInfo.url is not in [sps] allowed_callback_urls of this daemon",
                "$.callbackInfo.url",
            )

    def _registered_url(self, request: IRequest) -> str:
        route = self.config.server.route
        if self.config.server.public_url:
            return self.config.server.public_url + route
        host = (request.getHeader(b"host") or b"localhost").decode("latin-1")
        scheme = "https" if request.isSecure() else "http"
        return f"{scheme}://{host}{route}"


def _parse_invocation(
    raw: bytes, limits: BodyLimits
) -> tuple[Invocation, AnalysisInput | Result | None]:
    """``POST {route}``'s body parsed; only a modify or delete may be over
    ``max_body_bytes`` (up to ``max_result_body_bytes``)."""
    data = parse_json(raw, limits)
    if len(raw) > limits.max_body_bytes:
        action = data.get("action") if isinstance(data, dict) else None
        if action not in (Action.MODIFY.value, Action.DELETE.value):
            known = action in {a.value for a in Action}
            what = f"{action} requests" if known else "this request"
            raise too_large(what, len(raw), limits.max_body_bytes, "max_body_bytes")
    return parse_invocation(data)


def _could_not(job: Job, what: str, error: Exception, then: str = "") -> None:
    """Log that a best-effort SPS write of the front door failed (the job goes on)."""
    log.warn(
        "job {job_id}: could not {what} ({error}){then}",
        job_id=job.job_id,
        what=what,
        error=str(error),
        then=then,
    )


def _parse_for_put(
    raw: bytes, limits: BodyLimits
) -> tuple[Invocation, AnalysisInput | Result | None, bytes | None]:
    """:func:`_parse_invocation`, and for a large modify (not a button press) also the
    PUT body of its result, built here: in the parse's thread, off the reactor."""
    invocation, parsed = _parse_invocation(raw, limits)
    body = None
    if (
        len(raw) > INLINE_PARSE_BYTES
        and invocation.action is Action.MODIFY
        and isinstance(parsed, Result)
        and not _button_pressed(parsed)
    ):
        body = json.dumps(unstructure(parsed)).encode("utf-8")
    return invocation, parsed, body


def _parse_light(
    raw: bytes, limits: BodyLimits
) -> tuple[Invocation, AnalysisInput | Result | None, bytes | None, bool]:
    """:func:`_parse_for_put` in the child process: a modify or delete's result comes
    back without its content (and True), so that little crosses back; a button press
    keeps it (the route answers with it)."""
    invocation, parsed, body = _parse_for_put(raw, limits)
    if (
        isinstance(parsed, Result)
        and invocation.action in (Action.MODIFY, Action.DELETE)
        and parsed.data.result is not None
        and not _button_pressed(parsed)
    ):
        light = attrs.evolve(parsed, data=attrs.evolve(parsed.data, result=None))
        return invocation, light, body, True
    return invocation, parsed, body, False


def _raw_json_answer(request: IRequest, body: bytes) -> bytes:
    """``body`` (JSON already) as the 200 answer to ``request``."""
    request.setResponseCode(200)
    request.setHeader(b"Content-Type", JSON_TYPE)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


def _button_pressed(result: Result) -> bool:
    payload = result.data.result
    if (
        payload is None
        or payload.type != "patchCollection"
        or not isinstance(payload.content, dict)
    ):
        return False
    actions = payload.content.get("actions") or []
    return any(isinstance(a, dict) and a.get("state") == 1 for a in actions)


def _reset_buttons(body: dict[str, Any]) -> dict[str, Any]:
    for action in body["data"]["result"]["content"].get("actions") or []:
        if isinstance(action, dict) and action.get("state") == 1:
            action["state"] = 0
    return body
