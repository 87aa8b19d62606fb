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
from collections.abc import Callable, Iterator
from typing import Any

import structlog

from license_server.config import Config, format_duration
from license_server.reports.runway import Ends, Outlook, outlook
from license_server.reports.tables import iso
from license_server.storage.answers import KeptActivation
from license_server.storage.interfaces import AnswerReader

log = structlog.get_logger(__name__)

FIRST_AFTER = 10.0  # seconds after start: the first computation does not slow the start
EVERY = 300.0  # seconds between computations
EVERY_IN_OUTAGE = 60.0


class PacedReader:
    """Kept answers read for the watch with a short sleep after each slice of work, to keep the loop on time.

    The watch reads in a worker thread while the event loop answers calls. A thread that never waits keeps
    the interpreter lock until the loop has asked for it for the switch interval (5 ms), so calls answered
    in 0.5 ms would wait up to 5 ms while 100,000 answers are read (about 0.4 s of CPU). Sleeping after each
    `work` seconds spent on the answers (reading them and what the caller does with each) hands the lock
    over; the reading then takes about five times as long (about 2 s for 100,000), off the hot path.
    """

    def __init__(self, reader: AnswerReader, *, work: float = 0.0001, pause: float = 0.0002) -> None:
        self._reader = reader
        self._work = work
        self._pause = pause

    def activations(self) -> Iterator[KeptActivation]:
        """The reader's kept Activate answers, with a pause after each slice of work."""
        clock, work, pause = time.perf_counter, self._work, self._pause
        due = clock() + work
        for answer in self._reader.activations():
            yield answer
            if clock() >= due:
                time.sleep(pause)
                due = clock() + work


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
            outage = self._outage()
            thresholds = (*self._config().runway.warnings, 0.0)  # longest first; 0: locked out
            # all of it in the worker thread: counting 100,000 machines would hold up the loop's calls
            latest, crossed = await asyncio.to_thread(self._assess, now, outage, thresholds)
            self.latest = latest
            self.computed_at, self.error = now, None
            self._warn(crossed, thresholds)
            return latest

    def _assess(
        self, now: float, outage: bool, thresholds: tuple[float, ...]
    ) -> tuple[Outlook, dict[int, list[tuple[str, float]]]]:
        """The outlook, and the machines that crossed a threshold since the last computation (blocking).

        Outside an outage nothing is crossed and the next outage warns afresh. Crossed: level (how many
        thresholds a machine is within) -> (product, end) of each machine that reached it.
        """
        found = self._compute(now)
        crossed: dict[int, list[tuple[str, float]]] = {}
        levels: dict[int, int] = {}
        if outage:
            last = now + thresholds[0]  # machines whose runway ends later are within no threshold
            for product, machines in found.items():
                for name, end in [(name, end) for name, end in machines.items() if end <= last]:
                    left = max(0.0, end - now)
                    level = sum(1 for threshold in thresholds if left <= threshold)
                    levels[name] = level
                    if level > self._levels.get(name, 0):
                        crossed.setdefault(level, []).append((product, end))
        self._levels = levels
        return outlook(found, now), crossed

    def _warn(self, crossed: dict[int, list[tuple[str, float]]], thresholds: tuple[float, ...]) -> None:
        """Log the machines that crossed each threshold, one line per threshold."""
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
