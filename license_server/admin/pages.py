"""The console's pages: server-rendered HTML, every value escaped, every change a POST with a CSRF token."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlencode

import structlog
from aiohttp import web

from license_server import __version__
from license_server.admin import data
from license_server.admin.actions import InvalidInputError, Result, Target
from license_server.admin.api import file_or_error
from license_server.admin.html import Markup, Templates, esc, hidden, join, tag
from license_server.admin.keys import ASSETS, CHART_LOCK, CONSOLE, NOW, PRINCIPAL, SETTINGS, VERIFIER
from license_server.admin.ledger import seat_chart
from license_server.admin.render import error, page
from license_server.reports.charts import INSTALL_HINT, ChartsUnavailableError

log = structlog.get_logger(__name__)


def _chart_notice(*lines: str) -> bytes:
    """An SVG that says, in a few lines of text, why there is no chart."""
    texts = "".join(
        f'<text x="10" y="{25 + 22 * number}">{esc(line)}</text>' for number, line in enumerate(lines)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="720" height="{20 + 22 * len(lines)}"'
        f' font-family="sans-serif" font-size="14">{texts}</svg>'
    ).encode()


_NO_CHART = _chart_notice("The chart needs matplotlib, the charts extra:", INSTALL_HINT + ".")
_CHART_FAILED = _chart_notice("The chart could not be drawn; the daemon's log says why (chart_failed).")
_STATES = {
    "closed": ("up", "Up"),
    "half_open": ("warn", "Down, checking again"),
    "open": ("down", "Down"),
    "offline": ("warn", "Offline mode"),
}


def _templates(request: web.Request) -> Templates:
    """The console's templates."""
    return request.app[ASSETS].templates


def _flash(request: web.Request, message: str, kind: str) -> Markup:
    """A notice above a page's content; nothing when there is no message."""
    return _templates(request).render("flash", kind=kind, message=message) if message else Markup("")


def _csrf(request: web.Request) -> Markup:
    """The hidden CSRF field of the logged-in session."""
    session = request[PRINCIPAL].session
    return hidden({"csrf": "" if session is None else session.csrf})


async def status(request: web.Request) -> web.Response:
    """GET /: upstream, kept answers, stale answers, the audit trail and what the console can do."""
    document = await data.status(request)
    upstream, audit, chain, console = (
        document[key] for key in ("upstream", "audit", "audit_chain", "console")
    )
    upstream_class, upstream_state = _STATES.get(upstream["state"], ("warn", upstream["state"]))
    since = upstream["since"]
    audit_ok = audit["writable"] and chain["intact"]
    content = _templates(request).render(
        "status",
        upstream_class=upstream_class,
        upstream_state=upstream_state,
        upstream_since=f"since {_time(since)} UTC" if since else "no contact with the licensing service",
        last_success=f"{_time(upstream['last_success'])} UTC" if upstream["last_success"] else "never",
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
        version=__version__,
        uptime=_duration(document["uptime_s"]),
    )
    return page(request, "Status", content)


async def licenses(request: web.Request) -> web.Response:
    """GET /licenses: seats in use against each limit, a page at a time, with the seats chart."""
    try:
        days = data.period(request.query.get("days"))
        offset, per_page = data.page_window(request.query)
    except data.BadQueryError as exc:
        return error(request, 400, str(exc))
    found = await data.license_list(request, days, offset, per_page)
    rows = Markup("".join(_license_row(row) for row in found["licenses"])) or Markup(
        '<tr><td colspan="8">No license has been seen yet.</td></tr>'
    )
    options = Markup(
        "".join(
            tag("option", f"last {each} days", value=each, selected=each == days)
            for each in sorted({*data.PERIODS, days})
        )
    )
    content = _templates(request).render(
        "licenses",
        rows=rows,
        day_options=options,
        days=days,
        chart=f"/licenses/chart.svg?days={days}",
        count=_shown(found["total"], offset, len(found["licenses"]), "license(s)"),
        pages=_page_links(request, found["total"], offset, per_page),
    )
    return page(request, "Licenses", content)


def _license_row(row: dict[str, Any]) -> Markup:
    """One license: over its limit in red."""
    limit = row["seat_limit"]
    over = bool(limit) and max(row["floating_in_use"], row["machines_active"]) > limit
    cells = [
        tag("td", tag("code", row["key"])),
        tag("td", row["product_id"]),
        tag("td", "?" if limit is None else ("none" if limit == 0 else limit), class_="num"),
        tag("td", row["floating_in_use"], class_="num"),
        tag("td", row["machines_active"], class_="num"),
        tag("td", row["peak_floating"], class_="num"),
        tag("td", row["denials"], class_="num"),
        tag("td", tag("a", "Machines", href="/machines?" + urlencode({"q": row["key"]}))),
    ]
    return tag("tr", Markup("".join(cells)), class_="over" if over else None)


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
            await ledger.db.flush()
            svg = await asyncio.to_thread(
                seat_chart, ledger.db.path, since=now - days * data.DAY, until=now, key=key
            )
    except ChartsUnavailableError:
        svg = _NO_CHART
    except Exception:  # a picture on a page: whatever stops it is logged, never answered with a 500
        log.exception("chart_failed", days=days)
        svg = _CHART_FAILED
    return web.Response(body=svg, content_type="image/svg+xml")


async def machines(request: web.Request, *, message: str = "", kind: str = "ok") -> web.Response:
    """GET /machines: search across all licenses; idle machines highlighted; Deactivate and file links."""
    text = request.query.get("q", "")
    idle_only = data.flag(request.query.get("idle"))
    idle_days = request.app[SETTINGS].idle_days
    try:
        offset, per_page = data.page_window(request.query)
    except data.BadQueryError as exc:
        return error(request, 400, str(exc))
    found = await data.machine_list(request, text, idle_only=idle_only, offset=offset, most=per_page)
    back = request.path_qs
    rows = Markup("".join(_machine_row(row, back) for row in found.rows)) or Markup(
        '<tr><td colspan="9">No machine matches.</td></tr>'
    )
    content = _templates(request).render(
        "machines",
        flash=_flash(request, message, kind),
        q=text,
        idle_checked=Markup("checked") if idle_only else "",
        idle_days=idle_days,
        count=_shown(found.total, offset, len(found.rows), "machine(s)"),
        rows=rows,
        pages=_page_links(request, found.total, offset, per_page),
    )
    return page(request, "Machines", content)


def _machine_row(row: dict[str, Any], back: str) -> Markup:
    """One machine, with its actions."""
    target = {"product_id": row["product_id"], "key": row["key"], "machine_code": row["machine_code"]}
    confirm = {
        **target,
        "friendly_name": row["friendly_name"],
        "floating": "1" if row["floating"] else "",
        "back": back,
    }
    actions = [tag("a", "License file", href="/machines/license-file?" + urlencode(target))]
    if row["deactivated"] is None:
        actions.insert(
            0, tag("a", "Deactivate…", href="/machines/deactivate?" + urlencode(confirm), class_="deactivate")
        )
        state = tag("span", "idle", class_="badge idle") if row["idle"] else Markup("active")
    else:
        state = tag("span", f"deactivated {_time(row['deactivated'])}", class_="badge off")
    code = str(row["machine_code"])
    cells = [
        tag("td", row["friendly_name"] or "—"),
        tag("td", Markup(f"{tag('code', row['key'])} <small>product {esc(row['product_id'])}</small>")),
        tag("td", tag("code", code if len(code) <= 24 else code[:20] + "…", title=code)),
        tag("td", row["client"]),
        tag("td", _time(row["last_seen"])),
        tag("td", row["idle_days"], class_="num"),
        tag("td", "floating" if row["floating"] else "node-locked"),
        tag("td", state),
        tag("td", join(actions, " ")),
    ]
    return tag("tr", Markup("".join(cells)), class_="idle" if row["idle"] else None)


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
    content = _templates(request).render(
        "confirm",
        friendly_name=target.friendly_name or "—",
        key=target.key,
        product_id=target.product_id,
        machine_code=target.machine_code,
        seat="floating" if target.floating else "node-locked",
        fields=Markup(_csrf(request) + hidden(fields)),
        back=back,
    )
    return page(request, "Deactivate?", content)


async def deactivate(request: web.Request) -> web.Response:
    """POST /machines/deactivate: ask upstream, show its answer."""
    form = await request.post()
    try:
        target = _target(form, floating=data.flag(_field(form, "floating")))
    except InvalidInputError as exc:
        return error(request, 400, str(exc))
    result = await request.app[CONSOLE].deactivate(request[PRINCIPAL].fields(), target)
    content = _templates(request).render(
        "deactivated",
        heading="Deactivated" if result.ok else "Not deactivated",
        flash=_flash(request, result.message, "ok" if result.ok else "error"),
        friendly_name=target.friendly_name or "—",
        key=target.key,
        product_id=target.product_id,
        machine_code=target.machine_code,
        upstream=_upstream(request, result),
        back=_back(_field(form, "back")),
    )
    return page(request, "Deactivate", content, status=200 if result.ok else result.status)


def _upstream(request: web.Request, result: Result) -> Markup:
    """Upstream's answer as a small table, or why there is none."""
    if result.upstream is None:
        return tag("p", "The licensing service was not asked or did not answer.", class_="hint")
    return _templates(request).render("upstream", **result.upstream)


async def activate_form(
    request: web.Request, *, fields: Any = None, result: Result | None = None
) -> web.Response:
    """GET /activate: license key and machine code in, license file out."""
    values = fields or request.query
    content = _templates(request).render(
        "activate",
        flash=_flash(request, "" if result is None else result.message, "error"),
        csrf=_csrf(request),
        product_id=_field(values, "product_id"),
        key=_field(values, "key"),
        machine_code=_field(values, "machine_code"),
        friendly_name=_field(values, "friendly_name"),
        upstream=Markup("")
        if result is None or result.upstream is None
        else Markup(tag("h2", "Upstream's answer") + _upstream(request, result)),
    )
    status = 200 if result is None else result.status
    return page(request, "Activate", content, status=status)


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
    message, records, pages_nav, count = "", Markup(""), Markup(""), ""
    try:
        found = await data.audit_page(request, params)
    except data.BadQueryError as exc:
        message = str(exc)
    else:
        records = Markup("".join(_audit_row(record) for record in found.records)) or Markup(
            '<tr><td colspan="9">No matching records.</td></tr>'
        )
        count = f"{found.total} matching record(s), newest first; page {found.page} of {found.pages}"
        pages_nav = _pages(params, found.page, found.pages)
    chain = f"Chain: {verification.headline} (checked {_time(verification.as_json()['checked_at'])} UTC)"
    content = _templates(request).render(
        "audit",
        chain_class="ok" if verification.ok else "bad",
        chain=chain,
        flash=_flash(request, message, "error"),
        count=count,
        rows=records,
        pages=pages_nav,
        **{
            name: params.get(name, "")
            for name in ("key", "machine", "name", "client", "action", "since", "until")
        },
    )
    return page(request, "Audit log", content, status=400 if message else 200)


def _audit_row(record: dict[str, Any]) -> Markup:
    """One record: a workstation call, or an admin action with its actor."""
    admin = record.get("type") == "admin"
    who = record.get("actor") if admin else record.get("client")
    what = (
        f"admin: {record.get('action')}"
        if admin
        else f"{record.get('api_method') or '-'} {record.get('action')}"
    )
    if admin:
        outcome = "ok" if record.get("ok") else (record.get("status") or "")
    else:
        outcome = f"{record.get('status')} / result {record.get('result')}"
    cells = [
        tag("td", record.get("seq"), class_="num"),
        tag("td", _time(record.get("time"))),
        tag("td", who),
        tag("td", what),
        tag("td", tag("code", record.get("key") or "")),
        tag("td", tag("code", record.get("machine") or "", title=record.get("machine"))),
        tag("td", record.get("friendly_name")),
        tag("td", outcome),
        tag("td", record.get("message") or record.get("failure") or ""),
    ]
    return tag("tr", Markup("".join(cells)), class_="admin" if admin else None)


def _pages(params: dict[str, str], current: int, total: int) -> Markup:
    """Links to the previous and next pages of the same search."""
    links: list[object] = []
    for label, number in (("← newer", current - 1), ("older →", current + 1)):
        if 1 <= number <= min(total, 200):
            links.append(tag("a", label, href="/audit?" + urlencode({**params, "page": number})))
    return join(links, " ")


def _shown(total: int, offset: int, count: int, what: str) -> str:
    """How many rows a list has, and which of them this page shows."""
    if count == 0 or (offset == 0 and count == total):
        return f"{total} {what}"
    return f"{total} {what}; {offset + 1} to {offset + count} shown"


def _page_links(request: web.Request, total: int, offset: int, per_page: int) -> Markup:
    """Links to the previous and next pages of a list, keeping its search."""
    params = {key: value for key, value in request.query.items() if key != "page"}
    current = offset // per_page + 1
    links: list[object] = []
    for label, number in (("← previous", current - 1), ("next →", current + 1)):
        if number >= 1 and (number - 1) * per_page < total:
            links.append(tag("a", label, href=f"{request.path}?" + urlencode({**params, "page": number})))
    return join(links, " ")


def _field(fields: Any, name: str) -> str:
    """A text field of a form or query, "" when missing or not text."""
    value = fields.get(name, "") if fields is not None else ""
    return value if isinstance(value, str) else ""


def _back(target: str | None) -> str:
    """Where a Cancel or Back link goes: a machines search of this console, else the machines page."""
    if target and target.startswith("/machines") and not target.startswith("//"):
        return target
    return "/machines"


def _time(text: object) -> str:
    """A record time, to the second."""
    return str(text)[:19].replace("T", " ") if text else ""


def _duration(seconds: int) -> str:
    """An uptime in words."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days}d {hours}h" if days else f"{hours}h {rest // 60}m"
