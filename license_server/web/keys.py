"""Typed application keys and the running daemon's services, shared by the app factory and handlers."""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from license_server.audit.writer import AuditLog
from license_server.background import Background
from license_server.config import Config
from license_server.licensing.policy import Licensing, Rules
from license_server.licensing.upstream import Upstream
from license_server.logs import CallLine
from license_server.storage.interfaces import AnswerStore
from license_server.storage.postgres import Database
from license_server.storage.seats import LeaseClock
from license_server.web.listener import ConnectionGuard
from license_server.web.metrics import Metrics

if TYPE_CHECKING:
    from license_server.audit.shipping import Shipper
    from license_server.licensing.runway import RunwayWatch
    from license_server.storage.pg_nodes import Heartbeat
    from license_server.storage.spool import Spool


class RequestIds:
    """Request ids unique across restarts: a random prefix per daemon run, then a counter."""

    __slots__ = ("_next", "_prefix")

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._next = itertools.count(1).__next__

    def __call__(self) -> str:
        """A new request id."""
        return f"{self._prefix}{self._next():08x}"


@dataclass(slots=True)
class Services:
    """Everything a running daemon holds, made at start-up and closed at shut-down."""

    config: Config  # in force: a reload replaces it, through `swap` only
    licensing: Licensing
    store: AnswerStore
    audit: AuditLog
    metrics: Metrics
    started: float
    request_ids: RequestIds = field(default_factory=RequestIds)
    retired: list[Upstream] = field(default_factory=list)  # replaced by a reload, closing once idle
    background: Background = field(default_factory=Background)  # work that lives as long as the daemon
    database: Database | None = None  # the shared database of several nodes; None: SQLite in state_dir
    heartbeat: Heartbeat | None = None  # with a database: this node's view of it and of its peers
    spool: Spool | None = None  # with a database: writes waiting on this node's disk for it
    shipper: Shipper | None = None  # with a database: copies this node's audit records into it
    runway: RunwayWatch | None = None  # every machine's runway, counted now and then
    draining: bool = False  # stopping after SIGTERM: /readyz answers 503 while calls are still answered

    @property
    def upstream(self) -> Upstream | None:
        """The egress in force; None in offline mode."""
        return self.licensing.upstream

    def database_backlog(self) -> tuple[int, int] | None:
        """What waits here for the shared database: (spooled writes, audit records); None without one."""
        if self.spool is None or self.shipper is None:
            return None
        return self.spool.backlog, max(0, self.audit.state().seq - self.shipper.shipped_seq)

    @property
    def kept_answers(self) -> int:
        """How many answers are kept for outages, exact at every moment (the store counts as it writes)."""
        return self.store.kept

    def swap(self, config: Config, rules: Rules) -> None:
        """Put a reloaded configuration and the rules built from it in force for calls that start after.

        A replaced egress is closed once calls still using it are over.
        """
        replaced = self.licensing.upstream
        self.config = config
        self.licensing.rules = rules
        self.metrics.allow_methods(config.upstream.allowed_methods)
        if replaced is not None and replaced is not rules.upstream:
            self.background.spawn(self._retire(replaced))

    async def _retire(self, upstream: Upstream) -> None:
        """Close a replaced egress once calls still using it have had their whole budget."""
        self.retired.append(upstream)
        await asyncio.sleep(upstream.config.timeout + 1)
        self.retired.remove(upstream)
        await upstream.session.close()

    async def close_upstreams(self) -> None:
        """Close the egress session in force, and any a reload replaced."""
        for upstream in [*self.retired, self.upstream]:
            if upstream is not None:
                await upstream.session.close()


CONFIG = web.AppKey("config", Config)
SERVICES = web.AppKey("services", Services)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
LEASE_CLOCK: web.AppKey[LeaseClock] = web.AppKey("lease_clock")
GUARD = web.AppKey("guard", ConnectionGuard)
CALL_LINE: web.AppKey[CallLine] = web.AppKey("call_line")
