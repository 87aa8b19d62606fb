"""The admin console under test: served over a test daemon's services, with a browser-like client."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from license_server.admin.keys import CONSOLE
from license_server.web.keys import Services

ADMIN_TOKEN = "admin-token-3f9c1d7e5b2a48c6e0d1f7a9b3c5d2e8"  # as long and random as the console requires
UPSTREAM_TOKEN = "upstream-admin-token-8a1b2c3d"  # the fake upstream is told to accept it
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Admin:
    """A running console: its address, the daemon services it acts on, and client helpers."""

    def __init__(self, server: TestServer) -> None:
        self.server = server

    @property
    def base(self) -> str:
        """The console's origin."""
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def services(self) -> Services:
        """The daemon's services the console acts on."""
        return self.server.app[CONSOLE].services

    @property
    def bearer(self) -> dict[str, str]:
        """Headers of an API client."""
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    @asynccontextmanager
    async def browser(self, address: str | None = None) -> AsyncIterator[aiohttp.ClientSession]:
        """A client that keeps cookies as a browser does; from `address` (e.g. 127.0.0.2) when given."""
        connector = aiohttp.TCPConnector(local_addr=(address, 0) if address else None)
        async with aiohttp.ClientSession(
            self.base, connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True), auto_decompress=True
        ) as session:
            yield session

    async def login(self, session: aiohttp.ClientSession, name: str = "carol") -> str:
        """Log in with the admin token; returns the session's CSRF token."""
        async with session.post(
            "/login", data={"token": ADMIN_TOKEN, "name": name, "next": "/activate"}
        ) as r:
            assert r.status == 200, await r.text()
            return csrf_of(await r.text())

    async def api(
        self, method: str, path: str, *, json: Any = None, params: dict[str, str] | None = None
    ) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        """One API call with the bearer token: status, parsed JSON (or bytes) and headers."""
        async with (
            aiohttp.ClientSession(self.base) as session,
            session.request(method, path, json=json, params=params, headers=self.bearer) as r,
        ):
            body = await r.read()
            parsed: Any = await r.json() if r.content_type == "application/json" else body
            return r.status, parsed, r.headers

    async def settle(self) -> None:
        """Land the seat ledger's writes, the calls it sums in memory included, as the console does."""
        await self.services.licensing.seats.flush()


def write_secret(path: Path, text: str, mode: int = 0o600) -> Path:
    """Write a token file with the given mode (0600 by default), whatever the umask."""
    path.write_text(text)
    path.chmod(mode)
    return path


def csrf_of(page: str) -> str:
    """The CSRF token in a console page."""
    match = _CSRF.search(page)
    assert match is not None, page[:500]
    return match.group(1)
