"""Seat ledger: machines by friendly name, floating leases that expire on time whatever the wall clock does.

Live leases are timed on CLOCK_BOOTTIME, which neither jumps with the wall clock nor restarts with the
daemon; the wall-clock times kept beside them are for reports. After a reboot, leases fall back to their
wall-clock expiry, the best there is.

The read side (`SqliteSeatReader`) serves reports and the console: read-only connections, one consistent
snapshot at a time, from the daemon's process or another one while the daemon writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import structlog

from license_server.storage.sqlite import SqliteWorker

log = structlog.get_logger(__name__)

LIMIT_REACHED = "Cannot activate the new device as the limit has been reached."
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_HOUR = 3600
_SEEN_FLUSH_EVERY = 1.0  # seconds calls are summed in memory before they are written

SCHEMA = """
CREATE TABLE IF NOT EXISTS licenses (
    product_id   TEXT NOT NULL,
    license_key  TEXT NOT NULL,
    max_machines INTEGER NOT NULL,   -- MaxNoOfMachines of the newest signed license seen; 0: no limit
    updated      REAL NOT NULL,
    PRIMARY KEY (product_id, license_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS machines (
    product_id    TEXT NOT NULL,
    license_key   TEXT NOT NULL,
    machine_code  TEXT NOT NULL,
    friendly_name TEXT NOT NULL,
    client        TEXT NOT NULL,
    floating      INTEGER NOT NULL,  -- 1 when its last activation was floating
    first_seen    REAL NOT NULL,
    last_seen     REAL NOT NULL,
    calls         INTEGER NOT NULL,
    deactivated   REAL,              -- when a deactivation passed through, until it activates again
    PRIMARY KEY (product_id, license_key, machine_code)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS machines_last_seen ON machines (last_seen);
CREATE INDEX IF NOT EXISTS machines_name ON machines (friendly_name COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS leases (
    id           INTEGER PRIMARY KEY,
    product_id   TEXT NOT NULL,
    license_key  TEXT NOT NULL,
    machine_code TEXT NOT NULL,
    started      REAL NOT NULL,      -- wall clock
    expires      REAL NOT NULL,      -- wall clock, moved on by renewals
    released     REAL,               -- wall clock of a deactivation, if any
    overdraft    INTEGER NOT NULL,
    renewals     INTEGER NOT NULL,
    granted_by   TEXT NOT NULL,      -- 'upstream' or 'local' (during an outage)
    boot_id      TEXT NOT NULL,
    deadline     REAL NOT NULL,      -- CLOCK_BOOTTIME of boot_id when the lease ends
    open         INTEGER NOT NULL DEFAULT 1  -- 0 once released or seen expired: never live again
);
CREATE INDEX IF NOT EXISTS leases_license_time ON leases (product_id, license_key, started);
-- reports look for leases overlapping a range: started before its end and expiring after its start
CREATE INDEX IF NOT EXISTS leases_license_expires ON leases (product_id, license_key, expires);
CREATE INDEX IF NOT EXISTS leases_open ON leases (id) WHERE open = 1;
CREATE TABLE IF NOT EXISTS activity (
    product_id   TEXT NOT NULL,
    license_key  TEXT NOT NULL,
    hour         INTEGER NOT NULL,   -- unix time of the hour's start
    machine_code TEXT NOT NULL,
    floating     INTEGER NOT NULL,
    calls        INTEGER NOT NULL,
    PRIMARY KEY (product_id, license_key, hour, machine_code)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS denials (
    id           INTEGER PRIMARY KEY,
    product_id   TEXT NOT NULL,
    license_key  TEXT NOT NULL,
    machine_code TEXT NOT NULL,
    time         REAL NOT NULL,
    denied_by    TEXT NOT NULL,      -- 'upstream' or 'local'
    message      TEXT NOT NULL,
    floating_interval REAL           -- seconds the machine asked a seat for (0: node-locked); NULL: not kept
);
CREATE INDEX IF NOT EXISTS denials_license_time ON denials (product_id, license_key, time);
"""

License = tuple[str, str]  # (product id, upper-cased license key)


def _upgrade(db: sqlite3.Connection) -> None:
    """Add what later versions added to a ledger file an earlier version made (SQLite has no migrations)."""
    if denied_interval(db) == "NULL":
        db.execute("ALTER TABLE denials ADD COLUMN floating_interval REAL")


def denied_interval(db: sqlite3.Connection) -> str:
    """What to select for a denial's interval: its column, or NULL in a file made before it was kept."""
    found = any(row[1] == "floating_interval" for row in db.execute("PRAGMA table_info(denials)"))
    return "floating_interval" if found else "NULL"


class LeaseClock(Protocol):
    """A clock for lease deadlines that the wall clock cannot move, and the id of what it counts from."""

    boot_id: str

    def now(self) -> float:
        """Seconds since the clock's origin."""
        ...


class BootClock:
    """Seconds since boot, counting suspend, and the id of the boot they count from (reads /proc)."""

    def __init__(self) -> None:
        try:
            self.boot_id = _BOOT_ID.read_text().strip()
        except OSError:  # not Linux: every start counts as a new boot, wall-clock expiry is used
            self.boot_id = uuid.uuid4().hex

    def now(self) -> float:
        """Seconds on CLOCK_BOOTTIME."""
        return time.clock_gettime(time.CLOCK_BOOTTIME)


class _Row(NamedTuple):
    """A lease row as loaded at start."""

    id: int
    product_id: str
    license_key: str
    machine: str
    expires: float
    overdraft: bool
    boot_id: str
    deadline: float


@dataclass(slots=True)
class _Seen:
    """A machine's licensed activations since the last flush."""

    friendly_name: str
    client: str
    floating: bool
    first_seen: float
    last_seen: float
    calls: int


@dataclass(slots=True)
class Lease:
    """A live floating seat."""

    id: int
    machine: str
    deadline: float  # on the lease clock
    expires: float  # wall clock, for reports
    overdraft: bool


class SeatLedger:
    """Who holds which seat: updated from the traffic, asked before a floating seat is granted offline."""

    def __init__(
        self,
        path: Path,
        *,
        lease_clock: LeaseClock,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = SqliteWorker(path, SCHEMA, _upgrade)
        self.reader = SqliteSeatReader(path)
        self.clock = clock
        self.lease_clock = lease_clock
        self._live: dict[License, dict[str, Lease]] = {}
        self._limits: dict[License, int] = {}
        self._next_id = 1
        self._seen: dict[tuple[str, str, str], _Seen] = {}
        self._activity: dict[tuple[str, str, int, str], list[int]] = {}  # -> [calls, floating]
        self._flush_timer: asyncio.TimerHandle | None = None

    async def open(self) -> int:
        """Open the ledger and load limits and live leases; returns how many leases are live."""
        await self._db.open()
        boot_id, boot_now, wall_now = self.lease_clock.boot_id, self.lease_clock.now(), self.clock()

        def load(db: sqlite3.Connection) -> tuple[list[tuple[str, str, int]], list[_Row], int]:
            limits = db.execute("SELECT product_id, license_key, max_machines FROM licenses").fetchall()
            leases = [
                _Row(int(i), str(p), str(k), str(m), float(e), bool(o), str(b), float(d))
                for i, p, k, m, e, o, b, d in db.execute(
                    "SELECT id, product_id, license_key, machine_code, expires, overdraft, boot_id, deadline"
                    " FROM leases WHERE open = 1"
                )
            ]
            top = db.execute("SELECT coalesce(max(id), 0) FROM leases").fetchone()[0]
            return limits, leases, int(top)

        limits, rows, top = await self._db.run(load)
        self._limits = {(p, k): n for p, k, n in limits}
        self._next_id = top + 1
        carried: list[Lease] = []
        ended: list[int] = []
        for row in rows:
            lease = Lease(row.id, row.machine, row.deadline, row.expires, row.overdraft)
            if row.boot_id != boot_id:  # another boot: its clock is gone, the wall clock is all there is
                lease.deadline = boot_now + (row.expires - wall_now)
                carried.append(lease)
            if lease.deadline > boot_now:
                self._live.setdefault((row.product_id, row.license_key), {})[row.machine] = lease
            else:
                ended.append(lease.id)

        def settle(db: sqlite3.Connection) -> None:
            # Carried leases run on this boot's clock from now on, whatever the wall clock does next;
            # ended ones are closed, so that no later clock jump can bring them back.
            db.executemany(
                "UPDATE leases SET boot_id = ?, deadline = ? WHERE id = ?",
                [(boot_id, lease.deadline, lease.id) for lease in carried],
            )
            db.executemany("UPDATE leases SET open = 0 WHERE id = ?", [(i,) for i in ended])

        if carried or ended:
            await self._db.write(settle)
        return sum(len(leases) for leases in self._live.values())

    async def flush(self) -> None:
        """Write the calls summed in memory now, and wait until every queued write has landed."""
        self._flush_seen()
        await self._db.flush()

    async def close(self) -> None:
        """Flush and close the ledger."""
        self._flush_seen()
        await self._db.close()

    # -- what the daemon asks ----------------------------------------------------------------------

    def live(self, license: License) -> dict[str, Lease]:
        """The live leases of a license, by machine code (expired ones are let go here)."""
        leases = self._live.get(license)
        if not leases:
            return {}
        now = self.lease_clock.now()
        ended = [lease.id for lease in leases.values() if lease.deadline <= now]
        if ended:
            for machine in [m for m, lease in leases.items() if lease.deadline <= now]:
                del leases[machine]
            self._db.write(
                lambda db: db.executemany("UPDATE leases SET open = 0 WHERE id = ?", [(i,) for i in ended])
            )
        return leases

    def in_use(self) -> dict[License, int]:
        """Live floating seats per license."""
        return {license: n for license in list(self._live) if (n := len(self.live(license)))}

    def limit(self, license: License) -> int | None:
        """MaxNoOfMachines of the newest signed license seen (0: no limit), or None if never seen."""
        return self._limits.get(license)

    async def take(self, license: License, machine: str, interval: float, max_overdraft: int) -> bool:
        """Grant or renew a floating seat locally (upstream unreachable); False when none is free.

        Check and grant happen without yielding to the event loop, so concurrent calls cannot both take the
        last seat. True once the lease is on disk.
        """
        grant = self._take(license, machine, interval, max_overdraft)  # no await before: nothing interleaves
        if grant is None:
            return False
        await grant
        return True

    def _take(
        self, license: License, machine: str, interval: float, max_overdraft: int
    ) -> asyncio.Future[None] | None:
        """Check and grant (or renew) without yielding; the write's future, or None when no seat is free."""
        leases = self.live(license)
        if machine in leases:
            return self._renew(leases[machine], interval)
        limit = self._limits.get(license)
        if limit is None:
            return None  # never saw the signed license: nothing to bound seats by
        regular = sum(1 for lease in leases.values() if not lease.overdraft)
        if limit == 0 or regular < limit:
            return self._grant(license, machine, interval, overdraft=False, granted_by="local")
        if len(leases) - regular < max_overdraft:
            return self._grant(license, machine, interval, overdraft=True, granted_by="local")
        return None

    # -- what the daemon tells it --------------------------------------------------------------------

    def granted(
        self, license: License, machine: str, seconds: float, *, overdraft: bool
    ) -> asyncio.Future[None]:
        """Upstream granted or renewed a floating seat for `seconds` from now."""
        lease = self.live(license).get(machine)
        if lease is not None and lease.overdraft == overdraft:
            return self._renew(lease, seconds)
        if lease is not None:
            self._end(license, lease)
        return self._grant(license, machine, seconds, overdraft=overdraft, granted_by="upstream")

    def released(self, license: License, machine: str) -> asyncio.Future[None]:
        """A deactivation passed through: the machine's seat is free, floating or node-locked."""
        self._flush_seen()  # calls seen before it are written before it, so they cannot undo it
        now = self.clock()
        lease = self.live(license).get(machine)
        if lease is not None:
            self._end(license, lease)
        product, key = license
        return self._db.write(
            lambda db: db.execute(
                "UPDATE machines SET deactivated = ?"
                " WHERE product_id = ? AND license_key = ? AND machine_code = ?",
                (now, product, key, machine),
            )
        )

    def set_limit(self, license: License, max_machines: int) -> None:
        """Remember a signed license's MaxNoOfMachines."""
        if self._limits.get(license) == max_machines:
            return
        self._limits[license] = max_machines
        product, key = license
        now = self.clock()
        self._db.write(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO licenses VALUES (?, ?, ?, ?)", (product, key, max_machines, now)
            )
        )

    def seen(
        self,
        license: License,
        machine: str,
        *,
        friendly_name: str,
        client: str,
        floating: bool,
    ) -> None:
        """A machine's activation was licensed: remember its name, address and time; clear a deactivation.

        Only licensed activations come here (upstream's answer names the machine, or a kept answer or
        license file was served within the seat bound), so the machines and their hourly activity are the
        ones that held a seat; refused and failed calls are in the audit trail only.

        Calls are summed in memory and written about once a second, or at once by flush(): a busy machine
        costs one row update per flush, not one per call. A killed daemon loses at most that second of
        counts (the audit trail has every call); leases are written at once.
        """
        now = self.clock()
        product, key = license
        pending = self._seen.get((product, key, machine))
        if pending is None:
            self._seen[(product, key, machine)] = _Seen(friendly_name, client, floating, now, now, 1)
        else:
            pending.friendly_name = friendly_name or pending.friendly_name
            pending.client, pending.floating, pending.last_seen = client, floating, now
            pending.calls += 1
        hour = int(now // _HOUR * _HOUR)
        counts = self._activity.setdefault((product, key, hour, machine), [0, 0])
        counts[0] += 1
        counts[1] = max(counts[1], int(floating))
        if self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(_SEEN_FLUSH_EVERY, self._flush_seen)

    def _flush_seen(self) -> None:
        """Queue the summed calls for writing."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()  # when a flush comes before it: the calls are queued here and now
            self._flush_timer = None
        machines, self._seen = self._seen, {}
        activity, self._activity = self._activity, {}
        if not machines and not activity:
            return

        def write(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO machines VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)"
                " ON CONFLICT DO UPDATE SET"
                " friendly_name = CASE WHEN excluded.friendly_name = '' THEN friendly_name"
                "   ELSE excluded.friendly_name END,"
                " client = excluded.client, floating = excluded.floating, last_seen = excluded.last_seen,"
                " calls = calls + excluded.calls, deactivated = NULL",
                [
                    (
                        p,
                        k,
                        m,
                        s.friendly_name,
                        s.client,
                        int(s.floating),
                        s.first_seen,
                        s.last_seen,
                        s.calls,
                    )
                    for (p, k, m), s in machines.items()
                ],
            )
            db.executemany(
                "INSERT INTO activity VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO UPDATE SET calls = calls + excluded.calls,"
                " floating = max(floating, excluded.floating)",
                [(p, k, hour, m, floating, calls) for (p, k, hour, m), (calls, floating) in activity.items()],
            )

        self._db.write(write)

    def denied(self, license: License, machine: str, *, by: str, message: str, interval: float) -> None:
        """A seat was refused, by upstream or by the daemon in an outage; `interval`: seconds asked for."""
        now = self.clock()
        product, key = license
        self._db.write(
            lambda db: db.execute(
                "INSERT INTO denials"
                " (product_id, license_key, machine_code, time, denied_by, message, floating_interval)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (product, key, machine, now, by, message, interval),
            )
        )

    # -- lease bookkeeping -----------------------------------------------------------------------------

    def _grant(
        self, license: License, machine: str, seconds: float, *, overdraft: bool, granted_by: str
    ) -> asyncio.Future[None]:
        now, boot_now = self.clock(), self.lease_clock.now()
        lease = Lease(self._next_id, machine, boot_now + seconds, now + seconds, overdraft)
        self._next_id += 1
        self._live.setdefault(license, {})[machine] = lease
        product, key = license
        boot_id = self.lease_clock.boot_id
        return self._db.write(
            lambda db: db.execute(
                "INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, NULL, ?, 0, ?, ?, ?, 1)",
                (
                    lease.id,
                    product,
                    key,
                    machine,
                    now,
                    lease.expires,
                    int(overdraft),
                    granted_by,
                    boot_id,
                    lease.deadline,
                ),
            )
        )

    def _renew(self, lease: Lease, seconds: float) -> asyncio.Future[None]:
        lease.deadline = self.lease_clock.now() + seconds
        lease.expires = self.clock() + seconds
        deadline, expires, boot_id = lease.deadline, lease.expires, self.lease_clock.boot_id
        return self._db.write(
            lambda db: db.execute(
                "UPDATE leases SET expires = ?, deadline = ?, boot_id = ?, renewals = renewals + 1"
                " WHERE id = ?",
                (expires, deadline, boot_id, lease.id),
            )
        )

    def _end(self, license: License, lease: Lease) -> None:
        self._live.get(license, {}).pop(lease.machine, None)
        now = self.clock()
        self._db.write(
            lambda db: db.execute(
                "UPDATE leases SET released = ?, expires = min(expires, ?), open = 0 WHERE id = ?",
                (now, now, lease.id),
            )
        )


# -- the read side: reports and the console ---------------------------------------------------------------

# Leases live within the range, cut to it; a lease is live on [started, end), a release ends it early.
# Standard SQL with named parameters, for both backends (the PostgreSQL reader turns :now into %(now)s).
LIVE_LEASES = (
    "SELECT product_id, license_key, machine_code, max(expires) FROM leases"
    " WHERE open AND released IS NULL AND expires > :now GROUP BY product_id, license_key, machine_code"
)
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
# For one with leases, the report adds their machines to these: each machine that called in a bucket, once,
# whether it was node-locked there, in bucket order.
_CALLERS = f"SELECT bucket, machine_code, max(node_locked) FROM ({_CALLED}) GROUP BY bucket, machine_code"  # noqa: S608
_DENIALS = (
    "SELECT CAST((time - :origin) / :size AS INTEGER) AS bucket, count(*) FROM denials"
    " WHERE product_id = :product AND license_key = :key AND time >= :since AND time < :until GROUP BY bucket"
)
# The denials made in the range, each with the interval its machine asked for (NULL where not kept).
_WISHES = (
    "SELECT machine_code, time, {interval} FROM denials"
    " WHERE product_id = :product AND license_key = :key AND time >= :since AND time < :until"
    " ORDER BY time, id"
)
# Machines whose last activation was node-locked and that hold their seat still, and the idle ones of them.
_NODE_LOCKED = (
    "SELECT product_id, license_key, count(*), sum(last_seen <= ?) FROM machines"
    " WHERE NOT floating AND deactivated IS NULL GROUP BY product_id, license_key"
)
_MACHINES = (
    "SELECT friendly_name, product_id, license_key, machine_code, first_seen, last_seen, client, calls,"
    " floating, deactivated FROM machines"
)
_MACHINE = f"{_MACHINES} WHERE product_id = ? AND license_key = ? AND machine_code = ?"
_MACHINE_COUNTS = (
    "SELECT product_id, license_key, count(*), sum(deactivated IS NULL) FROM machines"
    " GROUP BY product_id, license_key"
)
_LIMIT = "SELECT max_machines FROM licenses WHERE product_id = ? AND license_key = ?"
_LIMITS = "SELECT product_id, license_key, max_machines, updated FROM licenses"
# Tables with an index that starts with (product_id, license_key): their licenses are found by seeks.
_LICENSE_TABLES = ("leases", "activity", "denials")


class LedgerMissingError(Exception):
    """The seat ledger file does not exist: the daemon has not run with this state_dir."""

    def __init__(self, path: Path) -> None:
        """Keep the path that was looked for."""
        super().__init__(f"no seat ledger at {path} yet: the daemon has not run with this state_dir")
        self.path = path


class LedgerUnreadableError(Exception):
    """The seat ledger cannot be read: not a database, or not a seat ledger."""


class Window(NamedTuple):
    """A time range [since, until) of unix seconds, counted in buckets of `size` seconds from `origin`."""

    since: float
    until: float
    origin: int
    size: int


class MachineRow(NamedTuple):
    """A machine as the ledger keeps it."""

    friendly_name: str
    product_id: str
    license_key: str
    machine_code: str
    first_seen: float
    last_seen: float
    client: str
    calls: int
    floating: bool  # its last activation was floating
    deactivated: float | None  # when a deactivation passed through, until it activates again


class LicenseLimit(NamedTuple):
    """A license's MaxNoOfMachines (0: no limit) and when the signed license that gave it was seen."""

    max_machines: int
    updated: float


class MachineCount(NamedTuple):
    """How many machines a license has seen, and how many of them are not deactivated."""

    known: int
    active: int


class Wish(NamedTuple):
    """A denial: the machine refused, when, and the seconds it asked a seat for (None: not kept then)."""

    machine: str
    time: float
    interval: float | None


class NodeLocked(NamedTuple):
    """A license's node-locked machines that hold their seat (not deactivated), and how many are idle."""

    active: int
    idle: int


class SqliteSeatReader:
    """Read-only snapshots of a seat ledger file, which the daemon may be writing meanwhile."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[SqliteSeatSnapshot]:
        """One read transaction; LedgerMissingError without a file, LedgerUnreadableError if no ledger."""
        if not self.path.is_file():
            raise LedgerMissingError(self.path)
        try:
            db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True, isolation_level=None)
            try:
                db.execute("BEGIN")  # every query of the snapshot sees the same moment of the ledger
                yield SqliteSeatSnapshot(db)
            finally:
                db.close()  # ends the read transaction
        except sqlite3.Error as exc:
            raise LedgerUnreadableError(str(exc)) from exc


class SqliteSeatSnapshot:
    """One moment of the seat ledger, as reports and the console ask for it; blocking calls."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def licenses(self, product: str | None = None) -> list[License]:
        """The licenses with leases, activity or denials ever (of one product if given), in order."""
        found: set[License] = set()
        for table in _LICENSE_TABLES:
            found.update(self._distinct_licenses(table, product))
        return sorted(found)

    def _distinct_licenses(self, table: str, product: str | None) -> Iterator[License]:
        """A table's distinct (product, key), each found by one seek in an index that starts with them."""
        # `x >= ?` seeks past all the entries before it at once; `(a, b) > (?, ?)` steps over them one by one.
        products = f"SELECT product_id FROM {table} WHERE product_id >= ? ORDER BY 1 LIMIT 1"  # noqa: S608
        keys = f"SELECT license_key FROM {table} WHERE product_id = ? AND license_key >= ? ORDER BY 1 LIMIT 1"  # noqa: S608
        for each in [product] if product is not None else self._seek_each(products, ()):
            yield from ((each, key) for key in self._seek_each(keys, (each,)))

    def _seek_each(self, sql: str, params: tuple[str, ...]) -> Iterator[str]:
        """Each value found by seeking the first at or after a text (the last parameter): a skip-scan."""
        row = self._db.execute(sql, (*params, "")).fetchone()
        while row is not None:
            yield str(row[0])
            # The smallest text after x is x followed by NUL (texts compare as bytes).
            row = self._db.execute(sql, (*params, f"{row[0]}\0")).fetchone()

    def limit(self, license: License) -> int | None:
        """The license's seat limit (0: none), or None if no signed license was seen."""
        row = self._db.execute(_LIMIT, license).fetchone()
        return None if row is None else int(row[0])

    def limits(self) -> dict[License, LicenseLimit]:
        """The seat limit of every license a signed license was seen for."""
        return {(str(p), str(k)): LicenseLimit(int(n), float(u)) for p, k, n, u in self._db.execute(_LIMITS)}

    def leases(self, license: License, window: Window) -> list[tuple[str, float, float]]:
        """The license's leases live in the window, cut to it: (machine, start, end), live on [start, end)."""
        rows: list[tuple[str, float, float]] = self._db.execute(_LEASES, _params(license, window)).fetchall()
        return rows

    def live_leases(self, now: float) -> dict[tuple[License, str], float]:
        """When each machine's live floating lease ends, by license and machine (wall clock)."""
        rows = self._db.execute(LIVE_LEASES, {"now": now})
        return {((str(p), str(k)), str(m)): float(e) for p, k, m, e in rows}

    def callers(self, license: License, window: Window) -> Iterator[tuple[int, str, int]]:
        """(bucket, machine, 1 if it called without a seat there) once per machine and bucket, by bucket."""
        rows: Iterator[tuple[int, str, int]] = self._db.execute(_CALLERS, _params(license, window))
        return rows

    def presence(self, license: License, window: Window) -> Iterator[tuple[int, int, int]]:
        """(bucket, machines that called, how many of them without a seat) for each bucket with calls."""
        rows: Iterator[tuple[int, int, int]] = self._db.execute(_PRESENT, _params(license, window))
        return rows

    def denials(self, license: License, window: Window) -> dict[int, int]:
        """Seats refused in each bucket that had a refusal."""
        return dict(self._db.execute(_DENIALS, _params(license, window)).fetchall())

    def wishes(self, license: License, window: Window) -> list[Wish]:
        """The license's denials made in the window, in time order, with the interval each asked for."""
        # A file the daemon has not opened since the column was added lacks it: no interval was kept.
        rows = self._db.execute(_WISHES.format(interval=denied_interval(self._db)), _params(license, window))
        return [Wish(str(m), float(t), None if i is None else float(i)) for m, t, i in rows]

    def node_locked(self, idle_before: float) -> dict[License, NodeLocked]:
        """Per license, its node-locked machines not deactivated, and those of them last seen by then."""
        return {
            (str(p), str(k)): NodeLocked(int(active), int(idle or 0))
            for p, k, active, idle in self._db.execute(_NODE_LOCKED, (idle_before,))
        }

    def machines(
        self, *, product: str | None = None, key: str | None = None, idle_before: float | None = None
    ) -> list[MachineRow]:
        """Machines, of a product and license key (any case) if given, by friendly name (any case) and key.

        With `idle_before`, only those last seen by then and not deactivated since, longest idle first.
        """
        conditions: list[str] = ["1"]
        params: list[object] = []
        if product is not None:
            conditions.append("product_id = ?")
            params.append(product)
        if key is not None:
            conditions.append("license_key = ? COLLATE NOCASE")
            params.append(key)
        order = "friendly_name COLLATE NOCASE, license_key, product_id, machine_code"
        if idle_before is not None:
            conditions.append("last_seen <= ? AND deactivated IS NULL")
            params.append(idle_before)
            order = f"last_seen, {order}"
        where = " AND ".join(conditions)
        return [
            _machine_row(row)
            for row in self._db.execute(f"{_MACHINES} WHERE {where} ORDER BY {order}", params)
        ]

    def machine(self, license: License, machine_code: str) -> MachineRow | None:
        """One machine of a license, if the ledger knows it."""
        row = self._db.execute(_MACHINE, (*license, machine_code)).fetchone()
        return None if row is None else _machine_row(row)

    def machine_counts(self) -> dict[License, MachineCount]:
        """How many machines each license has seen, and how many are not deactivated."""
        return {
            (str(p), str(k)): MachineCount(int(known), int(active or 0))
            for p, k, known, active in self._db.execute(_MACHINE_COUNTS)
        }


def _params(license: License, window: Window) -> dict[str, object]:
    """The named parameters of the window queries."""
    product, key = license
    return {
        "product": product,
        "key": key,
        "since": window.since,
        "until": window.until,
        "hour": math.floor(window.since / _HOUR) * _HOUR,  # the hour row that holds `since`
        "origin": window.origin,
        "size": window.size,
    }


def _machine_row(row: tuple[object, ...]) -> MachineRow:
    """A machines row, typed."""
    name, product, key, code, first_seen, last_seen, client, calls, floating, deactivated = row
    assert isinstance(first_seen, float | int)
    assert isinstance(last_seen, float | int)
    assert isinstance(calls, int)
    assert deactivated is None or isinstance(deactivated, float | int)
    return MachineRow(
        str(name),
        str(product),
        str(key),
        str(code),
        float(first_seen),
        float(last_seen),
        str(client),
        calls,
        bool(floating),
        None if deactivated is None else float(deactivated),
    )
