"""The read side of the shared seat ledger: snapshots of the PostgreSQL tables for reports and the console.

The twin of `seats.SqliteSeatReader`: the same questions, asked of the tables `storage.pg_seats` writes, with
the same answers to the last bucket and the same order. Blocking (psycopg's plain connection): run off the
event loop. Texts are ordered by their bytes (`COLLATE "C"`) and folded to lower case in ASCII only, as
SQLite does, so that a database made with another collation orders machines alike.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import psycopg

from license_server.storage.postgres import ConnectInfo, DatabaseError
from license_server.storage.seats import (
    LIVE_LEASES,
    LedgerMissingError,
    LedgerUnreadableError,
    License,
    LicenseLimit,
    MachineCount,
    MachineRow,
    NodeLocked,
    Window,
    Wish,
)

_HOUR = 3600
_SINCE = "%(since)s::double precision"
_UNTIL = "%(until)s::double precision"
_ORIGIN = "%(origin)s::bigint"
_SIZE = "%(size)s::bigint"

# Leases live within the range, cut to it; a lease is live on [started, end), a release ends it early.
_LEASES = (
    "SELECT machine_code, start, stop FROM ("  # noqa: S608  # constants of this module only
    f" SELECT id, machine_code, GREATEST(started, {_SINCE}) AS start,"
    "  LEAST(CASE WHEN released IS NOT NULL AND released < expires THEN released ELSE expires END,"
    f"  {_UNTIL}) AS stop"
    " FROM leases WHERE product_id = %(product)s AND license_key = %(key)s"
    f"  AND started < {_UNTIL} AND expires > {_SINCE}"
    ") AS cut WHERE stop > start ORDER BY start, id"
)
# As in seats._CALLED: integer division truncates toward zero in both databases, which floors for every
# hour from one bucket before the first on; node_locked is 0 or 1, as SQLite gives it.
_CALLED = (
    f"SELECT (hour - {_ORIGIN} + {_SIZE}) / {_SIZE} - 1 AS bucket, machine_code,"  # noqa: S608
    " (NOT floating)::integer AS node_locked FROM activity"
    " WHERE product_id = %(product)s AND license_key = %(key)s"
    f"  AND hour >= %(hour)s::bigint AND hour < {_UNTIL}"
)
_PRESENT = (
    "SELECT bucket, count(DISTINCT machine_code),"  # noqa: S608
    " count(DISTINCT CASE WHEN node_locked = 1 THEN machine_code END)"
    f" FROM ({_CALLED}) AS called GROUP BY bucket ORDER BY bucket"
)
_CALLERS = (
    "SELECT bucket, machine_code, max(node_locked)"  # noqa: S608
    f' FROM ({_CALLED}) AS called GROUP BY bucket, machine_code ORDER BY bucket, machine_code COLLATE "C"'
)
# SQLite's CAST(real AS INTEGER) truncates toward zero, as trunc() does; the arithmetic is double in both.
_DENIALS = (
    "SELECT trunc((time - %(origin)s::double precision) / %(size)s::double precision)::bigint AS bucket,"  # noqa: S608
    " count(*) FROM denials WHERE product_id = %(product)s AND license_key = %(key)s"
    f" AND time >= {_SINCE} AND time < {_UNTIL} GROUP BY 1"
)
_LIVE_LEASES = LIVE_LEASES.replace(":now", "%(now)s::double precision")
# As seats._WISHES; a database still on schema 1 (not migrated yet) kept no interval.
_WISHES = (
    "SELECT machine_code, time, {interval} FROM denials"  # noqa: S608  # constants of this module only
    " WHERE product_id = %(product)s AND license_key = %(key)s"
    f" AND time >= {_SINCE} AND time < {_UNTIL} ORDER BY time, id"
)
_NODE_LOCKED = (
    "SELECT product_id, license_key, count(*), count(*) FILTER (WHERE last_seen <= %s::double precision)"
    " FROM machines WHERE calls > 0 AND NOT floating AND deactivated IS NULL GROUP BY product_id, license_key"
)
_SCHEMA_VERSION = "SELECT coalesce(max(version), 0) FROM schema_version"
_MACHINES = (
    "SELECT friendly_name, product_id, license_key, machine_code, first_seen, last_seen, client, calls,"
    " floating, deactivated FROM machines"
)
# A row without calls only holds a deactivation another node wrote before the machine's activation
# reached the database (from a node's spool): it is a machine once that activation lands.
_MACHINE = f"{_MACHINES} WHERE calls > 0 AND product_id = %s AND license_key = %s AND machine_code = %s"
# SQLite's NOCASE: ASCII letters folded to lower case, then bytes; lower() under "C" folds ASCII only.
_BY_NAME = (
    'lower(friendly_name COLLATE "C"), license_key COLLATE "C", product_id COLLATE "C",'
    ' machine_code COLLATE "C"'
)
_MACHINE_COUNTS = (
    "SELECT product_id, license_key, count(*), count(*) FILTER (WHERE deactivated IS NULL) FROM machines"
    " WHERE calls > 0 GROUP BY product_id, license_key"
)
_LIMIT = "SELECT max_machines FROM licenses WHERE product_id = %s AND license_key = %s"
_LIMITS = "SELECT product_id, license_key, max_machines, updated FROM licenses"
# The licenses in any of the tables: UNION drops the repeats (no skip-scan needed, as SQLite's is).
_LICENSES = (
    "SELECT product_id, license_key FROM leases UNION SELECT product_id, license_key FROM activity"
    " UNION SELECT product_id, license_key FROM denials"
)
_LICENSES_OF = (
    "SELECT product_id, license_key FROM leases WHERE product_id = %(product)s"
    " UNION SELECT product_id, license_key FROM activity WHERE product_id = %(product)s"
    " UNION SELECT product_id, license_key FROM denials WHERE product_id = %(product)s"
)
_HAS_SCHEMA = "SELECT to_regclass('schema_version') IS NOT NULL"


class LedgerSchemaMissingError(LedgerMissingError):
    """The database has no schema yet: no daemon has started against it."""

    def __init__(self, shown: str) -> None:
        """Keep the database's shown URL (never its password)."""
        # Not the parent's __init__: its message and `path` name a file.
        Exception.__init__(
            self, f"no seat ledger in the database at {shown} yet: the daemon has not created the schema"
        )
        self.database = shown


class PgSeatReader:
    """Read-only snapshots of the shared seat ledger, which the nodes may be writing meanwhile."""

    def __init__(self, info: ConnectInfo) -> None:
        self.info = info

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[PgSeatSnapshot]:
        """One REPEATABLE READ READ ONLY transaction; LedgerMissingError without the schema."""
        shown = self.info.shown
        try:
            conn = self.info.connect()
        except DatabaseError as exc:
            raise LedgerUnreadableError(str(exc)) from None
        try:
            # Set before the first statement: the transaction it begins sees one moment of every table.
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            row = conn.execute(_HAS_SCHEMA).fetchone()
            if row is None or not row[0]:
                raise LedgerSchemaMissingError(shown)
            yield PgSeatSnapshot(conn)
        except psycopg.Error as exc:
            raise LedgerUnreadableError(
                f"cannot read the seat ledger in the database at {shown}: {_first_line(exc)}"
            ) from None
        finally:
            conn.close()  # ends the read transaction; nothing was written


class PgSeatSnapshot:
    """One moment of the shared seat ledger, as reports and the console ask for it; blocking calls."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def licenses(self, product: str | None = None) -> list[License]:
        """The licenses with leases, activity or denials ever (of one product if given), in order."""
        if product is None:
            rows = self._conn.execute(_LICENSES)
        else:
            rows = self._conn.execute(_LICENSES_OF, {"product": product})
        found = {(str(p), str(k)) for p, k in rows}
        return sorted(found)  # Python's order, as the SQLite snapshot sorts

    def limit(self, license: License) -> int | None:
        """The license's seat limit (0: none), or None if no signed license was seen."""
        row = self._conn.execute(_LIMIT, license).fetchone()
        return None if row is None else int(row[0])

    def limits(self) -> dict[License, LicenseLimit]:
        """The seat limit of every license a signed license was seen for."""
        return {
            (str(p), str(k)): LicenseLimit(int(n), float(u)) for p, k, n, u in self._conn.execute(_LIMITS)
        }

    def leases(self, license: License, window: Window) -> list[tuple[str, float, float]]:
        """The license's leases live in the window, cut to it: (machine, start, end), live on [start, end)."""
        return [
            (str(m), float(start), float(stop))
            for m, start, stop in self._conn.execute(_LEASES, _params(license, window))
        ]

    def callers(self, license: License, window: Window) -> Iterator[tuple[int, str, int]]:
        """(bucket, machine, 1 if it called without a seat there) once per machine and bucket, by bucket."""
        rows = self._conn.execute(_CALLERS, _params(license, window))
        return ((int(b), str(m), int(locked)) for b, m, locked in rows)

    def presence(self, license: License, window: Window) -> Iterator[tuple[int, int, int]]:
        """(bucket, machines that called, how many of them without a seat) for each bucket with calls."""
        rows = self._conn.execute(_PRESENT, _params(license, window))
        return ((int(b), int(n), int(locked)) for b, n, locked in rows)

    def denials(self, license: License, window: Window) -> dict[int, int]:
        """Seats refused in each bucket that had a refusal."""
        return {int(b): int(n) for b, n in self._conn.execute(_DENIALS, _params(license, window))}

    def wishes(self, license: License, window: Window) -> list[Wish]:
        """The license's denials made in the window, in time order, with the interval each asked for."""
        row = self._conn.execute(_SCHEMA_VERSION).fetchone()
        interval = "floating_interval" if row is not None and int(row[0]) >= 2 else "NULL"
        rows = self._conn.execute(_WISHES.format(interval=interval), _params(license, window))
        return [Wish(str(m), float(t), None if i is None else float(i)) for m, t, i in rows]

    def node_locked(self, idle_before: float) -> dict[License, NodeLocked]:
        """Per license, its node-locked machines not deactivated, and those of them last seen by then."""
        return {
            (str(p), str(k)): NodeLocked(int(active), int(idle))
            for p, k, active, idle in self._conn.execute(_NODE_LOCKED, (idle_before,))
        }

    def machines(
        self, *, product: str | None = None, key: str | None = None, idle_before: float | None = None
    ) -> list[MachineRow]:
        """Machines, of a product and license key (any case) if given, by friendly name (any case) and key.

        With `idle_before`, only those last seen by then and not deactivated since, longest idle first.
        """
        conditions: list[str] = ["calls > 0"]
        params: list[object] = []
        if product is not None:
            conditions.append("product_id = %s")
            params.append(product)
        if key is not None:
            conditions.append('lower(license_key COLLATE "C") = lower(%s::text COLLATE "C")')
            params.append(key)
        order = _BY_NAME
        if idle_before is not None:
            conditions.append("last_seen <= %s::double precision AND deactivated IS NULL")
            params.append(idle_before)
            order = f"last_seen, {order}"
        sql = f"{_MACHINES} WHERE {' AND '.join(conditions)} ORDER BY {order}"
        return [_machine_row(row) for row in self._conn.execute(sql, params)]

    def live_leases(self, now: float) -> dict[tuple[License, str], float]:
        """When each machine's live floating lease ends, by license and machine (the database's clock)."""
        rows = self._conn.execute(_LIVE_LEASES, {"now": now})
        return {((str(p), str(k)), str(m)): float(e) for p, k, m, e in rows}

    def machine(self, license: License, machine_code: str) -> MachineRow | None:
        """One machine of a license, if the ledger knows it."""
        row = self._conn.execute(_MACHINE, (*license, machine_code)).fetchone()
        return None if row is None else _machine_row(row)

    def machine_counts(self) -> dict[License, MachineCount]:
        """How many machines each license has seen, and how many are not deactivated."""
        return {
            (str(p), str(k)): MachineCount(int(known), int(active))
            for p, k, known, active in self._conn.execute(_MACHINE_COUNTS)
        }


def _params(license: License, window: Window) -> dict[str, object]:
    """The named parameters of the window queries (those of the SQLite snapshot)."""
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


def _machine_row(row: tuple[Any, ...]) -> MachineRow:
    """A machines row, typed."""
    name, product, key, code, first_seen, last_seen, client, calls, floating, deactivated = row
    return MachineRow(
        str(name),
        str(product),
        str(key),
        str(code),
        float(first_seen),
        float(last_seen),
        str(client),
        int(calls),
        bool(floating),
        None if deactivated is None else float(deactivated),
    )


def _first_line(exc: BaseException) -> str:
    """An error's first line, which names no password."""
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


if TYPE_CHECKING:  # the classes implement the interfaces: mypy checks it here
    from license_server.storage.interfaces import SeatReader, SeatSnapshot

    _READER: type[SeatReader] = PgSeatReader
    _SNAPSHOT: type[SeatSnapshot] = PgSeatSnapshot
