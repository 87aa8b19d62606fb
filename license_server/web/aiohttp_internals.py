"""Every use of aiohttp's undocumented internals, in one place; checked against aiohttp 3.14.5 only.

aiohttp has no public way to cap connections, to bound the wait for a request's headers, or to choose the
answers its connection handler writes itself (parser refusals, a crashed handler). The listener builds
all three on what is here, and on nothing else of aiohttp's that is not documented:

- `web.Server._kwargs`: the runner's connection settings (keep-alive timeout, line limits, access log),
  to make a connection's `RequestHandler` exactly as `Server.__call__` does;
- `RequestHandler.handle_error(request, status, exc, message)`, called for a parser refusal (400 and the
  `HttpProcessingError`), a crashed handler (500 and the exception) and a handler timeout (504), and
  `request.writer.output_size`, which tells whether part of an answer is already out;
- `RequestHandler.max_line_size`, `.transport` and `.force_close()`, and `web.Server.connections`;
- `web.BaseSite._ssl_context`, `._backlog` and `._server` (which `BaseSite.stop` closes), and
  `BaseSite.start` registering the site with its runner.

tests/test_aiohttp_internals.py checks each of these and names what changed; pyproject.toml keeps aiohttp
below 3.15 until they are checked again.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

CHECKED_AGAINST = ("3.14.5",)  # the aiohttp versions this module and its test were checked with

# Writes the answer to a request aiohttp refused or whose handler failed: (request, status, exception or
# None, the longest request line or header accepted). The connection is closed after it.
ErrorAnswer = Callable[[BaseRequest, int, BaseException | None, int], web.StreamResponse]


class _Connection(RequestHandler):
    """aiohttp's connection handler, with the answers it writes itself made by an ErrorAnswer."""

    __slots__ = ("_answer",)

    def __init__(
        self, server: web.Server, answer: ErrorAnswer, *, loop: asyncio.AbstractEventLoop, **settings: Any
    ) -> None:
        super().__init__(server, loop=loop, **settings)
        self._answer = answer

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer `_answer` writes; not with aiohttp's `message`, which quotes the client's bytes."""
        del message
        if request.writer.output_size > 0:  # as aiohttp: part of an answer is out, only closing is left
            raise ConnectionError("an answer was partly sent; the connection is closed instead")
        return self._answer(request, status, exc, self.max_line_size)


def make_connection(server: web.Server, answer: ErrorAnswer) -> asyncio.Protocol:
    """A new connection's protocol, made as `server()` makes it, whose own error answers `answer` writes."""
    return _Connection(server, answer, loop=asyncio.get_running_loop(), **server._kwargs)


def open_connections(server: web.Server) -> int:
    """How many connections the server holds open, requests in progress or idle."""
    return len(server.connections)


def close_connection(protocol: asyncio.Protocol) -> bool:
    """Close a connection made by `make_connection` at once; False when it was closed already."""
    if not isinstance(protocol, RequestHandler) or protocol.transport is None:
        return False
    protocol.force_close()  # closes the transport too
    return True


class ProtocolSite(web.BaseSite):
    """A TCP site whose connections' protocols come from `factory` instead of the runner's server."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        factory: Callable[[], asyncio.Protocol],
        *,
        ssl_context: ssl.SSLContext | None,
        backlog: int,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._factory = factory
        self.bound: list[tuple[str, int]] = []  # the addresses bound, once started

    @property
    def name(self) -> str:
        """The site's URL, for logs."""
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        """Register with the runner (which stops the site on cleanup), bind and start accepting."""
        await super().start()
        server = await asyncio.get_running_loop().create_server(
            self._factory,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=True,
        )
        self._server = server
        self.bound = [sock.getsockname()[:2] for sock in server.sockets]
