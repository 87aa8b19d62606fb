"""What the console shows from the seat ledger: one snapshot of its read side per page, read in a thread."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from license_server.reports import charts
from license_server.reports.machines import MachineQuery, machines
from license_server.reports.plan import LicensePlan, PlanQuery, plan_report
from license_server.reports.seats import SeatQuery, SeatReport, license_summary, seat_report
from license_server.reports.tables import iso
from license_server.storage.interfaces import SeatReader
from license_server.storage.seats import License, MachineCount


@dataclass(frozen=True, slots=True)
class Slice:
    """One page of a longer list: its rows, where it starts, the most it holds, and how long the list is."""

    rows: list[dict[str, object]]
    offset: int
    limit: int
    total: int

    @property
    def next_offset(self) -> int | None:
        """Where the next page starts, or None after the last one."""
        end = self.offset + self.limit
        return end if end < self.total else None

    @classmethod
    def of(cls, rows: list[dict[str, object]], offset: int, limit: int) -> Slice:
        """The page of `rows` that starts at `offset`."""
        return cls(rows[offset : offset + limit], offset, limit, len(rows))


def find_machines(
    reader: SeatReader, *, text: str, idle_only: bool, idle_days: int, now: float, offset: int, limit: int
) -> Slice:
    """Machines whose friendly name, machine code, license key or address contains `text`, any case."""
    with reader.snapshot() as ledger:
        rows = machines(ledger, MachineQuery(now=now, idle_days=idle_days if idle_only else None))
    wanted = text.strip().casefold()
    found: list[dict[str, object]] = []
    for row in rows:
        fields = (row["friendly_name"], row["machine_code"], row["key"], row["client"])
        if wanted and not any(wanted in str(value).casefold() for value in fields):
            continue
        row["idle"] = row["deactivated"] is None and _whole(row["idle_days"]) >= idle_days
        found.append(row)
    return Slice.of(found, offset, limit)


def _whole(value: object) -> int:
    """A ledger count as an int."""
    return value if isinstance(value, int) else 0


def licenses(
    reader: SeatReader, *, since: float, until: float, in_use: Mapping[License, int], idle_days: int
) -> tuple[list[dict[str, object]], SeatReport]:
    """Every license the ledger knows: its limit, seats in use now, machines, the period's peak and plan."""
    with reader.snapshot() as ledger:
        limits = ledger.limits()
        counts = ledger.machine_counts()
        report = seat_report(ledger, SeatQuery(since=since, until=until), max_steps=charts.MAX_STEP_POINTS)
        planned = plan_report(ledger, PlanQuery(since=since, until=until, now=until, idle_days=idle_days))
    usage = {(item.product_id, item.key): item for item in report.licenses}
    plans = {(item.product_id, item.key): item for item in planned.licenses}
    rows: list[dict[str, object]] = []
    for license in sorted(limits.keys() | counts.keys() | usage.keys() | in_use.keys() | plans.keys()):
        product, key = license
        limit = limits.get(license)
        total, active = counts.get(license, MachineCount(0, 0))
        period = usage.get(license)
        rows.append(
            {
                "product_id": product,
                "key": key,
                "seat_limit": None if limit is None else limit.max_machines,
                "floating_in_use": in_use.get(license, 0),
                "machines_active": active,
                "machines_known": total,
                "peak_floating": 0 if period is None else period.peak,
                "denials": 0 if period is None else period.denials,
                "summary": None if period is None else license_summary(period),
                "limit_seen": None if limit is None else iso(limit.updated),
                **_planning(plans.get(license)),
            }
        )
    return rows, report


PLANNING = (
    "peak_demand",
    "unmet_seat_hours",
    "seats_95",
    "seats_99",
    "seats_100",
    "hours_over_limit",
    "idle_machines",
)


def _planning(found: LicensePlan | None) -> dict[str, object]:
    """A license's planning columns: demand, the seats that serve it, and the idle machines to free."""
    row = {} if found is None else found.as_dict()
    return {name: row.get(name, 0) for name in PLANNING}


def seat_chart(reader: SeatReader, *, since: float, until: float, key: str | None) -> bytes:
    """Seats in use and demand against each limit as SVG; ChartsUnavailableError without matplotlib."""
    charts.require()
    with reader.snapshot() as ledger:
        report = seat_report(
            ledger, SeatQuery(since=since, until=until, key=key), max_steps=charts.MAX_STEP_POINTS
        )
        # the chart draws no idle machines: any idle_days will do
        planned = plan_report(ledger, PlanQuery(since=since, until=until, now=until, idle_days=0, key=key))
    demand = {(item.product_id, item.key): item for item in planned.licenses}
    with tempfile.TemporaryDirectory(prefix="license-server-chart-") as folder:
        target = Path(folder) / "seats.svg"
        charts.draw_seats(report, target, demand)
        return target.read_bytes()


def machine_facts(
    reader: SeatReader, product_id: str, key: str, machine_code: str
) -> tuple[str, bool] | None:
    """A machine's friendly name and whether its last activation was floating, if the ledger knows it."""
    with reader.snapshot() as ledger:
        row = ledger.machine((product_id, key.upper()), machine_code)
    return None if row is None else (row.friendly_name, row.floating)
