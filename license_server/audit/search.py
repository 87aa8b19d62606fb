"""Finds audit records by license key, machine, name, address and time, opening only files that can match."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from license_server.audit import chain
from license_server.config import parse_duration
from license_server.reports import tables

if TYPE_CHECKING:
    from license_server.storage.pg_audit import PgAuditStore

# What the daemon did with a call (the `action` of a `call` record).
ACTIONS: tuple[str, ...] = tuple(action.value for action in chain.Action)
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
_CSV_COLUMNS = ("seq", "time", "type", *chain.CALL_FIELDS, "actor", "details")


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
    node: str | None = None  # the node that wrote the record, exact: only the shared trail knows it

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
        when = chain.record_time(record.get("time"))
        if when is None:
            return False
        return (self.since is None or when >= chain.as_utc(self.since)) and (
            self.until is None or when < chain.as_utc(self.until)
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


# Record times are text to the microsecond; the database's seconds are a float, so its range is widened.
_TIME_SLACK = 0.001


def search_database(
    store: PgAuditStore, query: Query, *, stats: SearchStats | None = None
) -> Iterator[dict[str, Any]]:
    """The call and admin records of every node in the shared trail that match, by time, node and seq.

    Each record comes with the name of the node that wrote it as `node`, its first field.
    """
    tally = stats if stats is not None else SearchStats()
    needles = query.needles()
    rows = store.records(
        None if query.since is None else chain.as_utc(query.since).timestamp() - _TIME_SLACK,
        None if query.until is None else chain.as_utc(query.until).timestamp() + _TIME_SLACK,
        None if query.node is None else [query.node],
        containing=[needle for needle, folded in needles if not folded],
    )
    folded = [needle for needle in needles if needle[1]]
    for node, _, _, line in rows:
        if not all(_contains(line, needle, True) for needle, _ in folded):
            continue
        record = chain.parse_record(line)
        if record is None:
            tally.bad_lines += 1
        elif query.matches(record):
            yield {"node": node, **record}


def _files_in_range(folder: Path, query: Query, stats: SearchStats) -> Iterator[Path]:
    """The trail's files that can hold records between since and until, judged by their names' times."""
    files = chain.list_files(folder)
    since = chain.as_utc(query.since) if query.since is not None else None
    until = chain.as_utc(query.until) if query.until is not None else None
    for item, (low, high) in zip(files, chain.time_windows(files), strict=True):
        too_late = until is not None and low is not None and low >= until
        too_early = since is not None and high is not None and high < since
        if too_late or too_early:
            stats.files_skipped += 1
        else:
            yield item.path


def _matching(
    path: Path, query: Query, needles: list[tuple[bytes, bool]], stats: SearchStats
) -> Iterator[dict[str, Any]]:
    """The records of one file that match the query."""
    stats.files_read += 1
    with path.open("rb") as stream:
        for raw in chain.lines(stream):
            if not raw.endswith(b"\n"):
                continue  # a line still being written, or a crash's torn tail; `audit verify` reports those
            line = raw[:-1]
            if not all(_contains(line, needle, folded) for needle, folded in needles):
                continue
            record = chain.parse_record(line)
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


def parse_time(text: str, now: datetime) -> datetime:
    """A UTC time from 2026-11-01, 2026-11-01T08:00, 2026-11-01T08:00:00Z or 7d/12h/30m ago."""
    cleaned = text.strip()
    expected = (
        "expected a time like 2026-11-01, 2026-11-01T08:00 or 2026-11-01T08:00:00Z, "
        f"or a time ago like 7d, 12h or 30m; got {text!r}"
    )
    with contextlib.suppress(ValueError):  # a time ago, in the settings' duration grammar; else a time
        return chain.as_utc(now) - timedelta(seconds=parse_duration(cleaned))
    try:
        return chain.as_utc(datetime.fromisoformat(cleaned))
    except (ValueError, OverflowError):
        raise ValueError(expected) from None


# --- output: records as rows for the writers of reports/tables.py --------------------------------------


def write_table(records: Iterable[dict[str, Any]], out: TextIO, *, nodes: bool = False) -> int:
    """Write records as aligned columns under a header; widths are fixed from the first rows, to stream.

    `nodes`: records of the shared trail, shown with the node that wrote each.
    """
    columns = _columns(_TABLE_COLUMNS, nodes, after=1)
    rows = (_table_row(record, columns) for record in records)
    return tables.write_table(
        columns,
        rows,
        out,
        empty="(no matching records)",
        right_aligned=_RIGHT_ALIGNED,
        width_sample=_WIDTH_SAMPLE,
    )


def write_csv(records: Iterable[dict[str, Any]], out: TextIO, *, nodes: bool = False) -> int:
    """Write a header and one row per record with every call field (admin records: actor and details).

    `nodes`: records of the shared trail, with the node that wrote each as the first column.
    """
    columns = _columns(_CSV_COLUMNS, nodes, after=0)
    return tables.write_csv(columns, (_csv_row(record, columns) for record in records), out)


def _columns(columns: tuple[str, ...], nodes: bool, *, after: int) -> tuple[str, ...]:
    """The columns, with `node` put in at position `after` for records of the shared trail."""
    return (*columns[:after], "node", *columns[after:]) if nodes else columns


def _csv_row(record: dict[str, Any], columns: tuple[str, ...] = _CSV_COLUMNS) -> list[object]:
    """The CSV cells of one record: its call fields (or actor), and what else it holds as JSON details."""
    return [*(record.get(column) for column in columns[:-1]), _details(record, columns)]


def _table_row(record: dict[str, Any], columns: tuple[str, ...] = _TABLE_COLUMNS) -> list[str]:
    """The table cells of one record; an admin record shows its actor as client and its details as message."""
    values = record
    if record.get("type") == chain.ADMIN:
        shown = ("key", "machine", "friendly_name", "action")
        values = {
            "time": record.get("time"),
            "node": record.get("node"),
            "client": record.get("actor"),
            "api_method": "(admin)",
            **{column: record.get(column) for column in shown},
            "message": _details(record, ("actor", "node", *shown)),
        }
    return [_cell(values.get(column), column) for column in columns]


def _cell(value: object, column: str) -> str:
    """One table cell: null as '-', latency to 0.1 ms, control characters escaped, the message cut short."""
    if column == "latency_ms" and isinstance(value, int | float) and not isinstance(value, bool):
        text = f"{value:.1f}"
    else:
        text = tables.cell(value)
    if column == "message" and len(text) > _MESSAGE_WIDTH:
        text = text[: _MESSAGE_WIDTH - 1] + "…"
    return text


def _details(record: dict[str, Any], shown: Iterable[str]) -> str:
    """The fields not shown elsewhere (nor the chain's own) as compact JSON; empty if there are none."""
    skip = {"seq", "time", "prev", "type", *shown}
    rest = {name: value for name, value in record.items() if name not in skip}
    return tables.json_text(rest) if rest else ""
