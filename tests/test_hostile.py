"""Hostile input on the workstation port: no open proxy, no path tricks, the C HTTP parser in charge."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import ClassVar

import pytest
from aiohttp import http_parser

from license_server.web.listener import ConnectionGuard, GuardedSite
from tests.admin_support import Admin
from tests.conftest import Daemon, Upstream, send_form
from tests.test_proxy import activate_form

FORM = "&".join(f"{k}={v}" for k, v in activate_form().items())
FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes to a port; status, headers and body of the first answer (0 if it just closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        except asyncio.IncompleteReadError:
            return 0, {}, b""
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
        if headers.get("connection", "").lower() == "close":
            assert await asyncio.wait_for(reader.read(), 5) == b"", "the answer must close the connection"
        return int(lines[0].split(" ", 2)[1]), headers, body
    finally:
        writer.close()


async def raw(daemon: Daemon, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes to the daemon; the status code and body of its first answer (0 if it just closed)."""
    assert daemon.server is not None
    status, _, body = await exchange(daemon.server.port, request)
    return status, body


async def raw_get(port: int, target: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET a raw request target, exactly as written (no client-side normalising); status and body."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}Connection: close\r\n\r\n".encode()
    status, _, body = await exchange(port, request)
    return status, body


async def serve_guarded(daemon: Daemon) -> int:
    """Also serve the daemon's app through the production listener (ConnectionGuard); returns its port."""
    assert daemon.server is not None
    assert daemon.server.runner is not None
    runner = daemon.server.runner
    assert runner.server is not None
    site = GuardedSite(runner, "127.0.0.1", 0, ConnectionGuard(runner.server, 100, 30.0), ssl_context=None)
    await site.start()  # registered with the runner, which stops it with the daemon
    return site.bound[0][1]


@pytest.fixture
async def listener(daemon: Daemon) -> int:
    """The port of the daemon behind the listener `license-server serve` uses."""
    return await serve_guarded(daemon)


def post_request(target: str, host: str = "127.0.0.1", body: str = FORM) -> bytes:
    """A complete POST request with a form body, closing the connection after it."""
    return (
        f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
    ).encode()


class TestParser:
    """The C HTTP parser handles requests: the pure-Python one had several request-smuggling CVEs."""

    def test_c_parser_in_use(self) -> None:
        """aiohttp's request parser is the compiled one, and nothing turned the extensions off."""
        assert os.environ.get("AIOHTTP_NO_EXTENSIONS", "") == ""
        assert http_parser.HttpRequestParser is http_parser.HttpRequestParserC  # type: ignore[attr-defined]

    @pytest.mark.parametrize(
        "request_bytes",
        [
            # Content-Length and Transfer-Encoding together
            b"POST /api/key/activate HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            # two different Content-Lengths
            b"POST /api/key/activate HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Content-Length: 5\r\n\r\nabcde",
            # chunked not last
            b"POST /api/key/activate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n"
            b"\r\n0\r\n\r\n",
            # obsolete line folding
            b"POST /api/key/activate HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n",
            # a NUL in a header
            b"POST /api/key/activate HTTP/1.1\r\nHost: x\x00y\r\nContent-Length: 0\r\n\r\n",
            # bare LF line endings
            b"POST /api/key/activate HTTP/1.1\nHost: x\nContent-Length: 0\n\n",
            b"POST /api/key/activate HTTP/1.1\r\nHost: x\nContent-Length: 0\r\n\r\n",
            # a pipelined pair whose first request frames ambiguously: the second must never be read
            b"POST /api/key/activate HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            b"POST /api/key/activate HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 3\r\n\r\na=1",
        ],
    )
    async def test_smuggling_refused(self, listener: int, upstream: Upstream, request_bytes: bytes) -> None:
        """Ambiguous framing gets a JSON 400 that closes the connection, and never reaches upstream."""
        status, headers, body = await exchange(listener, request_bytes)
        assert status == 400
        assert headers["content-type"].startswith("application/json")
        assert headers["connection"].lower() == "close"
        assert json.loads(body)["result"] == 1
        assert upstream.fake.calls == []


class TestNoOpenProxy:
    """Whatever the request names, the only peer ever contacted is the configured upstream."""

    async def test_absolute_form_target(self, daemon: Daemon, upstream: Upstream) -> None:
        """`POST http://evil.example/api/...` is answered as a call to the configured upstream."""
        status, body = await raw(
            daemon, post_request("http://evil.example/api/key/activate", host="evil.example")
        )
        assert status == 200
        assert json.loads(body)["result"] == 0
        assert len(upstream.fake.calls) == 1
        assert upstream.fake.calls[0].headers["Host"].startswith("127.0.0.1")

    async def test_connect_refused(self, daemon: Daemon, upstream: Upstream) -> None:
        """CONNECT never opens a tunnel."""
        status, _ = await raw(daemon, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
        assert status in (0, 400, 404, 405)
        assert upstream.fake.calls == []

    @pytest.mark.parametrize(
        "target",
        [
            "//evil.example/api/key/activate",
            "/api/key/%2e%2e/activate",
            "/api/key/..%2factivate",
            "/api/key/activate%0d%0aX-Injected:%201",
            "/api/key/activate%00",
            "/api/../../etc/passwd",
            "/api/key/activate@evil.example",
        ],
    )
    async def test_path_tricks(self, daemon: Daemon, upstream: Upstream, target: str) -> None:
        """Encoded dots, CR/LF, NUL and user-info in the path are refused as JSON and go nowhere."""
        status, body = await raw(daemon, post_request(target))
        assert status in (400, 404)
        if status == 404:
            assert json.loads(body)["result"] == 1
        assert upstream.fake.calls == []

    async def test_upgrade_not_tunnelled(self, daemon: Daemon, upstream: Upstream) -> None:
        """An Upgrade request is answered as a plain call; no WebSocket or h2c tunnel is opened."""
        request = post_request("/api/key/activate").replace(
            b"Connection: close", b"Connection: Upgrade, close\r\nUpgrade: websocket"
        )
        status, body = await raw(daemon, request)
        assert status == 200
        assert json.loads(body)["result"] == 0
        assert "upgrade" not in {name.lower() for name in upstream.fake.calls[0].headers}


class TestStalledBodies:
    """A body that stops coming holds a call only until the deadline, then gets a JSON 408."""

    HEAD = "POST /api/key/activate HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"

    @pytest.mark.parametrize(
        "request_bytes",
        [
            # announces more than it sends
            f"{HEAD}Content-Length: {len(FORM) + 50}\r\n\r\n{FORM}".encode(),
            # chunked, and the last chunk never comes
            f"{HEAD}Transfer-Encoding: chunked\r\n\r\n{len(FORM):x}\r\n{FORM}\r\n".encode(),
        ],
        ids=["short-content-length", "unfinished-chunked"],
    )
    async def test_stalled_body_refused(
        self, daemon_factory: Callable[..., Awaitable[Daemon]], upstream: Upstream, request_bytes: bytes
    ) -> None:
        """The call is answered 408 JSON once `listen.header_timeout` has passed; nothing goes upstream."""
        daemon = await daemon_factory("listen.header_timeout=0.5s")
        assert daemon.server is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.server.port)
        try:
            writer.write(request_bytes)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 408 ")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            assert json.loads(await reader.readexactly(length))["result"] == 1
        finally:
            writer.close()
        assert upstream.fake.calls == []


def longest_text(path: Path) -> int:
    """The longest text value in any table of a SQLite database."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = [row for table in tables for row in db.execute(f'SELECT * FROM "{table}"')]  # noqa: S608
    return max((len(value) for row in rows for value in row if isinstance(value, str)), default=0)


def read_folder(folder: Path) -> bytes:
    """Every file of a folder, concatenated."""
    return b"".join(path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file())


class TestOversizedValues:
    """Values far longer than any SDK sends are refused before they are forwarded, kept or recorded."""

    @pytest.mark.parametrize(
        ("field", "name"),
        [
            ("MachineCode", "MachineCode"),
            ("FriendlyName", "FriendlyName"),
            ("key", "Key"),
            ("ProductId", "ProductId"),
        ],
    )
    async def test_refused_and_not_recorded(
        self, daemon: Daemon, upstream: Upstream, field: str, name: str
    ) -> None:
        """15 KB in a field, bad token: a 400 naming the field; upstream, ledger and audit get none of it."""
        answers = []
        for n in range(20):
            form = activate_form(machine=f"pc-{n}", token="bad-token")
            form[field] = f"{n}-" + "x" * 15_000
            status, _, body = await send_form(daemon.base, "/api/key/activate", form)
            answers.append((status, json.loads(body)))
        assert {status for status, _ in answers} == {400}
        assert all(f"'{name}'" in answer["message"] and answer["result"] == 1 for _, answer in answers)
        assert upstream.fake.calls == []
        await daemon.stop()  # everything the daemon holds goes to disk
        for database in ("seats.sqlite3", "answers.sqlite3"):
            assert await asyncio.to_thread(longest_text, daemon.config.state_dir / database) < 1000
        assert b"x" * 1000 not in await asyncio.to_thread(read_folder, daemon.config.audit_dir)


class TestIdentity:
    """A client is the address it connects from: headers claiming otherwise are never believed."""

    SPOOFED: ClassVar[dict[str, str]] = {
        "X-Forwarded-For": "10.1.2.3",
        "X-Real-IP": "10.1.2.3",
        "Forwarded": "for=10.1.2.3",
        "Client-IP": "10.1.2.3",
    }

    async def test_forwarded_headers_do_not_pass_the_allowlist(
        self, daemon_factory: Callable[..., Awaitable[Daemon]], upstream: Upstream
    ) -> None:
        """A client outside `listen.allow` claiming an allowed address is refused; nothing goes upstream."""
        daemon = await daemon_factory("listen.allow=[10.0.0.0/8]")
        status, _, body = await send_form(
            daemon.base, "/api/key/activate", activate_form(), headers={**FORM_HEADERS, **self.SPOOFED}
        )
        assert status == 403
        assert json.loads(body)["result"] == 1
        assert upstream.fake.calls == []

    async def test_audit_names_the_real_peer(self, daemon: Daemon, upstream: Upstream) -> None:
        """The audit record and the seat ledger name the connecting address, not a claimed one."""
        status, headers, _ = await send_form(
            daemon.base, "/api/key/activate", activate_form(), headers={**FORM_HEADERS, **self.SPOOFED}
        )
        assert status == 200
        await daemon.flush()
        records = [
            json.loads(line)
            for path in sorted((daemon.config.audit_dir).glob("audit-*.jsonl"))
            for line in path.read_text().splitlines()
        ]
        [record] = [r for r in records if r.get("request_id") == headers["X-Request-Id"]]
        assert record["client"] == "127.0.0.1"
        assert "10.1.2.3" not in json.dumps(records)


class TestAdminFiles:
    """The console serves fixed assets only: no path reaches a file by name, however it is spelled."""

    @pytest.mark.parametrize(
        "path",
        [
            "/static/../config.yaml",
            "/static/%2e%2e/%2e%2e/etc/passwd",
            "/static/..%2f..%2fetc%2fpasswd",
            "/static/console.css/../../../etc/passwd",
            "//etc/passwd",
            "/static/%00console.css",
            "/api/../../state/answers.sqlite3",
        ],
    )
    async def test_no_file_by_path(self, admin: Admin, path: str) -> None:
        """Traversal spellings get a 404 or 400 even to a signed-in admin, never a file's content."""
        status, body = await raw_get(admin.server.port, path, admin.bearer)
        assert status in (400, 404), (status, body[:80])
        assert b"root:" not in body
        assert b"SQLite format" not in body

    async def test_fixed_asset_served(self, admin: Admin) -> None:
        """The same request with the asset's own path is answered: the refusals above are not a login wall."""
        status, body = await raw_get(admin.server.port, "/static/console.css", admin.bearer)
        assert status == 200
        assert body
