"""The configuration file: frozen sections, defaults, and precise errors.

``load_config(path, overrides)`` reads an INI file (``etc/dpatia.ini`` documents every
key) into a frozen :class:`Config`.  Anything wrong — a missing file, an unknown section
or key, a bad value — raises :class:`ConfigError` whose message is one line naming the
file, section, key and problem, because that line is what an operator reads in the
journal at 3 a.m.

Relative paths (the spool directory, a CA file) are relative to the daemon's working
directory, as for any twistd daemon; the systemd unit sets ``WorkingDirectory``.
"""

from __future__ import annotations

import configparser
import enum
import functools
import ipaddress
import os
import re
import shlex
import stat
import typing
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
from attrs import field, frozen
from twisted.python.filepath import FilePath

from . import sections
from .analyses.demo import DemoSettings
from .analyses.loader import AnalysisLoadError, find_analysis
from .analyses.nuclei.settings import NucleiSettings
from .analyses.tissue.settings import TissueSettings
from .frontdoor.notifications import NotificationRules
from .models import InputType
from .pipeline.settings import PipelineConfig, PipelineSettings
from .sections import (
    BadValue,
    Check,
    at_least,
    at_most,
    greater_than,
    key,
    matches,
    nonempty,
    not_negative,
    to_strings,
)
from .sps.tokens import CLIENT_ID_ENV, CLIENT_SECRET_ENV, Credentials


class ConfigError(Exception):
    """A configuration problem, as one line: ``FILE: [section] key: problem``."""

    def __init__(self, source: str, section: str | None, key: str | None, problem: str):
        self.source = source
        self.section = section
        self.key = key
        self.problem = problem
        where = source
        if section is not None:
            where += f": [{section}]"
            if key is not None:
                where += f" {key}"
        super().__init__(f"{where}: {problem}")


# --- callback URL allowlist -----------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Whitespace and control characters: never part of a callback URL.
_HIDDEN = re.compile(r"[\x00-\x20\x7f-\x9f]")


@frozen
class URLPrefix:
    """One allowed callback URL prefix: scheme, host, port (``None`` = any) and path."""

    scheme: str
    host: str
    port: int | None
    path: str

    @classmethod
    def parse(cls, text: str) -> URLPrefix:
        """Parse ``http://host:port/path``; ``:*`` allows any port."""
        any_port = False
        if re.search(r":\*(?=/|$)", text.split("//", 1)[-1].split("/", 1)[0]):
            any_port = True
            text = re.sub(r":\*(?=/|$)", "", text, count=1)
        parts = urlsplit(text)
        if parts.scheme not in _DEFAULT_PORTS:
            raise ValueError(f"{text!r}: scheme must be http or https")
        if not parts.hostname:
            raise ValueError(f"{text!r}: no host")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError(f"{text!r}: a prefix has no user, query or fragment")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{text!r}: bad port") from None
        if port is None and not any_port:
            port = _DEFAULT_PORTS[parts.scheme]
        return cls(
            scheme=parts.scheme,
            host=parts.hostname.lower(),
            port=None if any_port else port,
            path=parts.path.rstrip("/"),
        )

    def matches(self, url: str) -> bool:
        """True when ``url`` is under this prefix (path compared segment by segment).

        Refused whatever the prefix: whitespace or control characters anywhere
        (``urlsplit`` silently drops some, the HTTP client would not), any userinfo
        (even an empty ``@``), a query or fragment (a base URL has none: the client
        appends paths to it), and dot segments in the path, also percent-encoded
        once or twice or written with backslashes.
        """
        if _HIDDEN.search(url):
            return False
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return False
        if "@" in parts.netloc or not parts.hostname or parts.query or parts.fragment:
            return False
        if "?" in url or "#" in url:
            return False
        if parts.scheme != self.scheme or parts.hostname.lower() != self.host:
            return False
        if port is None:
            port = _DEFAULT_PORTS.get(parts.scheme)
        if self.port is not None and port != self.port:
            return False
        path = parts.path
        # A dot segment (also percent-encoded, or with backslashes) could climb out of
        # the allowed prefix on the server side.
        decoded = path
        for _ in range(3):  # a server may decode more than once
            decoded = unquote(decoded)
        segments = decoded.replace("\\", "/").split("/")
        if any(seg in (".", "..") for seg in segments):
            return False
        return path == self.path or path.startswith(self.path + "/") or self.path == ""

    def __str__(self) -> str:
        port = "*" if self.port is None else str(self.port)
        return f"{self.scheme}://{self.host}:{port}{self.path}"


# --- sections -------------------------------------------------------------------------
# Each section is declared once, here or by its owner (the analyses' settings, the
# pipeline's): its fields are its keys, with their defaults and checks.  See
# dpatia_daemon.sections.


class AccessLog(enum.Enum):
    """Which answered requests get a line in the log ([server] access_log)."""

    ALL = "all"
    ERRORS = "errors"  # answers with status 400 or above
    OFF = "off"


def _listen(text: str) -> str:
    """``[server] listen`` from the file: a Twisted endpoint description that parses."""
    from twisted.internet.endpoints import serverFromString

    text = text.strip()
    if not text:
        raise ValueError("must not be empty")
    if text.startswith("systemd:"):
        # Its sockets exist only when systemd starts us; build_service checks them.
        return text
    try:
        # Parsing builds the endpoint object only; nothing listens until the service
        # starts, so no reactor is needed here.  ssl: loads its certificate files now,
        # which catches a wrong path at start rather than at first connection.
        serverFromString(None, text)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ValueError(f"not a usable Twisted endpoint description ({e})") from None
    return text


def _networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``[server] allowed_clients`` from the file: networks (CIDR) or addresses, split
    on spaces or commas; a network with host bits set is refused, as likely a typo."""
    networks = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError as e:
            raise ValueError(f"{item!r} is not an IPv4 or IPv6 network ({e})") from None
    return tuple(networks)


def _not_info_route(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if value.endswith(("/info", "/imagenotification")):
        raise BadValue(attribute.name, "must not end in /info or /imagenotification")


def _absolute_url(instance: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadValue(attribute.name, "must be an absolute http(s) URL")


def _without_trailing_slash(value: str | None) -> str | None:
    return None if value is None else value.rstrip("/")


@frozen
class ServerConfig:
    """Where and how the IA-API listens (etc/dpatia.ini [server])."""

    listen: str = key("tcp:5006", parse=_listen)
    route: str = key(
        "/dpatia",
        nonempty,
        matches(r"(/[A-Za-z0-9._~-]+)+", "must be a path like /dpatia (letters, digits, . _ ~ -)"),
        _not_info_route,
    )
    public_url: str | None = key(None, _absolute_url, converter=_without_trailing_slash)
    #: Image notifications, creates and cancels.
    max_body_bytes: int = key(1024 * 1024, at_least(1))
    #: Modify and delete, which carry a whole stored result (at least max_body_bytes).
    max_result_body_bytes: int = key(64 * 1024 * 1024, at_least(1))
    max_json_depth: int = key(64, at_least(2), at_most(500))
    max_json_string: int = key(1024 * 1024, at_least(1))
    api_version: str = key("1.5", matches(r"\d+\.\d+", "must look like 1.5"))
    access_log: AccessLog = key(AccessLog.ERRORS)
    processes: int = key(1, at_least(1), at_most(16))
    #: Networks the IA-API answers; empty: any client (see frontdoor/clients.py).
    allowed_clients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = key(
        (), parse=_networks
    )
    #: A PEM bundle of the CAs whose client certificates an ssl: listener requires.
    client_ca_file: FilePath | None = key(None, parse=lambda text: _readable_file(text))


@frozen
class AppConfig:
    """What the app is at the SPS and which analysis it runs (etc/dpatia.ini [app])."""

    application_id: str = key("dpatia", nonempty)
    display_name: str = key("dpatia analysis", nonempty)
    manufacturer: str = key("dpatia", nonempty)
    input_type: InputType = key(InputType.WHOLE_SLIDE)
    tags: tuple[str, ...] = key(())
    analysis: str = key(
        "tissue",
        nonempty,
        matches(
            r"[A-Za-z_][\w.-]*|[A-Za-z_][\w.]*:[A-Za-z_]\w*",
            "must be a short name (demo, tissue, an installed plugin) or package.module:callable",
        ),
    )
    include_phi: bool = key(False)
    #: ``package.module:callable`` run (in a worker, like a job) for a patchCollection
    #: button press; empty: a press is acknowledged and nothing else happens.
    on_action: str = key(
        "",
        matches(
            r"|[A-Za-z_][\w.]*:[A-Za-z_]\w*",
            "must be empty or package.module:callable",
        ),
    )


@frozen
class SpoolConfig:
    """Where accepted jobs are kept, and for how long (etc/dpatia.ini [spool])."""

    directory: FilePath = key(factory=lambda: FilePath("var/spool"))
    sweep_interval: float = key(30.0, greater_than(0))
    keep_wsi: bool = key(False)
    retention_days: float = key(30.0, not_negative)
    #: Seconds between two prunes of the history (done/failed/cancelled records).
    prune_interval: float = key(3600.0, greater_than(0))
    #: New jobs are refused (503) with less free space than this on the spool's disk.
    min_free_bytes: int = key(100 * 1024 * 1024, not_negative)
    #: New jobs are refused (503) with this many queued; 0: no limit.
    max_queued: int = key(0, not_negative)


def _executable(text: str) -> str | None:
    """``[workers] python`` from the file: an absolute path to an executable, or None."""
    text = text.strip()
    if not text:
        return None
    if not os.path.isabs(text):
        raise ValueError(f"{text!r} is not an absolute path")
    if not os.path.isfile(text) or not os.access(text, os.X_OK):
        raise ValueError(f"{text!r} is not an executable file")
    return text


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _environment(text: str) -> tuple[tuple[str, str], ...]:
    """``[workers] environment`` from the file: ``NAME=value`` words (shell quoting, one
    or more a line), in order."""
    try:
        words = shlex.split(text, comments=False)
    except ValueError as e:
        raise ValueError(f"cannot split into NAME=value words ({e})") from None
    pairs = []
    for word in words:
        name, sep, value = word.partition("=")
        if not sep or not _ENV_NAME.match(name):
            raise ValueError(f"{word!r} is not NAME=value")
        pairs.append((name, value))
    return tuple(pairs)


_SIZE = re.compile(r"(\d+)\s*([KMGT]?)i?B?\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int | None:
    """``[workers] memory_limit`` from the file: ``4G``, ``512M``, bytes; blank or 0:
    None (no limit)."""
    text = text.strip()
    match = _SIZE.match(text)
    if not text:
        return None
    if match is None:
        raise ValueError(f"{text!r} is not a size such as 4G or 512M")
    size = int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    return size or None


#: The variable that tells a worker its slot number (1-based), for an analysis that
#: wants to know which of its kind it is (a port, a cache folder of its own).
SLOT_ENV = "DPATIA_WORKER_SLOT"

#: Variables [workers] environment may not set: the daemon sets them itself (the slot
#: number; the SPS client credentials, from [sps]).
_RESERVED_ENV = (SLOT_ENV, CLIENT_ID_ENV, CLIENT_SECRET_ENV)

_DEVICE_GROUP = re.compile(r"[A-Za-z0-9-]+(\+[A-Za-z0-9-]+)*\Z")


def _device_groups(instance: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for group in value:
        if not _DEVICE_GROUP.match(group):
            raise BadValue(
                attribute.name,
                f"{group!r} is not a GPU index or UUID (join a worker's GPUs with +: 0+1)",
            )


@frozen
class WorkersConfig:
    """How analyses run: worker processes, retries, deadlines, and the workers' Python,
    environment and GPUs (etc/dpatia.ini [workers])."""

    count: int = key(2, not_negative)
    work_directory: FilePath = key(factory=lambda: FilePath("var/work"))
    max_attempts: int = key(3, at_least(1))
    job_timeout: float = key(3600.0, greater_than(0))
    kill_grace: float = key(10.0, greater_than(0))
    heartbeat_interval: float = key(5.0, greater_than(0))
    progress_interval: float = key(2.0, not_negative)
    shutdown_grace: float = key(30.0, not_negative)
    max_jobs_per_worker: int = key(0, not_negative)
    restart_backoff_cap: float = key(60.0, greater_than(0))
    #: Another interpreter for the workers (the analysis's own virtualenv); None: ours.
    python: str | None = key(None, parse=_executable)
    #: Extra variables for the workers, in order: ``(name, value)`` pairs.
    environment: tuple[tuple[str, str], ...] = key((), parse=_environment)
    #: GPUs, one group per worker slot, round-robin: slot n sees group (n-1) % len.
    gpus: tuple[str, ...] = key((), _device_groups)
    #: Each worker's address-space limit (RLIMIT_AS), bytes; None: no limit.
    memory_limit: int | None = key(None, at_least(256 * 1024 * 1024), parse=_size)
    #: OMP/MKL/OpenBLAS/numexpr threads per worker; 0: the libraries' own default.
    cpu_threads: int = key(0, not_negative)

    #: Deferred jobs (Postfix's minimal/maximal_backoff_time, maximal_queue_lifetime):
    #: the first and the longest wait before a job's next try, and how long transient
    #: faults may defer a job before it fails for good.
    min_backoff: float = key(30.0, greater_than(0))
    max_backoff: float = key(600.0, greater_than(0))
    max_deferral_age: float = key(3 * 86400.0, greater_than(0))
    #: Seconds between probes of an SPS that is failing (deferred jobs resume at the
    #: first success).
    sps_probe_interval: float = key(10.0, greater_than(0))

    def __attrs_post_init__(self) -> None:
        names = [name for name, _ in self.environment]
        for name in names:
            if name in _RESERVED_ENV or (name == "CUDA_VISIBLE_DEVICES" and self.gpus):
                setter = "[workers] gpus" if name == "CUDA_VISIBLE_DEVICES" else "the daemon"
                raise BadValue("environment", f"{name} is set by {setter}")
        if self.gpus and 0 < self.count < len(self.gpus):
            raise BadValue(
                "gpus",
                f"{len(self.gpus)} GPU groups but count is {self.count}: each slot takes "
                "one group, so some would never be used (raise count or list fewer)",
            )

    def devices(self, slot: int) -> str | None:
        """``CUDA_VISIBLE_DEVICES`` of worker slot ``slot`` (1-based), None without
        ``gpus``: the same for every worker that slot ever runs."""
        if not self.gpus:
            return None
        return ",".join(self.gpus[(slot - 1) % len(self.gpus)].split("+"))


class LogFormat(enum.Enum):
    """How log events are written on stdout ([log] format; see ops/logs.py)."""

    JOURNAL = "journal"  # <N> priority prefix, no time stamp: for journald
    TEXT = "text"  # twistd's classic lines with a time stamp
    JSON = "json"  # one JSON object per line


class LogLevelName(enum.Enum):
    """The least severe level written ([log] level): twisted.logger's level names."""

    DEBUG = "debug"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"
    CRITICAL = "critical"


@frozen
class LogConfig:
    """What the daemon writes on stdout, and how (etc/dpatia.ini [log])."""

    format: LogFormat = key(LogFormat.JOURNAL)
    level: LogLevelName = key(LogLevelName.INFO)


#: The interface an ``[admin] listen`` of ``tcp:PORT`` binds when it names none.
ADMIN_INTERFACE = "127.0.0.1"


def _admin_listen(text: str) -> str:
    """``[admin] listen`` from the file: a ``tcp:`` listener that names no interface
    listens on loopback only (name one, ``interface=0.0.0.0``, to listen elsewhere)."""
    text = text.strip()
    if text.startswith("tcp:") and "interface=" not in text:
        text += ":interface=" + ADMIN_INTERFACE
    return text


@frozen
class AdminConfig:
    """The admin listener: ``/metrics`` and the status page (etc/dpatia.ini [admin])."""

    #: A Twisted endpoint description; empty: no admin listener (and no metrics).
    listen: str = key("", parse=_admin_listen)


def _prefixes(text: str) -> tuple[URLPrefix, ...]:
    """``[sps] allowed_callback_urls`` from the file: prefixes split on spaces or commas."""
    return tuple(URLPrefix.parse(item) for item in re.split(r"[\s,]+", text) if item)


def _readable_file(text: str) -> FilePath | None:
    """A path from the file that names a readable file (checked at start), or None."""
    if not text.strip():
        return None
    path = FilePath(text.strip())
    if not path.isfile():
        raise ValueError(f"{text.strip()!r} is not a readable file")
    return path


@frozen
class SPSConfig:
    """Which SPS addresses the daemon calls, and how (etc/dpatia.ini [sps])."""

    allowed_callback_urls: tuple[URLPrefix, ...] = key((), parse=_prefixes)
    timeout: float = key(30.0, greater_than(0))
    retries: int = key(4, not_negative)
    verify_tls: bool = key(True)
    ca_file: FilePath | None = key(None, parse=_readable_file)
    background_concurrency: int = key(4, at_least(1))
    background_max_delay: float = key(5.0, not_negative)
    #: Client credentials for ``POST /token`` (IA-API.md §2.9); the secret never
    #: shows in a repr.
    client_id: str | None = key(None)
    client_secret: str | None = key(None, repr=False)

    def allows(self, url: str) -> bool:
        """True when ``url`` is under one of :attr:`allowed_callback_urls`."""
        return _allowed(self.allowed_callback_urls, url)

    def credentials(self) -> Credentials | None:
        """``client_id`` and ``client_secret`` for ``POST /token``, if both are set."""
        if self.client_id is None or self.client_secret is None:
            return None
        return Credentials(self.client_id, self.client_secret)


@functools.lru_cache(maxsize=256)
def _allowed(prefixes: tuple[URLPrefix, ...], url: str) -> bool:
    # Cached: an SPS sends the same callback URL with every request, and parsing it
    # again for each acknowledgement is measurable.
    return any(prefix.matches(url) for prefix in prefixes)


#: The built-in analyses that have a section of their own: its settings go to the
#: workers (``--setting``) of a daemon running that analysis.
_ANALYSIS_SECTIONS = {"demo": "demo", "tissue": "tissue", "nuclei": "nuclei"}


@frozen
class Config:
    """The whole configuration; ``source`` is the file it came from.

    Each field but ``source`` is a section of the file, of the same name; the field's
    class declares the section's keys (:data:`SECTIONS`).
    """

    source: str = "<defaults>"
    server: ServerConfig = field(factory=ServerConfig)
    app: AppConfig = field(factory=AppConfig)
    spool: SpoolConfig = field(factory=SpoolConfig)
    workers: WorkersConfig = field(factory=WorkersConfig)
    sps: SPSConfig = field(factory=SPSConfig)
    demo: DemoSettings = field(factory=DemoSettings)
    pipeline: PipelineConfig = field(factory=PipelineConfig)
    tissue: TissueSettings = field(factory=TissueSettings)
    nuclei: NucleiSettings = field(factory=NucleiSettings)
    notifications: NotificationRules = field(factory=NotificationRules)
    log: LogConfig = field(factory=LogConfig)
    admin: AdminConfig = field(factory=AdminConfig)

    def analysis_settings(self) -> dict[str, str]:
        """The section of the built-in analysis this daemon runs, as the strings its
        workers get (none for an analysis of one's own)."""
        name = _ANALYSIS_SECTIONS.get(self.app.analysis)
        return {} if name is None else to_strings(getattr(self, name))

    def pipeline_settings(self) -> PipelineSettings:
        """What workers need to fetch a slide (no secrets: tokens travel in job.json,
        client credentials in the workers' environment)."""
        return PipelineSettings(
            **attrs.asdict(self.pipeline, recurse=False),
            include_phi=self.app.include_phi,
            sps_timeout=self.sps.timeout,
            sps_retries=self.sps.retries,
            verify_tls=self.sps.verify_tls,
            ca_file=self.sps.ca_file.path if self.sps.ca_file else None,
            api_version=self.server.api_version,
            application_id=self.app.application_id,
        )


#: Each section of the file and the class that declares its keys.
SECTIONS: dict[str, type] = {
    f.name: typing.cast(type, f.type)
    for f in attrs.fields(attrs.resolve_types(Config))
    if f.name != "source"
}

#: Checks of keys whose section is declared where config cannot add them.
_EXTRA_CHECKS: dict[tuple[str, str], tuple[Check, ...]] = {
    ("notifications", "min_mpp"): (greater_than(0),),
    ("notifications", "max_mpp"): (greater_than(0),),
}


#: Command-line overrides: option name -> (section, key).
OVERRIDES = {
    "listen": ("server", "listen"),
    "spool": ("spool", "directory"),
    "workers": ("workers", "count"),
}


def _parse_value(source: str, section: str, name: str, raw: str) -> Any:
    """The value of key ``name`` of ``section`` from its text; a :class:`ConfigError`
    naming ``source`` (the file, or the command-line option) if it is unusable."""
    cls = SECTIONS[section]
    known = sections.keys(cls)
    if name not in known:
        raise ConfigError(source, section, name, f"unknown key (known: {', '.join(known)})")
    try:
        return sections.parse_key(cls, name, raw, *_EXTRA_CHECKS.get((section, name), ()))
    except BadValue as e:
        raise ConfigError(source, section, name, e.problem) from None


def load_config(path: str, overrides: Mapping[str, str | None] | None = None) -> Config:
    """Read ``path`` and apply command-line ``overrides``; raise :class:`ConfigError`."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except FileNotFoundError:
        raise ConfigError(path, None, None, "no such file") from None
    except PermissionError:
        raise ConfigError(path, None, None, "not readable (permission denied)") from None
    except IsADirectoryError:
        raise ConfigError(path, None, None, "is a directory, not a file") from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, None, "is not UTF-8 text") from None
    except configparser.Error as e:
        line = str(e).splitlines()[0]
        raise ConfigError(path, None, None, f"not a valid INI file ({line})") from None

    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section in parser.sections():
        if section not in SECTIONS:
            known = ", ".join(SECTIONS)
            raise ConfigError(path, section, None, f"unknown section (known: {known})")
        for name, raw in parser.items(section):
            values[section][name] = _parse_value(path, section, name, raw)

    for option, value in (overrides or {}).items():
        if value is None:
            continue
        section, name = OVERRIDES[option]
        values[section][name] = _parse_value(f"command line --{option}", section, name, value)

    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        try:
            built[name] = sections.build(cls, values[name])
        except BadValue as e:
            raise ConfigError(path, name, e.key, e.problem) from None
    config = Config(source=path, **built)
    _check_consistency(config)
    return config


def _check_consistency(config: Config) -> None:
    """Cross-key checks that a single value parser cannot make."""
    rules = config.notifications
    if rules.min_mpp is not None and rules.max_mpp is not None and rules.min_mpp > rules.max_mpp:
        raise ConfigError(
            config.source,
            "notifications",
            "min_mpp",
            f"{rules.min_mpp} is greater than max_mpp {rules.max_mpp}",
        )
    if not config.sps.allowed_callback_urls:
        raise ConfigError(
            config.source,
            "sps",
            "allowed_callback_urls",
            "must list at least one URL prefix (the daemon calls only these SPS addresses)",
        )
    _check_credentials(config)
    _check_analysis(config)


def _check_analysis(config: Config) -> None:
    """A short ``[app] analysis`` name must be a built-in or an installed plugin.

    Only metadata is read (no analysis code is imported).  With ``[workers] python``
    the workers' interpreter is asked instead, when the service is built
    (:func:`dpatia_daemon.workers.interpreter.check_workers_python`); with no workers
    here, other daemons run the jobs.
    """
    if config.workers.python is not None or not config.workers.count:
        return
    try:
        find_analysis(config.app.analysis)
    except AnalysisLoadError as e:
        raise ConfigError(config.source, "app", "analysis", str(e)) from None


def _check_credentials(config: Config) -> None:
    """Both client credentials or neither; a secret only in a file nobody else reads."""
    sps = config.sps
    if (sps.client_id is None) != (sps.client_secret is None):
        missing = "client_secret" if sps.client_secret is None else "client_id"
        raise ConfigError(
            config.source,
            "sps",
            missing,
            "must be set too (client_id and client_secret go together)",
        )
    if sps.client_secret is None:
        return
    try:
        mode = os.stat(config.source).st_mode
    except OSError as e:
        raise ConfigError(
            config.source, "sps", "client_secret", f"cannot check the file: {e}"
        ) from None
    if mode & 0o044:
        raise ConfigError(
            config.source,
            "sps",
            "client_secret",
            f"the file is readable by group or others (mode {stat.S_IMODE(mode):04o}) "
            f"but holds a secret; run: chmod 600 {config.source}",
        )
