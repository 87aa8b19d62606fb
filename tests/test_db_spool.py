"""Upstream up, database down: calls are answered, and what they would have written waits in the node's spool.

Each node reaches PostgreSQL through the suite's fault proxy (tests/fault_proxy.py), which refuses or
blackholes its traffic on demand while the database itself runs on.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from license_server.storage.answers import Kept
from license_server.storage.pg_answers import PgAnswerStore
from license_server.storage.pg_seats import PgSeatLedger
from license_server.storage.spool import Spool
from license_server.storage.state import StateFolder
from license_server.web.keys import SERVICES
from tests.conftest import LICENSE, PRODUCT, TOKEN, Daemon, send_form
from tests.test_db_down import DOWN_WITHIN, UP_WITHIN, proxied, proxy_to, through, until

LIC = ("3349", "SPOOL-SPOOL-SPOOL-SPOOL")


@pytest.fixture
async def opened() -> AsyncIterator[AsyncExitStack]:
    """What a test opens, closed after it in reverse order."""
    async with AsyncExitStack() as stack:
        yield stack


def form(machine: str) -> dict[str, str]:
    """The form the Python SDK sends for Key.activate and Key.deactivate."""
    return {
        "token": TOKEN,
        "ProductId": str(PRODUCT),
        "key": LICENSE,
        "MachineCode": machine,
        "Sign": "True",
        "SignMethod": "1",
    }


async def rows(pg_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """The rows of a query, read straight from the database."""
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        return list(await (await conn.execute(query, params)).fetchall())  # type: ignore[arg-type]


async def machines(pg_url: str) -> dict[str, tuple[int, bool]]:
    """Machine code -> (calls, deactivated) for every machine in the ledger."""
    found = await rows(pg_url, "SELECT machine_code, calls, deactivated IS NOT NULL FROM machines")
    return {str(m): (int(c), bool(d)) for m, c, d in found}


async def answered(pg_url: str) -> list[str]:
    """The machine codes of the kept Activate answers in the database, sorted."""
    found = await rows(pg_url, "SELECT machine_code FROM answers WHERE method = 'key/activate'")
    return sorted(str(m) for (m,) in found)


def spooled(path: Path) -> int:
    """How many writes wait in a spool file (blocking)."""
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT count(*) FROM spool").fetchone()[0])


async def test_daemon_answers_while_the_database_is_down_and_writes_it_all_once_after(
    daemon_factory: Callable[..., Awaitable[Daemon]], pg_url: str, opened: AsyncExitStack
) -> None:
    """Refused, then blackholed: calls answer in time; rows land once, also across a restart while down."""
    proxy = await proxy_to(pg_url)
    opened.push_async_callback(proxy.stop)
    daemon = await daemon_factory(f"database.url={through(proxy, pg_url)}", "node.name=solo")
    opened.push_async_callback(daemon.stop)
    bound = daemon.config.upstream.timeout + 1

    async def call(path: str, machine: str) -> None:
        started = time.monotonic()
        status, _, _ = await send_form(daemon.base, path, form(machine))
        assert status == 200
        assert time.monotonic() - started < bound, path

    await call("/api/key/activate", "ws-gone")
    started = time.monotonic()
    while await answered(pg_url) != ["ws-gone"]:
        assert time.monotonic() - started < 3
        await asyncio.sleep(0.1)

    heartbeat = daemon.app[SERVICES].heartbeat
    assert heartbeat is not None
    await proxy.set("refuse")
    await until(lambda: not heartbeat.up, within=DOWN_WITHIN)
    await call("/api/key/activate", "ws-1")
    await call("/api/key/activate", "ws-2")
    await call("/api/key/deactivate", "ws-gone")
    waiting = await backlog(daemon)  # /status and /metrics show what waits for the database
    assert waiting["writes"] > 0
    assert waiting["audit_records"] >= 3  # the three calls' records, at least
    await daemon.stop()  # stopped with the database still down: the spool stays on disk
    spool_file = StateFolder(daemon.config.state_dir).spool
    assert await asyncio.to_thread(spooled, spool_file) > 0
    assert await answered(pg_url) == ["ws-gone"]

    await proxy.set("pass")
    await daemon.start()  # replays what the last run left before it serves
    assert await asyncio.to_thread(spooled, spool_file) == 0
    assert await answered(pg_url) == ["ws-1", "ws-2"]  # the deactivation dropped ws-gone's answer
    assert await machines(pg_url) == {"ws-gone": (1, True), "ws-1": (1, False), "ws-2": (1, False)}

    # Blackholed before the heartbeat notices: the call waits about a second for the database, no more.
    heartbeat = daemon.app[SERVICES].heartbeat
    assert heartbeat is not None
    await proxy.set("blackhole")
    await call("/api/key/activate", "ws-3")
    await until(lambda: not heartbeat.up, within=DOWN_WITHIN)
    await call("/api/key/activate", "ws-3")
    await proxy.set("pass")
    await until(lambda: heartbeat.up, within=UP_WITHIN)
    started = time.monotonic()
    while (await machines(pg_url)).get("ws-3") != (2, False):
        assert time.monotonic() - started < 5, await machines(pg_url)
        await asyncio.sleep(0.2)
    assert await answered(pg_url) == ["ws-1", "ws-2", "ws-3"]
    await asyncio.sleep(1)  # the replayer looks twice a second: nothing is written again
    assert (await machines(pg_url))["ws-3"] == (2, False)  # once, not again
    started = time.monotonic()
    while await backlog(daemon) != {"writes": 0, "audit_records": 0}:
        assert time.monotonic() - started < 5, await backlog(daemon)
        await asyncio.sleep(0.2)


async def backlog(daemon: Daemon) -> dict[str, int]:
    """What waits on the node for the database, as /status shows it; /metrics must say the same."""
    async with aiohttp.ClientSession() as session:
        async with session.get(daemon.base + "/status") as response:
            shown: dict[str, int] = (await response.json())["database"]["backlog"]
        async with session.get(daemon.base + "/metrics") as response:
            metrics = (await response.text()).splitlines()
    assert f"license_server_database_spooled_writes {shown['writes']:.1f}" in metrics
    assert f"license_server_audit_unshipped_records {shown['audit_records']:.1f}" in metrics
    return shown


async def test_answers_spooled_are_served_and_dropped_as_asked(
    pg_url: str, opened: AsyncExitStack, tmp_path: Path
) -> None:
    """Puts and a machine's drop made while the database refuses: reads see both; the database gets both."""
    proxy, database = await proxied(opened, pg_url)
    spool = Spool(database, node="n1", path=tmp_path / "spool.sqlite3")
    await spool.open()
    opened.push_async_callback(spool.close)
    store = PgAnswerStore(database, listen=False, spool=spool)  # the spool not started: replayed by hand
    await store.open()
    opened.push_async_callback(store.close)
    old = Kept(b"k-old", "key/activate", *LIC, "ws-old", 1.0, b"{}")
    keep = Kept(b"k-keep", "key/activate", *LIC, "ws-keep", 1.0, b"{}")
    await store.put(old)
    await store.put(keep)
    await proxy.set("refuse")
    new = Kept(b"k-new", "key/activate", *LIC, "ws-new", 2.0, b"{}")
    started = time.monotonic()
    await store.put(new)
    assert await store.forget_machine(*LIC, "ws-old", lambda _: False) == 0
    assert time.monotonic() - started < 2.5
    assert spool.backlog == 2
    assert await store.get(b"k-new") == new
    await proxy.set("pass")
    started = time.monotonic()
    while await store.get(b"k-keep") != keep:  # read from the database, once the pool connects again
        assert time.monotonic() - started < 10
        await asyncio.sleep(0.2)
    assert await store.get(b"k-old") is None  # in the database still, but its drop waits in the spool
    assert spool.backlog == 2
    await spool.drain()
    found = await rows(pg_url, "SELECT cache_key FROM answers ORDER BY cache_key")
    assert found == [(b"k-keep",), (b"k-new",)]
    assert len(await rows(pg_url, "SELECT * FROM answer_drops")) == 1


async def test_a_replay_cut_before_its_local_delete_is_not_applied_twice(
    pg_url: str, opened: AsyncExitStack, tmp_path: Path
) -> None:
    """A node killed between the database's commit and the spool's delete: its next start skips the write."""
    proxy, database = await proxied(opened, pg_url)
    path = tmp_path / "spool.sqlite3"
    first = Spool(database, node="n1", path=path)
    await first.open()
    seats = PgSeatLedger(database, node="n1", spool=first)
    await seats.open()
    await proxy.set("refuse")
    seats.denied(LIC, "ws-1", by="local", message="no seat", interval=60)
    seats.seen(LIC, "ws-1", friendly_name="one", client="127.0.0.1", floating=False)
    await seats.flush()
    assert first.backlog == 1
    await proxy.set("pass")
    ops = await first._read()  # the first half of a replay, then the node "dies"
    started = time.monotonic()
    while True:  # the pool connects again at its own pace
        try:
            await first._apply(ops)
            break
        except psycopg.Error:
            assert time.monotonic() - started < 10
            await asyncio.sleep(0.2)
    assert len(await rows(pg_url, "SELECT * FROM denials")) == 1

    second = Spool(database, node="n1", path=path)  # the next start, over the same file
    assert await second.open() == 1
    PgSeatLedger(database, node="n1", spool=second)  # registers how seat writes apply
    await second.start()
    assert second.backlog == 0
    assert len(await rows(pg_url, "SELECT * FROM denials")) == 1
    assert await machines(pg_url) == {"ws-1": (1, False)}
    await second.close()
    await seats.close()
    await first.close()
    assert len(await rows(pg_url, "SELECT * FROM denials")) == 1
