"""Which token an SPS call carries: the newest callback token, or one dpatia obtained.

A job that waited long may hold an expired callback token (IA-API.md §3.6).  Three
collaborators, one per question:

* :class:`TokenBook` (daemon) — the newest callback (URL and token, as one pair) received
  for each slide from any accepted request.  The front door records every request's
  callback; the :class:`~dpatia_daemon.sps.writer.ResultWriter` asks it for the
  callback of every write (so a running job writes with a token that arrived after it
  started); the dispatcher listens to it and sends the new callback to the worker of a
  running job (``NewCallback``), so that its worker's calls use it too.  In memory and
  bounded: after a restart the spool's records (whose merge already keeps the newest
  token) are the source.
* :class:`JobCallback` (worker) — the running job's newest callback: the one in its
  ``job.json`` at start, then each newer one the daemon sends (the ``NewCallback`` AMP
  command).
* :class:`CredentialTokens` — with ``[sps] client_id``/``client_secret``, access tokens
  from ``POST {callback}/token?applicationId=`` (client credentials, HTTP Basic,
  IA-API.md §2.9), one per SPS base URL, refreshed before they expire (when
  ``now > fetched + expires_in − min(60, expires_in / 2)``, reactor time) and at once
  after the SPS rejects one; concurrent callers share one request.

:class:`CallbackAuth` is the :class:`~dpatia_daemon.sps.client.Authorizer` of an
:class:`~dpatia_daemon.sps.client.SPSClient`, consulted by its ``_call`` for every callback
call.  Which token wins (IA-API.md §6): the newest callback token first — it is the
token the SPS handed out for this very slide, and the permissions of a ``/token`` token
are undocumented (IA-API.md §5.13).  After a 401/403 on a callback token the call is
sent once more with a newer callback token if one arrived, else with a client-credentials
token; a callback token the SPS rejected once is not sent again (its calls go straight
to the credentials token).  A rejected credentials token is refreshed once and the call
retried once.  Without credentials the 401/403 fails the call with a message that says
what to do about it (:data:`NO_CREDENTIALS`).

Secrets: the client secret lives in the daemon's config file (which must be 0600; see
:mod:`dpatia_daemon.config`) and in memory; workers get it through their environment
(:data:`CLIENT_ID_ENV`, :data:`CLIENT_SECRET_ENV`), never on a command line, and take
it out of their environment at start.  No repr shows a token or the secret, and no log
line names one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Protocol
from urllib.parse import urlsplit

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..jobs import Callback, Job
from .client import AccessToken, SPSError, SPSUnauthorized

log = Logger()

#: The worker's environment variables holding the client credentials.  The environment
#: of a process is readable only by its owner (``/proc/PID/environ`` is 0400), unlike
#: its command line, which every local user sees in ``ps``.
CLIENT_ID_ENV = "DPATIA_SPS_CLIENT_ID"
CLIENT_SECRET_ENV = "DPATIA_SPS_CLIENT_SECRET"

#: What a 401/403 on a callback token means when dpatia cannot obtain its own tokens.
NO_CREDENTIALS = (
    "the SPS rejected the callback token (expired?); configure [sps] client_id/"
    "client_secret to let dpatia obtain its own tokens"
)

#: What a 401/403 on ``POST /token`` means.
BAD_CREDENTIALS = (
    "the SPS refused the client credentials of [sps] client_id/client_secret (a wrong "
    'secret, or a user without the permission "Request Image Analysis Api Authentication '
    'Token")'
)


def _base(url: str) -> str:
    """The SPS base URL a token belongs to (trailing slashes do not matter)."""
    return url.rstrip("/")


def _host(url: str) -> str:
    """Scheme and host of ``url``, for log lines (no path, no query)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _remember(seen: OrderedDict[str, None], key: str, limit: int) -> None:
    """Add ``key`` to a bounded insertion-ordered set (the oldest entries go first)."""
    seen[key] = None
    seen.move_to_end(key)
    while len(seen) > limit:
        seen.popitem(last=False)


# --- credentials ----------------------------------------------------------------------


@frozen
class Credentials:
    """``[sps] client_id`` and ``client_secret``; the secret never shows in a repr."""

    client_id: str
    client_secret: str = field(repr=False)

    def to_environ(self) -> dict[str, str]:
        """The environment variables that hand these to a worker."""
        return {CLIENT_ID_ENV: self.client_id, CLIENT_SECRET_ENV: self.client_secret}

    @classmethod
    def take_from_environ(cls, environ: MutableMapping[str, str]) -> Credentials | None:
        """Read the credentials a worker was given and remove them from ``environ``,
        so that processes the analysis may start do not inherit them."""
        client_id = environ.pop(CLIENT_ID_ENV, "")
        client_secret = environ.pop(CLIENT_SECRET_ENV, "")
        if not client_id or not client_secret:
            return None
        return cls(client_id, client_secret)


def without_credentials(environ: MutableMapping[str, str]) -> None:
    """Drop credential variables a parent environment may carry (only we set them)."""
    environ.pop(CLIENT_ID_ENV, None)
    environ.pop(CLIENT_SECRET_ENV, None)


Fetch = Callable[[str, str, str, str], Awaitable[AccessToken]]


@frozen
class _Held:
    """An access token and the reactor time its request was sent."""

    token: AccessToken
    fetched: float

    def fresh(self, now: float) -> bool:
        """Usable without a refresh (IA-API.md §2.9's margin).  Without an
        ``expires_in`` the lifetime is unknown: used until the SPS rejects it."""
        life = self.token.expires_in
        if life <= 0:
            return True
        return now <= self.fetched + life - min(60.0, life / 2)


@define
class CredentialTokens:
    """Access tokens obtained with client credentials, one per SPS base URL.

    Collaborators: ``fetch`` (:meth:`SPSClient.fetch_token
    <dpatia_daemon.sps.client.SPSClient.fetch_token>`), the ``clock`` (expiry), and the
    ``application_id`` and ``credentials`` sent.  Concurrent callers needing a new
    token share one request; a caller giving up (cancelled) does not cancel it.
    """

    fetch: Fetch
    clock: IReactorTime
    application_id: str
    credentials: Credentials
    remember: int = 256
    _held: dict[str, _Held] = field(factory=dict, init=False, repr=False)
    _flights: dict[str, list[Deferred[str]]] = field(factory=dict, init=False, repr=False)
    _issued: OrderedDict[str, None] = field(factory=OrderedDict, init=False, repr=False)

    async def token(self, base_url: str) -> str:
        """A usable access token for the SPS at ``base_url`` (fetched if needed)."""
        key = _base(base_url)
        held = self._held.get(key)
        if held is not None and held.fresh(self.clock.seconds()):
            return held.token.access_token
        return await self._refresh(key)

    async def refresh(self, base_url: str, rejected: str) -> str:
        """A new token after the SPS refused ``rejected`` (one of ours).

        If another caller replaced it meanwhile, that replacement is used: one
        rejection costs one request, however many calls saw it.
        """
        key = _base(base_url)
        held = self._held.get(key)
        if held is not None and held.token.access_token != rejected:
            return await self.token(key)
        self._held.pop(key, None)
        return await self._refresh(key)

    def issued(self, token: str) -> bool:
        """Whether ``token`` is one this provider obtained (recently)."""
        return token in self._issued

    def _refresh(self, key: str) -> Deferred[str]:
        waiter: Deferred[str] = Deferred()
        flight = self._flights.get(key)
        if flight is not None:
            flight.append(waiter)
        else:
            # Register before starting: the request may complete synchronously.
            self._flights[key] = [waiter]
            ensureDeferred(self._fetch(key)).addBoth(self._landed, key)
        return waiter

    def _landed(self, outcome: str | Failure, key: str) -> None:
        for waiter in self._flights.pop(key, []):
            if waiter.called:
                continue  # its caller gave up
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    async def _fetch(self, key: str) -> str:
        started = self.clock.seconds()
        try:
            got = await self.fetch(
                key,
                self.application_id,
                self.credentials.client_id,
                self.credentials.client_secret,
            )
        except SPSUnauthorized as e:
            log.error(
                "could not obtain an access token from {sps}: {error}",
                sps=_host(key),
                error=BAD_CREDENTIALS,
                status=e.status,
            )
            raise SPSUnauthorized(
                BAD_CREDENTIALS, endpoint=e.endpoint, status=e.status, body_excerpt=e.body_excerpt
            ) from None
        except SPSError as e:
            log.warn(
                "could not obtain an access token from {sps}: {error}",
                sps=_host(key),
                error=str(e),
            )
            raise
        self._held[key] = _Held(got, started)
        _remember(self._issued, got.access_token, self.remember)
        log.info(
            "obtained an access token from {sps} with client credentials "
            "(valid for {expires_in:g} s)",
            sps=_host(key),
            expires_in=got.expires_in,
        )
        return got.access_token


# --- the newest callback --------------------------------------------------------------


class CallbackSource(Protocol):
    """Where the newest callback for a call's callback comes from."""

    def newest(self, callback: Callback, *, recheck: bool = False) -> Callback:
        """The callback to use in place of ``callback`` (itself if none is newer);
        ``recheck``: look again now (the SPS just rejected a token)."""
        ...


class SameCallback:
    """No newer callbacks: every call uses the one it was made with."""

    def newest(self, callback: Callback, *, recheck: bool = False) -> Callback:
        """``callback`` itself."""
        return callback


@frozen
class _Entry:
    callback: Callback
    stamp: float


Listener = Callable[[str, str, Callback], None]


@define
class TokenBook:
    """The newest callback received for each (application, slide), in this daemon.

    ``record`` is called by the front door for every accepted request, with the time it
    was accepted (the job's ``created``/``updated`` stamp).  At most ``limit`` slides
    are remembered (least recently recorded go first).  Listeners hear of every new
    callback for a slide.
    """

    limit: int = 10000
    _entries: OrderedDict[tuple[str, str], _Entry] = field(
        factory=OrderedDict, init=False, repr=False
    )
    _listeners: list[Listener] = field(factory=list, init=False, repr=False)

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, application_id: str, slide_id: str, callback: Callback, stamp: float) -> None:
        """A request for the slide brought ``callback`` at ``stamp``."""
        key = (application_id, slide_id)
        known = self._entries.get(key)
        if known is not None and known.stamp > stamp:
            return  # an older request that finished late
        self._entries[key] = _Entry(callback, stamp)
        self._entries.move_to_end(key)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)
        if known is not None and known.callback == callback:
            return
        for listener in list(self._listeners):
            try:
                listener(application_id, slide_id, callback)
            except Exception:
                log.failure("a token listener failed for slide {slide_id}", slide_id=slide_id)

    def newest(self, job: Job) -> Callback:
        """The callback ``job`` should use: the newest received for its slide, unless
        its own record is newer (merged by another daemon sharing the spool)."""
        entry = self._entries.get((job.application_id, job.slide_id))
        if entry is None or entry.stamp < job.updated:
            return job.callback
        return entry.callback

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(application_id, slide_id, callback)`` on every new callback;
        return an unsubscribe."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe


@define
class JobCallback:
    """The worker's view of its running job's newest callback, as the daemon sends it.

    :meth:`follow` it while a job's SPS calls run; the daemon's ``NewCallback`` command
    (a newer request for the slide arrived) gives it the newer callback through
    :meth:`update`.  A call made with any token the job has had is sent with the newest
    one.  A callback for another SPS URL than the call's is not used for that call.
    """

    _job_id: str | None = field(default=None, init=False)
    _current: Callback | None = field(default=None, init=False, repr=False)
    _known: set[str] = field(factory=set, init=False, repr=False)

    def follow(self, job: Job) -> None:
        """Serve the callback of ``job`` (now running)."""
        self._job_id = job.job_id
        self._current = job.callback
        self._known = {job.callback.token}

    def update(self, job_id: str, callback: Callback) -> bool:
        """The daemon sent a newer ``callback`` for ``job_id``; False if that job's SPS
        calls are not running here."""
        if job_id != self._job_id:
            return False
        if callback != self._current:
            log.info("job {job_id}: a newer callback token arrived", job_id=job_id)
        self._current = callback
        self._known.add(callback.token)
        return True

    def stop(self) -> None:
        """The job's SPS calls are over: forget it."""
        self._job_id = None
        self._current = None
        self._known = set()

    def newest(self, callback: Callback, *, recheck: bool = False) -> Callback:
        """The job's current callback for a call made with ``callback`` (``recheck`` is
        part of :class:`CallbackSource`; the newest is always known here)."""
        current = self._current
        if current is None or callback.token not in self._known:
            return callback
        if _base(current.url) != _base(callback.url):
            return callback
        return current


# --- the authorizer -------------------------------------------------------------------


@define
class CallbackAuth:
    """The :class:`~dpatia_daemon.sps.client.Authorizer` of an SPS client (see the module
    docstring for which token wins).

    Collaborators: ``credentials`` (None when not configured) and ``callbacks`` (the
    worker's :class:`JobCallback`; the daemon resolves the newest callback before calling,
    through the :class:`TokenBook`).  Callback tokens the SPS rejected are remembered
    (at most ``remember``).
    """

    credentials: CredentialTokens | None = None
    callbacks: CallbackSource = field(factory=SameCallback)
    remember: int = 1024
    _rejected: OrderedDict[str, None] = field(factory=OrderedDict, init=False, repr=False)

    async def token(self, callback: Callback) -> str:
        """The newest callback token, unless the SPS rejected it and dpatia has credentials."""
        current = self.callbacks.newest(callback)
        if self.credentials is None or current.token not in self._rejected:
            return current.token
        return await self.credentials.token(callback.url)

    async def rejected(self, callback: Callback, token: str, error: SPSUnauthorized) -> str | None:
        """After a 401/403: a refreshed credentials token, a newer callback token, or a
        credentials token; without credentials, :data:`NO_CREDENTIALS`."""
        credentials = self.credentials
        if credentials is not None and credentials.issued(token):
            return await credentials.refresh(callback.url, token)
        _remember(self._rejected, token, self.remember)
        current = self.callbacks.newest(callback, recheck=True)
        if current.token != token and current.token not in self._rejected:
            return current.token
        if credentials is not None:
            log.info(
                "{endpoint}: the SPS rejected the callback token (HTTP {status}); "
                "using a token obtained with client credentials",
                endpoint=error.endpoint,
                status=error.status,
            )
            return await credentials.token(callback.url)
        # Not logged here: the caller's failure (an attempt, a write) logs this message.
        raise SPSUnauthorized(
            NO_CREDENTIALS,
            endpoint=error.endpoint,
            status=error.status,
            body_excerpt=error.body_excerpt,
        ) from None


def callback_auth(
    fetch: Fetch,
    clock: IReactorTime,
    application_id: str,
    credentials: Credentials | None,
    callbacks: CallbackSource | None = None,
) -> CallbackAuth:
    """The authorizer of a daemon's or worker's SPS client."""
    tokens = None
    if credentials is not None:
        tokens = CredentialTokens(
            fetch=fetch, clock=clock, application_id=application_id, credentials=credentials
        )
    return CallbackAuth(credentials=tokens, callbacks=callbacks or SameCallback())


__all__ = [
    "BAD_CREDENTIALS",
    "CLIENT_ID_ENV",
    "CLIENT_SECRET_ENV",
    "NO_CREDENTIALS",
    "CallbackAuth",
    "CallbackSource",
    "CredentialTokens",
    "Credentials",
    "JobCallback",
    "SameCallback",
    "TokenBook",
    "callback_auth",
    "without_credentials",
]
