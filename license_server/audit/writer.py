"""Appends hash-chained audit records in group commits on one writer thread, before calls are answered."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from license_server.audit import chain
from license_server.background import Background, GroupCommit
from license_server.config import AuditConfig
from license_server.storage.state import open_private, private_folder
from license_server.utctext import UtcText

log = structlog.get_logger(__name__)

_TAIL_CHUNK = 64 * 1024
_Entry = tuple[float, Mapping[str, Any]]  # (unix time of the event, the record's own fields, "type" first)
_RETRY_EVERY = 1.0  # seconds between attempts to write again after a failure


class AuditUnavailableError(Exception):
    """The trail cannot be written and the daemon is configured to refuse calls meanwhile."""


@dataclass(slots=True)
class _Tail:
    """Where the chain stands: the last record's sequence number and hash."""

    seq: int = 0
    hash: str = chain.GENESIS


@dataclass(frozen=True, slots=True)
class AuditState:
    """How the trail is doing, for /healthz and the log."""

    writable: bool
    error: str | None
    backlog: int
    lost: int
    seq: int
    hash: str


class _Files:
    """The writer thread's side: the open file, rotation, fsync and the head marker. Not thread-safe."""

    def __init__(self, folder: Path, config: AuditConfig, clock: Callable[[], float]) -> None:
        self.folder = folder
        self.config = config
        self.clock = clock
        self.tail = _Tail()
        self.fd: int | None = None
        self.name = ""
        self.size = 0
        self.day = ""
        self.last_sync = time.monotonic()
        self.unsynced = False

    # -- start-up ---------------------------------------------------------------------------------

    def recover(self) -> list[dict[str, Any]]:
        """Find the end of the chain, cut a torn tail, and return the records that explain what was found."""
        private_folder(self.folder)
        notes: list[dict[str, Any]] = []
        for audit_file in reversed(chain.list_files(self.folder)):
            found, torn = _last_intact(audit_file.path)
            if torn:
                os.truncate(audit_file.path, audit_file.path.stat().st_size - len(torn))
                notes.append(
                    {
                        "type": chain.RECOVERED,
                        "reason": "an incomplete record at the end of the file (the daemon was killed or the"
                        " machine lost power while writing) was cut off",
                        "torn_bytes": len(torn),
                        "torn_sha256": hashlib.sha256(torn).hexdigest(),
                        "file": audit_file.path.name,
                        "head_seq": None,
                    }
                )
                log.warning("audit_torn_record_cut", file=audit_file.path.name, torn_bytes=len(torn))
            if found is not None:
                self.tail = found
                break
        head = chain.read_head(self.folder)
        if head is not None and head.seq > self.tail.seq:
            notes.append(
                {
                    "type": chain.RECOVERED,
                    "reason": f"the head marker says seq {head.seq} but the trail ends at seq"
                    f" {self.tail.seq}: records written before a power cut were lost",
                    "torn_bytes": 0,
                    "torn_sha256": "",
                    "file": head.file,
                    "head_seq": head.seq,
                }
            )
            log.error("audit_records_lost_in_power_cut", head_seq=head.seq, last_seq=self.tail.seq)
        return notes

    # -- writing ----------------------------------------------------------------------------------

    def write(self, first_stamp: float, data: bytes, tail: _Tail) -> None:
        """Write chained lines to one file; on failure nothing of them stays in the file or the chain."""
        if self._must_rotate(first_stamp):
            self._open_new(self.tail.seq + 1, first_stamp)
        try:
            self._write_all(data)
        except OSError:
            if self.fd is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, self.size)  # a half-written batch must not stay as a torn record
            raise
        self.size += len(data)
        self.tail = tail
        self.unsynced = True
        try:
            self.sync_if_due()
        except OSError as exc:  # the records are written; durability is retried at the next sync
            log.error("audit_sync_failed", error=str(exc))  # noqa: TRY400 - the errno says it all

    def _write_all(self, data: bytes) -> None:
        if self.fd is None:
            raise OSError("no audit file is open")
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def _must_rotate(self, stamp: float) -> bool:
        """Whether the next batch starts a new file: none open, the size reached, or a new UTC day."""
        if self.fd is None:
            return True
        if self.size >= self.config.rotate_bytes:
            return True
        return self.config.rotate_daily and self.size > 0 and _day(stamp) != self.day

    def _open_new(self, first_seq: int, stamp: float) -> None:
        """Start a new file (or continue the current last one if it is still in bounds)."""
        self._close_fd()
        self.name = chain.file_name(first_seq, stamp)
        path = self.folder / self.name
        self.fd = open_private(path, os.O_WRONLY | os.O_APPEND)
        self.size = os.fstat(self.fd).st_size
        self.day = _day(stamp)
        if self.config.fsync is not None:
            _fsync_dir(self.folder)

    def continue_last(self) -> None:
        """Append to the newest file after a restart, unless it is full or from another day."""
        files = chain.list_files(self.folder)
        if not files:
            return
        last = files[-1].path
        size = last.stat().st_size
        opened = _opened_at(last)
        if size >= self.config.rotate_bytes or (
            self.config.rotate_daily and _day(self.clock()) != _day(opened)
        ):
            return
        self.fd = os.open(last, os.O_WRONLY | os.O_APPEND)
        self.name, self.size, self.day = last.name, size, _day(opened)

    def sync_if_due(self, *, force: bool = False) -> None:
        """fsync as configured, then move the head marker to what is now durable."""
        policy = self.config.fsync
        if not self.unsynced or self.fd is None:
            return
        if policy is None and not force:
            return
        # Timed by the monotonic clock: a wall clock stepped back must not hold interval syncs off.
        if not force and policy is not None and policy > 0 and time.monotonic() - self.last_sync < policy:
            return
        os.fsync(self.fd)
        self.last_sync = time.monotonic()
        self.unsynced = False
        chain.write_head(self.folder, chain.Head(self.tail.seq, self.tail.hash, self.name))

    def checkpoint(self) -> chain.Head | None:
        """Make everything written durable and return the head marker it now stands at."""
        self.sync_if_due(force=True)
        return chain.read_head(self.folder)

    def close(self) -> None:
        """Make everything durable and close the file."""
        if self.fd is not None:
            self.sync_if_due(force=True)
        self._close_fd()

    def _close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # -- retention --------------------------------------------------------------------------------

    def expire(self) -> dict[str, Any] | None:
        """Remove files whose records are all older than the retention period; return the record saying so."""
        if self.config.retention <= 0:
            return None
        cutoff = self.clock() - self.config.retention
        files = chain.list_files(self.folder)
        removed: list[str] = []
        last_seq, last_hash = 0, ""
        # A file's records all predate the next file's name time; the newest file is never removed.
        for current, following in itertools.pairwise(files):
            if _opened_at(following.path) >= cutoff or following.path.name == self.name:
                break
            first = _first_record(following.path)
            if first is None:
                break
            current.path.unlink()
            removed.append(current.path.name)
            last_seq, last_hash = int(first["seq"]) - 1, str(first["prev"])
        if not removed:
            return None
        log.info("audit_files_expired", removed=removed)
        return {"type": chain.RETENTION, "removed": removed, "last_seq": last_seq, "last_hash": last_hash}


def chain_entries(tail: _Tail, batch: list[_Entry], times: UtcText) -> tuple[bytes, _Tail]:
    """The lines of a batch chained onto `tail`, and the chain's new tail.

    Done on the event loop, where it costs a few microseconds a record: the writer thread then only makes
    system calls, which release the GIL, instead of holding it against the loop.
    """
    lines: list[bytes] = []
    for stamp, fields in batch:
        record = {"seq": tail.seq + 1, "time": times.text(stamp), "prev": tail.hash, **fields}
        line = chain.canonical_line(record)
        lines.append(line)
        tail = _Tail(tail.seq + 1, chain.line_hash(line))
    lines.append(b"")
    return b"\n".join(lines), tail


class AuditLog:
    """The daemon's audit trail: `append` returns once the record is written (or queued, when failing)."""

    def __init__(self, folder: Path, config: AuditConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self._files = _Files(folder, config, clock)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")
        # Serial: each batch is chained onto the tail the one before it left.
        self._commits = GroupCommit(self._write, self._ended, serial=True)
        self._error: str | None = None
        self._failing_since: float | None = None
        self._backlog: deque[_Entry] = deque()
        self._lost = 0
        self._background = Background()
        self.records_written = 0
        self._times = UtcText()
        # Told after each batch is written (the shipper to the shared database); must not block or raise.
        self.on_written: Callable[[], None] | None = None

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _write(self, batch: list[_Entry]) -> None:
        """Chain a batch onto what is written and write it (one batch at a time is ever in flight)."""
        if batch:
            data, tail = chain_entries(self._files.tail, batch, self._times)
            await self._run(self._files.write, batch[0][0], data, tail)
            if self.on_written is not None:
                self.on_written()

    async def open(self, version: str) -> None:
        """Recover the chain's end, apply retention, continue the newest file, record the start."""
        notes: list[dict[str, Any]] = await self._run(self._files.recover)
        await self._run(self._files.continue_last)
        expired = await self._run(self._files.expire)
        now = self.clock()
        start = {"type": chain.START, "version": version, "pid": os.getpid()}
        records = [(now, r) for r in (*notes, *([expired] if expired else []), start)]
        await self._write(records)
        self.records_written += len(records)
        await self._checkpoint()
        self._background.spawn(self._housekeeping())

    @property
    def writable(self) -> bool:
        """Whether records are being written right now."""
        return self._error is None

    def state(self) -> AuditState:
        """A snapshot for health checks."""
        tail = self._files.tail
        return AuditState(
            writable=self._error is None,
            error=self._error,
            backlog=len(self._backlog),
            lost=self._lost,
            seq=tail.seq,
            hash=tail.hash,
        )

    async def append(self, record: Mapping[str, Any]) -> None:
        """Write one record (its "type" first) before the caller answers; group-committed with others.

        While the trail cannot be written: with on_failure=continue the record waits in memory and this
        returns; with on_failure=refuse this raises AuditUnavailableError.
        """
        entry = (self.clock(), record)
        if self._error is not None:
            self._hold(entry)
            return
        batch = self._commits.add(entry)
        # Shielded: one caller going away must not cancel the batch the others wait on.
        await asyncio.shield(batch.done)
        if batch.error is not None:  # the batch failed: its records were held or refused
            self._hold(entry)

    def _hold(self, entry: _Entry) -> None:
        """Keep a record in memory while the trail is failing, or refuse the call."""
        if self.config.on_failure == "refuse":
            self._lost += 1
            raise AuditUnavailableError(self._error or "the audit trail cannot be written")
        if len(self._backlog) >= self.config.backlog:
            self._backlog.popleft()
            self._lost += 1
        self._backlog.append(entry)

    def _ended(self, batch: list[_Entry], error: BaseException | None) -> None:
        """Count a batch written, or mark the trail failing before the batch's callers hear of it."""
        if error is None:
            self.records_written += len(batch)
        else:
            self._failed(error)

    def _failed(self, exc: BaseException) -> None:
        if self._error is None:
            self._failing_since = self.clock()
            log.error("audit_write_failed", error=str(exc), on_failure=self.config.on_failure)
        self._error = str(exc)

    async def _retry(self) -> None:
        """Write what was held (and a record of what was lost); once all is written the trail is healthy."""
        while True:
            held = list(self._backlog)
            self._backlog.clear()  # records held while this write runs queue up behind it
            lost = self._lost
            records: list[_Entry] = []
            if lost:
                since = min([self._failing_since or self.clock(), *(stamp for stamp, _ in held)])
                # Stamped no later than the held records after it (they keep the times of their calls),
                # so the file this batch may open is named by a time no later than any record in it.
                gap = {"type": chain.GAP, "lost": lost, "since": chain.utc_now_text(since)}
                records.append((since, gap))
            records.extend(held)
            try:
                await self._write(records)
            except OSError as exc:
                self._error = str(exc)
                self._backlog.extendleft(reversed(held))
                while len(self._backlog) > self.config.backlog:
                    self._backlog.popleft()
                    self._lost += 1
                return
            self._lost -= lost
            self.records_written += len(records)
            if not self._backlog and not self._lost:
                break
        log.warning("audit_writable_again", failing_since=self._failing_since)
        self._error, self._failing_since = None, None

    async def _housekeeping(self) -> None:
        """Periodic work: retries while failing, interval fsync, checkpoints, daily retention."""
        next_checkpoint = time.monotonic() + self.config.checkpoint_interval
        next_expiry = time.monotonic() + 3600
        tick = min(_RETRY_EVERY, self.config.fsync or _RETRY_EVERY)
        while True:
            await asyncio.sleep(tick)
            if self._error is not None and not self._commits.busy:
                await self._retry()
            elif self._error is None and not self._commits.busy:
                with contextlib.suppress(OSError):
                    await self._run(self._files.sync_if_due)
            now = time.monotonic()
            if now >= next_checkpoint:
                next_checkpoint = now + self.config.checkpoint_interval
                await self._checkpoint()
            if now >= next_expiry and self._error is None:
                next_expiry = now + 3600
                expired = await self._run(self._files.expire)
                if expired is not None:
                    await self.append(expired)

    async def _checkpoint(self) -> None:
        """Put the durable head of the chain into the operational log, a second place to rewrite."""
        if self._error is not None:
            return
        try:
            head: chain.Head | None = await self._run(self._files.checkpoint)
        except OSError as exc:
            log.error("audit_sync_failed", error=str(exc))  # noqa: TRY400 - the errno says it all
            return
        if head is not None:
            log.info("audit_checkpoint", seq=head.seq, hash=head.hash, file=head.file)

    async def close(self) -> None:
        """Write what is pending and a stop record, make it durable, and stop the writer thread."""
        await self._background.stop()
        while self._commits.busy:  # calls may still append while earlier batches are written
            await self._commits.flush()
        if self._error is not None:
            await self._retry()
        if self._error is None:
            with contextlib.suppress(OSError):
                await self._write([(self.clock(), {"type": chain.STOP})])
                self.records_written += 1
        await self._checkpoint()
        with contextlib.suppress(OSError):
            await self._run(self._files.close)
        self._executor.shutdown(wait=False)


def _day(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y%m%d")


def _opened_at(path: Path) -> float:
    """When a file was started, from its name."""
    return datetime.strptime(path.name.split("-")[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()


def _first_record(path: Path) -> dict[str, Any] | None:
    """A file's first record, or None when it has none that parses."""
    with path.open("rb") as handle:
        return chain.parse_record(next(chain.lines(handle), b"").rstrip(b"\n"))


def _last_intact(path: Path) -> tuple[_Tail | None, bytes]:
    """The last complete, parsable record of a file, and the torn bytes after it (to be cut)."""
    size = path.stat().st_size
    window = _TAIL_CHUNK
    with path.open("rb") as handle:
        while True:
            start = max(0, size - window)
            handle.seek(start)
            data = handle.read()
            lines = data.split(b"\n")
            # lines[-1] follows the last newline: empty when the file ends cleanly. Unless the window
            # starts at 0, lines[0] may be the end of a longer line, so it is never a candidate.
            offset = len(data) - len(lines[-1])
            for index in range(len(lines) - 2, 0 if start > 0 else -1, -1):
                line = lines[index]
                try:
                    seq = int(json.loads(line)["seq"])
                except (ValueError, KeyError, TypeError):
                    offset -= len(line) + 1
                    continue
                return _Tail(seq, chain.line_hash(line)), data[offset:]
            if start == 0:
                return None, data
            window *= 4


def _fsync_dir(folder: Path) -> None:
    """Make a new file's directory entry durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
