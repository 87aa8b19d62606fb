"""Slowing down token guessing: a wait per client address after a few wrong tokens, and a bound on how many
failed attempts the audit trail records, so neither guessing nor a flood of it gets far.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

FREE_FAILURES = 5  # wrong tokens an address may send in a row before it has to wait
FIRST_WAIT = 1.0  # seconds it then waits before its next token is checked; doubled with each wrong one
MAX_WAIT = 300.0  # the longest wait: past it, one guess per address every 5 minutes
FORGET_AFTER = 3600.0  # an address's failures are forgotten after an hour without a new one
MAX_ADDRESSES = 10_000  # addresses remembered at most; when full, the quietest one not waiting is forgotten
RECORDS_PER_MINUTE = 60  # failed attempts written to the audit trail a minute at most, all addresses together
_MAX_DOUBLINGS = 20  # 2**20 seconds is far past MAX_WAIT; keeps the power small


def address_key(client: str) -> str:
    """Whom failures are counted against: an IPv4 address, or an IPv6 /64 (what one site or host is given)."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(slots=True)
class _Failures:
    """Wrong tokens from one address in a row, when the last came, and until when it must wait."""

    count: int
    last: float
    until: float


class Throttle:
    """Per-address backoff for credential attempts; memory bounded by MAX_ADDRESSES."""

    def __init__(self, clock: Callable[[], float], *, max_addresses: int = MAX_ADDRESSES) -> None:
        self._clock = clock
        self._max = max_addresses
        self._failures: OrderedDict[str, _Failures] = OrderedDict()  # least recently failed first

    def wait(self, client: str) -> int | None:
        """Whole seconds before a token from this address is checked again, or None when it may be now."""
        key = address_key(client)
        entry = self._failures.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now - entry.last >= FORGET_AFTER:
            del self._failures[key]
            return None
        # min: a wall clock stepped back must not stretch the wait
        return math.ceil(min(entry.until - now, MAX_WAIT)) if entry.until > now else None

    def failed(self, client: str) -> float:
        """Count a wrong token from this address; returns the seconds it must now wait (0: none yet)."""
        now = self._clock()
        self._forget_quiet(now)
        key = address_key(client)
        entry = self._failures.pop(key, None)
        if entry is None:
            entry = _Failures(0, now, now)
            if len(self._failures) >= self._max and not self._forget_one_not_waiting(now):
                # Every address remembered is waiting: forgetting one for a newcomer must not hand out free
                # guesses, or rotating through more addresses than the table holds would undo the waits.
                self._failures.popitem(last=False)
                entry.count = FREE_FAILURES - 1
        entry.count += 1
        entry.last = now
        wait = 0.0
        if entry.count >= FREE_FAILURES:
            wait = min(MAX_WAIT, FIRST_WAIT * 2 ** min(entry.count - FREE_FAILURES, _MAX_DOUBLINGS))
        entry.until = now + wait
        self._failures[key] = entry
        return wait

    def succeeded(self, client: str) -> None:
        """The right token: this address starts again with a clean slate."""
        self._failures.pop(address_key(client), None)

    def __len__(self) -> int:
        return len(self._failures)

    def _forget_one_not_waiting(self, now: float) -> bool:
        """Forget the address that failed least recently among those not waiting; False when all wait."""
        for key, entry in self._failures.items():
            if entry.until <= now:
                del self._failures[key]
                return True
        return False

    def _forget_quiet(self, now: float) -> None:
        """Drop addresses whose last failure is older than FORGET_AFTER (they are at the front)."""
        while self._failures:
            key, entry = next(iter(self._failures.items()))
            if now - entry.last < FORGET_AFTER:
                return
            del self._failures[key]


class RecordBudget:
    """At most RECORDS_PER_MINUTE audit records of failed attempts a minute; counts those left out."""

    def __init__(self, clock: Callable[[], float], *, per_minute: int = RECORDS_PER_MINUTE) -> None:
        self._clock = clock
        self._capacity = float(per_minute)
        self._tokens = float(per_minute)
        self._refilled = clock()
        self._left_out = 0

    def take(self) -> int | None:
        """None when this failure is not to be recorded; else how many were left out since the last record."""
        now = self._clock()
        elapsed = max(0.0, now - self._refilled)
        self._tokens = min(self._capacity, self._tokens + elapsed * self._capacity / 60)
        self._refilled = now
        if self._tokens < 1:
            self._left_out += 1
            return None
        self._tokens -= 1
        left_out, self._left_out = self._left_out, 0
        return left_out
