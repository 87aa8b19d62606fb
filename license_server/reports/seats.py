"""The seat report: what a snapshot of the seat ledger adds up to (sweeps, buckets, peaks)."""

from __future__ import annotations

import itertools
import math
import operator
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple, TextIO

from license_server.reports.tables import (
    cell,
    csv_value,
    iso,
    printable,
    write_json,
    write_prepared_csv,
    write_table,
)
from license_server.storage.interfaces import SeatSnapshot
from license_server.storage.seats import License, Window

EMPTY_SEATS = "(no seat activity in this range)"
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
_SEAT_NUMBERS = frozenset(SEAT_COLUMNS[3:])

Span = tuple[str, int, int]  # a machine present from one bucket to another, both included


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


def seat_report(ledger: SeatSnapshot, query: SeatQuery, *, max_steps: int = 0) -> SeatReport:
    """Peak floating seats, machines and denials per license and bucket; keeps up to max_steps changes."""
    if query.until <= query.since:
        raise ValueError("--until must be later than --since")
    buckets = Buckets.covering(query.since, query.until, query.every)
    window = Window(query.since, query.until, buckets.origin, buckets.size)
    found = (_usage(ledger, license, window, buckets, max_steps) for license in _licenses(ledger, query))
    return SeatReport(query, buckets, tuple(usage for usage in found if usage.rows))


def _licenses(ledger: SeatSnapshot, query: SeatQuery) -> list[License]:
    """The licenses with leases, activity or denials ever, narrowed by the query's product and key."""
    found = ledger.licenses(query.product)
    if query.key is not None:
        wanted = query.key.casefold()
        found = [(product, key) for product, key in found if key.casefold() == wanted]
    return found


def _usage(
    ledger: SeatSnapshot, license: License, window: Window, buckets: Buckets, max_steps: int
) -> LicenseUsage:
    """One license's rows for the buckets that saw a lease, activity or a denial."""
    product, key = license
    limit = ledger.limit(license)
    leases = ledger.leases(license, window)
    seats = sweep([row[1] for row in leases], [row[2] for row in leases], buckets, max_steps=max_steps)
    machines: dict[int, int] = {}
    node_locked: dict[int, int] = {}
    # A license with leases gets its machines merged here: in SQL the leases would be read a second time
    # and every bucket of every lease sorted, which is slower for licenses with many leases.
    if leases:
        spans: list[Span] = []
        for index, machine, locked in ledger.callers(license, window):
            spans.append((machine, index, index))
            if locked:
                node_locked[index] = node_locked.get(index, 0) + 1
        spans.extend(_lease_spans(leases, buckets))
        spans.sort(key=operator.itemgetter(1))  # as presence wants them; two sorted runs merge in one pass
        machines = presence(spans)
    else:
        for index, distinct, locked in ledger.presence(license, window):
            machines[index] = distinct
            if locked:
                node_locked[index] = locked
    denials = ledger.denials(license, window)
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


# --- output -----------------------------------------------------------------------------------------


def write_seats(report: SeatReport, out: TextIO, form: str) -> int:
    """Write the seat report as a table, CSV or JSON lines; returns how many rows."""
    if form == "table":
        return _write_seat_table(report, out)
    if form == "json":
        return write_json((row.as_dict() for row in report.rows()), out)
    return write_prepared_csv(SEAT_COLUMNS, _seat_csv_rows(report), out)


def _write_seat_table(report: SeatReport, out: TextIO) -> int:
    """The seat rows as aligned columns, each license's rows followed by its summary line."""
    cells: list[list[str]] = []
    footers: dict[int, str] = {}  # after which row each summary goes
    for usage in report.licenses:
        cells.extend(
            [_seat_cell(column, value) for column, value in row.as_dict().items()] for row in usage.rows
        )
        footers[len(cells) - 1] = license_summary(usage)
    return write_table(
        SEAT_COLUMNS, cells, out, empty=EMPTY_SEATS, right_aligned=_SEAT_NUMBERS, footers=footers
    )


def _seat_cell(column: str, value: object) -> str:
    """One cell of the seat table: a limit of 0 reads 'none', an unknown one '?'."""
    if column == "seat_limit":
        return "?" if value is None else "none" if value == 0 else str(value)
    return cell(value)


def _seat_csv_rows(report: SeatReport) -> Iterator[tuple[object, ...]]:
    """The seat rows as CSV cells, a license at a time, each repeated cell made once."""
    stamps: dict[int, object] = {}  # interval starts repeat across licenses
    for usage in report.licenses:
        product, key = csv_value(usage.product_id), csv_value(usage.key)  # a workstation chose these
        for row in usage.rows:
            start = row.interval_start
            stamp = stamps[start] if start in stamps else stamps.setdefault(start, csv_value(iso(start)))
            yield (
                product,
                key,
                stamp,
                row.peak_seats,
                "" if row.seat_limit is None else row.seat_limit,
                row.node_locked_machines,
                row.distinct_machines,
                row.denials,
            )
