"""HTTP handling of workstation calls: parse, let the policy answer, record in the audit trail, reply."""

from __future__ import annotations

import asyncio
import ipaddress
import time

import structlog
from aiohttp import web

from license_server import __version__
from license_server.audit.chain import CALL, CallRecord, utc_now_text
from license_server.audit.writer import AuditUnavailableError
from license_server.config import IPNetwork
from license_server.licensing.policy import Outcome
from license_server.licensing.protocol import Call, Forward, RequestError, normalise_path, parse_fields
from license_server.web.keys import CALL_LINE, CONFIG, GUARD, SERVICES, Services
from license_server.web.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = structlog.get_logger(__name__)

_FORM = "application/x-www-form-urlencoded"
_MONITORING = frozenset({"/healthz", "/readyz", "/status", "/metrics"})
_MAX_MESSAGE = 500  # characters of an answer's message kept in the audit record


async def handle(request: web.Request) -> web.StreamResponse:
    """Route every request: monitoring endpoints, then API calls in any of the SDKs' path spellings."""
    if (guard := request.app.get(GUARD)) is not None:
        guard.started(request.protocol)
    path = request.path.rstrip("/")
    if path in _MONITORING:
        return monitoring(request, path)
    services = request.app[SERVICES]
    started = time.monotonic()
    request_id = services.request_ids()
    method = normalise_path(request.path)
    call: Call | None = None
    try:
        call, forward = await _parse(request, services, method)
        outcome = await services.licensing.answer(call, forward, request.remote or "")
        services.metrics.count_upstream(outcome)  # here: an audit refusal below may replace the outcome
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
    services.metrics.count_call(method, outcome.action.value, outcome.status, elapsed)
    headers = {
        "Content-Type": outcome.content_type,
        "X-License-Server-Source": outcome.action.value,
        "X-Request-Id": request_id,
    }
    if outcome.age is not None:
        headers["X-License-Server-Age"] = str(int(outcome.age))
    return web.Response(status=outcome.status, body=outcome.body, headers=headers)


_CLIENT_REFUSAL = "This license server does not accept calls from your address."
_GET_WITH_BODY = (
    "A GET request carries its fields in the query string and no body; send the form as a POST body instead,"
    " as every Cryptolens SDK does."
)
_AUDIT_REFUSAL = (
    "The audit trail of this license server cannot be written, and it is configured to refuse calls"
    " until it can; see its log."
)


async def _parse(request: web.Request, services: Services, method: str | None) -> tuple[Call, Forward]:
    """Check a call's path, HTTP method, allowlist, size and form; return the call and what goes upstream."""
    config = services.config
    if config.listen.allow and not client_allowed(request.remote, config.listen.allow):
        raise RequestError(403, _CLIENT_REFUSAL)
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
    body = await _read_body(request, limit, too_large, config.listen.header_timeout)
    if body and request.method == "GET":
        # Upstream is sent a GET's query string only: fields from its body would be fields the daemon
        # records and acts on (a floating interval, a name) that upstream never saw.
        raise RequestError(400, _GET_WITH_BODY)
    if body and request.content_type not in (_FORM, "application/octet-stream"):
        raise RequestError(415, f"The request body must be {_FORM}, as every Cryptolens SDK sends it.")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, "The request body is not valid UTF-8.") from exc
    raw_query = request.rel_url.raw_query_string
    call = Call.from_fields(method, parse_fields(text, raw_query))
    return call, Forward(method, request.method, body, raw_query, _FORM if body else None)


def _record(
    request: web.Request,
    request_id: str,
    method: str | None,
    call: Call | None,
    outcome: Outcome,
    elapsed: float,
) -> CallRecord:
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
    request.app[CALL_LINE](
        {
            "request_id": request_id,
            "client": request.remote,
            "http_method": request.method,
            "api_method": method,
            "action": outcome.action.value,
            "status": outcome.status,
            "upstream_status": outcome.upstream_status,
            "result": outcome.result,
            "message": outcome.message or None,
            "failure": outcome.failure,
            "age_s": None if outcome.age is None else round(outcome.age),
            "ms": round(elapsed * 1000, 2),
        }
    )


async def _read_body(request: web.Request, limit: int, too_large: str, deadline: float) -> bytes:
    """The request body, refused past `limit` bytes or when it has not all come within `deadline` seconds."""
    content = request.content
    if content.is_eof():  # the usual small form arrived with its headers: no waiting, no iterator
        body = content.read_nowait()
        if len(body) > limit:
            raise RequestError(413, too_large)
        return body
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(deadline):  # a trickled or stalled body must not hold the call for ever
            async for chunk in content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, too_large)
                chunks.append(chunk)
    except TimeoutError as exc:
        raise RequestError(408, f"The request body did not arrive within {deadline:g} s.") from exc
    return b"".join(chunks)


def client_allowed(remote: str | None, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether a client address lies in one of the allowed networks."""
    if remote is None:
        return False
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def monitoring(request: web.Request, path: str) -> web.Response:
    """/healthz (alive), /readyz (state loaded), /status (the daemon's state) and /metrics (Prometheus)."""
    services = request.app.get(SERVICES)
    allow = request.app[CONFIG].listen.allow if services is None else services.config.listen.allow
    if allow and not client_allowed(request.remote, allow):
        return web.json_response({"result": 1, "message": _CLIENT_REFUSAL}, status=403)
    if path == "/healthz":
        return web.json_response({"status": "alive"})
    if services is None:
        return web.json_response({"status": "starting"}, status=503)
    if path == "/readyz":
        return readiness(services)
    if path == "/metrics":
        return web.Response(body=services.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})
    return web.json_response(status_document(services))


def readiness(services: Services) -> web.Response:
    """/readyz: 200 while the node takes new calls; 503 while it drains before stopping, for the balancer."""
    if services.draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready"})


def status_document(services: Services) -> dict[str, object]:
    """The daemon's state for monitoring and admins; no keys, machines, addresses or tokens."""
    upstream = services.upstream
    audit = services.audit.state()
    last_success = None if upstream is None else upstream.breaker.last_success
    document: dict[str, object] = {
        "status": "ok" if audit.writable else "degraded",
        "version": __version__,
        "node": services.config.node.name,
        "offline": upstream is None,
        "upstream": {
            "state": "offline" if upstream is None else upstream.breaker.state.value,
            "last_success": None if last_success is None else utc_now_text(last_success),
            "last_failure": None if upstream is None else upstream.breaker.last_failure,
        },
        "kept_answers": services.kept_answers,
        "stale_answers_served": services.licensing.stale_served,
        "license_files": len(services.licensing.files),
        "floating_seats_in_use": sum(services.licensing.seats.in_use().values()),
        "audit": {
            "writable": audit.writable,
            "error": audit.error,
            "backlog": audit.backlog,
            "lost": audit.lost,
            "seq": audit.seq,
        },
        "uptime_s": round(time.time() - services.started),
    }
    watch = services.runway
    if watch is not None and watch.latest is not None and watch.computed_at is not None:  # counts only
        document["runway"] = {
            "computed_at": utc_now_text(watch.computed_at),
            "machines": watch.latest.machines,
            "within": watch.latest.within,
            "shortest_s": {product: round(left) for product, left in sorted(watch.latest.shortest.items())},
        }
    database = services.database
    if database is not None:  # the URL as logs show it: never a password
        shared: dict[str, object] = {"url": database.info.shown, "schema_version": database.schema_version}
        heartbeat = services.heartbeat
        if heartbeat is not None:  # peers: as of the last heartbeat that got through
            shared |= {
                "state": heartbeat.state,
                "since": utc_now_text(heartbeat.since),
                "error": heartbeat.error,
                "peers": list(heartbeat.peers),
                "live_nodes": len(heartbeat.peers),
            }
        backlog = services.database_backlog()
        if backlog is not None:  # written to the database once it answers (again)
            shared["backlog"] = {"writes": backlog[0], "audit_records": backlog[1]}
        document["database"] = shared
    return document
