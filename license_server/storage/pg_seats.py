"""The seat ledger in the shared database: one set of leases, machines and denials for every node.

Lease times come from the database's clock, never a node's: a node whose clock is off neither extends nor
cuts a lease. A seat granted during an upstream outage is one transaction that locks the license's row,
so that nodes taking seats at the same moment never grant more than the license allows between them.

The daemon asks `live`, `in_use` and `limit` without awaiting: they are answered from a view in memory,
read again from the database about twice a second by a task that `open` starts and `close` stops, and
updated at once by this node's own grants and releases. The view judges expiry on the database's clock,
estimated between reads from the monotonic clock.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import psycopg
import structlog

from license_server.background import GroupCommit
from license_server.storage.pg_seat_reader import PgSeatReader
from license_server.storage.postgres import Database, DatabaseError
from license_server.storage.seats import Lease, License

log = structlog.get_logger(__name__)

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]

_HOUR = 3600
_SEEN_FLUSH_EVERY = 1.0  # seconds calls are summed in memory before they are written
_REFRESH_EVERY = 0.5  # seconds between reads of the shared leases and limits into the view
_ATTEMPTS = 6  # tries of a transaction the database broke off (serialization, deadlock, a racing insert)
# serialization_failure, deadlock_detected, unique_violation (another node opened the same lease meanwhile)
_RETRY = frozenset({"40001", "40P01", "23505"})
_SKEW_WARNING = 5.0  # seconds the node's clock may differ from the database's before it is logged
_WAIT_FOR_CONNECTION = 5.0  # seconds a transaction waits for a pooled connection before it fails
_DB_NOW = "SELECT extract(epoch FROM clock_timestamp())::float8"


@dataclass(slots=True)
class _Touch(Generic[T]):
    """A change this node made to the view, kept over reads that may not show it yet."""

    value: T
    landed: bool = False  # its write committed (or failed): a read begun after this shows the truth


@dataclass(slots=True)
class _Write:
    """A queued write, and the change to the view it carries."""

    run: Callable[[Conn], Awaitable[None]]
    touch: _Touch[Any] | None = None


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
class _View:
    """What `live`, `in_use` and `limit` answer from."""

    live: dict[License, dict[str, Lease]] = field(default_factory=dict)
    limits: dict[License, int] = field(default_factory=dict)


class PgSeatLedger:
    """The seat ledger shared by every node: leases timed and bounded by the database.

    `clock` is the node's wall clock; nothing is timed by it, it is only compared with the database's
    (a node more than a few seconds off is logged). A background task started by `open` and stopped by
    `close` reads the live leases and the limits into memory every half second; the node's own grants and
    releases show there at once.
    """

    def __init__(self, database: Database, *, node: str, clock: Callable[[], float] = time.time) -> None:
        self._database = database
        self.reader = PgSeatReader(database.info)
        self.node = node
        self.clock = clock
        self._view = _View()
        self._leases: dict[tuple[License, str], _Touch[Lease | None]] = {}
        self._limits: dict[License, _Touch[int]] = {}
        self._offset = time.time() - time.monotonic()  # the database's clock minus the monotonic one
        self._skewed = False
        self._seen: dict[tuple[str, str, str], _Seen] = {}
        self._activity: dict[tuple[str, str, int, str], list[int]] = {}  # -> [calls, floating]
        self._flush_timer: asyncio.TimerHandle | None = None
        self._commits: GroupCommit[_Write] = GroupCommit(self._commit, self._ended, serial=True)
        self._refresher: asyncio.Task[None] | None = None

    # -- open and close ------------------------------------------------------------------------------

    async def open(self) -> int:
        """Read the limits and live leases, start the task keeping them fresh; returns how many are live."""
        try:
            await self._refresh()
        except psycopg.Error as exc:
            raise DatabaseError(
                f"cannot read the seat ledger at {self._database.info.shown}: {_reason(exc)}"
            ) from None
        self._refresher = asyncio.create_task(self._keep_fresh(), name="seat-ledger-refresh")
        return sum(len(leases) for leases in self._view.live.values())

    async def flush(self) -> None:
        """Write the calls summed in memory now, and wait until every queued write has landed."""
        self._flush_seen()
        await self._commits.flush()

    async def close(self) -> None:
        """Write what is queued, then stop reading the shared view (the database itself is closed apart)."""
        await self.flush()
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None

    # -- what the daemon asks ----------------------------------------------------------------------

    def live(self, license: License) -> dict[str, Lease]:
        """The live leases of a license, by machine code, as of the view (expired ones are let go here)."""
        leases = self._view.live.get(license)
        if not leases:
            return {}
        now = self._db_now()
        for machine in [m for m, lease in leases.items() if lease.expires <= now]:
            del leases[machine]  # the database closes it when a seat of the license is next taken
        return dict(leases)

    def in_use(self) -> dict[License, int]:
        """Live floating seats per license, on every node."""
        return {license: n for license in list(self._view.live) if (n := len(self.live(license)))}

    def limit(self, license: License) -> int | None:
        """MaxNoOfMachines of the newest signed license seen by any node (0: no limit), or None."""
        return self._view.limits.get(license)

    async def take(self, license: License, machine: str, interval: float, max_overdraft: int) -> bool:
        """Grant or renew a floating seat during an upstream outage, in one transaction; True once committed.

        The license's row is locked, its expired leases closed and its live ones counted, so nodes taking
        seats at once never exceed the bound together. False when no seat is free, no signed license was
        ever seen, or the database cannot be reached (refusing keeps the bound; the error is logged).
        """
        await self._commits.flush()  # a limit or release queued before this lands before it is judged
        try:
            lease, limit = await self._transaction(
                lambda conn: self._take(conn, license, machine, interval, max_overdraft)
            )
        except psycopg.Error as exc:
            log.error(  # noqa: TRY400 - the cause is named; a traceback would not help an admin
                "seat_take_failed", product_id=license[0], error=_reason(exc)
            )
            return False
        if limit is not None:
            self._view.limits[license] = limit
        if lease is None:
            return False
        self._set_lease(license, machine, lease).landed = True
        return True

    async def _take(
        self, conn: Conn, license: License, machine: str, interval: float, max_overdraft: int
    ) -> tuple[Lease | None, int | None]:
        """The take transaction: (the lease granted or renewed, or None; the license's limit)."""
        product, key = license
        row = await (
            await conn.execute(
                "SELECT max_machines FROM licenses WHERE product_id = %s AND license_key = %s FOR UPDATE",
                (product, key),
            )
        ).fetchone()
        if row is None:
            return None, None  # never saw the signed license: nothing to bound seats by
        limit = int(row[0])
        now = await _db_time(conn)  # read once the lock is held: waiting for it took time
        await conn.execute(
            "UPDATE leases SET open = false"
            " WHERE product_id = %s AND license_key = %s AND open AND expires <= %s",
            (product, key, now),
        )
        live = await (
            await conn.execute(
                "SELECT machine_code, id, overdraft FROM leases"
                " WHERE product_id = %s AND license_key = %s AND open",
                (product, key),
            )
        ).fetchall()
        expires = now + interval
        own = next((row for row in live if row[0] == machine), None)
        if own is not None:
            await conn.execute(
                "UPDATE leases SET expires = %s, renewals = renewals + 1 WHERE id = %s", (expires, own[1])
            )
            return Lease(int(own[1]), machine, expires, expires, bool(own[2])), limit
        regular = sum(1 for row in live if not row[2])
        if limit == 0 or regular < limit:
            overdraft = False
        elif len(live) - regular < max_overdraft:
            overdraft = True
        else:
            return None, limit
        inserted = await (
            await conn.execute(
                "INSERT INTO leases (product_id, license_key, machine_code, started, expires, overdraft,"
                " granted_by, node) VALUES (%s, %s, %s, %s, %s, %s, 'local', %s) RETURNING id",
                (product, key, machine, now, expires, overdraft, self.node),
            )
        ).fetchone()
        assert inserted is not None
        return Lease(int(inserted[0]), machine, expires, expires, overdraft), limit

    # -- what the daemon tells it --------------------------------------------------------------------

    def granted(
        self, license: License, machine: str, seconds: float, *, overdraft: bool
    ) -> asyncio.Future[None]:
        """Upstream granted or renewed a floating seat for `seconds` from now (the database's now)."""
        estimate = self._db_now() + seconds
        lease = Lease(0, machine, estimate, estimate, overdraft)
        touch = self._set_lease(license, machine, lease)
        product, key = license

        async def write(conn: Conn) -> None:
            now = await _db_time(conn)
            # An expired lease ends as it was; a live one of the other kind ends now; one of the same kind
            # is renewed by the insert's conflict with the one open lease a machine may hold.
            await conn.execute(
                "UPDATE leases SET open = false,"
                " released = CASE WHEN expires > %(now)s THEN %(now)s END, expires = least(expires, %(now)s)"
                " WHERE product_id = %(p)s AND license_key = %(k)s AND machine_code = %(m)s AND open"
                " AND (expires <= %(now)s OR overdraft <> %(od)s)",
                {"now": now, "p": product, "k": key, "m": machine, "od": overdraft},
            )
            row = await (
                await conn.execute(
                    "INSERT INTO leases AS l (product_id, license_key, machine_code, started, expires,"
                    " overdraft, granted_by, node) VALUES (%s, %s, %s, %s, %s, %s, 'upstream', %s)"
                    " ON CONFLICT (product_id, license_key, machine_code) WHERE open"
                    " DO UPDATE SET expires = excluded.expires, renewals = l.renewals + 1 RETURNING id",
                    (product, key, machine, now, now + seconds, overdraft, self.node),
                )
            ).fetchone()
            if row is not None:
                lease.id = int(row[0])
                lease.deadline = lease.expires = now + seconds

        return self._write(write, touch)

    def released(self, license: License, machine: str) -> asyncio.Future[None]:
        """A deactivation passed through: the machine's seat is free, floating or node-locked."""
        self._flush_seen()  # calls seen before it are written before it, so they cannot undo it
        touch = self._set_lease(license, machine, None)
        product, key = license

        async def write(conn: Conn) -> None:
            now = await _db_time(conn)
            where = {"now": now, "p": product, "k": key, "m": machine}
            await conn.execute(
                "UPDATE leases SET open = false,"
                " released = CASE WHEN expires > %(now)s THEN %(now)s END, expires = least(expires, %(now)s)"
                " WHERE product_id = %(p)s AND license_key = %(k)s AND machine_code = %(m)s AND open",
                where,
            )
            await conn.execute(
                "UPDATE machines SET deactivated = %(now)s"
                " WHERE product_id = %(p)s AND license_key = %(k)s AND machine_code = %(m)s",
                where,
            )

        return self._write(write, touch)

    def set_limit(self, license: License, max_machines: int) -> None:
        """Remember a signed license's MaxNoOfMachines, for every node."""
        if self._view.limits.get(license) == max_machines:
            return
        self._view.limits[license] = max_machines
        touch = self._limits[license] = _Touch(max_machines)
        product, key = license

        async def write(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO licenses (product_id, license_key, max_machines, updated)"
                " VALUES (%s, %s, %s, extract(epoch FROM clock_timestamp())::float8)"
                " ON CONFLICT (product_id, license_key)"
                " DO UPDATE SET max_machines = excluded.max_machines, updated = excluded.updated",
                (product, key, max_machines),
            )

        self._write(write, touch)

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

        Calls are summed in memory and written about once a second, or at once by flush(), timed by the
        database's clock as this node estimates it.
        """
        now = self._db_now()
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
        # In key order, so that two nodes writing the same machines lock their rows in the same order.
        machine_rows = [
            (p, k, m, s.friendly_name, s.client, s.floating, s.first_seen, s.last_seen, s.calls)
            for (p, k, m), s in sorted(machines.items())
        ]
        activity_rows = [
            (p, k, hour, m, bool(floating), calls)
            for (p, k, hour, m), (calls, floating) in sorted(activity.items())
        ]

        async def write(conn: Conn) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO machines AS t (product_id, license_key, machine_code, friendly_name, client,"
                    " floating, first_seen, last_seen, calls) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (product_id, license_key, machine_code) DO UPDATE SET"
                    " friendly_name = CASE WHEN excluded.friendly_name = '' THEN t.friendly_name"
                    "   ELSE excluded.friendly_name END,"
                    " client = excluded.client, floating = excluded.floating,"
                    " first_seen = least(t.first_seen, excluded.first_seen),"
                    " last_seen = greatest(t.last_seen, excluded.last_seen),"
                    " calls = t.calls + excluded.calls, deactivated = NULL",
                    machine_rows,
                )
                await cur.executemany(
                    "INSERT INTO activity AS t (product_id, license_key, hour, machine_code, floating, calls)"
                    " VALUES (%s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (product_id, license_key, hour, machine_code) DO UPDATE SET"
                    " calls = t.calls + excluded.calls, floating = t.floating OR excluded.floating",
                    activity_rows,
                )

        self._write(write)

    def denied(self, license: License, machine: str, *, by: str, message: str) -> None:
        """A seat was refused, by upstream or by a node during an outage (timed by the database's clock)."""
        now = self._db_now()
        product, key = license

        async def write(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO denials (product_id, license_key, machine_code, time, denied_by, message, node)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (product, key, machine, now, by, message, self.node),
            )

        self._write(write)

    # -- the view --------------------------------------------------------------------------------------

    def _db_now(self) -> float:
        """The database's clock, estimated from its last reading and the monotonic clock since."""
        return time.monotonic() + self._offset

    def _set_lease(self, license: License, machine: str, lease: Lease | None) -> _Touch[Lease | None]:
        """Show this node's own grant or release in the view at once, and keep it over stale reads."""
        leases = self._view.live.setdefault(license, {})
        if lease is None:
            leases.pop(machine, None)
        else:
            leases[machine] = lease
        touch: _Touch[Lease | None] = _Touch(lease)
        self._leases[(license, machine)] = touch
        return touch

    async def _keep_fresh(self) -> None:
        """Read the shared leases and limits into the view every half second, until cancelled."""
        failing = False
        while True:
            await asyncio.sleep(_REFRESH_EVERY)
            try:
                await self._refresh()
            except psycopg.Error as exc:
                if not failing:  # once per outage, not twice a second
                    log.warning("seat_view_refresh_failed", error=_reason(exc))
                failing = True
            except Exception:
                log.exception("seat_view_refresh_failed")
                failing = True
            else:
                if failing:
                    log.info("seat_view_refreshed_again")
                failing = False

    async def _refresh(self) -> None:
        """Replace the view with the database's live leases and limits, keeping changes not in it yet."""
        # Changes whose writes landed before this read began are in what it reads: they need no keeping.
        settled_leases = {k: t for k, t in self._leases.items() if t.landed}
        settled_limits = {k: t for k, t in self._limits.items() if t.landed}
        async with self._database.pool.connection(timeout=_WAIT_FOR_CONNECTION) as conn, conn.transaction():
            before = time.monotonic()
            now = await _db_time(conn)
            after = time.monotonic()
            rows = await (
                await conn.execute(
                    "SELECT product_id, license_key, machine_code, id, expires, overdraft FROM leases"
                    " WHERE open AND expires > %s",
                    (now,),
                )
            ).fetchall()
            limit_rows = await (
                await conn.execute("SELECT product_id, license_key, max_machines FROM licenses")
            ).fetchall()
        self._offset = now - (before + after) / 2
        self._check_skew(now)
        view = _View()
        for product, key, machine, lease_id, expires, overdraft in rows:
            lease = Lease(int(lease_id), str(machine), float(expires), float(expires), bool(overdraft))
            view.live.setdefault((str(product), str(key)), {})[str(machine)] = lease
        view.limits = {(str(p), str(k)): int(n) for p, k, n in limit_rows}
        for (license, machine), touch in list(self._leases.items()):
            if settled_leases.get((license, machine)) is touch:
                del self._leases[(license, machine)]
                continue
            leases = view.live.setdefault(license, {})
            if touch.value is None:
                leases.pop(machine, None)
            else:
                leases[machine] = touch.value
        for license, limit_touch in list(self._limits.items()):
            if settled_limits.get(license) is limit_touch:
                del self._limits[license]
            else:
                view.limits[license] = limit_touch.value
        self._view = view

    def _check_skew(self, db_now: float) -> None:
        """Log when the node's clock and the database's part by more than a few seconds, and agree again."""
        skew = self.clock() - db_now
        if abs(skew) > _SKEW_WARNING and not self._skewed:
            log.warning("node_clock_differs_from_database", node=self.node, seconds=round(skew, 1))
        elif abs(skew) <= _SKEW_WARNING and self._skewed:
            log.info("node_clock_agrees_with_database", node=self.node)
        self._skewed = abs(skew) > _SKEW_WARNING

    # -- writes --------------------------------------------------------------------------------------

    def _write(
        self, run: Callable[[Conn], Awaitable[None]], touch: _Touch[Any] | None = None
    ) -> asyncio.Future[None]:
        """Queue a write; writes queued in one turn of the loop share one transaction, in order.

        The future is done once that transaction committed (or failed, which is logged: callers go on).
        """
        # shielded: one caller cancelled (a call cut short) must not cancel the batch the others wait for
        return asyncio.shield(self._commits.add(_Write(run, touch)).done)

    async def _commit(self, batch: list[_Write]) -> None:
        """Apply a batch of writes in one transaction."""

        async def run(conn: Conn) -> None:
            for write in batch:
                await write.run(conn)

        await self._transaction(run)

    def _ended(self, batch: list[_Write], error: BaseException | None) -> None:
        """Let the view's reads show the batch's rows again, and log a batch that failed."""
        for write in batch:
            if write.touch is not None:
                write.touch.landed = True
        if error is not None and not isinstance(error, asyncio.CancelledError):
            log.error("database_write_failed", store="seats", writes=len(batch), error=_reason(error))

    async def _transaction(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run `fn` in a transaction, again (a bounded number of times) when the database broke it off."""
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                async with (
                    self._database.pool.connection(timeout=_WAIT_FOR_CONNECTION) as conn,
                    conn.transaction(),
                ):
                    return await fn(conn)
            except psycopg.Error as exc:
                if exc.sqlstate not in _RETRY or attempt == _ATTEMPTS:
                    raise
                log.debug("seat_transaction_retried", sqlstate=exc.sqlstate, attempt=attempt)
                await asyncio.sleep(random.uniform(0, 0.005 * 2**attempt))  # noqa: S311 - jitter, not a secret
        raise AssertionError("unreachable")


async def _db_time(conn: Conn) -> float:
    """The database's clock now, in unix seconds."""
    row = await (await conn.execute(_DB_NOW)).fetchone()
    assert row is not None
    return float(row[0])


def _reason(exc: BaseException) -> str:
    """An error's first line, which libpq never fills with a password."""
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
