"""Cryptolens request and answer shapes: path normalisation, fields, cache keys, the daemon's own errors."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from license_server.storage.seats import License

MAX_FIELDS = 64

# The longest value, in characters, of each field the daemon keeps in its ledger, kept answers and audit
# trail; longer ones are refused, so made-up values cannot grow them without bound. Far above what the SDKs
# send (a product id is a number, keys are 23 characters, every SDK's machine code is a 64-character SHA-256,
# a friendly name is a machine or user name); the admin console takes keys, machine codes and friendly names
# as long, so it can act on every machine the ledger records.
FIELD_LIMITS = (
    ("productid", "ProductId", 20),
    ("key", "Key", 200),
    ("machinecode", "MachineCode", 1000),
    ("friendlyname", "FriendlyName", 200),
)

# Fields that say who is asking or describe the client, not what the answer contains.
_FIELDS_NOT_IN_KEY = frozenset({"token", "friendlyname", "osinfo"})
_TRUE = frozenset({"true", "1"})
_BOOLEANS = frozenset({"true", "false"})


class Kind(Enum):
    """What the daemon does with a call beyond forwarding it."""

    ACTIVATE = "key/activate"
    GETKEY = "key/getkey"
    DEACTIVATE = "key/deactivate"
    OTHER = "other"


_KINDS = {kind.value: kind for kind in Kind if kind is not Kind.OTHER}


class RequestError(Exception):
    """A workstation request the daemon refuses, with the HTTP status and message to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def normalise_path(path: str) -> str | None:
    """Return `controller/method` for an `/api/...` path in any SDK's spelling, or None when it is not one."""
    parts = [part for part in path.split("/") if part]
    if len(parts) != 3 or parts[0].lower() != "api":
        return None
    controller, method = parts[1].lower(), parts[2].lower()
    if not (controller.isascii() and controller.isalnum() and method.isascii() and method.isalnum()):
        return None
    return f"{controller}/{method}"


def parse_fields(*sources: str) -> dict[str, str]:
    """Parse url-encoded form and query strings into one dict with lower-cased field names.

    A field named twice (in any case, in either source) is refused: the daemon and the upstream
    service must never disagree on which value counts. So are the control characters that separate
    fields in a cache key: no Cryptolens field holds them, and a value with them could pose as two fields.
    """
    fields: dict[str, str] = {}
    for source in sources:
        if not source:
            continue
        try:
            pairs = form_pairs(source)
        except ValueError as exc:
            raise RequestError(400, "The request is not a valid url-encoded form.") from exc
        decoded = "%" in source
        for name, value in pairs:
            if decoded and ("\x00" in name or "\x01" in name or "\x00" in value or "\x01" in value):
                raise RequestError(400, "A field holds a NUL or SOH character.")
            lowered = name.lower()
            if lowered in fields:
                raise RequestError(400, f"The field '{name}' is given more than once.")
            fields[lowered] = value
        if not decoded and ("\x00" in source or "\x01" in source):
            raise RequestError(400, "A field holds a NUL or SOH character.")
    return fields


def form_pairs(source: str) -> list[tuple[str, str]]:
    """The (name, value) pairs of a url-encoded form; ValueError for a malformed one.

    The same result as `parse_qsl(source, keep_blank_values=True, strict_parsing=True, errors="strict",
    max_num_fields=MAX_FIELDS)` (a property test holds them together) at a third of its cost: fields
    without `%` or `+`, the common case, are taken as they are.
    """
    if source.count("&") >= MAX_FIELDS:
        raise ValueError("too many fields")
    pairs = []
    for item in source.split("&"):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad field: {item[:40]!r}")
        if "%" in name or "+" in name:
            name = unquote_plus(name, errors="strict")
        if "%" in value or "+" in value:
            value = unquote_plus(value, errors="strict")
        pairs.append((name, value))
    return pairs


def flag(fields: dict[str, str], name: str) -> bool:
    """Read a boolean form field the way the upstream service does (True/true/1)."""
    return fields.get(name, "").strip().lower() in _TRUE


def int_field(fields: dict[str, str], name: str) -> int:
    """Read an integer form field, 0 when absent or not a number."""
    try:
        return int(fields.get(name, "0").strip() or "0")
    except ValueError:
        return 0


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x on the hot path; never changed
class Call:
    """One workstation call as the daemon understands it."""

    method: str  # normalised "controller/method"
    kind: Kind
    fields: dict[str, str]
    product_id: str
    license_key: str
    machine_code: str
    floating_interval: int
    max_overdraft: int

    @classmethod
    def from_fields(cls, method: str, fields: dict[str, str]) -> Call:
        """Build a call from its normalised method and parsed fields; RequestError for an overlong value."""
        for name, label, limit in FIELD_LIMITS:
            if len(value := fields.get(name, "")) > limit:
                raise RequestError(
                    400,
                    f"The field '{label}' is {len(value)} characters long; this license server accepts"
                    f" at most {limit}.",
                )
        return cls(
            method=method,
            kind=_KINDS.get(method, Kind.OTHER),
            fields=fields,
            product_id=fields.get("productid", "").strip(),
            license_key=fields.get("key", "").strip(),
            machine_code=fields.get("machinecode", ""),
            floating_interval=int_field(fields, "floatingtimeinterval"),
            max_overdraft=int_field(fields, "maxoverdraft"),
        )

    @property
    def license(self) -> License:
        """(product id, upper-cased license key): how the daemon names a license."""
        return (self.product_id, self.license_key.upper())

    @property
    def friendly_name(self) -> str:
        """The machine's friendly name; the Python SDK sends an unset one as the text "None"."""
        name = self.fields.get("friendlyname", "")
        return "" if name == "None" else name

    @property
    def keepable(self) -> bool:
        """Whether the answer to this call is a signed license the daemon may keep."""
        return self.kind in (Kind.ACTIVATE, Kind.GETKEY) and bool(self.license_key)

    def cache_key(self, fingerprints: TokenFingerprints) -> bytes:
        """Digest naming the answer: method, every answer-shaping field, and a keyed token fingerprint."""
        # Values go in exactly as sent (only a boolean's case is folded), never trimmed: the answer is matched
        # against the machine code as sent, and "m1" and "m1<TAB>" are two machines that must never share
        # (or drop each other's) kept answer; so are " 3349" and "3349", which upstream may read differently.
        fields = self.fields
        parts = []
        for name in sorted(fields):
            if name in _FIELDS_NOT_IN_KEY:
                continue
            value = fields[name]
            if len(value) in (4, 5) and value.lower() in _BOOLEANS:
                value = value.lower()
            parts.append(f"\x00{name}\x01{value}")
        text = "".join(parts).encode()
        return hashlib.sha256(self.method.encode() + fingerprints(fields.get("token", "")) + text).digest()


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x on the hot path; never changed
class Forward:
    """A call as it goes upstream: exactly what the workstation sent, to the one origin configured."""

    method: str  # normalised "controller/method"
    http_method: str  # GET or POST
    body: bytes  # a POST's form as sent; empty for a GET
    raw_query: str  # the query string as sent
    content_type: str | None  # the body's, when there is one


def token_fingerprint(secret: bytes, token: str) -> bytes:
    """Keyed fingerprint of an access token: lets the daemon tell tokens apart without keeping them."""
    return hmac.new(secret, token.encode(), hashlib.sha256).digest()[:16]


class TokenFingerprints:
    """Keyed token fingerprints, remembered in memory for the handful of tokens a site's software uses."""

    __slots__ = ("_known", "_remember", "_secret")

    def __init__(self, secret: bytes, remember: int = 1024) -> None:
        self._secret = secret
        self._remember = remember
        self._known: dict[str, bytes] = {}

    def __call__(self, token: str) -> bytes:
        """The fingerprint of `token`."""
        fingerprint = self._known.get(token)
        if fingerprint is None:
            if len(self._known) >= self._remember:  # a flood of made-up tokens must not grow memory
                self._known.clear()
            fingerprint = self._known[token] = token_fingerprint(self._secret, token)
        return fingerprint


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x on the hot path; never changed
class Answer:
    """An upstream answer's outline: its `result`, `message` and the parsed object."""

    result: int
    message: str
    obj: dict[str, Any]


def parse_answer(body: bytes) -> Answer | None:
    """Read a Cryptolens JSON answer; None when it is not one (HTML page, garbage, no integer result)."""
    try:
        obj = orjson.loads(body)
    except ValueError:  # orjson.JSONDecodeError: not JSON, not UTF-8, or nested too deeply
        return None
    if not isinstance(obj, dict):
        return None
    lowered = {str(name).lower(): value for name, value in obj.items()}
    result = lowered.get("result")
    if not isinstance(result, int) or isinstance(result, bool):
        return None
    message = lowered.get("message")
    return Answer(result=result, message=message if isinstance(message, str) else "", obj=obj)


def error_body(message: str) -> bytes:
    """The JSON body of an answer the daemon writes itself; every SDK parses this shape."""
    return json.dumps({"result": 1, "message": message}).encode()


def error_response(status: int, message: str, *, source: str = "daemon") -> web.Response:
    """A JSON error answer written by the daemon itself."""
    return web.Response(
        status=status,
        body=error_body(message),
        content_type="application/json",
        headers={"X-License-Server-Source": source},
    )
