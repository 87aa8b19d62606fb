"""aiohttp's internals the listener relies on (license_server/web/aiohttp_internals.py), one by one.

A failure here names what changed in aiohttp. Adapt aiohttp_internals.py (and the listener if it must),
then add the version to CHECKED_AGAINST and move the upper bound of aiohttp in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from license_server.web.aiohttp_internals import (
    CHECKED_AGAINST,
    ProtocolSite,
    close_connection,
    make_connection,
    open_connections,
)
from tests.test_egress import make_tls

CHECKED = f"aiohttp {aiohttp.__version__} (checked against {', '.join(CHECKED_AGAINST)})"
MAX_LINE = 200
KEEPALIVE = 0.3


def changed(what: str) -> str:
    """The failure message: what the listener relies on and no longer finds."""
    return f"{CHECKED}: {what}; see license_server/web/aiohttp_internals.py"


class TestShapes:
    """The private names and signatures aiohttp_internals.py uses exist as they did."""

    async def test_server_keeps_connection_settings(self) -> None:
        """web.Server keeps the keyword arguments it makes each RequestHandler with in `_kwargs`."""

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            raise AssertionError

        server = web.Server(handler, keepalive_timeout=7.0, max_line_size=123)
        assert getattr(server, "_kwargs", None) == {"keepalive_timeout": 7.0, "max_line_size": 123}, changed(
            "web.Server no longer keeps its connection settings in `_kwargs`"
        )

    def test_request_handler_signatures(self) -> None:
        """RequestHandler(manager, *, loop, **settings) and handle_error(request, status, exc, message)."""
        init = inspect.signature(RequestHandler.__init__).parameters
        assert list(init)[:2] == ["self", "manager"], changed(
            "RequestHandler's first argument is not the server"
        )
        assert init["loop"].kind is inspect.Parameter.KEYWORD_ONLY, changed("RequestHandler takes no `loop=`")
        assert {"keepalive_timeout", "max_line_size"} <= set(init), changed(
            "RequestHandler's settings changed"
        )
        handle_error = inspect.signature(RequestHandler.handle_error).parameters
        assert list(handle_error) == ["self", "request", "status", "exc", "message"], changed(
            f"RequestHandler.handle_error now takes {list(handle_error)}"
        )

    def test_attributes(self) -> None:
        """What is read: the handler's line limit and transport, the writer's size, BaseSite's slots."""
        assert "max_line_size" in RequestHandler.__slots__, changed("RequestHandler.max_line_size is gone")
        assert callable(getattr(RequestHandler, "force_close", None)), changed(
            "RequestHandler.force_close is gone"
        )
        assert "transport" in BaseProtocol.__slots__, changed("the protocol's `transport` attribute is gone")
        assert "output_size" in AbstractStreamWriter.__annotations__, changed(
            "the writer's output_size is gone"
        )
        for name in ("_ssl_context", "_backlog", "_server"):
            assert name in web.BaseSite.__slots__, changed(f"web.BaseSite.{name} is gone")
        site = inspect.signature(web.BaseSite.__init__).parameters
        assert {"ssl_context", "backlog"} <= set(site), changed(
            "web.BaseSite takes no ssl_context or backlog"
        )
        assert isinstance(inspect.getattr_static(web.Server, "connections"), property), changed(
            "web.Server.connections is not a property any more"
        )


@dataclass
class Listener:
    """A runner's app served by a ProtocolSite of make_connection's protocols, recording the error answers."""

    runner: web.AppRunner
    site: ProtocolSite | None = None
    made: list[asyncio.Protocol] = field(default_factory=list)
    errors: list[tuple[int, type[BaseException] | None, int]] = field(default_factory=list)

    def answer(
        self, request: web.BaseRequest, status: int, exc: BaseException | None, max_line: int
    ) -> web.StreamResponse:
        """The ErrorAnswer under test: records what aiohttp passed and answers a recognisable text."""
        del request
        self.errors.append((status, None if exc is None else type(exc), max_line))
        response = web.Response(status=status, text=f"answered {status}")
        response.force_close()
        return response

    @property
    def server(self) -> web.Server:
        """The runner's low-level server."""
        assert self.runner.server is not None
        return self.runner.server

    def factory(self) -> asyncio.Protocol:
        """The site's protocol factory."""
        connection = make_connection(self.server, self.answer)
        self.made.append(connection)
        return connection

    @property
    def port(self) -> int:
        """The port the site bound."""
        assert self.site is not None
        return self.site.bound[0][1]


def _app(listener: list[Listener]) -> web.Application:
    """Routes that answer, crash, time out, half-answer, or tell whether their protocol was made by us."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def crash(request: web.Request) -> web.Response:
        raise RuntimeError("crashed on purpose")

    async def timeout(request: web.Request) -> web.Response:
        raise TimeoutError

    async def partial(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"part")
        raise RuntimeError("crashed half-way")

    async def protocol(request: web.Request) -> web.Response:
        return web.Response(text=str(any(request.protocol is made for made in listener[0].made)))

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/crash", crash)
    app.router.add_get("/timeout", timeout)
    app.router.add_get("/partial", partial)
    app.router.add_get("/protocol", protocol)
    return app


async def _start(ssl_context: ssl.SSLContext | None = None) -> Listener:
    """A started Listener on loopback; its runner stops the site on cleanup."""
    holder: list[Listener] = []
    runner = web.AppRunner(_app(holder), access_log=None, keepalive_timeout=KEEPALIVE, max_line_size=MAX_LINE)
    await runner.setup()
    listener = Listener(runner)
    holder.append(listener)
    listener.site = ProtocolSite(
        runner, "127.0.0.1", 0, listener.factory, ssl_context=ssl_context, backlog=16
    )
    await listener.site.start()
    return listener


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    """A plain-HTTP Listener, cleaned up after the test."""
    started = await _start()
    yield started
    await started.runner.cleanup()


async def exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes; everything answered until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def get(path: str) -> bytes:
    """A GET request for a path, closing the connection after the answer."""
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


class TestConnection:
    """make_connection's protocol serves as aiohttp's own, with its error answers written by ours."""

    async def test_serves_with_the_runner_settings(self, listener: Listener) -> None:
        """A normal request is answered by the app; the request's protocol is the one the factory made."""
        assert b"\r\n\r\nok" in await exchange(listener.port, get("/ok"))
        assert (await exchange(listener.port, get("/protocol"))).endswith(b"True"), changed(
            "request.protocol is not the connection handler the site's factory made"
        )
        assert listener.errors == []

    async def test_parser_refusal(self, listener: Listener) -> None:
        """Framing the parser refuses reaches the answer as a 400 with the HttpProcessingError."""
        answer = await exchange(
            listener.port, b"GET /ok HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
        )
        assert [status for status, _, _ in listener.errors] == [400], changed(
            f"a parser refusal gave {listener.errors}"
        )
        error = listener.errors[0][1]
        assert error is not None
        assert issubclass(error, HttpProcessingError), changed(f"refused with {error}")
        assert b"answered 400" in answer, changed("the error answer handle_error returned was not sent")

    async def test_settings_reach_the_connection(self, listener: Listener) -> None:
        """The runner's max_line_size limits the request line, and the answer is told the limit."""
        answer = await exchange(listener.port, get("/" + "a" * (MAX_LINE + 10)))
        assert listener.errors == [(400, LineTooLong, MAX_LINE)], changed(
            f"a request line over the runner's max_line_size gave {listener.errors}"
        )
        assert b"answered 400" in answer

    async def test_crash_and_timeout(self, listener: Listener) -> None:
        """A crashed handler reaches the answer as 500 with its exception, a timed-out one as 504."""
        assert b"answered 500" in await exchange(listener.port, get("/crash"))
        assert b"answered 504" in await exchange(listener.port, get("/timeout"))
        assert listener.errors == [(500, RuntimeError, MAX_LINE), (504, None, MAX_LINE)], changed(
            f"a crashed and a timed-out handler gave {listener.errors}"
        )

    async def test_partial_answer_is_not_followed_by_another(self, listener: Listener) -> None:
        """A handler failing after part of its answer is out gets no error answer: the connection closes."""
        answer = await exchange(listener.port, get("/partial"))
        assert b"part" in answer
        assert b"answered" not in answer, changed(
            "request.writer.output_size no longer shows an answer already started"
        )
        assert listener.errors == []

    async def test_keepalive_timeout_from_the_runner(self, listener: Listener) -> None:
        """An idle kept-alive connection is closed after the runner's keepalive_timeout."""
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        try:
            writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await asyncio.wait_for(reader.readuntil(b"ok"), 5)
            closed = await asyncio.wait_for(reader.read(), KEEPALIVE + 2)
        finally:
            writer.close()
        assert closed == b"", changed("the connection did not get the runner's keepalive_timeout")


class TestConnectionsAndSite:
    """Counting and closing connections; the site's registration, TLS and shutdown."""

    async def test_count_and_close(self, listener: Listener) -> None:
        """open_connections counts idle connections; close_connection closes one, once."""
        streams = [await asyncio.open_connection("127.0.0.1", listener.port) for _ in range(2)]
        for _ in range(100):
            if open_connections(listener.server) == 2:
                break
            await asyncio.sleep(0.01)
        assert open_connections(listener.server) == 2, changed("web.Server.connections miscounts")
        assert close_connection(listener.made[0]), changed("close_connection did not find the transport")
        assert await asyncio.wait_for(streams[0][0].read(), 5) == b"", changed("force_close left it open")
        assert not close_connection(listener.made[0]), changed("a closed connection still has a transport")
        for _, writer in streams:
            writer.close()

    async def test_site_registered_and_stopped_by_the_runner(self) -> None:
        """The started site is one of the runner's sites; the runner's cleanup closes its socket."""
        started = await _start()
        assert started.site in started.runner.sites, changed("BaseSite.start no longer registers the site")
        port = started.port
        await started.runner.cleanup()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)

    async def test_tls(self, tmp_path: Path) -> None:
        """With an SSL context the site speaks TLS and names itself https."""
        server_context, ca_file = await asyncio.to_thread(make_tls, tmp_path)
        started = await _start(server_context)
        try:
            assert started.site is not None
            assert started.site.name.startswith("https://")
            client = ssl.create_default_context(cafile=str(ca_file))
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"https://127.0.0.1:{started.port}/ok", ssl=client) as response,
            ):
                assert (response.status, await response.text()) == (200, "ok")
        finally:
            await started.runner.cleanup()
