"""The workstation listener: TLS, a cap on connections, a header deadline and JSON for malformed HTTP.

aiohttp has neither a connection limit nor a header deadline: a client that trickles its first request's
headers holds a connection for ever (later requests on a kept-alive connection are bounded by its keep-alive
timeout). The guard below is the listener's protocol factory and adds both, and each connection answers
aiohttp's own refusals (framing its C parser rejects, a crashed handler) in the JSON shape every SDK parses,
instead of aiohttp's plain text, which also echoes the client's bytes. What of aiohttp's internals this
needs is in `aiohttp_internals`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
from pathlib import Path

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from license_server.licensing.protocol import error_response
from license_server.web.aiohttp_internals import (
    ProtocolSite,
    close_connection,
    make_connection,
    open_connections,
)

log = structlog.get_logger(__name__)
_AIOHTTP_LOG = logging.getLogger("aiohttp.server")  # where aiohttp logs a failed request itself

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


class ServerTls:
    """The listener's TLS, whose certificate a reload renews: each new handshake gets the context in use."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context  # the one the listening socket was made with
        self._in_use = context
        context.sni_callback = self._choose  # called in every handshake, with or without SNI

    def use(self, context: ssl.SSLContext) -> None:
        """Serve new connections with `context` (made by `tls_context`); open ones keep theirs."""
        self._in_use = context

    def _choose(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        if self._in_use is not context:
            connection.context = self._in_use


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


def json_error(
    request: web.BaseRequest, status: int, exc: BaseException | None, max_line: int
) -> web.StreamResponse:
    """A request aiohttp refused or whose handler failed: `{"result": 1, "message": ...}`, closing."""
    if isinstance(exc, HttpProcessingError):
        text = parse_refusal(exc, max_line)
        log.info("http_refused", client=request.remote, status=status, reason=text)
    else:
        _AIOHTTP_LOG.exception("Error handling request from %s", request.remote, exc_info=exc)
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
        self._waiting: set[asyncio.Protocol] = set()  # connections whose first request has not come yet
        self.refused = 0
        self.timed_out = 0

    def __call__(self) -> asyncio.Protocol:
        """Make the protocol of a new connection."""
        if open_connections(self._server) >= self.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("connections_refused", refused=self.refused, max_connections=self.max_connections)
            return _Busy()
        connection = make_connection(self._server, json_error)
        self._waiting.add(connection)
        asyncio.get_running_loop().call_later(self.header_timeout, self._check, connection)
        return connection

    def started(self, protocol: object) -> None:
        """A request arrived on this connection: its headers came in time."""
        if isinstance(protocol, asyncio.Protocol):
            self._waiting.discard(protocol)

    def _check(self, connection: asyncio.Protocol) -> None:
        if connection not in self._waiting:
            return
        self._waiting.discard(connection)
        if close_connection(connection):
            self.timed_out += 1


class GuardedSite(ProtocolSite):
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
        super().__init__(runner, host, port, guard, ssl_context=ssl_context, backlog=1024)
