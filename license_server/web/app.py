"""The aiohttp application: wires configuration, state, upstream, policy and audit trail together."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable

import structlog
from aiohttp import web

from license_server import __version__
from license_server.audit.writer import AuditLog
from license_server.config import MAX_BODY_BYTES, Config
from license_server.licensing.cache import AnswerCache
from license_server.licensing.license_files import LicenseFiles
from license_server.licensing.policy import Licensing
from license_server.licensing.signatures import load_keyring
from license_server.licensing.upstream import Breaker, Upstream, make_session
from license_server.logs import CallLine, structlog_call_line
from license_server.storage.answers import Store
from license_server.storage.seats import BootClock, LeaseClock, SeatLedger
from license_server.storage.state import StateLock, load_fingerprint_key, warn_if_open
from license_server.web.handlers import handle
from license_server.web.keys import CALL_LINE, CLOCK, CONFIG, GUARD, LEASE_CLOCK, SERVICES, Services
from license_server.web.metrics import Metrics, Snapshot

log = structlog.get_logger(__name__)

_STORE_FILE = "answers.sqlite3"
_SEATS_FILE = "seats.sqlite3"
_COMMON_PATHS = (  # as the SDKs send them: Python; Node and C++; .NET
    *("/api/key/activate", "/api/key/getkey", "/api/key/deactivate"),
    *("/api/key/Activate", "/api/key/GetKey", "/api/key/Deactivate"),
    *("/api//key/activate/", "/api//key/getkey/", "/api//key/deactivate/"),
)


async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open state, audit trail, upstream session and policy; close whatever was opened, in reverse order."""
    config = app[CONFIG]
    keyring = load_keyring(config.public_keys)
    async with contextlib.AsyncExitStack() as opened:
        folders = [config.state_dir]
        if not config.audit_dir.is_relative_to(config.state_dir):
            folders.append(config.audit_dir)
        for folder in folders:
            opened.callback((await asyncio.to_thread(StateLock, folder)).release)
            await asyncio.to_thread(warn_if_open, folder)
        opened.callback(log.info, "state_flushed", state_dir=str(config.state_dir))
        secret = await asyncio.to_thread(load_fingerprint_key, config.state_dir)
        store = Store(config.state_dir / _STORE_FILE)
        kept = await store.open()
        opened.push_async_callback(store.close)
        lease_clock = app.get(LEASE_CLOCK)
        if lease_clock is None:
            lease_clock = await asyncio.to_thread(BootClock)
        seats = SeatLedger(config.state_dir / _SEATS_FILE, lease_clock=lease_clock, clock=app[CLOCK])
        live_leases = await seats.open()
        opened.push_async_callback(seats.close)
        audit = AuditLog(config.audit_dir, config.audit, app[CLOCK])
        await audit.open(__version__)
        opened.push_async_callback(audit.close)
        files, problems = await asyncio.to_thread(LicenseFiles.load, config.license_files, keyring)
        for problem in problems:
            log.warning("license_file_skipped", path=str(problem.path), reason=problem.reason)
        if not keyring:
            log.warning(
                "no_vendor_key", detail="no public_key configured: answers are forwarded but never kept"
            )
        upstream = make_upstream(config)
        metrics = Metrics(config.upstream.allowed_methods)
        licensing = Licensing(
            upstream=upstream,
            cache=AnswerCache(store, keyring, config.keep.memory_entries),
            files=files,
            keyring=keyring,
            keep=config.keep,
            secret=secret,
            seats=seats,
            metrics=metrics,
            clock=app[CLOCK],
        )
        services = Services(config, licensing, store, upstream, audit, metrics, time.time())
        opened.push_async_callback(_close_upstreams, services)
        metrics.watch(lambda: _snapshot(services))
        app[SERVICES] = services
        log.info(
            "state_loaded",
            state_dir=str(config.state_dir),
            kept_answers=kept,
            live_leases=live_leases,
            license_files=len(files),
            vendor_keys=len(keyring),
            offline=config.upstream.offline,
            audit_dir=str(config.audit_dir),
            audit_seq=audit.state().seq,
        )
        opened.push_async_callback(services.stop_background)
        yield


def make_upstream(config: Config) -> Upstream | None:
    """The egress for a configuration: None in offline mode."""
    if config.upstream.offline:
        return None
    return Upstream(config.upstream, make_session(config.upstream), Breaker(config.upstream.breaker))


async def _close_upstreams(services: Services) -> None:
    """Close the egress session, and any a reload replaced."""
    for upstream in [*services.retired, services.upstream]:
        if upstream is not None:
            await upstream.session.close()


async def _retire(services: Services, upstream: Upstream) -> None:
    """Close a replaced egress once calls still using it have had their whole budget."""
    services.retired.append(upstream)
    await asyncio.sleep(upstream.config.timeout + 1)
    services.retired.remove(upstream)
    await upstream.session.close()


def _snapshot(services: Services) -> Snapshot:
    """What a metrics scrape reads from the running daemon."""
    seats: dict[str, int] = {}
    for (product, _), count in services.licensing.seats.in_use().items():
        seats[product] = seats.get(product, 0) + count
    return Snapshot(
        breaker=None if services.upstream is None else services.upstream.breaker.state,
        audit=services.audit.state(),
        audit_records=services.audit.records_written,
        seats_by_product=seats,
        kept_answers=services.kept_answers,
    )


async def reload(app: web.Application, config: Config) -> list[str]:
    """Apply a re-read configuration to the running daemon; returns the settings that need a restart.

    Vendor keys, license files, the method and client allowlists, upstream settings, kept-answer rules,
    limits and the log level change at once; calls in flight finish with what they started with. A
    configuration whose keys do not load raises before anything changes.
    """
    services = app[SERVICES]
    old = services.config
    keyring = load_keyring(config.public_keys)
    files, problems = await asyncio.to_thread(LicenseFiles.load, config.license_files, keyring)
    for problem in problems:
        log.warning("license_file_skipped", path=str(problem.path), reason=problem.reason)
    fixed = {
        "listen.host": (old.listen.host, config.listen.host),
        "listen.port": (old.listen.port, config.listen.port),
        "listen.tls_cert/tls_key": (old.listen.tls_cert is None, config.listen.tls_cert is None),
        "state_dir": (old.state_dir, config.state_dir),
        "audit": (old.audit, config.audit),
        "keep.memory_entries": (old.keep.memory_entries, config.keep.memory_entries),
        "log.format": (old.log.format, config.log.format),
        "shutdown_timeout": (old.shutdown_timeout, config.shutdown_timeout),
    }
    restart_needed = [name for name, (before, after) in fixed.items() if before != after]
    licensing = services.licensing
    if config.upstream != old.upstream:
        replaced = services.upstream
        services.upstream = licensing.upstream = make_upstream(config)
        if replaced is not None:
            services.spawn(_retire(services, replaced))
    licensing.keyring = licensing.cache.keyring = keyring
    licensing.files = files
    licensing.keep = dataclasses.replace(config.keep, memory_entries=old.keep.memory_entries)
    services.metrics.allow_methods(config.upstream.allowed_methods)
    logging.getLogger().setLevel(config.log.level.upper())
    services.config = dataclasses.replace(
        config,
        listen=dataclasses.replace(config.listen, host=old.listen.host, port=old.listen.port),
        state_dir=old.state_dir,
        audit=old.audit,
        keep=licensing.keep,
        log=dataclasses.replace(config.log, format=old.log.format),
        shutdown_timeout=old.shutdown_timeout,
    )
    return restart_needed


def create_app(
    config: Config,
    *,
    clock: Callable[[], float] = time.time,
    lease_clock: LeaseClock | None = None,
    call_line: CallLine = structlog_call_line,
) -> web.Application:
    """Build the workstation-facing application (tests pass their own wall and lease clocks)."""
    # The body limit is enforced per call from the configuration in force, which a reload may raise.
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[CONFIG] = config
    app[CLOCK] = clock
    app[CALL_LINE] = call_line
    if lease_clock is not None:
        app[LEASE_CLOCK] = lease_clock
    app.cleanup_ctx.append(_services_ctx)
    # The SDKs' own spellings of the busiest calls resolve by one exact lookup, not the pattern below.
    for path in _COMMON_PATHS:
        app.router.add_route("*", path, handle)
    # [\s\S] rather than ".": a path with an encoded newline must reach the handler too, to get JSON.
    app.router.add_route("*", r"/{tail:[\s\S]*}", handle)
    return app


__all__ = ["CLOCK", "CONFIG", "GUARD", "SERVICES", "Services", "create_app", "reload"]
