"""Builds real audit trails with license_server.audit.chain, for the verify and search tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from license_server.audit import chain

T0 = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
LICENSE = "MUYVD-LSEBY-CXHRQ-XFAGY"


@dataclass(frozen=True)
class Placed:
    """Where one record was written, and what."""

    seq: int
    file: Path
    line: int
    record: dict[str, Any]
    hash: str


class TrailBuilder:
    """Writes records the way the daemon does: canonical lines, a hash chain, files named by first seq."""

    def __init__(self, folder: Path, *, start: float = T0, step: float = 60.0) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.now = start
        self.step = step
        self.prev = chain.GENESIS
        self.file: Path | None = None
        self.line = 0
        self.placed: list[Placed] = []

    @property
    def seq(self) -> int:
        """The seq of the last record written (0 before the first)."""
        return len(self.placed)

    def at(self, seq: int) -> Placed:
        """Where record `seq` was written."""
        return self.placed[seq - 1]

    def files(self) -> list[Path]:
        """The trail's files in chain order."""
        return [item.path for item in chain.list_files(self.folder)]

    def rotate(self) -> None:
        """Make the next record open a new file."""
        self.file = None

    def add(self, kind: str, *, at: float | None = None, **fields: Any) -> Placed:
        """Append one record, `step` seconds after the last one unless `at` says when."""
        self.now = self.now + self.step if at is None else at
        if self.file is None:
            self.file = self.folder / chain.file_name(self.seq + 1, self.now)
            self.line = 0
        seq = self.seq + 1
        record: dict[str, Any] = {
            "seq": seq,
            "time": chain.utc_now_text(self.now),
            "prev": self.prev,
            "type": kind,
        }
        record.update(fields)
        line = chain.canonical_line(record)
        with self.file.open("ab") as stream:
            stream.write(line + b"\n")
        self.line += 1
        self.prev = chain.line_hash(line)
        placed = Placed(seq, self.file, self.line, record, self.prev)
        self.placed.append(placed)
        return placed

    def call(self, *, at: float | None = None, **fields: Any) -> Placed:
        """Append a `call` record: a workstation activating LICENSE unless `fields` say otherwise."""
        record: dict[str, Any] = {
            "request_id": f"req-{self.seq + 1}",
            "client": "10.0.0.5",
            "http_method": "POST",
            "api_method": "key/activate",
            "product_id": "3349",
            "key": LICENSE,
            "machine": "machine-a",
            "friendly_name": "Lab PC 1",
            "floating_interval": 0,
            "action": "forwarded",
            "status": 200,
            "upstream_status": 200,
            "result": 0,
            "message": "",
            "failure": None,
            "latency_ms": 12.5,
            "bytes": 1234,
        }
        record.update(fields)
        return self.add(chain.CALL, at=at, **record)

    def write_head(self, seq: int | None = None) -> None:
        """Write the head marker at record `seq` (default: the last one)."""
        placed = self.at(self.seq if seq is None else seq)
        chain.write_head(self.folder, chain.Head(placed.seq, placed.hash, placed.file.name))


def standard_trail(folder: Path) -> TrailBuilder:
    """Four files, 23 records: start, calls, a crash, its recovery, a gap, an admin action, a stop; a head.

    A: 1 start, 2-6 calls | B: 7-10 calls (then a crash) | C: 11 recovered, 12 start, 13 gap, 14 admin,
    15-17 calls | D: 18-22 calls, 23 stop.
    """
    trail = TrailBuilder(folder)
    trail.add(chain.START, version="0.1.0", pid=100)
    for index in range(5):
        trail.call(machine=f"machine-{index}")
    trail.rotate()
    for index in range(4):
        trail.call(machine=f"machine-{index}", action="kept_fresh")
    crashed_in = trail.at(trail.seq).file.name
    trail.rotate()
    trail.add(
        chain.RECOVERED,
        reason="torn last line",
        torn_bytes=37,
        torn_sha256="ab" * 32,
        file=crashed_in,
        head_seq=10,
    )
    trail.add(chain.START, version="0.1.0", pid=200)
    trail.add(chain.GAP, lost=3, since=chain.utc_now_text(trail.now))
    trail.add(chain.ADMIN, actor="root", action="reload", detail="config reloaded")
    for index in range(3):
        trail.call(machine=f"machine-{index}", action="refused", status=403, result=1, message="Blocked")
    trail.rotate()
    for index in range(5):
        trail.call(machine=f"machine-{index}")
    trail.add(chain.STOP)
    trail.write_head()
    return trail


STANDARD_RECORDS = 23


def read_lines(path: Path) -> list[bytes]:
    """A file's lines with their newlines."""
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    """Replace a file's content with these lines."""
    path.write_bytes(b"".join(lines))


def rechain(folder: Path) -> None:
    """Recompute every prev from the first record on and rewrite head.json: what a thorough forger does."""
    prev = chain.GENESIS
    last: tuple[int, str, str] | None = None
    for audit_file in chain.list_files(folder):
        out = []
        for raw in read_lines(audit_file.path):
            record = json.loads(raw)
            if last is not None:  # the first record keeps its prev: genesis, or a retention record's hash
                record["prev"] = prev
            line = chain.canonical_line(record)
            prev = chain.line_hash(line)
            last = (record["seq"], prev, audit_file.path.name)
            out.append(line + b"\n")
        write_lines(audit_file.path, out)
    if last is not None:
        chain.write_head(folder, chain.Head(*last))
