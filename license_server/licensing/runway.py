"""The daemon's view of every machine's runway: counts for status pages and metrics, warnings in outages.

Every machine's runway is computed in a worker thread 10 s after start, then every five minutes (every
minute during an outage), from the kept answers, the ledger and the license files
(license_server.reports.runway). Only the counts are kept, not the machines, so that memory does not grow
with them. During an upstream outage (or in offline mode) a warning is logged as machines come within each
of `runway.warnings` of lock-out, and when they lock out: once per machine and threshold, per outage. An
outage that begins with machines already past a threshold warns of them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog

from license_server.config import Config, format_duration
from license_server.reports.runway import Ends, Outlook, outlook
from license_server.reports.tables import iso

log = structlog.get_logger(__name__)

FIRST_AFTER = 10.0  # seconds after start: the first computation does not slow the start
EVERY = 300.0  # seconds between computations
EVERY_IN_OUTAGE = 60.0


class RunwayWatch:
    """Computes the runway outlook now and then; logs threshold crossings while upstream is out of reach."""

    def __init__(
        self,
        compute: Callable[[float], Ends],
        *,
        config: Callable[[], Config],
        outage: Callable[[], bool],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._compute = compute  # blocking: run in a worker thread
        self._config = config
        self._outage = outage
        self._clock = clock
        self.latest: Outlook | None = None
        self.computed_at: float | None = None
        self.error: str | None = None
        self._levels: dict[int, int] = {}  # machine (as in Ends): thresholds crossed this outage
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Compute now and then in the background until `close`."""
        self._task = asyncio.create_task(self._run(), name="runway-watch")

    async def close(self) -> None:
        """Stop computing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        """Compute, then wait: a minute during an outage, else a few minutes."""
        await asyncio.sleep(FIRST_AFTER)
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - a store that cannot be read now is tried again later
                self.error = str(exc) or exc.__class__.__name__
                log.warning("runway_not_computed", error=self.error)
            await asyncio.sleep(EVERY_IN_OUTAGE if self._outage() else EVERY)

    async def refresh(self) -> Outlook:
        """Compute every machine's runway now; returns the outlook, also kept as `latest`."""
        async with self._lock:
            now = self._clock()
            found = await asyncio.to_thread(self._compute, now)
            self.latest = outlook(found, now)
            self.computed_at, self.error = now, None
            self._warn(found, now)
            return self.latest

    def _warn(self, found: Ends, now: float) -> None:
        """Log the machines that crossed a threshold since the last computation of this outage."""
        if not self._outage():
            self._levels.clear()  # the next outage warns afresh
            return
        thresholds = (*self._config().runway.warnings, 0.0)  # longest first; 0: locked out
        # level: (product, end) of each machine that reached it since the last computation
        crossed: dict[int, list[tuple[str, float]]] = {}
        levels: dict[int, int] = {}
        for product, machines in found.items():
            for name, end in machines.items():
                left = max(0.0, end - now)
                level = sum(1 for threshold in thresholds if left <= threshold)
                if not level:
                    continue
                levels[name] = level
                if level > self._levels.get(name, 0):
                    crossed.setdefault(level, []).append((product, end))
        self._levels = levels
        for level, reached in sorted(crossed.items()):
            threshold = thresholds[level - 1]
            fields: dict[str, Any] = {
                "machines": len(reached),
                "products": sorted({product for product, _ in reached}),
                "soonest": iso(min(end for _, end in reached)),
            }
            if threshold:
                log.warning("runway_below", within=format_duration(threshold), **fields)
            else:
                log.warning("runway_ended", **fields)
