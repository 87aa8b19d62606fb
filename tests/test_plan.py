"""`report plan`: floating demand with denied machines, the seats serving it, idle node-locked seats."""

from __future__ import annotations

import asyncio
import collections
import json
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from license_server.cli import main
from license_server.reports import charts, plan
from license_server.reports.plan import PlanQuery, plan_report
from license_server.reports.seats import SeatQuery, SeatReport, seat_report
from license_server.storage.seats import (
    LIMIT_REACHED,
    SCHEMA,
    SeatLedger,
    SqliteSeatReader,
    Window,
)
from tests.conftest import Clock
from tests.test_reports import KEY, PRODUCT, Ledger, at

MINUTE = 60
HOUR = 3600
DAY = 86400
T0 = 1_790_000_040  # a whole minute, 14 minutes past an hour
LICENSE = (PRODUCT, KEY)
CODES = ("m1", "m2", "m3", "m4")


def report_of(path: Path, query: PlanQuery) -> plan.PlanReport:
    """The plan of the ledger file at `path`."""
    with SqliteSeatReader(path).snapshot() as snapshot:
        return plan_report(snapshot, query)


def only(report: plan.PlanReport) -> plan.LicensePlan:
    """The one license a report plans for."""
    (found,) = report.licenses
    return found


# --- the reference: a deliberately plain model, minute by minute --------------------------------------


@dataclass(frozen=True)
class History:
    """One license's rows, every time a whole minute (so that sampling each minute sees every change)."""

    limit: int | None
    leases: list[tuple[str, int, int, int | None]]  # machine, started, expires, released
    denials: list[tuple[str, int, int | None]]  # machine, time, interval asked for
    machines: list[tuple[str, bool, int, int | None]]  # machine, floating, last_seen, deactivated
    since: int
    until: int


def reference(made: History, now: int, idle_days: int) -> dict[str, object] | None:
    """What the plan of `made` must say, by sampling each minute of the period; None: nothing to plan."""
    minutes = range(made.since, made.until, MINUTE)

    def lease_end(started: int, expires: int, released: int | None) -> int:
        return released if released is not None and released < expires else expires

    def live(t: int) -> list[str]:
        return [m for m, s, e, r in made.leases if s <= t < lease_end(s, e, r)]

    in_period = [d for d in made.denials if made.since <= d[1] < made.until]
    leased = any(max(s, made.since) < min(lease_end(s, e, r), made.until) for _, s, e, r in made.leases)
    recorded = collections.Counter(i for _, _, i in in_period if i)
    if recorded:
        top = max(recorded.values())
        fallback = min(i for i, n in recorded.items() if n == top)
    else:
        fallback = 300 if leased else 0

    def waiting(t: int, holders: list[str]) -> set[str]:
        found = set()
        for machine, denied, asked in in_period:
            interval = asked if asked is not None else fallback
            if machine in holders or not denied <= t < denied + interval:
                continue
            # still waiting only if the machine held no lease at any minute from its denial to now
            if not any(machine in live(u) for u in range(denied, t + 1, MINUTE)):
                found.add(machine)
        return found

    held_counts, demands, waits = [], [], []
    for t in minutes:
        holders = live(t)
        held_counts.append(len(holders))
        waits.append(len(waiting(t, holders)))
        demands.append(held_counts[-1] + waits[-1])
    total = sum(demands)

    def serving(percent: int) -> int:
        seats = 0
        while 100 * sum(min(d, seats) for d in demands) < percent * total:
            seats += 1
        return seats

    over = sorted(
        {t // HOUR * HOUR for t, d in zip(minutes, demands, strict=True) if made.limit and d > made.limit}
    )
    active = [m for m in made.machines if not m[1] and m[3] is None]
    idle = [m for m in active if m[2] <= now - idle_days * DAY]
    if not (leased or in_period or active):
        return None
    micro = MINUTE * 1_000_000
    return {
        "seat_limit": made.limit,
        "peak_seats": max(held_counts, default=0),
        "peak_demand": max(demands, default=0),
        "demand_us": total * micro,
        "unmet_us": sum(waits) * micro,
        "denials": len(in_period),
        "seats": tuple(serving(level) for level in (95, 99, 100)),
        "over_limit_hours": tuple(over),
        "node_locked": (len(active), len(idle)),
    }


def written(path: Path, made: History) -> None:
    """The history as rows of a SQLite ledger."""
    built = Ledger(path.parent)
    try:
        if made.limit is not None:
            built.license(made.limit)
        for machine, started, expires, released in made.leases:
            built.lease(machine, started, expires, released=released)
        for machine, moment, interval in made.denials:
            built.denial(machine, moment, interval=interval)
        for machine, floating, last_seen, deactivated in made.machines:
            built.machine(machine, machine, last_seen=last_seen, floating=floating, deactivated=deactivated)
    finally:
        built.close()


minutes = st.integers(min_value=-30, max_value=200).map(lambda n: T0 + n * MINUTE)


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Up to 8 leases and 8 denials of 4 machines over about 4 hours; periods anywhere in it."""
    leases = []
    for _ in range(draw(st.integers(0, 8))):
        started = draw(minutes)
        expires = started + draw(st.integers(1, 90)) * MINUTE
        released = draw(st.none() | st.integers(-5, 100).map(lambda n, s=started: s + n * MINUTE))
        leases.append((draw(st.sampled_from(CODES)), started, expires, released))
    denials = [
        (
            draw(st.sampled_from(CODES)),
            draw(minutes),
            draw(st.none() | st.sampled_from((0, 5, 30, 120)).map(lambda n: n * MINUTE)),
        )
        for _ in range(draw(st.integers(0, 8)))
    ]
    machines = [
        (code, draw(st.booleans()), draw(minutes), draw(st.none() | minutes))
        for code in draw(st.lists(st.sampled_from(CODES), unique=True, max_size=4))
    ]
    since = draw(minutes)
    until = since + draw(st.integers(1, 240)) * MINUTE
    return History(draw(st.sampled_from((None, 0, 1, 2, 3))), leases, denials, machines, since, until)


class TestAgainstTheReference:
    """The report equals a plain minute-by-minute model of the same generated history."""

    @settings(max_examples=300, deadline=None)
    @given(made=histories(), idle_days=st.integers(0, 3))
    def test_the_plan_is_the_plain_model(self, made: History, idle_days: int) -> None:
        now = T0 + 2 * DAY
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "seats.sqlite3"
            written(path, made)
            report = report_of(
                path, PlanQuery(since=made.since, until=made.until, now=now, idle_days=idle_days)
            )
        expected = reference(made, now, idle_days)
        if expected is None:
            assert report.licenses == ()
            return
        found = only(report)
        assert {
            "seat_limit": found.seat_limit,
            "peak_seats": found.peak_seats,
            "peak_demand": found.peak_demand,
            "demand_us": found.demand_us,
            "unmet_us": found.unmet_us,
            "denials": found.denials,
            "seats": found.seats,
            "over_limit_hours": found.over_limit_hours,
            "node_locked": tuple(found.node_locked),
        } == expected


class TestKnownCases:
    """Hand-worked histories whose answers are written down."""

    def test_a_known_peak(self, tmp_path: Path) -> None:
        """A and B hold seats, C is refused for an hour, D for ten minutes; limit 2."""
        ledger = Ledger(tmp_path)
        ledger.license(2)
        start = at(3, 8)  # an hour's start
        ledger.lease("A", start, start + 120 * MINUTE)
        ledger.lease("B", start, start + 60 * MINUTE)
        ledger.denial("C", start + 30 * MINUTE, interval=60 * MINUTE)  # waits 30..90, never served
        ledger.denial("D", start + 100 * MINUTE, interval=10 * MINUTE)  # waits 100..110
        ledger.close()
        found = only(
            report_of(ledger.path, PlanQuery(since=start, until=start + 2 * HOUR, now=start, idle_days=30))
        )
        # demand: 2 for 30 min, 3 for 30, 2 for 30, 1 for 10, 2 for 10, 1 for 10: 250 seat-minutes
        assert (found.peak_seats, found.peak_demand, found.denials) == (2, 3, 2)
        assert found.demand_us == 250 * MINUTE * 10**6
        assert found.unmet_us == 70 * MINUTE * 10**6
        assert found.seats == (3, 3, 3)  # 2 seats serve 220 of 250 seat-minutes: 88 %
        assert found.over_limit_hours == (int(start),)
        row = found.as_dict()
        assert (row["unmet_seat_hours"], row["hours_over_limit"], row["over_limit"]) == (
            1.17,
            1,
            ["2026-11-03T08:00:00Z"],
        )

    def test_a_short_peak_is_not_worth_a_seat_at_95_percent(self, tmp_path: Path) -> None:
        """One seat for 99 minutes, two for one: 100 of 101 seat-minutes served by one seat (99.01 %)."""
        ledger = Ledger(tmp_path)
        ledger.license(1)
        start = at(3, 8)
        ledger.lease("A", start, start + 100 * MINUTE)
        ledger.denial("B", start + 50 * MINUTE, interval=MINUTE)
        ledger.close()
        found = only(
            report_of(
                ledger.path, PlanQuery(since=start, until=start + 100 * MINUTE, now=start, idle_days=30)
            )
        )
        assert found.seats == (1, 1, 2)
        assert (found.peak_seats, found.peak_demand) == (1, 2)

    def test_a_wish_ends_when_the_machine_gets_a_seat(self, tmp_path: Path) -> None:
        """Refused at 10 for 60 minutes, leased at 25: it waited 15 minutes, then holds a seat."""
        ledger = Ledger(tmp_path)
        start = at(3, 8)
        ledger.lease("A", start, start + 30 * MINUTE)
        ledger.denial("B", start + 10 * MINUTE, interval=60 * MINUTE)
        ledger.lease("B", start + 25 * MINUTE, start + 40 * MINUTE)
        ledger.close()
        found = only(
            report_of(ledger.path, PlanQuery(since=start, until=start + HOUR, now=start, idle_days=30))
        )
        assert found.unmet_us == 15 * MINUTE * 10**6
        assert found.peak_demand == 2
        assert found.seat_limit is None
        assert found.over_limit_hours == ()  # no limit known: nothing is over it

    def test_a_denial_without_its_interval(self, tmp_path: Path) -> None:
        """Kept before intervals were: the license's most common recorded one, else 300 s, else none."""
        start = at(3, 8)
        ledger = Ledger(tmp_path)
        ledger.lease("A", start, start + HOUR)
        ledger.denial("B", start, interval=None)
        ledger.close()
        query = PlanQuery(since=start, until=start + HOUR, now=start, idle_days=30)
        assert only(report_of(ledger.path, query)).unmet_us == 300 * 10**6  # leases, nothing recorded
        ledger = Ledger(tmp_path)
        for machine, interval in (("C", 600), ("D", 600), ("E", 1200)):
            ledger.denial(machine, start + HOUR - 1200, interval=interval)  # each waits to the period's end
        ledger.close()
        assert only(report_of(ledger.path, query)).unmet_us == (600 + 600 + 600 + 1200) * 10**6  # B asks 600
        node_locked = tmp_path / "node-locked"
        node_locked.mkdir()
        ledger = Ledger(node_locked)
        ledger.denial("B", start, interval=None)  # no lease, nothing recorded: a node-locked refusal
        ledger.close()
        found = only(report_of(ledger.path, query))
        assert (found.denials, found.unmet_us, found.peak_demand) == (1, 0, 0)

    def test_idle_node_locked_machines_are_the_seats_to_free(self, tmp_path: Path) -> None:
        """Node-locked machines not deactivated: those last seen idle_days ago or more can be freed."""
        ledger = Ledger(tmp_path)
        now = at(20)
        ledger.machine("old", "old", last_seen=now - 40 * DAY, floating=False)
        ledger.machine("edge", "edge", last_seen=now - 30 * DAY, floating=False)
        ledger.machine("new", "new", last_seen=now - DAY, floating=False)
        ledger.machine("gone", "gone", last_seen=now - 90 * DAY, floating=False, deactivated=now - 80 * DAY)
        ledger.machine("float", "float", last_seen=now - 90 * DAY, floating=True)
        ledger.activity("old", now - 40 * DAY, floating=False)
        ledger.close()
        found = only(report_of(ledger.path, PlanQuery(since=now - DAY, until=now, now=now, idle_days=30)))
        assert tuple(found.node_locked) == (3, 2)
        assert found.as_dict()["seats_to_free"] == 2
        assert "2 idle node-locked machines to free" in plan.advice(found)


def old_ledger(path: Path) -> None:
    """A ledger file as the version before this one made it: denials without their interval."""
    new_column = SCHEMA.index(",\n    floating_interval REAL")
    old = SCHEMA[:new_column] + SCHEMA[SCHEMA.index("\n", new_column + 2) :]
    assert "floating_interval" not in old
    db = sqlite3.connect(path)
    db.executescript(old)
    db.execute("INSERT INTO denials VALUES (1, ?, ?, 'm0', ?, 'local', ?)", (PRODUCT, KEY, T0, LIMIT_REACHED))
    db.commit()
    db.close()


class TestLedgerKeepsTheInterval:
    """Denials keep the interval asked for, in new ledgers and in files an earlier version made."""

    async def test_a_file_without_the_column_gets_it_on_open(self, tmp_path: Path) -> None:
        path = tmp_path / "seats.sqlite3"
        await asyncio.to_thread(old_ledger, path)
        start = T0 - 60
        query = PlanQuery(since=start, until=T0 + HOUR, now=T0, idle_days=30)
        # read before the daemon opened it: the denial reads as one without an interval
        assert only(await asyncio.to_thread(report_of, path, query)).denials == 1
        clock = Clock()
        clock.wall = T0 + 10.0
        ledger = SeatLedger(path, lease_clock=clock, clock=clock)
        await ledger.open()
        ledger.denied(LICENSE, "m1", by="upstream", message=LIMIT_REACHED, interval=120)
        await ledger.close()

        def wishes() -> list[tuple[str, float | None]]:
            with SqliteSeatReader(path).snapshot() as snapshot:
                found = snapshot.wishes(LICENSE, Window(start, T0 + HOUR, int(start), DAY))
            return [(wish.machine, wish.interval) for wish in found]

        assert await asyncio.to_thread(wishes) == [("m0", None), ("m1", 120.0)]


class TestCommand:
    """`license-server report plan` in each format, and its errors."""

    @pytest.fixture
    def state(self, tmp_path: Path) -> Path:
        """A ledger with one floating license that went over its limit on 3 November."""
        ledger = Ledger(tmp_path)
        ledger.license(1)
        ledger.lease("A", at(3, 8), at(3, 10))
        ledger.denial("B", at(3, 9), interval=HOUR)
        ledger.close()
        return tmp_path

    def test_json_lists_the_hours_over_the_limit(
        self, state: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        argv = [
            "report",
            "plan",
            "--set",
            f"state_dir={state}",
            "--since",
            "2026-11-03",
            "--until",
            "2026-11-04",
        ]
        assert main([*argv, "--format", "json"]) == 0
        (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert row["over_limit"] == ["2026-11-03T09:00:00Z"]
        assert (row["peak_seats"], row["peak_demand"], row["seats_100"], row["unmet_seat_hours"]) == (
            1,
            2,
            2,
            1.0,
        )

    def test_table_and_csv(self, state: Path, capsys: pytest.CaptureFixture[str]) -> None:
        argv = [
            "report",
            "plan",
            "--set",
            f"state_dir={state}",
            "--since",
            "2026-11-03",
            "--until",
            "2026-11-04",
        ]
        assert main(argv) == 0
        table = capsys.readouterr().out
        assert table.splitlines()[0].split() == list(plan.PLAN_COLUMNS)
        assert (
            "1 seats serve 95 % of demand-time, 2 all of it (limit 1)" not in table
        )  # 1 of 3 seat-hours unmet
        assert "2 seats serve 95 % of demand-time, 2 all of it (limit 1); 1.0 seat-hours unmet" in table
        assert main([*argv, "--format", "csv"]) == 0
        header, row = capsys.readouterr().out.splitlines()
        assert header.split(",") == list(plan.PLAN_COLUMNS)
        assert row.startswith(f"{PRODUCT},{KEY},1,1,2,3.0,1.0,1,2,2,2,1,")

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            (["--since", "yesterday-ish"], "expected a time like"),
            (["--since", "2026-11-04", "--until", "2026-11-03"], "must be later than --since"),
            (["--idle-days", "-1"], "--idle-days: must not be negative"),
        ],
    )
    def test_bad_options_are_named(
        self, state: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
    ) -> None:
        assert main(["report", "plan", "--set", f"state_dir={state}", *options]) == 2
        assert message in capsys.readouterr().err

    def test_an_unknown_product_or_key_is_said(self, state: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["report", "plan", "--set", f"state_dir={state}", "--product", "no\x1b[2J"]) == 0
        err = capsys.readouterr().err
        assert "the seat ledger has no license of product 'no\\x1b[2J'" in err
        assert err.replace("\n", "").isprintable()

    def test_without_a_ledger(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["report", "plan", "--set", f"state_dir={tmp_path}"]) == 2
        assert "no seat ledger at" in capsys.readouterr().err


class TestChart:
    """The demand line the console's chart draws beside seats in use."""

    def planned(self, path: Path, since: float, until: float) -> tuple[SeatReport, plan.LicensePlan]:
        """The seat report by hour and the plan of one license over a range."""
        with SqliteSeatReader(path).snapshot() as snapshot:
            seats = seat_report(snapshot, SeatQuery(since=since, until=until, every="hour"))
            return seats, only(
                plan_report(snapshot, PlanQuery(since=since, until=until, now=until, idle_days=1))
            )

    def test_demand_follows_every_change(self, tmp_path: Path) -> None:
        ledger = Ledger(tmp_path)
        ledger.lease("A", at(3, 8), at(3, 10))
        ledger.denial("B", at(3, 9), interval=HOUR)
        ledger.close()
        seats, found = self.planned(ledger.path, at(3), at(4))
        times, counts = charts.demand_series(seats, found)
        assert list(zip(times, counts, strict=True)) == [
            (at(3), 0),
            (at(3, 8), 1),
            (at(3, 9), 2),
            (at(3, 10), 0),
            (at(4), 0),
        ]

    def test_too_many_changes_draw_the_peak_of_each_hour(self, tmp_path: Path) -> None:
        """Over MAX_STEP_POINTS changes, each hour's highest demand, as a plain scan of the steps finds it."""
        ledger = Ledger(tmp_path)
        for n in range(charts.MAX_STEP_POINTS // 2 + 10):
            start = at(3) + n * 17.0
            ledger.lease(f"m{n % 7}", start, start + 60 + n % 11 * 30)
            if n % 5 == 0:
                ledger.denial(f"w{n % 3}", start, interval=45)
        ledger.close()
        seats, found = self.planned(ledger.path, at(3), at(4))
        assert len(found.steps) > charts.MAX_STEP_POINTS
        times, counts = charts.demand_series(seats, found)
        ends = [step[0] for step in found.steps[1:]] + [round(at(4) * 10**6)]
        expected = []
        for hour in range(24):
            low, high = round((at(3) + hour * HOUR) * 10**6), round((at(3) + (hour + 1) * HOUR) * 10**6)
            expected.append(
                max(
                    (
                        held + waiting
                        for (moment, held, waiting), end in zip(found.steps, ends, strict=True)
                        if moment < high and end > low and end > moment
                    ),
                    default=0,
                )
            )
        assert times == [at(3) + hour * HOUR for hour in range(24)] + [at(4)]
        assert counts == [*expected, expected[-1]]

    def test_the_chart_draws_demand_where_it_passed_the_seats(self, tmp_path: Path) -> None:
        ledger = Ledger(tmp_path)
        ledger.license(1)
        ledger.lease("A", at(3, 8), at(3, 10))
        ledger.denial("B", at(3, 9), interval=HOUR)
        ledger.close()
        seats, found = self.planned(ledger.path, at(3), at(4))
        charts.draw_seats(seats, tmp_path / "seats.svg", {LICENSE: found})
        assert "demand, refused machines included" in (tmp_path / "seats.svg").read_text()
