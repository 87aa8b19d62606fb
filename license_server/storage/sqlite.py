"""One SQLite database (WAL) on its own worker thread; writes grouped into one transaction per tick."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import structlog

from license_server.background import GroupCommit
from license_server.storage.state import create_private, private_folder

log = structlog.get_logger(__name__)

T = TypeVar("T")
Write = Callable[[sqlite3.Connection], object]  # whatever it returns is ignored


class SqliteWorker:
    """A database in `state_dir`: statements run on its own thread, in the order they were submitted."""

    def __init__(self, path: Path, schema: str, upgrade: Write | None = None) -> None:
        self.path = path
        self._schema = schema
        self._upgrade = upgrade  # brings a file made by an earlier version to the schema (no-op when there)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=path.stem)
        self._db: sqlite3.Connection | None = None
        # Not serial: the worker thread keeps batches in order, and a read queued after them waits for them.
        self._commits = GroupCommit(self._commit, self._ended, serial=False)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` with the connection on the worker thread, after everything submitted before it."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            raise RuntimeError(f"{self.path.name} is not open")
        return fn(self._db)

    async def open(self) -> None:
        """Open (or create) the database; a corrupt one is moved aside and a fresh one started."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open_sync)

    def _open_sync(self) -> None:
        private_folder(self.path.parent)
        try:
            self._connect()
        except sqlite3.DatabaseError as exc:
            if self._db is not None:
                self._db.close()
                self._db = None
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error(  # noqa: TRY400 - the cause is named; a traceback would not help an admin
                "database_corrupt_set_aside", path=str(self.path), moved_to=str(aside), error=str(exc)
            )
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{self.path}{suffix}")
                if source.exists():
                    source.rename(Path(f"{aside}{suffix}"))
            self._connect()

    def _connect(self) -> None:
        create_private(self.path)  # SQLite creates -wal, -shm and journals with the database's own mode
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL survives a killed process; only a power cut may lose the last commits.
        db.execute("PRAGMA synchronous=NORMAL")
        check = db.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check}")
        db.executescript(self._schema)
        if self._upgrade is not None:
            with db:
                self._upgrade(db)

    def write(self, fn: Write) -> asyncio.Future[None]:
        """Queue a write; writes queued in one loop iteration share one transaction.

        The future is done once that transaction committed (or failed, which is logged: callers go on).
        """
        # shielded: one caller cancelled (a call cut short) must not cancel the batch the others wait for
        return asyncio.shield(self._commits.add(fn).done)

    def submit(self) -> None:
        """Send the queued writes to the worker thread now."""
        self._commits.submit()

    def _commit(self, batch: list[Write]) -> asyncio.Future[None]:
        """Hand a batch of writes to the worker thread now, to apply in one transaction."""
        call = functools.partial(self._call, functools.partial(_transaction, batch))
        return asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _ended(self, batch: list[Write], error: BaseException | None) -> None:
        """Log a batch that failed: its writes are lost, and the daemon goes on."""
        if error is not None and not isinstance(error, asyncio.CancelledError):
            log.error("database_write_failed", database=self.path.name, error=str(error))

    async def flush(self) -> None:
        """Wait until every queued write has landed."""
        await self._commits.flush()

    async def close(self) -> None:
        """Flush queued writes, close the database and stop the worker thread."""
        await self.flush()
        if self._db is not None:
            await self.run(lambda db: db.close())
            self._db = None
        self._executor.shutdown(wait=False)  # the close above was its last job


def _transaction(batch: list[Write], db: sqlite3.Connection) -> None:
    """Apply a batch of writes in one transaction."""
    with db:
        db.execute("BEGIN")
        for fn in batch:
            fn(db)
