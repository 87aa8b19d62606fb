"""Typed keys of the console application and its requests, and what they hold."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from license_server.admin.actions import Console
from license_server.admin.credentials import Secret
from license_server.admin.html import Templates, asset
from license_server.admin.sessions import Session, Sessions
from license_server.admin.throttle import RecordBudget, Throttle
from license_server.admin.trail import Verifier
from license_server.config import AdminConfig


@dataclass(frozen=True, slots=True)
class Assets:
    """Templates, stylesheet and OpenAPI document, read once at start."""

    templates: Templates
    stylesheet: bytes = field(repr=False)
    openapi: bytes = field(repr=False)

    @classmethod
    def load(cls) -> Assets:
        """Read them from the package (file reads: call it off the event loop)."""
        return cls(Templates.load(), asset("static/console.css"), asset("openapi.json"))


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: a name (given at login, or the configured label), an address, a session or the API."""

    who: str
    client: str
    session: Session | None

    @property
    def ref(self) -> str:
        """The session's short name in the audit trail, or "api" for a bearer token."""
        return "api" if self.session is None else self.session.ref

    def fields(self) -> dict[str, str]:
        """The audit record's actor fields: "who@address#session", and address and session alone."""
        return {"actor": f"{self.who}@{self.client}#{self.ref}", "client": self.client, "session": self.ref}


ASSETS = web.AppKey("admin_assets", Assets)
CONSOLE = web.AppKey("admin_console", Console)
SESSIONS: web.AppKey[Sessions] = web.AppKey("admin_sessions")  # a Protocol: no class to name here
VERIFIER = web.AppKey("admin_verifier", Verifier)
SETTINGS = web.AppKey("admin_settings", AdminConfig)
ADMIN_TOKEN = web.AppKey("admin_token", Secret)
CHART_LOCK = web.AppKey("admin_chart_lock", asyncio.Lock)
THROTTLE = web.AppKey("admin_throttle", Throttle)
FAILURE_RECORDS = web.AppKey("admin_failure_records", RecordBudget)
NOW: web.AppKey[Callable[[], float]] = web.AppKey("admin_clock")
PRINCIPAL = web.RequestKey("admin_principal", Principal)
