"""Heartbeats in the shared database: whether this node reaches it, and which other nodes do.

Each node writes its row in `nodes` every second, timed by the database's clock, on a connection of its
own, and reads back the names of the nodes seen within the last few seconds. What it keeps in memory is
this node's view: the database up or down (since when, and why), and its live peers as of the last beat
that got through. The seat ledger bounds its grants by that view while the database cannot be reached.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import structlog

from license_server.storage.postgres import Database

log = structlog.get_logger(__name__)

T = TypeVar("T")

EVERY = 1.0  # seconds between heartbeats
LIVE_WITHIN = 5.0  # a node whose last heartbeat is older than this (database clock) is not a live peer
DEADLINE = 1.0  # seconds a heartbeat may take before the database counts as unreachable

_BEAT = (
    "WITH previous AS (SELECT boot FROM nodes WHERE name = %(name)s)"
    " INSERT INTO nodes AS n (name, version, started, seen, boot)"
    " VALUES (%(name)s, %(version)s, extract(epoch FROM clock_timestamp()),"
    " extract(epoch FROM clock_timestamp()), %(boot)s)"
    " ON CONFLICT (name) DO UPDATE SET version = excluded.version, seen = excluded.seen,"
    " boot = excluded.boot,"
    " started = CASE WHEN n.boot = excluded.boot THEN n.started ELSE excluded.started END"
    " RETURNING (SELECT boot FROM previous)"
)
_PEERS = "SELECT name FROM nodes WHERE seen > extract(epoch FROM clock_timestamp()) - %s ORDER BY name"


class Heartbeat:
    """This node's view of the database and of its peers, kept current by a beat every second."""

    def __init__(
        self,
        database: Database,
        *,
        node: str,
        version: str,
        every: float = EVERY,
        live_within: float = LIVE_WITHIN,
        deadline: float = DEADLINE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._database = database
        self.node = node
        self.version = version
        self.boot = secrets.token_hex(8)  # this run of the node: another process beating as it is named
        self._every = every
        self._live_within = live_within
        self._deadline = deadline
        self._clock = clock
        self.up = True  # the stores opened the database just before
        self.since = clock()
        self.error: str | None = None
        self.peers: tuple[str, ...] = (node,)  # as of the last beat that got through
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._beats = 0
        self._shared_name_logged = False
        self._task: asyncio.Task[None] | None = None
        self._leftovers: set[asyncio.Task[Any]] = set()

    @property
    def state(self) -> str:
        """ "up" or "down", as /status shows it."""
        return "up" if self.up else "down"

    @property
    def live_nodes(self) -> int:
        """How many nodes were live at the last beat that got through, this one included (at least 1)."""
        return max(1, len(self.peers))

    async def start(self) -> None:
        """Beat once (so the peers are known at once), then every second until `close`."""
        await self.beat()
        self._task = asyncio.create_task(self._run(), name="node-heartbeat")

    async def close(self) -> None:
        """Stop beating and close the heartbeat's connection (the node's row ages out by itself)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await settle(self._leftovers)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()

    async def beat(self) -> bool:
        """Write this node's heartbeat and read the live peers, True if it went through."""
        try:
            peers = await within(self._beat(), self._deadline, self._leftovers)
        except (psycopg.Error, TimeoutError, OSError) as exc:
            self._conn = None  # an abandoned beat still holds it (and closes it): the next beat connects anew
            self._went_down(reason(exc))
            return False
        self.peers = peers
        self._came_up()
        return True

    async def _run(self) -> None:
        """Beat every `every` seconds, counted from the start of one beat to the next."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.beat()
            except Exception:  # a bug must not stop the heartbeat for good
                log.exception("node_heartbeat_failed")
            await asyncio.sleep(max(0.0, self._every - (loop.time() - started)))

    async def _beat(self) -> tuple[str, ...]:
        """One heartbeat on the heartbeat's own connection, made again when it was broken."""
        if self._conn is not None:
            try:
                return await self._beat_on(self._conn)
            except psycopg.OperationalError:
                pass  # dropped while idle (a restarted server, a network device): one try on a new one
        self._conn = await psycopg.AsyncConnection.connect(
            self._database.info.url, autocommit=True, **self._database.info.kwargs()
        )
        return await self._beat_on(self._conn)

    async def _beat_on(self, conn: psycopg.AsyncConnection[Any]) -> tuple[str, ...]:
        """Write the heartbeat and read the live peers on `conn`; a connection that failed is closed."""
        try:
            row = await (
                await conn.execute(_BEAT, {"name": self.node, "version": self.version, "boot": self.boot})
            ).fetchone()
            rows = await (await conn.execute(_PEERS, (self._live_within,))).fetchall()
        except BaseException:  # a failed or abandoned beat: its connection is not used again
            if self._conn is conn:
                self._conn = None
            await conn.close()
            raise
        previous = None if row is None else row[0]
        self._beats += 1
        if self._beats > 1 and previous not in (None, self.boot) and not self._shared_name_logged:
            # Another process beat under this node's name since the last beat: two nodes share node.name.
            log.error("node_name_shared", node=self.node, detail="another running node has this node.name")
            self._shared_name_logged = True
        return tuple(str(name) for (name,) in rows)

    def _went_down(self, error: str) -> None:
        """Note that the database cannot be reached; logged once per outage."""
        self.error = error
        if self.up:
            self.up = False
            self.since = self._clock()
            log.warning("database_unreachable", node=self.node, error=error, live_nodes=self.live_nodes)

    def _came_up(self) -> None:
        """Note that the database answers again."""
        if not self.up:
            down_for = self._clock() - self.since
            self.up = True
            self.since = self._clock()
            log.info("database_reachable_again", node=self.node, down_s=round(down_for, 1))
        self.error = None


async def within(work: Awaitable[T], seconds: float, leftovers: set[asyncio.Task[Any]]) -> T:
    """Await `work` for at most `seconds`; past that, TimeoutError, and the work is cancelled and left to end.

    psycopg answers a cancellation by asking the server to cancel the query, which takes up to ten seconds
    more against a database that drops packets: the caller does not wait for that, `leftovers` holds it.
    """
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        _abandon(task, leftovers)
        raise
    if task in done:
        return task.result()
    _abandon(task, leftovers)
    raise TimeoutError(f"no answer from the database within {seconds:g} s")


def _abandon(task: asyncio.Task[Any], leftovers: set[asyncio.Task[Any]]) -> None:
    """Cancel a task and keep it referenced until it ends, its outcome read (nobody awaits it)."""
    task.cancel()
    leftovers.add(task)

    def ended(done: asyncio.Task[Any]) -> None:
        leftovers.discard(done)
        if not done.cancelled():
            done.exception()  # read: an error of abandoned work is not "never retrieved"

    task.add_done_callback(ended)


async def settle(leftovers: set[asyncio.Task[Any]]) -> None:
    """Cancel abandoned work again (which makes psycopg drop its connection at once) and let it end."""
    for task in list(leftovers):
        task.cancel()
    if leftovers:
        await asyncio.wait(list(leftovers), timeout=2)


def reason(exc: BaseException) -> str:
    """An error's first line, which libpq never fills with a password."""
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
