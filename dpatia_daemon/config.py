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
import os
import re
import stat
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from attrs import asdict, field, frozen
from twisted.python.filepath import FilePath

from .frontdoor.notifications import NotificationRules
from .models import InputType

T = TypeVar("T")


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
        """True when ``url`` is under this prefix (path compared segment by segment)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return False
        if parts.username or parts.password or not parts.hostname:
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
        segments = unquote(path).replace("\\", "/").split("/")
        if any(seg in (".", "..") for seg in segments):
            return False
        return path == self.path or path.startswith(self.path + "/") or self.path == ""

    def __str__(self) -> str:
        port = "*" if self.port is None else str(self.port)
        return f"{self.scheme}://{self.host}:{port}{self.path}"


# --- sections -------------------------------------------------------------------------


class AccessLog(enum.Enum):
    """Which answered requests get a line in the log ([server] access_log)."""

    ALL = "all"
    ERRORS = "errors"  # answers with status 400 or above
    OFF = "off"


@frozen
class ServerConfig:
    listen: str = "tcp:5006"
    route: str = "/dpatia"
    public_url: str | None = None
    max_body_bytes: int = 1024 * 1024
    api_version: str = "1.5"
    access_log: AccessLog = AccessLog.ERRORS
    processes: int = 1


@frozen
class AppConfig:
    application_id: str = "dpatia"
    display_name: str = "dpatia analysis"
    manufacturer: str = "dpatia"
    input_type: InputType = InputType.WHOLE_SLIDE
    tags: tuple[str, ...] = ()
    analysis: str = "tissue"
    include_phi: bool = False


@frozen
class SpoolConfig:
    directory: FilePath = field(factory=lambda: FilePath("var/spool"))
    sweep_interval: float = 30.0
    keep_wsi: bool = False
    retention_days: float = 30.0


@frozen
class WorkersConfig:
    """How analyses run: worker processes, retries, deadlines (etc/dpatia.ini [workers])."""

    count: int = 2
    work_directory: FilePath = field(factory=lambda: FilePath("var/work"))
    max_attempts: int = 3
    job_timeout: float = 3600.0
    kill_grace: float = 10.0
    heartbeat_interval: float = 5.0
    progress_interval: float = 2.0
    shutdown_grace: float = 30.0
    max_jobs_per_worker: int = 0
    restart_backoff_cap: float = 60.0


@frozen
class PipelineConfig:
    """How a worker fetches a slide before the analysis (etc/dpatia.ini [pipeline])."""

    thumbnail_mpp: float = 16.0
    tile_concurrency: int = 16
    download_wsi: bool = True
    download_idle_timeout: float = 120.0


@frozen
class TissueConfig:
    """Settings of the built-in ``tissue`` analysis; None means its own default
    (defaults live in :mod:`dpatia_daemon.analyses.tissue`, beside the method)."""

    min_area_mm2: float | None = None
    min_hole_mm2: float | None = None
    target_mpp: float | None = None
    min_side: int | None = None
    max_side: int | None = None
    max_points: int | None = None
    simplify_px: float | None = None
    min_od: float | None = None

    def settings(self) -> dict[str, str]:
        """The keys that are set, as the strings an analysis's settings hold."""
        return {k: f"{v:g}" for k, v in asdict(self).items() if v is not None}


@frozen
class DemoConfig:
    """Settings of the built-in ``demo`` analysis."""

    step_seconds: float = 2.0


@frozen
class SPSConfig:
    allowed_callback_urls: tuple[URLPrefix, ...] = ()
    timeout: float = 30.0
    retries: int = 4
    verify_tls: bool = True
    ca_file: FilePath | None = None
    background_concurrency: int = 4
    background_max_delay: float = 5.0
    #: Client credentials for ``POST /token`` (IA-API.md §2.9); the secret never
    #: shows in a repr.
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)

    def allows(self, url: str) -> bool:
        return _allowed(self.allowed_callback_urls, url)


@functools.lru_cache(maxsize=256)
def _allowed(prefixes: tuple[URLPrefix, ...], url: str) -> bool:
    # Cached: an SPS sends the same callback URL with every request, and parsing it
    # again for each acknowledgement is measurable.
    return any(prefix.matches(url) for prefix in prefixes)


@frozen
class Config:
    """The whole configuration; ``source`` is the file it came from."""

    source: str = "<defaults>"
    server: ServerConfig = field(factory=ServerConfig)
    app: AppConfig = field(factory=AppConfig)
    spool: SpoolConfig = field(factory=SpoolConfig)
    workers: WorkersConfig = field(factory=WorkersConfig)
    sps: SPSConfig = field(factory=SPSConfig)
    demo: DemoConfig = field(factory=DemoConfig)
    pipeline: PipelineConfig = field(factory=PipelineConfig)
    tissue: TissueConfig = field(factory=TissueConfig)
    notifications: NotificationRules = field(factory=NotificationRules)


# --- value parsers --------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be greater than 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must not be negative")
    return value


def _optional_positive_float(text: str) -> float | None:
    return _positive_float(text) if text.strip() else None


def _optional_non_negative_float(text: str) -> float | None:
    return _non_negative_float(text) if text.strip() else None


def _optional_at_least(kind: type[int] | type[float], lowest: float) -> Callable[[str], Any]:
    """A parser for an optional number of ``kind`` no smaller than ``lowest``."""

    def parse(text: str) -> int | float | None:
        if not text.strip():
            return None
        value = kind(text)
        if value < lowest:
            raise ValueError(f"must be at least {lowest:g}")
        return value

    return parse


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError("must be true or false")


def _nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _listen(text: str) -> str:
    from twisted.internet.endpoints import serverFromString

    text = _nonempty(text)
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


def _route(text: str) -> str:
    text = _nonempty(text)
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", text):
        raise ValueError("must be a path like /dpatia (letters, digits, . _ ~ -)")
    if text.endswith(("/info", "/imagenotification")):
        raise ValueError("must not end in /info or /imagenotification")
    return text


def _public_url(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an absolute http(s) URL")
    return text.rstrip("/")


def _version(text: str) -> str:
    if not re.fullmatch(r"\d+\.\d+", text.strip()):
        raise ValueError("must look like 1.5")
    return text.strip()


def _input_type(text: str) -> InputType:
    try:
        return InputType(text.strip())
    except ValueError:
        raise ValueError("must be one of " + ", ".join(t.value for t in InputType)) from None


def _processes(text: str) -> int:
    value = _positive_int(text)
    if value > 16:
        raise ValueError("must be at most 16")
    return value


def _access_log(text: str) -> AccessLog:
    try:
        return AccessLog(text.strip())
    except ValueError:
        raise ValueError("must be one of " + ", ".join(a.value for a in AccessLog)) from None


def _tags(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _analysis(text: str) -> str:
    text = _nonempty(text)
    if not re.fullmatch(r"[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?", text):
        raise ValueError("must be a short name (demo, tissue) or package.module:callable")
    return text


def _path(text: str) -> FilePath:
    return FilePath(_nonempty(text))


def _optional_path(text: str) -> FilePath | None:
    if not text.strip():
        return None
    path = FilePath(text.strip())
    if not path.isfile():
        raise ValueError(f"{text.strip()!r} is not a readable file")
    return path


def _optional_text(text: str) -> str | None:
    return text.strip() or None


def _prefixes(text: str) -> tuple[URLPrefix, ...]:
    items = [t for t in re.split(r"[\s,]+", text) if t]
    return tuple(URLPrefix.parse(item) for item in items)


# section -> (its frozen class, {key: parser of the key's text})
_SCHEMA: dict[str, tuple[type, dict[str, Callable[[str], Any]]]] = {
    "server": (
        ServerConfig,
        {
            "listen": _listen,
            "route": _route,
            "public_url": _public_url,
            "max_body_bytes": _positive_int,
            "api_version": _version,
            "access_log": _access_log,
            "processes": _processes,
        },
    ),
    "app": (
        AppConfig,
        {
            "application_id": _nonempty,
            "display_name": _nonempty,
            "manufacturer": _nonempty,
            "input_type": _input_type,
            "tags": _tags,
            "analysis": _analysis,
            "include_phi": _bool,
        },
    ),
    "spool": (
        SpoolConfig,
        {
            "directory": _path,
            "sweep_interval": _positive_float,
            "keep_wsi": _bool,
            "retention_days": _non_negative_float,
        },
    ),
    "workers": (
        WorkersConfig,
        {
            "count": _non_negative_int,
            "work_directory": _path,
            "max_attempts": _positive_int,
            "job_timeout": _positive_float,
            "kill_grace": _positive_float,
            "heartbeat_interval": _positive_float,
            "progress_interval": _non_negative_float,
            "shutdown_grace": _non_negative_float,
            "max_jobs_per_worker": _non_negative_int,
            "restart_backoff_cap": _positive_float,
        },
    ),
    "sps": (
        SPSConfig,
        {
            "allowed_callback_urls": _prefixes,
            "timeout": _positive_float,
            "retries": _non_negative_int,
            "verify_tls": _bool,
            "ca_file": _optional_path,
            "background_concurrency": _positive_int,
            "background_max_delay": _non_negative_float,
            "client_id": _optional_text,
            "client_secret": _optional_text,
        },
    ),
    "demo": (DemoConfig, {"step_seconds": _non_negative_float}),
    "tissue": (
        TissueConfig,
        {
            # Bounds as in dpatia_daemon.analyses.tissue._LIMITS (a test checks), so a
            # bad value stops the start instead of failing every job.
            "min_area_mm2": _optional_at_least(float, 0.0),
            "min_hole_mm2": _optional_at_least(float, 0.0),
            "target_mpp": _optional_at_least(float, 1e-3),
            "min_side": _optional_at_least(int, 16),
            "max_side": _optional_at_least(int, 16),
            "max_points": _optional_at_least(int, 100),
            "simplify_px": _optional_at_least(float, 0.0),
            "min_od": _optional_at_least(float, 0.0),
        },
    ),
    "pipeline": (
        PipelineConfig,
        {
            "thumbnail_mpp": _positive_float,
            "tile_concurrency": _positive_int,
            "download_wsi": _bool,
            "download_idle_timeout": _positive_float,
        },
    ),
    "notifications": (
        NotificationRules,
        {
            "enabled": _bool,
            "stainings": _tags,
            "body_parts": _tags,
            "exam_codes": _tags,
            "min_mpp": _optional_positive_float,
            "max_mpp": _optional_positive_float,
        },
    ),
}

#: Command-line overrides: option name -> (section, key).
OVERRIDES = {
    "listen": ("server", "listen"),
    "spool": ("spool", "directory"),
    "workers": ("workers", "count"),
}


def _parse_value(source: str, section: str, key: str, raw: str) -> Any:
    parser = _SCHEMA[section][1][key]
    try:
        return parser(raw)
    except ValueError as e:
        problem = str(e)
        if problem.startswith("invalid literal") or problem.startswith("could not convert"):
            problem = f"{raw.strip()!r} is not a number"
        raise ConfigError(source, section, key, problem) from None


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

    values: dict[str, dict[str, Any]] = {name: {} for name in _SCHEMA}
    for section in parser.sections():
        if section not in _SCHEMA:
            raise ConfigError(path, section, None, f"unknown section (known: {', '.join(_SCHEMA)})")
        known = _SCHEMA[section][1]
        for key, raw in parser.items(section):
            if key not in known:
                raise ConfigError(path, section, key, f"unknown key (known: {', '.join(known)})")
            values[section][key] = _parse_value(path, section, key, raw)

    for option, value in (overrides or {}).items():
        if value is None:
            continue
        section, key = OVERRIDES[option]
        values[section][key] = _parse_value(f"command line --{option}", section, key, value)

    sections = {name: cls(**values[name]) for name, (cls, _) in _SCHEMA.items()}
    config = Config(source=path, **sections)
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
