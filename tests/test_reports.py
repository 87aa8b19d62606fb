"""Tests for `report seats` and `report machines` on ledgers written row by row with SQL."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import ledger as bench_ledger
from license_server.cli import main
from license_server.reports import charts, tables
from license_server.reports import machines as machine_report
from license_server.reports import seats as reports
from license_server.reports.machines import MachineQuery
from license_server.reports.seats import Buckets, SeatQuery, SeatReport
from license_server.storage.seats import SCHEMA, SqliteSeatReader
from license_server.storage.state import SEATS_FILE

PRODUCT = "3349"
KEY = "MUYVD-LSEBY-CXHRQ-XFAGY"
OTHER_KEY = "KQXJA-WBTFA-PMOZE-RNFRS"
HOUR = 3600
DAY = 86400
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def at(day: int, hour: float = 0, minute: float = 0) -> float:
    """Unix time of 2026-11-<day> at hour:minute UTC; 2026-11-02 is a Monday."""
    return datetime(2026, 11, day, tzinfo=UTC).timestamp() + hour * HOUR + minute * 60


def stamp(day: int, hour: int = 0) -> str:
    """The interval_start text of a bucket starting 2026-11-<day> at hour:00 UTC."""
    return f"2026-11-{day:02d}T{hour:02d}:00:00Z"


class Ledger:
    """A seat ledger written row by row, the way the daemon's SCHEMA lays it out."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SEATS_FILE
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the writing connection."""
        self.db.close()

    def license(self, max_machines: int, *, product: str = PRODUCT, key: str = KEY) -> None:
        """The limit of a signed license."""
        self.db.execute("INSERT OR REPLACE INTO licenses VALUES (?, ?, ?, 0)", (product, key, max_machines))

    def lease(
        self,
        machine: str,
        started: float,
        expires: float,
        *,
        released: float | None = None,
        product: str = PRODUCT,
        key: str = KEY,
    ) -> None:
        """A floating lease."""
        self.db.execute(
            "INSERT INTO leases (product_id, license_key, machine_code, started, expires, released,"
            " overdraft, renewals, granted_by, boot_id, deadline)"
            " VALUES (?, ?, ?, ?, ?, ?, 0, 0, 'upstream', 'boot', 0)",
            (product, key, machine, started, expires, released),
        )

    def activity(
        self, machine: str, moment: float, *, floating: bool = True, product: str = PRODUCT, key: str = KEY
    ) -> None:
        """Calls of a machine in the hour that holds `moment`."""
        hour = int(moment // HOUR * HOUR)
        self.db.execute(
            "INSERT INTO activity VALUES (?, ?, ?, ?, ?, 1)", (product, key, hour, machine, int(floating))
        )

    def denial(
        self,
        machine: str,
        moment: float,
        *,
        product: str = PRODUCT,
        key: str = KEY,
        interval: float | None = None,
    ) -> None:
        """A refused seat, asking for `interval` seconds (None: kept before the ledger kept intervals)."""
        self.db.execute(
            "INSERT INTO denials (product_id, license_key, machine_code, time, denied_by, message,"
            " floating_interval) VALUES (?, ?, ?, ?, 'local', 'limit reached', ?)",
            (product, key, machine, moment, interval),
        )

    def machine(
        self,
        code: str,
        name: str,
        *,
        last_seen: float,
        first_seen: float | None = None,
        deactivated: float | None = None,
        floating: bool = True,
        product: str = PRODUCT,
        key: str = KEY,
    ) -> None:
        """A machines row."""
        self.db.execute(
            "INSERT INTO machines VALUES (?, ?, ?, ?, '10.0.0.7', ?, ?, ?, 3, ?)",
            (
                product,
                key,
                code,
                name,
                int(floating),
                first_seen if first_seen is not None else last_seen - DAY,
                last_seen,
                deactivated,
            ),
        )

    def report(
        self,
        since: float,
        until: float,
        every: str = "day",
        *,
        product: str | None = None,
        key: str | None = None,
    ) -> SeatReport:
        """The seat report, read through a read-only connection as the CLI reads it."""
        query = SeatQuery(since=since, until=until, every=every, product=product, key=key)
        with SqliteSeatReader(self.path).snapshot() as snapshot:
            return reports.seat_report(snapshot, query)

    def rows(
        self,
        since: float,
        until: float,
        every: str = "day",
        *,
        product: str | None = None,
        key: str | None = None,
    ) -> list[dict[str, object]]:
        """The seat report's rows as JSON writes them."""
        return [row.as_dict() for row in self.report(since, until, every, product=product, key=key).rows()]

    def machines(
        self,
        now: float,
        *,
        idle_days: int | None = None,
        name: str | None = None,
        product: str | None = None,
        key: str | None = None,
    ) -> list[dict[str, object]]:
        """The machines report."""
        query = MachineQuery(now=now, idle_days=idle_days, name=name, product=product, key=key)
        with SqliteSeatReader(self.path).snapshot() as snapshot:
            return machine_report.machines(snapshot, query)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """An empty ledger in tmp_path, the state_dir."""
    built = Ledger(tmp_path)
    yield built
    built.close()


def peaks(rows: list[dict[str, object]]) -> dict[object, object]:
    """peak_seats by interval_start."""
    return {row["interval_start"]: row["peak_seats"] for row in rows}


def column(rows: list[dict[str, object]], name: str) -> dict[object, object]:
    """One column by interval_start."""
    return {row["interval_start"]: row[name] for row in rows}


# --- peaks --------------------------------------------------------------------------------------------


def test_peak_is_the_most_leases_live_at_one_moment(ledger: Ledger) -> None:
    ledger.lease("a", at(3, 8), at(3, 12))
    ledger.lease("b", at(3, 9), at(3, 10))
    ledger.lease("c", at(3, 9, 30), at(3, 11))  # a, b and c from 9:30 to 10:00
    ledger.lease("d", at(3, 11), at(3, 13))  # c ends as d starts: never 4 at once
    assert peaks(ledger.rows(at(1), at(5))) == {stamp(3): 3}


def test_a_lease_ending_as_another_starts_does_not_overlap_it(ledger: Ledger) -> None:
    ledger.lease("a", at(3, 8), at(3, 9))
    ledger.lease("b", at(3, 9), at(3, 10))
    assert peaks(ledger.rows(at(3), at(4))) == {stamp(3): 1}


def test_a_lease_started_long_before_the_range_counts_while_live(ledger: Ledger) -> None:
    ledger.lease("server", at(1) - 90 * DAY, at(4, 12))
    ledger.lease("ws", at(3, 8), at(3, 9))
    ledger.lease("gone", at(1) - 90 * DAY, at(1) - 89 * DAY)
    rows = ledger.rows(at(2), at(6))
    assert peaks(rows) == {stamp(2): 1, stamp(3): 2, stamp(4): 1}
    assert column(rows, "distinct_machines") == {stamp(2): 1, stamp(3): 2, stamp(4): 1}


def test_a_release_ends_a_lease_before_it_expires(ledger: Ledger) -> None:
    ledger.lease("a", at(3, 8), at(3, 20), released=at(3, 9))
    ledger.lease("b", at(3, 10), at(3, 11))
    ledger.lease("c", at(4, 8), at(4, 9), released=at(4, 10))  # released after expiry: expiry ends it
    ledger.lease("d", at(4, 9, 30), at(4, 11))
    assert peaks(ledger.rows(at(3), at(5))) == {stamp(3): 1, stamp(4): 1}


def test_a_renewed_lease_is_live_until_its_latest_expiry(ledger: Ledger) -> None:
    ledger.lease("a", at(2, 8), at(5, 8))  # renewed for three days
    ledger.lease("b", at(4, 12), at(4, 13))
    assert peaks(ledger.rows(at(1), at(8))) == {stamp(2): 1, stamp(3): 1, stamp(4): 2, stamp(5): 1}


def test_leases_are_cut_to_the_range(ledger: Ledger) -> None:
    ledger.lease("a", at(3, 6), at(3, 10))
    ledger.lease("b", at(3, 9), at(3, 12))  # live with a only before 10:00
    report = ledger.report(at(3, 10), at(3, 11))
    assert [row.peak_seats for row in report.rows()] == [1]


# --- buckets ------------------------------------------------------------------------------------------


def test_hour_buckets_split_a_lease_at_the_hour(ledger: Ledger) -> None:
    ledger.lease("a", at(3, 8, 30), at(3, 10))  # ends exactly at 10:00: not live in that hour
    ledger.lease("b", at(3, 9, 15), at(3, 9, 45))
    rows = ledger.rows(at(3), at(4), "hour")
    assert peaks(rows) == {stamp(3, 8): 1, stamp(3, 9): 2}


def test_day_buckets_are_utc_days(ledger: Ledger) -> None:
    ledger.lease("a", at(3, 23, 30), at(4, 0, 30))
    ledger.denial("x", at(4))  # on the edge: the later day
    rows = ledger.rows(at(1), at(6))
    assert peaks(rows) == {stamp(3): 1, stamp(4): 1}
    assert column(rows, "denials") == {stamp(3): 0, stamp(4): 1}


def test_week_buckets_start_on_monday(ledger: Ledger) -> None:
    ledger.lease("a", at(8, 23), at(9, 1))  # Sunday night into Monday
    ledger.lease("b", at(10, 9), at(10, 10))
    rows = ledger.rows(at(1), at(20), "week")
    assert peaks(rows) == {stamp(2): 1, stamp(9): 1}
    for row in rows:
        start = datetime.fromisoformat(str(row["interval_start"]))
        assert (start.weekday(), start.hour, start.minute) == (0, 0, 0)


def test_the_first_week_starts_on_the_monday_before_since(ledger: Ledger) -> None:
    ledger.lease("a", at(5, 9), at(5, 10))  # a Thursday
    rows = ledger.rows(at(4), at(6), "week")
    assert [row["interval_start"] for row in rows] == [stamp(2)]


def test_buckets_cover_the_range() -> None:
    week = Buckets.covering(at(4, 13), at(16, 1), "week")
    assert (week.start(0), week.count) == (at(2), 3)  # Mondays 2, 9 and 16 November
    hours = Buckets.covering(at(3, 8, 30), at(3, 10), "hour")
    assert (hours.start(0), hours.count) == (at(3, 8), 2)
    assert hours.index(at(3, 9, 59)) == 1


# --- limits, denials, machines ------------------------------------------------------------------------


def test_limit_and_denials_columns(ledger: Ledger) -> None:
    ledger.license(10)
    ledger.license(0, key=OTHER_KEY)
    ledger.lease("a", at(3, 8), at(3, 9))
    ledger.lease("a", at(3, 8), at(3, 9), key=OTHER_KEY)
    ledger.lease("a", at(3, 8), at(3, 9), product="77")
    for minute in (0, 10, 20):
        ledger.denial("z", at(3, 12, minute))
    ledger.denial("z", at(4, 12))
    ledger.denial("z", at(9, 12))  # after until
    rows = ledger.rows(at(3), at(5))
    limits = {(row["product_id"], row["key"]): row["seat_limit"] for row in rows}
    assert limits == {(PRODUCT, KEY): 10, (PRODUCT, OTHER_KEY): 0, ("77", KEY): None}
    denied = {
        row["interval_start"]: row["denials"]
        for row in rows
        if row["key"] == KEY and row["product_id"] == PRODUCT
    }
    assert denied == {stamp(3): 3, stamp(4): 1}


def test_node_locked_and_distinct_machines(ledger: Ledger) -> None:
    for hour in (8, 9, 10):
        ledger.activity("desk", at(3, hour), floating=False)  # one machine, three hours: counted once
    ledger.activity("laptop", at(3, 9))
    ledger.lease("laptop", at(3, 9), at(3, 10))
    ledger.lease("quiet", at(3, 22), at(4, 2))  # a lease and no calls: present both days
    ledger.activity("desk", at(4, 9), floating=False)
    rows = ledger.rows(at(3), at(5))
    assert column(rows, "node_locked_machines") == {stamp(3): 1, stamp(4): 1}
    assert column(rows, "distinct_machines") == {stamp(3): 3, stamp(4): 2}
    assert peaks(rows) == {stamp(3): 1, stamp(4): 1}


def test_activity_in_the_hour_that_holds_since_counts(ledger: Ledger) -> None:
    ledger.activity("desk", at(3, 8), floating=False)
    rows = ledger.rows(at(3, 8, 30), at(3, 12), "hour")
    assert column(rows, "node_locked_machines") == {stamp(3, 8): 1}


def test_activity_in_the_hour_that_starts_at_until_does_not_count(ledger: Ledger) -> None:
    ledger.activity("desk", at(3, 11), floating=False)
    ledger.activity("desk", at(3, 12), floating=False)
    rows = ledger.rows(at(3, 8), at(3, 12), "hour")
    assert column(rows, "node_locked_machines") == {stamp(3, 11): 1}


@pytest.mark.parametrize("leased", [False, True])
def test_a_machine_that_called_with_and_without_a_seat_counts_once_as_node_locked(
    ledger: Ledger, *, leased: bool
) -> None:
    ledger.activity("desk", at(3, 8), floating=True)
    ledger.activity("desk", at(3, 9), floating=False)
    ledger.activity("desk", at(3, 10), floating=True)
    if leased:  # a license with leases has its machines counted another way
        ledger.lease("laptop", at(3, 8), at(3, 9))
    (row,) = ledger.rows(at(3), at(4))
    assert (row["node_locked_machines"], row["distinct_machines"]) == (1, 2 if leased else 1)


def test_product_and_key_filters(ledger: Ledger) -> None:
    ledger.lease("a", at(3, 8), at(3, 9))
    ledger.lease("b", at(3, 8), at(3, 9), key=OTHER_KEY)
    ledger.activity("c", at(3, 8), product="77")
    assert {row["key"] for row in ledger.rows(at(3), at(4), key=KEY.lower())} == {KEY}
    assert {row["product_id"] for row in ledger.rows(at(3), at(4), product="77")} == {"77"}
    assert ledger.rows(at(3), at(4), product="77", key=OTHER_KEY) == []
    assert len(ledger.rows(at(3), at(4))) == 3


def test_every_license_is_found_whatever_its_product_and_key(ledger: Ledger) -> None:
    licenses = [("", "K"), ("1", "K"), ("1", "KA"), ("1", "K\u00e9"), ("10", "K"), ("2", "")]
    for product, key in licenses:
        ledger.lease("a", at(3, 8), at(3, 9), product=product, key=key)
    found = [(usage.product_id, usage.key) for usage in ledger.report(at(3), at(4)).licenses]
    assert found == sorted(licenses)


def test_a_day_with_only_a_denial_has_a_row(ledger: Ledger) -> None:
    ledger.denial("z", at(3, 12))
    assert ledger.rows(at(3), at(4)) == [
        {
            "product_id": PRODUCT,
            "key": KEY,
            "interval_start": stamp(3),
            "peak_seats": 0,
            "seat_limit": None,
            "node_locked_machines": 0,
            "distinct_machines": 0,
            "denials": 1,
        }
    ]


def test_report_while_the_daemon_holds_a_write_transaction(ledger: Ledger) -> None:
    ledger.lease("a", at(3, 8), at(3, 9))
    ledger.db.execute("BEGIN IMMEDIATE")
    ledger.lease("b", at(3, 8), at(3, 9))  # not committed: not seen
    assert peaks(ledger.rows(at(3), at(4))) == {stamp(3): 1}
    ledger.db.execute("COMMIT")
    assert peaks(ledger.rows(at(3), at(4))) == {stamp(3): 2}


# --- the sweep against brute force --------------------------------------------------------------------


def brute_peaks(
    intervals: list[tuple[float, float]], buckets: Buckets, since: float, until: float
) -> dict[int, int]:
    """Peaks by checking every moment a peak can start at: a bucket's start and each lease start in it."""
    found = {}
    for index in range(buckets.count):
        low, high = max(buckets.start(index), since), min(buckets.start(index + 1), until)
        moments = [low, *(start for start, _ in intervals if low <= start < high)]
        peak = max(sum(1 for start, end in intervals if start <= moment < end) for moment in moments)
        if peak:
            found[index] = peak
    return found


@settings(max_examples=300, deadline=None)
@given(
    leases=st.lists(
        st.tuples(st.integers(0, 4 * 24 * 4), st.integers(1, 3 * 24 * 4)), max_size=30
    ),  # quarter hours over four days
    since=st.integers(0, 2 * 24 * 4),
    length=st.integers(1, 3 * 24 * 4),
    every=st.sampled_from(["hour", "day", "week"]),
)
def test_sweep_peaks_match_brute_force(
    leases: list[tuple[int, int]], since: int, length: int, every: str
) -> None:
    quarter = 900.0
    origin, low, high = at(2), at(2) + since * quarter, at(2) + (since + length) * quarter
    intervals = [
        (max(origin + start * quarter, low), min(origin + (start + size) * quarter, high))
        for start, size in leases
    ]
    intervals = [(start, end) for start, end in intervals if end > start]
    buckets = Buckets.covering(low, high, every)
    swept = reports.sweep([start for start, _ in intervals], [end for _, end in intervals], buckets)
    assert swept.peaks == brute_peaks(intervals, buckets, low, high)


@given(
    spans=st.lists(
        st.tuples(st.sampled_from("abcd"), st.integers(0, 20), st.integers(0, 5)).map(
            lambda span: (span[0], span[1], span[1] + span[2])
        ),
        max_size=30,
    )
)
def test_presence_counts_each_machine_once_per_bucket(spans: list[tuple[str, int, int]]) -> None:
    expected: dict[int, set[str]] = {}
    for machine, first, last in spans:
        for index in range(first, last + 1):
            expected.setdefault(index, set()).add(machine)
    counted = reports.presence(sorted(spans, key=lambda span: span[1]))
    assert counted == {index: len(machines) for index, machines in expected.items()}


# --- the report against a plain computation -----------------------------------------------------------

Row = tuple[str, str, int, int, int | None, int, int, int]  # a SeatRow's fields in order
LICENSES = ((PRODUCT, KEY), (PRODUCT, OTHER_KEY), ("77", KEY))
MINUTE = 60


def plain_rows(path: Path, query: SeatQuery) -> list[Row]:
    """The seat report's rows the slow, obvious way: every bucket of every license, looking at every row."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        leases = db.execute(
            "SELECT product_id, license_key, machine_code, started, expires, released FROM leases"
        ).fetchall()
        activity = db.execute(
            "SELECT product_id, license_key, hour, machine_code, floating FROM activity"
        ).fetchall()
        denials = db.execute("SELECT product_id, license_key, time FROM denials").fetchall()
        known = db.execute("SELECT product_id, license_key, max_machines FROM licenses").fetchall()
    limits = {(product, key): limit for product, key, limit in known}
    since, until = query.since, query.until
    buckets = Buckets.covering(since, until, query.every)
    first_hour = math.floor(since / HOUR) * HOUR  # calls are kept by the hour: the one holding since counts
    found = {(row[0], row[1]) for row in [*leases, *activity, *denials]}
    wanted = sorted(
        (product, key)
        for product, key in found
        if query.product in (None, product) and (query.key is None or key.casefold() == query.key.casefold())
    )
    rows: list[Row] = []
    for license in wanted:
        live = [
            (
                machine,
                max(started, since),
                min(released if released is not None and released < expires else expires, until),
            )
            for *owner, machine, started, expires, released in leases
            if tuple(owner) == license
        ]
        live = [(machine, start, end) for machine, start, end in live if end > start]
        calls = [
            (hour, machine, floating)
            for *owner, hour, machine, floating in activity
            if tuple(owner) == license
        ]
        refused = [moment for *owner, moment in denials if tuple(owner) == license]
        for index in range(buckets.count):
            low, high = buckets.start(index), buckets.start(index + 1)
            moments = [max(low, since), *(start for _, start, _ in live if low <= start < high)]
            peak = max(sum(1 for _, start, end in live if start <= moment < end) for moment in moments)
            called: dict[str, int] = {}  # machine -> the least `floating` of its calls in the bucket
            for hour, machine, floating in calls:
                if max(low, first_hour) <= hour < min(high, until):
                    called[machine] = min(floating, called.get(machine, floating))
            leased = {machine for machine, start, end in live if start < high and end > low}
            present = len(called.keys() | leased)
            node_locked = sum(1 for floating in called.values() if floating == 0)
            denied = sum(1 for moment in refused if max(low, since) <= moment < min(high, until))
            if peak or present or denied:
                rows.append((*license, low, peak, limits.get(license), node_locked, present, denied))
    return rows


def report_rows(report: SeatReport) -> list[Row]:
    """The report's rows as plain tuples."""
    return [
        (
            row.product_id,
            row.key,
            row.interval_start,
            row.peak_seats,
            row.seat_limit,
            row.node_locked_machines,
            row.distinct_machines,
            row.denials,
        )
        for row in report.rows()
    ]


def plain_records(rows: list[Row]) -> list[dict[str, object]]:
    """Rows as JSON lines promise them: the report's columns, times as ISO 8601 UTC to the second."""
    records = []
    for row in rows:
        record: dict[str, object] = dict(zip(reports.SEAT_COLUMNS, row, strict=True))
        record["interval_start"] = datetime.fromtimestamp(row[2], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        records.append(record)
    return records


def plain_csv(rows: list[Row]) -> str:
    """Rows as the CSV format promises them: a header, then a line per row with null empty."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=reports.SEAT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in plain_records(rows):
        writer.writerow({name: "" if value is None else value for name, value in record.items()})
    return out.getvalue()


def assert_matches_plain(path: Path, query: SeatQuery) -> None:
    """The report, its CSV and its JSON lines agree with the plain computation."""
    expected = plain_rows(path, query)
    with SqliteSeatReader(path).snapshot() as snapshot:
        report = reports.seat_report(snapshot, query)
    assert report_rows(report) == expected
    assert [(usage.product_id, usage.key) for usage in report.licenses] == sorted(
        {row[:2] for row in expected}
    )
    out = io.StringIO()
    assert reports.write_seats(report, out, "csv") == len(expected)
    assert out.getvalue() == plain_csv(expected)
    out = io.StringIO()
    assert reports.write_seats(report, out, "json") == len(expected)
    assert [json.loads(line) for line in out.getvalue().splitlines()] == plain_records(expected)


# Times in minutes from Monday 2 November, two days before it to ten after; one in two on a whole hour,
# so that they often fall on bucket edges, the range's ends and each other.
minutes = st.integers(-2 * 24 * 60, 10 * 24 * 60) | st.integers(-2 * 24, 10 * 24).map(lambda hour: hour * 60)
lengths = st.integers(1, 3 * 24 * 60) | st.integers(1, 3 * 24).map(lambda hours: hours * 60)
limits = st.none() | st.integers(0, 3)
leases = st.tuples(st.sampled_from("abcd"), minutes, lengths, st.none() | minutes)
calls = st.tuples(st.integers(-48, 240), st.sampled_from("abcde"))  # (hour from Monday, machine)
denials = st.lists(st.tuples(st.sampled_from("xy"), minutes), max_size=3)
# The first license is floating, the second node-locked (no leases: its counts are SQL's), the third has
# a little of everything, and they check that licenses do not mix.
lease_lists = (st.lists(leases, max_size=8), st.just([]), st.lists(leases, max_size=3))
call_maps = tuple(st.dictionaries(calls, st.integers(0, 1), max_size=size) for size in (16, 16, 4))


@st.composite
def ledgers(draw: st.DrawFn) -> list[tuple[str, tuple[object, ...]]]:
    """A small random ledger as (table, row) pairs: times on whole minutes, so often on bucket edges."""
    rows: list[tuple[str, tuple[object, ...]]] = []
    for number, (product, key) in enumerate(LICENSES):
        limit = draw(limits)
        if limit is not None:
            rows.append(("licenses", (product, key, limit, 0)))
        for machine, start, length, release in draw(lease_lists[number]):
            started = at(2) + start * MINUTE
            released = None if release is None else at(2) + release * MINUTE
            rows.append(("leases", (product, key, machine, started, started + length * MINUTE, released)))
        rows.extend(
            ("activity", (product, key, int(at(2)) + hour * HOUR, machine, floating))
            for (hour, machine), floating in draw(call_maps[number]).items()
        )
        rows.extend(
            ("denials", (product, key, machine, at(2) + moment * MINUTE)) for machine, moment in draw(denials)
        )
    return rows


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    """One ledger that each example empties and fills again: a new file each time costs its fsyncs."""
    built = Ledger(tmp_path_factory.mktemp("scratch"))
    built.db.execute("PRAGMA synchronous=OFF")
    yield built
    built.close()


def refill(ledger: Ledger, rows: list[tuple[str, tuple[object, ...]]]) -> None:
    """Replace everything in the ledger by (table, row) pairs, in one transaction."""
    sql = {
        "licenses": "INSERT INTO licenses VALUES (?, ?, ?, ?)",
        "leases": "INSERT INTO leases (product_id, license_key, machine_code, started, expires, released,"
        " overdraft, renewals, granted_by, boot_id, deadline)"
        " VALUES (?, ?, ?, ?, ?, ?, 0, 0, 'upstream', 'b', 0)",
        "activity": "INSERT INTO activity VALUES (?, ?, ?, ?, ?, 1)",
        "denials": "INSERT INTO denials (product_id, license_key, machine_code, time, denied_by, message)"
        " VALUES (?, ?, ?, ?, 'local', 'limit reached')",
    }
    ledger.db.execute("BEGIN")
    for table in sql:
        ledger.db.execute(f"DELETE FROM {table}")  # noqa: S608
    for table, row in rows:
        ledger.db.execute(sql[table], row)
    ledger.db.execute("COMMIT")


@settings(max_examples=200, deadline=None)
@given(
    rows=ledgers(),
    since=minutes,
    fraction=st.sampled_from([0.0, 0.0, 0.25, 59.5]),
    length=st.integers(1, 9 * 24 * 60) | st.integers(1, 9 * 24).map(lambda hours: hours * 60),
    every=st.sampled_from(sorted(reports.EVERY)),
    product=st.sampled_from([None, PRODUCT, "77", "5"]),
    key=st.sampled_from([None, KEY.lower(), OTHER_KEY]),
)
def test_the_report_matches_a_plain_computation(
    scratch: Ledger,
    rows: list[tuple[str, tuple[object, ...]]],
    since: int,
    fraction: float,
    length: int,
    every: str,
    product: str | None,
    key: str | None,
) -> None:
    refill(scratch, rows)
    low = at(2) + since * MINUTE + fraction
    query = SeatQuery(since=low, until=low + length * MINUTE, every=every, product=product, key=key)
    assert_matches_plain(scratch.path, query)


@pytest.mark.parametrize("every", ["day", "week"])
def test_the_benchmark_ledger_matches_a_plain_computation(tmp_path: Path, every: str) -> None:
    path = tmp_path / SEATS_FILE
    bench_ledger.build(path, bench_ledger.LedgerShape().scaled(licenses=10, days=21))
    with contextlib.closing(sqlite3.connect(path)) as db:
        first, last = db.execute("SELECT min(hour), max(hour) FROM activity").fetchone()
    # From inside the first day with calls (so that its first hour counts whole) to past the last call.
    assert_matches_plain(path, SeatQuery(since=first + 1800.5, until=last + 2 * DAY, every=every))


# --- output ---------------------------------------------------------------------------------------------


def overdrawn(ledger: Ledger) -> None:
    """Three seats at once on a license of two, and one denial."""
    ledger.license(2)
    for machine in ("a", "b", "c"):
        ledger.lease(machine, at(3, 8), at(3, 9))
    ledger.denial("d", at(3, 8, 30))
    ledger.lease("a", at(4, 8), at(4, 9))


def written(ledger: Ledger, form: str) -> str:
    """The report for 3 and 4 November in one format."""
    out = io.StringIO()
    reports.write_seats(ledger.report(at(3), at(5)), out, form)
    return out.getvalue()


def test_json_is_one_object_per_row_with_exactly_the_report_keys(ledger: Ledger) -> None:
    overdrawn(ledger)
    lines = [json.loads(line) for line in written(ledger, "json").splitlines()]
    assert [list(line) for line in lines] == [list(reports.SEAT_COLUMNS)] * 2
    assert lines[0] == {
        "product_id": PRODUCT,
        "key": KEY,
        "interval_start": stamp(3),
        "peak_seats": 3,
        "seat_limit": 2,
        "node_locked_machines": 0,
        "distinct_machines": 3,
        "denials": 1,
    }


def test_csv_has_a_header_and_a_line_per_row(ledger: Ledger) -> None:
    overdrawn(ledger)
    ledger.denial("z", at(4, 12), product="77")  # no limit known: an empty cell
    rows = list(csv.DictReader(io.StringIO(written(ledger, "csv"))))
    assert [list(row) for row in rows] == [list(reports.SEAT_COLUMNS)] * 3
    assert [(row["interval_start"], row["peak_seats"], row["seat_limit"]) for row in rows] == [
        (stamp(3), "3", "2"),
        (stamp(4), "1", "2"),
        (stamp(4), "0", ""),
    ]


def test_table_aligns_columns_and_sums_up_each_license(ledger: Ledger) -> None:
    overdrawn(ledger)
    ledger.lease("a", at(3, 8), at(3, 9), key=OTHER_KEY)
    ledger.license(0, key=OTHER_KEY)
    lines = written(ledger, "table").splitlines()
    assert lines[0].split() == list(reports.SEAT_COLUMNS)
    assert lines[1].split() == [PRODUCT, OTHER_KEY, stamp(3), "1", "none", "0", "1", "0"]
    assert "peak 1 floating seat, no seat limit; 0 denials" in lines[2]
    assert lines[3] == ""
    assert lines[4].split() == [PRODUCT, KEY, stamp(3), "3", "2", "0", "3", "1"]
    assert (
        lines[6] == f"  {KEY} (product {PRODUCT}): peak 3 of 2 seats: 1 over the limit (overdraft); 1 denial"
    )


def test_table_columns_line_up(ledger: Ledger) -> None:
    overdrawn(ledger)
    lines = written(ledger, "table").splitlines()
    # Numbers are right-aligned: every row's last cell ends where the header's does.
    assert {len(line) for line in lines[:3]} == {len(lines[0])}


@pytest.mark.parametrize(
    ("limit", "peak", "words"),
    [
        (None, 1, "peak 1 floating seat, limit unknown (no signed license seen yet)"),
        (0, 2, "peak 2 floating seats, no seat limit"),
        (5, 2, "peak 2 of 5 seats;"),
        (2, 2, "peak 2 of 2 seats: at the limit"),
        (1, 2, "peak 2 of 1 seat: 1 over the limit (overdraft)"),
    ],
)
def test_summary_words(ledger: Ledger, limit: int | None, peak: int, words: str) -> None:
    if limit is not None:
        ledger.license(limit)
    for machine in range(peak):
        ledger.lease(str(machine), at(3, 8), at(3, 9))
    (usage,) = ledger.report(at(3), at(4)).licenses
    assert words in reports.license_summary(usage)


def test_table_escapes_control_characters_in_keys(ledger: Ledger) -> None:
    ledger.lease("a", at(3, 8), at(3, 9), key="EVIL\x1b[2J")
    assert "\x1b" not in written(ledger, "table")


# --- charts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["seats.svg", "seats.png", "SEATS.PNG"])
def test_cli_draws_the_chart_by_extension(
    ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    overdrawn(ledger)
    chart = tmp_path / name
    status = main(
        [
            "report",
            "seats",
            "--set",
            f"state_dir={tmp_path}",
            "--since",
            "2026-11-03",
            "--until",
            "2026-11-05",
            "--chart",
            str(chart),
        ]
    )
    assert status == 0
    assert KEY in capsys.readouterr().out
    data = chart.read_bytes()
    assert data.startswith(PNG_SIGNATURE) if name.lower().endswith(".png") else b"<svg" in data


def test_chart_falls_back_to_bucket_peaks_when_there_are_too_many_changes(
    ledger: Ledger, tmp_path: Path
) -> None:
    overdrawn(ledger)
    with SqliteSeatReader(ledger.path).snapshot() as snapshot:
        report = reports.seat_report(snapshot, SeatQuery(since=at(3), until=at(5), every="hour"), max_steps=2)
    (usage,) = report.licenses
    assert usage.steps is None
    times, counts = charts.seat_series(report, usage)
    assert len(times) == report.buckets.count + 1
    assert max(counts) == 3
    charts.draw_seats(report, tmp_path / "peaks.svg")
    assert b"<svg" in (tmp_path / "peaks.svg").read_bytes()


def test_chart_step_line_follows_every_change(ledger: Ledger) -> None:
    ledger.lease("a", at(3, 8), at(3, 10))
    ledger.lease("b", at(3, 9), at(3, 11))
    with SqliteSeatReader(ledger.path).snapshot() as snapshot:
        report = reports.seat_report(snapshot, SeatQuery(since=at(3), until=at(4)), max_steps=100)
    times, counts = charts.seat_series(report, report.licenses[0])
    assert list(zip(times, counts, strict=True)) == [
        (at(3), 0),
        (at(3, 8), 1),
        (at(3, 9), 2),
        (at(3, 10), 1),
        (at(3, 11), 0),
        (at(4), 0),
    ]


def test_an_empty_range_still_draws_a_chart(
    ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chart = tmp_path / "empty.png"
    assert main(["report", "seats", "--set", f"state_dir={tmp_path}", "--chart", str(chart)]) == 0
    assert capsys.readouterr().out == reports.EMPTY_SEATS + "\n"
    assert chart.read_bytes().startswith(PNG_SIGNATURE)


def test_chart_needs_a_known_extension(
    ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["report", "seats", "--set", f"state_dir={tmp_path}", "--chart", str(tmp_path / "x.jpg")]) == 2
    )
    assert ".svg or .png" in capsys.readouterr().err


def test_chart_without_matplotlib_says_what_to_install(
    ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert (
        main(["report", "seats", "--set", f"state_dir={tmp_path}", "--chart", str(tmp_path / "x.svg")]) == 2
    )
    err = capsys.readouterr().err
    # The command that works from a checkout, as docs/seats-and-reports.md gives it;
    # pip knows no `license-server` package.
    assert ".venv/bin/pip install '.[charts]'" in err
    assert "install license-server[charts]" not in err
    assert not (tmp_path / "x.svg").exists()


def test_the_daemon_and_the_reports_do_not_import_matplotlib() -> None:
    check = (
        "import sys, license_server.cli, license_server.reports.charts;"
        " assert 'matplotlib' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", check], check=True)


# --- machines -------------------------------------------------------------------------------------------

NOW = at(30, 12)


def fleet(ledger: Ledger) -> None:
    """Machines seen at different times, one deactivated, names in mixed case and script."""
    ledger.machine("m1", "lab pc 2", last_seen=NOW - 3 * DAY)
    ledger.machine("m2", "Lab PC 1", last_seen=NOW - 40 * DAY, floating=False)
    ledger.machine("m3", "Büro-PC", last_seen=NOW - 90 * DAY, key=OTHER_KEY)
    ledger.machine("m4", "Lab PC 3", last_seen=NOW - 60 * DAY, deactivated=NOW - 50 * DAY)
    ledger.machine("m5", "Lab PC 1", last_seen=NOW - 10 * HOUR, key=OTHER_KEY, product="77")


def test_machines_are_listed_by_name_then_key(ledger: Ledger) -> None:
    fleet(ledger)
    rows = ledger.machines(NOW)
    assert [(row["friendly_name"], row["key"]) for row in rows] == [
        ("Büro-PC", OTHER_KEY),
        ("Lab PC 1", OTHER_KEY),
        ("Lab PC 1", KEY),
        ("lab pc 2", KEY),
        ("Lab PC 3", KEY),
    ]
    assert list(rows[2]) == list(machine_report.MACHINE_COLUMNS)
    assert rows[2] == {
        "friendly_name": "Lab PC 1",
        "product_id": PRODUCT,
        "key": KEY,
        "machine_code": "m2",
        "first_seen": "2026-10-20T12:00:00Z",
        "last_seen": "2026-10-21T12:00:00Z",
        "client": "10.0.0.7",
        "calls": 3,
        "floating": False,
        "deactivated": None,
        "idle_days": 40,
    }
    assert rows[1]["idle_days"] == 0
    assert rows[4]["deactivated"] == "2026-10-11T12:00:00Z"


def test_idle_machines_longest_idle_first_without_deactivated_ones(ledger: Ledger) -> None:
    fleet(ledger)
    rows = ledger.machines(NOW, idle_days=30)
    assert [(row["machine_code"], row["idle_days"]) for row in rows] == [("m3", 90), ("m2", 40)]
    assert [row["machine_code"] for row in ledger.machines(NOW, idle_days=40)] == ["m3", "m2"]
    assert ledger.machines(NOW, idle_days=91) == []


def test_name_search_is_a_substring_in_any_case(ledger: Ledger) -> None:
    fleet(ledger)
    assert [row["machine_code"] for row in ledger.machines(NOW, name="lab pc")] == ["m5", "m2", "m1", "m4"]
    assert [row["machine_code"] for row in ledger.machines(NOW, name="BÜRO")] == ["m3"]
    assert [row["machine_code"] for row in ledger.machines(NOW, name="pc 1", product=PRODUCT)] == ["m2"]
    assert [row["machine_code"] for row in ledger.machines(NOW, key=OTHER_KEY.lower())] == ["m3", "m5"]


def test_machines_formats(ledger: Ledger) -> None:
    fleet(ledger)
    rows = ledger.machines(NOW)
    out = io.StringIO()
    machine_report.write_machines(rows, out, "csv")
    parsed = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert parsed[2]["floating"] == "false"
    assert parsed[2]["deactivated"] == ""
    out = io.StringIO()
    machine_report.write_machines(rows, out, "table")
    lines = out.getvalue().splitlines()
    assert lines[0].split() == list(machine_report.MACHINE_COLUMNS)
    assert "Büro-PC" in lines[1]
    assert " no " in lines[3]
    out = io.StringIO()
    machine_report.write_machines([], out, "table")
    assert out.getvalue() == machine_report.EMPTY_MACHINES + "\n"


def test_cli_machines_json(ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    ledger.machine("old", "Old PC", last_seen=now - 45 * DAY)
    ledger.machine("new", "New PC", last_seen=now - HOUR)
    status = main(
        ["report", "machines", "--set", f"state_dir={tmp_path}", "--idle-days", "30", "--format", "json"]
    )
    assert status == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["machine_code"], line["idle_days"], line["floating"]) for line in lines] == [
        ("old", 45, True)
    ]


# --- the command line -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["seats", "machines"])
def test_cli_without_a_ledger_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    assert main(["report", command, "--set", f"state_dir={tmp_path}"]) == 2
    path = tmp_path / SEATS_FILE
    assert capsys.readouterr().err == (
        f"license-server: no seat ledger at {path} yet: the daemon has not run with this state_dir\n"
    )
    assert not path.exists()


def test_cli_an_unreadable_ledger_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / SEATS_FILE).write_bytes(b"")  # an empty database: no tables
    assert main(["report", "seats", "--set", f"state_dir={tmp_path}"]) == 2
    assert "cannot read the seat ledger" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [
        ["seats", "--since", "yesterday"],
        ["seats", "--since", "2026-11-05", "--until", "2026-11-05"],
        ["seats", "--since", "2d", "--until", "3d"],
        ["machines", "--idle-days", "-1"],
    ],
)
def test_cli_bad_options_exit_2(
    ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    assert main(["report", *extra, "--set", f"state_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.startswith("license-server: ")


@pytest.mark.parametrize(
    "extra", [["seats", "--every", "month"], ["seats", "--format", "xml"], ["machines", "--idle-days", "x"]]
)
def test_cli_argument_errors_exit_2(tmp_path: Path, extra: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["report", *extra, "--set", f"state_dir={tmp_path}"])
    assert exit_.value.code == 2


def test_cli_empty_range(ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger.lease("a", at(3, 8), at(3, 9))
    base = [
        "report",
        "seats",
        "--set",
        f"state_dir={tmp_path}",
        "--since",
        "2026-11-10",
        "--until",
        "2026-11-12",
    ]
    assert main(base) == 0
    assert capsys.readouterr().out == "(no seat activity in this range)\n"
    assert main([*base, "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "license-server: (no seat activity in this range)\n")
    assert main([*base, "--format", "csv"]) == 0
    assert capsys.readouterr().out == ",".join(reports.SEAT_COLUMNS) + "\n"


def test_cli_defaults_to_the_last_30_days_by_day(
    ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    today = int(time.time() // DAY * DAY)
    ledger.lease("recent", today - 29 * DAY + HOUR, today - 29 * DAY + 2 * HOUR)
    ledger.lease("old", today - 31 * DAY, today - 31 * DAY + HOUR)
    assert main(["report", "seats", "--set", f"state_dir={tmp_path}", "--format", "json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["interval_start"] == tables.iso(today - 29 * DAY)


def test_cli_every_filter_and_format(
    ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overdrawn(ledger)
    ledger.lease("x", at(3, 8), at(3, 9), key=OTHER_KEY)
    args = [
        "--since",
        "2026-11-03T08:00",
        "--until",
        "2026-11-03T10:00Z",
        "--every",
        "hour",
        "--key",
        KEY.lower(),
    ]
    assert (
        main(
            [
                "report",
                "seats",
                "--set",
                f"state_dir={tmp_path}",
                *args,
                "--product",
                PRODUCT,
                "--format",
                "csv",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(row["key"], row["interval_start"], row["peak_seats"]) for row in rows] == [
        (KEY, stamp(3, 8), "3")
    ]


# --- a big ledger -----------------------------------------------------------------------------------------

YEAR_START = datetime(2025, 11, 3, tzinfo=UTC).timestamp()  # a Monday
MACHINES = 2000
CYCLES = 100  # every 3.5 days, each machine takes a seat once: 200,000 leases
STAGGER = 30.0  # seconds between one machine's start and the next's
SEAT_TIME = 3600.0  # so 120 seats are live at once once all are going
SPIKE = 50  # the cycle in which seats are held twice as long: 240 at once


def big_ledger(ledger: Ledger) -> None:
    """A year of a 2,000-machine site, and one lease held all year from before it."""
    ledger.license(150)
    rows = []
    for cycle in range(CYCLES):
        begin = YEAR_START + cycle * 3.5 * DAY
        held = 2 * SEAT_TIME if cycle == SPIKE else SEAT_TIME
        for number in range(MACHINES):
            start = begin + number * STAGGER
            rows.append((PRODUCT, KEY, f"ws-{number:04d}", start, start + held))
    ledger.db.execute("BEGIN")
    ledger.db.executemany(
        "INSERT INTO leases (product_id, license_key, machine_code, started, expires, released, overdraft,"
        " renewals, granted_by, boot_id, deadline) VALUES (?, ?, ?, ?, ?, NULL, 0, 0, 'upstream', 'b', 0)",
        rows,
    )
    ledger.db.execute("COMMIT")
    ledger.lease("server", YEAR_START - 30 * DAY, YEAR_START + 400 * DAY)


def expected_day_peaks() -> dict[float, int]:
    """Seats at once per day: 120 (240 in the spike) and the server on cycle days, else the server alone."""
    found = dict.fromkeys((YEAR_START + day * DAY for day in range(364)), 1)
    for cycle in range(CYCLES):
        begin = YEAR_START + cycle * 3.5 * DAY
        held = 2 * SEAT_TIME if cycle == SPIKE else SEAT_TIME
        last_end = begin + (MACHINES - 1) * STAGGER + held
        for day in range(int((begin - YEAR_START) // DAY), int((last_end - YEAR_START) // DAY) + 1):
            found[YEAR_START + day * DAY] = 1 + int(held / STAGGER)
    return found


def test_a_year_of_a_big_site(ledger: Ledger) -> None:
    big_ledger(ledger)
    began = time.perf_counter()
    report = ledger.report(YEAR_START, YEAR_START + 364 * DAY)
    elapsed = time.perf_counter() - began
    (usage,) = report.licenses
    assert {row.interval_start: row.peak_seats for row in usage.rows} == expected_day_peaks()
    assert usage.peak == 241
    assert "peak 241 of 150 seats: 91 over the limit (overdraft)" in reports.license_summary(usage)
    assert max(row.distinct_machines for row in usage.rows) == MACHINES + 1
    assert elapsed < 5, f"the report took {elapsed:.1f}s"
    weeks = ledger.report(YEAR_START, YEAR_START + 364 * DAY, "week")
    assert len(weeks.licenses[0].rows) == 52
    assert sorted(row.peak_seats for row in weeks.licenses[0].rows)[-2:] == [121, 241]


@given(st.integers(min_value=-86400, max_value=253402300799), st.floats(min_value=0, max_value=0.999))
def test_iso_is_the_utc_second_a_moment_falls_in(seconds: int, fraction: float) -> None:
    """Every report's times: ISO 8601 UTC to the second, the fraction dropped, up to the year 9999."""
    expected = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert tables.iso(seconds + fraction) == expected
    assert tables.iso(None) is None
