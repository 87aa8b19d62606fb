"""Daemon settings: frozen dataclasses read from YAML, the environment and ``--set`` overrides.

Precedence is command line > environment > file > built-in defaults. Each YAML key path ``a.b.c`` is also
``LICENSE_SERVER_A__B__C`` in the environment and ``--set a.b.c=value`` on the command line. Every problem
is a `ConfigError` whose message names the key path, and for a file also the file and line.
"""

import difflib
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

ENV_PREFIX = "LICENSE_SERVER_"
CONFIG_PATH_VARIABLE = "LICENSE_SERVER_CONFIG"  # reserved for the CLI; load_config never reads it
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
LOG_FORMATS: tuple[str, ...] = ("auto", "json", "console")
MAX_DURATION = 3650 * 86400.0  # ten years; longer values overflow date arithmetic elsewhere

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_BODY_BYTES = 1024 * 1024  # the most a workstation call may carry, whatever is configured
DEFAULT_ALLOWED_METHODS: tuple[str, ...] = (
    "key/activate",
    "key/getkey",
    "key/deactivate",
    "key/createtrialkey",
    "data/incrementintvaluetokey",
    "data/decrementintvaluetokey",
    "data/listdataobjects",
    "ai/registerevent",
    "message/getmessages",
    "subscription/recordusage",
)

_RULE = "license_server.config.rule"
_YAML_NULLS = frozenset({"", "~", "null", "Null", "NULL"})
_DURATION = re.compile(r"(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*(ms|s|m|h|d|w)", re.ASCII)
_DURATION_UNITS: tuple[tuple[str, int], ...] = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))  # as written
_UNIT_SECONDS = {"w": 7 * 86400, **dict(_DURATION_UNITS)}  # as read: weeks too
_SIZE = re.compile(r"(\d+)\s*(?:([kmg])(i)?)?b?", re.ASCII | re.IGNORECASE)
_METHOD = re.compile(r"[a-z0-9]+/[a-z0-9]+", re.ASCII)

KeyPath = tuple[str, ...]


class ConfigError(ValueError):
    """A setting that cannot be used; the message names its key path and where the value came from."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        """Keep the offending key path (dotted) next to the message, for callers that want it alone."""
        super().__init__(message)
        self.key = key


class _BadValueError(ValueError):
    """What is wrong with one value; the loader adds the key path and where the value came from."""


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a raw value came from: its name in messages, and the folder its relative paths start from."""

    where: str  # "/etc/x/config.yaml:12", "environment variable LICENSE_SERVER_...", "--set"
    base: Path
    textual: bool  # from the environment or the command line, where every value starts as text


_Parse = Callable[[object, _Origin], object]


@dataclass(frozen=True, slots=True)
class _Rule:
    """How one setting turns from its raw value into its typed value."""

    parse: _Parse
    text: bool = False  # environment/CLI values are taken verbatim, not parsed as YAML (paths, URLs, keys)


def _rule(parse: _Parse, *, text: bool = False) -> dict[str, _Rule]:
    """Field metadata that ties a dataclass field to the rule its setting is read by."""
    return {_RULE: _Rule(parse, text)}


# --- value parsing --------------------------------------------------------------------------------


def _shown(value: object) -> str:
    """A value as a message quotes it: YAML-like for null and booleans, repr otherwise, cut short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_duration(value: object) -> float:
    """Seconds from a YAML number or a text like "250ms", "5s", "10m", "2h", "7d", "2w"; ValueError otherwise.

    The one duration grammar: settings use it, and so do the command line's times ago (`--since 7d`).
    """
    expected = f"expected a duration like 5s or 250ms, got {_shown(value)}"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _BadValueError(expected)
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match is None:
            raise _BadValueError(expected)
        number, unit = match.group(1, 2)
        seconds = float(number) / 1000 if unit == "ms" else float(number) * _UNIT_SECONDS[unit]
    elif isinstance(value, int) and abs(value) > MAX_DURATION:
        seconds = math.inf if value > 0 else -math.inf
    else:
        seconds = float(value)
    if math.isnan(seconds):
        raise _BadValueError(expected)
    if abs(seconds) > MAX_DURATION:
        raise _BadValueError(f"must be at most {format_duration(MAX_DURATION)}, got {_shown(value)}")
    return seconds


def format_duration(seconds: float) -> str:
    """The text in the largest unit up to days that parse_duration reads back as `seconds`: 7200 -> "2h"."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format {seconds!r} as a duration")
    if seconds == 0:
        return "0s"
    for unit, size in _DURATION_UNITS:
        count = seconds / size
        if count.is_integer() and float(int(count)) * size == seconds:
            return f"{int(count)}{unit}"
    millis = seconds * 1000
    if millis.is_integer() and float(int(millis)) / 1000 == seconds:
        return f"{int(millis)}ms"
    return f"{seconds!r}s"


def parse_size(value: object) -> int:
    """Bytes from a YAML integer or a text like "512KB", "64KiB" or "1MiB" (k/M/G: 1000s, Ki/Mi/Gi: 1024s)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        number, prefix, binary = match.groups()
        power = "kmg".index(prefix.lower()) + 1 if prefix else 0
        unit: int = (1024 if binary else 1000) ** power
        return int(number) * unit
    raise _BadValueError(f"expected a size like 64KiB or 1MiB, got {_shown(value)}")


def format_size(size: int) -> str:
    """A byte count in the largest binary unit that holds it exactly, e.g. 65536 -> "64KiB"."""
    for unit, power in (("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if size and size % 1024**power == 0:
            return f"{size // 1024**power}{unit}"
    return str(size)


def _whole(minimum: int, maximum: int | None = None) -> _Parse:
    """A rule for a whole number within bounds."""

    def parse(value: object, origin: _Origin) -> int:
        """A whole number within bounds, or the problem."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise _BadValueError(f"expected a whole number, got {_shown(value)}")
        if maximum is not None and not minimum <= value <= maximum:
            raise _BadValueError(f"must be between {minimum} and {maximum}, got {value}")
        if value < minimum:
            raise _BadValueError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _size(minimum: int, maximum: int | None = None) -> _Parse:
    """A rule for a byte size within bounds."""

    def parse(value: object, origin: _Origin) -> int:
        """A byte size within bounds, or the problem."""
        size = parse_size(value)
        if maximum is not None and not minimum <= size <= maximum:
            raise _BadValueError(
                f"must be between {format_size(minimum)} and {format_size(maximum)}, got {_shown(value)}"
            )
        if size < minimum:
            raise _BadValueError(f"must be at least {format_size(minimum)}, got {_shown(value)}")
        return size

    return parse


def _duration(*, zero_allowed: bool) -> _Parse:
    """A rule for a duration in seconds that is positive, or non-negative when `zero_allowed`."""

    def parse(value: object, origin: _Origin) -> float:
        """A duration in seconds within bounds, or the problem."""
        seconds = parse_duration(value)
        if seconds < 0 or (seconds == 0 and not zero_allowed):
            bound = "must not be negative" if zero_allowed else "must be more than 0"
            raise _BadValueError(f"{bound}, got {_shown(value)}")
        return seconds

    return parse


def _flag(value: object, origin: _Origin) -> bool:
    """A boolean: YAML's true/false/yes/no, and also 1/0 from the environment or the command line."""
    if isinstance(value, bool):
        return value
    if origin.textual and isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _BadValueError(f"expected true or false, got {_shown(value)}")


def _choice(options: tuple[str, ...]) -> _Parse:
    """A rule for one word out of `options`, any case."""

    def parse(value: object, origin: _Origin) -> str:
        """One of the options in lower case, or the problem."""
        if isinstance(value, str) and value.strip().lower() in options:
            return value.strip().lower()
        raise _BadValueError(f"expected one of {', '.join(options)}, got {_shown(value)}")

    return parse


def _host(value: object, origin: _Origin) -> str:
    """A host name or address to listen on: non-empty text without spaces."""
    if not isinstance(value, str) or not value.strip():
        raise _BadValueError(f"expected a host name or address, got {_shown(value)}")
    host = value.strip()
    if any(char.isspace() for char in host):
        raise _BadValueError(f"expected a host name or address, got {_shown(value)}")
    return host


def is_loopback(host: str) -> bool:
    """Whether a host is this machine only: localhost, 127.0.0.0/8 or ::1."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _clean_url_text(value: object, expected: str) -> str:
    """URL text without surrounding blanks, or the problem if it is not text or holds blanks inside."""
    if not isinstance(value, str) or not value.strip():
        raise _BadValueError(f"{expected}, got {_shown(value)}")
    url = value.strip()
    if any(char.isspace() or not char.isprintable() for char in url):
        raise _BadValueError(f"must not contain spaces or control characters, got {_shown(value)}")
    return url


def _upstream_url(value: object, origin: _Origin) -> str:
    """The upstream origin, maybe with a path prefix: https (http to loopback only), no credentials."""
    expected = "expected an https:// URL such as https://api.cryptolens.io"
    url = _clean_url_text(value, expected)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    except ValueError as error:
        raise _BadValueError(f"{expected}, got {_shown(value)} ({error})") from None
    host = parts.hostname
    if parts.scheme not in ("https", "http") or not host:
        raise _BadValueError(f"{expected}, got {_shown(value)}")
    if "@" in parts.netloc:
        raise _BadValueError(f"must not contain a user name or password, got {_shown(value)}")
    if "?" in url or "#" in url:
        raise _BadValueError(f"must not contain a query (?...) or a fragment (#...), got {_shown(value)}")
    if parts.scheme == "http" and not is_loopback(host):
        raise _BadValueError(
            f"must use https:// (http:// only for a loopback host like 127.0.0.1), got {_shown(value)}"
        )
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _proxy(value: object, origin: _Origin) -> str | None:
    """An explicit egress proxy as http(s)://host:port, or None for a direct connection."""
    if value is None:
        return None
    expected = "expected an egress proxy like http://proxy.example:3128"
    url = _clean_url_text(value, expected)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise _BadValueError(f"{expected}, got {_shown(value)} ({error})") from None
    if "@" in parts.netloc:
        raise _BadValueError(f"must not contain a user name or password, got {_shown(value)}")
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or port is None
        or parts.path not in ("", "/")
        or "?" in url
        or "#" in url
    ):
        raise _BadValueError(f"{expected}, got {_shown(value)}")
    return f"{parts.scheme}://{parts.netloc}"


def _resolve(text: str, origin: _Origin) -> Path:
    """A path from settings text: `~` expanded, relative ones taken from the origin's folder."""
    if "\0" in text:
        raise _BadValueError(f"a path must not contain a NUL character, got {_shown(text)}")
    try:
        path = Path(text).expanduser()
    except RuntimeError:
        raise _BadValueError(f"cannot expand '~' in {_shown(text)}") from None
    return path if path.is_absolute() else origin.base / path


def _path(value: object, origin: _Origin) -> Path | None:
    """A file or folder path (not checked, not created), or None when unset."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _BadValueError(f"expected a path, got {_shown(value)}")
    return _resolve(value, origin)


def _as_list(value: object) -> list[object]:
    """A YAML list, or the problem."""
    if not isinstance(value, list):
        raise _BadValueError(f"expected a list like [a, b], got {_shown(value)}")
    return value


def _methods(value: object, origin: _Origin) -> tuple[str, ...]:
    """Allowlisted API methods as lower-case "controller/method", without duplicates."""
    methods: list[str] = []
    for index, item in enumerate(_as_list(value), 1):
        method = item.strip().strip("/").lower() if isinstance(item, str) else ""
        if not _METHOD.fullmatch(method):
            raise _BadValueError(
                f"item {index}: expected an API method like key/activate, got {_shown(item)}"
            )
        if method not in methods:
            methods.append(method)
    return tuple(methods)


def _networks(value: object, origin: _Origin) -> tuple[IPNetwork, ...]:
    """Client networks as CIDRs (a bare address is a one-address network)."""
    networks = []
    for index, item in enumerate(_as_list(value), 1):
        try:
            networks.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise _BadValueError(
                f"item {index}: expected an address or network like 10.0.0.0/8, got {_shown(item)}"
            ) from None
    return tuple(networks)


def _existing_file(value: object, origin: _Origin) -> Path | None:
    """A file that must exist now, or None when unset."""
    path = _path(value, origin)
    if path is not None and not path.is_file():
        raise _BadValueError(f"no such file: {path}")
    return path


def _looks_like_key(text: str) -> bool:
    """Whether text is an inline key (XML or PEM) rather than a file path."""
    return text.startswith(("<", "-----BEGIN"))


def _key_text(value: object, origin: _Origin) -> str:
    """Key text given inline, or read now from the file it names."""
    if not isinstance(value, str) or not value.strip():
        raise _BadValueError(f"expected key text (XML or PEM) or a key file path, got {_shown(value)}")
    text = value.strip()
    if _looks_like_key(text):
        return text
    path = _resolve(text, origin)
    try:
        content = path.read_text(encoding="utf-8-sig").strip()
    except FileNotFoundError:
        raise _BadValueError(f"key file {path} does not exist") from None
    except OSError as error:
        raise _BadValueError(f"cannot read key file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise _BadValueError(
            f"key file {path} is not text; expected an XML <RSAKeyValue> or a PEM key"
        ) from None
    if not _looks_like_key(content):
        raise _BadValueError(f"key file {path} holds neither an XML <RSAKeyValue> nor a PEM key")
    return content


def _public_key(value: object, origin: _Origin) -> str | None:
    """The single `public_key` setting, or None when unset."""
    return None if value is None else _key_text(value, origin)


def _public_keys(value: object, origin: _Origin) -> tuple[str, ...]:
    """The `public_keys` list, each item inline key text or a key file read now."""
    if value is None:
        return ()
    texts: list[str] = []
    for index, item in enumerate(_as_list(value), 1):
        try:
            texts.append(_key_text(item, origin))
        except _BadValueError as problem:
            raise _BadValueError(f"item {index}: {problem}") from None
    return tuple(texts)


# --- the settings ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """Where the daemon listens for workstations' SDK calls."""

    host: str = field(default="127.0.0.1", metadata=_rule(_host, text=True))
    port: int = field(default=8080, metadata=_rule(_whole(0, 65535)))  # 0 = any free port (tests)
    max_body_bytes: int = field(default=64 * 1024, metadata=_rule(_size(1024, MAX_BODY_BYTES)))
    # TLS for workstations: certificate chain and private key (PEM); both or neither
    tls_cert: Path | None = field(default=None, metadata=_rule(_existing_file, text=True))
    tls_key: Path | None = field(default=None, metadata=_rule(_existing_file, text=True))
    # client addresses allowed to connect (CIDRs); empty: everyone who can reach the port
    allow: tuple[IPNetwork, ...] = field(default=(), metadata=_rule(_networks))
    max_connections: int = field(default=4096, metadata=_rule(_whole(1)))
    # a client must finish sending a request's headers within this long
    header_timeout: float = field(default=10.0, metadata=_rule(_duration(zero_allowed=False)))
    # an idle keep-alive connection is closed after this long
    keepalive_timeout: float = field(default=30.0, metadata=_rule(_duration(zero_allowed=False)))


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When to stop calling a failing upstream and how long to wait before trying it again."""

    failures: int = field(default=3, metadata=_rule(_whole(1)))  # consecutive failures that open the breaker
    reset_after: float = field(default=2.0, metadata=_rule(_duration(zero_allowed=False)))
    max_reset_after: float = field(default=60.0, metadata=_rule(_duration(zero_allowed=False)))


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """How many failed upstream calls may be tried once more, so that retries never multiply an outage."""

    # retries allowed, in percent of the upstream calls of the last 10 seconds
    budget_percent: int = field(default=20, metadata=_rule(_whole(0, 100)))
    # retries allowed per second on top of the percentage, so a quiet daemon can retry too
    min_per_second: int = field(default=1, metadata=_rule(_whole(0)))


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """The one upstream origin and how the daemon talks to it."""

    # origin (optionally with a path prefix); the daemon appends /api/<controller>/<method>
    url: str = field(default="https://api.cryptolens.io", metadata=_rule(_upstream_url, text=True))
    timeout: float = field(default=5.0, metadata=_rule(_duration(zero_allowed=False)))  # whole call budget
    connect_timeout: float = field(default=3.0, metadata=_rule(_duration(zero_allowed=False)))
    # explicit egress proxy (http://host:port); the environment's proxy variables are never used
    proxy: str | None = field(default=None, metadata=_rule(_proxy, text=True))
    # extra CA bundle for TLS verification (added to the system store)
    ca_file: Path | None = field(default=None, metadata=_rule(_existing_file, text=True))
    offline: bool = field(default=False, metadata=_rule(_flag))  # never contact upstream
    # lower-case "controller/method", no slashes around
    allowed_methods: tuple[str, ...] = field(default=DEFAULT_ALLOWED_METHODS, metadata=_rule(_methods))
    max_connections: int = field(default=32, metadata=_rule(_whole(1)))
    max_answer_bytes: int = field(default=1024 * 1024, metadata=_rule(_size(1)))
    breaker: BreakerConfig = BreakerConfig()
    retry: RetryConfig = RetryConfig()


@dataclass(frozen=True, slots=True)
class KeepConfig:
    """How long and how many upstream answers the daemon keeps for outages."""

    # how old a kept answer may be when served during an outage
    max_age: float = field(default=7 * 86400.0, metadata=_rule(_duration(zero_allowed=True)))
    # serve kept answers without asking upstream while younger than this (0 = always ask upstream first)
    fresh_for: float = field(default=0.0, metadata=_rule(_duration(zero_allowed=True)))
    # kept answers held in memory; the rest stay on disk
    memory_entries: int = field(default=10_000, metadata=_rule(_whole(0)))


@dataclass(frozen=True, slots=True)
class LogConfig:
    """How much the daemon logs and in which shape."""

    level: str = field(default="info", metadata=_rule(_choice(LOG_LEVELS), text=True))
    # auto: the console renderer on a terminal, JSON otherwise
    format: str = field(default="auto", metadata=_rule(_choice(LOG_FORMATS), text=True))


def _fsync(value: object, origin: _Origin) -> float | None:
    """`always` (0: before each answer), `never` (None: left to the OS), or an interval as a duration."""
    if isinstance(value, str) and value.strip().lower() in ("always", "never"):
        return 0.0 if value.strip().lower() == "always" else None
    try:
        seconds = parse_duration(value)
    except _BadValueError:
        raise _BadValueError(f"expected always, never or a duration like 1s, got {_shown(value)}") from None
    if seconds <= 0:
        raise _BadValueError(f"an interval must be more than 0 (or say always), got {_shown(value)}")
    return seconds


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """Where the audit trail is written, how durably, when it rotates and how long it is kept."""

    # folder of the trail; null: <state_dir>/audit
    path: Path | None = field(default=None, metadata=_rule(_path, text=True))
    # fsync: always (before each answer), never (the OS decides), or at most this long after a write
    fsync: float | None = field(default=1.0, metadata=_rule(_fsync))
    rotate_bytes: int = field(default=64 * 1024 * 1024, metadata=_rule(_size(1024)))
    rotate_daily: bool = field(default=True, metadata=_rule(_flag))
    # files whose records are all older than this are removed; 0 keeps everything
    retention: float = field(default=400 * 86400.0, metadata=_rule(_duration(zero_allowed=True)))
    # when records cannot be written: continue (answer, alarm, retry) or refuse (answer 503)
    on_failure: str = field(default="continue", metadata=_rule(_choice(("continue", "refuse")), text=True))
    # records held in memory while the trail cannot be written (on_failure: continue)
    backlog: int = field(default=100_000, metadata=_rule(_whole(0)))
    # how often the head of the chain is also written to the operational log
    checkpoint_interval: float = field(default=300.0, metadata=_rule(_duration(zero_allowed=False)))


def _label(value: object, origin: _Origin) -> str | None:
    """A short printable name for the audit trail, or None when unset."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _BadValueError(f"expected a short name like it-helpdesk, got {_shown(value)}")
    label = value.strip()
    if len(label) > 64 or not label.isprintable():
        raise _BadValueError(f"expected at most 64 printable characters, got {_shown(value)}")
    return label


SECURE_COOKIE: tuple[str, ...] = ("auto", "true", "false")


def _secure_cookie(value: object, origin: _Origin) -> str:
    """auto, true or false (YAML's booleans too): when the console's login cookie is marked Secure."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.strip().lower() in SECURE_COOKIE:
        return value.strip().lower()
    raise _BadValueError(f"expected one of {', '.join(SECURE_COOKIE)}, got {_shown(value)}")


@dataclass(frozen=True, slots=True)
class AdminListenConfig:
    """Where the admin console listens: never the workstation port, loopback unless told otherwise."""

    host: str = field(default="127.0.0.1", metadata=_rule(_host, text=True))
    port: int = field(default=8081, metadata=_rule(_whole(0, 65535)))  # 0 = any free port (tests)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin console: its listener, the admins' credential and the upstream token it acts with."""

    listen: AdminListenConfig = AdminListenConfig()
    # file holding the admins' token; null: $CREDENTIALS_DIRECTORY/admin-token, else no console
    token_file: Path | None = field(default=None, metadata=_rule(_existing_file, text=True))
    # file holding the upstream access token used for Deactivate and Activate; null:
    # $CREDENTIALS_DIRECTORY/upstream-token, else those actions answer an error
    upstream_token_file: Path | None = field(default=None, metadata=_rule(_existing_file, text=True))
    # who the audit trail names for an admin who gives no name at login (beside address and session)
    label: str | None = field(default=None, metadata=_rule(_label, text=True))
    # a console login lasts this long
    session_lifetime: float = field(default=8 * 3600.0, metadata=_rule(_duration(zero_allowed=False)))
    # machines unseen for this many days are highlighted as idle
    idle_days: int = field(default=30, metadata=_rule(_whole(1, 36500)))
    # mark the login cookie Secure (sent over HTTPS only): auto when the request came over TLS or a proxy
    # says it did (X-Forwarded-Proto or Forwarded: https), or always (true), or never (false)
    secure_cookie: str = field(default="auto", metadata=_rule(_secure_cookie, text=True))


def _database_url(value: object, origin: _Origin) -> str | None:
    """A libpq URL (postgresql://user@host:port/database), or None for the embedded SQLite stores."""
    if value is None:
        return None
    expected = "expected a PostgreSQL URL like postgresql://license@db.example.internal:5432/license_server"
    url = _clean_url_text(value, expected)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    except ValueError as error:
        raise _BadValueError(f"{expected}, got {redact_url(url)} ({error})") from None
    if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
        raise _BadValueError(f"{expected}, got {redact_url(url)}")
    return url


def redact_url(url: str) -> str:
    """A database URL as it may be shown: any password in it replaced by ***."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "(a URL that cannot be read)"
    netloc = parts.netloc
    if password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:  # libpq also takes the password as a parameter: ?password=...
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(name, "***" if name.lower() == "password" else value) for name, value in pairs], safe="*"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _node_name(value: object, origin: _Origin) -> str:
    """How this node is named in the audit trail, /status, metrics and the console."""
    name = _label(value, origin)
    return _host_name() if name is None else name


def _host_name() -> str:
    """This machine's host name, the default name of a node."""
    return (socket.gethostname().strip() or "localhost")[:64]


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """Where several nodes keep their shared state; no URL: the embedded SQLite stores in state_dir."""

    # libpq URL; null: SQLite files in state_dir, one node
    url: str | None = field(default=None, metadata=_rule(_database_url, text=True))
    # file holding the database password; null: $CREDENTIALS_DIRECTORY/database-password, else libpq's own
    # ways (PGPASSFILE, ~/.pgpass, a password in the URL)
    password_file: Path | None = field(default=None, metadata=_rule(_existing_file, text=True))


TIME_LIMITED: tuple[str, ...] = ("none", "all", *(f"f{n}" for n in range(1, 9)))


@dataclass(frozen=True, slots=True)
class ProductConfig:
    """What the daemon cannot see of one product's application: the checks it makes on a license."""

    # SDKs refuse a license signed longer ago than this (signatureExpirationInterval); None: unknown
    signature_expiration: float | None = None
    # which licenses the application refuses after their Expires: none, all, or those with feature f1..f8
    time_limited: str = "none"

    def checks_expiry(self, features: tuple[bool, ...]) -> bool:
        """Whether the application refuses a license with these feature flags once it has expired."""
        if self.time_limited in ("none", "all"):
            return self.time_limited == "all"
        index = int(self.time_limited[1:]) - 1
        return index < len(features) and features[index]


_PRODUCT_KEYS = ("signature_expiration", "time_limited")


def _products(value: object, origin: _Origin) -> tuple[tuple[str, ProductConfig], ...]:
    """Per product id: `signature_expiration` (a duration, or unknown) and `time_limited`."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _BadValueError(f"expected a mapping of product ids to settings, got {_shown(value)}")
    products: list[tuple[str, ProductConfig]] = []
    for raw_id, settings in value.items():
        product = str(raw_id).strip()
        if isinstance(raw_id, bool) or not product.isdigit() or len(product) > 20:
            raise _BadValueError(f"a product id is a number like 3349, got {_shown(raw_id)}")
        try:
            products.append((product, _product(settings or {})))
        except _BadValueError as problem:
            raise _BadValueError(f"product {product}: {problem}") from None
    return tuple(products)


def _product(settings: object) -> ProductConfig:
    """One product's settings."""
    if not isinstance(settings, dict):
        raise _BadValueError(f"expected a mapping of settings, got {_shown(settings)}")
    unknown = sorted(str(key) for key in settings if key not in _PRODUCT_KEYS)
    if unknown:
        raise _BadValueError(f"unknown key {unknown[0]!r}; known: {', '.join(_PRODUCT_KEYS)}")
    expiration: float | None = None
    raw = settings.get("signature_expiration")
    if raw is not None and not (isinstance(raw, str) and raw.strip().lower() == "unknown"):
        try:
            expiration = parse_duration(raw)
        except _BadValueError as problem:
            raise _BadValueError(f"signature_expiration: {problem}, or unknown") from None
        if expiration <= 0:
            raise _BadValueError(f"signature_expiration: must be more than 0, got {_shown(raw)}")
    limited = settings.get("time_limited", "none")
    if not isinstance(limited, str) or limited.strip().lower() not in TIME_LIMITED:
        raise _BadValueError(f"time_limited: expected none, all or f1 to f8, got {_shown(limited)}")
    return ProductConfig(expiration, limited.strip().lower())


def _thresholds(value: object, origin: _Origin) -> tuple[float, ...]:
    """A list of positive durations, longest first."""
    items = value if isinstance(value, list) else [value]
    seconds: list[float] = []
    for item in items:
        found = parse_duration(item)
        if found <= 0:
            raise _BadValueError(f"each must be more than 0, got {_shown(item)}")
        seconds.append(found)
    return tuple(sorted(set(seconds), reverse=True))


@dataclass(frozen=True, slots=True)
class RunwayConfig:
    """How machines near the end of their runway (licensed without upstream until when) are shown."""

    # machines licensed for less than this are highlighted in the console
    highlight: float = field(default=86400.0, metadata=_rule(_duration(zero_allowed=False)))
    # during an upstream outage, a warning is logged as machines come within each of these of lock-out
    warnings: tuple[float, ...] = field(default=(86400.0, 3600.0), metadata=_rule(_thresholds))


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """This daemon among several sharing one database."""

    # its name in the audit trail, /status, metrics and the console; null: the host name
    name: str = field(default_factory=_host_name, metadata=_rule(_node_name, text=True))


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything the daemon is told, checked and resolved; build it with `load_config`."""

    listen: ListenConfig = ListenConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    # key texts (XML or PEM), merged from `public_key` (one) and `public_keys` (list), file references read
    public_keys: tuple[str, ...] = field(default=(), metadata=_rule(_public_keys))
    state_dir: Path = field(metadata=_rule(_path, text=True))
    license_files: Path | None = field(default=None, metadata=_rule(_path, text=True))
    keep: KeepConfig = KeepConfig()
    log: LogConfig = LogConfig()
    audit: AuditConfig = AuditConfig()
    admin: AdminConfig = AdminConfig()
    database: DatabaseConfig = DatabaseConfig()
    node: NodeConfig = NodeConfig()
    # per product id: the checks its application makes that limit a machine's runway (docs/runway.md)
    products: tuple[tuple[str, ProductConfig], ...] = field(default=(), metadata=_rule(_products))
    runway: RunwayConfig = RunwayConfig()
    # on SIGTERM, how long /readyz answers 503 while calls are still answered, so that a load balancer
    # stops sending calls before the listener closes (docs/running-several-nodes.md)
    shutdown_drain: float = field(default=3.0, metadata=_rule(_duration(zero_allowed=True)))
    shutdown_timeout: float = field(default=10.0, metadata=_rule(_duration(zero_allowed=False)))
    # where the settings came from, e.g. "/etc/license-server/config.yaml + environment"
    source: str = "built-in defaults"

    def product(self, product_id: str) -> ProductConfig:
        """The settings of one product: those configured, else the defaults (nothing known)."""
        for product, settings in self.products:
            if product == product_id:
                return settings
        return ProductConfig()

    @property
    def audit_dir(self) -> Path:
        """The folder of the audit trail: audit.path, else <state_dir>/audit."""
        return self.audit.path if self.audit.path is not None else self.state_dir / "audit"


# Settings a running daemon keeps until it restarts, as key paths: a reload leaves each as it is in force and
# names those that changed in its `reloaded` log line. Of the TLS pair only switching TLS on or off needs a
# restart; a renewed certificate is loaded by a reload.
RESTART_ONLY: tuple[str, ...] = (
    "listen.host",
    "listen.port",
    "listen.tls_cert",
    "listen.tls_key",
    "listen.keepalive_timeout",
    "state_dir",
    "database",
    "node",
    "audit",
    "admin",
    "keep.memory_entries",
    "log.format",
    "shutdown_timeout",
)
_ON_OR_OFF = frozenset({"listen.tls_cert", "listen.tls_key"})


def hold_restart_only(in_force: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with every RESTART_ONLY setting as it is in force, and the names of those `new` would change."""
    held = new
    changed: list[str] = []
    for name in RESTART_ONLY:
        path = tuple(name.split("."))
        before, after = _value_at(in_force, path), _value_at(new, path)
        if ((before is None) != (after is None)) if name in _ON_OR_OFF else before != after:
            changed.append(name)
            held = _replaced_at(held, path, before)
    return held, changed


def _value_at(settings: object, path: KeyPath) -> object:
    """The value at a key path of a settings dataclass."""
    for key in path:
        settings = getattr(settings, key)
    return settings


def _replaced_at(settings: Any, path: KeyPath, value: object) -> Any:
    """A copy of a settings dataclass with the value at a key path replaced."""
    head, rest = path[0], path[1:]
    return replace(settings, **{head: _replaced_at(getattr(settings, head), rest, value) if rest else value})


# --- loading --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Schema:
    """Every settable key path with its rule, and the key paths that are sections."""

    leaves: Mapping[KeyPath, _Rule]
    sections: frozenset[KeyPath]

    def siblings(self, path: KeyPath) -> list[str]:
        """Names of the keys and sections that sit beside `path`."""
        parent = path[:-1]
        return [key[-1] for key in (*self.leaves, *self.sections) if key[:-1] == parent]


@dataclass(frozen=True, slots=True)
class _Setting:
    """One raw value for one key path, with where it came from."""

    path: KeyPath
    value: object
    origin: _Origin


def _schema() -> _Schema:
    """The key paths read from the dataclasses' fields, plus `public_key`, which feeds `public_keys`."""
    leaves: dict[KeyPath, _Rule] = {("public_key",): _Rule(_public_key, text=True)}
    sections: set[KeyPath] = set()

    def walk(cls: type[Any], prefix: KeyPath) -> None:
        """Record the settings and sections of one dataclass."""
        for item in fields(cls):
            path = (*prefix, item.name)
            if is_dataclass(item.default):
                sections.add(path)
                walk(type(item.default), path)
            elif _RULE in item.metadata:
                leaves[path] = item.metadata[_RULE]

    walk(Config, ())
    return _Schema(leaves, frozenset(sections))


def _dotted(path: KeyPath) -> str:
    """A key path as the user writes it, e.g. upstream.breaker.failures."""
    return ".".join(path)


def _env_name(path: KeyPath) -> str:
    """The environment variable that sets a key path."""
    return ENV_PREFIX + "__".join(path).upper()


def _unknown_key(path: KeyPath, schema: _Schema) -> str:
    """The message for a key that is not a setting, with the nearest known key beside it if one is close."""
    close = difflib.get_close_matches(path[-1], schema.siblings(path), n=1)
    hint = f"; did you mean '{_dotted((*path[:-1], close[0]))}'?" if close else ""
    return f"unknown key '{_dotted(path)}'{hint}"


def _at(file_name: str, node: Node) -> str:
    """file:line of a YAML node."""
    mark = node.start_mark
    return f"{file_name}:{mark.line + 1}" if mark is not None else file_name


@dataclass(frozen=True, slots=True)
class _FileReader:
    """Walks a composed YAML document, so unknown or duplicate keys are caught; values keep their lines."""

    loader: yaml.SafeLoader
    file_name: str
    base: Path
    schema: _Schema

    def section(self, node: Node, prefix: KeyPath, settings: list[_Setting]) -> None:
        """Collect the settings of one mapping (an empty value counts as an empty mapping)."""
        if isinstance(node, ScalarNode) and self.loader.construct_object(node) is None:
            return
        if not isinstance(node, MappingNode):
            got = _shown(self.loader.construct_object(node, deep=True))
            where = _at(self.file_name, node)
            if prefix:
                key = _dotted(prefix)
                raise ConfigError(f"{where}: {key}: expected a mapping of settings, got {got}", key=key)
            raise ConfigError(f"{where}: expected a mapping of settings, got {got}")
        self.loader.flatten_mapping(node)  # resolves YAML merge keys (<<)
        seen: set[KeyPath] = set()
        for key_node, value_node in node.value:
            key = self.loader.construct_object(key_node)
            where = _at(self.file_name, key_node)
            if not isinstance(key, str):
                raise ConfigError(
                    f"{where}: setting names must be text, got {_shown(key)}", key=_dotted(prefix)
                )
            path = (*prefix, key)
            if path in seen:
                raise ConfigError(f"{where}: duplicate key '{_dotted(path)}'", key=_dotted(path))
            seen.add(path)
            if path in self.schema.sections:
                self.section(value_node, path, settings)
            elif path in self.schema.leaves:
                value = self.loader.construct_object(value_node, deep=True)
                origin = _Origin(_at(self.file_name, value_node), self.base, textual=False)
                settings.append(_Setting(path, value, origin))
            else:
                raise ConfigError(f"{where}: {_unknown_key(path, self.schema)}", key=_dotted(path))


def _read_file(path: Path, schema: _Schema) -> list[_Setting]:
    """The settings in a YAML file, each with its line; a missing, unreadable or invalid file is an error."""
    file_name = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{file_name}: config file not found") from None
    except OSError as error:
        raise ConfigError(f"{file_name}: cannot read config file: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{file_name}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    loader = yaml.SafeLoader(text)
    settings: list[_Setting] = []
    try:
        root = loader.get_single_node()
        if root is not None:
            _FileReader(loader, file_name, path.absolute().parent, schema).section(root, (), settings)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{file_name}:{mark.line + 1}" if mark is not None else file_name
        raise ConfigError(f"{where}: invalid YAML: {error.problem or error.context or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{file_name}: invalid YAML: {error}") from None
    finally:
        loader.dispose()
    return settings


def _from_text(raw: str, rule: _Rule) -> object:
    """A value from the environment or the command line: verbatim text, or YAML, or plain text if not YAML."""
    if rule.text:
        return None if raw.strip() in _YAML_NULLS else raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _read_env(env: Mapping[str, str], schema: _Schema, cwd: Path) -> list[_Setting]:
    """The settings in LICENSE_SERVER_* variables; an unknown one is an error naming the variable."""
    settings: list[_Setting] = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_PATH_VARIABLE:
            continue
        path = tuple(name.removeprefix(ENV_PREFIX).lower().split("__"))
        if path in schema.leaves:
            origin = _Origin(f"environment variable {name}", cwd, textual=True)
            settings.append(_Setting(path, _from_text(env[name], schema.leaves[path]), origin))
        elif path in schema.sections:
            example = _env_name(next(key for key in schema.leaves if key[: len(path)] == path))
            raise ConfigError(
                f"environment variable {name} names the section '{_dotted(path)}'; "
                f"set its keys one by one, e.g. {example}",
                key=_dotted(path),
            )
        else:
            known = [_env_name(key) for key in schema.leaves]
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown environment variable {name} (no key '{_dotted(path)}'){hint}")
    return settings


def _read_overrides(overrides: Sequence[str], schema: _Schema, cwd: Path) -> list[_Setting]:
    """The settings given as "key.path=value" on the command line (--set)."""
    settings: list[_Setting] = []
    for item in overrides:
        key, equals, raw = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. listen.port=9000")
        path = tuple(key.split("."))
        if path in schema.leaves:
            settings.append(
                _Setting(path, _from_text(raw, schema.leaves[path]), _Origin("--set", cwd, textual=True))
            )
        elif path in schema.sections:
            raise ConfigError(
                f"--set: '{key}' is a section; set its keys one by one, e.g. {key}.<name>=value", key=key
            )
        else:
            raise ConfigError(f"--set: {_unknown_key(path, schema)}", key=key)
    return settings


def _convert(setting: _Setting, rule: _Rule) -> object:
    """The typed value of one raw setting, or a ConfigError naming its key path and origin."""
    try:
        return rule.parse(setting.value, setting.origin)
    except _BadValueError as problem:
        key = _dotted(setting.path)
        raise ConfigError(f"{setting.origin.where}: {key}: {problem}", key=key) from None


def _build(cls: type[Any], values: Mapping[KeyPath, object], prefix: KeyPath) -> Any:
    """One settings dataclass from the typed values given for its key paths; defaults fill the rest."""
    kwargs: dict[str, Any] = {}
    for item in fields(cls):
        path = (*prefix, item.name)
        if is_dataclass(item.default):
            kwargs[item.name] = _build(type(item.default), values, path)
        elif path in values:
            kwargs[item.name] = values[path]
    return cls(**kwargs)


def default_state_dir(env: Mapping[str, str]) -> Path:
    """Where state lives unless set: $STATE_DIRECTORY (systemd), else $XDG_STATE_HOME, else ~/.local/state."""
    first = env.get("STATE_DIRECTORY", "").split(":")[0]
    if first and Path(first).is_absolute():
        return Path(first)
    xdg = env.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "license-server"
    home = env.get("HOME", "")
    try:
        home_path = Path(home) if Path(home).is_absolute() else Path.home()
    except RuntimeError:
        raise ConfigError(
            "state_dir: not set, and there is no home folder to default to", key="state_dir"
        ) from None
    return home_path / ".local" / "state" / "license-server"


def load_config(
    path: Path | None = None, *, env: Mapping[str, str] | None = None, overrides: Sequence[str] = ()
) -> Config:
    """The checked settings from a YAML file, LICENSE_SERVER_* variables and --set overrides (later ones win).

    Key files named by `public_key`/`public_keys` are read here, so call it off the event loop.
    """
    environ = os.environ if env is None else env
    schema = _schema()
    cwd = Path.cwd()
    from_file = _read_file(path, schema) if path is not None else []
    from_env = _read_env(environ, schema, cwd)
    from_cli = _read_overrides(overrides, schema, cwd)
    values: dict[KeyPath, object] = {}
    for setting in (*from_file, *from_env, *from_cli):  # every layer is checked, even where a later one wins
        values[setting.path] = _convert(setting, schema.leaves[setting.path])

    single = values.pop(("public_key",), None)
    listed = values.get(("public_keys",), ())
    keys = ([single] if isinstance(single, str) else []) + (list(listed) if isinstance(listed, tuple) else [])
    values[("public_keys",)] = tuple(dict.fromkeys(keys))  # in order, each key once
    if values.get(("state_dir",)) is None:
        values[("state_dir",)] = default_state_dir(environ)
    sources = [str(path.absolute())] if path is not None else ["built-in defaults"]
    sources += ["environment"] if from_env else []
    sources += ["command line"] if from_cli else []
    values[("source",)] = " + ".join(sources)

    config: Config = _build(Config, values, ())
    if (config.listen.tls_cert is None) != (config.listen.tls_key is None):
        missing = "listen.tls_key" if config.listen.tls_key is None else "listen.tls_cert"
        raise ConfigError(f"{missing}: TLS needs both listen.tls_cert and listen.tls_key", key=missing)
    if config.admin.listen.port != 0 and config.admin.listen.port == config.listen.port:
        raise ConfigError(
            f"admin.listen.port: the admin console never shares the workstation port {config.listen.port};"
            " choose another port",
            key="admin.listen.port",
        )
    breaker = config.upstream.breaker
    if breaker.max_reset_after < breaker.reset_after:
        raise ConfigError(
            f"upstream.breaker.max_reset_after: must be at least upstream.breaker.reset_after "
            f"({format_duration(breaker.reset_after)}), got {format_duration(breaker.max_reset_after)}",
            key="upstream.breaker.max_reset_after",
        )
    return config


def _summary(settings: Any) -> dict[str, object]:
    """A settings dataclass as JSON-able values: paths as text, tuples as lists, sections as objects."""
    summary: dict[str, object] = {}
    for item in fields(settings):
        value = getattr(settings, item.name)
        if is_dataclass(value):
            value = _summary(value)
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = [item if isinstance(item, str | int | float) else str(item) for item in value]
        summary[item.name] = value
    return summary


def describe(config: Config) -> dict[str, object]:
    """A JSON-able summary of the settings for the start-up log: public keys only counted, nothing secret."""
    summary = _summary(config)
    summary["public_keys"] = len(config.public_keys)
    if config.database.url is not None:
        summary["database"] = {**_summary(config.database), "url": redact_url(config.database.url)}
    return summary
