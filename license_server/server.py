"""Running the daemon: runner and site, signals, systemd notifications, graceful stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import structlog
from aiohttp import web

from license_server.app import SERVICES, create_app, load_keyring
from license_server.config import Config, describe
from license_server.license_files import LicenseFiles

log = structlog.get_logger(__name__)


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


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT; then stop accepting, finish calls in flight, flush state."""
    log.info("starting", **describe(config))
    app = create_app(config)
    # access_log=None: aiohttp's access log prints query strings, which may carry a token.
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=config.shutdown_timeout, handle_signals=False
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = asyncio.create_task(_reload(app))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        site = web.TCPSite(runner, config.listen.host, config.listen.port, reuse_address=True)
        await site.start()
        for address in runner.addresses:
            log.info("listening", address=f"http://{address[0]}:{address[1]}/api/")
        services = app[SERVICES]
        notify(f"READY=1\nSTATUS=serving, {services.kept_at_start} kept answers")
        await stop.wait()
        log.info("stopping", detail="no new connections; finishing calls in flight")
        notify("STOPPING=1")
    finally:
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")


async def _reload(app: web.Application) -> None:
    """SIGHUP: re-read the offline license files (configuration reload is not supported yet)."""
    services = app.get(SERVICES)
    if services is None:
        return
    config = services.config
    files, problems = await asyncio.to_thread(LicenseFiles.load, config.license_files, load_keyring(config))
    for problem in problems:
        log.warning("license_file_skipped", path=str(problem.path), reason=problem.reason)
    services.licensing.files = files
    log.info("license_files_reloaded", license_files=len(files))
