"""The audit trail's file format: canonical lines, the hash chain, file names, head marker, line readers."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import IO, Any, TypedDict

import orjson

from license_server.storage.state import open_private

GENESIS = "0" * 64  # the `prev` of the very first record
HEAD_FILE = "head.json"
_FILE_NAME = re.compile(r"^audit-(\d{8}T\d{6}Z)-(\d{12})\.jsonl$")
_STAMP = re.compile(r"audit-(\d{8}T\d{6}Z)-", re.ASCII)
MAX_LINE = 16 * 1024 * 1024  # far beyond any record; a longer line is read only this far
# A record may be stamped a moment before its file is opened, and clocks are stepped by small amounts.
FILE_TIME_SLACK = timedelta(minutes=1)

# Record types. A "call" is a workstation call; the others explain the chain itself.
CALL = "call"
START = "start"
STOP = "stop"
RECOVERED = "recovered"  # a torn tail or lost records found at start, set aside, chain continued
RETENTION = "retention"  # older files removed by the retention policy
GAP = "gap"  # records that could not be written while the log was failing (on_failure: continue)
ADMIN = "admin"  # an admin action


class Action(Enum):
    """What the daemon did with a workstation call, a call record's `action`; every answer has one."""

    FORWARDED = "forwarded"
    KEPT_FRESH = "kept_fresh"
    KEPT_STALE = "kept_stale"
    LICENSE_FILE = "license_file"
    REFUSED = "refused"  # the daemon itself said no (bad input, method not allowed)
    UPSTREAM_FAILED = "upstream_failed"


class CallRecord(TypedDict):
    """A `call` record as the daemon writes it, before the writer puts seq, time and prev in front."""

    type: str  # CALL
    request_id: str
    client: str | None
    http_method: str
    api_method: str
    product_id: str
    key: str
    machine: str
    friendly_name: str
    floating_interval: int
    action: str  # an Action's value
    status: int
    upstream_status: int | None
    result: int | None
    message: str
    failure: str | None
    latency_ms: float
    bytes: int


# The fields of a `call` record after seq, time, prev and type, in the order the daemon writes them.
CALL_FIELDS: tuple[str, ...] = tuple(CallRecord.__annotations__)[1:]


def canonical_line(record: dict[str, Any]) -> bytes:
    """The exact bytes of a record's line, without the newline: compact UTF-8 JSON, keys in order given."""
    return orjson.dumps(record)


def line_hash(line: bytes) -> str:
    """The chain hash of a line (without its newline): hex SHA-256."""
    return hashlib.sha256(line).hexdigest()


def utc_now_text(now: float) -> str:
    """A unix time as the ISO 8601 UTC text records carry, to the microsecond."""
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def file_name(first_seq: int, now: float) -> str:
    """The name of an audit file whose first record is `first_seq`, opened at `now`."""
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"audit-{stamp}-{first_seq:012d}.jsonl"


@dataclass(frozen=True, slots=True, order=True)
class AuditFile:
    """One file of the trail, ordered by the sequence number of its first record."""

    first_seq: int
    path: Path


def list_files(folder: Path) -> list[AuditFile]:
    """The trail's files in chain order; other files in the folder are ignored."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _FILE_NAME.match(path.name)
        if match is not None and path.is_file():
            found.append(AuditFile(int(match.group(2)), path))
    return sorted(found)


@dataclass(frozen=True, slots=True)
class Head:
    """The last record known to be durably written: a marker that exposes a cut-off tail."""

    seq: int
    hash: str
    file: str


def read_head(folder: Path) -> Head | None:
    """The head marker, or None when there is none or it cannot be read."""
    try:
        data = json.loads((folder / HEAD_FILE).read_bytes())
        return Head(int(data["seq"]), str(data["hash"]), str(data["file"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_head(folder: Path, head: Head) -> None:
    """Replace the head marker atomically (write a temporary file, rename it over)."""
    tmp = folder / f".{HEAD_FILE}.tmp"
    tmp.unlink(missing_ok=True)  # a leftover from a crash may have another mode
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, json.dumps({"seq": head.seq, "hash": head.hash, "file": head.file}).encode())
    finally:
        os.close(fd)
    tmp.replace(folder / HEAD_FILE)


# --- reading ------------------------------------------------------------------------------------------


def lines(stream: IO[bytes]) -> Iterator[bytes]:
    """A binary stream's lines with their newlines; an absurdly long line is cut short, not held whole."""
    while chunk := stream.readline(MAX_LINE):
        if len(chunk) == MAX_LINE and not chunk.endswith(b"\n"):
            ended = _skip_rest_of_line(stream)
            yield chunk + (b"\n" if ended else b"")
        else:
            yield chunk


def _skip_rest_of_line(stream: IO[bytes]) -> bool:
    """Read past the rest of the current line; whether it ended with a newline (not the end of the file)."""
    while chunk := stream.readline(MAX_LINE):
        if chunk.endswith(b"\n"):
            return True
    return False


def parse_record(line: bytes) -> dict[str, Any] | None:
    """A line (without its newline) as a JSON object, or None when it is not one."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def as_utc(moment: datetime) -> datetime:
    """A datetime in UTC; one without a time zone is taken to be UTC already."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def record_time(value: object) -> datetime | None:
    """A record's `time` text as a UTC datetime, or None when it is not a time."""
    if not isinstance(value, str):
        return None
    try:
        return as_utc(datetime.fromisoformat(value))
    except ValueError:
        return None


def file_start(path: Path) -> datetime | None:
    """The UTC time in an audit file's name: when it was opened. None if the name holds no valid time."""
    match = _STAMP.match(path.name)
    if match is None:
        return None
    try:
        return datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def time_windows(files: Sequence[AuditFile]) -> list[tuple[datetime | None, datetime | None]]:
    """For each file, the times its names allow its records: from its start to the next file's, with slack.

    None where the names say nothing: a name without a valid time, the last file's end, or a clock that
    was stepped back between two files.
    """
    starts = [file_start(item.path) for item in files]
    windows: list[tuple[datetime | None, datetime | None]] = []
    for index, begin in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else None
        if begin is not None and end is not None and end < begin:
            end = None
        windows.append((begin - FILE_TIME_SLACK if begin else None, end + FILE_TIME_SLACK if end else None))
    return windows
