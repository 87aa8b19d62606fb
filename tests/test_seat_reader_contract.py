"""The seat ledger's read side on both backends: one history written to SQLite and PostgreSQL reads alike."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import random
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from license_server.config import DatabaseConfig
from license_server.reports import machines as machine_report
from license_server.reports import plan
from license_server.reports import seats as reports
from license_server.reports.machines import MachineQuery
from license_server.reports.plan import PlanQuery
from license_server.reports.seats import Buckets, SeatQuery
from license_server.storage.interfaces import SeatReader, SeatSnapshot
from license_server.storage.pg_seat_reader import PgSeatReader
from license_server.storage.postgres import ConnectInfo, Database, connect_info
from license_server.storage.seats import (
    SCHEMA,
    LedgerMissingError,
    LedgerUnreadableError,
    License,
    SqliteSeatReader,
    Window,
)
from tests.pgcluster import Cluster

HOUR = 3600
DAY = 86400
T0 = 1_790_000_123.25  # not on an hour: buckets and hours meet the history anywhere
PRODUCTS = ("3349", "77", "Ab")
KEYS = ("MUYVD-LSEBY-CXHRQ-XFAGY", "kqxja-wbtfa", "ZZZ-1", "aaa-1")
# Names that SQLite's NOCASE and a database collation order differently: case, accents, punctuation.
NAMES = ("alice", "Alice", "ALICE-PC", "Édith", "édith", "_build", "[lab]", "zoë", "", "Bob", "bob", "b0b")
MACHINES = ("m-a", "M-a", "m-B", "_x", "a1", "Z9", "é1", "mach-7")


@dataclass
class History:
    """Ledger rows in the column order both schemas share (booleans as bools, times as floats)."""

    licenses: list[tuple[str, str, int, float]] = field(default_factory=list)
    machines: list[tuple[str, str, str, str, str, bool, float, float, int, float | None]] = field(
        default_factory=list
    )
    leases: list[tuple[str, str, str, float, float, float | None, bool, int, str, bool]] = field(
        default_factory=list
    )
    activity: dict[tuple[str, str, int, str], tuple[bool, int]] = field(default_factory=dict)
    denials: list[tuple[str, str, str, float, str, str, float | None]] = field(default_factory=list)


def history(seed: int) -> History:
    """A varied ledger history: times on and off bucket edges, before and after the windows asked about."""
    rng = random.Random(seed)
    made = History()
    licenses = [(p, k) for p in PRODUCTS for k in KEYS if rng.random() < 0.7]

    def moment() -> float:
        """A time within a fortnight of T0, often exactly on an hour, a day or T0 itself."""
        choice = rng.random()
        if choice < 0.2:
            return float(math.floor(T0 / HOUR + rng.randint(-100, 300)) * HOUR)
        if choice < 0.25:
            return float(math.floor(T0 / DAY + rng.randint(-3, 10)) * DAY)
        if choice < 0.3:
            return T0
        return T0 + rng.uniform(-5 * DAY, 14 * DAY)

    for product, key in licenses:
        if rng.random() < 0.7:
            made.licenses.append((product, key, rng.choice((0, 1, 3, 10)), moment()))
        codes = rng.sample(MACHINES, rng.randint(1, len(MACHINES)))
        for code in codes:
            first = moment()
            deactivated = None if rng.random() < 0.6 else first + rng.uniform(0, 3 * DAY)
            made.machines.append(
                (
                    product,
                    key,
                    code,
                    rng.choice(NAMES),
                    f"10.0.0.{rng.randint(1, 9)}",
                    rng.random() < 0.5,
                    first,
                    first + rng.choice((0.0, rng.uniform(0, 9 * DAY))),
                    rng.randint(1, 10**6),
                    deactivated,
                )
            )
        holding: set[str] = set()  # machines with an open lease: one each, as the schema insists
        for _ in range(rng.randint(0, 40)):
            code = rng.choice(codes)
            started = moment()
            expires = started + rng.choice((60.0, 3600.0, rng.uniform(1, 2 * DAY)))
            released: float | None = None
            if rng.random() < 0.3:
                released = started + rng.uniform(-10, expires - started + 100)
            still_open = released is None and code not in holding and rng.random() < 0.5
            if still_open:
                holding.add(code)
            made.leases.append(
                (
                    product,
                    key,
                    code,
                    started,
                    expires,
                    released,
                    rng.random() < 0.2,
                    rng.randint(0, 5),
                    rng.choice(("upstream", "local")),
                    still_open,
                )
            )
        for _ in range(rng.randint(0, 60)):
            hour = int(math.floor(moment() / HOUR) * HOUR)
            made.activity[(product, key, hour, rng.choice(codes))] = (rng.random() < 0.5, rng.randint(1, 50))
        for _ in range(rng.randint(0, 20)):
            interval = rng.choice((None, 0.0, 300.0, 300.0, rng.uniform(1, 2 * DAY)))
            made.denials.append(
                (
                    product,
                    key,
                    rng.choice(codes),
                    moment(),
                    rng.choice(("upstream", "local")),
                    "limit",
                    interval,
                )
            )
    return made


def write_sqlite(path: Path, made: History) -> None:
    """The history as the SQLite ledger keeps it."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.executescript(SCHEMA)
        db.execute("BEGIN")
        db.executemany("INSERT INTO licenses VALUES (?, ?, ?, ?)", made.licenses)
        db.executemany(
            "INSERT INTO machines VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(*row[:5], int(row[5]), *row[6:]) for row in made.machines],
        )
        db.executemany(
            "INSERT INTO leases (product_id, license_key, machine_code, started, expires, released,"
            " overdraft, renewals, granted_by, boot_id, deadline, open)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'boot', 0, ?)",
            [(*row[:6], int(row[6]), row[7], row[8], int(row[9])) for row in made.leases],
        )
        db.executemany(
            "INSERT INTO activity VALUES (?, ?, ?, ?, ?, ?)",
            [(*k, int(floating), calls) for k, (floating, calls) in made.activity.items()],
        )
        db.executemany(
            "INSERT INTO denials (product_id, license_key, machine_code, time, denied_by, message,"
            " floating_interval) VALUES (?, ?, ?, ?, ?, ?, ?)",
            made.denials,
        )
        db.execute("COMMIT")
    finally:
        db.close()


def write_postgres(url: str, made: History) -> None:
    """The same history as the shared database keeps it (rows written directly, as the nodes would)."""
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO licenses VALUES (%s, %s, %s, %s)", made.licenses)
        cur.executemany("INSERT INTO machines VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", made.machines)
        cur.executemany(
            "INSERT INTO leases (product_id, license_key, machine_code, started, expires, released,"
            " overdraft, renewals, granted_by, node, open)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 'node-a', %s)",
            made.leases,
        )
        cur.executemany(
            "INSERT INTO activity VALUES (%s, %s, %s, %s, %s, %s)",
            [(*k, floating, calls) for k, (floating, calls) in made.activity.items()],
        )
        cur.executemany(
            "INSERT INTO denials (product_id, license_key, machine_code, time, denied_by, message,"
            " floating_interval, node) VALUES (%s, %s, %s, %s, %s, %s, %s, 'node-a')",
            made.denials,
        )


def migrate(url: str) -> None:
    """Create the schema as a node does at start."""

    async def run() -> None:
        db = Database(connect_info(DatabaseConfig(url=url)))
        await db.open()
        await db.close()

    asyncio.run(run())


def icu_database(cluster: Cluster) -> str:
    """A fresh database whose default collation is ICU's English one, unlike SQLite's bytes."""
    name = f"seat_reader_{os.getpid()}_{random.randrange(10**9)}"
    with cluster.admin() as conn:
        conn.execute(
            f"CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
            " LOCALE 'C.UTF-8'"
        )
    return cluster.url(name)


@dataclass
class Both:
    """One history in a SQLite ledger file and in a PostgreSQL database."""

    made: History
    sqlite: SqliteSeatReader
    pg: PgSeatReader
    url: str

    @property
    def readers(self) -> tuple[SeatReader, SeatReader]:
        """The two read sides, SQLite first."""
        return self.sqlite, self.pg


@pytest.fixture(params=[1, 2, 3])
def both(request: pytest.FixtureRequest, pg_cluster: Cluster, tmp_path: Path) -> Both:
    """A seeded history written to both backends."""
    made = history(request.param)
    path = tmp_path / "seats.sqlite3"
    write_sqlite(path, made)
    url = icu_database(pg_cluster)
    migrate(url)
    write_postgres(url, made)
    return Both(made, SqliteSeatReader(path), PgSeatReader(connect_info(DatabaseConfig(url=url))), url)


def windows(rng: random.Random) -> Iterator[Window]:
    """Report windows and odd ones: buckets of any size, origins before, on and after `since`."""
    for every, since_at, span in itertools.product(
        ("hour", "day", "week"), (-6 * DAY, -HOUR / 2, 0.0, 3 * DAY + 0.5), (HOUR, 2 * DAY, 9 * DAY)
    ):
        since = T0 + since_at
        buckets = Buckets.covering(since, since + span, every)
        yield Window(since, since + span, buckets.origin, buckets.size)
    for _ in range(25):
        since = T0 + rng.uniform(-6 * DAY, 12 * DAY)
        if rng.random() < 0.3:
            since = float(math.floor(since / HOUR) * HOUR)  # on an hour: the hour row at `since` whole
        until = since + rng.choice((1.0, 7.0, HOUR, rng.uniform(1, 10 * DAY)))
        size = rng.choice((1, 7, 601, 3599, 5400, 86401, 7 * DAY))
        origin = math.floor(since) + rng.choice((0, -rng.randint(1, 3 * size), rng.randint(1, 3 * size)))
        yield Window(since, until, origin, size)


def license_set(made: History) -> list[License]:
    """Every license of the history, and one it never mentions."""
    found = {(row[0], row[1]) for row in made.machines} | {(row[0], row[1]) for row in made.licenses}
    return sorted(found | {("3349", "NOT-A-KEY")})


def test_every_snapshot_method_answers_alike(both: Both) -> None:
    rng = random.Random(7)
    with both.sqlite.snapshot() as lite, both.pg.snapshot() as pg:
        assert pg.licenses() == lite.licenses()
        assert pg.licenses()  # the history is not empty
        for product in (*PRODUCTS, "none"):
            assert pg.licenses(product) == lite.licenses(product)
        assert pg.limits() == lite.limits()
        assert pg.machine_counts() == lite.machine_counts()
        for idle_before in (T0 - 10 * DAY, T0, T0 + 3 * DAY, T0 + 30 * DAY):
            assert pg.node_locked(idle_before) == lite.node_locked(idle_before)
        assert any(lite.node_locked(T0 + 3 * DAY).values())
        for now in (T0 - DAY, T0, T0 + 3600, T0 + 3 * DAY):
            assert pg.live_leases(now) == lite.live_leases(now)
        assert any(lite.live_leases(T0 + 3600).values())
        for license in license_set(both.made):
            assert pg.limit(license) == lite.limit(license)
            for window in windows(rng):
                # The SQLite query names no order for leases; the report sweeps them sorted.
                assert sorted(pg.leases(license, window)) == sorted(lite.leases(license, window))
                assert list(pg.callers(license, window)) == list(lite.callers(license, window))
                assert list(pg.presence(license, window)) == list(lite.presence(license, window))
                assert pg.denials(license, window) == lite.denials(license, window)
                assert pg.wishes(license, window) == lite.wishes(license, window)
        for row in [*both.made.machines, ("3349", KEYS[0], "unknown", *both.made.machines[0][3:])]:
            license, code = (row[0], row[1]), row[2]
            assert pg.machine(license, code) == lite.machine(license, code)
        assert_machines_alike(lite, pg)


def assert_machines_alike(lite: SeatSnapshot, pg: SeatSnapshot) -> None:
    """machines() with each filter, alone and together, in the same order."""
    everything = lite.machines()
    assert everything
    assert pg.machines() == everything
    moments = sorted(row.last_seen for row in everything)
    idle = [None, moments[0] - 1, moments[len(moments) // 2], moments[-1]]
    keys = [None, *KEYS, "muyvd-lsebY-cxhrq-xfagy", "KQXJA-WBTFA", "none"]
    for product, key, idle_before in itertools.product((None, *PRODUCTS), keys, idle):
        found = pg.machines(product=product, key=key, idle_before=idle_before)
        assert found == lite.machines(product=product, key=key, idle_before=idle_before)


def test_reports_are_the_same_from_either_backend(both: Both) -> None:
    queries = [
        SeatQuery(since=T0 + since, until=T0 + since + span, every=every, product=product, key=key)
        for since, span, every, product, key in [
            (-5 * DAY, 20 * DAY, "day", None, None),
            (-5 * DAY, 20 * DAY, "week", None, None),
            (-HOUR / 3, 3 * DAY, "hour", None, None),
            (0.0, 2 * DAY, "hour", "3349", None),
            (DAY + 0.5, 4 * DAY, "day", None, "muyvd-lsebY-cxhrq-xfagy"),
            (-2 * DAY, 9 * DAY, "week", "77", "aaa-1"),
        ]
    ]
    machine_queries = [
        MachineQuery(now=T0 + now, idle_days=idle, name=name, product=product, key=key)
        for now, idle, name, product, key in itertools.product(
            (0.0, 10 * DAY), (None, 0, 2), (None, "édith", "ALICE", "b"), (None, "3349"), (None, "zzz-1")
        )
    ]
    with both.sqlite.snapshot() as lite, both.pg.snapshot() as pg:
        for query in queries:
            expected = reports.seat_report(lite, query, max_steps=10_000)
            assert reports.seat_report(pg, query, max_steps=10_000) == expected
        assert any(reports.seat_report(lite, query).licenses for query in queries)
        plans: list[plan.LicensePlan] = []
        for since, span, product, key in [
            (-5 * DAY, 20 * DAY, None, None),
            (-HOUR / 3, 3 * DAY, "3349", None),
            (DAY + 0.5, 4 * DAY, None, "muyvd-lsebY-cxhrq-xfagy"),
        ]:
            for idle_days in (0, 2):
                plan_query = PlanQuery(
                    since=T0 + since,
                    until=T0 + since + span,
                    now=T0 + 5 * DAY,
                    idle_days=idle_days,
                    product=product,
                    key=key,
                )
                planned = plan.plan_report(lite, plan_query)
                assert plan.plan_report(pg, plan_query) == planned
                plans.extend(planned.licenses)
        assert any(found.unmet_us for found in plans)
        assert any(found.node_locked.idle for found in plans)
        for machine_query in machine_queries:
            expected_rows = machine_report.machines(lite, machine_query)
            assert machine_report.machines(pg, machine_query) == expected_rows


def test_a_snapshot_sees_one_moment(both: Both) -> None:
    with both.pg.snapshot() as pg:
        before = pg.machines()
        with psycopg.connect(both.url, autocommit=True) as conn:
            conn.execute("INSERT INTO machines VALUES ('3349', 'NEW', 'new', 'new', '', true, 1, 1, 1, NULL)")
            conn.execute("INSERT INTO denials VALUES (DEFAULT, '3349', 'NEW', 'new', 1, 'local', '', 'b')")
        assert pg.machines() == before
        assert ("3349", "NEW") not in pg.licenses()
    with both.pg.snapshot() as pg:
        assert len(pg.machines()) == len(before) + 1
        assert ("3349", "NEW") in pg.licenses()


def test_a_database_without_the_schema_is_missing_not_unreadable(pg_url: str) -> None:
    reader = PgSeatReader(connect_info(DatabaseConfig(url=pg_url)))
    with pytest.raises(LedgerMissingError, match="the daemon has not created the schema"), reader.snapshot():
        pass


def test_a_database_with_a_broken_schema_is_unreadable(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version integer)")
    reader = PgSeatReader(ConnectInfo(pg_url, password="hunter2-secret"))
    with pytest.raises(LedgerUnreadableError) as raised, reader.snapshot() as snapshot:
        snapshot.machines()
    assert "cannot read the seat ledger in the database at" in str(raised.value)
    assert "machines" in str(raised.value)
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize(
    "info",
    [
        ConnectInfo("postgresql://license:hunter2-secret@127.0.0.1:1/nothing"),
        ConnectInfo("postgresql://license@127.0.0.1:1/nothing", password="hunter2-secret"),
    ],
    ids=["password-in-url", "password-apart"],
)
def test_an_unreachable_database_is_named_without_its_password(info: ConnectInfo) -> None:
    with pytest.raises(LedgerUnreadableError) as raised, PgSeatReader(info).snapshot():
        pass
    message = str(raised.value)
    assert "127.0.0.1:1/nothing" in message
    assert "hunter2" not in message
    assert "hunter2" not in repr(raised.value)
