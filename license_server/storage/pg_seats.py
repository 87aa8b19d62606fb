"""The seat ledger in the shared database: one set of leases, machines and denials for every node.

Lease times come from the database's clock, never a node's: a node whose clock is off neither extends nor
cuts a lease. A seat granted during an upstream outage is one transaction that locks the license's row,
so that nodes taking seats at the same moment never grant more than the license allows between them.

The daemon asks `live`, `in_use` and `limit` without awaiting: they are answered from a view in memory,
read again from the database about twice a second by a task that `open` starts and `close` stops, and
updated at once by this node's own grants and releases. The view judges expiry on the database's clock,
estimated between reads from the monotonic clock.

When the database cannot be reached (the heartbeat says so, or a take gets no answer within a second), a
node grants seats from its view alone, within its share of each license's bound: floor(limit / live
nodes) regular seats and floor(max_overdraft / live nodes) overdraft ones, the live nodes as the heartbeat
last knew them. Those grants are written like every other change: each write batch the database does
not commit within about a second goes to the node's spool (storage.spool) and is written, in order, once
the database answers again.
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
from license_server.storage.pg_nodes import Heartbeat, settle, within
from license_server.storage.pg_seat_reader import PgSeatReader
from license_server.storage.postgres import Database, DatabaseError
from license_server.storage.seats import Lease, License
from license_server.storage.spool import DEADLINE, Spool

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
_TAKE_WAIT = 1.0  # seconds a take waits for a pooled connection: a workstation's call is waiting
_TAKE_DEADLINE = 1.25  # seconds a take waits for the database in all before it grants from its share
_REFRESH_DEADLINE = 3.0  # seconds a read of the view may take before it is given up
_DB_NOW = "SELECT extract(epoch FROM clock_timestamp())::float8"


@dataclass(slots=True)
class _Touch(Generic[T]):
    """A change this node made to the view, kept over reads that may not show it yet."""

    value: T
    landed: bool = False  # its write committed (or failed): a read begun after this shows the truth


@dataclass(slots=True)
class _Write:
    """A queued write (an op and its arguments, as the spool keeps it) and the change to the view it makes."""

    op: str
    args: dict[str, Any]
    touch: _Touch[Any] | None = None
    lease: Lease | None = None  # a grant's lease, told its row's id once written directly


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

    def __init__(
        self,
        database: Database,
        *,
        node: str,
        clock: Callable[[], float] = time.time,
        heartbeat: Heartbeat | None = None,
        spool: Spool | None = None,
    ) -> None:
        self._database = database
        # Without a spool of the node's (tests, tools), one in memory: kept until written or closed.
        self._own_spool = spool is None
        self._spool = spool or Spool(database, node=node, heartbeat=heartbeat)
        self._spool.register("seats", self._replayed_apply, self._replayed)
        self._spooled: dict[int, list[_Touch[Any]]] = {}  # spooled writes' changes to the view, by id
        self._local_started: dict[tuple[License, str], float] = {}  # seats granted locally, not yet read back
        self._heartbeat = heartbeat  # None: nothing is granted while the database cannot be reached
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
        self._leftovers: set[asyncio.Task[Any]] = set()

    # -- open and close ------------------------------------------------------------------------------

    async def open(self) -> int:
        """Read the limits and live leases, start the task keeping them fresh; returns how many are live."""
        try:
            await self._refresh()
        except psycopg.Error as exc:
            raise DatabaseError(
                f"cannot read the seat ledger at {self._database.info.shown}: {_reason(exc)}"
            ) from None
        if self._own_spool:
            await self._spool.open()
            await self._spool.start()
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
        await settle(self._leftovers)
        if self._own_spool:
            await self._spool.close()

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
        """Grant or renew a floating seat during an upstream outage; True once granted.

        With the database: one transaction locks the license's row, closes its expired leases and counts
        its live ones, so nodes taking seats at once never exceed the bound together; False when no seat
        is free or no signed license was ever seen. When the heartbeat says the database is down, or it
        gives no answer within about a second: from this node's share of the bound (`_take_locally`).
        """
        if self._heartbeat is not None and not self._heartbeat.up:
            return self._take_locally(license, machine, interval, max_overdraft)
        try:
            lease, limit = await within(
                self._take_shared(license, machine, interval, max_overdraft), _TAKE_DEADLINE, self._leftovers
            )
        except (psycopg.OperationalError, TimeoutError) as exc:  # unreachable, not a refusal of the statement
            then = "refused" if self._heartbeat is None else "share"
            log.warning("seat_take_failed", product_id=license[0], error=_reason(exc), then=then)
            return self._take_locally(license, machine, interval, max_overdraft)
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

    async def _take_shared(
        self, license: License, machine: str, interval: float, max_overdraft: int
    ) -> tuple[Lease | None, int | None]:
        """The take through the database, after the writes queued before it (spooled ones first)."""
        await self._commits.flush()  # a limit or release queued before this lands before it is judged
        await self._spool.drain()
        return await self._transaction(
            lambda conn: self._take(conn, license, machine, interval, max_overdraft), wait=_TAKE_WAIT
        )

    def _take_locally(self, license: License, machine: str, interval: float, max_overdraft: int) -> bool:
        """Grant or renew a seat from the view while the database cannot be reached, within this node's share.

        The share of a license's bound is floor(limit / live nodes) regular seats and floor(max_overdraft /
        live nodes) overdraft ones, the live nodes as the last heartbeat that got through counted them.
        The live leases counted are those of the view: what the database last showed and what this node
        granted since. A machine holding a live lease renews it. Each node keeping to its share, the nodes
        together never exceed the bound. The grant is written once the database answers again.
        """
        if self._heartbeat is None:
            return False  # no view of the peers: no share can be known
        limit = self._view.limits.get(license)
        if limit is None:
            return False  # never saw the signed license: nothing to bound seats by
        nodes = self._heartbeat.live_nodes
        leases = self.live(license)
        now = self._db_now()
        own = leases.get(machine)
        if own is not None:
            overdraft = own.overdraft
        else:
            regular = sum(1 for lease in leases.values() if not lease.overdraft)
            if limit == 0 or regular < limit // nodes:
                overdraft = False
            elif len(leases) - regular < max_overdraft // nodes:
                overdraft = True
            else:
                log.info("seat_share_full", product_id=license[0], live_nodes=nodes, live_leases=len(leases))
                return False
        expires = now + interval
        touch = self._set_lease(
            license, machine, Lease(own.id if own else 0, machine, expires, expires, overdraft)
        )
        # The grant's start, with the node, names its row: a renewal before the row is read back extends it.
        if own is None:
            started = self._local_started[(license, machine)] = now
        else:
            started = self._local_started.get((license, machine), now) if not own.id else now
        args = {
            "p": license[0],
            "k": license[1],
            "m": machine,
            "node": self.node,
            "started": started,
            "expires": expires,
            "od": overdraft,
            "renews": own.id if own is not None and own.id else None,
        }
        self._write("local", args, touch)
        log.info(
            "seat_taken_locally",
            product_id=license[0],
            renewed=own is not None,
            overdraft=overdraft,
            live_nodes=nodes,
            spooled=self._spool.backlog,
        )
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
        at = self._db_now()
        lease = Lease(0, machine, at + seconds, at + seconds, overdraft)
        touch = self._set_lease(license, machine, lease)
        self._local_started.pop((license, machine), None)
        args = {"p": license[0], "k": license[1], "m": machine, "at": at, "seconds": seconds, "od": overdraft}
        return self._write("granted", args, touch, lease)

    def released(self, license: License, machine: str) -> asyncio.Future[None]:
        """A deactivation passed through: the machine's seat is free, floating or node-locked."""
        self._flush_seen()  # calls seen before it are written before it, so they cannot undo it
        touch = self._set_lease(license, machine, None)
        self._local_started.pop((license, machine), None)
        return self._write(
            "released", {"p": license[0], "k": license[1], "m": machine, "at": self._db_now()}, touch
        )

    def set_limit(self, license: License, max_machines: int) -> None:
        """Remember a signed license's MaxNoOfMachines, for every node."""
        if self._view.limits.get(license) == max_machines:
            return
        self._view.limits[license] = max_machines
        touch = self._limits[license] = _Touch(max_machines)
        self._write("limit", {"p": license[0], "k": license[1], "n": max_machines}, touch)

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

        self._write("seen", {"machines": machine_rows, "activity": activity_rows})

    def denied(self, license: License, machine: str, *, by: str, message: str, interval: float) -> None:
        """A seat was refused, by upstream or by a node during an outage (timed by the database's clock)."""
        args = {
            "p": license[0],
            "k": license[1],
            "m": machine,
            "at": self._db_now(),
            "by": by,
            "message": message,
            "interval": interval,
        }
        self._write("denied", args)

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
                await within(self._refresh(), _REFRESH_DEADLINE, self._leftovers)
            except (psycopg.Error, TimeoutError) as exc:
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
        self, op: str, args: dict[str, Any], touch: _Touch[Any] | None = None, lease: Lease | None = None
    ) -> asyncio.Future[None]:
        """Queue a write; writes queued in one turn of the loop share one transaction, in order.

        The future is done once that transaction committed, or once the batch is in the spool when the
        database gave no answer within about a second (or a failure, which is logged: callers go on).
        """
        # shielded: one caller cancelled (a call cut short) must not cancel the batch the others wait for
        return asyncio.shield(self._commits.add(_Write(op, args, touch, lease)).done)

    async def _commit(self, batch: list[_Write]) -> None:
        """Apply a batch of writes in one transaction within about a second, or else spool it."""
        write_id = self._spool.next_id()
        if not self._spool.must_spool():

            async def run(conn: Conn) -> None:
                if await self._spool.guard(conn, write_id):
                    for write in batch:
                        await self._apply(conn, write.op, write.args, write.lease)

            try:
                await within(self._transaction(run, wait=DEADLINE), DEADLINE, self._leftovers)
            except (psycopg.OperationalError, TimeoutError, OSError) as exc:
                log.warning("database_write_spooled", store="seats", writes=len(batch), error=_reason(exc))
            else:
                self._spool.landed(write_id)
                for write in batch:
                    if write.touch is not None:
                        write.touch.landed = True
                return
        self._spooled[write_id] = [w.touch for w in batch if w.touch is not None]
        await self._spool.append(write_id, "seats", "writes", [[w.op, w.args] for w in batch])

    def _ended(self, batch: list[_Write], error: BaseException | None) -> None:
        """Log a batch that failed (neither written nor spooled), and let reads show the rows again."""
        if error is not None and not isinstance(error, asyncio.CancelledError):
            for write in batch:
                if write.touch is not None:
                    write.touch.landed = True
            log.error("database_write_failed", store="seats", writes=len(batch), error=_reason(error))

    async def _replayed_apply(self, conn: Conn, op: str, payload: Any) -> None:
        """Apply a spooled batch of writes (the spool's transaction, guarded against a second time)."""
        for name, args in payload:
            await self._apply(conn, str(name), dict(args), None, replay=True)

    def _replayed(self, write_id: int, op: str, payload: Any) -> None:
        """A spooled batch landed: reads of the view show its rows from now on."""
        for touch in self._spooled.pop(write_id, []):
            touch.landed = True

    async def _apply(
        self, conn: Conn, op: str, a: dict[str, Any], lease: Lease | None, *, replay: bool = False
    ) -> None:
        """Apply one write in the transaction of `conn`; a replayed one is timed by when it was made."""
        now = await _db_time(conn)
        if op == "granted":
            start = min(now, float(a["at"])) if replay else now
            a = {**a, "start": start, "expires": start + float(a["seconds"]), "now": now, "node": self.node}
            if replay and (ended := await _deactivated_since(conn, a, start)) is not None:
                # Another node wrote the machine's later deactivation first: the lease ended there.
                await conn.execute(
                    "INSERT INTO leases (product_id, license_key, machine_code, started, expires, overdraft,"
                    " granted_by, node, open, released) VALUES (%(p)s, %(k)s, %(m)s, %(start)s,"
                    " least(%(expires)s, %(ended)s), %(od)s, 'upstream', %(node)s, false,"
                    " CASE WHEN %(expires)s > %(ended)s THEN %(ended)s END)",
                    {**a, "ended": ended},
                )
                return
            # An expired lease ends as it was; a live one of the other kind ends now; one of the same kind
            # is renewed by the insert's conflict with the one open lease a machine may hold.
            await conn.execute(
                "UPDATE leases SET open = false,"
                " released = CASE WHEN expires > %(now)s THEN %(now)s END, expires = least(expires, %(now)s)"
                " WHERE product_id = %(p)s AND license_key = %(k)s AND machine_code = %(m)s AND open"
                " AND (expires <= %(now)s OR overdraft <> %(od)s)",
                a,
            )
            row = await (
                await conn.execute(
                    "INSERT INTO leases AS l (product_id, license_key, machine_code, started, expires,"
                    " overdraft, granted_by, node, open) VALUES (%(p)s, %(k)s, %(m)s, %(start)s, %(expires)s,"
                    " %(od)s, 'upstream', %(node)s, %(expires)s > %(now)s)"
                    " ON CONFLICT (product_id, license_key, machine_code) WHERE open"
                    " DO UPDATE SET expires = greatest(l.expires, excluded.expires),"
                    " renewals = l.renewals + 1 RETURNING id",
                    a,
                )
            ).fetchone()
            if row is not None and lease is not None:
                lease.id = int(row[0])
                lease.deadline = lease.expires = float(a["expires"])
        elif op == "released":
            at = min(now, float(a["at"])) if replay else now
            where = {**a, "now": at}
            await conn.execute(
                "UPDATE leases SET open = false,"
                " released = CASE WHEN expires > %(now)s THEN %(now)s END,"
                " expires = greatest(started, least(expires, %(now)s))"
                " WHERE product_id = %(p)s AND license_key = %(k)s AND machine_code = %(m)s AND open",
                where,
            )
            await _write_deactivated(conn, where)
        elif op == "limit":
            await conn.execute(
                "INSERT INTO licenses (product_id, license_key, max_machines, updated)"
                " VALUES (%(p)s, %(k)s, %(n)s, extract(epoch FROM clock_timestamp())::float8)"
                " ON CONFLICT (product_id, license_key)"
                " DO UPDATE SET max_machines = excluded.max_machines, updated = excluded.updated",
                a,
            )
        elif op == "seen":
            await _write_seen(conn, a["machines"], a["activity"])
        elif op == "denied":
            await conn.execute(
                "INSERT INTO denials (product_id, license_key, machine_code, time, denied_by, message, node,"
                " floating_interval) VALUES (%(p)s, %(k)s, %(m)s, %(at)s, %(by)s, %(message)s, %(node)s,"
                " %(interval)s)",
                # A write spooled by the version before has no interval.
                {**a, "node": self.node, "interval": a.get("interval")},
            )
        elif op == "local":
            await _write_local(conn, {**a, "now": now})
        else:
            raise RuntimeError(f"unknown seat write {op!r}")

    async def _transaction(
        self, fn: Callable[[Conn], Awaitable[T]], *, wait: float = _WAIT_FOR_CONNECTION
    ) -> T:
        """Run `fn` in a transaction, again (a bounded number of times) when the database broke it off."""
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                async with (
                    self._database.pool.connection(timeout=wait) as conn,
                    conn.transaction(),
                ):
                    return await fn(conn)
            except psycopg.Error as exc:
                if exc.sqlstate not in _RETRY or attempt == _ATTEMPTS:
                    raise
                log.debug("seat_transaction_retried", sqlstate=exc.sqlstate, attempt=attempt)
                await asyncio.sleep(random.uniform(0, 0.005 * 2**attempt))  # noqa: S311 - jitter, not a secret
        raise AssertionError("unreachable")


async def _write_seen(conn: Conn, machine_rows: list[Any], activity_rows: list[Any]) -> None:
    """Add summed calls to the machines' rows and the hourly activity."""
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
            " calls = t.calls + excluded.calls,"
            # A deactivation made after these calls (its write came first, from another node) stands.
            " deactivated = CASE WHEN t.deactivated >= excluded.last_seen THEN t.deactivated END",
            [tuple(row) for row in machine_rows],
        )
        await cur.executemany(
            "INSERT INTO activity AS t (product_id, license_key, hour, machine_code, floating, calls)"
            " VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (product_id, license_key, hour, machine_code) DO UPDATE SET"
            " calls = t.calls + excluded.calls, floating = t.floating OR excluded.floating",
            [tuple(row) for row in activity_rows],
        )


async def _write_deactivated(conn: Conn, where: dict[str, Any]) -> None:
    """Mark a machine deactivated at `now`, unless it was activated after that (whichever write came first).

    With nodes writing from their spools, a machine's deactivation can reach the database before its
    activation: a row without calls then holds the deactivation until the activation's row lands on it.
    """
    await conn.execute(
        "INSERT INTO machines AS t (product_id, license_key, machine_code, friendly_name, client, floating,"
        " first_seen, last_seen, calls, deactivated)"
        # first_seen and last_seen such that least() and greatest() take the activation's
        " VALUES (%(p)s, %(k)s, %(m)s, '', '', false, 'Infinity', 0, 0, %(now)s)"
        " ON CONFLICT (product_id, license_key, machine_code) DO UPDATE SET deactivated ="
        " CASE WHEN t.last_seen > excluded.deactivated THEN t.deactivated"
        " ELSE greatest(t.deactivated, excluded.deactivated) END",
        where,
    )


async def _deactivated_since(conn: Conn, a: dict[str, Any], start: float) -> float | None:
    """When the machine of `a` was deactivated, if that was at `start` or later (a lease then ends there)."""
    row = await (
        await conn.execute(
            "SELECT deactivated FROM machines WHERE product_id = %(p)s AND license_key = %(k)s"
            " AND machine_code = %(m)s AND deactivated >= %(start)s",
            {**a, "start": start},
        )
    ).fetchone()
    return None if row is None else float(row[0])


async def _write_local(conn: Conn, row: dict[str, Any]) -> None:
    """Write a seat granted while the database could not be reached.

    Written so that a second write of it changes nothing (the node and the grant's start name its row), and
    a machine another node gave a lease meanwhile keeps that one open lease, lasting until the later of the
    two ends. A deactivation of the machine written since the grant ends it there.
    """
    ended = await _deactivated_since(conn, row, float(row["started"]))
    if ended is not None:
        row = {**row, "expires": min(float(row["expires"]), ended)}
    if row["renews"] is not None:
        renewed = await conn.execute(
            "UPDATE leases SET expires = greatest(expires, %(expires)s), renewals = renewals + 1"
            " WHERE id = %(renews)s AND open",
            row,
        )
        if renewed.rowcount:
            return
    # Written before (renewed since): extend that row.
    again = await conn.execute(
        "UPDATE leases SET expires = greatest(expires, %(expires)s) WHERE product_id = %(p)s"
        " AND license_key = %(k)s AND machine_code = %(m)s AND node = %(node)s"
        " AND started = %(started)s AND granted_by = 'local' AND open",
        row,
    )
    if again.rowcount:
        return
    await conn.execute(
        "INSERT INTO leases AS l (product_id, license_key, machine_code, started, expires,"
        " overdraft, granted_by, node, open) VALUES (%(p)s, %(k)s, %(m)s, %(started)s,"
        " %(expires)s, %(od)s, 'local', %(node)s, %(expires)s > %(now)s)"
        " ON CONFLICT (product_id, license_key, machine_code) WHERE open"
        " DO UPDATE SET expires = greatest(l.expires, excluded.expires),"
        " renewals = l.renewals + 1",
        row,
    )


async def _db_time(conn: Conn) -> float:
    """The database's clock now, in unix seconds."""
    row = await (await conn.execute(_DB_NOW)).fetchone()
    assert row is not None
    return float(row[0])


def _reason(exc: BaseException) -> str:
    """An error's first line, which libpq never fills with a password."""
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
