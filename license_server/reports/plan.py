"""The seat plan: how many floating seats demand needed, and the node-locked seats idle machines hold.

The model (docs/seat-planning.md says it in words). Over [since, until), a machine demands a floating seat
while it holds a live lease, and while a wish of its is open: a denial at d, asking for interval i, opens one
on [d, min(d + i, until, the first moment from d on at which the machine holds a lease)). A denial kept
without its interval (made before the ledger kept it) asks for the most common interval the license's
denials in the period recorded, else DEFAULT_INTERVAL if the license had leases then, else none (a
node-locked refusal). Demand at t is the live leases plus the machines waiting with an open wish. Times are
counted in whole microseconds, so that every integral and comparison is exact.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TextIO

from license_server.reports.seats import DAY
from license_server.reports.tables import (
    cell,
    csv_value,
    iso,
    printable,
    write_json,
    write_prepared_csv,
    write_table,
)
from license_server.storage.interfaces import SeatSnapshot
from license_server.storage.seats import License, NodeLocked, Window, Wish

EMPTY_PLAN = "(no seat activity in this range)"
DEFAULT_INTERVAL = 300.0  # seconds a denial kept without its interval asks for, when nothing tells better
LEVELS = (95, 99, 100)  # percent of demand-time the recommended seats serve
HOUR = 3600
_US = 1_000_000  # microseconds in a second
_HOUR_US = HOUR * _US

PLAN_COLUMNS: tuple[str, ...] = (
    "product_id",
    "key",
    "seat_limit",
    "peak_seats",
    "peak_demand",
    "demand_seat_hours",
    "unmet_seat_hours",
    "denials",
    "seats_95",
    "seats_99",
    "seats_100",
    "hours_over_limit",
    "node_locked_machines",
    "idle_machines",
    "seats_to_free",
)
_PLAN_NUMBERS = frozenset(PLAN_COLUMNS[2:])

Step = tuple[int, int, int]  # (moment in µs, live leases, machines waiting) from then until the next step


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanQuery:
    """Which licenses to plan for: unix seconds, since inclusive, until exclusive; `now` for idle machines."""

    since: float
    until: float
    now: float
    idle_days: int
    product: str | None = None  # product id, exact
    key: str | None = None  # license key, any case


@dataclass(frozen=True, slots=True)
class LicensePlan:
    """One license's demand over the period, the seats each level of it needs, and its idle machines."""

    product_id: str
    key: str
    seat_limit: int | None  # 0: no limit; None: never saw a signed license
    peak_seats: int  # most live leases at once
    peak_demand: int
    demand_us: int  # demand-time: the integral of demand, seat-microseconds
    unmet_us: int  # the part of it no lease served
    denials: int
    seats: tuple[int, ...]  # for each of LEVELS
    over_limit_hours: tuple[int, ...]  # starts of the UTC hours in which demand exceeded the limit
    node_locked: NodeLocked
    steps: tuple[Step, ...]

    def as_dict(self) -> dict[str, object]:
        """The plan as JSON writes it (CSV and the table leave out the list of hours)."""
        return {
            "product_id": self.product_id,
            "key": self.key,
            "seat_limit": self.seat_limit,
            "peak_seats": self.peak_seats,
            "peak_demand": self.peak_demand,
            "demand_seat_hours": seat_hours(self.demand_us),
            "unmet_seat_hours": seat_hours(self.unmet_us),
            "denials": self.denials,
            **{f"seats_{level}": seats for level, seats in zip(LEVELS, self.seats, strict=True)},
            "hours_over_limit": len(self.over_limit_hours),
            "node_locked_machines": self.node_locked.active,
            "idle_machines": self.node_locked.idle,
            "seats_to_free": self.node_locked.idle,
            "over_limit": [iso(hour) for hour in self.over_limit_hours],
        }


@dataclass(frozen=True, slots=True)
class PlanReport:
    """The plan of every license with floating use or node-locked machines, in license order."""

    query: PlanQuery
    licenses: tuple[LicensePlan, ...]


def seat_hours(microseconds: int) -> float:
    """Seat-microseconds as seat-hours, to the hundredth."""
    return round(microseconds / _HOUR_US, 2)


def plan_report(ledger: SeatSnapshot, query: PlanQuery) -> PlanReport:
    """Demand, recommended seats and idle machines per license over the query's period."""
    if query.until <= query.since:
        raise ValueError("--until must be later than --since")
    if query.idle_days < 0:
        raise ValueError(f"idle days must not be negative, got {query.idle_days}")
    window = Window(query.since, query.until, math.floor(query.since), DAY)  # buckets are not used
    idle = ledger.node_locked(query.now - query.idle_days * DAY)
    # A license whose only trace is its machines (their hourly activity removed, or never written) is
    # planned too: its idle machines are still seats to free.
    found = sorted(set(licenses_of(ledger, query.product, query.key)) | set(_matching(idle, query)))
    plans = (_plan(ledger, license, window, idle.get(license, NodeLocked(0, 0))) for license in found)
    return PlanReport(query, tuple(plan for plan in plans if plan.steps or plan.node_locked.active))


def _matching(licenses: Iterable[License], query: PlanQuery) -> Iterator[License]:
    """The licenses of the query's product (exact) and key (any case), where given."""
    wanted = None if query.key is None else query.key.casefold()
    for product, key in licenses:
        if (query.product is None or product == query.product) and (
            wanted is None or key.casefold() == wanted
        ):
            yield product, key


def licenses_of(ledger: SeatSnapshot, product: str | None, key: str | None) -> list[License]:
    """The licenses the ledger knows, of one product (exact) and key (any case) where given."""
    found = ledger.licenses(product)
    if key is None:
        return found
    wanted = key.casefold()
    return [(each_product, each_key) for each_product, each_key in found if each_key.casefold() == wanted]


def _plan(ledger: SeatSnapshot, license: License, window: Window, node_locked: NodeLocked) -> LicensePlan:
    """One license's plan from its leases and denials in the window."""
    leases = ledger.leases(license, window)
    wishes = ledger.wishes(license, window)
    limit = ledger.limit(license)
    steps = demand_steps(leases, wishes, window.since, window.until)
    until_us = _us(window.until)
    durations: collections.Counter[int] = collections.Counter()  # demand level -> µs spent at it
    peak_seats = peak_demand = unmet = 0
    over: set[int] = set()
    for (moment, held, waiting), (end, _, _) in itertools.pairwise([*steps, (until_us, 0, 0)]):
        span = end - moment
        if span <= 0:
            continue
        demand = held + waiting
        durations[demand] += span
        unmet += waiting * span
        peak_seats, peak_demand = max(peak_seats, held), max(peak_demand, demand)
        if limit and demand > limit:
            over.update(range(moment // _HOUR_US, (end - 1) // _HOUR_US + 1))
    return LicensePlan(
        product_id=license[0],
        key=license[1],
        seat_limit=limit,
        peak_seats=peak_seats,
        peak_demand=peak_demand,
        demand_us=sum(level * span for level, span in durations.items()),
        unmet_us=unmet,
        denials=len(wishes),
        seats=tuple(seats_serving(durations, level) for level in LEVELS),
        over_limit_hours=tuple(hour * HOUR for hour in sorted(over)),
        node_locked=node_locked,
        steps=tuple(steps),
    )


def seats_serving(durations: collections.Counter[int], percent: int) -> int:
    """The fewest seats s with the integral of min(demand, s) at least `percent` % of that of demand."""
    total = sum(level * span for level, span in durations.items())
    levels = sorted(durations)
    served_below = 0  # the integral of demand over the time demand was at most s
    time_above = sum(durations.values())  # the time demand was above s
    index = 0
    for seats in range(max(levels, default=0) + 1):
        while index < len(levels) and levels[index] <= seats:
            served_below += levels[index] * durations[levels[index]]
            time_above -= durations[levels[index]]
            index += 1
        if 100 * (served_below + seats * time_above) >= percent * total:
            return seats
    return 0  # no demand at all


def demand_steps(
    leases: Sequence[tuple[str, float, float]], wishes: Sequence[Wish], since: float, until: float
) -> list[Step]:
    """Live leases and waiting machines over [since, until) as steps; empty when neither ever happened."""
    if not leases and not wishes:
        return []
    since_us, until_us = _us(since), _us(until)
    holds: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for machine, start, end in leases:
        holds[machine].append((_us(start), _us(end)))
    held = {machine: _merged(spans) for machine, spans in holds.items()}
    asked = _fallback_interval(wishes, bool(leases))
    waits: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for wish in wishes:
        interval = wish.interval if wish.interval is not None else asked
        if interval <= 0:
            continue  # a node-locked refusal: no floating seat was asked for
        start = _us(wish.time)
        end = min(start + _us(interval), _first_held(held.get(wish.machine, []), start, until_us))
        if end > start:
            waits[wish.machine].append((start, end))
    changes: collections.Counter[tuple[int, int]] = collections.Counter()  # (moment, 0 held / 1 wait)
    for spans, kind in ((holds, 0), (waits, 1)):
        for machine_spans in spans.values():
            for start, end in machine_spans if kind == 0 else _merged(machine_spans):
                changes[(start, kind)] += 1
                changes[(end, kind)] -= 1
    steps: list[Step] = [(since_us, 0, 0)]
    live = waiting = 0
    for (moment, kind), change in sorted(changes.items()):
        if kind == 0:
            live += change
        else:
            waiting += change
        if steps[-1][0] == moment:
            steps[-1] = (moment, live, waiting)
        else:
            steps.append((moment, live, waiting))
    return steps


def _fallback_interval(wishes: Iterable[Wish], had_leases: bool) -> float:
    """What a denial kept without its interval asks for (module docstring); ties go to the shorter."""
    recorded = collections.Counter(wish.interval for wish in wishes if wish.interval)
    if recorded:
        return min(recorded, key=lambda interval: (-recorded[interval], interval))
    return DEFAULT_INTERVAL if had_leases else 0.0


def _first_held(spans: list[tuple[int, int]], moment: int, otherwise: int) -> int:
    """The first moment from `moment` on at which the machine holds a lease (spans merged and sorted)."""
    index = bisect.bisect_right(spans, moment, key=lambda span: span[1])  # the first span ending after it
    return max(spans[index][0], moment) if index < len(spans) else otherwise


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Half-open spans joined where they meet or overlap, in order."""
    joined: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if end <= start:
            continue
        if joined and start <= joined[-1][1]:
            joined[-1] = (joined[-1][0], max(joined[-1][1], end))
        else:
            joined.append((start, end))
    return joined


def _us(moment: float) -> int:
    """Unix seconds as whole microseconds."""
    return round(moment * _US)


# --- output -----------------------------------------------------------------------------------------


def write_plan(report: PlanReport, out: TextIO, form: str) -> int:
    """Write the plan as a table, CSV or JSON lines; returns how many rows."""
    if form == "json":
        return write_json((plan.as_dict() for plan in report.licenses), out)
    if form == "csv":
        return write_prepared_csv(PLAN_COLUMNS, _csv_rows(report), out)
    cells = [[_cell(column, plan.as_dict()[column]) for column in PLAN_COLUMNS] for plan in report.licenses]
    footers = {number: advice(plan) for number, plan in enumerate(report.licenses)}
    return write_table(
        PLAN_COLUMNS, cells, out, empty=EMPTY_PLAN, right_aligned=_PLAN_NUMBERS, footers=footers
    )


def _csv_rows(report: PlanReport) -> Iterator[list[object]]:
    """The plan rows as CSV cells, every one through csv_value."""
    for plan in report.licenses:
        row = plan.as_dict()
        yield [csv_value(row[column]) for column in PLAN_COLUMNS]


def _cell(column: str, value: object) -> str:
    """One cell of the plan table: a limit of 0 reads 'none', an unknown one '?'."""
    if column == "seat_limit":
        return "?" if value is None else "none" if value == 0 else str(value)
    return cell(value)


def advice(plan: LicensePlan) -> str:
    """One line an admin can act on: the seats the demand needed against the limit, and seats to free."""
    name = f"{plan.key} (product {plan.product_id})"
    parts: list[str] = []
    if plan.steps:
        low, _, full = plan.seats
        limit = plan.seat_limit
        against = "limit unknown" if limit is None else "no limit" if limit == 0 else f"limit {limit}"
        parts.append(f"{low} seats serve 95 % of demand-time, {full} all of it ({against})")
        if plan.unmet_us:
            parts.append(f"{seat_hours(plan.unmet_us)} seat-hours unmet")
        if plan.over_limit_hours:
            parts.append(f"demand above the limit in {len(plan.over_limit_hours)} hours")
    if plan.node_locked.idle:
        parts.append(f"{plan.node_locked.idle} idle node-locked machines to free")
    return printable(f"{name}: {'; '.join(parts) or 'nothing to change'}")
