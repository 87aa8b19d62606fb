"""The database unreachable: heartbeats see it, /status and /metrics show it, seats keep to each node's share.

Each node reaches PostgreSQL through the suite's fault proxy, which refuses or blackholes its traffic on
demand while the database itself runs on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import psycopg
import pytest

from license_server.admin.app import create_admin_app
from license_server.admin.credentials import Secret
from license_server.admin.keys import Assets
from license_server.config import AdminConfig, DatabaseConfig
from license_server.storage.pg_nodes import Heartbeat
from license_server.storage.pg_seats import PgSeatLedger
from license_server.storage.postgres import Database, connect_info
from license_server.web.keys import SERVICES
from tests.admin_support import ADMIN_TOKEN
from tests.conftest import LICENSE, PRODUCT, Daemon, ServerFactory, send_form
from tests.fault_proxy import FaultProxy
from tests.test_proxy import activate_form
from tests.test_shared_console import Console, console  # noqa: F401 - the fixture, used by name

LIC = ("3349", "SHARE-SHARE-SHARE-SHARE")
DOWN_WITHIN = 2.5  # seconds: a beat every second, each given one second
UP_WITHIN = 2.5


async def until(check: Callable[[], bool], within: float, step: float = 0.05) -> float:
    """Wait until `check()` holds; returns the seconds it took (fails past `within`)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < within, f"not within {within} s"
        await asyncio.sleep(step)
    return time.monotonic() - started


def through(proxy: FaultProxy, url: str) -> str:
    """The database URL with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{proxy.port}"))


async def proxy_to(url: str) -> FaultProxy:
    """A started fault proxy in front of the database of `url`."""
    parts = urlsplit(url)
    assert parts.port is not None
    proxy = FaultProxy(("127.0.0.1", parts.port))
    await proxy.start()
    return proxy


async def proxied(opened: AsyncExitStack, pg_url: str) -> tuple[FaultProxy, Database]:
    """A fault proxy in front of the database and a pool through it, closed (proxy last) after the test."""
    proxy = await proxy_to(pg_url)
    opened.push_async_callback(proxy.stop)
    database = Database(connect_info(DatabaseConfig(url=through(proxy, pg_url))))
    await database.open()
    opened.push_async_callback(database.close)
    return proxy, database


@dataclass
class Node:
    """One node's database pool, heartbeat and seat ledger, reaching PostgreSQL through its own proxy."""

    proxy: FaultProxy
    database: Database
    heartbeat: Heartbeat
    seats: PgSeatLedger


@pytest.fixture
async def opened() -> AsyncIterator[AsyncExitStack]:
    """What a test opens, closed after it in reverse order."""
    async with AsyncExitStack() as stack:
        yield stack


async def node(
    opened: AsyncExitStack, pg_url: str, name: str, *, every: float = 1.0, live_within: float = 5.0
) -> Node:
    """Open a node behind a fresh fault proxy; closed (proxy last) when the test ends."""
    proxy, database = await proxied(opened, pg_url)
    heartbeat = Heartbeat(database, node=name, version="test", every=every, live_within=live_within)
    await heartbeat.start()
    opened.push_async_callback(heartbeat.close)
    seats = PgSeatLedger(database, node=name, heartbeat=heartbeat)
    await seats.open()
    opened.push_async_callback(seats.close)
    return Node(proxy, database, heartbeat, seats)


async def leases(pg_url: str) -> list[tuple[str, bool, str]]:
    """Every lease of LIC in the database: (machine, open, granted_by), by machine."""
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        rows = await (
            await conn.execute(
                "SELECT machine_code, open, granted_by FROM leases"
                " WHERE product_id = %s AND license_key = %s ORDER BY machine_code, id",
                LIC,
            )
        ).fetchall()
    return [(str(m), bool(o), str(g)) for m, o, g in rows]


class TestHeartbeat:
    """Each node's view of the database and of its peers."""

    async def test_refused_and_blackholed_go_down_and_come_back(
        self, opened: AsyncExitStack, pg_url: str
    ) -> None:
        """Down within about two seconds of either fault, with the reason; up again once it is gone."""
        a = await node(opened, pg_url, "node-a", live_within=2)  # a counts peers seen within 2 s
        b = await node(opened, pg_url, "node-b")
        await until(lambda: a.heartbeat.peers == ("node-a", "node-b"), within=2)
        assert (a.heartbeat.state, b.heartbeat.live_nodes) == ("up", 2)
        for fault in ("refuse", "blackhole"):
            await a.proxy.set(fault)
            assert await until(lambda: not a.heartbeat.up, within=DOWN_WITHIN) <= DOWN_WITHIN
            assert a.heartbeat.error, fault
            assert a.heartbeat.peers == ("node-a", "node-b")  # as of the last beat that got through
            assert b.heartbeat.up  # b's own path is fine
            await a.proxy.set("pass")
            await until(lambda: a.heartbeat.up, within=UP_WITHIN)
            assert a.heartbeat.error is None
        # A node gone longer than that (by the database's clock) is not a live peer.
        await b.heartbeat.close()
        await until(lambda: a.heartbeat.peers == ("node-a",), within=4)


class TestStatusAndMetrics:
    """/status and /metrics show the database's state and the node's peers; /readyz stays 200."""

    async def test_down_and_up_again(
        self, daemon_factory: Callable[..., Awaitable[Daemon]], pg_url: str, opened: AsyncExitStack
    ) -> None:
        proxy = await proxy_to(pg_url)
        opened.push_async_callback(proxy.stop)
        secret_url = through(proxy, pg_url).replace("@", ":hunter2-secret@", 1)  # loopback trust: ignored
        daemon = await daemon_factory(f"database.url={secret_url}", "node.name=solo")
        opened.push_async_callback(daemon.stop)
        heartbeat = daemon.app[SERVICES].heartbeat
        assert heartbeat is not None

        async def look() -> tuple[dict[str, object], str, int]:
            async with aiohttp.ClientSession() as session:
                async with session.get(daemon.base + "/status") as response:
                    document = await response.json()
                async with session.get(daemon.base + "/metrics") as response:
                    metrics = await response.text()
                async with session.get(daemon.base + "/readyz") as response:
                    ready = response.status
            return document["database"], metrics, ready

        shown, metrics, ready = await look()
        assert (shown["state"], shown["error"], shown["peers"], shown["live_nodes"]) == (
            "up",
            None,
            ["solo"],
            1,
        )
        assert "license_server_database_up 1.0" in metrics.splitlines()
        assert "license_server_live_nodes 1.0" in metrics.splitlines()
        await proxy.set("refuse")
        await until(lambda: not heartbeat.up, within=DOWN_WITHIN)
        shown, metrics, ready = await look()
        assert shown["state"] == "down"
        assert isinstance(shown["error"], str)
        assert shown["error"]
        assert "hunter2" not in str(shown) + metrics
        assert isinstance(shown["since"], str)
        assert shown["since"].endswith("Z")
        assert (shown["peers"], shown["live_nodes"]) == (["solo"], 1)
        assert "license_server_database_up 0.0" in metrics.splitlines()
        assert ready == 200  # riding out the outage is the node's job
        await proxy.set("pass")
        await until(lambda: heartbeat.up, within=UP_WITHIN)
        shown, metrics, ready = await look()
        assert (shown["state"], shown["error"], ready) == ("up", None, 200)
        assert "license_server_database_up 1.0" in metrics.splitlines()


class TestSeatShares:
    """With the database unreachable, each node grants within floor(bound / live nodes)."""

    async def test_three_nodes_keep_to_their_shares_and_write_them_back(
        self, opened: AsyncExitStack, pg_url: str
    ) -> None:
        """Limit 10, 3 live nodes: at most 3 regular seats and 1 overdraft each; written once, after."""
        nodes = [await node(opened, pg_url, f"node-{n}") for n in "abc"]
        nodes[0].seats.set_limit(LIC, 10)
        await nodes[0].seats.flush()
        await until(lambda: all(n.heartbeat.live_nodes == 3 for n in nodes), within=2)
        await until(lambda: all(n.seats.limit(LIC) == 10 for n in nodes), within=2)
        for n, fault in zip(nodes, ("refuse", "refuse", "blackhole"), strict=True):
            await n.proxy.set(fault)
        await until(lambda: not any(n.heartbeat.up for n in nodes), within=DOWN_WITHIN)

        granted: dict[str, list[bool]] = {}
        for n in nodes:
            name = n.heartbeat.node
            machines = ["ws-shared", *(f"ws-{name}-{i}" for i in range(4))]
            granted[name] = [await n.seats.take(LIC, m, 60, 0) for m in machines]
            assert await n.seats.take(LIC, "ws-shared", 60, 0)  # a machine's own lease renews
            assert await n.seats.take(LIC, f"ws-{name}-od", 60, 3)  # floor(3 / 3) overdraft
            assert not await n.seats.take(LIC, f"ws-{name}-od2", 60, 3)
        assert granted == {name: [True, True, True, False, False] for name in ("node-a", "node-b", "node-c")}

        started = time.monotonic()
        for n in nodes:
            await n.proxy.set("pass")
        await until(lambda: all(n.heartbeat.up for n in nodes), within=UP_WITHIN)
        expected = sorted(
            ["ws-shared"]
            + [f"ws-node-{n}-{i}" for n in "abc" for i in (0, 1)]
            + [f"ws-node-{n}-od" for n in "abc"]
        )

        async def written() -> bool:
            return [m for m, _, _ in await leases(pg_url)] == expected

        while not await written():
            assert time.monotonic() - started < 10, await leases(pg_url)
            await asyncio.sleep(0.2)
        rows = await leases(pg_url)
        assert all(is_open and by == "local" for _, is_open, by in rows), rows  # one row, one open lease each
        # Back on the database, the bound is the whole license again, counted from what is in it: 7 regular.
        await until(lambda: all(n.seats.in_use().get(LIC) == 10 for n in nodes), within=3)
        assert [await nodes[0].seats.take(LIC, f"ws-late-{i}", 60, 0) for i in range(4)] == [True] * 3 + [
            False
        ]


async def test_take_gives_up_on_a_blackholed_database_within_a_second(
    opened: AsyncExitStack, pg_url: str
) -> None:
    """Before the heartbeat notices, a take waits about a second for the database, then grants by share."""
    solo = await node(opened, pg_url, "solo", every=3600)  # its heartbeat still says up
    solo.seats.set_limit(LIC, 2)
    await solo.seats.flush()
    await solo.proxy.set("blackhole")
    started = time.monotonic()
    assert await solo.seats.take(LIC, "ws-1", 60, 0)  # one live node: the whole bound is its share
    assert time.monotonic() - started < 1.5
    assert solo.heartbeat.up
    await solo.proxy.set("pass")
    assert await solo.heartbeat.beat()
    started = time.monotonic()
    while [m for m, _, _ in await leases(pg_url)] != ["ws-1"]:
        assert time.monotonic() - started < 5
        await asyncio.sleep(0.2)


class TestConsoleApi:
    """With the database out of reach the console's API answers at once: what it cannot read, it says so."""

    async def test_license_file_and_machines(
        self,
        daemon_factory: Callable[..., Awaitable[Daemon]],
        aiohttp_server: ServerFactory,
        pg_url: str,
        opened: AsyncExitStack,
    ) -> None:
        """Refused: a kept answer's license file and the machines list answer errors within seconds."""
        proxy = await proxy_to(pg_url)
        opened.push_async_callback(proxy.stop)
        daemon = await daemon_factory(f"database.url={through(proxy, pg_url)}", "node.name=solo")
        opened.push_async_callback(daemon.stop)
        status, _, _ = await send_form(daemon.base, "/api/key/activate", activate_form(machine="ws-db"))
        assert status == 200
        services = daemon.app[SERVICES]
        await services.store.flush()
        await services.licensing.seats.flush()
        assets = await asyncio.to_thread(Assets.load)
        admin = await aiohttp_server(
            create_admin_app(services, AdminConfig(), Secret(ADMIN_TOKEN), None, assets), host="127.0.0.1"
        )
        base = f"http://127.0.0.1:{admin.port}"
        bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        target = {"product_id": str(PRODUCT), "key": LICENSE, "machine_code": "ws-db"}

        async def get(path: str, params: dict[str, str]) -> tuple[int, Any]:
            async with (
                aiohttp.ClientSession() as session,
                session.get(base + path, params=params, headers=bearer) as response,
            ):
                if response.content_type != "application/json":  # a license file
                    return response.status, await response.read()
                return response.status, await response.json()

        status, found = await get("/api/v1/machines", {"sort": "runway"})
        assert status == 200, found
        assert [(m["machine_code"], m["limited_by"]) for m in found["machines"]] == [
            ("ws-db", "keep.max_age")
        ]
        assert (await get("/api/v1/license-file", target))[0] == 200
        await proxy.set("refuse")
        heartbeat = services.heartbeat
        assert heartbeat is not None
        await until(lambda: not heartbeat.up, within=DOWN_WITHIN)
        started = time.monotonic()
        status, found = await get("/api/v1/license-file", target)
        assert status == 503, found
        assert "shared database cannot be reached" in found["message"]
        status, found = await get("/api/v1/machines", {"sort": "runway"})
        assert status == 503, found  # the ledger and the kept answers are in the database
        assert "cannot be read now" in found["error"]
        status, found = await get("/api/v1/licenses", {})
        assert status == 503, found
        assert "hunter2" not in str(found)
        assert time.monotonic() - started < 10  # never the pool's own 30 s each
