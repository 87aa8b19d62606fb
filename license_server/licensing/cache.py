"""Kept answers: a bounded in-memory LRU over the durable store, with freshness decided by the caller.

With several nodes, another node may drop answers this one holds in memory: the store says so when it hears
of it (`on_forget`), within a second.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections import defaultdict
from typing import Any

import structlog
from cachetools import LRUCache

from license_server.licensing.signatures import AnswerFormatError, KeyRing, parse_signed_answer, verify_signed
from license_server.storage.answers import Kept
from license_server.storage.interfaces import AnswerStore, Forgotten
from license_server.storage.seats import License

log = structlog.get_logger(__name__)


class _IndexedLRU(LRUCache[bytes, Kept]):
    """An LRU of kept answers that also knows which cache keys belong to which license."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize=maxsize)
        self.by_license: defaultdict[License, set[bytes]] = defaultdict(set)

    def __setitem__(self, key: bytes, value: Kept, cache_setitem: Any = LRUCache.__setitem__) -> None:
        super().__setitem__(key, value)
        self.by_license[value.license].add(key)

    def __delitem__(self, key: bytes, cache_delitem: Any = LRUCache.__delitem__) -> None:
        value = self[key]
        super().__delitem__(key)
        keys = self.by_license.get(value.license)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.by_license[value.license]


class AnswerCache:
    """Where the daemon keeps verified answers and finds them again during outages."""

    def __init__(self, store: AnswerStore, keyring: KeyRing, memory_entries: int) -> None:
        self.store = store
        self.keyring = keyring
        self._memory_entries = memory_entries
        self._memory: _IndexedLRU | None = _IndexedLRU(memory_entries) if memory_entries > 0 else None
        # Grows with every drop: a read under way when answers were dropped does not put back what it read.
        self._drops = 0
        store.on_forget(self._heard)

    async def put(self, kept: Kept) -> None:
        """Keep a verified answer in memory and on disk; returns once the disk write is committed."""
        if self._memory is not None:
            self._memory[kept.cache_key] = kept
        await asyncio.shield(self.store.put(kept))  # one waiter going away must not cancel the shared batch

    async def get(self, cache_key: bytes) -> Kept | None:
        """The kept answer for a cache key; answers read from disk are verified again before use."""
        if self._memory is not None and (held := self._memory.get(cache_key)) is not None:
            return held
        drops = self._drops
        kept = await self.store.get(cache_key)
        if kept is None:
            return None
        if not self._still_valid(kept):
            log.error("kept_answer_invalid_dropped", product_id=kept.product_id, license_key=kept.license_key)
            await self.store.forget_key(cache_key)
            return None
        if self._memory is not None and drops == self._drops:
            self._memory[cache_key] = kept
        return kept

    def _heard(self, forgotten: Forgotten) -> None:
        """Drop from memory what another node dropped (everything, when some drops may have gone unheard)."""
        self._drops += 1
        if self._memory is None:
            return
        if forgotten.everything:
            self._memory = _IndexedLRU(self._memory_entries)
            return
        if forgotten.license is not None:
            for cache_key in list(self._memory.by_license.get(forgotten.license, ())):
                del self._memory[cache_key]
        for cache_key in forgotten.cache_keys:
            self._memory.pop(cache_key, None)

    def _still_valid(self, kept: Kept) -> bool:
        """Whether a kept answer read back from disk still carries a signature a vendor key accepts."""
        try:
            signed = parse_signed_answer(json.loads(kept.body))
        except (ValueError, AnswerFormatError):
            return False
        return signed is not None and verify_signed(self.keyring, signed)

    async def forget(self, product_id: str, license_key: str) -> int:
        """Drop every kept answer of a license from memory and disk."""
        license_key = license_key.upper()
        self._drops += 1
        if self._memory is not None:
            for cache_key in list(self._memory.by_license.get((product_id, license_key), ())):
                del self._memory[cache_key]
        return await self.store.forget(product_id, license_key)

    async def forget_machine(self, product_id: str, license_key: str, machine_code: str) -> int:
        """Drop what could revive a freed machine: its kept answers, and kept GetKey answers listing it.

        A GetKey answer lists every machine activated when it was signed; served during an outage, it
        would tell an SDK (Helpers.IsOnRightMachine) that a deactivated machine still holds its seat.
        GetKey answers signed after the machine left are kept.
        """
        license_key = license_key.upper()
        lists = functools.partial(_lists_machine, machine_code)
        self._drops += 1
        if self._memory is not None:
            for cache_key in list(self._memory.by_license.get((product_id, license_key), ())):
                kept = self._memory[cache_key]
                if kept.machine_code == machine_code or (kept.machine_code == "" and lists(kept.body)):
                    del self._memory[cache_key]
        return await self.store.forget_machine(product_id, license_key, machine_code, lists)

    async def forget_key(self, cache_key: bytes) -> None:
        """Drop one kept answer from memory and disk."""
        self._drops += 1
        if self._memory is not None:
            self._memory.pop(cache_key, None)
        await self.store.forget_key(cache_key)


def _lists_machine(machine_code: str, body: bytes) -> bool:
    """Whether a kept answer's license lists a machine; one that cannot be read counts as listing it."""
    try:
        signed = parse_signed_answer(json.loads(body))
    except (ValueError, RecursionError, AnswerFormatError):
        return True
    return signed is None or signed.matches_machine(machine_code)
