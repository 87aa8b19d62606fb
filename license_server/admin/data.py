"""What the pages and the API both show, read from the running daemon without blocking its event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from license_server.admin.keys import CONSOLE, NOW, SETTINGS, VERIFIER
from license_server.admin.ledger import Slice, find_machines, licenses
from license_server.admin.trail import MAX_PAGE, PER_PAGE, Page, query_from, read_page
from license_server.audit.chain import utc_now_text
from license_server.config import Config
from license_server.reports import runway
from license_server.reports.runway import Runway
from license_server.reports.tables import iso
from license_server.storage.answers import KeptActivation
from license_server.storage.backend import answer_reader
from license_server.storage.interfaces import StoreUnreachableError
from license_server.storage.seats import MachineRow
from license_server.web.handlers import status_document
from license_server.web.keys import Services

DAY = 86400
PERIODS = (7, 30, 90, 365)  # days the licenses page offers
# Every list is answered a page at a time, so no answer grows with the ledger.
MAX_ROWS = 500  # rows in one page or API answer at most, whatever is asked for
PAGE_ROWS = 100  # rows a console page shows unless per_page asks for another number
API_ROWS = 200  # rows an API answer holds unless limit asks for another number
MAX_OFFSET = 1_000_000_000


class BadQueryError(ValueError):
    """A query field an admin must correct."""


def services_of(request: web.Request) -> Services:
    """The running daemon's services."""
    return request.app[CONSOLE].services


async def status(request: web.Request) -> dict[str, Any]:
    """The daemon's status document plus since when upstream is up or down, and what the console can do."""
    services = services_of(request)
    document = status_document(services)
    upstream = services.upstream
    upstream_doc = document["upstream"]
    assert isinstance(upstream_doc, dict)
    upstream_doc["since"] = None if upstream is None else utc_now_text(upstream.breaker.changed_at)
    verification = await request.app[VERIFIER].current()
    document["audit_chain"] = verification.as_json()
    document["console"] = {
        "can_act": request.app[CONSOLE].can_act,
        "vendor_keys": len(services.licensing.keyring),
        "idle_days": request.app[SETTINGS].idle_days,
    }
    return document


def by_runway(query: Mapping[str, str]) -> bool:
    """Whether a machines list is sorted by runway (sort=runway), not by name (sort=name, the default)."""
    sort = query.get("sort", "name")
    if sort not in ("name", "runway"):
        raise BadQueryError("sort: expected name or runway")
    return sort == "runway"


def period(value: str | None) -> int:
    """Days of a licenses period from a query field (30 when absent)."""
    try:
        return limit(value, 30, 3650)
    except BadQueryError:
        raise BadQueryError("days: expected a number of days between 1 and 3650") from None


async def license_list(request: web.Request, days: int, offset: int, most: int) -> dict[str, Any]:
    """A page of the licenses: seats in use against the limit, machines, the period's peak and denials."""
    services = services_of(request)
    now = request.app[NOW]()
    ledger = services.licensing.seats
    await ledger.flush()
    rows, _ = await asyncio.to_thread(
        licenses,
        ledger.reader,
        since=now - days * DAY,
        until=now,
        in_use=ledger.in_use(),
        idle_days=request.app[SETTINGS].idle_days,
    )
    found = Slice.of(rows, offset, most)
    return {
        "days": days,
        "since": utc_now_text(now - days * DAY),
        "until": utc_now_text(now),
        "licenses": found.rows,
        **paging(found),
    }


def paging(found: Slice) -> dict[str, int | None]:
    """Where a page of an API list sits in the whole list, and where the next one starts (None: no more)."""
    return {
        "total": found.total,
        "offset": found.offset,
        "limit": found.limit,
        "next_offset": found.next_offset,
    }


def flag(value: str | None) -> bool:
    """A query field meaning yes (1, true, on, yes)."""
    return (value or "").strip().lower() in ("1", "true", "on", "yes")


def limit(value: str | None, default: int, most: int, least: int = 1) -> int:
    """A count from a query field, within least..most."""
    if value is None or value == "":
        return default
    if not value.isascii() or not value.isdigit() or len(value) > 12 or not least <= int(value) <= most:
        raise BadQueryError(f"expected a whole number between {least} and {most}, got {value[:20]!r}")
    return int(value)


def _named_limit(query: Mapping[str, str], name: str, default: int, most: int, least: int = 1) -> int:
    """`limit` of one query field, its error naming the field."""
    try:
        return limit(query.get(name), default, most, least)
    except BadQueryError as exc:
        raise BadQueryError(f"{name}: {exc}") from None


def api_window(query: Mapping[str, str]) -> tuple[int, int]:
    """(offset, limit) of an API list from its `offset` and `limit` fields; BadQueryError names the field."""
    most = _named_limit(query, "limit", API_ROWS, MAX_ROWS)
    return _named_limit(query, "offset", 0, MAX_OFFSET, least=0), most


def page_window(query: Mapping[str, str]) -> tuple[int, int]:
    """(offset, limit) of a console page from its `page` and `per_page` fields; BadQueryError names one."""
    per_page = _named_limit(query, "per_page", PAGE_ROWS, MAX_ROWS)
    page = _named_limit(query, "page", 1, MAX_OFFSET // per_page)
    return (page - 1) * per_page, per_page


async def machine_list(
    request: web.Request, text: str, *, idle_only: bool, offset: int, most: int, by_runway: bool = False
) -> Slice:
    """A page of the machines matching a search across all licenses, marked idle or not, with their runway.

    By name (the ledger's order), the runways of the page's machines are looked up one by one; by runway
    (soonest lock-out first), every machine's is computed, which takes longer on a large ledger, and raises
    StoreUnreachableError while a shared database cannot be read.
    """
    services = services_of(request)
    ledger = services.licensing.seats
    await ledger.flush()
    now = request.app[NOW]()
    found = await asyncio.to_thread(
        find_machines,
        ledger.reader,
        text=text,
        idle_only=idle_only,
        idle_days=request.app[SETTINGS].idle_days,
        now=now,
        offset=0 if by_runway else offset,
        limit=MAX_OFFSET if by_runway else most,
    )
    if not by_runway:
        for row in found.rows:
            try:
                _show_runway(row, await _runway_of(services, row, now), services.config, now)
            except StoreUnreachableError:  # not known now: said so, not shown as a machine with nothing kept
                _show_runway(row, None, services.config, now)
                row["limited_by"] = UNKNOWN
        return found
    await services.store.flush()
    answers = answer_reader(services.config)
    every = await asyncio.to_thread(
        runway.collect, answers, ledger.reader, services.licensing.files, services.config, now
    )
    by_name = {(r.product_id, r.key, r.machine_code): r for r in every}
    for row in found.rows:
        name = (str(row["product_id"]), str(row["key"]), str(row["machine_code"]))
        _show_runway(row, by_name.get(name) if row["deactivated"] is None else None, services.config, now)
    found.rows.sort(key=lambda row: (row["runway_s"] is None, row["runway_s"] or 0))
    return Slice.of(found.rows, offset, most)


async def _runway_of(services: Services, row: Mapping[str, object], now: float) -> Runway | None:
    """One ledger machine's runway from its kept answers, license file and lease; None once deactivated."""
    if row["deactivated"] is not None:
        return None
    license = (str(row["product_id"]), str(row["key"]))
    code = str(row["machine_code"])
    kept = await services.store.kept_activations(*license, code)
    holdings = [runway.from_kept(KeptActivation(*license, code, at, None, body)) for body, at in kept]
    found = [holding for holding in holdings if holding is not None]
    file = services.licensing.files.for_activate(*license, code)
    if file is not None:
        found += [holding for holding in runway.from_file(file) if holding.machine_code == code]
    lease = services.licensing.seats.live(license).get(code)
    leases = {} if lease is None else {(license, code): lease.expires}
    machine = MachineRow(
        str(row["friendly_name"]), *license, code, 0.0, 0.0, "", 0, bool(row["floating"]), None
    )
    (one,) = runway.runways(found, [machine], leases, services.config, now)
    return one


UNKNOWN = "unknown: the shared database cannot be reached"


def _show_runway(row: dict[str, object], found: Runway | None, config: Config, now: float) -> None:
    """Add a machine's runway to its row: until when, why, seconds left, and whether to highlight it."""
    left = None if found is None else found.remaining(now)
    row["licensed_until"] = None if found is None else iso(found.until)
    row["limited_by"] = None if found is None else found.limited_by
    row["runway_s"] = None if left is None else round(left)
    row["seat_needs"] = None if found is None else runway.seat(found, now) or None
    row["runway_short"] = left is not None and left < config.runway.highlight


async def audit_page(request: web.Request, params: dict[str, str]) -> Page:
    """One page of audit records matching the search fields, newest first."""
    try:
        query = query_from(params, datetime.fromtimestamp(request.app[NOW](), UTC))
        page = limit(params.get("page"), 1, MAX_PAGE)
        per_page = limit(params.get("per_page"), PER_PAGE, 500)
    except ValueError as exc:
        raise BadQueryError(str(exc)) from None
    config = services_of(request).config
    return await asyncio.to_thread(read_page, config.audit_dir, query, page, per_page, config.database)
