"""Durable store of kept answers: SQLite in WAL mode in `state_dir`, used from one background thread."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    cache_key    BLOB PRIMARY KEY,
    method       TEXT NOT NULL,
    product_id   TEXT NOT NULL,
    license_key  TEXT NOT NULL,
    machine_code TEXT NOT NULL,
    fetched_at   REAL NOT NULL,
    body         BLOB NOT NULL,
    digest       BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS answers_license ON answers (product_id, license_key, machine_code);
"""


@dataclass(frozen=True, slots=True)
class Kept:
    """A verified upstream answer the daemon keeps for outages."""

    cache_key: bytes
    method: str
    product_id: str
    license_key: str  # upper-cased: license keys compare without case
    machine_code: str  # "" for GetKey answers
    fetched_at: float  # unix time the upstream answer arrived
    body: bytes

    @property
    def license(self) -> tuple[str, str]:
        """The (product, key) this answer is about."""
        return (self.product_id, self.license_key)


class Store:
    """SQLite-backed kept answers; every statement runs on one worker thread, in submission order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._db: sqlite3.Connection | None = None
        self._pending: dict[bytes, Kept] = {}
        self._pending_done: asyncio.Future[None] | None = None
        self._writes: set[asyncio.Future[None]] = set()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> int:
        """Open (or create, or set aside a corrupt) database; returns the number of kept answers."""
        count: int = await self._run(self._open_sync)
        return count

    def _open_sync(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error(  # noqa: TRY400 - the cause is named; a traceback would not help an admin
                "store_corrupt_set_aside", path=str(self.path), moved_to=str(aside), error=str(exc)
            )
            if self._db is not None:
                self._db.close()
                self._db = None
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    src.rename(Path(f"{aside}{suffix}"))
            return self._connect()

    def _connect(self) -> int:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL survives a killed process; only a power cut may lose the last commits.
        db.execute("PRAGMA synchronous=NORMAL")
        check = db.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check}")
        db.executescript(_SCHEMA)
        count: int = db.execute("SELECT count(*) FROM answers").fetchone()[0]
        return count

    def put(self, kept: Kept) -> asyncio.Future[None]:
        """Queue an answer for writing; returns a future done once it is committed (or the write failed).

        Puts made in one loop iteration share one transaction.
        """
        self._pending[kept.cache_key] = kept
        if self._pending_done is None:
            loop = asyncio.get_running_loop()
            self._pending_done = loop.create_future()
            loop.call_soon(self._submit_pending)
        return self._pending_done

    def _submit_pending(self) -> None:
        done = self._pending_done
        if done is None:
            return
        batch, self._pending, self._pending_done = list(self._pending.values()), {}, None
        write = asyncio.ensure_future(self._run(self._write_sync, batch))
        self._writes.add(write)
        write.add_done_callback(functools.partial(self._write_done, done))

    def _write_done(self, done: asyncio.Future[None], write: asyncio.Future[None]) -> None:
        self._writes.discard(write)
        if not write.cancelled() and (exc := write.exception()) is not None:
            # The answer stays in memory; the next write may well succeed (disk space freed).
            log.error("store_write_failed", error=str(exc))
        if not done.done():
            done.set_result(None)

    def _write_sync(self, batch: list[Kept]) -> None:
        if not batch:
            return
        db = self._require_db()
        with db:
            db.execute("BEGIN")
            db.executemany(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        k.cache_key,
                        k.method,
                        k.product_id,
                        k.license_key,
                        k.machine_code,
                        k.fetched_at,
                        k.body,
                        hashlib.sha256(k.body).digest(),
                    )
                    for k in batch
                ],
            )

    async def get(self, cache_key: bytes) -> Kept | None:
        """The kept answer for a cache key, or None; a row whose digest does not match is dropped."""
        if (pending := self._pending.get(cache_key)) is not None:
            return pending
        found: Kept | None = await self._run(self._get_sync, cache_key)
        return found

    def _get_sync(self, cache_key: bytes) -> Kept | None:
        db = self._require_db()
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
            with db:
                db.execute("DELETE FROM answers WHERE cache_key = ?", (cache_key,))
            return None
        return Kept(cache_key, method, product_id, license_key, machine_code, float(fetched_at), body)

    async def forget(self, product_id: str, license_key: str, machine_code: str | None = None) -> int:
        """Drop the kept answers of a license (or of one machine of it); returns how many rows went."""
        self._submit_pending()  # queued writes land first, so a forget is never undone by them
        removed: int = await self._run(self._forget_sync, product_id, license_key, machine_code)
        return removed

    def _forget_sync(self, product_id: str, license_key: str, machine_code: str | None) -> int:
        db = self._require_db()
        with db:
            if machine_code is None:
                cursor = db.execute(
                    "DELETE FROM answers WHERE product_id = ? AND license_key = ?", (product_id, license_key)
                )
            else:
                cursor = db.execute(
                    "DELETE FROM answers WHERE product_id = ? AND license_key = ? AND machine_code = ?",
                    (product_id, license_key, machine_code),
                )
        return cursor.rowcount

    async def forget_key(self, cache_key: bytes) -> None:
        """Drop one kept answer."""
        self._pending.pop(cache_key, None)
        await self._run(self._forget_key_sync, cache_key)

    def _forget_key_sync(self, cache_key: bytes) -> None:
        db = self._require_db()
        with db:
            db.execute("DELETE FROM answers WHERE cache_key = ?", (cache_key,))

    async def count(self) -> int:
        """How many answers are kept on disk (queued writes included once landed)."""
        await self.flush()
        count: int = await self._run(
            lambda: self._require_db().execute("SELECT count(*) FROM answers").fetchone()[0]
        )
        return count

    async def flush(self) -> None:
        """Wait until every queued write has landed."""
        self._submit_pending()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def close(self) -> None:
        """Flush queued writes, close the database and stop the worker thread."""
        await self.flush()
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=False)  # the close above was its last job; nothing is left to wait for

    def _require_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db
