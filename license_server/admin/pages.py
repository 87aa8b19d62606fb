"""The console's pages: the data each shows (HTML in templates/); every change a POST with a CSRF token."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlencode

import structlog
from aiohttp import web

from license_server.admin import data
from license_server.admin.actions import InvalidInputError, Result, Target
from license_server.admin.api import file_or_error
from license_server.admin.data import services_of
from license_server.admin.html import clock_time
from license_server.admin.keys import ASSETS, CHART_LOCK, CONSOLE, NOW, PRINCIPAL, SETTINGS, VERIFIER
from license_server.admin.ledger import seat_chart
from license_server.admin.render import error, page
from license_server.reports.charts import INSTALL_HINT, ChartsUnavailableError
from license_server.reports.runway import duration_text
from license_server.storage.interfaces import StoreUnreachableError

log = structlog.get_logger(__name__)

_NO_CHART = ("The chart needs matplotlib, the charts extra:", INSTALL_HINT + ".")
_CHART_FAILED = ("The chart could not be drawn; the daemon's log says why (chart_failed).",)
_STATES = {
    "closed": ("up", "Up"),
    "half_open": ("warn", "Down, checking again"),
    "open": ("down", "Down"),
    "offline": ("warn", "Offline mode"),
}


async def status(request: web.Request) -> web.Response:
    """GET /: upstream, kept answers, stale answers, the audit trail and what the console can do."""
    document = await data.status(request)
    upstream, audit, chain, console = (
        document[key] for key in ("upstream", "audit", "audit_chain", "console")
    )
    upstream_class, upstream_state = _STATES.get(upstream["state"], ("warn", upstream["state"]))
    since = upstream["since"]
    audit_ok = audit["writable"] and chain["intact"]
    return page(
        request,
        "status.html",
        upstream_class=upstream_class,
        upstream_state=upstream_state,
        upstream_since=f"since {clock_time(since)} UTC" if since else "no contact with the licensing service",
        last_success=f"{clock_time(upstream['last_success'])} UTC" if upstream["last_success"] else "never",
        last_failure=upstream["last_failure"] or "none",
        kept_answers=document["kept_answers"],
        stale_served=document["stale_answers_served"],
        license_files=document["license_files"],
        floating=document["floating_seats_in_use"],
        audit_class="up" if audit_ok else "down",
        audit_state="Healthy"
        if audit_ok
        else ("Not writable" if not audit["writable"] else "Chain NOT intact"),
        audit_seq=audit["seq"],
        chain=chain["headline"],
        audit_backlog=audit["backlog"]
        if audit["writable"]
        else f"{audit['backlog']} held ({audit['error']})",
        can_act="yes" if console["can_act"] else "no: offline mode or no upstream token configured",
        vendor_keys=f"{console['vendor_keys']} vendor key(s)" if console["vendor_keys"] else "no vendor key",
        uptime=_duration(document["uptime_s"]),
        database=_database(document.get("database")),
        runway=_runway(document.get("runway")),
    )


def _runway(shown: object) -> dict[str, object] | None:
    """The status page's runway card: machines locking out within 1 h, 24 h and 7 days without upstream."""
    if not isinstance(shown, dict):
        return None
    within = shown["within"]
    return {
        "hour": within["1h"],
        "day": within["24h"],
        "week": within["7d"],
        "machines": shown["machines"],
        "as_of": clock_time(shown["computed_at"]),
        "alarm": within["24h"] > 0,
    }


def _database(shown: object) -> str:
    """Where the shared state is, in words: the database (its URL without password) or this node's files."""
    if not isinstance(shown, dict):
        return "this node's own files (state_dir)"
    return f"{shown['url']} (schema version {shown['schema_version']})"


async def licenses(request: web.Request) -> web.Response:
    """GET /licenses: seats in use against each limit, a page at a time, with the seats chart."""
    try:
        days = data.period(request.query.get("days"))
        offset, per_page = data.page_window(request.query)
    except data.BadQueryError as exc:
        return error(request, 400, str(exc))
    found = await data.license_list(request, days, offset, per_page)
    return page(
        request,
        "licenses.html",
        rows=[_license_row(row) for row in found["licenses"]],
        periods=sorted({*data.PERIODS, days}),
        days=days,
        count=_shown(found["total"], offset, len(found["licenses"]), "license(s)"),
        pages=_page_links(request, found["total"], offset, per_page),
        idle_days=request.app[SETTINGS].idle_days,
    )


def _license_row(row: dict[str, Any]) -> dict[str, Any]:
    """One license, whether it is over its limit, and the link to its machines."""
    limit = row["seat_limit"]
    over = bool(limit) and max(row["floating_in_use"], row["machines_active"]) > limit
    return {**row, "over": over, "machines_href": "/machines?" + urlencode({"q": row["key"]})}


async def chart(request: web.Request) -> web.Response:
    """GET /licenses/chart.svg: the reports' seat chart (one at a time: matplotlib's settings are global)."""
    try:
        days = data.period(request.query.get("days"))
    except data.BadQueryError as exc:
        return error(request, 400, str(exc))
    ledger = request.app[CONSOLE].services.licensing.seats
    now = request.app[NOW]()
    key = request.query.get("key") or None
    try:
        async with request.app[CHART_LOCK]:
            await ledger.flush()
            svg = await asyncio.to_thread(
                seat_chart, ledger.reader, since=now - days * data.DAY, until=now, key=key
            )
    except ChartsUnavailableError:
        svg = _notice(request, _NO_CHART)
    except Exception:  # a picture on a page: whatever stops it is logged, never answered with a 500
        log.exception("chart_failed", days=days)
        svg = _notice(request, _CHART_FAILED)
    return web.Response(body=svg, content_type="image/svg+xml")


def _notice(request: web.Request, lines: tuple[str, ...]) -> bytes:
    """An SVG that says, in a few lines of text, why there is no chart."""
    return request.app[ASSETS].templates.render("chart_notice.svg", lines=lines).encode()


async def machines(request: web.Request, *, message: str = "", kind: str = "ok") -> web.Response:
    """GET /machines: search across all licenses; idle machines highlighted; Deactivate and file links."""
    text = request.query.get("q", "")
    idle_only = data.flag(request.query.get("idle"))
    try:
        offset, per_page = data.page_window(request.query)
        by_runway = data.by_runway(request.query)
    except data.BadQueryError as exc:
        return error(request, 400, str(exc))
    try:
        found = await data.machine_list(
            request, text, idle_only=idle_only, offset=offset, most=per_page, by_runway=by_runway
        )
    except StoreUnreachableError as exc:
        return error(request, 503, f"Cannot sort by runway now ({exc}); sort by name instead.")
    sorting = {"q": text, **({"idle": "1"} if idle_only else {})}
    return page(
        request,
        "machines.html",
        message=message,
        kind=kind,
        q=text,
        idle_only=idle_only,
        by_runway=by_runway,
        by_name_href="/machines?" + urlencode(sorting),
        by_runway_href="/machines?" + urlencode({**sorting, "sort": "runway"}),
        highlight=duration_text(services_of(request).config.runway.highlight),
        idle_days=request.app[SETTINGS].idle_days,
        count=_shown(found.total, offset, len(found.rows), "machine(s)"),
        rows=[_machine_row(row, request.path_qs) for row in found.rows],
        pages=_page_links(request, found.total, offset, per_page),
    )


def _machine_row(row: dict[str, Any], back: str) -> dict[str, Any]:
    """One machine, with the links of its actions (Cancel on the confirmation comes back to `back`)."""
    target = {"product_id": row["product_id"], "key": row["key"], "machine_code": row["machine_code"]}
    confirm = {
        **target,
        "friendly_name": row["friendly_name"],
        "floating": "1" if row["floating"] else "",
        "back": back,
    }
    left = row.get("runway_s")
    return {
        **row,
        "confirm_href": "/machines/deactivate?" + urlencode(confirm),
        "file_href": "/machines/license-file?" + urlencode(target),
        "runway_left": duration_text(None if left is None else float(str(left))),
    }


def _target(fields: Any, *, floating: bool | None = None) -> Target:
    """The machine named by query or form fields."""
    return Target.checked(
        fields.get("product_id"),
        fields.get("key"),
        fields.get("machine_code"),
        fields.get("friendly_name", ""),
        floating=floating,
    )


async def confirm_deactivate(request: web.Request) -> web.Response:
    """GET /machines/deactivate: what is about to happen, and the button that does it."""
    query = request.query
    try:
        target = _target(query, floating=data.flag(query.get("floating")))
    except InvalidInputError as exc:
        return error(request, 400, str(exc))
    back = _back(query.get("back"))
    fields = {
        "product_id": target.product_id,
        "key": target.key,
        "machine_code": target.machine_code,
        "friendly_name": target.friendly_name,
        "floating": "1" if target.floating else "",
        "back": back,
    }
    return page(request, "confirm.html", target=target, fields=fields, back=back)


async def deactivate(request: web.Request) -> web.Response:
    """POST /machines/deactivate: ask upstream, show its answer."""
    form = await request.post()
    try:
        target = _target(form, floating=data.flag(_field(form, "floating")))
    except InvalidInputError as exc:
        return error(request, 400, str(exc))
    result = await request.app[CONSOLE].deactivate(request[PRINCIPAL].fields(), target)
    return page(
        request,
        "deactivated.html",
        status=200 if result.ok else result.status,
        target=target,
        result=result,
        back=_back(_field(form, "back")),
    )


async def activate_form(
    request: web.Request, *, fields: Any = None, result: Result | None = None
) -> web.Response:
    """GET /activate: license key and machine code in, license file out."""
    values = fields or request.query
    return page(
        request,
        "activate.html",
        status=200 if result is None else result.status,
        message="" if result is None else result.message,
        upstream=None if result is None else result.upstream,
        **{name: _field(values, name) for name in ("product_id", "key", "machine_code", "friendly_name")},
    )


async def activate(request: web.Request) -> web.Response:
    """POST /activate: activate upstream and download the verified .skm; the form again on failure."""
    form = await request.post()
    try:
        target = _target(form)
    except InvalidInputError as exc:
        return await activate_form(request, fields=form, result=Result(False, 400, str(exc)))
    result = await request.app[CONSOLE].activate(request[PRINCIPAL].fields(), target)
    if result.file is None:
        return await activate_form(request, fields=form, result=result)
    return file_or_error(result)


async def kept_file(request: web.Request) -> web.Response:
    """GET /machines/license-file: download the .skm of a machine the daemon keeps a signed answer for."""
    try:
        target = _target(request.query)
    except InvalidInputError as exc:
        return error(request, 400, str(exc))
    result = await request.app[CONSOLE].kept_file(request[PRINCIPAL].fields(), target)
    if result.file is None:
        return error(request, result.status, result.message)
    return file_or_error(result)


async def audit(request: web.Request) -> web.Response:
    """GET /audit: search the trail, newest first, with the chain's verification state."""
    params = dict(request.query)
    verification = await request.app[VERIFIER].current()
    message, records, pages_nav, count = "", [], [], ""
    try:
        found = await data.audit_page(request, params)
    except data.BadQueryError as exc:
        message = str(exc)
    else:
        records = [_audit_row(record) for record in found.records]
        count = f"{found.total} matching record(s), newest first; page {found.page} of {found.pages}"
        pages_nav = _pages(params, found.page, found.pages)
    checked = clock_time(verification.as_json()["checked_at"])
    return page(
        request,
        "audit.html",
        status=400 if message else 200,
        chain_ok=verification.ok,
        chain=f"Chain: {verification.headline} (checked {checked} UTC)",
        message=message,
        count=count,
        records=records,
        pages=pages_nav,
        search={
            name: params.get(name, "")
            for name in ("key", "machine", "name", "client", "action", "since", "until")
        },
    )


def _audit_row(record: dict[str, Any]) -> dict[str, Any]:
    """One record: a workstation call, or an admin action with its actor."""
    admin = record.get("type") == "admin"
    if admin:
        outcome = "ok" if record.get("ok") else (record.get("status") or "")
    else:
        outcome = f"{record.get('status')} / result {record.get('result')}"
    return {
        "admin": admin,
        "seq": record.get("seq"),
        "time": record.get("time"),
        "who": record.get("actor") if admin else record.get("client"),
        "what": f"admin: {record.get('action')}"
        if admin
        else f"{record.get('api_method') or '-'} {record.get('action')}",
        "key": record.get("key"),
        "machine": record.get("machine"),
        "friendly_name": record.get("friendly_name"),
        "outcome": outcome,
        "message": record.get("message") or record.get("failure") or "",
    }


def _pages(params: dict[str, str], current: int, total: int) -> list[tuple[str, str]]:
    """Links to the newer and older pages of the same audit search: (label, href)."""
    return _around("/audit", params, current, min(total, 200), ("← newer", "older →"))


def _around(
    path: str, params: dict[str, str], current: int, last: int, labels: tuple[str, str]
) -> list[tuple[str, str]]:
    """Links to the pages before and after `current` (of 1..last) of one search: (label, href)."""
    return [
        (label, f"{path}?" + urlencode({**params, "page": number}))
        for label, number in zip(labels, (current - 1, current + 1), strict=True)
        if 1 <= number <= last
    ]


def _shown(total: int, offset: int, count: int, what: str) -> str:
    """How many rows a list has, and which of them this page shows."""
    if count == 0 or (offset == 0 and count == total):
        return f"{total} {what}"
    return f"{total} {what}; {offset + 1} to {offset + count} shown"


def _page_links(request: web.Request, total: int, offset: int, per_page: int) -> list[tuple[str, str]]:
    """Links to the previous and next pages of a list, keeping its search: (label, href)."""
    params: dict[str, str] = {}
    for key, value in request.query.items():
        if key != "page":
            params.setdefault(key, value)  # the first of a field given twice, as the page itself reads it
    last = -(-total // per_page)  # pages needed for `total` rows
    return _around(request.path, params, offset // per_page + 1, last, ("← previous", "next →"))


def _field(fields: Any, name: str) -> str:
    """A text field of a form or query, "" when missing or not text."""
    value = fields.get(name, "") if fields is not None else ""
    return value if isinstance(value, str) else ""


def _back(target: str | None) -> str:
    """Where a Cancel or Back link goes: a machines search of this console, else the machines page."""
    if target and target.startswith("/machines") and not target.startswith("//"):
        return target
    return "/machines"


def _duration(seconds: int) -> str:
    """An uptime in words."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days}d {hours}h" if days else f"{hours}h {rest // 60}m"
