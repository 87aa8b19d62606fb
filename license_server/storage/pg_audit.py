"""Each node's audit records in the shared database, with each node's chain head anchored beside them.

Owner of the `audit_records` and `audit_heads` tables. A node's records are the exact lines of its own
hash-chained files; `append` inserts them and moves the node's head in one transaction, so that a record
changed, removed, inserted or reordered later, or a node's tail cut off, shows when the chain is walked
against its head (`audit.verify.verify_database`). Blocking: the daemon runs it in a thread, the audit
commands and the console's snapshots call it directly.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql

from license_server.storage.postgres import ConnectInfo, DatabaseError

# The first key of the advisory lock that serialises appends to one node's chain (the second: its name).
_APPEND_LOCK = 0x4C53_4155  # "LSAU"
_FETCH = 2000  # rows a streaming read fetches at a time

AuditRow = tuple[int, float, bytes]  # (seq, time as unix seconds, the line without its newline)


class AuditConflictError(DatabaseError):
    """Records that do not fit the node's chain as the database holds it: another writer of that name."""


class PgAuditStore:
    """The shared trail's tables through one blocking connection, opened on first use, reopened if lost."""

    def __init__(self, info: ConnectInfo) -> None:
        self.info = info
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()  # one statement at a time on the connection, whichever thread asks

    def _connection(self) -> psycopg.Connection[Any]:
        """The open connection, made again when the last one broke."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = self.info.connect(autocommit=True)
        return self._conn

    def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def head(self, node: str) -> tuple[int, str] | None:
        """The (seq, hash) of the last record anchored for `node`, or None when it has none."""
        with self._lock, _errors(self.info):
            row = (
                self._connection()
                .execute("SELECT seq, hash FROM audit_heads WHERE node = %s", (node,))
                .fetchone()
            )
        return None if row is None else (int(row[0]), str(row[1]))

    def heads(self) -> dict[str, tuple[int, str]]:
        """Every node's anchored head."""
        with self._lock, _errors(self.info):
            rows = (
                self._connection().execute("SELECT node, seq, hash FROM audit_heads ORDER BY node").fetchall()
            )
        return {str(node): (int(seq), str(digest)) for node, seq, digest in rows}

    def nodes(self) -> list[str]:
        """Every node with a head or records, in name order."""
        # A loose index scan over the primary key: one probe per node rather than a scan of every record.
        nodes = """
            WITH RECURSIVE found(node) AS (
                SELECT min(node) FROM audit_records
                UNION ALL
                SELECT (SELECT min(node) FROM audit_records WHERE node > found.node)
                FROM found WHERE found.node IS NOT NULL
            )
            SELECT node FROM found WHERE node IS NOT NULL
            UNION SELECT node FROM audit_heads
            ORDER BY 1"""
        with self._lock, _errors(self.info):
            rows = self._connection().execute(nodes).fetchall()
        return [str(row[0]) for row in rows]

    def append(self, node: str, records: Sequence[AuditRow], head_hash: str) -> int:
        """Insert a run of consecutive records of `node` and move its head to the last, in one transaction.

        `head_hash` is the hash of the last record's line. A record already held with the same bytes is
        taken as shipped before; one held with other bytes, or a run that would leave a hole after the
        head, raises AuditConflictError and changes nothing. Returns how many records were new.
        """
        if not records:
            return 0
        seqs = [seq for seq, _, _ in records]
        if any(b - a != 1 for a, b in itertools.pairwise(seqs)):
            raise ValueError("audit records to append must have consecutive sequence numbers")
        first, last = seqs[0], seqs[-1]
        with self._lock, _errors(self.info):
            conn = self._connection()
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_APPEND_LOCK, node))
                held = conn.execute("SELECT seq, hash FROM audit_heads WHERE node = %s", (node,)).fetchone()
                head_seq = int(held[0]) if held is not None else None
                if head_seq is not None and first > head_seq + 1:
                    raise AuditConflictError(
                        f"audit records of node {node!r} from seq {first} would leave a hole after the "
                        f"database's head, seq {head_seq}"
                    )
                existing = dict(
                    conn.execute(
                        "SELECT seq, line FROM audit_records WHERE node = %s AND seq BETWEEN %s AND %s",
                        (node, first, last),
                    ).fetchall()
                )
                for seq, _, line in records:
                    if seq in existing and bytes(existing[seq]) != line:
                        raise AuditConflictError(
                            f"the database already holds another record seq {seq} for node {node!r}: two "
                            "nodes write under that name, or the trail was replaced"
                        )
                new = [row for row in records if row[0] not in existing]
                if new:
                    conn.execute(
                        "INSERT INTO audit_records (node, seq, time, line)"
                        " SELECT %s, * FROM unnest(%s::bigint[], %s::double precision[], %s::bytea[])",
                        (node, [r[0] for r in new], [r[1] for r in new], [r[2] for r in new]),
                    )
                if head_seq is None or last > head_seq:
                    conn.execute(
                        "INSERT INTO audit_heads (node, seq, hash, updated) VALUES (%s, %s, %s, %s)"
                        " ON CONFLICT (node) DO UPDATE"
                        " SET seq = excluded.seq, hash = excluded.hash, updated = excluded.updated",
                        (node, last, head_hash, time.time()),
                    )
                elif held is not None and last == head_seq and str(held[1]) != head_hash:
                    raise AuditConflictError(
                        f"the database's head of node {node!r} at seq {last} names another record"
                    )
        return len(new)

    def records(
        self,
        since: float | None,
        until: float | None,
        nodes: Sequence[str] | None = None,
        *,
        containing: Sequence[bytes] = (),
    ) -> Iterator[tuple[str, int, float, bytes]]:
        """(node, seq, time, line) of every record in [since, until), by time, node and seq, as read.

        `containing`: byte strings every line returned must hold (a filter the caller would apply anyway).
        """
        where = [sql.SQL("TRUE")]
        params: list[Any] = []
        if since is not None:
            where.append(sql.SQL("time >= %s"))
            params.append(since)
        if until is not None:
            where.append(sql.SQL("time < %s"))
            params.append(until)
        if nodes is not None:
            where.append(sql.SQL("node = ANY(%s)"))
            params.append(list(nodes))
        for needle in containing:
            where.append(sql.SQL("position(%s::bytea in line) > 0"))
            params.append(needle)
        query = sql.SQL(
            "SELECT node, seq, time, line FROM audit_records WHERE {} ORDER BY time, node, seq"
        ).format(sql.SQL(" AND ").join(where))
        for node, seq, moment, line in self._stream(query, params):
            yield str(node), int(seq), float(moment), bytes(line)

    def chain(self, node: str) -> Iterator[AuditRow]:
        """(seq, time, line) of every record of `node`, in seq order, as read."""
        query = sql.SQL("SELECT seq, time, line FROM audit_records WHERE node = %s ORDER BY seq")
        for seq, moment, line in self._stream(query, [node]):
            yield int(seq), float(moment), bytes(line)

    def _stream(self, query: sql.SQL | sql.Composed, params: Sequence[Any]) -> Iterator[tuple[Any, ...]]:
        """Rows of a query read a batch at a time through a server-side cursor, on a connection of its own.

        Its own connection: a caller may append or ask for a head while it still reads.
        """
        with _errors(self.info), self.info.connect() as conn, conn.cursor(name="audit_read") as cursor:
            cursor.itersize = _FETCH
            cursor.execute(query, params)
            yield from cursor


@contextlib.contextmanager
def _errors(info: ConnectInfo) -> Iterator[None]:
    """Turn a psycopg error into DatabaseError with libpq's first line, which never holds a password."""
    try:
        yield
    except psycopg.Error as exc:
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else exc.__class__.__name__
        raise DatabaseError(f"the database at {info.shown} answered: {reason}") from None
