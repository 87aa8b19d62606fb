"""Timestamps as text, made cheaply enough for a line or record on every call."""

from __future__ import annotations

from datetime import UTC, datetime


class UtcText:
    """ISO 8601 UTC text of unix times, to the microsecond; the date and time part is made once a second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def text(self, now: float) -> str:
        """`now` as `YYYY-MM-DDTHH:MM:SS.ffffffZ`."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        return f"{self._prefix}{int((now - second) * 1_000_000):06d}Z"
