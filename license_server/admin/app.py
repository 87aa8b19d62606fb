"""The console's aiohttp application and its listener, started beside the workstation one."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog
from aiohttp import web

from license_server.admin import api, auth, pages
from license_server.admin.actions import Console
from license_server.admin.credentials import CredentialError, Credentials, Secret, load_credentials
from license_server.admin.keys import (
    ADMIN_TOKEN,
    ASSETS,
    CHART_LOCK,
    CONSOLE,
    FAILURE_RECORDS,
    NOW,
    SESSIONS,
    SETTINGS,
    THROTTLE,
    VERIFIER,
    Assets,
)
from license_server.admin.sessions import MAX_SESSIONS, MemorySessions, SharedSessions
from license_server.admin.throttle import RecordBudget, Throttle
from license_server.admin.trail import Verifier
from license_server.config import AdminConfig, is_loopback
from license_server.storage.pg_sessions import PgSessionTable
from license_server.web.handlers import readiness, status_document
from license_server.web.keys import Services
from license_server.web.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 64 * 1024


def create_admin_app(
    services: Services,
    settings: AdminConfig,
    admin_token: Secret,
    upstream_token: Secret | None,
    assets: Assets,
    *,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The console over a running daemon's services (tests pass their own clock)."""
    app = web.Application(middlewares=[auth.guard], client_max_size=MAX_BODY_BYTES)
    app[CONSOLE] = Console(services, upstream_token)
    app[SETTINGS] = settings
    app[ADMIN_TOKEN] = admin_token
    app[ASSETS] = assets
    database = services.database
    app[SESSIONS] = (
        MemorySessions(settings.session_lifetime, clock)
        if database is None
        else SharedSessions(PgSessionTable(database, MAX_SESSIONS), settings.session_lifetime)
    )
    app[VERIFIER] = Verifier(services.config.audit_dir, clock, services.config.database)
    app[CHART_LOCK] = asyncio.Lock()
    app[THROTTLE] = Throttle(clock)
    app[FAILURE_RECORDS] = RecordBudget(clock)
    app[NOW] = clock
    add = app.router.add_route
    add("GET", "/login", auth.login_form, name="login_form")
    add("POST", "/login", auth.login, name="login")
    add("POST", "/logout", auth.logout, name="logout")
    add("GET", "/static/console.css", _stylesheet, name="stylesheet")
    for path in ("/healthz", "/readyz", "/status", "/metrics"):
        add("GET", path, _monitoring, name=path.strip("/"))
    add("GET", "/", pages.status, name="status_page")
    add("GET", "/licenses", pages.licenses, name="licenses_page")
    add("GET", "/licenses/chart.svg", pages.chart, name="chart")
    add("GET", "/machines", pages.machines, name="machines_page")
    add("GET", "/machines/deactivate", pages.confirm_deactivate, name="confirm_deactivate")
    add("POST", "/machines/deactivate", pages.deactivate, name="deactivate_page")
    add("GET", "/machines/license-file", pages.kept_file, name="license_file_page")
    add("GET", "/activate", pages.activate_form, name="activate_form")
    add("POST", "/activate", pages.activate, name="activate_page")
    add("GET", "/audit", pages.audit, name="audit_page")
    add("GET", "/api/openapi.json", api.openapi, name="openapi")
    add("GET", "/api/v1/status", api.status, name="api_status")
    add("GET", "/api/v1/licenses", api.licenses, name="api_licenses")
    add("GET", "/api/v1/machines", api.machines, name="api_machines")
    add("POST", "/api/v1/machines/deactivate", api.deactivate, name="api_deactivate")
    add("POST", "/api/v1/activations", api.activate, name="api_activate")
    add("GET", "/api/v1/license-file", api.license_file, name="api_license_file")
    add("GET", "/api/v1/audit", api.audit, name="api_audit")
    add("GET", "/api/v1/audit/verification", api.verification, name="api_verification")
    return app


async def _stylesheet(request: web.Request) -> web.Response:
    """The console's one stylesheet, served from memory."""
    return web.Response(body=request.app[ASSETS].stylesheet, content_type="text/css", charset="utf-8")


async def _monitoring(request: web.Request) -> web.Response:
    """/healthz, /readyz, /status and /metrics, as the workstation port serves them."""
    services = request.app[CONSOLE].services
    path = request.path
    if path == "/healthz":
        return web.json_response({"status": "alive"})
    if path == "/readyz":
        return readiness(services)
    if path == "/metrics":
        return web.Response(body=services.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})
    return web.json_response(status_document(services))


@dataclass(slots=True)
class AdminServer:
    """The console's runner and site while it runs."""

    runner: web.AppRunner
    site: web.TCPSite
    bound: list[tuple[str, int]]  # (host, port) it listens on: the real port when 0 was asked for

    async def stop(self) -> None:
        """Stop accepting and close the console's connections."""
        await self.runner.cleanup()


async def start_admin(
    services: Services, settings: AdminConfig, *, shutdown_timeout: float, env: Mapping[str, str] = os.environ
) -> AdminServer | None:
    """Start the console's listener, or log why it does not run; the workstation side runs either way."""
    try:
        credentials: Credentials = await asyncio.to_thread(load_credentials, settings, env)
    except CredentialError as exc:
        log.error("admin_console_not_started", reason=str(exc))  # noqa: TRY400 - the file is named
        return None
    if credentials.admin is None:
        log.info(
            "admin_console_not_started",
            reason="no admin token configured (admin.token_file, or the systemd credential admin-token)",
        )
        return None
    if credentials.upstream is None:
        log.warning(
            "admin_console_read_only",
            reason="no upstream token (admin.upstream_token_file, or the systemd credential upstream-token):"
            " the console cannot deactivate or activate",
        )
    assets = await asyncio.to_thread(Assets.load)
    app = create_admin_app(services, settings, credentials.admin, credentials.upstream, assets)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, settings.listen.host, settings.listen.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        log.error(  # noqa: TRY400 - the address and the error say it all
            "admin_console_not_started",
            reason=f"cannot listen on {settings.listen.host}:{settings.listen.port}: {exc.strerror or exc}",
        )
        return None
    if not is_loopback(settings.listen.host):
        log.warning(
            "admin_console_on_network",
            detail="the admin token crosses the network in clear: put a TLS reverse proxy in front",
        )
    bound = [(str(address[0]), int(address[1])) for address in runner.addresses]
    for host, port in bound:
        log.info(
            "admin_listening",
            address=f"http://{host}:{port}/",
            token=credentials.admin_source,
            upstream_token=credentials.upstream_source,
        )
    return AdminServer(runner, site, bound)
