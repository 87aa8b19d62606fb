"""The machines report: every machine the seat ledger knows, with when it was first and last seen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

from license_server.reports.seats import DAY
from license_server.reports.tables import cell, iso, write_csv, write_json, write_table
from license_server.storage.interfaces import SeatSnapshot
from license_server.storage.seats import MachineRow

EMPTY_MACHINES = "(no matching machines)"
MACHINE_COLUMNS: tuple[str, ...] = (
    "friendly_name",
    "product_id",
    "key",
    "machine_code",
    "first_seen",
    "last_seen",
    "client",
    "calls",
    "floating",
    "deactivated",
    "idle_days",
)
_MACHINE_NUMBERS = frozenset({"calls", "idle_days"})


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineQuery:
    """Which machines to list; `now` is unix seconds, for idle days."""

    now: float
    idle_days: int | None = None  # only machines not seen for this long, and not deactivated
    name: str | None = None  # part of the friendly name, any case
    product: str | None = None  # product id, exact
    key: str | None = None  # license key, any case


def machines(ledger: SeatSnapshot, query: MachineQuery) -> list[dict[str, object]]:
    """The machines the query asks for: longest idle first with idle_days, else by name and key."""
    idle_before = None if query.idle_days is None else query.now - query.idle_days * DAY
    rows = ledger.machines(product=query.product, key=query.key, idle_before=idle_before)
    wanted = query.name.casefold() if query.name is not None else None
    # In Python, not LIKE: SQLite folds only ASCII letters, and names are often not English.
    return [
        _machine(row, query.now) for row in rows if wanted is None or wanted in row.friendly_name.casefold()
    ]


def _machine(row: MachineRow, now: float) -> dict[str, object]:
    """One machines row as the report shows it."""
    return {
        "friendly_name": row.friendly_name,
        "product_id": row.product_id,
        "key": row.license_key,
        "machine_code": row.machine_code,
        "first_seen": iso(row.first_seen),
        "last_seen": iso(row.last_seen),
        "client": row.client,
        "calls": row.calls,
        "floating": row.floating,
        "deactivated": iso(row.deactivated),
        "idle_days": max(0, int((now - row.last_seen) // DAY)),
    }


def write_machines(rows: list[dict[str, object]], out: TextIO, form: str) -> int:
    """Write the machines report as a table, CSV or JSON lines; returns how many rows."""
    if form == "json":
        return write_json(rows, out)
    if form == "csv":
        return write_csv(MACHINE_COLUMNS, ([row[column] for column in MACHINE_COLUMNS] for row in rows), out)
    cells = [[cell(row[column]) for column in MACHINE_COLUMNS] for row in rows]
    return write_table(MACHINE_COLUMNS, cells, out, empty=EMPTY_MACHINES, right_aligned=_MACHINE_NUMBERS)
