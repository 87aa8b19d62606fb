"""Copies each node's audit records into the shared database, where one trail of every node is searched.

The design: one chain per node, anchored in the database. Each node keeps writing its own hash-chained
files in its audit_dir exactly as a single node does (a record is on the node's disk before its answer).
A shipper copies the node's lines, byte for byte, into `audit_records` and moves the node's row in
`audit_heads` in the same transaction (storage.pg_audit). Walking each node's chain against its anchored
head then catches a record changed, removed, inserted or reordered in the database, or a node's tail cut
off (audit.verify.verify_database). Why rather than one global chain:
- the node's disk stays its write-ahead log: when the database cannot be reached, the backlog is simply
  the records not yet shipped, and calls are answered meanwhile;
- no lock shared by every node on the path of each call: a global chain would serialise every answer of
  every node on one database row;
- the per-node chain is the very chain `audit verify` already checks on disk, so the files and the
  database are checked by the same rules, and each can be compared with the other.

Only records known to be durable are shipped (up to the head marker, which moves after each fsync), so
the database never holds a record a power cut could take from the node's disk and the node then reuse
its seq for another. A folder whose records do not continue the database's chain under its node name
(two nodes configured with the same node.name, a folder replaced) is refused loudly, never merged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import structlog

from license_server.audit import chain
from license_server.storage.pg_audit import AuditRow, PgAuditStore

log = structlog.get_logger(__name__)

BATCH_RECORDS = 1000  # records sent in one transaction
BATCH_BYTES = 4 * 1024 * 1024
SHIP_EVERY = 1.0  # seconds: the longest a durable record waits to be shipped when nothing prompts it
_REPEAT_LOG = 60.0  # seconds before the same failure is logged again
_COALESCE = 0.05  # seconds a prompt waits for more batches, so a busy node ships many in one transaction


class ShipRefusedError(Exception):
    """The folder's records cannot be shipped without breaking the chain the database holds: never merged."""


@dataclass(frozen=True, slots=True)
class _Position:
    """Where shipping stopped: after record `seq` (line hash `hash`), which ends at `offset` in `path`."""

    path: Path
    offset: int
    seq: int
    hash: str


@dataclass(slots=True)
class _Line:
    """A complete line of a file, without its newline, and the offset just after it."""

    path: Path
    data: bytes
    end: int


class FolderShipper:
    """Ships one folder's chain as node `node`, remembering where it stopped so files are not read again."""

    def __init__(self, folder: Path, node: str, store: PgAuditStore, *, durable_only: bool = True) -> None:
        self.folder = folder
        self.node = node
        self.store = store
        self.durable_only = durable_only
        self._position: _Position | None = None
        self.shipped_seq = 0  # the database's newest record of this node, as of the last ship

    def ship(self) -> int:
        """Ship every durable record the database lacks (blocking); returns how many were new there.

        Raises ShipRefusedError when the folder does not continue the database's chain of this node,
        DatabaseError or OSError when either side cannot be used now (to be retried).
        """
        limit = self._durable_limit()  # read before the files: the marker never runs ahead of them
        head = self.store.head(self.node)
        position = self._position
        if position is None or head is None or (position.seq, position.hash) != head:
            position = None
        try:
            shipped = self._ship(head, position, limit)
        except ShipRefusedError:
            self._position = None
            raise
        self.shipped_seq = self._position.seq if self._position is not None else head[0] if head else 0
        return shipped

    def _durable_limit(self) -> int | None:
        """The last seq that may be shipped: the head marker's, or None for no limit."""
        if not self.durable_only:
            return None
        marker = chain.read_head(self.folder)
        return 0 if marker is None else marker.seq

    def _ship(self, head: tuple[int, str] | None, position: _Position | None, limit: int | None) -> int:
        """Read from the remembered position, or find the database's head in the files, and ship on."""
        listed = chain.list_files(self.folder)
        files = [item.path for item in listed]
        last_seq: int | None = None
        last_hash: str | None = None
        if position is not None and position.path in files:
            lines = self._lines(files, files.index(position.path), position.offset)
            last_seq, last_hash, found_head = position.seq, position.hash, True
        else:
            index, after_head = self._start_file(listed, head)
            lines = self._lines(files, index, 0)
            found_head = head is None or after_head
            if head is not None and after_head:
                last_seq, last_hash = head
        with contextlib.closing(lines):
            return self._ship_lines(lines, head, found_head, last_seq, last_hash, limit)

    def _ship_lines(
        self,
        lines: Iterator[_Line],
        head: tuple[int, str] | None,
        found_head: bool,
        last_seq: int | None,
        last_hash: str | None,
        limit: int | None,
    ) -> int:
        """Check each line's place in the chain and ship the durable ones in batches."""
        batch: list[AuditRow] = []
        size, shipped, end = 0, 0, None
        for line in lines:
            record = chain.parse_record(line.data)
            seq = record.get("seq") if record is not None else None
            if record is None or type(seq) is not int:
                self._refuse(line, "the line is not an audit record")
            if not found_head:
                assert head is not None
                if seq < head[0]:
                    continue
                if seq > head[0]:
                    self._refuse(
                        line, f"the database's head of this node, seq {head[0]}, is not in the folder"
                    )
                if chain.line_hash(line.data) != head[1]:
                    self._refuse(
                        line,
                        f"seq {seq} differs from the record the database holds for node {self.node!r}: "
                        "another node writes under this name, or this folder was replaced; give each node "
                        "its own node.name",
                    )
                found_head, last_seq, last_hash = True, seq, head[1]
                end = line
                continue
            if limit is not None and seq > limit:
                break
            self._check_link(line, record, seq, last_seq, last_hash)
            moment = chain.record_time(record.get("time"))
            if moment is None:
                self._refuse(line, f"seq {seq} has no valid time")
            last_seq, last_hash = seq, chain.line_hash(line.data)
            batch.append((seq, moment.timestamp(), line.data))
            size += len(line.data)
            end = line
            if len(batch) >= BATCH_RECORDS or size >= BATCH_BYTES:
                shipped += self._send(batch, end)
                batch, size = [], 0
        if not found_head:
            assert head is not None
            raise ShipRefusedError(
                f"the database's chain of node {self.node!r} is at seq {head[0]}, but the trail in "
                f"{self.folder} does not reach it: another node writes under this name, or this folder was "
                "replaced; give each node its own node.name"
            )
        if batch and end is not None:
            shipped += self._send(batch, end)
        elif end is not None and last_seq is not None and last_hash is not None:
            self._position = _Position(end.path, end.end, last_seq, last_hash)
        return shipped

    def _start_file(self, files: list[chain.AuditFile], head: tuple[int, str] | None) -> tuple[int, bool]:
        """The file to read from: the one holding the database's head record, else the one right after it.

        Also whether reading starts right after the head record (its file was removed by retention).
        """
        if head is None or not files:
            return 0, head is None
        holding = [index for index, item in enumerate(files) if item.first_seq <= head[0]]
        if holding:
            return holding[-1], False
        if files[0].first_seq == head[0] + 1:
            return 0, True
        raise ShipRefusedError(
            f"the folder {self.folder} starts at seq {files[0].first_seq}, but the database holds node "
            f"{self.node!r} only up to seq {head[0]}: the records between were removed unshipped"
        )

    def _check_link(
        self, line: _Line, record: dict[str, object], seq: int, last_seq: int | None, last_hash: str | None
    ) -> None:
        """A record must follow the one before it: the next seq, its prev that record's hash."""
        prev = record.get("prev")
        if last_seq is None:
            if seq == 1 and prev != chain.GENESIS:
                self._refuse(line, "the first record's prev is not the genesis value")
            return
        if seq != last_seq + 1:
            self._refuse(line, f"seq {seq} follows seq {last_seq}")
        if prev != last_hash:
            self._refuse(
                line,
                f"seq {seq} does not continue the chain at seq {last_seq} (its prev is not that record's "
                "hash): another node writes under this name, or the trail was changed; give each node its "
                "own node.name",
            )

    def _send(self, batch: list[AuditRow], end: _Line) -> int:
        """Append a batch and remember the position after it."""
        digest = chain.line_hash(batch[-1][2])
        new = self.store.append(self.node, batch, digest)
        self._position = _Position(end.path, end.end, batch[-1][0], digest)
        return new

    def _lines(self, files: list[Path], index: int, offset: int) -> Generator[_Line, None, None]:
        """The complete lines from `offset` in files[index] on, through the later files."""
        for number, path in enumerate(files[index:]):
            start = offset if number == 0 else 0
            with path.open("rb") as stream:
                stream.seek(start)
                at = start
                for raw in chain.lines(stream):
                    if not raw.endswith(b"\n"):
                        if path != files[-1]:
                            raise ShipRefusedError(f"{path.name} ends with an incomplete line in the middle")
                        return  # being written: shipped once complete
                    at += len(raw)
                    yield _Line(path, raw[:-1], at)

    def _refuse(self, line: _Line, reason: str) -> NoReturn:
        """Stop shipping at a line that cannot be shipped."""
        raise ShipRefusedError(f"cannot ship {line.path.name} (line after offset {line.end}): {reason}")


def ship_folder(folder: Path, node: str, store: PgAuditStore, *, durable_only: bool = True) -> int:
    """Ship every durable record of `folder` that the database lacks for `node` (blocking); how many."""
    return FolderShipper(folder, node, store, durable_only=durable_only).ship()


class Shipper:
    """The daemon's side: ships soon after each written batch, at least once a second, and once at close."""

    def __init__(
        self, folder: Path, node: str, store: PgAuditStore, *, durable_only: bool, every: float = SHIP_EVERY
    ) -> None:
        self.store = store
        self.node = node
        self._folder = FolderShipper(folder, node, store, durable_only=durable_only)
        self._every = every
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-ship")
        self._task: asyncio.Task[None] | None = None
        self.shipped = 0  # records this node put in the database since start
        self.error: str | None = None  # why the last attempt failed, None once it worked
        self._logged: tuple[str, float] | None = None

    @property
    def shipped_seq(self) -> int:
        """The newest record of this node in the database, as of the last ship that worked."""
        return self._folder.shipped_seq

    def start(self) -> None:
        """Start shipping in the background, beginning with whatever the database lacks now."""
        self._wake.set()
        self._task = asyncio.create_task(self._run())

    def notify(self) -> None:
        """Hear that a batch was written: ship soon (many notices before a run make one run)."""
        self._wake.set()

    async def _run(self) -> None:
        """Ship when prompted or once a second, whichever comes first."""
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that arrives as the
            # event is set (close() right after the stop record's notice), and this loop would never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._every):
                    await self._wake.wait()
                await asyncio.sleep(_COALESCE)
            self._wake.clear()
            await self.ship_now()

    async def ship_now(self) -> int:
        """Ship once in the worker thread; a failure is logged and left for the next attempt."""
        loop = asyncio.get_running_loop()
        try:
            new: int = await loop.run_in_executor(self._executor, self._folder.ship)
        except Exception as exc:  # noqa: BLE001 - whatever it is, calls go on being answered and it is retried
            self._failed(exc)
            return 0
        if self.error is not None:
            log.warning("audit_ship_resumed", node=self.node, failed=self.error)
            self.error, self._logged = None, None
        self.shipped += new
        return new

    def _failed(self, exc: Exception) -> None:
        """Log a failure: a new one at once, the same one again only once a minute."""
        text = str(exc) or exc.__class__.__name__
        self.error = text
        now = time.monotonic()
        if self._logged is not None and self._logged[0] == text and now - self._logged[1] < _REPEAT_LOG:
            return
        self._logged = (text, now)
        log.error(
            "audit_ship_failed",
            node=self.node,
            error=text,
            refused=isinstance(exc, ShipRefusedError),
        )

    async def close(self) -> None:
        """Stop the background task, ship what was written last (the stop record), close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.ship_now()
        await asyncio.get_running_loop().run_in_executor(self._executor, self.store.close)
        self._executor.shutdown(wait=False)
