"""Console logins: a random session id in a signed cookie, its CSRF token, and who it belongs to."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

COOKIE = "license_server_admin"
MAX_SESSIONS = 1000  # past this the oldest login ends: a cap on memory, far above any team of admins


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


class Sessions:
    """The live logins of this process; the signing key is random per process, so a restart logs all out."""

    def __init__(self, lifetime: float, clock: Callable[[], float] = time.time) -> None:
        self._key = secrets.token_bytes(32)
        self._lifetime = lifetime
        self._clock = clock
        self._live: dict[str, Session] = {}

    def create(self, who: str, client: str) -> tuple[Session, str]:
        """Start a login; returns the session and the cookie value that names it."""
        now = self._clock()
        for sid in [sid for sid, session in self._live.items() if session.expires <= now]:
            del self._live[sid]
        while len(self._live) >= MAX_SESSIONS:
            del self._live[next(iter(self._live))]
        sid = secrets.token_urlsafe(24)
        session = Session(sid, secrets.token_urlsafe(32), who, client, now + self._lifetime)
        self._live[sid] = session
        return session, f"{sid}.{self._sign(sid)}"

    def find(self, cookie: str | None) -> Session | None:
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

    def end(self, session: Session) -> None:
        """Log out."""
        self._live.pop(session.sid, None)

    @staticmethod
    def csrf_ok(session: Session, given: str | None) -> bool:
        """Whether a form or header carries this session's CSRF token (constant-time comparison)."""
        return given is not None and hmac.compare_digest(
            given.encode("utf-8", "surrogatepass"), session.csrf.encode()
        )

    def _sign(self, sid: str) -> str:
        """The cookie signature of a session id."""
        digest = hmac.new(self._key, sid.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")
