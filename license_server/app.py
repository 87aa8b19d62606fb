"""The aiohttp application: wires configuration, state, upstream, policy and audit trail together."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import structlog
from aiohttp import web

from license_server import __version__
from license_server.audit.writer import AuditLog
from license_server.cache import AnswerCache
from license_server.config import Config
from license_server.handlers import handle
from license_server.keys import CLOCK, CONFIG, LEASE_CLOCK, SERVICES, Services
from license_server.license_files import LicenseFiles
from license_server.proxy import Licensing
from license_server.seats import BootClock, LeaseClock, SeatLedger
from license_server.signatures import KeyRing, load_public_key
from license_server.state import StateLock, load_fingerprint_key
from license_server.store import Store
from license_server.upstream import Breaker, Upstream, make_session

log = structlog.get_logger(__name__)

_STORE_FILE = "answers.sqlite3"
_SEATS_FILE = "seats.sqlite3"


def load_keyring(config: Config) -> KeyRing:
    """Parse the configured vendor public keys."""
    return KeyRing([load_public_key(text) for text in config.public_keys])


async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open state, audit trail, upstream session and policy; close whatever was opened, in reverse order."""
    config = app[CONFIG]
    keyring = load_keyring(config)
    async with contextlib.AsyncExitStack() as opened:
        folders = [config.state_dir]
        if not config.audit_dir.is_relative_to(config.state_dir):
            folders.append(config.audit_dir)
        for folder in folders:
            opened.callback((await asyncio.to_thread(StateLock, folder)).release)
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
        upstream = None
        if not config.upstream.offline:
            session = make_session(config.upstream)
            opened.push_async_callback(session.close)
            upstream = Upstream(config.upstream, session, Breaker(config.upstream.breaker))
        licensing = Licensing(
            upstream=upstream,
            cache=AnswerCache(store, keyring, config.keep.memory_entries),
            files=files,
            keyring=keyring,
            keep=config.keep,
            secret=secret,
            seats=seats,
            clock=app[CLOCK],
        )
        app[SERVICES] = Services(config, licensing, store, upstream, audit, kept, time.time())
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
        yield


def create_app(
    config: Config, *, clock: Callable[[], float] = time.time, lease_clock: LeaseClock | None = None
) -> web.Application:
    """Build the workstation-facing application (tests pass their own wall and lease clocks)."""
    app = web.Application(client_max_size=config.listen.max_body_bytes)
    app[CONFIG] = config
    app[CLOCK] = clock
    if lease_clock is not None:
        app[LEASE_CLOCK] = lease_clock
    app.cleanup_ctx.append(_services_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


__all__ = ["CLOCK", "CONFIG", "SERVICES", "Services", "create_app", "load_keyring"]
