"""Kept answers in the shared PostgreSQL database: written in group commits, dropped on every node at once.

Every node may hold answers in memory (`licensing.cache.AnswerCache`); a node that drops answers says what
went in the transaction that deletes them, twice: a NOTIFY, which every node hears at once on a connection of
its own, and a row in `answer_drops`, which every node reads twice a second. NOTIFY is a hint: it is lost
while a listener reconnects and never arrives through pgbouncer in transaction mode; the rows are what holds,
so an answer dropped through any node stops being served everywhere within a second, and answers held in
memory never cost a database read.

No call waits on the database for more than about a second: a write it does not take within that (or at
once while the heartbeat says it is down) goes to the node's spool (storage.spool) and is written, in
order, once it answers; reads see what waits there, and a read from the database is given up after a
second (not tried while the heartbeat says it is down).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, LiteralString

import psycopg
import structlog

from license_server.background import GroupCommit
from license_server.storage.answers import Kept, KeptActivation
from license_server.storage.interfaces import Forgotten, StoreUnreachableError
from license_server.storage.pg_nodes import settle, within
from license_server.storage.postgres import ConnectInfo, Database, DatabaseError
from license_server.storage.spool import DEADLINE, Spool

if TYPE_CHECKING:
    from license_server.storage.pg_nodes import Heartbeat

log = structlog.get_logger(__name__)

CHANNEL = "license_server_forget"
LISTENER_NAME = "license-server-listener"  # the listener connection's application_name
POLL_EVERY = 0.5  # seconds between reads of answer_drops: below one, with room for the read itself
# How far back each read of answer_drops looks past the previous one: a drop inserted before that read but
# committed after it (a slow transaction) is still found. Rows older than _DROPS_KEPT are pruned; a node that
# could not read for longer forgets everything it holds.
_DROPS_OVERLAP = 10.0
_DROPS_KEPT = 3600.0
_PAYLOAD_LIMIT = 7900  # PostgreSQL refuses a NOTIFY payload of 8000 bytes or more
_RECOUNT_EVERY = 10.0  # seconds between counts of the rows, which other nodes change too
_RETRY = (0.1, 5.0)  # the listener's first and longest pause between attempts to connect
_FINGERPRINT_SETTING = "fingerprint-key"
_KEY_BYTES = 32

# One statement per batch; a row changes only for an answer fetched no earlier than the one it holds, since
# nodes write the same cache key in any order. `xmax = 0` tells a new row from an updated one.
_UPSERT = """
INSERT INTO answers AS a (cache_key, method, product_id, license_key, machine_code, fetched_at, body, digest,
                          facts)
SELECT * FROM unnest(%s::bytea[], %s::text[], %s::text[], %s::text[], %s::text[], %s::float8[], %s::bytea[],
                     %s::bytea[], %s::text[])
ON CONFLICT (cache_key) DO UPDATE SET
    method = excluded.method, product_id = excluded.product_id, license_key = excluded.license_key,
    machine_code = excluded.machine_code, fetched_at = excluded.fetched_at, body = excluded.body,
    digest = excluded.digest, facts = excluded.facts
WHERE a.fetched_at <= excluded.fetched_at
RETURNING (xmax = 0)
"""

# The body only where the runway facts are missing or were read from another body (their digest differs).
_ACTIVATIONS = (
    "SELECT product_id, license_key, machine_code, fetched_at, facts,"
    " CASE WHEN substr(facts, 3, 16) = encode(substring(digest FROM 1 FOR 8), 'hex') THEN NULL ELSE body END"
    " FROM answers WHERE method = 'key/activate' AND machine_code <> ''"
)

Conn = psycopg.AsyncConnection[Any]
Lists = Callable[[bytes], bool]
# What a spooled drop covers: (license, machine code or None for all its answers, GetKey bodies it drops).
_Drop = tuple[tuple[str, str], str | None, Lists | None]
_UNREACHABLE = (psycopg.OperationalError, TimeoutError, OSError)  # the pool gives up with PoolTimeout


async def shared_fingerprint_key(database: Database) -> bytes:
    """The key of token fingerprints, made once and the same on every node (so are cache keys)."""
    async with database.pool.connection() as conn, conn.transaction():
        # Nodes starting together: the second insert waits for the first to commit, then does nothing, and
        # the select (a new snapshot under READ COMMITTED) sees the first node's key.
        await conn.execute(
            "INSERT INTO settings (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
            (_FINGERPRINT_SETTING, secrets.token_bytes(_KEY_BYTES)),
        )
        if (
            await conn.execute(
                "UPDATE settings SET value = %s WHERE name = %s AND octet_length(value) <> %s",
                (secrets.token_bytes(_KEY_BYTES), _FINGERPRINT_SETTING, _KEY_BYTES),
            )
        ).rowcount:
            log.error("fingerprint_key_corrupt_replaced", setting=_FINGERPRINT_SETTING)
        cursor = await conn.execute("SELECT value FROM settings WHERE name = %s", (_FINGERPRINT_SETTING,))
        row = await cursor.fetchone()
    if row is None:  # pragma: no cover - the statements above made it
        raise RuntimeError("the shared fingerprint key is missing")
    return bytes(row[0])


class PgAnswerStore:
    """Kept answers shared by every node; reads see this node's writes still queued."""

    def __init__(
        self,
        database: Database,
        *,
        listen: bool = True,
        poll: bool = True,
        heartbeat: Heartbeat | None = None,
        spool: Spool | None = None,
    ) -> None:
        self._db = database
        self._heartbeat = heartbeat
        # Without a spool of the node's (tests, tools), one in memory: kept until written or closed.
        self._own_spool = spool is None
        self._spool = spool or Spool(database, node=f"answers-{secrets.token_hex(4)}", heartbeat=heartbeat)
        self._spool.register("answers", self._apply, self._replayed)
        self._spooled: dict[bytes, tuple[int, Kept | None]] = {}  # spooled puts (None: dropped), by key
        self._spooled_drops: dict[int, _Drop] = {}  # spooled drops of a license's or machine's answers
        self._leftovers: set[asyncio.Task[Any]] = set()
        self._listen = listen  # tests turn either off to show that the other alone holds
        self._poll = poll
        self._drops_read: float | None = None  # the database's clock at the last read of answer_drops
        self._drops_seen: dict[int, float] = {}  # ids of drops already told, with when they were made
        self._pending: dict[bytes, Kept] = {}
        self._commits = GroupCommit(self._commit, self._ended, serial=True)
        self._kept = 0
        self._writing = 0  # this node's writes under way: a count of the rows taken meanwhile may be stale
        self._writes = 0  # this node's writes started, ever
        self._heard: list[Callable[[Forgotten], None]] = []
        self._listening = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def kept(self) -> int:
        """Kept answers: exact for this node's writes; other nodes' are counted in every few seconds."""
        return self._kept

    def on_forget(self, heard: Callable[[Forgotten], None]) -> None:
        """Call `heard` with what any node drops, and with `everything` after the listener (re)connects."""
        self._heard.append(heard)

    async def open(self) -> int:
        """Count the rows and start listening (waiting briefly for it); returns how many answers are kept."""
        if self._own_spool:
            await self._spool.open()
            await self._spool.start()
        await self._recount()
        self._tasks.append(asyncio.create_task(self._recounting(), name="answers-recount"))
        if self._poll:
            await self._read_drops()  # where this node starts reading: nothing is held in memory yet
            self._tasks.append(asyncio.create_task(self._polling(), name="answers-drops"))
        if self._listen:
            self._tasks.append(asyncio.create_task(self._listener(), name="answers-listener"))
            with contextlib.suppress(TimeoutError):  # answer_drops holds meanwhile; the listener retries
                async with asyncio.timeout(5):
                    await self._listening.wait()
        return self._kept

    def put(self, kept: Kept) -> asyncio.Future[None]:
        """Queue an answer for writing; the future is done once it is committed (or the write failed)."""
        self._pending[kept.cache_key] = kept
        batch = self._commits.add(kept)
        batch.done.add_done_callback(lambda _: self._landed(kept))
        # shielded: one caller cancelled (a call cut short) must not cancel the batch the others wait for
        return asyncio.shield(batch.done)

    def _landed(self, kept: Kept) -> None:
        """Stop serving a queued answer from the queue once its write ended."""
        if self._pending.get(kept.cache_key) is kept:
            del self._pending[kept.cache_key]

    async def _commit(self, batch: list[Kept]) -> None:
        """Write one batch of answers in one statement and one transaction, or spool it."""
        latest: dict[bytes, Kept] = {}
        for kept in batch:  # a statement may change a row only once: the newest answer of each key goes
            known = latest.get(kept.cache_key)
            if known is None or kept.fetched_at >= known.fetched_at:
                latest[kept.cache_key] = kept
        rows = list(latest.values())
        if not self._spool.must_spool():
            try:
                await within(self._upsert_now(rows), DEADLINE, self._leftovers)
            except _UNREACHABLE as exc:
                log.warning(
                    "database_write_spooled", store="answers", answers=len(rows), error=_first_line(exc)
                )
            else:
                return
        write_id = self._spool.next_id()
        for kept in rows:
            self._spooled[kept.cache_key] = (write_id, kept)
        await self._spool.append(write_id, "answers", "put", [_encode(kept) for kept in rows])

    async def _upsert_now(self, rows: list[Kept]) -> None:
        """Write answers on a connection of the pool (waiting for one no longer than the deadline)."""
        self._writing += 1
        self._writes += 1
        try:
            async with self._db.pool.connection(timeout=DEADLINE) as conn, conn.transaction():
                self._kept += await _upsert(conn, rows)
        finally:
            self._writing -= 1

    def _ended(self, batch: list[Kept], error: BaseException | None) -> None:
        """Log a batch that failed: its answers are not kept, and the daemon goes on."""
        if error is not None and not isinstance(error, asyncio.CancelledError):
            log.error("database_write_failed", database="answers", error=str(error), answers=len(batch))

    async def get(self, cache_key: bytes) -> Kept | None:
        """The kept answer for a cache key, or None; a row whose digest does not match is dropped."""
        if (pending := self._pending.get(cache_key)) is not None:
            return pending
        if (spooled := self._spooled.get(cache_key)) is not None:
            return spooled[1]
        if self._heartbeat is not None and not self._heartbeat.up:
            return None  # a call must not wait for a database known to be out of reach
        try:
            row = await within(self._read(cache_key), DEADLINE, self._leftovers)
        except _UNREACHABLE as exc:
            log.warning("database_read_failed", store="answers", error=_first_line(exc))
            return None
        if row is None or self._dropped_meanwhile(row[1], row[2], row[3], bytes(row[5])):
            return None
        method, product_id, license_key, machine_code, fetched_at, body, digest = row
        body = bytes(body)
        if hashlib.sha256(body).digest() != bytes(digest):
            log.error("store_entry_corrupt_dropped", product_id=product_id, license_key=license_key)
            # Only the damaged row: another node may have written a sound one since it was read.
            await self._delete(
                "DELETE FROM answers WHERE cache_key = %s AND fetched_at = %s AND digest = %s"
                " RETURNING cache_key",
                (cache_key, fetched_at, digest),
            )
            return None
        return Kept(cache_key, method, product_id, license_key, machine_code, float(fetched_at), body)

    async def _read(self, cache_key: bytes) -> Any:
        """The row of a cache key, or None."""
        async with self._db.pool.connection(timeout=DEADLINE) as conn:
            cursor = await conn.execute(
                "SELECT method, product_id, license_key, machine_code, fetched_at, body, digest"
                " FROM answers WHERE cache_key = %s",
                (cache_key,),
            )
            return await cursor.fetchone()

    def _dropped_meanwhile(self, product_id: str, license_key: str, machine_code: str, body: bytes) -> bool:
        """Whether a drop still waiting in the spool covers a row read from the database."""
        for license, machine, lists in self._spooled_drops.values():
            if license != (product_id, license_key):
                continue
            if machine is None or machine_code == machine:
                return True
            if machine_code == "" and lists is not None and lists(body):
                return True
        return False

    async def _spool_drop(self, op: str, payload: Any, drop: _Drop | None, keys: list[bytes]) -> int:
        """Spool a drop: reads stop serving what it covers at once; returns how many spooled answers went."""
        write_id = self._spool.next_id()
        if drop is not None:
            self._spooled_drops[write_id] = drop
        gone = 0
        for key, (_, kept) in list(self._spooled.items()):
            if kept is not None and (key in keys or (drop is not None and _covers(drop, kept))):
                self._spooled[key] = (write_id, None)
                gone += 1
        for key in keys:
            self._spooled[key] = (write_id, None)
        await self._spool.append(write_id, "answers", op, payload)
        return gone

    async def forget(self, product_id: str, license_key: str) -> int:
        """Drop the kept answers of a license on every node; returns how many rows went."""
        for key in [k for k, v in self._pending.items() if v.license == (product_id, license_key)]:
            del self._pending[key]
        await self._commits.flush()  # queued writes land first, so a forget is never undone by them
        if not self._spool.must_spool():
            try:
                return await within(self._forget_now(product_id, license_key), DEADLINE, self._leftovers)
            except _UNREACHABLE as exc:
                log.warning("database_write_spooled", store="answers", op="forget", error=_first_line(exc))
        drop: _Drop = ((product_id, license_key), None, None)
        return await self._spool_drop("forget", [product_id, license_key], drop, [])

    async def _forget_now(self, product_id: str, license_key: str) -> int:
        """Drop a license's answers in the database now."""
        self._writing += 1
        self._writes += 1
        try:
            async with self._db.pool.connection(timeout=DEADLINE) as conn, conn.transaction():
                gone = await _forget_license(conn, product_id, license_key)
            self._kept -= len(gone)
        finally:
            self._writing -= 1
        return len(gone)

    async def forget_machine(
        self, product_id: str, license_key: str, machine_code: str, lists: Callable[[bytes], bool]
    ) -> int:
        """Drop a machine's kept answers and the license's kept GetKey answers whose body `lists` it."""
        for key, kept in list(self._pending.items()):
            if kept.license == (product_id, license_key) and (
                kept.machine_code == machine_code or (kept.machine_code == "" and lists(kept.body))
            ):
                del self._pending[key]
        await self._commits.flush()
        if not self._spool.must_spool():
            try:
                return await within(
                    self._forget_machine_now(product_id, license_key, machine_code, lists),
                    DEADLINE,
                    self._leftovers,
                )
            except _UNREACHABLE as exc:
                log.warning(
                    "database_write_spooled", store="answers", op="forget_machine", error=_first_line(exc)
                )
        drop: _Drop = ((product_id, license_key), machine_code, lists)
        return await self._spool_drop("forget_machine", [product_id, license_key, machine_code], drop, [])

    async def _forget_machine_now(
        self, product_id: str, license_key: str, machine_code: str, lists: Lists
    ) -> int:
        """Drop a machine's answers in the database now."""
        self._writing += 1
        self._writes += 1
        try:
            async with self._db.pool.connection(timeout=DEADLINE) as conn, conn.transaction():
                gone = await _forget_machine(conn, product_id, license_key, machine_code, lists)
            self._kept -= len(gone)
        finally:
            self._writing -= 1
        return len(gone)

    async def forget_key(self, cache_key: bytes) -> None:
        """Drop one kept answer on every node."""
        self._pending.pop(cache_key, None)
        await self._commits.flush()
        if not self._spool.must_spool():
            try:
                await within(
                    self._delete(
                        "DELETE FROM answers WHERE cache_key = %s RETURNING cache_key", (cache_key,)
                    ),
                    DEADLINE,
                    self._leftovers,
                )
            except _UNREACHABLE as exc:
                log.warning(
                    "database_write_spooled", store="answers", op="forget_key", error=_first_line(exc)
                )
            else:
                return
        await self._spool_drop("forget_key", cache_key.hex(), None, [cache_key])

    async def _apply(self, conn: Conn, op: str, payload: Any) -> None:
        """Apply a spooled write in the spool's transaction (each is harmless applied twice)."""
        if op == "put":
            self._kept += await _upsert(conn, [_decode(row) for row in payload])
            return
        if op == "forget":
            gone = await _forget_license(conn, str(payload[0]), str(payload[1]))
        elif op == "forget_machine":
            product_id, license_key, machine_code = (str(x) for x in payload)
            lists = next(
                (
                    d[2]
                    for d in self._spooled_drops.values()
                    if d[0] == (product_id, license_key) and d[1] == machine_code
                ),
                None,
            )
            # Spooled by an earlier run: which GetKey answers list the machine is not known here, all go.
            gone = await _forget_machine(conn, product_id, license_key, machine_code, lists or _everything)
        elif op == "forget_key":
            cursor = await conn.execute(
                "DELETE FROM answers WHERE cache_key = %s RETURNING cache_key", (bytes.fromhex(str(payload)),)
            )
            gone = [bytes(key) for (key,) in await cursor.fetchall()]
            await _notify(conn, gone, None)
        else:
            raise RuntimeError(f"unknown answers write {op!r}")
        self._kept -= len(gone)

    def _replayed(self, write_id: int, op: str, payload: Any) -> None:
        """A spooled write landed: reads find it in the database from now on."""
        self._spooled_drops.pop(write_id, None)
        for key in [k for k, (i, _) in self._spooled.items() if i == write_id]:
            del self._spooled[key]

    async def _delete(
        self, statement: LiteralString, params: tuple[Any, ...], license: tuple[str, str] | None = None
    ) -> int:
        """Run a DELETE returning cache keys, telling every node in the same transaction; returns how many."""
        self._writing += 1
        self._writes += 1
        try:
            async with self._db.pool.connection() as conn, conn.transaction():
                cursor = await conn.execute(statement, params)
                gone = [bytes(key) for (key,) in await cursor.fetchall()]
                await _notify(conn, gone, license)
            self._kept -= len(gone)
        finally:
            self._writing -= 1
        return len(gone)

    async def kept_activations(
        self, product_id: str, license_key: str, machine_code: str
    ) -> list[tuple[bytes, float]]:
        """A machine's kept Activate answers as (body, fetched at), newest first; the caller verifies them.

        StoreUnreachableError at once while the heartbeat says the database is down, or when it gives no
        answer within about a second: an admin's page does not wait for the pool's own timeout.
        """
        await self._commits.flush()  # bounded: a batch the database does not take in time is spooled
        if self._heartbeat is not None and not self._heartbeat.up:
            raise StoreUnreachableError("the shared database cannot be reached")

        async def read() -> list[tuple[Any, Any]]:
            async with self._db.pool.connection(timeout=DEADLINE) as conn:
                cursor = await conn.execute(
                    "SELECT body, fetched_at FROM answers WHERE product_id = %s AND license_key = %s"
                    " AND machine_code = %s AND method = 'key/activate' ORDER BY fetched_at DESC",
                    (product_id, license_key, machine_code),
                )
                return await cursor.fetchall()

        try:
            rows = await within(read(), DEADLINE, self._leftovers)
        except _UNREACHABLE as exc:
            raise StoreUnreachableError(f"the shared database did not answer: {_first_line(exc)}") from None
        return [(bytes(body), float(fetched)) for body, fetched in rows]

    async def count(self) -> int:
        """How many answers are kept, counted from the rows once this node's queued writes have landed."""
        await self._commits.flush()
        async with self._db.pool.connection() as conn:
            row = await (await conn.execute("SELECT count(*) FROM answers")).fetchone()
        return int(row[0]) if row else 0

    async def _recount(self) -> None:
        """Set `kept` from the rows, unless a write of this node overlapped the count (it may be stale)."""
        writes = self._writes
        if self._writing:
            return
        async with self._db.pool.connection() as conn:
            row = await (await conn.execute("SELECT count(*) FROM answers")).fetchone()
        if row is not None and not self._writing and self._writes == writes:
            self._kept = int(row[0])

    async def _recounting(self) -> None:
        """Count the rows every so often: other nodes add and drop answers too."""
        while True:
            await asyncio.sleep(_RECOUNT_EVERY)
            try:
                await self._recount()
            except (psycopg.Error, OSError) as exc:  # the pool gives up with PoolTimeout, a psycopg.Error
                log.warning("answers_recount_failed", error=_first_line(exc))

    async def _polling(self) -> None:
        """Read answer_drops twice a second, for ever; a failed read is retried, memory is still served."""
        while True:
            await asyncio.sleep(POLL_EVERY)
            try:
                await self._read_drops()
            except (psycopg.Error, OSError) as exc:
                log.warning("answers_drops_read_failed", error=_first_line(exc))

    async def _read_drops(self) -> None:
        """Tell what nodes dropped since the last read (what NOTIFY told already is told again: harmless)."""
        since = self._drops_read
        async with self._db.pool.connection() as conn:
            now_row = await (await conn.execute("SELECT extract(epoch FROM clock_timestamp())")).fetchone()
            now = float(now_row[0]) if now_row else 0.0
            if since is None:
                self._drops_read = now
                return
            cursor = await conn.execute(
                "SELECT id, at, payload FROM answer_drops WHERE at > %s ORDER BY id",
                (since - _DROPS_OVERLAP,),
            )
            rows = await cursor.fetchall()
            if now - since > _DROPS_KEPT - _DROPS_OVERLAP:  # rows this node never read may be pruned
                self._tell(Forgotten(everything=True))
            await conn.execute("DELETE FROM answer_drops WHERE at < %s", (now - _DROPS_KEPT,))
        self._drops_read = now
        for drop_id, at, payload in rows:
            if drop_id not in self._drops_seen:
                self._drops_seen[drop_id] = float(at)
                self._tell(_heard(payload))
        horizon = now - 2 * _DROPS_OVERLAP
        self._drops_seen = {i: at for i, at in self._drops_seen.items() if at > horizon}

    def _tell(self, forgotten: Forgotten) -> None:
        """Hand what was dropped to every listener of this store."""
        for heard in self._heard:
            heard(forgotten)

    async def _listener(self) -> None:
        """Hold one connection LISTENing, reconnecting for ever; after each connect, drop everything held."""
        kwargs = {**self._db.info.kwargs(), "application_name": LISTENER_NAME, "autocommit": True}
        pause = _RETRY[0]
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._db.info.url, **kwargs)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    # Whatever was dropped while no one listened went unheard: memory starts again.
                    self._tell(Forgotten(everything=True))
                    self._listening.set()
                    pause = _RETRY[0]
                    async for notify in conn.notifies():
                        self._tell(_heard(notify.payload))
            except Exception as exc:  # noqa: BLE001 - whatever broke it, listening goes on
                log.warning("answers_listener_lost", error=_first_line(exc))
            finally:
                self._listening.clear()
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RETRY[1])

    async def flush(self) -> None:
        """Wait until every queued write has landed."""
        await self._commits.flush()

    async def close(self) -> None:
        """Flush queued writes and stop listening; the database's pool is closed by its owner."""
        await self._commits.flush()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await settle(self._leftovers)
        if self._own_spool:
            await self._spool.close()


async def _upsert(conn: Conn, rows: list[Kept]) -> int:
    """Write answers (a row changes only for one fetched no earlier); returns how many rows are new."""
    columns = (
        [k.cache_key for k in rows],
        [k.method for k in rows],
        [k.product_id for k in rows],
        [k.license_key for k in rows],
        [k.machine_code for k in rows],
        [k.fetched_at for k in rows],
        [k.body for k in rows],
        [hashlib.sha256(k.body).digest() for k in rows],
        [k.facts for k in rows],
    )
    cursor = await conn.execute(_UPSERT, columns)
    return sum(1 for (new,) in await cursor.fetchall() if new)


async def _forget_license(conn: Conn, product_id: str, license_key: str) -> list[bytes]:
    """Drop a license's answers, telling every node; returns the cache keys that went."""
    cursor = await conn.execute(
        "DELETE FROM answers WHERE product_id = %s AND license_key = %s RETURNING cache_key",
        (product_id, license_key),
    )
    gone = [bytes(key) for (key,) in await cursor.fetchall()]
    await _notify(conn, gone, (product_id, license_key))
    return gone


async def _forget_machine(
    conn: Conn, product_id: str, license_key: str, machine_code: str, lists: Lists
) -> list[bytes]:
    """Drop a machine's answers and the license's GetKey answers `lists` says list it, telling every node."""
    # Locked until the deletes: a node replacing one of them meanwhile waits, then finds it gone.
    cursor = await conn.execute(
        "SELECT cache_key, body FROM answers"
        " WHERE product_id = %s AND license_key = %s AND machine_code = '' FOR UPDATE",
        (product_id, license_key),
    )
    listing = [bytes(key) for key, body in await cursor.fetchall() if lists(bytes(body))]
    cursor = await conn.execute(
        "DELETE FROM answers WHERE product_id = %s AND license_key = %s AND machine_code = %s"
        " RETURNING cache_key",
        (product_id, license_key, machine_code),
    )
    gone = [bytes(key) for (key,) in await cursor.fetchall()]
    if listing:
        cursor = await conn.execute(
            "DELETE FROM answers WHERE cache_key = ANY(%s) RETURNING cache_key", (listing,)
        )
        gone += [bytes(key) for (key,) in await cursor.fetchall()]
    await _notify(conn, gone, (product_id, license_key))
    return gone


class PgAnswerReader:
    """The kept Activate answers in the shared database, for reports (blocking)."""

    def __init__(self, info: ConnectInfo) -> None:
        self.info = info

    def activations(self) -> Iterator[KeptActivation]:
        """Every kept Activate answer naming a machine; StoreUnreachableError if it cannot be read now."""
        try:
            with self.info.connect() as conn, conn.cursor(name="kept_activations") as cursor:
                cursor.itersize = 2000
                cursor.execute(_ACTIVATIONS)
                for product, license_key, machine, fetched, facts, body in cursor:
                    yield KeptActivation(
                        product,
                        license_key,
                        machine,
                        float(fetched),
                        facts,
                        None if body is None else bytes(body),
                    )
        except DatabaseError as exc:
            raise StoreUnreachableError(str(exc)) from None
        except psycopg.Error as exc:
            shown = self.info.shown
            raise StoreUnreachableError(
                f"cannot read the kept answers at {shown}: {_first_line(exc)}"
            ) from None


def _everything(body: bytes) -> bool:
    """Count every GetKey answer as listing the machine (the safe side: it is fetched again)."""
    return True


def _covers(drop: _Drop, kept: Kept) -> bool:
    """Whether a drop covers an answer."""
    license, machine, lists = drop
    if kept.license != license:
        return False
    if machine is None or kept.machine_code == machine:
        return True
    return kept.machine_code == "" and lists is not None and lists(kept.body)


def _encode(kept: Kept) -> list[Any]:
    """An answer as the spool keeps it (JSON)."""
    return [
        kept.cache_key.hex(),
        kept.method,
        kept.product_id,
        kept.license_key,
        kept.machine_code,
        kept.fetched_at,
        base64.b64encode(kept.body).decode(),
        kept.facts,
    ]


def _decode(row: list[Any]) -> Kept:
    """An answer read back from the spool."""
    key, method, product_id, license_key, machine_code, fetched_at, body, *facts = row  # no facts: spooled
    return Kept(
        bytes.fromhex(key),
        method,
        product_id,
        license_key,
        machine_code,
        float(fetched_at),
        base64.b64decode(body),
        facts[0] if facts else None,
    )


async def _notify(conn: Conn, gone: list[bytes], license: tuple[str, str] | None) -> None:
    """Tell every node, at this transaction's commit, which answers went (or their license, or all)."""
    if not gone:
        return
    payload = json.dumps({"keys": [key.hex() for key in gone]})
    if len(payload) > _PAYLOAD_LIMIT and license is not None:  # json.dumps writes ASCII only
        payload = json.dumps({"license": list(license)})
    if len(payload) > _PAYLOAD_LIMIT:
        payload = json.dumps({"all": True})
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
    await conn.execute("INSERT INTO answer_drops (payload) VALUES (%s)", (payload,))


def _heard(payload: str) -> Forgotten:
    """What a notification says was dropped; one that cannot be read drops everything."""
    try:
        told = json.loads(payload)
        if "keys" in told:
            return Forgotten(cache_keys=frozenset(bytes.fromhex(key) for key in told["keys"]))
        if "license" in told:
            product_id, license_key = told["license"]
            return Forgotten(license=(str(product_id), str(license_key)))
    except (ValueError, TypeError, KeyError):
        pass
    return Forgotten(everything=True)


def _first_line(exc: BaseException) -> str:
    """An error's first line, which libpq never fills with a password."""
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
