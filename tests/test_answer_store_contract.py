"""The kept answers' store, SQLite and PostgreSQL alike; and, shared by nodes, dropped by all at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from license_server.config import DatabaseConfig
from license_server.licensing.cache import AnswerCache
from license_server.licensing.runway import PacedReader
from license_server.licensing.signatures import load_keyring
from license_server.storage.answers import Kept, KeptActivation, SqliteAnswerReader, Store
from license_server.storage.interfaces import AnswerReader, AnswerStore
from license_server.storage.pg_answers import (
    LISTENER_NAME,
    PgAnswerReader,
    PgAnswerStore,
    shared_fingerprint_key,
)
from license_server.storage.postgres import Database, connect_info
from tests.fake_upstream import FakeCryptolens

P, L, OTHER = "3349", "MUYVD-LSEBY-CXHRQ-XFAGY", "KQXJA-WBTFA-PMOZE-RNFRS"
ACTIVATE, GET_KEY = "key/activate", "key/getkey"
BODY = bytes(range(256)) + b"\x00 not UTF-8: \xff\xfe"  # kept byte for byte, whatever it holds


def answer(
    name: str,
    *,
    method: str = ACTIVATE,
    license_key: str = L,
    machine: str = "alice",
    fetched_at: float = 1_700_000_000.0,
    body: bytes = BODY,
) -> Kept:
    """A kept answer whose cache key is derived from `name`."""
    key = hashlib.sha256(name.encode()).digest()
    return Kept(key, method, P, license_key, machine if method == ACTIVATE else "", fetched_at, body)


class Backend:
    """One backend's stores, opened on request (several on one database for PostgreSQL) and closed after."""

    def __init__(self, kind: str, path: Path, url: str | None) -> None:
        self.kind = kind
        self.path = path
        self.url = url
        self._opened: list[AnswerStore | Database] = []

    async def store(self, **options: Any) -> AnswerStore:
        """A store open on this backend's one file or database."""
        store: AnswerStore
        if self.url is None:
            store = Store(self.path)
        else:
            database = await self.database()
            store = PgAnswerStore(database, **options)
        await store.open()
        self._opened.append(store)
        return store

    def reader(self) -> AnswerReader:
        """The kept Activate answers as reports read them from this backend (blocking)."""
        if self.url is None:
            return SqliteAnswerReader(self.path)
        return PgAnswerReader(connect_info(DatabaseConfig(url=self.url)))

    async def database(self) -> Database:
        """A pool of this node's own on the shared database, migrated."""
        assert self.url is not None
        database = Database(connect_info(DatabaseConfig(url=self.url)))
        await database.open()
        self._opened.append(database)
        return database

    async def sql(self, statement: str, *params: object) -> None:
        """Change the rows behind the stores' backs, as damage on disk would."""

        def run() -> None:
            if self.url is None:
                with contextlib.closing(sqlite3.connect(self.path)) as db, db:
                    db.execute(statement.replace("%s", "?"), params)
            else:
                with psycopg.connect(self.url, autocommit=True) as conn:
                    conn.execute(statement, params)

        await asyncio.to_thread(run)

    async def close(self) -> None:
        """Close what was opened, newest first."""
        for opened in reversed(self._opened):
            await opened.close()


@pytest.fixture(params=["sqlite", "postgres"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Which backend a contract test runs against."""
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    return Backend(request.param, tmp_path / "answers.sqlite3", url)


@pytest.fixture
async def backend(where: Backend) -> AsyncIterator[Backend]:
    """The backend, its stores closed after the test."""
    yield where
    await where.close()


@pytest.fixture
async def pg(pg_url: str, tmp_path: Path) -> AsyncIterator[Backend]:
    """The PostgreSQL backend alone, for what several nodes share."""
    found = Backend("postgres", tmp_path / "unused", pg_url)
    yield found
    await found.close()


def same(a: Kept | None, b: Kept) -> bool:
    """Whether a kept answer read back is the one written, field for field and byte for byte."""
    return a is not None and (
        a.cache_key,
        a.method,
        a.product_id,
        a.license_key,
        a.machine_code,
        a.fetched_at,
        bytes(a.body),
    ) == (b.cache_key, b.method, b.product_id, b.license_key, b.machine_code, b.fetched_at, b.body)


class TestContract:
    """What every backend of kept answers does."""

    async def test_put_then_get_byte_for_byte(self, backend: Backend) -> None:
        store = await backend.store()
        kept = answer("a")
        done = store.put(kept)
        assert same(await store.get(kept.cache_key), kept)  # seen while still queued
        await done
        assert same(await store.get(kept.cache_key), kept)
        assert await store.get(hashlib.sha256(b"none").digest()) is None

    async def test_newer_answer_replaces_older(self, backend: Backend) -> None:
        store = await backend.store()
        await store.put(answer("a", body=b"old"))
        newer = answer("a", fetched_at=1_700_000_100.0, body=b"new")
        await store.put(newer)
        assert same(await store.get(newer.cache_key), newer)
        assert (await store.count(), store.kept) == (1, 1)

    async def test_forget_license(self, backend: Backend) -> None:
        store = await backend.store()
        for kept in (answer("a"), answer("b", method=GET_KEY), answer("c", license_key=OTHER)):
            store.put(kept)
        await store.flush()
        assert await store.forget(P, L) == 2
        assert await store.get(answer("a").cache_key) is None
        assert await store.get(answer("b").cache_key) is None
        assert same(await store.get(answer("c").cache_key), answer("c", license_key=OTHER))
        assert (await store.count(), store.kept) == (1, 1)

    async def test_forget_drops_queued_answers_too(self, backend: Backend) -> None:
        store = await backend.store()
        store.put(answer("a"))
        assert await store.forget(P, L) in (0, 1)
        assert await store.get(answer("a").cache_key) is None
        await store.flush()
        assert await store.get(answer("a").cache_key) is None

    async def test_forget_machine_and_get_keys_listing_it(self, backend: Backend) -> None:
        store = await backend.store()
        rows = [
            answer("alice"),
            answer("bob", machine="bob"),
            answer("listing", method=GET_KEY, body=b"[alice, bob]"),
            answer("not listing", method=GET_KEY, body=b"[bob]"),
            answer("other license", license_key=OTHER),
        ]
        for kept in rows:
            store.put(kept)
        await store.flush()
        assert await store.forget_machine(P, L, "alice", lambda body: b"alice" in body) == 2
        left = [kept.cache_key for kept in rows if await store.get(kept.cache_key) is not None]
        assert left == [rows[1].cache_key, rows[3].cache_key, rows[4].cache_key]
        assert (await store.count(), store.kept) == (3, 3)

    async def test_forget_key(self, backend: Backend) -> None:
        store = await backend.store()
        store.put(answer("a"))
        store.put(answer("b"))
        await store.flush()
        await store.forget_key(answer("a").cache_key)
        assert await store.get(answer("a").cache_key) is None
        assert await store.get(answer("b").cache_key) is not None
        assert (await store.count(), store.kept) == (1, 1)

    async def test_kept_activations_newest_first(self, backend: Backend) -> None:
        store = await backend.store()
        for n, at in enumerate((10.0, 30.0, 20.0)):
            store.put(answer(f"act{n}", fetched_at=at, body=f"body{at}".encode()))
        store.put(answer("get", method=GET_KEY, fetched_at=40.0))
        store.put(answer("bob", machine="bob", fetched_at=50.0))
        found = await store.kept_activations(P, L, "alice")  # queued ones included
        assert found == [(b"body30.0", 30.0), (b"body20.0", 20.0), (b"body10.0", 10.0)]

    async def test_reader_gives_the_facts_that_hold_else_the_body(self, backend: Backend) -> None:
        """Runway facts kept with an answer stand for its body, unless another writer replaced the body."""
        store = await backend.store()
        facts = f'["{hashlib.sha256(BODY).hexdigest()[:16]}",1,2,5,false]'
        store.put(dataclasses.replace(answer("f", machine="with-facts"), facts=facts))
        store.put(answer("n", machine="without"))
        store.put(dataclasses.replace(answer("s", machine="stale"), facts=facts))
        store.put(dataclasses.replace(answer("g", method=GET_KEY), facts=facts))  # not an activation
        await store.flush()
        other = b'{"result":0}'
        await backend.sql(  # as a node of an earlier version writes: body and digest, facts left alone
            "UPDATE answers SET body = %s, digest = %s WHERE cache_key = %s",
            other,
            hashlib.sha256(other).digest(),
            answer("s").cache_key,
        )
        reader = backend.reader()
        found = sorted(await asyncio.to_thread(lambda: list(reader.activations())))
        assert found == [
            KeptActivation(P, L, "stale", 1_700_000_000.0, facts, other),
            KeptActivation(P, L, "with-facts", 1_700_000_000.0, facts, None),
            KeptActivation(P, L, "without", 1_700_000_000.0, None, BODY),
        ]

    async def test_paced_reader_gives_every_answer_in_order(self, backend: Backend) -> None:
        """The runway watch's paced reading (a pause after every answer here) loses and reorders nothing."""
        store = await backend.store()
        for n in range(40):
            store.put(answer(f"m{n}", machine=f"machine-{n}", fetched_at=1_700_000_000.0 + n))
        await store.flush()
        reader = backend.reader()
        plain = await asyncio.to_thread(lambda: list(reader.activations()))
        paced = PacedReader(reader, work=0.0, pause=0.0)
        assert await asyncio.to_thread(lambda: list(paced.activations())) == plain
        assert len(plain) == 40

    async def test_count_and_kept_follow_every_change(self, backend: Backend) -> None:
        store = await backend.store()
        assert (await store.count(), store.kept) == (0, 0)
        for n in range(5):
            store.put(answer(f"a{n}"))
        store.put(answer("a0", fetched_at=1_800_000_000.0))  # the same key again: one answer
        await store.flush()
        assert (await store.count(), store.kept) == (5, 5)
        await store.forget_key(answer("a1").cache_key)
        assert (await store.count(), store.kept) == (4, 4)
        await store.forget(P, L)
        assert (await store.count(), store.kept) == (0, 0)

    async def test_close_makes_queued_answers_durable(self, backend: Backend) -> None:
        store = await backend.store()
        kept = [answer(f"a{n}", body=bytes([n]) * 1000) for n in range(20)]
        for one in kept:
            store.put(one)
        await store.close()
        again = await backend.store()
        assert again.kept == 20
        for one in kept:
            assert same(await again.get(one.cache_key), one)

    async def test_damaged_row_dropped(self, backend: Backend) -> None:
        store = await backend.store()
        store.put(answer("a"))
        store.put(answer("b"))
        await store.flush()
        await backend.sql(
            "UPDATE answers SET body = %s WHERE cache_key = %s", b"tampered", answer("a").cache_key
        )
        assert await store.get(answer("a").cache_key) is None
        assert (await store.count(), store.kept) == (1, 1)
        assert await store.get(answer("b").cache_key) is not None


class TestSharedByNodes:
    """Two nodes on one PostgreSQL database."""

    async def test_answer_kept_through_a_read_through_b(self, pg: Backend) -> None:
        a, b = await pg.store(), await pg.store()
        kept = answer("a")
        await a.put(kept)
        assert same(await b.get(kept.cache_key), kept)
        assert [body for body, _ in await b.kept_activations(P, L, "alice")] == [BODY]

    async def test_an_older_answer_never_replaces_a_newer(self, pg: Backend) -> None:
        a, b = await pg.store(), await pg.store()
        newer = answer("a", fetched_at=2_000.0, body=b"newer")
        await a.put(newer)
        await b.put(answer("a", fetched_at=1_000.0, body=b"older, written later"))
        assert same(await a.get(newer.cache_key), newer)
        assert same(await b.get(newer.cache_key), newer)

    async def test_fingerprint_key_the_same_on_every_node(self, pg: Backend) -> None:
        first, second = await pg.database(), await pg.database()
        keys = await asyncio.gather(shared_fingerprint_key(first), shared_fingerprint_key(second))
        assert len(keys[0]) == 32
        assert keys[0] == keys[1] == await shared_fingerprint_key(second)

    async def test_recount_sees_other_nodes(self, pg: Backend) -> None:
        a, b = await pg.store(), await pg.store()
        await a.put(answer("a"))
        assert (a.kept, b.kept) == (1, 0)
        assert isinstance(b, PgAnswerStore)
        await b._recount()
        assert b.kept == 1


async def kill_listeners(url: str) -> None:
    """End the listener connections of a database, as a restart of PostgreSQL or a network cut would."""

    def run() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s AND datname = current_database()",
                (LISTENER_NAME,),
            ).fetchall()
        assert rows, "no listener to kill"

    await asyncio.to_thread(run)


async def listeners(url: str) -> int:
    """How many listener connections the database has."""

    def run() -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                " AND datname = current_database() AND query LIKE 'LISTEN%%'",
                (LISTENER_NAME,),
            ).fetchone()
        return int(row[0]) if row else 0

    return await asyncio.to_thread(run)


async def stops_serving(cache: AnswerCache, keys: list[bytes], forgotten: float) -> float:
    """Seconds from a forget until the cache serves none of `keys`."""
    while True:
        served = [key for key in keys if await cache.get(key) is not None]
        if not served:
            return time.monotonic() - forgotten
        assert time.monotonic() - forgotten < 3, "still served 3 s after the forget"
        await asyncio.sleep(0.01)


FORGETS: dict[str, Callable[[AnswerStore, list[Kept]], Awaitable[object]]] = {
    "forget": lambda store, kept: store.forget(P, kept[0].license_key),
    "forget_machine": lambda store, kept: store.forget_machine(
        P, kept[0].license_key, "alice", lambda _: True
    ),
    "forget_key": lambda store, kept: asyncio.gather(*(store.forget_key(one.cache_key) for one in kept)),
}
# How node B stays told: NOTIFY alone, NOTIFY missed while its listener was killed (the reconnect drops
# memory), the drops table read twice a second without any listener, and as deployed.
WAYS: dict[str, tuple[dict[str, Any], bool]] = {
    "notify": ({"poll": False}, False),
    "reconnect": ({"poll": False}, True),
    "poll": ({"listen": False}, False),
    "default_killed": ({}, True),
}


class TestDroppedOnEveryNode:
    """A deactivation or refusal through node A stops node B serving what it dropped within a second."""

    @pytest.fixture
    def fake(self, vendor_key: rsa.RSAPrivateKey) -> FakeCryptolens:
        """Signs the answers, as upstream would."""
        fake = FakeCryptolens(vendor_key)
        fake.add_license(int(P), L)
        fake.add_license(int(P), OTHER)
        return fake

    def signed(self, fake: FakeCryptolens, name: str, license_key: str = L) -> Kept:
        """A kept Activate answer of alice's carrying a signature the cache accepts."""
        return answer(name, license_key=license_key, body=fake.sign_answer(fake.license(int(P), license_key)))

    @pytest.mark.parametrize("way", WAYS)
    @pytest.mark.parametrize("forget", FORGETS)
    async def test_dropped_within_a_second(
        self, pg: Backend, fake: FakeCryptolens, way: str, forget: str
    ) -> None:
        options, kill = WAYS[way]
        a = await pg.store(listen=False)
        b = await pg.store(**options)
        cache = AnswerCache(b, load_keyring([fake.public_key_xml]), 100)
        dropped, kept = [self.signed(fake, "a1"), self.signed(fake, "a2")], self.signed(fake, "b", OTHER)
        for one in [*dropped, kept]:
            await a.put(one)
            assert same(await cache.get(one.cache_key), one)  # now held in B's memory
        if kill:
            await kill_listeners(pg.url or "")
        await FORGETS[forget](a, dropped)
        assert await stops_serving(cache, [one.cache_key for one in dropped], time.monotonic()) < 1.0
        assert same(await cache.get(kept.cache_key), kept)
        if options.get("listen", True):
            for _ in range(300):
                if await listeners(pg.url or ""):
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the listener did not connect again")

    async def test_forgetting_many_answers_tells_the_license(self, pg: Backend, fake: FakeCryptolens) -> None:
        """More cache keys than a notification holds: the other nodes drop the whole license."""
        a = await pg.store(listen=False)
        b = await pg.store(poll=False)
        cache = AnswerCache(b, load_keyring([fake.public_key_xml]), 1000)
        body = fake.sign_answer(fake.license(int(P), L))
        many = [answer(f"a{n}", machine=f"m{n}", body=body) for n in range(200)]
        for one in many:
            a.put(one)
        await a.flush()
        for one in many:
            assert await cache.get(one.cache_key) is not None
        assert await a.forget(P, L) == 200
        assert await stops_serving(cache, [one.cache_key for one in many], time.monotonic()) < 1.0

    async def test_forgetting_a_license_too_long_to_name_drops_everything(
        self, pg: Backend, fake: FakeCryptolens
    ) -> None:
        """A notification that cannot even name the license drops all that other nodes hold."""
        a = await pg.store(listen=False)
        b = await pg.store(poll=False)
        cache = AnswerCache(b, load_keyring([fake.public_key_xml]), 1000)
        body = fake.sign_answer(fake.license(int(P), L))
        long_key = "K" * 9000
        many = [answer(f"a{n}", machine=f"m{n}", license_key=long_key, body=body) for n in range(200)]
        other = answer("other", body=body)
        for one in [*many, other]:
            a.put(one)
        await a.flush()
        for one in [*many, other]:
            assert await cache.get(one.cache_key) is not None
        await a.forget(P, long_key)
        assert await stops_serving(cache, [one.cache_key for one in many], time.monotonic()) < 1.0
        assert same(await cache.get(other.cache_key), other)  # read again from the database
