"""The console's JSON API for scripts (described by openapi.json, served at /api/openapi.json)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from license_server.admin import data
from license_server.admin.actions import InvalidInputError, Result, Target
from license_server.admin.keys import ASSETS, CONSOLE, PRINCIPAL, VERIFIER
from license_server.admin.render import error, json_response
from license_server.storage.interfaces import StoreUnreachableError

MAX_JSON_BYTES = 16 * 1024


async def status(request: web.Request) -> web.Response:
    """GET /api/v1/status."""
    return json_response(await data.status(request))


async def licenses(request: web.Request) -> web.Response:
    """GET /api/v1/licenses: a page of seats in use against each license's limit."""
    try:
        days = data.period(request.query.get("days"))
        offset, most = data.api_window(request.query)
    except data.BadQueryError as exc:
        return error(request, 400, str(exc))
    return json_response(await data.license_list(request, days, offset, most))


async def machines(request: web.Request) -> web.Response:
    """GET /api/v1/machines: a page of the search by friendly name, machine code, license key or address."""
    query = request.query
    try:
        offset, most = data.api_window(query)
        by_runway = data.by_runway(query)
    except data.BadQueryError as exc:
        return error(request, 400, str(exc))
    try:
        found = await data.machine_list(
            request,
            query.get("q", ""),
            idle_only=data.flag(query.get("idle")),
            offset=offset,
            most=most,
            by_runway=by_runway,
        )
    except StoreUnreachableError as exc:
        return error(request, 503, f"cannot sort by runway now ({exc}); sort by name instead")
    for row in found.rows:
        row.pop("runway_short", None)  # the page's highlight: the API gives the seconds
    return json_response(
        {"machines": found.rows, "truncated": found.next_offset is not None, **data.paging(found)}
    )


async def deactivate(request: web.Request) -> web.Response:
    """POST /api/v1/machines/deactivate: free a machine's seat upstream and here."""
    target = await _target(request, need_name=False)
    if isinstance(target, web.Response):
        return target
    result = await request.app[CONSOLE].deactivate(request[PRINCIPAL].fields(), target)
    return json_response(result.as_json(), status=result.status)


async def activate(request: web.Request) -> web.Response:
    """POST /api/v1/activations: activate a machine upstream; answers its signed .skm license file."""
    target = await _target(request, need_name=True)
    if isinstance(target, web.Response):
        return target
    return file_or_error(await request.app[CONSOLE].activate(request[PRINCIPAL].fields(), target))


async def license_file(request: web.Request) -> web.Response:
    """GET /api/v1/license-file: the .skm of a machine from the signed answer the daemon keeps."""
    query = request.query
    try:
        target = Target.checked(query.get("product_id"), query.get("key"), query.get("machine_code"))
    except InvalidInputError as exc:
        return error(request, 400, str(exc))
    return file_or_error(await request.app[CONSOLE].kept_file(request[PRINCIPAL].fields(), target))


async def audit(request: web.Request) -> web.Response:
    """GET /api/v1/audit: a page of matching audit records, newest first."""
    try:
        page = await data.audit_page(request, dict(request.query))
    except data.BadQueryError as exc:
        return error(request, 400, str(exc))
    return json_response(
        {
            "records": page.records,
            "page": page.page,
            "per_page": page.per_page,
            "total": page.total,
            "pages": page.pages,
        }
    )


async def verification(request: web.Request) -> web.Response:
    """GET /api/v1/audit/verification: whether the chain is intact (checked at most once a minute)."""
    checked = await request.app[VERIFIER].current(force=data.flag(request.query.get("refresh")))
    return json_response(checked.as_json())


async def openapi(request: web.Request) -> web.Response:
    """GET /api/openapi.json: this API's description."""
    return web.Response(body=request.app[ASSETS].openapi, content_type="application/json")


def file_or_error(result: Result) -> web.Response:
    """The license file as a download, or the result as JSON with its status."""
    if result.file is None or result.file_name is None:
        return json_response(result.as_json(), status=result.status)
    return web.Response(
        body=result.file,
        content_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{result.file_name}"',
            "X-License-Server-Source": result.source or "",
        },
    )


async def _target(request: web.Request, *, need_name: bool) -> Target | web.Response:
    """The machine a JSON body names, or the 4xx answer for a body that does not."""
    if request.content_type != "application/json":
        return error(request, 415, "Send a JSON object with Content-Type: application/json.")
    raw = await request.content.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        return error(request, 413, f"The JSON body is larger than {MAX_JSON_BYTES} bytes.")
    try:
        body: Any = json.loads(raw)
    except (ValueError, RecursionError):
        return error(request, 400, "The body is not JSON.")
    if not isinstance(body, dict):
        return error(request, 400, "The body must be a JSON object.")
    floating = body.get("floating")
    if floating is not None and not isinstance(floating, bool):
        return error(request, 400, "floating: expected true or false")
    try:
        return Target.checked(
            body.get("product_id"),
            body.get("key"),
            body.get("machine_code"),
            body.get("friendly_name", "") if need_name else "",
            floating=floating,
        )
    except InvalidInputError as exc:
        return error(request, 400, str(exc))
