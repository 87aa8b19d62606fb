"""The workstation listener: TLS, a cap on connections and a deadline for a client's first request headers.

aiohttp has neither a connection limit nor a header deadline: a client that trickles its first request's
headers holds a connection for ever (later requests on a kept-alive connection are bounded by its keep-alive
timeout). The guard below wraps aiohttp's protocol factory to add both.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = structlog.get_logger(__name__)

_BUSY = json.dumps(
    {"result": 1, "message": "This license server has too many open connections; try again shortly."}
).encode()
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(_BUSY)).encode() + b"\r\n\r\n" + _BUSY
)


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context, TLS 1.2 or newer, with the configured certificate chain."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class _Busy(asyncio.Protocol):
    """Answers a connection over the cap with a JSON 503 and closes it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(_BUSY_RESPONSE)
        transport.close()


class ConnectionGuard:
    """aiohttp's protocol factory with a connection cap and a deadline for the first request's headers."""

    def __init__(self, server: web.Server, max_connections: int, header_timeout: float) -> None:
        self._server = server
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self._waiting: set[RequestHandler] = set()  # connections whose first request has not come yet
        self.refused = 0
        self.timed_out = 0

    def __call__(self) -> asyncio.Protocol:
        """Make the protocol of a new connection."""
        if len(self._server.connections) >= self.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("connections_refused", refused=self.refused, max_connections=self.max_connections)
            return _Busy()
        handler = self._server()
        self._waiting.add(handler)
        asyncio.get_running_loop().call_later(self.header_timeout, self._check, handler)
        return handler

    def started(self, protocol: object) -> None:
        """A request arrived on this connection: its headers came in time."""
        if isinstance(protocol, RequestHandler):
            self._waiting.discard(protocol)

    def _check(self, handler: RequestHandler) -> None:
        if handler not in self._waiting:
            return
        self._waiting.discard(handler)
        if handler.transport is None:
            return
        self.timed_out += 1
        handler.force_close()
        handler.transport.close()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a ConnectionGuard."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        *,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=1024)
        self._host = host
        self._port = port
        self._guard = guard
        self.bound: list[tuple[str, int]] = []

    @property
    def name(self) -> str:
        """The site's URL, for logs."""
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        """Bind and start accepting."""
        await super().start()
        server = await asyncio.get_running_loop().create_server(
            self._guard,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=True,
        )
        self._server = server
        self.bound = [sock.getsockname()[:2] for sock in server.sockets]
