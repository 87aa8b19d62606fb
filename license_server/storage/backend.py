"""Which stores a configuration gets: SQLite files in state_dir (one node), or the shared PostgreSQL database.

The one place that knows both backends; the rest of the daemon is handed the interfaces.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from license_server.config import Config
from license_server.storage.answers import SqliteAnswerReader, Store
from license_server.storage.interfaces import AnswerReader, AnswerStore, SeatReader, SeatStore
from license_server.storage.seats import LeaseClock, SeatLedger, SqliteSeatReader
from license_server.storage.state import StateFolder, load_fingerprint_key

if TYPE_CHECKING:
    from license_server.storage.pg_nodes import Heartbeat
    from license_server.storage.postgres import Database
    from license_server.storage.spool import Spool


@dataclass(slots=True)
class Stores:
    """The daemon's durable stores, open, with how many answers and leases they held at start."""

    answers: AnswerStore
    seats: SeatStore
    fingerprint_key: bytes  # keys the token fingerprint in cache keys: the same on every node sharing state
    kept: int
    live_leases: int
    database: Database | None  # None: the embedded SQLite stores
    heartbeat: Heartbeat | None = None  # with a database: this node's view of it and of its peers
    spool: Spool | None = None  # with a database: the writes waiting on this node's disk for it


async def open_stores(
    config: Config,
    opened: contextlib.AsyncExitStack,
    *,
    clock: Callable[[], float],
    lease_clock: Callable[[], LeaseClock],
) -> Stores:
    """Open the stores the configuration names; each is closed by `opened`, in reverse order."""
    if config.database.url is None:
        folder = StateFolder(config.state_dir)
        secret = await asyncio.to_thread(load_fingerprint_key, config.state_dir)
        answers: AnswerStore = Store(folder.answers)
        kept = await answers.open()
        opened.push_async_callback(answers.close)
        seats: SeatStore = SeatLedger(
            folder.seats, lease_clock=await asyncio.to_thread(lease_clock), clock=clock
        )
        live = await seats.open()
        opened.push_async_callback(seats.close)
        return Stores(answers, seats, secret, kept, live, None)
    # Imported here: a single node never loads the PostgreSQL stores.
    from license_server import __version__
    from license_server.storage.pg_answers import PgAnswerStore, shared_fingerprint_key
    from license_server.storage.pg_nodes import Heartbeat
    from license_server.storage.pg_seats import PgSeatLedger
    from license_server.storage.postgres import Database, connect_info
    from license_server.storage.spool import Spool

    info = await asyncio.to_thread(connect_info, config.database)
    database = Database(info)
    await database.open()
    opened.push_async_callback(database.close)
    heartbeat = Heartbeat(database, node=config.node.name, version=__version__)
    await heartbeat.start()
    opened.push_async_callback(heartbeat.close)
    secret = await shared_fingerprint_key(database)
    # Writes the database cannot take in time wait here; replayed at start and whenever it answers again.
    folder = StateFolder(config.state_dir)
    spool = Spool(database, node=config.node.name, path=folder.spool, heartbeat=heartbeat)
    await spool.open()
    opened.push_async_callback(spool.close)  # after the stores: their last writes may go to it
    answers = PgAnswerStore(database, heartbeat=heartbeat, spool=spool)
    seats = PgSeatLedger(database, node=config.node.name, clock=clock, heartbeat=heartbeat, spool=spool)
    await spool.start()  # both stores registered: an earlier run's writes land before any new one
    opened.push_async_callback(spool.stop)
    kept = await answers.open()
    opened.push_async_callback(answers.close)
    live = await seats.open()
    opened.push_async_callback(seats.close)
    return Stores(answers, seats, secret, kept, live, database, heartbeat, spool)


def answer_reader(config: Config) -> AnswerReader:
    """The read side of the kept answers the configuration names, for reports (blocking)."""
    if config.database.url is None:
        return SqliteAnswerReader(StateFolder(config.state_dir).answers)
    from license_server.storage.pg_answers import PgAnswerReader
    from license_server.storage.postgres import connect_info

    return PgAnswerReader(connect_info(config.database))


def seat_reader(config: Config) -> SeatReader:
    """The read side of the seat ledger the configuration names, for reports and the console (blocking)."""
    if config.database.url is None:
        return SqliteSeatReader(StateFolder(config.state_dir).seats)
    from license_server.storage.pg_seat_reader import PgSeatReader
    from license_server.storage.postgres import connect_info

    return PgSeatReader(connect_info(config.database))
