"""The workstation listener: TLS, a cap on connections, a header deadline and JSON for malformed HTTP.

aiohttp has neither a connection limit nor a header deadline: a client that trickles its first request's
headers holds a connection for ever (later requests on a kept-alive connection are bounded by its keep-alive
timeout). The guard below wraps aiohttp's protocol factory to add both, and makes each connection's
handler answer aiohttp's own refusals (framing its C parser rejects, a crashed handler) in the JSON shape
every SDK parses, instead of aiohttp's plain text, which also echoes the client's bytes.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from pathlib import Path

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from license_server.licensing.protocol import error_response

log = structlog.get_logger(__name__)

_BUSY = json.dumps(
    {"result": 1, "message": "This license server has too many open connections; try again shortly."}
).encode()
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(_BUSY)).encode() + b"\r\n\r\n" + _BUSY
)


# The parser's reason, up to its first ":" or line break, is a fixed phrase ("Duplicate Content-Length");
# anything with other characters may quote the client's bytes (a query string with a token) and is not shown.
_REASON = re.compile(r"[A-Za-z0-9 `'-]{1,80}")
_CRASHED = "The license server failed on this request; see its log."
_TIMED_OUT = "The license server did not finish this request in time; see its log."


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


def parse_refusal(exc: HttpProcessingError, max_line: int) -> str:
    """The message for a request aiohttp's HTTP parser refused, without quoting any of the client's bytes."""
    if isinstance(exc, LineTooLong):
        return f"The request line or a header is longer than {max_line} bytes; nothing was forwarded."
    reason = re.split(r"[:\n]", exc.message, maxsplit=1)[0].strip()
    if _REASON.fullmatch(reason):
        return f"The request is not valid HTTP/1.1 ({reason}); nothing was forwarded."
    return "The request is not valid HTTP/1.1; nothing was forwarded."


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering the errors it handles itself as Cryptolens JSON errors."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A JSON `{"result": 1, "message": ...}` answer with `status`, closing the connection."""
        del message  # aiohttp's text quotes the client's bytes, which may hold an access token
        if request.writer.output_size > 0:  # as aiohttp: part of an answer is out, only closing is left
            raise ConnectionError("an answer was partly sent; the connection is closed instead")
        if isinstance(exc, HttpProcessingError):
            text = parse_refusal(exc, self.max_line_size)
            log.info("http_refused", client=request.remote, status=status, reason=text)
        else:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            text = _TIMED_OUT if status == 504 else _CRASHED
        response = error_response(status, text, source="refused")
        response.headers["Connection"] = "close"
        response.force_close()
        return response


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
        # What aiohttp's Server() makes, with the JSON error answers.
        handler = JsonErrorHandler(self._server, loop=asyncio.get_running_loop(), **self._server._kwargs)
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
        handler.force_close()  # closes the transport too


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
