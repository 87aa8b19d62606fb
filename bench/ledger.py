"""A seat ledger with a year of simulated traffic, written with the daemon's schema as the daemon writes it.

Shape (the defaults; `LedgerShape.scaled` shrinks it for --quick):
- 500 licenses of 10 machines each (5,000 machines), each machine with its friendly name and address;
- 400 node-locked licenses: on each workday (Monday to Friday, UTC) a machine starts its application with
  probability 0.62, which makes one Activate call at a random hour between 07:00 and 18:00;
- 100 floating licenses of 3 seats: on each workday a machine wants a seat with probability 0.35, from a
  random time between 07:00 and 12:00 for 1 to 6 hours; it activates with FloatingTimeInterval 7200 and
  renews every hour (one call each); 80 % of sessions end with a deactivation (lease released), the rest
  let the lease expire; a machine that finds all 3 seats taken is denied (one call, a denial row that asks
  for 7200 s);
- every call adds to its (license, hour, machine) activity row, as SeatLedger.seen does, and to the
  machine's row (first and last seen, calls, deactivated after a release until it activates again).
That is about 1,000,000 calls over the 365 days that end at the current hour; the exact count is returned.
"""

from __future__ import annotations

import dataclasses
import random
import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bench.dataset import license_key, machine_code
from license_server.storage.seats import LIMIT_REACHED, SCHEMA
from license_server.storage.state import SEATS_FILE

HOUR = 3600
DAY = 86400
LEDGER_FILE = SEATS_FILE  # the daemon's seat ledger in state_dir
_PRODUCT = "3349"
_BOOT_ID = "bench-ledger"


@dataclass(frozen=True, slots=True)
class LedgerShape:
    """What the simulated year looks like."""

    node_locked_licenses: int = 400
    floating_licenses: int = 100
    machines_per_license: int = 10
    days: int = 365
    node_locked_use: float = 0.655  # chance a node-locked machine is used on a workday
    floating_use: float = 0.35  # chance a floating machine wants a seat on a workday
    floating_seats: int = 3  # MaxNoOfMachines of a floating license
    lease_seconds: int = 7200  # FloatingTimeInterval
    release_share: float = 0.8  # sessions that end with a deactivation

    def scaled(self, licenses: int, days: int) -> LedgerShape:
        """The same shape with fewer licenses (split 4:1 as above) and days."""
        floating = max(1, licenses // 5)
        return dataclasses.replace(
            self, node_locked_licenses=licenses - floating, floating_licenses=floating, days=days
        )


@dataclass(slots=True)
class _Machine:
    """A machine's row in `machines`, built up call by call."""

    code: str
    name: str
    client: str
    floating: bool
    first_seen: float = 0.0
    last_seen: float = 0.0
    calls: int = 0
    deactivated: float | None = None

    def called(self, moment: float, *, activated: bool) -> None:
        """An Activate call: seen now, and no longer deactivated if it was activated."""
        self.first_seen = self.first_seen or moment
        self.last_seen = max(self.last_seen, moment)
        self.calls += 1
        if activated:
            self.deactivated = None

    def row(self, key: str) -> tuple[object, ...]:
        """The machine's row in `machines`."""
        return (
            _PRODUCT,
            key,
            self.code,
            self.name,
            self.client,
            int(self.floating),
            self.first_seen,
            self.last_seen,
            self.calls,
            self.deactivated,
        )


@dataclass(slots=True)
class _License:
    """One license's rows, written when it is done."""

    key: str
    activity: defaultdict[tuple[int, str], list[int]]  # (hour, machine) -> [floating, calls]
    leases: list[tuple[object, ...]]
    denials: list[tuple[object, ...]]
    calls: int = 0

    def call(self, machine: _Machine, moment: float, *, activated: bool = True) -> None:
        """Record one call as SeatLedger.seen does."""
        machine.called(moment, activated=activated)
        row = self.activity[(int(moment // HOUR * HOUR), machine.code)]
        row[0] = max(row[0], int(machine.floating))
        row[1] += 1
        self.calls += 1


def build(path: Path, shape: LedgerShape, *, seed: int = 8) -> int:
    """Write a ledger of simulated traffic to `path` (a new file); returns how many calls it records."""
    rng = random.Random(seed)
    end = int(time.time() // HOUR * HOUR)
    first_day = (end - shape.days * DAY) // DAY * DAY
    workdays = [
        day
        for day in range(first_day, end, DAY)
        if time.gmtime(day).tm_wday < 5 and day + 18 * HOUR <= end and day >= end - shape.days * DAY
    ]
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")  # as the daemon's SqliteWorker opens it
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    total = 0
    lease_id = 1
    count = shape.node_locked_licenses + shape.floating_licenses
    for number in range(count):
        floating = number >= shape.node_locked_licenses
        lic = _License(license_key(100_000 + number), defaultdict(lambda: [0, 0]), [], [])
        machines = [
            _Machine(
                code=machine_code(100_000 + number, m),
                name=f"CAD-{number:04d}-{m:02d}",
                client=f"10.{number // 250}.{number % 250}.{m + 10}",
                floating=floating,
            )
            for m in range(shape.machines_per_license)
        ]
        if floating:
            lease_id = _floating_year(lic, machines, workdays, shape, rng, lease_id)
        else:
            for day in workdays:
                for machine in machines:
                    if rng.random() < shape.node_locked_use:
                        lic.call(machine, day + 7 * HOUR + rng.random() * 11 * HOUR)
        limit = shape.floating_seats if floating else shape.machines_per_license
        _write(db, lic, machines, limit, end)
        total += lic.calls
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return total


def _floating_year(
    lic: _License,
    machines: list[_Machine],
    workdays: list[int],
    shape: LedgerShape,
    rng: random.Random,
    lease_id: int,
) -> int:
    """Simulate floating sessions day by day; returns the next free lease id."""
    for day in workdays:
        wishes = sorted(
            (
                (day + 7 * HOUR + rng.random() * 5 * HOUR, HOUR + rng.random() * 5 * HOUR, machine)
                for machine in machines
                if rng.random() < shape.floating_use
            ),
            key=lambda wish: wish[0],
        )
        live: list[float] = []  # when each lease taken today stops being live
        for start, length, machine in wishes:
            live = [stop for stop in live if stop > start]
            if len(live) >= shape.floating_seats:
                lic.call(machine, start, activated=False)
                lic.denials.append(
                    (_PRODUCT, lic.key, machine.code, start, "upstream", LIMIT_REACHED, shape.lease_seconds)
                )
                continue
            lic.call(machine, start)
            renewals = int(length // HOUR)
            for renewal in range(1, renewals + 1):
                lic.call(machine, start + renewal * HOUR)
            expires = start + renewals * HOUR + shape.lease_seconds
            released: float | None = None
            if rng.random() < shape.release_share:
                released = expires = start + length  # SeatLedger._end: expires = min(expires, now)
                machine.deactivated = released
            live.append(expires)
            lic.leases.append(
                (
                    lease_id,
                    _PRODUCT,
                    lic.key,
                    machine.code,
                    start,
                    expires,
                    released,
                    0,
                    renewals,
                    "upstream",
                    _BOOT_ID,
                    expires,
                    0,
                )
            )
            lease_id += 1
    return lease_id


def _write(db: sqlite3.Connection, lic: _License, machines: list[_Machine], limit: int, now: float) -> None:
    """Write one license's rows in one transaction."""
    with db:
        db.execute("BEGIN")
        db.execute("INSERT INTO licenses VALUES (?, ?, ?, ?)", (_PRODUCT, lic.key, limit, now))
        db.executemany(
            "INSERT INTO machines VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [machine.row(lic.key) for machine in machines if machine.calls],
        )
        db.executemany(
            "INSERT INTO activity VALUES (?, ?, ?, ?, ?, ?)",
            [
                (_PRODUCT, lic.key, hour, code, floating, calls)
                for (hour, code), (floating, calls) in sorted(lic.activity.items())
            ],
        )
        db.executemany("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", lic.leases)
        db.executemany(
            "INSERT INTO denials (product_id, license_key, machine_code, time, denied_by, message,"
            " floating_interval) VALUES (?, ?, ?, ?, ?, ?, ?)",
            lic.denials,
        )
