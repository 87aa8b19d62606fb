"""Console logins in the shared database, so that a login on one node is valid on every node.

Rows are keyed by a SHA-256 of the session id, never the id: whoever reads the table (a backup, a replica)
cannot log in with what it finds. Expiry is judged by the database's clock, so nodes whose clocks differ
agree on when a login ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg

from license_server.storage.postgres import Database, DatabaseError

_WAIT = 5.0  # seconds a console request waits for a pooled connection before it is answered 503


@dataclass(frozen=True, slots=True)
class StoredSession:
    """One login's row: its CSRF token, who logged in, from where, and until when (database clock)."""

    csrf: str = field(repr=False)
    who: str
    client: str
    expires: float


class PgSessionTable:
    """The `console_sessions` table: add, look up and remove logins by the hash of their id."""

    def __init__(self, database: Database, max_rows: int) -> None:
        self._database = database
        self._max_rows = max_rows

    async def add(self, sid_hash: bytes, row: StoredSession, lifetime: float) -> float:
        """Store a new login lasting `lifetime` seconds from now; returns when it expires.

        Expired rows are deleted first (logins are rare, so this is "now and then"), then the oldest beyond
        the cap. Two nodes adding at the same moment may each leave the cap reached, never much more.
        """
        try:
            async with self._database.pool.connection(timeout=_WAIT) as conn, conn.transaction():
                await conn.execute("DELETE FROM console_sessions WHERE expires <= extract(epoch FROM now())")
                # Every login lasts as long, so the one that expires first is the oldest.
                await conn.execute(
                    "DELETE FROM console_sessions WHERE sid_hash IN (SELECT sid_hash FROM console_sessions"
                    " ORDER BY expires DESC OFFSET %s)",
                    (max(self._max_rows - 1, 0),),
                )
                cursor = await conn.execute(
                    "INSERT INTO console_sessions (sid_hash, csrf, who, client, expires)"
                    " VALUES (%s, %s, %s, %s, extract(epoch FROM now()) + %s) RETURNING expires",
                    (sid_hash, row.csrf, row.who, row.client, lifetime),
                )
                added = await cursor.fetchone()
        except psycopg.Error as exc:
            raise _unavailable(exc) from None
        assert added is not None
        return float(added[0])

    async def get(self, sid_hash: bytes) -> StoredSession | None:
        """The login with this id hash, or None when there is none or it has expired."""
        try:
            async with self._database.pool.connection(timeout=_WAIT) as conn:
                cursor = await conn.execute(
                    "SELECT csrf, who, client, expires FROM console_sessions"
                    " WHERE sid_hash = %s AND expires > extract(epoch FROM now())",
                    (sid_hash,),
                )
                found = await cursor.fetchone()
        except psycopg.Error as exc:
            raise _unavailable(exc) from None
        return None if found is None else StoredSession(found[0], found[1], found[2], float(found[3]))

    async def remove(self, sid_hash: bytes) -> None:
        """End a login on every node."""
        try:
            async with self._database.pool.connection(timeout=_WAIT) as conn:
                await conn.execute("DELETE FROM console_sessions WHERE sid_hash = %s", (sid_hash,))
        except psycopg.Error as exc:
            raise _unavailable(exc) from None


def _unavailable(exc: psycopg.Error) -> DatabaseError:
    """The error a console request answers 503 with; libpq's first line never holds the password."""
    lines = str(exc).strip().splitlines()
    reason = lines[0] if lines else exc.__class__.__name__
    return DatabaseError(f"the database that holds the console's logins did not answer: {reason}")
