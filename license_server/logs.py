"""Operational logging: structlog, JSON off a terminal, readable on one, stdlib records in the same format.

Records are rendered and written by a listener thread, so a slow journal or terminal never stalls the
event loop.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import queue
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import orjson
import structlog

from license_server.utctext import UtcText

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


CALL_LOGGER = "license_server.calls"
CallLine = Callable[[dict[str, Any]], None]


def structlog_call_line(fields: dict[str, Any]) -> None:
    """Log one call's canonical line through structlog (the console renderer, and tests)."""
    structlog.get_logger(CALL_LOGGER).info("call", **fields)


class _Listener(logging.handlers.QueueListener):
    """Writes queued records; call lines arrive already rendered (bytes) and are written as they are."""

    def __init__(self, records: queue.SimpleQueue[Any], handler: logging.StreamHandler[TextIO]) -> None:
        super().__init__(records, handler, respect_handler_level=False)
        self._handler = handler

    def handle(self, record: Any) -> None:
        if isinstance(record, bytes):
            self._handler.stream.write(record.decode())
            self._handler.flush()
        else:
            super().handle(record)


class _PassThroughQueueHandler(logging.handlers.QueueHandler):
    """Queues records untouched: the listener thread renders them (the stock one formats on the caller)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class Logging:
    """The configured logging of one daemon run; `close` flushes what is queued."""

    def __init__(self, listener: _Listener, records: queue.SimpleQueue[Any], as_json: bool) -> None:
        self._listener = listener
        self._records = records
        self._calls = logging.getLogger(CALL_LOGGER)
        self._lines: list[bytes] = []  # call lines of this turn of the event loop, queued together
        self._clock = UtcText()
        self.call_line: CallLine = self._json_call_line if as_json else structlog_call_line

    def _json_call_line(self, fields: dict[str, Any]) -> None:
        """The call line in the same JSON as every other line, rendered with orjson: it is the hot path."""
        if not self._calls.isEnabledFor(logging.INFO):
            return
        fields["event"] = "call"
        fields["level"] = "info"
        fields["logger"] = CALL_LOGGER
        fields["timestamp"] = self._clock.text(time.time())
        # Queued as bytes, not as a LogRecord: making one costs more than rendering the whole line. One
        # queue item per turn of the loop, not per call: each item wakes the writer thread.
        if not self._lines:
            asyncio.get_running_loop().call_soon(self._queue_lines)
        self._lines.append(orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE))

    def _queue_lines(self) -> None:
        lines, self._lines = self._lines, []
        self._records.put(b"".join(lines))

    def close(self) -> None:
        """Write out every queued record and stop the listener thread."""
        if self._lines:
            self._queue_lines()
        self._listener.stop()


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> Logging:
    """Route structlog and stdlib logging (aiohttp's own records included) through one renderer."""
    stream = stream if stream is not None else sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Plain tracebacks: with rich installed, structlog's default shows local variables, tokens among them.
    console = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    renderer: Any = structlog.processors.JSONRenderer() if as_json else console
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    records: queue.SimpleQueue[Any] = queue.SimpleQueue()
    listener = _Listener(records, handler)
    root = logging.getLogger()
    root.handlers[:] = [_PassThroughQueueHandler(records)]
    set_level(level)
    # aiohttp's access log prints query strings, where Node SDK users put their token: it stays off.
    logging.getLogger("aiohttp.access").disabled = True
    listener.start()
    return Logging(listener, records, as_json)


def set_level(level: str) -> None:
    """Set the level of every log record, at start and on a reload."""
    logging.getLogger().setLevel(_LEVELS.get(level, logging.INFO))
