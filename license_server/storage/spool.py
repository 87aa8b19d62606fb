"""Writes the shared database could not take in time: kept in order on the node's disk, replayed later.

A store's write batch that the database does not commit within about a second (or at once, while the
heartbeat says it is down, or while earlier writes still wait here) is appended to the spool, a SQLite file
in state_dir, and its callers go on. One task per node replays the spool in order whenever the heartbeat
says the database is up. Each spooled write has an id, unique to the node over its life (microseconds of
the wall clock, never less than one more than the last); the transaction that applies it first records
(node, id) in `applied_spool`, so a write whose transaction committed but whose local delete did not
happen (a node killed in between, an answer lost) is not applied twice. A direct write records its id too:
a write given up on at its deadline may still commit, and is then spooled under the same id.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import structlog

from license_server.storage.pg_nodes import settle, within
from license_server.storage.postgres import Database

if TYPE_CHECKING:
    from license_server.storage.pg_nodes import Heartbeat
    from license_server.storage.sqlite import SqliteWorker

log = structlog.get_logger(__name__)

Conn = psycopg.AsyncConnection[Any]
Apply = Callable[[Conn, str, Any], Awaitable[None]]  # (connection, op, payload): one spooled write
Replayed = Callable[[int, str, Any], None]  # told after a spooled write landed (or was dropped)

DEADLINE = 1.0  # seconds a write waits for the database before it is spooled
REPLAY_EVERY = 0.5  # seconds between looks at the spool while it holds writes
_REPLAY_DEADLINE = 5.0  # seconds one replay transaction may take
_CLOSE_DEADLINE = 2.0  # seconds a closing node tries to write what its spool holds
_REPLAY_BATCH = 100  # spooled writes applied in one transaction
_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY, store TEXT NOT NULL, op TEXT NOT NULL,
                                  payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(slots=True)
class _Op:
    """One spooled write."""

    id: int
    store: str
    op: str
    payload: Any


@dataclass(slots=True)
class _Store:
    """How a store applies its spooled writes, and hears that they landed."""

    apply: Apply
    replayed: Replayed | None


class Spool:
    """One node's spool of writes for the shared database; `path` None keeps it in memory (tests, tools)."""

    def __init__(
        self, database: Database, *, node: str, path: Path | None = None, heartbeat: Heartbeat | None = None
    ) -> None:
        self._database = database
        self.node = node
        self._heartbeat = heartbeat
        self._worker: SqliteWorker | None = None
        if path is not None:
            from license_server.storage.sqlite import SqliteWorker

            self._worker = SqliteWorker(path, _SCHEMA)
        self._memory: list[_Op] = []  # the ops when there is no file; with a file, read from it
        self._stores: dict[str, _Store] = {}
        self._last = 0  # the last id handed out
        self._open: set[int] = set()  # ids handed out whose write has not landed: their guard rows stay
        self.backlog = 0  # writes in the spool
        self._lock = asyncio.Lock()  # one replay at a time
        self._task: asyncio.Task[None] | None = None
        self._leftovers: set[asyncio.Task[Any]] = set()
        self._opened = False

    def register(self, store: str, apply: Apply, replayed: Replayed | None = None) -> None:
        """Name a store's way of applying its spooled writes (before `start`)."""
        self._stores[store] = _Store(apply, replayed)

    async def open(self) -> int:
        """Open the file and count what waits in it; returns that count."""
        if self._opened:
            return self.backlog
        self._opened = True
        if self._worker is None:
            return 0
        await self._worker.open()

        def read(db: sqlite3.Connection) -> tuple[list[int], int]:
            ids = [int(i) for (i,) in db.execute("SELECT id FROM spool ORDER BY id")]
            row = db.execute("SELECT value FROM meta WHERE name = 'last'").fetchone()
            return ids, int(row[0]) if row else 0

        ids, last = await self._worker.run(read)
        self._open.update(ids)
        self.backlog = len(ids)
        self._last = max([last, *ids])
        if ids:
            log.info("database_spool_found", writes=len(ids))
        return self.backlog

    def next_id(self) -> int:
        """A new write's id: greater than every id this node handed out before, across restarts."""
        self._last = max(self._last + 1, int(time.time() * 1_000_000))
        self._open.add(self._last)
        return self._last

    def landed(self, write_id: int) -> None:
        """A write committed directly: its guard row may be pruned."""
        self._open.discard(write_id)

    def must_spool(self) -> bool:
        """Whether a write goes to the spool at once: earlier ones wait there, or the database is down."""
        return self.backlog > 0 or (self._heartbeat is not None and not self._heartbeat.up)

    async def append(self, write_id: int, store: str, op: str, payload: Any) -> None:
        """Keep a write on disk until it can be replayed; returns once it is durable."""
        self.backlog += 1
        if self._worker is None:
            self._memory.append(_Op(write_id, store, op, payload))
            return
        blob = json.dumps(payload, separators=(",", ":")).encode()
        try:
            await self._worker.run(
                lambda db: db.execute(
                    "INSERT INTO spool (id, store, op, payload) VALUES (?, ?, ?, ?)",
                    (write_id, store, op, blob),
                )
            )
        except BaseException:
            self.backlog -= 1
            self._open.discard(write_id)
            raise

    async def guard(self, conn: Conn, write_id: int) -> bool:
        """Record in this transaction that a write is applied; False when it was already (skip it).

        Also prunes this node's older guard rows: every id below the lowest still open can never come back.
        """
        row = await (
            await conn.execute(
                "INSERT INTO applied_spool (node, id) VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING id",
                (self.node, write_id),
            )
        ).fetchone()
        floor = min(self._open, default=self._last + 1)
        await conn.execute("DELETE FROM applied_spool WHERE node = %s AND id < %s", (self.node, floor))
        return row is not None

    async def _read(self) -> list[_Op]:
        """The first writes waiting, in order."""
        if self._worker is None:
            return self._memory[:_REPLAY_BATCH]

        def read(db: sqlite3.Connection) -> list[tuple[int, str, str, bytes]]:
            return db.execute(
                "SELECT id, store, op, payload FROM spool ORDER BY id LIMIT ?", (_REPLAY_BATCH,)
            ).fetchall()

        return [_Op(int(i), s, o, json.loads(p)) for i, s, o, p in await self._worker.run(read)]

    async def _delete(self, ops: list[_Op]) -> None:
        """Drop replayed writes from the spool."""
        ids = [op.id for op in ops]
        if self._worker is None:
            gone = set(ids)
            self._memory = [op for op in self._memory if op.id not in gone]
        else:
            await self._worker.run(
                lambda db: db.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in ids])
            )
        self.backlog -= len(ids)
        for op in ops:
            self._open.discard(op.id)
            store = self._stores.get(op.store)
            if store is not None and store.replayed is not None:
                store.replayed(op.id, op.op, op.payload)

    async def _apply(self, ops: list[_Op]) -> None:
        """Apply spooled writes in one transaction, each once."""

        async def run() -> None:
            async with self._database.pool.connection(timeout=DEADLINE) as conn, conn.transaction():
                for op in ops:
                    store = self._stores.get(op.store)
                    if store is None:
                        raise RuntimeError(f"no store {op.store!r} for spooled writes")
                    if await self.guard(conn, op.id):
                        await store.apply(conn, op.op, op.payload)

        await within(run(), _REPLAY_DEADLINE, self._leftovers)

    async def replay(self) -> None:
        """Write what the spool holds into the database, in order, until it is empty or a write fails."""
        async with self._lock:
            replayed = 0
            while self.backlog > 0:
                ops = await self._read()
                if not ops:
                    break
                try:
                    await self._apply(ops)
                except (psycopg.OperationalError, TimeoutError, OSError):
                    raise  # the database is out of reach: all of it is tried again later
                except (psycopg.Error, RuntimeError) as exc:
                    if len(ops) > 1:  # find the one the database refuses: apply them one by one
                        for op in ops:
                            await self._apply_alone(op)
                        replayed += len(ops)
                        continue
                    log.error(  # noqa: TRY400 - the cause is named
                        "database_spooled_write_dropped", store=ops[0].store, op=ops[0].op, error=str(exc)
                    )
                await self._delete(ops)
                replayed += len(ops)
            if replayed:
                log.info("database_spool_replayed", writes=replayed, left=self.backlog)

    async def _apply_alone(self, op: _Op) -> None:
        """Apply one spooled write; one the database refuses (not one it cannot be reached for) is dropped."""
        try:
            await self._apply([op])
        except (psycopg.OperationalError, TimeoutError, OSError):
            raise
        except (psycopg.Error, RuntimeError) as exc:
            log.error(  # noqa: TRY400 - the cause is named
                "database_spooled_write_dropped", store=op.store, op=op.op, error=str(exc)
            )
        await self._delete([op])

    async def drain(self) -> None:
        """Replay now (or join the replay under way); raises when the database cannot be reached."""
        if self.backlog:
            await self.replay()

    async def start(self) -> None:
        """Replay what an earlier run left (briefly), then keep replaying in the background until `close`."""
        if self._task is not None:
            return
        if self.backlog and (self._heartbeat is None or self._heartbeat.up):
            try:
                await self.replay()
            except (psycopg.Error, TimeoutError, OSError) as exc:
                log.warning("database_spool_replay_failed", error=_reason(exc), left=self.backlog)
        self._task = asyncio.create_task(self._replaying(), name="database-spool")

    async def _replaying(self) -> None:
        """Replay while the database is up and writes wait; a failure is logged once and tried again."""
        failing = False
        while True:
            await asyncio.sleep(REPLAY_EVERY)
            if not self.backlog or (self._heartbeat is not None and not self._heartbeat.up):
                continue
            try:
                await self.replay()
            except (psycopg.Error, TimeoutError, OSError) as exc:
                if not failing:
                    log.warning("database_spool_replay_failed", error=_reason(exc), left=self.backlog)
                failing = True
            except Exception:
                log.exception("database_spool_replay_failed")
                failing = True
            else:
                failing = False

    async def stop(self) -> None:
        """Stop replaying (what is left stays on disk for the next start)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await settle(self._leftovers)

    async def close(self) -> None:
        """Stop replaying (after one last short try while the database is up) and close the file."""
        await self.stop()
        if self.backlog and (self._heartbeat is None or self._heartbeat.up):
            try:
                await within(self.replay(), _CLOSE_DEADLINE, self._leftovers)
            except (psycopg.Error, TimeoutError, OSError) as exc:
                log.warning("database_spool_replay_failed", error=_reason(exc), left=self.backlog)
            await settle(self._leftovers)
        if self._worker is not None and self._opened:
            last = self._last
            await self._worker.run(
                lambda db: db.execute(
                    "INSERT INTO meta (name, value) VALUES ('last', ?)"
                    " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (last,),
                )
            )
            await self._worker.close()
        if self.backlog:
            log.warning("database_spool_left", writes=self.backlog)
        self._opened = False


def _reason(exc: BaseException) -> str:
    """An error's first line, which libpq never fills with a password."""
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
