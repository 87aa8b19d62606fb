"""The audit trail as the console shows it: a page of matching records, newest first, and its verification.

With a shared database (database.url), both read the trail of every node from it, not this node's files.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from license_server.audit import search
from license_server.audit.verify import (
    SharedReport,
    VerifyReport,
    database_summary,
    summary,
    verify,
    verify_database,
)
from license_server.config import DatabaseConfig

if TYPE_CHECKING:
    from license_server.storage.pg_audit import PgAuditStore

PER_PAGE = 50
MAX_PAGE = 200  # the search keeps page x per_page records in memory while it reads the whole trail
VERIFY_EVERY = 60.0  # seconds a verification stands before a page asks for a new one


@dataclass(frozen=True, slots=True)
class Page:
    """One page of matching records, newest first, and how many matched in all."""

    records: list[dict[str, Any]]
    page: int
    per_page: int
    total: int

    @property
    def pages(self) -> int:
        """How many pages the matches fill."""
        return max(1, -(-self.total // self.per_page))


def query_from(params: dict[str, str], now: datetime) -> search.Query:
    """A search query from form or query fields; ValueError names a field that does not parse."""

    def text(name: str) -> str | None:
        value = params.get(name, "").strip()
        return value or None

    times: dict[str, datetime | None] = {}
    for name in ("since", "until"):
        value = text(name)
        try:
            times[name] = None if value is None else search.parse_time(value, now)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return search.Query(
        key=text("key"),
        machine=text("machine"),
        name=text("name"),
        product=text("product"),
        action=text("action"),
        client=text("client"),
        node=text("node"),
        since=times["since"],
        until=times["until"],
    )


def read_page(
    folder: Path, query: search.Query, page: int, per_page: int, database: DatabaseConfig | None = None
) -> Page:
    """The page of matches counted from the newest (a whole read of the trail; call it in a thread).

    `database`: with a URL, the shared trail of every node is read from it instead of `folder`.
    """
    newest: deque[dict[str, Any]] = deque(maxlen=page * per_page)
    total = 0
    for record in _matching(folder, query, database):
        newest.append(record)
        total += 1
    ordered = list(reversed(newest))
    return Page(ordered[(page - 1) * per_page : page * per_page], page, per_page, total)


def _matching(folder: Path, query: search.Query, database: DatabaseConfig | None) -> Iterator[dict[str, Any]]:
    """The matching records of this node's files, or of every node in the shared database."""
    if database is None or database.url is None:
        yield from search.search(folder, query)
        return
    store = _store(database)
    try:
        yield from search.search_database(store, query)
    finally:
        store.close()


def _store(database: DatabaseConfig) -> PgAuditStore:
    """The shared trail's store (imported here: a single node never loads the PostgreSQL stores)."""
    from license_server.storage.pg_audit import PgAuditStore
    from license_server.storage.postgres import connect_info

    return PgAuditStore(connect_info(database))


@dataclass(frozen=True, slots=True)
class Verification:
    """The outcome of the last check of the whole chain, and when it ran."""

    ok: bool
    checked_at: float
    headline: str  # one line for a page: intact and how many records, or where the chain breaks
    lines: list[str]
    records: int
    last_seq: int | None

    def as_json(self) -> dict[str, Any]:
        """For the API."""
        return {
            "intact": self.ok,
            "checked_at": datetime.fromtimestamp(self.checked_at, UTC).isoformat().replace("+00:00", "Z"),
            "records": self.records,
            "last_seq": self.last_seq,
            "headline": self.headline,
            "summary": self.lines,
        }


class Verifier:
    """Checks the chain at most once a minute, however many pages ask; one check at a time."""

    def __init__(
        self, folder: Path, clock: Callable[[], float] = time.time, database: DatabaseConfig | None = None
    ) -> None:
        self._folder = folder
        self._clock = clock
        self._database = database if database is not None and database.url is not None else None
        self._last: Verification | None = None
        self._lock = asyncio.Lock()

    async def current(self, *, force: bool = False) -> Verification:
        """The last verification if it is recent, else a new one."""
        async with self._lock:
            last = self._last
            if force or last is None or self._clock() - last.checked_at >= VERIFY_EVERY:
                last = self._last = await asyncio.to_thread(self._check)
            return last

    def _check(self) -> Verification:
        """Walk the whole trail (blocking)."""
        checked_at = self._clock()
        if self._database is not None:
            return self._check_database(self._database, checked_at)
        try:
            report: VerifyReport = verify(self._folder)
        except OSError as exc:
            reason = f"The trail could not be read: {exc.strerror or exc}"
            return Verification(False, checked_at, reason, [reason], 0, None)
        return Verification(
            report.ok,
            checked_at,
            _headline(report),
            summary(self._folder, report),
            report.records,
            report.last_seq,
        )

    def _check_database(self, database: DatabaseConfig, checked_at: float) -> Verification:
        """Walk every node's chain in the shared database (blocking)."""
        from license_server.storage.postgres import DatabaseError

        try:
            store = _store(database)
            try:
                shared = verify_database(store)
            finally:
                store.close()
        except DatabaseError as exc:
            reason = f"The shared trail could not be read: {exc}"
            return Verification(False, checked_at, reason, [reason], 0, None)
        return Verification(
            shared.ok, checked_at, _shared_headline(shared), database_summary(shared), shared.records, None
        )


def _shared_headline(report: SharedReport) -> str:
    """The verdict on every node's chain in one line."""
    problems = report.problems
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more nodes)" if len(problems) > 1 else ""
        return f"NOT INTACT at node {first.node} seq {first.seq}: {first.reason}{more}"
    if report.records == 0:
        return "Intact, but there are no records yet."
    return f"Intact: {report.records} records from {len(report.nodes)} nodes."


def _headline(report: VerifyReport) -> str:
    """The verdict in one line, without the folder's path."""
    problem = report.problem
    if problem is not None:
        return f"NOT INTACT at {problem.file} line {problem.line} (seq {problem.seq}): {problem.reason}"
    if report.records == 0:
        return "Intact, but there are no records yet."
    return f"Intact: {report.records} records, seq {report.first_seq} to {report.last_seq}."
