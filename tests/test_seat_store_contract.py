"""The seat store's contract, kept alike by the SQLite ledger and the PostgreSQL one several nodes share."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from license_server.config import DatabaseConfig
from license_server.storage.interfaces import SeatStore
from license_server.storage.pg_seats import PgSeatLedger
from license_server.storage.postgres import Database, connect_info
from license_server.storage.seats import LIMIT_REACHED, MachineRow, SeatLedger, Window
from tests.conftest import Clock

LIC = ("3349", "FLOAT-FLOAT-FLOAT-FLOAT")
REFRESH = 0.6  # a little more than the PostgreSQL ledger's view takes to read the others' changes


@dataclass
class Backend:
    """Opens seat stores of one kind on one ledger, moves their time on, and closes them after."""

    kind: str
    tmp_path: Path
    pg_url: str | None
    clock: Clock = field(default_factory=Clock)
    opened: list[tuple[SeatStore, Database | None]] = field(default_factory=list)

    async def node(self, name: str = "node-a", clock: Callable[[], float] | None = None) -> SeatStore:
        """A store on the shared ledger (SQLite: the one file; PostgreSQL: a node with its own pool)."""
        store: SeatStore
        database: Database | None = None
        if self.kind == "sqlite":
            store = SeatLedger(self.tmp_path / "seats.sqlite3", lease_clock=self.clock, clock=self.clock)
        else:
            assert self.pg_url is not None
            database = Database(connect_info(DatabaseConfig(url=self.pg_url)))
            await database.open()
            store = PgSeatLedger(database, node=name, clock=clock or time.time)
        self.opened.append((store, database))
        await store.open()
        return store

    async def reopen(self, store: SeatStore) -> SeatStore:
        """Close a store and open it again, as a restarted daemon does."""
        await self.close(store)
        return await self.node()

    async def close(self, store: SeatStore) -> None:
        """Close one store (and its node's pool)."""
        for entry in list(self.opened):
            if entry[0] is store:
                self.opened.remove(entry)
                await store.close()
                if entry[1] is not None:
                    await entry[1].close()

    async def wait(self, seconds: float) -> None:
        """Let time pass: the test clock for SQLite, the real one (the database's) for PostgreSQL."""
        if self.kind == "sqlite":
            self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each backend in turn; PostgreSQL on a fresh database of the test cluster."""
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    made = Backend(request.param, tmp_path, url)
    try:
        yield made
    finally:
        for store, _ in list(made.opened):
            await made.close(store)


async def machines_of(store: SeatStore) -> list[MachineRow]:
    """The machines the store's read side knows (a blocking snapshot, off the loop)."""

    def read() -> list[MachineRow]:
        with store.reader.snapshot() as snapshot:
            return snapshot.machines()

    return await asyncio.to_thread(read)


async def denials_of(store: SeatStore) -> int:
    """How many refusals the read side counts for LIC in the last and next hour."""
    now = time.time()
    window = Window(now - 3600, now + 3600, int(now - 3600), 7200)

    def read() -> int:
        with store.reader.snapshot() as snapshot:
            return sum(snapshot.denials(LIC, window).values())

    return await asyncio.to_thread(read)


class TestContract:
    """What every seat store does, whichever backend keeps it."""

    async def test_take_within_limit_refused_past_it(self, backend: Backend) -> None:
        """Two seats: two machines get one, the third none."""
        store = await backend.node()
        store.set_limit(LIC, 2)
        assert await store.take(LIC, "m1", 30, 0)
        assert await store.take(LIC, "m2", 30, 0)
        assert not await store.take(LIC, "m3", 30, 0)
        assert set(store.live(LIC)) == {"m1", "m2"}
        assert store.in_use() == {LIC: 2}
        assert store.limit(LIC) == 2

    async def test_no_limit_means_no_bound(self, backend: Backend) -> None:
        """MaxNoOfMachines 0: every machine gets a seat."""
        store = await backend.node()
        store.set_limit(LIC, 0)
        assert all([await store.take(LIC, f"m{i}", 30, 0) for i in range(5)])
        assert store.in_use() == {LIC: 5}

    async def test_overdraft(self, backend: Backend) -> None:
        """Past the limit, a seat of overdraft while the request allows one more."""
        store = await backend.node()
        store.set_limit(LIC, 1)
        assert await store.take(LIC, "m1", 30, 1)
        assert await store.take(LIC, "m2", 30, 1)
        assert not await store.take(LIC, "m3", 30, 1)
        live = store.live(LIC)
        assert not live["m1"].overdraft
        assert live["m2"].overdraft

    async def test_renew_own_lease(self, backend: Backend) -> None:
        """A machine holding a seat renews it when the license is full, and the renewal moves its expiry."""
        store = await backend.node()
        store.set_limit(LIC, 1)
        assert await store.take(LIC, "m1", 1.5, 0)
        await backend.wait(1.0)
        assert await store.take(LIC, "m1", 1.5, 0)  # full, but its own
        assert not await store.take(LIC, "m2", 1.5, 0)
        await backend.wait(1.0)  # past the first expiry, within the renewed one
        assert set(store.live(LIC)) == {"m1"}
        assert not await store.take(LIC, "m2", 1.5, 0)

    async def test_expiry_frees_the_seat(self, backend: Backend) -> None:
        """A lease not renewed in time lets another machine in."""
        store = await backend.node()
        store.set_limit(LIC, 1)
        assert await store.take(LIC, "m1", 1, 0)
        assert not await store.take(LIC, "m2", 1, 0)
        await backend.wait(1.2)
        assert store.live(LIC) == {}
        assert store.in_use() == {}
        assert await store.take(LIC, "m2", 1, 0)
        assert set(store.live(LIC)) == {"m2"}

    async def test_release_frees_the_seat(self, backend: Backend) -> None:
        """A deactivation passed through frees the machine's seat at once."""
        store = await backend.node()
        store.set_limit(LIC, 1)
        assert await store.take(LIC, "m1", 30, 0)
        await store.released(LIC, "m1")
        assert store.live(LIC) == {}
        assert await store.take(LIC, "m2", 30, 0)

    async def test_granted_by_upstream(self, backend: Backend) -> None:
        """An upstream seat counts against the bound; its holder renews it; a change of kind replaces it."""
        store = await backend.node()
        store.set_limit(LIC, 1)
        await store.granted(LIC, "m1", 30, overdraft=False)
        assert set(store.live(LIC)) == {"m1"}
        assert not await store.take(LIC, "m2", 30, 0)
        assert await store.take(LIC, "m1", 30, 0)
        await store.granted(LIC, "m1", 30, overdraft=False)  # renewed
        await store.granted(LIC, "m2", 30, overdraft=True)
        await store.granted(LIC, "m2", 30, overdraft=True)
        assert {m: lease.overdraft for m, lease in store.live(LIC).items()} == {"m1": False, "m2": True}
        await store.granted(LIC, "m2", 30, overdraft=False)
        assert not store.live(LIC)["m2"].overdraft
        store = await backend.reopen(store)
        assert {m: lease.overdraft for m, lease in store.live(LIC).items()} == {"m1": False, "m2": False}

    async def test_unknown_limit_refuses(self, backend: Backend) -> None:
        """Without a signed license seen there is nothing to bound seats by: none is granted offline."""
        store = await backend.node()
        assert store.limit(LIC) is None
        assert not await store.take(LIC, "m1", 30, 5)
        assert store.live(LIC) == {}

    async def test_leases_and_limits_survive_a_restart(self, backend: Backend) -> None:
        """What a store granted is there when it opens again, and the bound still holds."""
        store = await backend.node()
        store.set_limit(LIC, 2)
        assert await store.take(LIC, "m1", 30, 0)
        await store.granted(LIC, "m2", 30, overdraft=False)
        store = await backend.reopen(store)
        assert store.limit(LIC) == 2
        assert set(store.live(LIC)) == {"m1", "m2"}
        assert not await store.take(LIC, "m3", 30, 0)

    async def test_seen_and_flush_make_machines_visible(self, backend: Backend) -> None:
        """Calls summed in memory reach the read side at flush; a release marks the machine deactivated."""
        store = await backend.node()
        for _ in range(3):
            store.seen(LIC, "m1", friendly_name="WS-1", client="10.0.0.7", floating=True)
        store.seen(LIC, "m2", friendly_name="", client="10.0.0.8", floating=False)
        await store.flush()
        rows = {row.machine_code: row for row in await machines_of(store)}
        assert set(rows) == {"m1", "m2"}
        assert (rows["m1"].friendly_name, rows["m1"].calls, rows["m1"].client) == ("WS-1", 3, "10.0.0.7")
        assert rows["m1"].floating
        assert not rows["m2"].floating
        assert rows["m1"].deactivated is None
        await store.released(LIC, "m1")
        rows = {row.machine_code: row for row in await machines_of(store)}
        assert rows["m1"].deactivated is not None
        store.seen(LIC, "m1", friendly_name="", client="10.0.0.7", floating=True)
        await store.flush()
        rows = {row.machine_code: row for row in await machines_of(store)}
        assert (rows["m1"].friendly_name, rows["m1"].calls, rows["m1"].deactivated) == ("WS-1", 4, None)

    async def test_seen_is_written_within_a_second_without_flush(self, backend: Backend) -> None:
        """The summed calls are written by a timer, not only at flush."""
        store = await backend.node()
        store.seen(LIC, "m1", friendly_name="WS-1", client="10.0.0.7", floating=True)
        await asyncio.sleep(1.5)
        assert [row.machine_code for row in await machines_of(store)] == ["m1"]

    async def test_denials_are_kept(self, backend: Backend) -> None:
        """Refusals reach the read side."""
        store = await backend.node()
        store.denied(LIC, "m1", by="local", message=LIMIT_REACHED, interval=300)
        store.denied(LIC, "m2", by="upstream", message=LIMIT_REACHED, interval=0)
        await store.flush()
        assert await denials_of(store) == 2

    async def test_denials_keep_the_interval_asked_for(self, backend: Backend) -> None:
        """Each refusal reaches the read side with its machine and the seconds it asked a seat for."""
        store = await backend.node()
        store.denied(LIC, "m1", by="local", message=LIMIT_REACHED, interval=300)
        store.denied(LIC, "m2", by="upstream", message=LIMIT_REACHED, interval=0)
        await store.flush()
        now = time.time()
        window = Window(now - 3600, now + 3600, int(now - 3600), 7200)

        def read() -> list[tuple[str, float | None]]:
            with store.reader.snapshot() as snapshot:
                return [(wish.machine, wish.interval) for wish in snapshot.wishes(LIC, window)]

        assert await asyncio.to_thread(read) == [("m1", 300.0), ("m2", 0.0)]


class TestSeveralNodes:
    """The PostgreSQL ledger: one bound, one clock, for every node."""

    @pytest.fixture
    async def pg(self, pg_url: str, tmp_path: Path) -> AsyncIterator[Backend]:
        """The PostgreSQL backend alone."""
        made = Backend("postgres", tmp_path, pg_url)
        try:
            yield made
        finally:
            for store, _ in list(made.opened):
                await made.close(store)

    async def test_fifty_over_three_nodes_grant_exactly_ten(self, pg: Backend) -> None:
        """50 concurrent takes of distinct machines spread over 3 nodes, 10 seats: exactly 10, every time."""
        nodes = [await pg.node(f"node-{n}") for n in "abc"]
        for round_ in range(5):
            license = ("3349", f"RACE-{round_}")
            nodes[round_ % 3].set_limit(license, 10)
            await nodes[round_ % 3].flush()
            takers = itertools.cycle(nodes)
            results = await asyncio.gather(
                *(next(takers).take(license, f"ws-{i:02d}", 60, 0) for i in range(50))
            )
            assert sum(results) == 10, f"round {round_} granted {sum(results)}"
            await asyncio.sleep(REFRESH)
            assert [node.in_use().get(license) for node in nodes] == [10, 10, 10]

    async def test_others_see_grants_releases_and_limits(self, pg: Backend) -> None:
        """What one node grants, releases or learns shows on the others within a second."""
        a, b = await pg.node("node-a"), await pg.node("node-b")
        a.set_limit(LIC, 2)
        assert await a.take(LIC, "m1", 30, 0)
        await a.granted(LIC, "m2", 30, overdraft=False)
        await asyncio.sleep(REFRESH)
        assert b.limit(LIC) == 2
        assert set(b.live(LIC)) == {"m1", "m2"}
        assert not await b.take(LIC, "m3", 30, 0)
        await b.released(LIC, "m1")
        await asyncio.sleep(REFRESH)
        assert set(a.live(LIC)) == {"m2"}
        assert await a.take(LIC, "m3", 30, 0)

    async def test_node_clock_off_changes_no_lease(self, pg: Backend) -> None:
        """Nodes whose clocks are 10 minutes ahead and behind give leases the expiry the database gives."""
        watcher = await pg.node("node-right")
        ahead = await pg.node("node-ahead", clock=lambda: time.time() + 600)
        behind = await pg.node("node-behind", clock=lambda: time.time() - 600)
        ahead.set_limit(LIC, 4)
        started = time.time()
        assert await ahead.take(LIC, "m1", 2, 0)
        assert await behind.take(LIC, "m2", 2, 0)
        await ahead.granted(LIC, "m3", 2, overdraft=False)
        await behind.granted(LIC, "m4", 2, overdraft=False)
        await asyncio.sleep(REFRESH)
        for node in (watcher, ahead, behind):
            live = node.live(LIC)
            assert set(live) == {"m1", "m2", "m3", "m4"}
            for lease in live.values():
                assert started + 2 <= lease.expires < started + 2 + REFRESH + 0.5
        await asyncio.sleep(max(0.0, started + 2.1 - time.time()))
        assert [node.in_use() for node in (watcher, ahead, behind)] == [{}, {}, {}]

    async def test_expiry_is_judged_by_the_database_clock(self, pg: Backend) -> None:
        """A node 10 minutes ahead finds the seat taken until the database lets it lapse; then it is free."""
        right = await pg.node("node-right")
        ahead = await pg.node("node-ahead", clock=lambda: time.time() + 600)
        behind = await pg.node("node-behind", clock=lambda: time.time() - 600)
        right.set_limit(LIC, 1)
        assert await right.take(LIC, "m1", 1.5, 0)
        assert not await ahead.take(LIC, "m2", 1.5, 0)
        await asyncio.sleep(1.6)
        assert await behind.take(LIC, "m3", 1.5, 0)
        assert not await ahead.take(LIC, "m2", 1.5, 0)
        assert not await right.take(LIC, "m1", 1.5, 0)
