"""Running the daemon: runner and site, signals, reloads, and what systemd is told (READY, STATUS, ...)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
from collections.abc import Callable

import structlog
from aiohttp import web

from license_server.admin.app import AdminServer, start_admin
from license_server.background import Background
from license_server.config import Config, ConfigError, describe
from license_server.licensing.signatures import KeyFormatError
from license_server.logs import CallLine, set_level, structlog_call_line
from license_server.web.app import GUARD, SERVICES, Reloaded, create_app, prepare_reload
from license_server.web.keys import Services
from license_server.web.listener import ConnectionGuard, GuardedSite, ServerTls, tls_context

log = structlog.get_logger(__name__)

_STATUS_EVERY = 10.0  # seconds between STATUS updates when no watchdog asks for more
_GC_FIRST_GENERATION = 10_000  # allocations before a young collection; CPython starts at 700


def notify(message: str) -> None:
    """Tell systemd about our state (READY=1, STATUS=..., STOPPING=1) when it asked us to."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.warning("systemd_notify_failed", error=str(exc))


def _watchdog_interval() -> float | None:
    """Half the watchdog period systemd set for this process, or None when there is no watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1_000_000 / 2
    except ValueError:
        return None


def status_line(app: web.Application) -> str:
    """One line for `systemctl status`: upstream state, kept answers, seats, audit."""
    services = app[SERVICES]
    upstream = (
        "offline mode" if services.upstream is None else f"upstream {services.upstream.breaker.state.value}"
    )
    audit = "audit ok" if services.audit.writable else "AUDIT FAILING"
    seats = sum(services.licensing.seats.in_use().values())
    return f"{upstream}, {services.kept_answers} kept answers, {seats} floating seats in use, {audit}"


async def _heartbeat(app: web.Application) -> None:
    """Keep systemd's STATUS current and feed its watchdog while the event loop is responsive."""
    watchdog = _watchdog_interval()
    every = min(_STATUS_EVERY, watchdog) if watchdog else _STATUS_EVERY
    while True:
        await asyncio.sleep(every)
        notify(f"STATUS={status_line(app)}" + ("\nWATCHDOG=1" if watchdog else ""))


async def serve(
    config: Config, *, load: Callable[[], Config] | None = None, call_line: CallLine = structlog_call_line
) -> None:
    """Run until SIGTERM or SIGINT; then stop accepting, finish calls in flight, flush state.

    `load` re-reads the configuration on SIGHUP; `call_line` writes the one log line per call.
    """
    log.info("starting", **describe(config))
    app = create_app(config, call_line=call_line)
    # access_log=None: aiohttp's access log prints query strings, which may carry a token.
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=config.shutdown_timeout,
        handle_signals=False,
        keepalive_timeout=config.listen.keepalive_timeout,
    )
    await runner.setup()
    assert runner.server is not None
    guard = ConnectionGuard(runner.server, config.listen.max_connections, config.listen.header_timeout)
    app[GUARD] = guard
    tls = None
    if config.listen.tls_cert is not None and config.listen.tls_key is not None:
        tls = ServerTls(await asyncio.to_thread(tls_context, config.listen.tls_cert, config.listen.tls_key))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    background = Background()

    def on_hup() -> None:
        if load is not None:
            background.spawn(_reload(app, load, tls))

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    admin: AdminServer | None = None
    try:
        site = GuardedSite(
            runner,
            config.listen.host,
            config.listen.port,
            guard,
            ssl_context=None if tls is None else tls.context,
        )
        await site.start()
        scheme = "https" if tls else "http"
        for host, port in site.bound:
            log.info("listening", address=f"{scheme}://{host}:{port}/api/")
        admin = await start_admin(app[SERVICES], config.admin, shutdown_timeout=config.shutdown_timeout)
        _tune_gc()
        notify(f"READY=1\nSTATUS={status_line(app)}")
        background.spawn(_heartbeat(app))
        await stop.wait()
        notify("STOPPING=1")
        await _drain(app[SERVICES], stop)
        log.info("stopping", detail="no new connections; finishing calls in flight")
    finally:
        await background.stop()
        if admin is not None:  # first: admin actions use the services the workstation side closes
            await admin.stop()
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")


async def _drain(services: Services, stop: asyncio.Event) -> None:
    """Answer /readyz with 503 while still answering calls, for `shutdown_drain` seconds or a second signal.

    The balancer's health checks see the 503 and send no new calls here before the listener closes.
    """
    seconds = services.config.shutdown_drain
    if seconds <= 0:
        return
    services.draining = True
    log.info("draining", seconds=seconds, detail="/readyz answers 503; calls are still answered")
    stop.clear()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


def _tune_gc() -> None:
    """Keep garbage collection off the hot path once started.

    What start-up made lives as long as the process: frozen, full collections no longer walk it. Most
    per-call objects die by reference counting, so a larger first generation collects far less often
    while walking about as much.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_FIRST_GENERATION, 20, 20)


async def _reload(app: web.Application, load: Callable[[], Config], tls: ServerTls | None) -> None:
    """SIGHUP: read the configuration again, build what it changes, then put all of it in force at once.

    A configuration that does not load (the file, a vendor key, the certificate) is refused, and the one in
    force stays as it was.
    """
    notify("RELOADING=1")
    try:
        try:
            reloaded = await prepare_reload(app[SERVICES], await asyncio.to_thread(load))
        except (ConfigError, KeyFormatError, OSError) as exc:
            log.error("reload_refused", error=str(exc), detail="the configuration in force is unchanged")  # noqa: TRY400
            return
        _put_in_force(app, reloaded, tls)
        log.info("reloaded", restart_needed_for=reloaded.restart_needed or None)
    finally:
        notify(f"READY=1\nSTATUS={status_line(app)}")


def _put_in_force(app: web.Application, reloaded: Reloaded, tls: ServerTls | None) -> None:
    """The one place a reload changes the running daemon: its services, connection limits, TLS, log level."""
    app[SERVICES].swap(reloaded.config, reloaded.rules)
    listen = reloaded.config.listen
    guard = app[GUARD]
    guard.max_connections, guard.header_timeout = listen.max_connections, listen.header_timeout
    if tls is not None and reloaded.tls is not None:
        tls.use(reloaded.tls)
    set_level(reloaded.config.log.level)
