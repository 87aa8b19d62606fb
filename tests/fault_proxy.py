"""A TCP proxy for tests that stands between the daemon and its upstream and breaks the connection on demand.

Faults (set with `FaultProxy.set`, which also drops every open connection so the next call meets the fault):
- `pass`: bytes go through unchanged; `latency` seconds are waited before each piece of the answer.
- `blackhole`: connections are accepted and read, never answered.
- `refuse`: the port is closed, so connecting is refused; `rst`: accepted, then reset at once.
- `reset_body`: the answer's headers and `cut_after` bytes of its body go through, then a TCP reset.
- `truncate`: the same, then a clean close (FIN).
- `garble`: the body byte at `garble_at` of every answer is XORed with `garble_xor`.
- `serve`: the proxy answers by itself with `canned` (bytes, or a function making an async iterator of
  bytes), read the request first; nothing reaches the target. For answers no real upstream would send.

Answers are told apart by their Content-Length (one without it lasts until the connection ends).
Counters: connections accepted, bytes from clients (`bytes_up`) and bytes written to them (`bytes_down`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Final

FAULTS: Final = frozenset({"pass", "blackhole", "refuse", "rst", "reset_body", "truncate", "garble", "serve"})
_CHUNK: Final = 64 * 1024
_SETTLE: Final = 0.05  # lets the other side see dropped connections before the next call

Canned = bytes | Callable[[], AsyncIterator[bytes]]


def _content_length(head: bytes) -> int | None:
    """The Content-Length an HTTP message's header block announces, if any."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return None


async def _each(pieces: list[bytes] | AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Iterate a list or an async iterator of byte strings alike."""
    if isinstance(pieces, list):
        for piece in pieces:
            yield piece
    else:
        async for piece in pieces:
            yield piece


def _reset(writer: asyncio.StreamWriter) -> None:
    """Drop a connection with a TCP reset (SO_LINGER 0) instead of a clean close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """Forwards loopback TCP connections to `target` and acts out one fault at a time."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.fault = "pass"
        self.latency = 0.0
        self.cut_after = 0
        self.garble_at = 0
        self.garble_xor = 0x20
        self.canned: Canned = b""
        self.connections = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """An http origin URL pointing at the proxy."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen on loopback (on the same port as before, if it listened before)."""
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", self.port or 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self._drop_all()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)

    async def set(
        self,
        fault: str,
        *,
        latency: float = 0.0,
        cut_after: int = 0,
        garble_at: int = 0,
        garble_xor: int = 0x20,
        canned: Canned = b"",
    ) -> None:
        """Switch to a fault (one of FAULTS) with its settings; open connections are dropped."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(FAULTS)}")
        self.fault, self.latency, self.cut_after = fault, latency, cut_after
        self.garble_at, self.garble_xor, self.canned = garble_at, garble_xor, canned
        if fault == "refuse":
            await self.stop()
        else:
            self._drop_all()
            if self._server is None:
                await self.start()
        await asyncio.sleep(_SETTLE)

    def _drop_all(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.ensure_future(self._handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Act out the fault in force when the connection arrived."""
        self._open.add(writer)
        fault = self.fault
        try:
            if fault == "rst":
                _reset(writer)
            elif fault == "blackhole":
                while data := await reader.read(_CHUNK):
                    self.bytes_up += len(data)
            elif fault == "serve":
                await self._serve(reader, writer)
            else:
                await self._forward(reader, writer, fault)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._open.discard(writer)
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer each request on the connection with the canned answer, as long as the client takes it."""
        while head := await reader.readuntil(b"\r\n\r\n"):
            self.bytes_up += len(head) + len(await reader.readexactly(_content_length(head) or 0))
            pieces = [self.canned] if isinstance(self.canned, bytes) else self.canned()
            async for piece in _each(pieces):
                await self._write(writer, piece)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fault: str) -> None:
        """Relay both ways to the target, spoiling the first answer as the fault says."""
        target_reader, target_writer = await asyncio.open_connection(*self.target)
        self._open.add(target_writer)
        up = asyncio.ensure_future(self._pump_up(reader, target_writer))
        try:
            await self._pump_down(target_reader, writer, fault)
        finally:
            up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await up
            self._open.discard(target_writer)
            target_writer.transport.abort()

    async def _pump_up(self, reader: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
        while data := await reader.read(_CHUNK):
            self.bytes_up += len(data)
            target.write(data)
            await target.drain()
        if target.can_write_eof():
            target.write_eof()

    async def _pump_down(
        self, target: asyncio.StreamReader, writer: asyncio.StreamWriter, fault: str
    ) -> None:
        head = b""  # an answer's bytes until its body starts
        body_at: int | None = None  # bytes of the current answer's body relayed so far; None: in headers
        body_length: int | None = None  # its Content-Length; None: the body lasts as long as the connection
        while data := await target.read(_CHUNK):
            if self.latency:
                await asyncio.sleep(self.latency)
            if fault == "pass":
                await self._write(writer, data)
                continue
            while data:
                if body_at is None:
                    head += data
                    end = head.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    data, head, body_at = head[end + 4 :], head[: end + 4], 0
                    body_length = _content_length(head)
                    await self._write(writer, head)
                    head = b""
                piece = data if body_length is None else data[: body_length - body_at]
                data = data[len(piece) :]
                if fault == "garble":
                    await self._write(writer, self._garbled(piece, body_at))
                else:  # reset_body, truncate: relay up to cut_after bytes of body, then break the connection
                    await self._write(writer, piece[: max(0, self.cut_after - body_at)])
                    if body_at + len(piece) >= self.cut_after:
                        await asyncio.sleep(_SETTLE)  # the client starts reading the body before the break
                        if fault == "reset_body":
                            _reset(writer)
                        else:
                            writer.close()
                        return
                body_at += len(piece)
                if body_at == body_length:
                    body_at = None
        if writer.can_write_eof():
            writer.write_eof()

    def _garbled(self, data: bytes, body_at: int) -> bytes:
        """Spoil the byte at garble_at of an answer's body if it is in this piece (at body offset body_at)."""
        offset = self.garble_at - body_at
        if not 0 <= offset < len(data):
            return data
        spoiled = bytearray(data)
        spoiled[offset] ^= self.garble_xor
        return bytes(spoiled)

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if data:
            writer.write(data)
            self.bytes_down += len(data)
            await writer.drain()
