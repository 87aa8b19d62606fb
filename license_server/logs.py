"""Operational logging: structlog, JSON off a terminal, readable on one, stdlib records in the same format.

Records are rendered and written by a listener thread, so a slow journal or terminal never stalls the
event loop.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _PassThroughQueueHandler(logging.handlers.QueueHandler):
    """Queues records untouched: the listener thread renders them (the stock one formats on the caller)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class Logging:
    """The configured logging of one daemon run; `close` flushes what is queued."""

    def __init__(self, listener: logging.handlers.QueueListener) -> None:
        self._listener = listener

    def set_level(self, level: str) -> None:
        """Change the level while running (a reload)."""
        logging.getLogger().setLevel(_LEVELS.get(level, logging.INFO))

    def close(self) -> None:
        """Write out every queued record and stop the listener thread."""
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
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
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
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler, respect_handler_level=False)
    root = logging.getLogger()
    root.handlers[:] = [_PassThroughQueueHandler(records)]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # aiohttp's access log prints query strings, where Node SDK users put their token: it stays off.
    logging.getLogger("aiohttp.access").disabled = True
    listener.start()
    return Logging(listener)
