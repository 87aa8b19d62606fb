"""Durable store of kept answers: SQLite in `state_dir`, written in group commits off the event loop."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import structlog

from license_server.storage.seats import License
from license_server.storage.sqlite import SqliteWorker

if TYPE_CHECKING:
    from license_server.storage.interfaces import Forgotten

log = structlog.get_logger(__name__)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    cache_key    BLOB PRIMARY KEY,
    method       TEXT NOT NULL,
    product_id   TEXT NOT NULL,
    license_key  TEXT NOT NULL,
    machine_code TEXT NOT NULL,
    fetched_at   REAL NOT NULL,
    -- Before the body, so that reading them does not read the body's overflow pages (a file made before
    -- facts were kept has them added last, and is read more slowly).
    digest       BLOB NOT NULL,
    facts        TEXT,              -- an Activate answer's runway facts (signatures.runway_facts)
    body         BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS answers_license ON answers (product_id, license_key, machine_code);
-- How many answers are kept, counted by the database itself in the same transactions as the rows, so
-- that the figure monitoring shows is exact; set again from the rows at every start.
CREATE TABLE IF NOT EXISTS answer_count (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n  INTEGER NOT NULL
);
INSERT OR IGNORE INTO answer_count VALUES (1, 0);
CREATE TRIGGER IF NOT EXISTS answers_counted_in AFTER INSERT ON answers
    BEGIN UPDATE answer_count SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS answers_counted_out AFTER DELETE ON answers
    BEGIN UPDATE answer_count SET n = n - 1; END;
"""


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x on the hot path; never changed
class Kept:
    """A verified upstream answer the daemon keeps for outages."""

    cache_key: bytes
    method: str
    product_id: str
    license_key: str  # upper-cased: license keys compare without case
    machine_code: str  # "" for GetKey answers
    fetched_at: float  # unix time the upstream answer arrived
    body: bytes
    facts: str | None = None  # an Activate answer's runway facts (signatures.runway_facts), else None

    @property
    def license(self) -> License:
        """The (product, key) this answer is about."""
        return (self.product_id, self.license_key)


class Store:
    """SQLite-backed kept answers; reads see writes still queued."""

    def __init__(self, path: Path) -> None:
        self._db = SqliteWorker(path, _SCHEMA, _upgrade)
        self._pending: dict[bytes, Kept] = {}
        self._kept = 0  # set on the worker thread, from the count the database keeps

    async def open(self) -> int:
        """Open (or create, or set aside a corrupt) database; returns the number of kept answers."""
        await self._db.open()
        await self._db.run(self._recount)
        return self._kept

    @property
    def kept(self) -> int:
        """How many answers are kept on disk, exact as of the last committed (or committing) write."""
        return self._kept

    def on_forget(self, heard: Callable[[Forgotten], None]) -> None:
        """Nothing to hear: no other node shares this store."""

    def _recount(self, db: sqlite3.Connection) -> None:
        """Set the database's count from its rows (an older version may have written without counting)."""
        with db:
            db.execute("UPDATE answer_count SET n = (SELECT count(*) FROM answers)")
        self._read_count(db)

    def _read_count(self, db: sqlite3.Connection) -> None:
        """Take the count the database keeps (on the worker thread, right after a change)."""
        self._kept = int(db.execute("SELECT n FROM answer_count").fetchone()[0])

    def put(self, kept: Kept) -> asyncio.Future[None]:
        """Queue an answer for writing; the future is done once it is committed (or the write failed)."""
        self._pending[kept.cache_key] = kept
        done = self._db.write(self._counting(lambda db: _put(db, kept)))
        done.add_done_callback(lambda _: self._landed(kept))
        return done

    def _landed(self, kept: Kept) -> None:
        if self._pending.get(kept.cache_key) is kept:
            del self._pending[kept.cache_key]

    async def get(self, cache_key: bytes) -> Kept | None:
        """The kept answer for a cache key, or None; a row whose digest does not match is dropped."""
        if (pending := self._pending.get(cache_key)) is not None:
            return pending
        return await self._db.run(lambda db: _get(db, cache_key, self._read_count))

    def _counting(self, fn: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
        """`fn`, followed by taking the count it may have changed."""

        def counted(db: sqlite3.Connection) -> T:
            result = fn(db)
            self._read_count(db)
            return result

        return counted

    async def forget(self, product_id: str, license_key: str) -> int:
        """Drop the kept answers of a license; returns how many rows went."""
        for key in [k for k, v in self._pending.items() if v.license == (product_id, license_key)]:
            del self._pending[key]
        self._db.submit()  # queued writes land first, so a forget is never undone by them
        return await self._db.run(self._counting(lambda db: _forget(db, product_id, license_key)))

    async def forget_machine(
        self, product_id: str, license_key: str, machine_code: str, lists: Callable[[bytes], bool]
    ) -> int:
        """Drop a machine's kept answers and the license's kept GetKey answers whose body `lists` it."""
        for key, kept in list(self._pending.items()):
            if kept.license == (product_id, license_key) and (
                kept.machine_code == machine_code or (kept.machine_code == "" and lists(kept.body))
            ):
                del self._pending[key]
        self._db.submit()  # queued writes land first, so a forget is never undone by them
        return await self._db.run(
            self._counting(lambda db: _forget_machine(db, product_id, license_key, machine_code, lists))
        )

    async def forget_key(self, cache_key: bytes) -> None:
        """Drop one kept answer."""
        self._pending.pop(cache_key, None)
        self._db.submit()
        await self._db.run(self._counting(lambda db: _forget_key(db, cache_key)))

    async def kept_activations(
        self, product_id: str, license_key: str, machine_code: str
    ) -> list[tuple[bytes, float]]:
        """A machine's kept Activate answers as (body, fetched at), newest first; the caller verifies them."""
        await self._db.flush()
        return await self._db.run(lambda db: _activations(db, product_id, license_key, machine_code))

    async def count(self) -> int:
        """How many answers are kept on disk (queued writes included once landed)."""
        await self._db.flush()
        count: int = await self._db.run(lambda db: db.execute("SELECT count(*) FROM answers").fetchone()[0])
        return count

    async def flush(self) -> None:
        """Wait until every queued write has landed."""
        await self._db.flush()

    async def close(self) -> None:
        """Flush queued writes and close the database."""
        await self._db.close()


# The body only where the runway facts are missing or were read from another body (their digest differs).
_ACTIVATIONS = (
    "SELECT product_id, license_key, machine_code, fetched_at, {facts} FROM answers"
    " WHERE method = 'key/activate' AND machine_code <> ''"
)
_WITH_FACTS = (
    "facts, CASE WHEN substr(facts, 3, 16) = lower(hex(substr(digest, 1, 8))) THEN NULL ELSE body END"
)


class KeptActivation(NamedTuple):
    """A kept Activate answer as reports read it: whose, when fetched, its runway facts or else its body."""

    product_id: str
    license_key: str
    machine_code: str
    fetched_at: float
    facts: str | None  # signatures.runway_facts, when they hold for the body kept
    body: bytes | None  # None when the facts hold


class SqliteAnswerReader:
    """The kept Activate answers of an answers file, read-only while the daemon may write it (blocking)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def activations(self) -> Iterator[KeptActivation]:
        """Every kept Activate answer naming a machine; none without a file."""
        if not self.path.is_file():
            return
        db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True)
        try:
            facts = _WITH_FACTS if has_facts(db) else "NULL, body"
            yield from map(KeptActivation._make, db.execute(_ACTIVATIONS.format(facts=facts)))
        finally:
            db.close()


def _upgrade(db: sqlite3.Connection) -> None:
    """Add what later versions added to an answers file an earlier version made (SQLite has no migrations)."""
    if not has_facts(db):
        db.execute("ALTER TABLE answers ADD COLUMN facts TEXT")


def has_facts(db: sqlite3.Connection) -> bool:
    """Whether an answers file keeps runway facts (one made before they were kept does not, until opened)."""
    return any(row[1] == "facts" for row in db.execute("PRAGMA table_info(answers)"))


def _put(db: sqlite3.Connection, kept: Kept) -> None:
    """Insert or replace one kept answer with the digest that guards its body."""
    # An upsert, not INSERT OR REPLACE: a replacing row must not count as one more kept answer.
    db.execute(
        "INSERT INTO answers (cache_key, method, product_id, license_key, machine_code, fetched_at, body,"
        " digest, facts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (cache_key) DO UPDATE SET"
        " method = excluded.method, product_id = excluded.product_id, license_key = excluded.license_key,"
        " machine_code = excluded.machine_code, fetched_at = excluded.fetched_at, body = excluded.body,"
        " digest = excluded.digest, facts = excluded.facts",
        (
            kept.cache_key,
            kept.method,
            kept.product_id,
            kept.license_key,
            kept.machine_code,
            kept.fetched_at,
            kept.body,
            hashlib.sha256(kept.body).digest(),
            kept.facts,
        ),
    )


def _get(
    db: sqlite3.Connection, cache_key: bytes, dropped: Callable[[sqlite3.Connection], None]
) -> Kept | None:
    """Read one kept answer, dropping it (and telling `dropped`) if its body no longer matches its digest."""
    row = db.execute(
        "SELECT method, product_id, license_key, machine_code, fetched_at, body, digest"
        " FROM answers WHERE cache_key = ?",
        (cache_key,),
    ).fetchone()
    if row is None:
        return None
    method, product_id, license_key, machine_code, fetched_at, body, digest = row
    if not isinstance(body, bytes) or hashlib.sha256(body).digest() != digest:
        log.error("store_entry_corrupt_dropped", product_id=product_id, license_key=license_key)
        _forget_key(db, cache_key)
        dropped(db)
        return None
    return Kept(cache_key, method, product_id, license_key, machine_code, float(fetched_at), body)


def _activations(
    db: sqlite3.Connection, product_id: str, license_key: str, machine_code: str
) -> list[tuple[bytes, float]]:
    """The Activate rows of one machine, newest first."""
    rows = db.execute(
        "SELECT body, fetched_at FROM answers WHERE product_id = ? AND license_key = ? AND machine_code = ?"
        " AND method = 'key/activate' ORDER BY fetched_at DESC",
        (product_id, license_key, machine_code),
    ).fetchall()
    return [(bytes(body), float(fetched)) for body, fetched in rows]


def _forget(db: sqlite3.Connection, product_id: str, license_key: str) -> int:
    """Delete the rows of a license."""
    with db:
        cursor = db.execute(
            "DELETE FROM answers WHERE product_id = ? AND license_key = ?", (product_id, license_key)
        )
    return cursor.rowcount


def _forget_machine(
    db: sqlite3.Connection,
    product_id: str,
    license_key: str,
    machine_code: str,
    lists: Callable[[bytes], bool],
) -> int:
    """Delete a machine's rows and the license's GetKey rows (machine code "") whose body lists it."""
    listing = [
        (cache_key,)
        for cache_key, body in db.execute(
            "SELECT cache_key, body FROM answers"
            " WHERE product_id = ? AND license_key = ? AND machine_code = ''",
            (product_id, license_key),
        )
        if not isinstance(body, bytes) or lists(body)
    ]
    with db:
        cursor = db.execute(
            "DELETE FROM answers WHERE product_id = ? AND license_key = ? AND machine_code = ?",
            (product_id, license_key, machine_code),
        )
        db.executemany("DELETE FROM answers WHERE cache_key = ?", listing)
    return cursor.rowcount + len(listing)


def _forget_key(db: sqlite3.Connection, cache_key: bytes) -> None:
    """Delete one row."""
    with db:
        db.execute("DELETE FROM answers WHERE cache_key = ?", (cache_key,))
