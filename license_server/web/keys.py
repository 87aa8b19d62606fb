"""Typed application keys and the running daemon's services, shared by the app factory and handlers."""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from license_server.audit.writer import AuditLog
from license_server.config import Config
from license_server.licensing.policy import Licensing
from license_server.licensing.upstream import Upstream
from license_server.logs import CallLine
from license_server.storage.answers import Store
from license_server.storage.seats import LeaseClock
from license_server.web.listener import ConnectionGuard
from license_server.web.metrics import Metrics


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

    config: Config
    licensing: Licensing
    store: Store
    upstream: Upstream | None
    audit: AuditLog
    metrics: Metrics
    started: float
    request_ids: RequestIds = field(default_factory=RequestIds)
    retired: list[Upstream] = field(default_factory=list)  # replaced by a reload, closing once idle
    background: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def kept_answers(self) -> int:
        """How many answers are kept for outages, exact at every moment (the store counts as it writes)."""
        return self.store.kept

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run background work that lives as long as the daemon (a reference is kept until it ends)."""
        task = asyncio.ensure_future(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def stop_background(self) -> None:
        """Cancel the background work and wait for it to end."""
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)


CONFIG = web.AppKey("config", Config)
SERVICES = web.AppKey("services", Services)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
LEASE_CLOCK: web.AppKey[LeaseClock] = web.AppKey("lease_clock")
GUARD = web.AppKey("guard", ConnectionGuard)
CALL_LINE: web.AppKey[CallLine] = web.AppKey("call_line")
