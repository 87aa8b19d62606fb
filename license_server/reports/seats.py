"""Seat and machine reports from the seat ledger, read from another process while the daemon writes it."""

from __future__ import annotations

import contextlib
import csv
import itertools
import math
import operator
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple, TextIO

from license_server.audit.search import aligned, csv_value, printable, write_json

LEDGER_NAME = "seats.sqlite3"
EMPTY_SEATS = "(no seat activity in this range)"
EMPTY_MACHINES = "(no matching machines)"
EVERY: Mapping[str, int] = MappingProxyType({"hour": 3600, "day": 86400, "week": 7 * 86400})
DAY = 86400
_WEEK_OFFSET = 4 * DAY  # 1970-01-01 was a Thursday: ISO weeks start 4 days later, on a Monday

SEAT_COLUMNS: tuple[str, ...] = (
    "product_id",
    "key",
    "interval_start",
    "peak_seats",
    "seat_limit",
    "node_locked_machines",
    "distinct_machines",
    "denials",
)
MACHINE_COLUMNS: tuple[str, ...] = (
    "friendly_name",
    "product_id",
    "key",
    "machine_code",
    "first_seen",
    "last_seen",
    "client",
    "calls",
    "floating",
    "deactivated",
    "idle_days",
)
_SEAT_NUMBERS = frozenset(SEAT_COLUMNS[3:])
_MACHINE_NUMBERS = frozenset({"calls", "idle_days"})

License = tuple[str, str]  # (product id, license key as the ledger holds it)
Span = tuple[str, int, int]  # a machine present from one bucket to another, both included

# Leases live within the range, cut to it; a lease is live on [started, end), a release ends it early.
_LEASES = (
    "SELECT machine_code, start, stop FROM ("
    " SELECT machine_code, max(started, :since) AS start,"
    "  min(CASE WHEN released IS NOT NULL AND released < expires THEN released ELSE expires END, :until)"
    "  AS stop"
    " FROM leases WHERE product_id = :product AND license_key = :key"
    "  AND started < :until AND expires > :since"
    ") WHERE stop > start"
)
# Each call row's bucket: the hour that holds `since` counts whole, as the ledger keeps calls by the hour.
# `(hour - origin + size) / size - 1` floors as math.floor does for every hour from one bucket before the
# first on, which is as early as that hour can be; a machine is node-locked where it called without a seat.
_CALLED = (
    "SELECT (hour - :origin + :size) / :size - 1 AS bucket, machine_code, floating = 0 AS node_locked"
    " FROM activity WHERE product_id = :product AND license_key = :key AND hour >= :hour AND hour < :until"
)
# For a license without leases in the range, SQL counts each bucket's machines, and node-locked ones.
_PRESENT = (
    "SELECT bucket, count(DISTINCT machine_code),"  # noqa: S608
    " count(DISTINCT CASE WHEN node_locked THEN machine_code END)"
    f" FROM ({_CALLED}) GROUP BY bucket"
)
# For one with leases, presence() adds their machines to these: each machine that called in a bucket, once,
# whether it was node-locked there, in bucket order.
_CALLERS = f"SELECT bucket, machine_code, max(node_locked) FROM ({_CALLED}) GROUP BY bucket, machine_code"  # noqa: S608
_DENIALS = (
    "SELECT CAST((time - :origin) / :size AS INTEGER) AS bucket, count(*) FROM denials"
    " WHERE product_id = :product AND license_key = :key AND time >= :since AND time < :until GROUP BY bucket"
)
_MACHINES = (
    "SELECT friendly_name, product_id, license_key, machine_code, first_seen, last_seen, client, calls,"
    " floating, deactivated FROM machines"
)
_LIMIT = "SELECT max_machines FROM licenses WHERE product_id = ? AND license_key = ?"
# Tables with an index that starts with (product_id, license_key): their licenses are found by seeks.
_LICENSE_TABLES = ("leases", "activity", "denials")


class LedgerMissingError(Exception):
    """The seat ledger file does not exist: the daemon has not run with this state_dir."""

    def __init__(self, path: Path) -> None:
        """Keep the path that was looked for."""
        super().__init__(f"no seat ledger at {path} yet: the daemon has not run with this state_dir")
        self.path = path


def ledger_path(state_dir: Path) -> Path:
    """Where the daemon keeps its seat ledger."""
    return state_dir / LEDGER_NAME


def open_ledger(path: Path) -> sqlite3.Connection:
    """Open the ledger read-only (the daemon may be writing it); LedgerMissingError if there is none."""
    if not path.is_file():
        raise LedgerMissingError(path)
    return sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, isolation_level=None)


@contextlib.contextmanager
def _snapshot(db: sqlite3.Connection) -> Iterator[None]:
    """One read transaction, so that every query of a report sees the same moment of the ledger."""
    db.execute("BEGIN")
    try:
        yield
    finally:
        db.execute("ROLLBACK")


def iso(moment: float | None) -> str | None:
    """A unix time as ISO 8601 UTC to the second, e.g. 2026-11-01T00:00:00Z; None stays None."""
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- buckets and the sweep --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Buckets:
    """Equal UTC intervals (hours, days or Monday-based weeks) from the one holding `since` to `until`."""

    origin: int  # start of the first bucket, unix time
    size: int  # seconds
    count: int

    @classmethod
    def covering(cls, since: float, until: float, every: str) -> Buckets:
        """The buckets of `every` ("hour", "day" or "week") that meet [since, until)."""
        size = EVERY[every]
        offset = _WEEK_OFFSET if every == "week" else 0
        origin = math.floor((since - offset) / size) * size + offset
        return cls(origin, size, max(0, math.ceil((until - origin) / size)))

    def index(self, moment: float) -> int:
        """The bucket a moment falls in (may lie outside 0..count-1)."""
        return math.floor((moment - self.origin) / self.size)

    def start(self, index: int) -> int:
        """When a bucket starts, unix time."""
        return self.origin + index * self.size


@dataclass(frozen=True, slots=True)
class Sweep:
    """Concurrent leases: the peak in each bucket that had one live, and optionally each change."""

    peaks: dict[int, int]
    steps: list[tuple[float, int]] | None  # (moment, leases live from then on); None if not kept


def sweep(starts: Iterable[float], ends: Iterable[float], buckets: Buckets, *, max_steps: int = 0) -> Sweep:
    """Peak concurrent leases per bucket from one pass over start and end times; leases live on [start, end).

    Every start must have its end, later than itself. The changes are kept when max_steps > 0 and there
    are no more of them than that.
    """
    begun, ended = sorted(starts), sorted(ends)
    begun.append(math.inf)  # so that the loop never runs out of starts before ends
    peaks: dict[int, int] = {}
    steps: list[tuple[float, int]] | None = [] if max_steps > 0 else None
    live = i = j = 0
    current, edge, top = -1, -math.inf, 0  # the bucket swept, where the next starts, its peak so far
    while j < len(ended):
        moment = begun[i] if begun[i] < ended[j] else ended[j]
        if moment >= edge:
            _keep_peak(peaks, current, top, buckets)
            index = buckets.index(moment)
            # Buckets passed since the previous moment had `live` leases all along, and so from their start.
            for passed in range(current + 1, index) if live else ():
                _keep_peak(peaks, passed, live, buckets)
            current, edge = index, buckets.start(index + 1)
            top = live if buckets.start(index) < moment else 0
        # All changes at one moment, then the count: [start, end) does not meet a lease starting at end.
        while j < len(ended) and ended[j] == moment:
            live -= 1
            j += 1
        while begun[i] == moment:
            live += 1
            i += 1
        if live > top:
            top = live
        if steps is not None:
            steps.append((moment, live))
            if len(steps) > max_steps:
                steps = None
    _keep_peak(peaks, current, top, buckets)
    return Sweep(peaks, steps)


def _keep_peak(peaks: dict[int, int], index: int, peak: int, buckets: Buckets) -> None:
    """Note a bucket's peak, if it had a lease live and lies in the range."""
    if peak and 0 <= index < buckets.count:
        peaks[index] = peak


def presence(spans: Iterable[Span]) -> dict[int, int]:
    """How many distinct machines were present in each bucket, from spans that may overlap.

    The spans must come in the order of their first bucket.
    """
    changes: defaultdict[int, int] = defaultdict(int)
    covered: dict[str, int] = {}  # the last bucket each machine is already counted in
    for machine, first, last in spans:
        first = max(first, covered.get(machine, -1) + 1)
        if first <= last:
            changes[first] += 1
            changes[last + 1] -= 1
            covered[machine] = last
    counts: dict[int, int] = {}
    present = 0
    marks = sorted(changes)
    for here, following in itertools.pairwise(marks):
        present += changes[here]
        if present:
            counts.update(dict.fromkeys(range(here, following), present))
    return counts


# --- the seat report ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SeatQuery:
    """Which seats to report: times are unix seconds (since inclusive, until exclusive)."""

    since: float
    until: float
    every: str = "day"
    product: str | None = None  # product id, exact
    key: str | None = None  # license key, any case


class SeatRow(NamedTuple):
    """One license in one bucket (a tuple: a year of a big site has hundreds of thousands)."""

    product_id: str
    key: str
    interval_start: int
    peak_seats: int
    seat_limit: int | None  # 0: no limit; None: never saw a signed license
    node_locked_machines: int
    distinct_machines: int
    denials: int

    def as_dict(self) -> dict[str, object]:
        """The row as JSON and CSV write it."""
        return {
            "product_id": self.product_id,
            "key": self.key,
            "interval_start": iso(self.interval_start),
            "peak_seats": self.peak_seats,
            "seat_limit": self.seat_limit,
            "node_locked_machines": self.node_locked_machines,
            "distinct_machines": self.distinct_machines,
            "denials": self.denials,
        }


@dataclass(frozen=True, slots=True)
class LicenseUsage:
    """One license's rows, and its seats in use over time when a chart wants them."""

    product_id: str
    key: str
    seat_limit: int | None
    rows: tuple[SeatRow, ...]
    steps: tuple[tuple[float, int], ...] | None  # (moment, leases live from then on)

    @property
    def peak(self) -> int:
        """The most floating seats in use at once over the whole range."""
        return max((row.peak_seats for row in self.rows), default=0)

    @property
    def denials(self) -> int:
        """Seats refused over the whole range."""
        return sum(row.denials for row in self.rows)


@dataclass(frozen=True, slots=True)
class SeatReport:
    """Seat use per license and bucket over a time range."""

    query: SeatQuery
    buckets: Buckets
    licenses: tuple[LicenseUsage, ...]

    def rows(self) -> Iterator[SeatRow]:
        """Every row, license by license, in time order."""
        for usage in self.licenses:
            yield from usage.rows


def seat_report(db: sqlite3.Connection, query: SeatQuery, *, max_steps: int = 0) -> SeatReport:
    """Peak floating seats, machines and denials per license and bucket; keeps up to max_steps changes."""
    if query.until <= query.since:
        raise ValueError("--until must be later than --since")
    buckets = Buckets.covering(query.since, query.until, query.every)
    with _snapshot(db):
        found = (_usage(db, license, query, buckets, max_steps) for license in _licenses(db, query))
        return SeatReport(query, buckets, tuple(usage for usage in found if usage.rows))


def _licenses(db: sqlite3.Connection, query: SeatQuery) -> list[License]:
    """The licenses with leases, activity or denials ever, narrowed by the query's product and key."""
    found: set[License] = set()
    for table in _LICENSE_TABLES:
        found.update(_distinct_licenses(db, table, query.product))
    if query.key is not None:
        wanted = query.key.casefold()
        found = {(product, key) for product, key in found if key.casefold() == wanted}
    return sorted(found)


def _distinct_licenses(db: sqlite3.Connection, table: str, product: str | None) -> Iterator[License]:
    """A table's distinct (product, key), each found by one seek in an index that starts with them."""
    # `x >= ?` seeks past all the entries before it at once; `(a, b) > (?, ?)` steps over them one by one.
    products = f"SELECT product_id FROM {table} WHERE product_id >= ? ORDER BY 1 LIMIT 1"  # noqa: S608
    keys = f"SELECT license_key FROM {table} WHERE product_id = ? AND license_key >= ? ORDER BY 1 LIMIT 1"  # noqa: S608
    for each in [product] if product is not None else _seek_each(db, products, ()):
        yield from ((each, key) for key in _seek_each(db, keys, (each,)))


def _seek_each(db: sqlite3.Connection, sql: str, params: tuple[str, ...]) -> Iterator[str]:
    """Each value found by seeking the first at or after a text (the last parameter): a skip-scan by hand."""
    row = db.execute(sql, (*params, "")).fetchone()
    while row is not None:
        yield str(row[0])
        # The smallest text after x is x followed by NUL (texts compare as bytes).
        row = db.execute(sql, (*params, f"{row[0]}\0")).fetchone()


def _usage(
    db: sqlite3.Connection, license: License, query: SeatQuery, buckets: Buckets, max_steps: int
) -> LicenseUsage:
    """One license's rows for the buckets that saw a lease, activity or a denial."""
    product, key = license
    limit = _limit(db, license)
    params = {
        "product": product,
        "key": key,
        "since": query.since,
        "until": query.until,
        "hour": math.floor(query.since / EVERY["hour"]) * EVERY["hour"],
        "origin": buckets.origin,
        "size": buckets.size,
    }
    leases: list[tuple[str, float, float]] = db.execute(_LEASES, params).fetchall()
    seats = sweep([row[1] for row in leases], [row[2] for row in leases], buckets, max_steps=max_steps)
    machines: dict[int, int] = {}
    node_locked: dict[int, int] = {}
    # A license with leases gets its machines merged here: in SQL the leases would be read a second time
    # and every bucket of every lease sorted, which is slower for licenses with many leases.
    if leases:
        spans: list[Span] = []
        for index, machine, locked in db.execute(_CALLERS, params):
            spans.append((machine, index, index))
            if locked:
                node_locked[index] = node_locked.get(index, 0) + 1
        spans.extend(_lease_spans(leases, buckets))
        spans.sort(key=operator.itemgetter(1))  # as presence wants them; two sorted runs merge in one pass
        machines = presence(spans)
    else:
        for index, distinct, locked in db.execute(_PRESENT, params):
            machines[index] = distinct
            if locked:
                node_locked[index] = locked
    denials: dict[int, int] = dict(db.execute(_DENIALS, params).fetchall())
    peaks = seats.peaks
    origin, size = buckets.origin, buckets.size
    rows = tuple(
        SeatRow(
            product,
            key,
            origin + index * size,
            peaks.get(index, 0),
            limit,
            node_locked.get(index, 0),
            machines.get(index, 0),
            denials.get(index, 0),
        )
        for index in sorted(peaks.keys() | machines.keys() | denials.keys())
    )
    steps = tuple(seats.steps) if seats.steps is not None else None
    return LicenseUsage(product, key, limit, rows, steps)


def _limit(db: sqlite3.Connection, license: License) -> int | None:
    """The license's seat limit (0: none), or None if no signed license was seen."""
    row = db.execute(_LIMIT, license).fetchone()
    return None if row is None else int(row[0])


def _lease_spans(leases: list[tuple[str, float, float]], buckets: Buckets) -> list[Span]:
    """The buckets each lease is live in: from the one holding its start to the one before its end."""
    origin, size = buckets.origin, buckets.size
    return [
        (machine, math.floor((start - origin) / size), math.ceil((end - origin) / size) - 1)
        for machine, start, end in leases
    ]


def license_summary(usage: LicenseUsage) -> str:
    """One line an admin understands: the license's overall peak against its limit, and its denials."""
    name = f"{usage.key} (product {usage.product_id})"
    peak, limit = usage.peak, usage.seat_limit
    if limit is None:
        verdict = f"peak {_count(peak, 'floating seat')}, limit unknown (no signed license seen yet)"
    elif limit == 0:
        verdict = f"peak {_count(peak, 'floating seat')}, no seat limit"
    elif peak > limit:
        verdict = f"peak {peak} of {_count(limit, 'seat')}: {peak - limit} over the limit (overdraft)"
    elif peak == limit:
        verdict = f"peak {peak} of {_count(limit, 'seat')}: at the limit"
    else:
        verdict = f"peak {peak} of {_count(limit, 'seat')}"
    return printable(f"{name}: {verdict}; {_count(usage.denials, 'denial')}")


def _count(number: int, noun: str) -> str:
    """A number and its noun, plural unless it is 1."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


# --- the machines report ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineQuery:
    """Which machines to list; `now` is unix seconds, for idle days."""

    now: float
    idle_days: int | None = None  # only machines not seen for this long, and not deactivated
    name: str | None = None  # part of the friendly name, any case
    product: str | None = None  # product id, exact
    key: str | None = None  # license key, any case


def machines(db: sqlite3.Connection, query: MachineQuery) -> list[dict[str, object]]:
    """The machines the query asks for: longest idle first with idle_days, else by name and key."""
    conditions: list[str] = ["1"]
    params: list[object] = []
    if query.product is not None:
        conditions.append("product_id = ?")
        params.append(query.product)
    if query.key is not None:
        conditions.append("license_key = ? COLLATE NOCASE")
        params.append(query.key)
    order = "friendly_name COLLATE NOCASE, license_key, product_id, machine_code"
    if query.idle_days is not None:
        conditions.append("last_seen <= ? AND deactivated IS NULL")
        params.append(query.now - query.idle_days * DAY)
        order = f"last_seen, {order}"
    where = " AND ".join(conditions)
    sql = f"{_MACHINES} WHERE {where} ORDER BY {order}"
    wanted = query.name.casefold() if query.name is not None else None
    rows = db.execute(sql, params).fetchall()
    # In Python, not LIKE: SQLite folds only ASCII letters, and names are often not English.
    return [_machine(row, query.now) for row in rows if wanted is None or wanted in str(row[0]).casefold()]


def _machine(row: Sequence[object], now: float) -> dict[str, object]:
    """One machines row as the report shows it."""
    name, product, key, code, first_seen, last_seen, client, calls, floating, deactivated = row
    assert isinstance(first_seen, float | int)
    assert isinstance(last_seen, float | int)
    assert deactivated is None or isinstance(deactivated, float | int)
    return {
        "friendly_name": name,
        "product_id": product,
        "key": key,
        "machine_code": code,
        "first_seen": iso(first_seen),
        "last_seen": iso(last_seen),
        "client": client,
        "calls": calls,
        "floating": bool(floating),
        "deactivated": iso(deactivated),
        "idle_days": max(0, int((now - last_seen) // DAY)),
    }


# --- output -----------------------------------------------------------------------------------------


def write_seats(report: SeatReport, out: TextIO, form: str) -> int:
    """Write the seat report as a table, CSV or JSON lines; returns how many rows."""
    if form == "table":
        return _write_seat_table(report, out)
    if form == "json":
        return write_json((row.as_dict() for row in report.rows()), out)
    return _write_seat_csv(report, out)


def write_machines(rows: list[dict[str, object]], out: TextIO, form: str) -> int:
    """Write the machines report as a table, CSV or JSON lines; returns how many rows."""
    if form == "json":
        return write_json(rows, out)
    if form == "csv":
        return _write_csv(rows, MACHINE_COLUMNS, out)
    if not rows:
        out.write(EMPTY_MACHINES + "\n")
        return 0
    cells = [[_cell(row[column]) for column in MACHINE_COLUMNS] for row in rows]
    _write_table(cells, MACHINE_COLUMNS, _MACHINE_NUMBERS, out, footers={})
    return len(rows)


def _write_seat_table(report: SeatReport, out: TextIO) -> int:
    """The seat rows as aligned columns, each license's rows followed by its summary line."""
    if not report.licenses:
        out.write(EMPTY_SEATS + "\n")
        return 0
    cells: list[list[str]] = []
    footers: dict[int, str] = {}  # after which row each summary goes
    for usage in report.licenses:
        cells.extend(
            [_seat_cell(column, value) for column, value in row.as_dict().items()] for row in usage.rows
        )
        footers[len(cells) - 1] = license_summary(usage)
    _write_table(cells, SEAT_COLUMNS, _SEAT_NUMBERS, out, footers=footers)
    return len(cells)


def _seat_cell(column: str, value: object) -> str:
    """One cell of the seat table: a limit of 0 reads 'none', an unknown one '?'."""
    if column == "seat_limit":
        return "?" if value is None else "none" if value == 0 else str(value)
    return _cell(value)


def _cell(value: object) -> str:
    """One table cell: null as '-', booleans as yes/no, control characters escaped."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return printable(str(value))


def _write_table(
    cells: list[list[str]],
    columns: Sequence[str],
    numbers: frozenset[str],
    out: TextIO,
    *,
    footers: dict[int, str],
) -> None:
    """Aligned columns under a header; a footer line (and a blank line) after the rows footers name."""
    widths = [max(len(column), *(len(row[index]) for row in cells)) for index, column in enumerate(columns)]
    out.write(aligned(columns, widths, columns, numbers))
    for number, row in enumerate(cells):
        out.write(aligned(row, widths, columns, numbers))
        if number in footers:
            out.write(f"  {footers[number]}\n" + ("\n" if number + 1 < len(cells) else ""))


def _write_seat_csv(report: SeatReport, out: TextIO) -> int:
    """The seat rows as CSV, as _write_csv writes them, a license at a time."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SEAT_COLUMNS)
    stamps: dict[int, str | None] = {}  # interval starts repeat across licenses: each is formatted once
    written = 0
    for usage in report.licenses:
        product, key = csv_value(usage.product_id), csv_value(usage.key)  # a workstation chose these
        for row in usage.rows:
            start = row.interval_start
            stamp = stamps[start] if start in stamps else stamps.setdefault(start, iso(start))
            limit = "" if row.seat_limit is None else row.seat_limit
            writer.writerow(
                (
                    product,
                    key,
                    stamp,
                    row.peak_seats,
                    limit,
                    row.node_locked_machines,
                    row.distinct_machines,
                    row.denials,
                )
            )
        written += len(usage.rows)
    return written


def _write_csv(rows: list[dict[str, object]], columns: Sequence[str], out: TextIO) -> int:
    """A header and one line per row: null empty, booleans true/false."""
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: _csv_cell(row[column]) for column in columns})
    return len(rows)


def _csv_cell(value: object) -> object:
    """A CSV cell, booleans spelt as in JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return csv_value(value)
