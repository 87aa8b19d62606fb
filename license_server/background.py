"""Work done off the caller's path: tasks kept alive until they end, and group commits of queued writes."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Background:
    """Tasks that run beside the daemon's work: each is referenced until it ends, and stopped on request."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as a task; the event loop keeps only a weak reference, so this keeps a strong one."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Cancel every task still running and wait for them to end."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Batch:
    """The items added in one turn of the event loop: `done` once their commit ended, `error` if it failed."""

    __slots__ = ("done", "error")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.error: BaseException | None = None


class GroupCommit(Generic[T]):
    """Items added during one turn of the event loop, committed together by one call of `commit`.

    `commit` starts the work at once and returns what to await (a worker thread's future, a coroutine);
    `ended` hears each batch's items and error (None when committed) before the batch's adders do. `serial`:
    a batch waits for the commit before it to end (the audit chain is built on the previous batch's tail);
    otherwise each batch goes at once to `commit`, whose single worker thread keeps them in order.
    """

    __slots__ = ("_commit", "_ended", "_items", "_next", "_running", "_serial")

    def __init__(
        self,
        commit: Callable[[list[T]], Awaitable[None]],
        ended: Callable[[list[T], BaseException | None], None],
        *,
        serial: bool,
    ) -> None:
        self._commit = commit
        self._ended = ended
        self._serial = serial
        self._items: list[T] = []
        self._next: Batch | None = None  # the batch that items are added to
        self._running: set[asyncio.Future[None]] = set()  # commits started and not yet ended

    @property
    def busy(self) -> bool:
        """Whether items wait for a commit or a commit is under way."""
        return self._next is not None or bool(self._running)

    def add(self, item: T) -> Batch:
        """Queue an item for the commit at the end of this turn of the event loop; returns its batch."""
        self._items.append(item)
        batch = self._next
        if batch is None:
            loop = asyncio.get_running_loop()
            batch = self._next = Batch(loop.create_future())
            loop.call_soon(self.submit)
        return batch

    def submit(self) -> None:
        """Start the commit of the items queued so far (when serial, once the commit under way ended)."""
        batch = self._next
        if batch is None or (self._serial and self._running):
            return
        items, self._items, self._next = self._items, [], None
        try:
            started: Awaitable[None] = self._commit(items)
        except Exception as exc:  # noqa: BLE001 - it could not even start (a closed worker): adders must hear it
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            started = failed
        commit = asyncio.ensure_future(started)
        self._running.add(commit)
        commit.add_done_callback(functools.partial(self._done, items, batch))

    def _done(self, items: list[T], batch: Batch, commit: asyncio.Future[None]) -> None:
        """Tell `ended`, then the batch's adders, how its commit went; start the next one if it waited."""
        self._running.discard(commit)
        error = asyncio.CancelledError() if commit.cancelled() else commit.exception()
        self._ended(items, error)
        batch.error = error
        if not batch.done.done():  # an adder awaiting it unshielded may have cancelled it
            batch.done.set_result(None)
        if self._serial:
            self.submit()

    async def flush(self) -> None:
        """Commit what is queued now, and wait until it and every commit under way have ended."""
        self.submit()
        waiting = list(self._running)
        if self._next is not None:  # serial: queued behind the commit under way
            waiting.append(self._next.done)
        if waiting:
            await asyncio.wait(waiting)
