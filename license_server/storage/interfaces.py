"""What the rest of the daemon may ask of each durable store: the interfaces a second backend implements.

SQLite is the one implementation today (`answers.Store`, `seats.SeatLedger`, `seats.SqliteSeatReader`);
callers type against these protocols, so that another (PostgreSQL, for several nodes sharing state) can
stand beside it without a caller changing. Nothing outside `storage/` sees a connection or a statement.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from license_server.storage.answers import Kept, KeptActivation
from license_server.storage.seats import (
    Lease,
    License,
    LicenseLimit,
    MachineCount,
    MachineRow,
    NodeLocked,
    Window,
    Wish,
)

if TYPE_CHECKING:
    from license_server.storage.answers import Store
    from license_server.storage.seats import SeatLedger, SqliteSeatReader


class StoreUnreachableError(Exception):
    """The shared database behind a store cannot be reached now: a read that needs it cannot be answered."""


@dataclass(frozen=True, slots=True)
class Forgotten:
    """Answers dropped through another node (or everything: a notice may have gone unheard), to drop too."""

    cache_keys: frozenset[bytes] = frozenset()
    license: License | None = None  # every answer of this license
    everything: bool = False


class AnswerReader(Protocol):
    """The kept answers as reports read them, beside a daemon that may be writing (blocking)."""

    def activations(self) -> Iterator[KeptActivation]:
        """Every kept Activate answer naming a machine; StoreUnreachableError if they cannot be read now."""
        ...


class AnswerStore(Protocol):
    """Kept answers: written in the background, read back when upstream cannot answer."""

    @property
    def kept(self) -> int:
        """How many answers are kept, exact as of the last committed (or committing) write."""
        ...

    def on_forget(self, heard: Callable[[Forgotten], None]) -> None:
        """Call `heard` with answers other nodes drop (a store of one node never calls it)."""
        ...

    async def open(self) -> int:
        """Open (or create) the store; returns how many answers are kept."""
        ...

    def put(self, kept: Kept) -> asyncio.Future[None]:
        """Queue an answer for writing; the future is done once it is durable (or the write failed)."""
        ...

    async def get(self, cache_key: bytes) -> Kept | None:
        """The kept answer for a cache key (queued ones included), or None; a damaged one is dropped."""
        ...

    async def forget(self, product_id: str, license_key: str) -> int:
        """Drop the kept answers of a license; returns how many went."""
        ...

    async def forget_machine(
        self, product_id: str, license_key: str, machine_code: str, lists: Callable[[bytes], bool]
    ) -> int:
        """Drop a machine's kept answers and the license's kept GetKey answers whose body `lists` it."""
        ...

    async def forget_key(self, cache_key: bytes) -> None:
        """Drop one kept answer."""
        ...

    async def kept_activations(
        self, product_id: str, license_key: str, machine_code: str
    ) -> list[tuple[bytes, float]]:
        """A machine's kept Activate answers as (body, fetched at), newest first; the caller verifies them.

        StoreUnreachableError when a shared database does not answer within about a second.
        """
        ...

    async def count(self) -> int:
        """How many answers are kept, counted from the rows once queued writes have landed."""
        ...

    async def flush(self) -> None:
        """Wait until every queued write has landed."""
        ...

    async def close(self) -> None:
        """Flush and close."""
        ...


class SeatSnapshot(Protocol):
    """One consistent moment of the seat ledger, for reports and the console; blocking, run off the loop."""

    def licenses(self, product: str | None = None) -> list[License]:
        """The licenses with leases, activity or denials ever (of one product if given), in order."""
        ...

    def limit(self, license: License) -> int | None:
        """The license's seat limit (0: none), or None if no signed license was seen."""
        ...

    def limits(self) -> dict[License, LicenseLimit]:
        """The seat limit of every license a signed license was seen for."""
        ...

    def live_leases(self, now: float) -> dict[tuple[License, str], float]:
        """When each machine's live floating lease ends, by license and machine (the ledger's clock)."""
        ...

    def leases(self, license: License, window: Window) -> list[tuple[str, float, float]]:
        """The license's leases live in the window, cut to it: (machine, start, end), live on [start, end)."""
        ...

    def callers(self, license: License, window: Window) -> Iterator[tuple[int, str, int]]:
        """(bucket, machine, 1 if it called without a seat there) once per machine and bucket, by bucket."""
        ...

    def presence(self, license: License, window: Window) -> Iterator[tuple[int, int, int]]:
        """(bucket, machines that called, how many of them without a seat) for each bucket with calls."""
        ...

    def denials(self, license: License, window: Window) -> dict[int, int]:
        """Seats refused in each bucket that had a refusal."""
        ...

    def wishes(self, license: License, window: Window) -> list[Wish]:
        """The license's denials made in the window, in time order, with the interval each asked for."""
        ...

    def node_locked(self, idle_before: float) -> dict[License, NodeLocked]:
        """Per license, its node-locked machines not deactivated, and those of them last seen by then."""
        ...

    def machines(
        self, *, product: str | None = None, key: str | None = None, idle_before: float | None = None
    ) -> list[MachineRow]:
        """Machines by friendly name and key; with `idle_before`, the idle ones, longest idle first."""
        ...

    def machine(self, license: License, machine_code: str) -> MachineRow | None:
        """One machine of a license, if the ledger knows it."""
        ...

    def machine_counts(self) -> dict[License, MachineCount]:
        """How many machines each license has seen, and how many are not deactivated."""
        ...


class SeatReader(Protocol):
    """Opens snapshots of the seat ledger, in the daemon or in another process while the daemon writes."""

    def snapshot(self) -> AbstractContextManager[SeatSnapshot]:
        """One consistent read; LedgerMissingError without a ledger, LedgerUnreadableError if unreadable."""
        ...


class SeatStore(Protocol):
    """The seat ledger the daemon keeps: who holds which seat, machines and denials, asked and told."""

    @property
    def reader(self) -> SeatReader:
        """The read side of this ledger, for reports and the console."""
        ...

    async def open(self) -> int:
        """Open the ledger and load limits and live leases; returns how many leases are live."""
        ...

    def live(self, license: License) -> dict[str, Lease]:
        """The live leases of a license, by machine code."""
        ...

    def in_use(self) -> dict[License, int]:
        """Live floating seats per license."""
        ...

    def limit(self, license: License) -> int | None:
        """MaxNoOfMachines of the newest signed license seen (0: no limit), or None if never seen."""
        ...

    async def take(self, license: License, machine: str, interval: float, max_overdraft: int) -> bool:
        """Grant or renew a floating seat locally, atomically; True once durable, False if none is free."""
        ...

    def granted(
        self, license: License, machine: str, seconds: float, *, overdraft: bool
    ) -> asyncio.Future[None]:
        """Upstream granted or renewed a floating seat for `seconds` from now."""
        ...

    def released(self, license: License, machine: str) -> asyncio.Future[None]:
        """A deactivation passed through: the machine's seat is free, floating or node-locked."""
        ...

    def set_limit(self, license: License, max_machines: int) -> None:
        """Remember a signed license's MaxNoOfMachines."""
        ...

    def seen(
        self, license: License, machine: str, *, friendly_name: str, client: str, floating: bool
    ) -> None:
        """A machine's activation was licensed (written in the background, summed in memory meanwhile)."""
        ...

    def denied(self, license: License, machine: str, *, by: str, message: str, interval: float) -> None:
        """A seat was refused, by upstream or by the daemon in an outage; `interval`: seconds asked for."""
        ...

    async def flush(self) -> None:
        """Write what is summed in memory and wait until every queued write has landed."""
        ...

    async def close(self) -> None:
        """Flush and close."""
        ...


if TYPE_CHECKING:  # the SQLite classes implement the interfaces: mypy checks it here
    _ANSWERS: type[AnswerStore] = Store
    _SEATS: type[SeatStore] = SeatLedger
    _READER: type[SeatReader] = SqliteSeatReader
