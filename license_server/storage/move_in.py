"""Moving one node's SQLite state into the shared database: kept answers, the seat ledger, once per node.

Run by `license-server database move-in` while no daemon uses the state folder (its lock is taken here). The
whole copy is one transaction that also records, in `settings` under `moved-in:<node>`, which files were
moved: a second run finds that row and copies nothing, so calls and denials are never counted twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg

from license_server.storage.postgres import ConnectInfo, DatabaseError
from license_server.storage.seats import BootClock, LeaseClock, denied_interval
from license_server.storage.state import StateFolder, StateLock, load_fingerprint_key

FINGERPRINT_SETTING = "fingerprint-key"  # the shared key of token fingerprints (storage.pg_answers)
MOVED_PREFIX = "moved-in:"  # settings name of a node's completed move-in
_BATCH = 1000  # rows sent to PostgreSQL per executemany

_ANSWERS = (
    "INSERT INTO answers (cache_key, method, product_id, license_key, machine_code, fetched_at, body, digest)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (cache_key) DO UPDATE SET method = excluded.method, product_id = excluded.product_id,"
    " license_key = excluded.license_key, machine_code = excluded.machine_code,"
    " fetched_at = excluded.fetched_at, body = excluded.body, digest = excluded.digest"
    " WHERE answers.fetched_at < excluded.fetched_at"
)
_LICENSES = (
    "INSERT INTO licenses (product_id, license_key, max_machines, updated) VALUES (%s, %s, %s, %s)"
    " ON CONFLICT (product_id, license_key) DO UPDATE SET max_machines = excluded.max_machines,"
    " updated = excluded.updated WHERE licenses.updated < excluded.updated"
)
# Times merge (earliest first seen, latest last seen), calls add up; the name, address, floating and
# deactivation come from whichever side saw the machine last.
_NEWER = (
    "greatest(excluded.last_seen, coalesce(excluded.deactivated, 0))"
    " > greatest(machines.last_seen, coalesce(machines.deactivated, 0))"
)
_MACHINES = (  # built from the constants above
    "INSERT INTO machines (product_id, license_key, machine_code, friendly_name, client, floating,"  # noqa: S608
    " first_seen, last_seen, calls, deactivated) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (product_id, license_key, machine_code) DO UPDATE SET"
    f" friendly_name = CASE WHEN {_NEWER} AND excluded.friendly_name <> '' THEN excluded.friendly_name"
    "  ELSE machines.friendly_name END,"
    f" client = CASE WHEN {_NEWER} THEN excluded.client ELSE machines.client END,"
    f" floating = CASE WHEN {_NEWER} THEN excluded.floating ELSE machines.floating END,"
    f" deactivated = CASE WHEN {_NEWER} THEN excluded.deactivated ELSE machines.deactivated END,"
    " first_seen = least(machines.first_seen, excluded.first_seen),"
    " last_seen = greatest(machines.last_seen, excluded.last_seen),"
    " calls = machines.calls + excluded.calls"
)
# A live lease expires `remaining` seconds from the database's now, the clock every node's leases run on.
_LIVE_LEASE = (
    "INSERT INTO leases (product_id, license_key, machine_code, started, expires, released, overdraft,"
    " renewals, granted_by, node, open)"
    " VALUES (%s, %s, %s, %s, extract(epoch FROM now()) + %s, NULL, %s, %s, %s, %s, true)"
    " ON CONFLICT (product_id, license_key, machine_code) WHERE open DO NOTHING"
)
_PAST_LEASE = (
    "INSERT INTO leases (product_id, license_key, machine_code, started, expires, released, overdraft,"
    " renewals, granted_by, node, open) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, false)"
)
_ACTIVITY = (
    "INSERT INTO activity (product_id, license_key, hour, machine_code, floating, calls)"
    " VALUES (%s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (product_id, license_key, hour, machine_code) DO UPDATE SET"
    " calls = activity.calls + excluded.calls, floating = activity.floating OR excluded.floating"
)
_DENIALS = (
    "INSERT INTO denials (product_id, license_key, machine_code, time, denied_by, message, floating_interval,"
    " node) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
)


class MoveInError(Exception):
    """The state cannot be moved in: nothing to move, or the database refused; nothing was copied."""


@dataclass(slots=True)
class Moved:
    """What a move-in copied into the database (all zero when the node had moved in before)."""

    node: str
    already: bool = False  # an earlier run moved this node in: nothing copied now
    answers: int = 0
    answers_skipped: int = 0
    skipped_why: str = ""
    answers_corrupt: int = 0
    licenses: int = 0
    machines: int = 0
    leases_live: int = 0
    leases_past: int = 0
    leases_held_elsewhere: int = 0  # live here, but the machine already holds an open lease in the database
    activity: int = 0
    denials: int = 0
    earlier: dict[str, Any] | None = None  # the record an earlier run left, when already

    def lines(self) -> list[str]:
        """The summary the command prints."""
        if self.already:
            when = (self.earlier or {}).get("moved_at_utc", "earlier")
            where = (self.earlier or {}).get("state_dir", "?")
            return [f"node {self.node} already moved in ({when}, from {where}): nothing copied"]
        lines = [
            f"node {self.node} moved in:",
            f"  kept answers: {self.answers} copied",
            f"  licenses: {self.licenses}, machines: {self.machines}",
            f"  leases: {self.leases_live} live, {self.leases_past} past",
            f"  activity rows: {self.activity}",
            f"  denials: {self.denials}",
        ]
        if self.answers_skipped:
            lines.append(f"  kept answers skipped: {self.answers_skipped} ({self.skipped_why})")
        if self.answers_corrupt:
            lines.append(f"  kept answers corrupt, not copied: {self.answers_corrupt}")
        if self.leases_held_elsewhere:
            lines.append(
                f"  live leases not copied: {self.leases_held_elsewhere}"
                " (those machines already hold a lease granted by another node)"
            )
        return lines


@contextlib.contextmanager
def locked(*folders: Path) -> Iterator[None]:
    """Hold the daemon's lock on each folder; StateInUseError if a daemon is using one of them."""
    held: list[StateLock] = []
    try:
        for folder in folders:
            held.append(StateLock(folder))
        yield
    finally:
        for lock in reversed(held):
            lock.release()


def move_in(state_dir: Path, info: ConnectInfo, node: str, *, lease_clock: LeaseClock | None = None) -> Moved:
    """Copy a stopped node's kept answers and seat ledger into the (migrated) database, once (blocking)."""
    folder = StateFolder(state_dir)
    if not folder.answers.is_file() and not folder.seats.is_file():
        raise MoveInError(f"no kept answers or seat ledger in {state_dir}: nothing to move in")
    clock = lease_clock if lease_clock is not None else BootClock()
    key = load_fingerprint_key(state_dir) if folder.fingerprint_key.is_file() else None
    identity = {
        "state_dir": str(state_dir.resolve()),
        "fingerprint_key_sha256": hashlib.sha256(key).hexdigest()[:16] if key else None,
        "answers_file_bytes": _size(folder.answers),
        "seats_file_bytes": _size(folder.seats),
        "moved_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    moved = Moved(node)
    try:
        with info.connect() as conn, conn.transaction():
            claimed = conn.execute(
                "INSERT INTO settings (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (MOVED_PREFIX + node, json.dumps(identity).encode()),
            )
            if claimed.rowcount == 0:
                moved.already = True
                moved.earlier = _earlier(conn, node)
                return moved
            _copy_answers(conn, folder.answers, key, moved)
            _copy_ledger(conn, folder.seats, node, clock, moved)
            conn.execute(
                "UPDATE settings SET value = %s WHERE name = %s",
                (json.dumps({**identity, "copied": asdict(moved)}).encode(), MOVED_PREFIX + node),
            )
    except psycopg.Error as exc:
        raise DatabaseError(f"moving in failed, nothing was copied: {exc}".splitlines()[0]) from None
    except sqlite3.Error as exc:
        raise MoveInError(f"cannot read the state in {state_dir}: {exc}; nothing was copied") from None
    return moved


def _size(path: Path) -> int | None:
    """A file's size, or None when it is missing."""
    return path.stat().st_size if path.is_file() else None


def _earlier(conn: psycopg.Connection[Any], node: str) -> dict[str, Any] | None:
    """What an earlier move-in of this node recorded."""
    row = conn.execute("SELECT value FROM settings WHERE name = %s", (MOVED_PREFIX + node,)).fetchone()
    if row is None:
        return None
    try:
        found = json.loads(bytes(row[0]))
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _sqlite(path: Path) -> sqlite3.Connection:
    """Open a state database (the lock is held: a WAL left by a killed daemon is recovered on open)."""
    return sqlite3.connect(path, isolation_level=None)


def _batches(rows: Iterable[Sequence[Any]]) -> Iterator[list[Sequence[Any]]]:
    """Rows in lists of at most _BATCH."""
    batch: list[Sequence[Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _send(conn: psycopg.Connection[Any], sql: str, rows: Iterable[Sequence[Any]]) -> int:
    """Run an insert for every row; returns how many rows it inserted or changed."""
    total = 0
    with conn.cursor() as cursor:
        for batch in _batches(rows):
            cursor.executemany(sql, batch)
            total += max(cursor.rowcount, 0)
    return total


def _copy_answers(conn: psycopg.Connection[Any], path: Path, key: bytes | None, moved: Moved) -> None:
    """Copy the kept answers, newer wins, if their cache keys were made with the shared fingerprint key."""
    if not path.is_file():
        return
    db = _sqlite(path)
    try:
        count = int(db.execute("SELECT count(*) FROM answers").fetchone()[0])
        if count == 0:
            return
        if key is None:
            moved.answers_skipped = count
            moved.skipped_why = "this node has no fingerprint key, so their cache keys cannot be matched"
            return
        conn.execute(
            "INSERT INTO settings (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
            (FINGERPRINT_SETTING, key),
        )
        row = conn.execute("SELECT value FROM settings WHERE name = %s", (FINGERPRINT_SETTING,)).fetchone()
        if row is None or bytes(row[0]) != key:
            moved.answers_skipped = count
            moved.skipped_why = (
                "the database already holds another fingerprint key (another node moved in or started first),"
                " so calls would never match them; the nodes keep them anew from upstream"
            )
            return

        def rows() -> Iterator[tuple[Any, ...]]:
            for row in db.execute(
                "SELECT cache_key, method, product_id, license_key, machine_code, fetched_at, body, digest"
                " FROM answers"
            ):
                body, digest = row[6], row[7]
                if not isinstance(body, bytes) or hashlib.sha256(body).digest() != digest:
                    moved.answers_corrupt += 1
                    continue
                yield row

        moved.answers = _send(conn, _ANSWERS, rows())
    finally:
        db.close()


def _copy_ledger(
    conn: psycopg.Connection[Any], path: Path, node: str, clock: LeaseClock, moved: Moved
) -> None:
    """Copy the seat ledger: limits, machines, leases (live ones on the database clock), activity, denials."""
    if not path.is_file():
        return
    db = _sqlite(path)
    try:
        moved.licenses = _send(
            conn, _LICENSES, db.execute("SELECT product_id, license_key, max_machines, updated FROM licenses")
        )
        moved.machines = _send(
            conn,
            _MACHINES,
            (
                (p, k, m, name, client, bool(floating), first, last, calls, deactivated)
                for p, k, m, name, client, floating, first, last, calls, deactivated in db.execute(
                    "SELECT product_id, license_key, machine_code, friendly_name, client, floating,"
                    " first_seen, last_seen, calls, deactivated FROM machines"
                )
            ),
        )
        _copy_leases(conn, db, node, clock, moved)
        moved.activity = _send(
            conn,
            _ACTIVITY,
            (
                (p, k, hour, m, bool(floating), calls)
                for p, k, hour, m, floating, calls in db.execute(
                    "SELECT product_id, license_key, hour, machine_code, floating, calls FROM activity"
                )
            ),
        )
        moved.denials = _send(
            conn,
            _DENIALS,
            (
                (*row, node)
                for row in db.execute(
                    "SELECT product_id, license_key, machine_code, time, denied_by, message,"  # noqa: S608
                    f" {denied_interval(db)} FROM denials ORDER BY id"
                )
            ),
        )
    finally:
        db.close()


def _copy_leases(
    conn: psycopg.Connection[Any], db: sqlite3.Connection, node: str, clock: LeaseClock, moved: Moved
) -> None:
    """Leases still live stay open, expiring as much later as they had left; the rest are history."""
    boot_id, boot_now, wall_now = clock.boot_id, clock.now(), time.time()
    live: list[tuple[Any, ...]] = []
    past: list[tuple[Any, ...]] = []
    for row in db.execute(
        "SELECT product_id, license_key, machine_code, started, expires, released, overdraft, renewals,"
        " granted_by, boot_id, deadline, open FROM leases ORDER BY id"
    ):
        p, k, m, started, expires, released, overdraft, renewals, by, lease_boot, deadline, is_open = row
        # As the ledger itself decides at start: this boot's clock if it is the boot that timed the lease.
        remaining = deadline - boot_now if lease_boot == boot_id else expires - wall_now
        if is_open and remaining > 0:
            live.append((p, k, m, started, remaining, bool(overdraft), renewals, by, node))
        else:
            past.append((p, k, m, started, expires, released, bool(overdraft), renewals, by, node))
    moved.leases_past = _send(conn, _PAST_LEASE, past)
    moved.leases_live = _send(conn, _LIVE_LEASE, live)
    moved.leases_held_elsewhere = len(live) - moved.leases_live
