"""Finds audit records by license key, machine, name, address and time, opening only files that can match."""

from __future__ import annotations

import csv
import itertools
import json
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, TextIO

from license_server.audit import chain

# The fields of a `call` record after seq, time, prev and type, in the order the daemon writes them.
CALL_FIELDS: tuple[str, ...] = (
    "request_id",
    "client",
    "http_method",
    "api_method",
    "product_id",
    "key",
    "machine",
    "friendly_name",
    "floating_interval",
    "action",
    "status",
    "upstream_status",
    "result",
    "message",
    "failure",
    "latency_ms",
    "bytes",
)
ACTIONS: tuple[str, ...] = (
    "forwarded",
    "kept_fresh",
    "kept_stale",
    "license_file",
    "refused",
    "upstream_failed",
)
# What an admin did in the console (the `action` of an `admin` record).
ADMIN_ACTIONS: tuple[str, ...] = (
    "login",
    "login_failed",
    "bearer_failed",
    "logout",
    "deactivate",
    "activate",
    "download",
)
# A record may be stamped a moment before its file is opened, and clocks are stepped by small amounts.
FILE_TIME_SLACK = timedelta(minutes=1)
MAX_LINE = 16 * 1024 * 1024  # far beyond any record; a longer line is read only this far

_STAMP = re.compile(r"audit-(\d{8}T\d{6}Z)-", re.ASCII)
_RELATIVE = re.compile(r"(\d+)\s*([smhdw])", re.ASCII)
_UNIT_SECONDS = MappingProxyType({"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400})
_SEARCHED_TYPES = frozenset({chain.CALL, chain.ADMIN})
_TABLE_COLUMNS = (
    "time",
    "client",
    "api_method",
    "key",
    "machine",
    "friendly_name",
    "action",
    "result",
    "message",
    "latency_ms",
)
_RIGHT_ALIGNED = frozenset({"result", "latency_ms"})
_MESSAGE_WIDTH = 40
_WIDTH_SAMPLE = 200  # rows read before the table's column widths are fixed
_CSV_COLUMNS = ("seq", "time", "type", *CALL_FIELDS, "actor", "details")
# First characters that make a spreadsheet read a cell as a formula (or, for tab and CR, can be trimmed
# away in front of one); the full-width forms are read as formulas by some spreadsheets in East Asian locales.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")


@dataclass(frozen=True, slots=True, kw_only=True)
class Query:
    """What to look for; every filter given must match, times are UTC (since inclusive, until exclusive)."""

    key: str | None = None  # license key, any case, whole key
    machine: str | None = None  # machine code, exact
    name: str | None = None  # part of the friendly name, any case
    since: datetime | None = None
    until: datetime | None = None
    product: str | None = None  # product id, exact
    action: str | None = None  # what the daemon or an admin did, one of ACTIONS or ADMIN_ACTIONS
    client: str | None = None  # workstation address, exact

    def matches(self, record: dict[str, Any]) -> bool:
        """Whether one parsed record is a call or admin record that passes every filter."""
        if record.get("type") not in _SEARCHED_TYPES:
            return False
        if self.key is not None and _folded(record.get("key")) != self.key.casefold():
            return False
        name = _folded(record.get("friendly_name"))
        if self.name is not None and (name is None or self.name.casefold() not in name):
            return False
        exact = (
            (self.machine, "machine"),
            (self.product, "product_id"),
            (self.action, "action"),
            (self.client, "client"),
        )
        if any(want is not None and record.get(field) != want for want, field in exact):
            return False
        return self._in_time(record)

    def _in_time(self, record: dict[str, Any]) -> bool:
        """Whether the record's time lies within since/until (a record without a readable time does not)."""
        if self.since is None and self.until is None:
            return True
        when = record_time(record.get("time"))
        if when is None:
            return False
        return (self.since is None or when >= _utc(self.since)) and (
            self.until is None or when < _utc(self.until)
        )

    def needles(self) -> list[tuple[bytes, bool]]:
        """Byte strings every matching line contains, with whether to look for them in the lower-cased line.

        A cheap test before parsing: lines are canonical JSON, so a wanted value appears in them exactly as
        json.dumps writes it.
        """
        found = [
            (_encoded(value), False)
            for value in (self.machine, self.product, self.action, self.client)
            if value is not None
        ]
        if self.key is not None:
            found.append((_encoded(self.key.casefold()), True))
        return found


@dataclass(slots=True)
class SearchStats:
    """What a search read: files opened and skipped by time, and lines it could not parse."""

    files_read: int = 0
    files_skipped: int = 0
    bad_lines: int = 0


def search(folder: Path, query: Query, *, stats: SearchStats | None = None) -> Iterator[dict[str, Any]]:
    """The call and admin records in `folder` that match `query`, in chain order, read as they are needed."""
    tally = stats if stats is not None else SearchStats()
    needles = query.needles()
    for path in _files_in_range(folder, query, tally):
        yield from _matching(path, query, needles, tally)


def _files_in_range(folder: Path, query: Query, stats: SearchStats) -> Iterator[Path]:
    """The trail's files that can hold records between since and until, judged by their names' times."""
    files = chain.list_files(folder)
    since = _utc(query.since) if query.since is not None else None
    until = _utc(query.until) if query.until is not None else None
    for item, (low, high) in zip(files, time_windows(files), strict=True):
        too_late = until is not None and low is not None and low >= until
        too_early = since is not None and high is not None and high < since
        if too_late or too_early:
            stats.files_skipped += 1
        else:
            yield item.path


def time_windows(files: Sequence[chain.AuditFile]) -> list[tuple[datetime | None, datetime | None]]:
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


def _matching(
    path: Path, query: Query, needles: list[tuple[bytes, bool]], stats: SearchStats
) -> Iterator[dict[str, Any]]:
    """The records of one file that match the query."""
    stats.files_read += 1
    with path.open("rb") as stream:
        for raw in lines(stream):
            if not raw.endswith(b"\n"):
                continue  # a line still being written, or a crash's torn tail; `audit verify` reports those
            line = raw[:-1]
            if not all(_contains(line, needle, folded) for needle, folded in needles):
                continue
            record = parse_record(line)
            if record is None:
                stats.bad_lines += 1
            elif query.matches(record):
                yield record


def _contains(line: bytes, needle: bytes, folded: bool) -> bool:
    """Whether a line may hold a value: a quick test that never rules out a true match."""
    if not folded:
        return needle in line
    # bytes.lower only folds ASCII, so a line with other characters is left to the full test.
    return not line.isascii() or needle in line.lower()


def _encoded(value: str) -> bytes:
    """A text value exactly as it appears in a canonical line, quotes included."""
    return json.dumps(value, ensure_ascii=False).encode()


def _folded(value: object) -> str | None:
    """Text folded for comparison without case, or None for a value that is not text."""
    return value.casefold() if isinstance(value, str) else None


def _utc(moment: datetime) -> datetime:
    """A datetime in UTC; one without a time zone is taken to be UTC already."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


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


def file_start(path: Path) -> datetime | None:
    """The UTC time in an audit file's name: when it was opened. None if the name holds no valid time."""
    match = _STAMP.match(path.name)
    if match is None:
        return None
    try:
        return datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def record_time(value: object) -> datetime | None:
    """A record's `time` text as a UTC datetime, or None when it is not a time."""
    if not isinstance(value, str):
        return None
    try:
        return _utc(datetime.fromisoformat(value))
    except ValueError:
        return None


def parse_time(text: str, now: datetime) -> datetime:
    """A UTC time from 2026-11-01, 2026-11-01T08:00, 2026-11-01T08:00:00Z or 7d/12h/30m ago."""
    cleaned = text.strip()
    expected = (
        "expected a time like 2026-11-01, 2026-11-01T08:00 or 2026-11-01T08:00:00Z, "
        f"or a time ago like 7d, 12h or 30m; got {text!r}"
    )
    relative = _RELATIVE.fullmatch(cleaned)
    try:
        if relative is not None:
            return _utc(now) - timedelta(seconds=int(relative.group(1)) * _UNIT_SECONDS[relative.group(2)])
        return _utc(datetime.fromisoformat(cleaned))
    except (ValueError, OverflowError):
        raise ValueError(expected) from None


# --- output ---------------------------------------------------------------------------------------


def write_json(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    """Write records as JSON lines, every value exact; returns how many."""
    count = 0
    for record in records:
        out.write(json_text(record) + "\n")
        count += 1
    return count


def json_text(value: object) -> str:
    """Compact JSON that decodes to exactly `value`, with every unprintable character as a \\u escape.

    Programs read the exact value back; a terminal that shows the line gets no control or bidirectional
    character (json.dumps itself escapes only those below U+0020).
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if text.isprintable():
        return text
    # Outside strings JSON has only printable ASCII, so every character replaced here is inside a string.
    return "".join(char if char.isprintable() else json.dumps(char)[1:-1] for char in text)


def write_csv(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    """Write a header and one row per record with every call field (admin records: actor and details)."""
    writer = csv.DictWriter(out, fieldnames=_CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    count = 0
    for record in records:
        row = {column: csv_value(record.get(column)) for column in _CSV_COLUMNS}
        row["details"] = csv_value(_details(record, _CSV_COLUMNS))
        writer.writerow(row)
        count += 1
    return count


def write_table(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    """Write records as aligned columns under a header; widths are fixed from the first rows, to stream."""
    rows = (_table_row(record) for record in records)
    sample = list(itertools.islice(rows, _WIDTH_SAMPLE))
    if not sample:
        out.write("(no matching records)\n")
        return 0
    widths = [
        max(len(column), *(len(row[index]) for row in sample)) for index, column in enumerate(_TABLE_COLUMNS)
    ]
    out.write(aligned(list(_TABLE_COLUMNS), widths))
    count = 0
    for row in itertools.chain(sample, rows):
        out.write(aligned(row, widths))
        count += 1
    return count


def _table_row(record: dict[str, Any]) -> list[str]:
    """The table cells of one record; an admin record shows its actor as client and its details as message."""
    values = record
    if record.get("type") == chain.ADMIN:
        shown = ("key", "machine", "friendly_name", "action")
        values = {
            "time": record.get("time"),
            "client": record.get("actor"),
            "api_method": "(admin)",
            **{column: record.get(column) for column in shown},
            "message": _details(record, ("actor", *shown)),
        }
    return [_cell(values.get(column), column) for column in _TABLE_COLUMNS]


def _cell(value: object, column: str) -> str:
    """One table cell: null as '-', latency to 0.1 ms, control characters escaped, the message cut short."""
    if value is None:
        text = "-"
    elif column == "latency_ms" and isinstance(value, int | float) and not isinstance(value, bool):
        text = f"{value:.1f}"
    else:
        text = printable(str(value))
    if column == "message" and len(text) > _MESSAGE_WIDTH:
        text = text[: _MESSAGE_WIDTH - 1] + "…"
    return text


def printable(text: str) -> str:
    """Text with control, bidirectional and other unprintable characters as visible escapes, e.g. \\x1b."""
    # Workstations choose keys, machine codes and names: never let them put terminal escapes on an admin's
    # screen, nor reorder what a table or a spreadsheet shows.
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def aligned(
    cells: Sequence[str],
    widths: Sequence[int],
    columns: Sequence[str] = _TABLE_COLUMNS,
    right_aligned: Collection[str] = _RIGHT_ALIGNED,
) -> str:
    """One table line: cells padded to their column's width, numbers to the right."""
    parts = [
        cell.rjust(width) if column in right_aligned else cell.ljust(width)
        for cell, width, column in zip(cells, widths, columns, strict=True)
    ]
    return "  ".join(parts).rstrip() + "\n"


def csv_value(value: object) -> object:
    """A field as a CSV cell: null empty, nested values as JSON, text made safe for a spreadsheet.

    Every CSV writer writes its cells through this. Text gets unprintable characters as visible escapes, and
    text a spreadsheet would take for a formula (= + - @, their full-width forms, a tab or carriage return
    first) gets a leading single quote, as OWASP advises; numbers stay numbers.
    """
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json_text(value)
    if isinstance(value, str):
        return _neutralised(value)
    return value


def _neutralised(text: str) -> str:
    """Text as a CSV cell: visible escapes, and a quote first if it would start a formula."""
    if text.startswith(_FORMULA_STARTS):
        return "'" + printable(text)
    return printable(text)


def _details(record: dict[str, Any], shown: Iterable[str]) -> str:
    """The fields not shown elsewhere (nor the chain's own) as compact JSON; empty if there are none."""
    skip = {"seq", "time", "prev", "type", *shown}
    rest = {name: value for name, value in record.items() if name not in skip}
    return json_text(rest) if rest else ""
