"""HTTP handling of workstation calls: parse, let the policy answer, record in the audit trail, reply."""

from __future__ import annotations

import secrets
import time
from typing import Any

import structlog
from aiohttp import web

from license_server import __version__
from license_server.audit.chain import CALL
from license_server.audit.writer import AuditUnavailableError
from license_server.keys import SERVICES, Services
from license_server.protocol import Call, RequestError, normalise_path, parse_fields
from license_server.proxy import Outcome

log = structlog.get_logger(__name__)

_FORM = "application/x-www-form-urlencoded"
_HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
_MAX_MESSAGE = 500  # characters of an answer's message kept in the audit record


async def handle(request: web.Request) -> web.StreamResponse:
    """Route every request: health checks, then API calls in any of the SDKs' path spellings."""
    if request.path.rstrip("/") in _HEALTH_PATHS:
        return health(request)
    services = request.app[SERVICES]
    started = time.monotonic()
    request_id = secrets.token_hex(8)
    method = normalise_path(request.path)
    call: Call | None = None
    try:
        call, body, raw_query = await _parse(request, services, method)
        outcome = await services.licensing.answer(
            call, request.method, body, raw_query, _FORM if body else None, request.remote or ""
        )
    except RequestError as exc:
        outcome = Outcome.refused(exc.status, exc.message)
    except Exception:  # a bug must still give the SDK JSON, and leave the daemon up
        log.exception("call_crashed", api_method=method, request_id=request_id)
        outcome = Outcome.refused(500, "The license server failed on this request; see its log.")
    elapsed = time.monotonic() - started
    try:
        await services.audit.append(_record(request, request_id, method, call, outcome, elapsed))
    except AuditUnavailableError:
        outcome = Outcome.refused(503, _AUDIT_REFUSAL)
    _log_call(request, request_id, method, outcome, elapsed)
    headers = {
        "Content-Type": outcome.content_type,
        "X-License-Server-Source": outcome.action.value,
        "X-Request-Id": request_id,
    }
    if outcome.age is not None:
        headers["X-License-Server-Age"] = str(int(outcome.age))
    return web.Response(status=outcome.status, body=outcome.body, headers=headers)


_AUDIT_REFUSAL = (
    "The audit trail of this license server cannot be written, and it is configured to refuse calls"
    " until it can; see its log."
)


async def _parse(request: web.Request, services: Services, method: str | None) -> tuple[Call, bytes, str]:
    """Check a call's path, HTTP method, allowlist, size and form; return the call, body and raw query."""
    config = services.config
    if method is None:
        raise RequestError(
            404, "Not a licensing API path. Point the SDK at http://HOST:PORT/api/ on this license server."
        )
    if not services.audit.writable and config.audit.on_failure == "refuse":
        raise RequestError(503, _AUDIT_REFUSAL)
    if request.method not in ("GET", "POST"):
        raise RequestError(405, f"HTTP {request.method} is not used by the licensing API; send POST or GET.")
    if method not in config.upstream.allowed_methods:
        raise RequestError(403, f"The API method '{method}' is not allowed through this license server.")
    limit = config.listen.max_body_bytes
    too_large = f"The request body is larger than the {limit} bytes this license server accepts."
    if request.content_length is not None and request.content_length > limit:
        raise RequestError(413, too_large)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise RequestError(413, too_large) from exc
    if body and request.content_type not in (_FORM, "application/octet-stream"):
        raise RequestError(415, f"The request body must be {_FORM}, as every Cryptolens SDK sends it.")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, "The request body is not valid UTF-8.") from exc
    raw_query = request.rel_url.raw_query_string
    return Call.from_fields(method, parse_fields(text, raw_query)), body, raw_query


def _record(
    request: web.Request,
    request_id: str,
    method: str | None,
    call: Call | None,
    outcome: Outcome,
    elapsed: float,
) -> dict[str, Any]:
    """The audit record of one answered call; never the token."""
    return {
        "type": CALL,
        "request_id": request_id,
        "client": request.remote,
        "http_method": request.method,
        "api_method": method or "",
        "product_id": "" if call is None else call.product_id,
        "key": "" if call is None else call.license_key,
        "machine": "" if call is None else call.machine_code,
        "friendly_name": "" if call is None else call.friendly_name,
        "floating_interval": 0 if call is None else call.floating_interval,
        "action": outcome.action.value,
        "status": outcome.status,
        "upstream_status": outcome.upstream_status,
        "result": outcome.result,
        "message": outcome.message[:_MAX_MESSAGE],
        "failure": outcome.failure,
        "latency_ms": round(elapsed * 1000, 3),
        "bytes": len(outcome.body),
    }


def _log_call(
    request: web.Request, request_id: str, method: str | None, outcome: Outcome, elapsed: float
) -> None:
    """One canonical line per call; never the token or the query string."""
    log.info(
        "call",
        request_id=request_id,
        client=request.remote,
        http_method=request.method,
        api_method=method,
        action=outcome.action.value,
        status=outcome.status,
        upstream_status=outcome.upstream_status,
        result=outcome.result,
        message=outcome.message or None,
        failure=outcome.failure,
        age_s=None if outcome.age is None else round(outcome.age),
        ms=round(elapsed * 1000, 2),
    )


def health(request: web.Request) -> web.Response:
    """Liveness and readiness: 200 once state is loaded; an unreachable upstream is not unhealthy."""
    services = request.app.get(SERVICES)
    if services is None:
        return web.json_response({"status": "starting"}, status=503)
    upstream = services.upstream
    audit = services.audit.state()
    body: dict[str, object] = {
        "status": "ok" if audit.writable else "degraded",
        "version": __version__,
        "offline": upstream is None,
        "upstream": "offline" if upstream is None else upstream.breaker.state.value,
        "stale_answers_served": services.licensing.stale_served,
        "license_files": len(services.licensing.files),
        "audit": {
            "writable": audit.writable,
            "error": audit.error,
            "backlog": audit.backlog,
            "lost": audit.lost,
            "seq": audit.seq,
        },
        "uptime_s": round(time.time() - services.started),
    }
    return web.json_response(body)
