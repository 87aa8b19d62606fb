"""The audit trail's file format: canonical lines, the hash chain, file names and the head marker."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from license_server.storage.state import open_private

GENESIS = "0" * 64  # the `prev` of the very first record
HEAD_FILE = "head.json"
_FILE_NAME = re.compile(r"^audit-(\d{8}T\d{6}Z)-(\d{12})\.jsonl$")

# Record types. A "call" is a workstation call; the others explain the chain itself.
CALL = "call"
START = "start"
STOP = "stop"
RECOVERED = "recovered"  # a torn tail or lost records found at start, set aside, chain continued
RETENTION = "retention"  # older files removed by the retention policy
GAP = "gap"  # records that could not be written while the log was failing (on_failure: continue)
ADMIN = "admin"  # an admin action


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
