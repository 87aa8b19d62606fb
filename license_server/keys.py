"""Typed application keys and the running daemon's services, shared by the app factory and handlers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from license_server.audit.writer import AuditLog
from license_server.config import Config
from license_server.proxy import Licensing
from license_server.seats import LeaseClock
from license_server.store import Store
from license_server.upstream import Upstream


@dataclass(slots=True)
class Services:
    """Everything a running daemon holds, made at start-up and closed at shut-down."""

    config: Config
    licensing: Licensing
    store: Store
    upstream: Upstream | None
    audit: AuditLog
    kept_at_start: int
    started: float


CONFIG = web.AppKey("config", Config)
SERVICES = web.AppKey("services", Services)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
LEASE_CLOCK: web.AppKey[LeaseClock] = web.AppKey("lease_clock")
