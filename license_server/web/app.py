"""The aiohttp application: wires configuration, state, upstream, policy and audit trail together."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from license_server import __version__
from license_server.audit.writer import AuditLog
from license_server.config import MAX_BODY_BYTES, Config, hold_restart_only
from license_server.licensing.cache import AnswerCache
from license_server.licensing.license_files import LicenseFiles
from license_server.licensing.policy import Licensing, Rules
from license_server.licensing.runway import PacedReader, RunwayWatch
from license_server.licensing.signatures import KeyRing, load_keyring
from license_server.licensing.upstream import Breaker, BreakerState, Upstream, make_session
from license_server.logs import CallLine, structlog_call_line
from license_server.reports import runway
from license_server.reports.runway import Ends
from license_server.storage.backend import answer_reader, open_stores
from license_server.storage.seats import BootClock, LeaseClock
from license_server.storage.state import StateLock, warn_if_open
from license_server.web.handlers import handle
from license_server.web.keys import CALL_LINE, CLOCK, CONFIG, GUARD, LEASE_CLOCK, SERVICES, Services
from license_server.web.listener import tls_context
from license_server.web.metrics import Metrics, Snapshot

if TYPE_CHECKING:
    from license_server.audit.shipping import Shipper
    from license_server.storage.postgres import Database

log = structlog.get_logger(__name__)

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
        injected = app.get(LEASE_CLOCK)

        def lease_clock() -> LeaseClock:
            """The clock of the SQLite ledger's leases (blocking: reads /proc)."""
            return injected if injected is not None else BootClock()

        stores = await open_stores(config, opened, clock=app[CLOCK], lease_clock=lease_clock)
        audit = AuditLog(config.audit_dir, config.audit, app[CLOCK])
        await audit.open(__version__)
        shipper = None
        if stores.database is not None:  # closed after the trail: the stop record is shipped too
            shipper = _ship_audit(config, stores.database, audit)
            opened.push_async_callback(shipper.close)
        opened.push_async_callback(audit.close)
        files = await _license_files(config, keyring)
        if not keyring:
            log.warning(
                "no_vendor_key", detail="no public_key configured: answers are forwarded but never kept"
            )
        metrics = Metrics(config.upstream.allowed_methods, node=config.node.name)
        licensing = Licensing(
            rules=Rules(make_upstream(config), keyring, files, config.keep),
            cache=AnswerCache(stores.answers, keyring, config.keep.memory_entries),
            secret=stores.fingerprint_key,
            seats=stores.seats,
            clock=app[CLOCK],
        )
        services = Services(
            config,
            licensing,
            stores.answers,
            audit,
            metrics,
            time.time(),
            database=stores.database,
            heartbeat=stores.heartbeat,
            spool=stores.spool,
            shipper=shipper,
        )
        opened.push_async_callback(services.close_upstreams)
        services.runway = _watch_runway(services, app[CLOCK])
        opened.push_async_callback(services.runway.close)
        metrics.watch(lambda: _snapshot(services))
        app[SERVICES] = services
        log.info(
            "state_loaded",
            state_dir=str(config.state_dir),
            kept_answers=stores.kept,
            live_leases=stores.live_leases,
            database=None if stores.database is None else stores.database.info.shown,
            node=config.node.name,
            license_files=len(files),
            vendor_keys=len(keyring),
            offline=config.upstream.offline,
            audit_dir=str(config.audit_dir),
            audit_seq=audit.state().seq,
        )
        opened.push_async_callback(services.background.stop)
        yield


def _ship_audit(config: Config, database: Database, audit: AuditLog) -> Shipper:
    """Start copying this node's audit records into the shared trail, prompted by each written batch."""
    # Imported here: a single node never loads the PostgreSQL stores.
    from license_server.audit.shipping import Shipper
    from license_server.storage.pg_audit import PgAuditStore

    durable_only = config.audit.fsync is not None  # with fsync never, nothing is known durable: ship all
    shipper = Shipper(
        config.audit_dir, config.node.name, PgAuditStore(database.info), durable_only=durable_only
    )
    audit.on_written = shipper.notify
    shipper.start()
    return shipper


def _watch_runway(services: Services, clock: Callable[[], float]) -> RunwayWatch:
    """Start computing every machine's runway now and then, from this daemon's stores and files."""
    answers = PacedReader(answer_reader(services.config))

    def compute(now: float) -> Ends:
        """When each machine's runway ends (blocking)."""
        licensing = services.licensing
        return runway.collect_ends(answers, licensing.seats.reader, licensing.files, services.config, now)

    def outage() -> bool:
        """Whether workstations are answered without upstream now: offline mode or an open breaker."""
        upstream = services.upstream
        return upstream is None or upstream.breaker.state is BreakerState.OPEN

    watch = RunwayWatch(compute, config=lambda: services.config, outage=outage, clock=clock)
    watch.start()
    return watch


def make_upstream(config: Config) -> Upstream | None:
    """The egress for a configuration: None in offline mode."""
    if config.upstream.offline:
        return None
    return Upstream(config.upstream, make_session(config.upstream), Breaker(config.upstream.breaker))


async def _license_files(config: Config, keyring: KeyRing) -> LicenseFiles:
    """The configured license files, each one that cannot be served logged and skipped."""
    files, problems = await asyncio.to_thread(LicenseFiles.load, config.license_files, keyring)
    for problem in problems:
        log.warning("license_file_skipped", path=str(problem.path), reason=problem.reason)
    return files


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
        database_up=None if services.heartbeat is None else services.heartbeat.up,
        live_nodes=None if services.heartbeat is None else len(services.heartbeat.peers),
        database_backlog=services.database_backlog(),
        runway=None if services.runway is None else services.runway.latest,
    )


@dataclass(frozen=True, slots=True)
class Reloaded:
    """A re-read configuration and what was built from it, not in force yet."""

    config: Config  # as it will be in force: the RESTART_ONLY settings as they are now
    rules: Rules
    tls: ssl.SSLContext | None  # the workstation listener's context with the certificate read again
    restart_needed: list[str]  # the RESTART_ONLY settings the file changed


async def prepare_reload(services: Services, config: Config) -> Reloaded:
    """Build what a re-read configuration changes, changing nothing; raises if its keys or certificate fail.

    Vendor keys, license files, the method and client allowlists, upstream settings (a new egress only when
    they changed), kept-answer rules, limits, the TLS certificate and the log level can change; the
    RESTART_ONLY settings stay as they are.
    """
    config, restart_needed = hold_restart_only(services.config, config)
    keyring = load_keyring(config.public_keys)
    listen = config.listen
    tls = None
    if listen.tls_cert is not None and listen.tls_key is not None:  # on only when the daemon started so
        tls = await asyncio.to_thread(tls_context, listen.tls_cert, listen.tls_key)
    files = await _license_files(config, keyring)
    # Last: nothing after it can fail and leave a new egress unclosed.
    upstream = services.upstream if config.upstream == services.config.upstream else make_upstream(config)
    return Reloaded(config, Rules(upstream, keyring, files, config.keep), tls, restart_needed)


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


__all__ = ["CLOCK", "CONFIG", "GUARD", "SERVICES", "Reloaded", "Services", "create_app", "prepare_reload"]
