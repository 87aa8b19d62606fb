"""The aiohttp application: wires configuration, store, upstream and policy together, and routes calls."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web

from license_server import __version__
from license_server.cache import AnswerCache
from license_server.config import Config
from license_server.license_files import LicenseFiles
from license_server.protocol import Call, RequestError, error_response, normalise_path, parse_fields
from license_server.proxy import Action, Licensing, Outcome
from license_server.signatures import KeyRing, load_public_key
from license_server.store import Store
from license_server.upstream import Breaker, Upstream, make_session

log = structlog.get_logger(__name__)

_FORM = "application/x-www-form-urlencoded"
_FINGERPRINT_FILE = "fingerprint.key"
_STORE_FILE = "answers.sqlite3"


@dataclass(slots=True)
class Services:
    """Everything a running daemon holds, made at start-up and closed at shut-down."""

    config: Config
    licensing: Licensing
    store: Store
    upstream: Upstream | None
    kept_at_start: int
    started: float


CONFIG = web.AppKey("config", Config)
SERVICES = web.AppKey("services", Services)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")


def load_keyring(config: Config) -> KeyRing:
    """Parse the configured vendor public keys."""
    return KeyRing([load_public_key(text) for text in config.public_keys])


def load_secret(state_dir: Path) -> bytes:
    """The per-installation key for token fingerprints, created on first start (write-temp-fsync-rename)."""
    path = state_dir / _FINGERPRINT_FILE
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        secret = b""
    if len(secret) == 32:
        return secret
    if secret:
        log.error("fingerprint_key_corrupt_replaced", path=str(path))
    secret = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    return secret


async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the state, the upstream session and the policy; close them in reverse order."""
    config = app[CONFIG]
    keyring = load_keyring(config)
    await asyncio.to_thread(config.state_dir.mkdir, parents=True, exist_ok=True)
    secret = await asyncio.to_thread(load_secret, config.state_dir)
    store = Store(config.state_dir / _STORE_FILE)
    kept = await store.open()
    files, problems = await asyncio.to_thread(LicenseFiles.load, config.license_files, keyring)
    for problem in problems:
        log.warning("license_file_skipped", path=str(problem.path), reason=problem.reason)
    if not keyring:
        log.warning("no_vendor_key", detail="no public_key configured: answers are forwarded but never kept")
    session = None if config.upstream.offline else make_session(config.upstream)
    upstream = (
        None if session is None else Upstream(config.upstream, session, Breaker(config.upstream.breaker))
    )
    licensing = Licensing(
        upstream=upstream,
        cache=AnswerCache(store, keyring, config.keep.memory_entries),
        files=files,
        keyring=keyring,
        keep=config.keep,
        secret=secret,
        clock=app[CLOCK],
    )
    app[SERVICES] = Services(config, licensing, store, upstream, kept, time.time())
    log.info(
        "state_loaded",
        state_dir=str(config.state_dir),
        kept_answers=kept,
        license_files=len(files),
        vendor_keys=len(keyring),
        offline=config.upstream.offline,
    )
    try:
        yield
    finally:
        if session is not None:
            await session.close()
        await store.close()
        log.info("state_flushed", state_dir=str(config.state_dir))


async def handle(request: web.Request) -> web.StreamResponse:
    """Route every request: health checks, then API calls in any of the SDKs' path spellings."""
    path = request.path
    if path.rstrip("/") in ("/healthz", "/readyz"):
        return health(request)
    method = normalise_path(path)
    if method is None:
        return error_response(
            404, "Not a licensing API path. Point the SDK at http://HOST:PORT/api/ on this license server."
        )
    services = request.app[SERVICES]
    started = time.monotonic()
    try:
        outcome = await _answer(request, services, method)
    except RequestError as exc:
        outcome = Outcome.refused(exc.status, exc.message)
    except Exception:  # a bug must still give the SDK JSON, and leave the daemon up
        log.exception("call_crashed", api_method=method)
        outcome = Outcome.refused(500, "The license server failed on this request; see its log.")
    _log_call(request, method, outcome, time.monotonic() - started)
    headers = {"Content-Type": outcome.content_type, "X-License-Server-Source": outcome.action.value}
    if outcome.age is not None:
        headers["X-License-Server-Age"] = str(int(outcome.age))
    return web.Response(status=outcome.status, body=outcome.body, headers=headers)


async def _answer(request: web.Request, services: Services, method: str) -> Outcome:
    """Check and parse a call, then let the policy answer it."""
    config = services.config
    if request.method not in ("GET", "POST"):
        raise RequestError(405, f"HTTP {request.method} is not used by the licensing API; send POST or GET.")
    if method not in config.upstream.allowed_methods:
        raise RequestError(403, f"The API method '{method}' is not allowed through this license server.")
    limit = config.listen.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RequestError(
            413, f"The request body is larger than the {limit} bytes this license server accepts."
        )
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise RequestError(
            413, f"The request body is larger than the {limit} bytes this license server accepts."
        ) from exc
    if body and request.content_type not in (_FORM, "application/octet-stream"):
        raise RequestError(415, f"The request body must be {_FORM}, as every Cryptolens SDK sends it.")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, "The request body is not valid UTF-8.") from exc
    raw_query = request.rel_url.raw_query_string
    fields = parse_fields(text, raw_query)
    return await services.licensing.answer(
        Call.from_fields(method, fields), request.method, body, raw_query, _FORM if body else None
    )


def _log_call(request: web.Request, method: str, outcome: Outcome, elapsed: float) -> None:
    """One canonical line per call; never the token or the query string."""
    log.info(
        "call",
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
    body: dict[str, object] = {
        "status": "ok",
        "version": __version__,
        "offline": upstream is None,
        "upstream": "offline" if upstream is None else upstream.breaker.state.value,
        "stale_answers_served": services.licensing.stale_served,
        "license_files": len(services.licensing.files),
        "uptime_s": round(time.time() - services.started),
    }
    return web.json_response(body)


def create_app(config: Config, *, clock: Callable[[], float] = time.time) -> web.Application:
    """Build the workstation-facing application for a configuration (and a wall clock, for tests)."""
    app = web.Application(client_max_size=config.listen.max_body_bytes)
    app[CONFIG] = config
    app[CLOCK] = clock
    app.cleanup_ctx.append(_services_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


__all__ = ["CONFIG", "SERVICES", "Action", "Services", "create_app", "handle"]
