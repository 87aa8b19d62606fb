"""The group commit both stores share, and the background tasks the daemon keeps alive."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

from structlog.testing import capture_logs

from license_server.background import Background, GroupCommit
from license_server.storage.sqlite import SqliteWorker, Write

SCHEMA = "CREATE TABLE IF NOT EXISTS t (x INTEGER NOT NULL);"


def count(db: sqlite3.Connection) -> int:
    """Rows in the test table."""
    row = db.execute("SELECT count(*) FROM t").fetchone()
    return int(row[0])


def read_count(path: Path) -> int:
    """Rows in the test table, read through a connection of its own (another reader)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return count(db)


def insert(value: int | None) -> Write:
    """A write of one row; None breaks the NOT NULL constraint."""
    return lambda db: db.execute("INSERT INTO t VALUES (?)", (value,))


class TestSqliteGroupCommit:
    """SQLite writes of one turn share a transaction; a read asked for after `submit` sees them."""

    async def test_read_after_submit_sees_queued_writes(self, tmp_path: Path) -> None:
        """`submit` hands the batch to the worker thread at once, so a read queued next runs after it."""
        worker = SqliteWorker(tmp_path / "t.sqlite3", SCHEMA)
        await worker.open()
        try:
            worker.write(insert(1))
            worker.submit()
            assert await worker.run(count) == 1
        finally:
            await worker.close()

    async def test_one_transaction_per_turn_and_failures_logged(self, tmp_path: Path) -> None:
        """A failing write undoes its turn's writes, not the next turn's; waiters go on, and it is logged."""
        worker = SqliteWorker(tmp_path / "t.sqlite3", SCHEMA)
        await worker.open()
        try:
            with capture_logs() as logs:
                first = [worker.write(insert(1)), worker.write(insert(None))]
                await asyncio.gather(*first)
                await worker.write(insert(2))
            assert await worker.run(count) == 1
            assert [entry["event"] for entry in logs] == ["database_write_failed"]
        finally:
            await worker.close()

    async def test_flush_waits_for_every_queued_write(self, tmp_path: Path) -> None:
        """After flush, every write queued before it has committed."""
        worker = SqliteWorker(tmp_path / "t.sqlite3", SCHEMA)
        await worker.open()
        try:
            for value in range(5):
                worker.write(insert(value))
                await asyncio.sleep(0)  # a turn each: several batches in flight at once
            await worker.flush()
            assert await asyncio.to_thread(read_count, worker.path) == 5
        finally:
            await worker.close()

    async def test_a_write_after_close_fails_at_once(self, tmp_path: Path) -> None:
        """A write that comes after the worker closed is logged as failed; its waiter is not left hanging."""
        worker = SqliteWorker(tmp_path / "t.sqlite3", SCHEMA)
        await worker.open()
        await worker.close()
        with capture_logs() as logs:
            await asyncio.wait_for(worker.write(insert(1)), timeout=10)
        assert [entry["event"] for entry in logs] == ["database_write_failed"]

    async def test_a_cancelled_waiter_leaves_its_batch_alone(self, tmp_path: Path) -> None:
        """One caller of a shared batch cancelled: the others still hear it commit, and nothing is lost."""
        worker = SqliteWorker(tmp_path / "t.sqlite3", SCHEMA)
        await worker.open()
        try:

            async def caller(value: int) -> None:
                await worker.write(insert(value))

            first, second = asyncio.ensure_future(caller(1)), asyncio.ensure_future(caller(2))
            await asyncio.sleep(0)  # both writes queued in one turn: one batch
            first.cancel()
            await asyncio.wait_for(second, timeout=10)
            await worker.flush()
            assert await worker.run(count) == 2
        finally:
            await worker.close()


class TestSerialGroupCommit:
    """The audit trail's kind: a batch waits for the one before, and each adder hears how its batch went."""

    async def test_batches_wait_their_turn_and_hear_their_fate(self) -> None:
        """Items added while a commit runs form the next batch; a failed batch's error reaches every adder."""
        gate = asyncio.Event()
        committed: list[list[int]] = []
        ended: list[tuple[list[int], str | None]] = []

        async def commit(items: list[int]) -> None:
            await gate.wait()
            if 0 in items:
                raise OSError("disk full")
            committed.append(items)

        def note(items: list[int], error: BaseException | None) -> None:
            ended.append((items, None if error is None else str(error)))

        commits = GroupCommit(commit, note, serial=True)
        first = [commits.add(1), commits.add(2)]
        await asyncio.sleep(0)  # the first batch starts
        second = [commits.add(0), commits.add(3)]
        busy_while_waiting = commits.busy
        gate.set()
        await commits.flush()
        assert busy_while_waiting
        assert not commits.busy
        assert committed == [[1, 2]]
        assert ended == [([1, 2], None), ([0, 3], "disk full")]
        assert first[0] is first[1]
        assert second[0] is second[1]
        assert first[0].done.done()
        assert first[0].error is None
        assert isinstance(second[0].error, OSError)


class TestBackground:
    """Background tasks are kept until they end, and stopped on request."""

    async def test_spawned_work_runs_and_stops(self) -> None:
        """A spawned task runs without another reference; stop cancels what still runs and waits for it."""
        background = Background()
        ran = asyncio.Event()
        cancelled = asyncio.Event()

        async def work() -> None:
            ran.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        background.spawn(work())
        await asyncio.wait_for(ran.wait(), 5)
        await background.stop()
        assert cancelled.is_set()
