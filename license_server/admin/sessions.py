"""Console logins: a random session id in a cookie, its CSRF token, and who it belongs to.

Two kinds behind one interface: in this process (one node; the cookie is signed with a key random per
process, so a restart logs everyone out), or in the shared database (several nodes; a login on one is valid
on all, and a logout on one ends it on all).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from license_server.storage.pg_sessions import PgSessionTable, StoredSession

COOKIE = "license_server_admin"
MAX_SESSIONS = 1000  # past this the oldest login ends: a cap on memory, far above any team of admins
_SID_BYTES = 24  # random bytes of a session id: 192 bits, never guessed
_MAX_COOKIE = 64  # longer than any cookie this console sets: not worth a database round trip


@dataclass(slots=True)
class Session:
    """One login: its id (the cookie's secret part), CSRF token, who logged in, from where, until when."""

    sid: str = field(repr=False)
    csrf: str = field(repr=False)
    who: str
    client: str
    expires: float

    @property
    def ref(self) -> str:
        """A short name for the session in the audit trail; the id itself would be a credential there."""
        return hashlib.sha256(self.sid.encode()).hexdigest()[:12]


class Sessions(Protocol):
    """Where the console keeps its logins."""

    async def create(self, who: str, client: str) -> tuple[Session, str]:
        """Start a login; returns the session and the cookie value that names it."""
        ...

    async def find(self, cookie: str | None) -> Session | None:
        """The live session a cookie names, or None for a missing, forged or expired one."""
        ...

    async def end(self, session: Session) -> None:
        """Log out."""
        ...


def csrf_ok(session: Session, given: str | None) -> bool:
    """Whether a form or header carries this session's CSRF token (constant-time comparison)."""
    return given is not None and hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), session.csrf.encode()
    )


class MemorySessions:
    """The live logins of this process; the signing key is random per process, so a restart logs all out."""

    def __init__(self, lifetime: float, clock: Callable[[], float] = time.time) -> None:
        self._key = secrets.token_bytes(32)
        self._lifetime = lifetime
        self._clock = clock
        self._live: dict[str, Session] = {}

    async def create(self, who: str, client: str) -> tuple[Session, str]:
        """Start a login; returns the session and the cookie value that names it."""
        now = self._clock()
        for sid in [sid for sid, session in self._live.items() if session.expires <= now]:
            del self._live[sid]
        while len(self._live) >= MAX_SESSIONS:
            del self._live[next(iter(self._live))]
        sid = secrets.token_urlsafe(_SID_BYTES)
        session = Session(sid, secrets.token_urlsafe(32), who, client, now + self._lifetime)
        self._live[sid] = session
        return session, f"{sid}.{self._sign(sid)}"

    async def find(self, cookie: str | None) -> Session | None:
        """The live session a cookie names, or None for a missing, forged or expired one."""
        if not cookie:
            return None
        sid, _, signature = cookie.partition(".")
        if not hmac.compare_digest(signature.encode(), self._sign(sid).encode()):
            return None
        session = self._live.get(sid)
        if session is None or session.expires <= self._clock():
            return None
        return session

    async def end(self, session: Session) -> None:
        """Log out."""
        self._live.pop(session.sid, None)

    def _sign(self, sid: str) -> str:
        """The cookie signature of a session id."""
        digest = hmac.new(self._key, sid.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")


class SharedSessions:
    """Logins in the shared database: valid on every node, ended on every node by one logout.

    The cookie is the session id alone, unsigned: it is 192 random bits, checked against the SHA-256 the
    database keeps, so a signature would add no protection, and a signing key shared by the nodes would be
    one more secret to keep in the database. Expiry is the database's clock, not this node's.
    """

    def __init__(self, table: PgSessionTable, lifetime: float) -> None:
        self._table = table
        self._lifetime = lifetime

    async def create(self, who: str, client: str) -> tuple[Session, str]:
        """Start a login on every node; returns the session and the cookie value that names it."""
        sid = secrets.token_urlsafe(_SID_BYTES)
        row = StoredSession(secrets.token_urlsafe(32), who, client, 0.0)
        expires = await self._table.add(_hash(sid), row, self._lifetime)
        return Session(sid, row.csrf, who, client, expires), sid

    async def find(self, cookie: str | None) -> Session | None:
        """The live session a cookie names, or None for a missing, unknown or expired one."""
        if not cookie or len(cookie) > _MAX_COOKIE:
            return None
        row = await self._table.get(_hash(cookie))
        return None if row is None else Session(cookie, row.csrf, row.who, row.client, row.expires)

    async def end(self, session: Session) -> None:
        """Log out on every node."""
        await self._table.remove(_hash(session.sid))


def _hash(sid: str) -> bytes:
    """What the database keeps of a session id: its SHA-256, from which the id cannot be had back."""
    return hashlib.sha256(sid.encode("utf-8", "surrogatepass")).digest()
