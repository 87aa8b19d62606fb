"""Decides how each workstation call is answered: forwarded, from a kept answer, or from a license file."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from license_server.audit.chain import Action
from license_server.config import KeepConfig
from license_server.licensing.cache import AnswerCache
from license_server.licensing.license_files import LicenseFiles
from license_server.licensing.protocol import Call, Forward, Kind, TokenFingerprints, error_body, flag
from license_server.licensing.signatures import (
    AnswerFormatError,
    KeyRing,
    SignedLicense,
    parse_signed_answer,
    runway_facts,
    verify_metadata,
    verify_signed,
)
from license_server.licensing.upstream import Upstream, UpstreamAnswer, UpstreamFailure
from license_server.storage.answers import Kept
from license_server.storage.interfaces import SeatStore
from license_server.storage.seats import LIMIT_REACHED, License

log = structlog.get_logger(__name__)

JSON = "application/json; charset=utf-8"

# Upstream refusals that mean the license itself is gone, not just this call.
_LICENSE_GONE = ("blocked", "could not find the key")
# Licenses whose last deactivation is remembered at most, and for how long: far past any call's time upstream.
_FREED_REMEMBERED = 4096
_FREED_HORIZON = 600.0


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x on the hot path
class Outcome:
    """How a call was answered: the bytes for the workstation and the facts for the logs and metrics."""

    action: Action
    status: int
    body: bytes
    content_type: str = JSON
    upstream_status: int | None = None
    result: int | None = None
    message: str = ""
    failure: str | None = None  # why upstream could not answer, when it could not
    failure_kind: str | None = None  # and the kind of that failure (timeout, ...), when upstream was asked
    upstream_latency: float | None = None  # seconds upstream took to answer, when it did
    retried: bool = False  # upstream was asked twice (a connection that never opened, a read that failed)
    age: float | None = None  # age in seconds of a kept answer or license file served
    # An activation that holds a seat by this answer: upstream's answer names the machine (when signed and
    # checkable), or a kept answer or license file naming it was served within the seat bound.
    licensed: bool = False

    @classmethod
    def refused(cls, status: int, message: str) -> Outcome:
        """An answer the daemon writes itself to refuse a call."""
        return cls(Action.REFUSED, status, error_body(message), result=1, message=message)


@dataclass(frozen=True, slots=True)
class Rules:
    """What a reload replaces as one: the egress, the vendor keys, the license files and kept-answer rules."""

    upstream: Upstream | None  # None in offline mode: nothing ever leaves the machine
    keyring: KeyRing
    files: LicenseFiles
    keep: KeepConfig


class Licensing:
    """The daemon's answering policy, independent of HTTP plumbing."""

    def __init__(
        self,
        *,
        rules: Rules,
        cache: AnswerCache,
        secret: bytes,
        seats: SeatStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        self.rules = rules
        self.fingerprints = TokenFingerprints(secret)
        self.seats = seats
        self.clock = clock
        self.stale_served = 0
        self._freed: dict[License, float] = {}  # license -> time.monotonic() of its last deactivation
        self._offline = UpstreamFailure("offline mode is on", kind="offline", status=503)  # never raised

    @property
    def rules(self) -> Rules:
        """The rules in force; a reload replaces them whole, and calls that start after it follow the new."""
        return self._rules

    @rules.setter
    def rules(self, rules: Rules) -> None:
        self._rules = rules
        self.cache.keyring = rules.keyring  # answers read back from disk are checked with the keys in force

    @property
    def upstream(self) -> Upstream | None:
        """The egress in force; None in offline mode."""
        return self._rules.upstream

    @property
    def keyring(self) -> KeyRing:
        """The vendor keys in force."""
        return self._rules.keyring

    @property
    def files(self) -> LicenseFiles:
        """The license files in force."""
        return self._rules.files

    @property
    def keep(self) -> KeepConfig:
        """The kept-answer rules in force."""
        return self._rules.keep

    async def answer(self, call: Call, forward: Forward, client: str) -> Outcome:
        """Answer one allowlisted call, and note in the seat ledger a machine whose activation was licensed.

        Refused, failed and denied activations stay out of the ledger's machines: the audit trail has them.
        """
        outcome = await self._decide(call, forward)
        if outcome.licensed and call.kind is Kind.ACTIVATE and call.license_key and call.machine_code:
            self.seats.seen(
                call.license,
                call.machine_code,
                friendly_name=call.friendly_name,
                client=client,
                floating=call.floating_interval > 0,
            )
        return outcome

    async def _decide(self, call: Call, forward: Forward) -> Outcome:
        """Upstream first (unless offline or fresh enough), falling back to kept answers and files."""
        cache_key = call.cache_key(self.fingerprints) if call.keepable else None
        rules = self._rules  # read once: a reload landing while this call waits must not change it midway
        if rules.upstream is None:
            return await self._fallback(call, cache_key, self._offline)
        if cache_key is not None and rules.keep.fresh_for > 0 and call.floating_interval <= 0:
            kept = await self.cache.get(cache_key)
            if kept is not None and self._age(kept) < rules.keep.fresh_for:
                return self._serve_kept(call, kept, Action.KEPT_FRESH)
        coalesce = cache_key if call.kind is Kind.GETKEY else None
        try:
            answered, signed = await rules.upstream.call(
                forward, judge=functools.partial(self._judge, call), coalesce_key=coalesce
            )
        except UpstreamFailure as failure:
            outcome = await self._fallback(call, cache_key, failure)
            # Only here, not in _fallback: offline mode's stand-in failure is no failure of upstream's.
            outcome.failure_kind, outcome.retried = failure.kind, failure.retried
            return outcome
        return await self._on_answer(call, cache_key, answered, signed)

    def _note_freed(self, license: License) -> None:
        """Remember when a machine of a license was freed; forget what no call in flight can predate."""
        now = time.monotonic()
        if len(self._freed) >= _FREED_REMEMBERED:
            self._freed = {k: t for k, t in self._freed.items() if now - t < _FREED_HORIZON}
        self._freed[license] = now

    def _judge(self, call: Call, answered: UpstreamAnswer) -> SignedLicense | None:
        """Upstream.call's judge: UpstreamFailure for an unusable answer, else the verified license if any."""
        answer = answered.answer
        assert answer is not None  # Upstream.call only judges parsed answers
        if answer.result != 0 or not call.keepable:
            return None  # a refusal is upstream's word, not a failure; other calls carry no license
        return self._verified(call, answered)

    async def _on_answer(
        self, call: Call, cache_key: bytes | None, answered: UpstreamAnswer, signed: SignedLicense | None
    ) -> Outcome:
        """Handle an answer upstream gave: keep it if it is a verified license, act on refusals."""
        answer = answered.answer
        assert answer is not None  # Upstream.call only returns parsed answers
        licensed = False
        if answer.result == 0 and call.kind is Kind.ACTIVATE:
            # Without a signature to check (no vendor key, or an unsigned answer) upstream's word stands.
            licensed = signed is None or (signed.matches_machine(call.machine_code) and not signed.block)
        outcome = Outcome(
            Action.FORWARDED,
            answered.status,
            answered.body,
            answered.content_type,
            upstream_status=answered.status,
            result=answer.result,
            message=answer.message,
            upstream_latency=answered.latency,
            retried=answered.retried,
            licensed=licensed,
        )
        if answer.result != 0:
            await self._on_refusal(call, cache_key, answer.message)
            return outcome
        if call.kind is Kind.DEACTIVATE and call.license_key:
            # A freed seat must never come back from a kept answer during a later outage: neither from
            # the machine's own activations nor from a kept GetKey answer that still lists it, nor from
            # an answer to a call in flight now, which upstream may have signed before this deactivation.
            self._note_freed(call.license)
            await self.cache.forget_machine(call.product_id, call.license_key, call.machine_code)
            await self.seats.released(call.license, call.machine_code)
            return outcome
        if cache_key is None:
            return outcome
        if call.kind is Kind.ACTIVATE:
            await self._note_seat(call, signed, licensed=licensed)
        if signed is not None:
            if signed.block:
                await self.cache.forget(call.product_id, call.license_key)
            elif call.kind is Kind.ACTIVATE and not licensed:
                log.info("activation_answer_without_machine_not_kept", product_id=call.product_id)
            elif answered.sent <= self._freed.get(call.license, -1.0):
                log.info("answer_older_than_deactivation_not_kept", product_id=call.product_id)
            else:
                await self.cache.put(
                    Kept(
                        cache_key=cache_key,
                        method=call.method,
                        product_id=call.product_id,
                        license_key=call.license_key.upper(),
                        machine_code=call.machine_code if call.kind is Kind.ACTIVATE else "",
                        fetched_at=self.clock(),
                        body=answered.body,
                        facts=runway_facts(signed, call.machine_code, answered.body)
                        if call.kind is Kind.ACTIVATE
                        else None,
                    )
                )
        return outcome

    def _verified(self, call: Call, answered: UpstreamAnswer) -> SignedLicense | None:
        """The verified signed license of the license asked about; raises UpstreamFailure for any other."""
        assert answered.answer is not None
        try:
            signed = parse_signed_answer(answered.answer.obj)
        except AnswerFormatError as exc:
            raise UpstreamFailure(
                f"the licensing service sent a malformed signed answer: {exc}", kind="invalid"
            ) from exc
        if signed is None or not self.keyring:
            return None  # unsigned, or no vendor key to check with: passed on, never kept
        if not verify_signed(self.keyring, signed):
            raise UpstreamFailure(
                "the answer's signature does not verify with any configured vendor key", kind="bad_signature"
            )
        metadata = {k.lower(): v for k, v in answered.answer.obj.items()}.get("metadata")
        if (
            flag(call.fields, "metadata")
            and isinstance(metadata, dict)
            and not verify_metadata(self.keyring, metadata)
        ):
            raise UpstreamFailure(
                "the answer's metadata signature does not verify with any configured vendor key",
                kind="bad_signature",
            )
        if signed.key.upper() != call.license_key.upper() or not _same_product(signed.product_id, call):
            raise UpstreamFailure(
                "the licensing service answered with a license other than the one asked for",
                kind="other_license",
            )
        return signed

    async def _note_seat(self, call: Call, signed: SignedLicense | None, *, licensed: bool) -> None:
        """Record the seat limit and, for a licensed floating activation, the lease upstream granted."""
        if signed is not None and signed.max_machines is not None:
            self.seats.set_limit(call.license, signed.max_machines)
        if call.floating_interval <= 0 or not licensed:
            return
        seconds: float = call.floating_interval
        overdraft = False
        if signed is not None and signed.sign_date is not None:
            lease = signed.floating_lease(call.machine_code)
            if lease is not None:
                # Both times are upstream's: their difference does not depend on this machine's clock.
                seconds, overdraft = max(0, lease[0] - signed.sign_date), lease[1]
        await self.seats.granted(call.license, call.machine_code, seconds, overdraft=overdraft)

    async def _on_refusal(self, call: Call, cache_key: bytes | None, message: str) -> None:
        """Upstream said no: that answer, or the whole license, is no longer served from kept copies."""
        if not call.license_key:
            return
        lowered = message.lower()
        if call.kind is Kind.ACTIVATE and message == LIMIT_REACHED:
            self.seats.denied(
                call.license,
                call.machine_code,
                by="upstream",
                message=message,
                interval=max(0, call.floating_interval),
            )
        # Only a key spelt exactly as the license is named speaks for the license: a refusal of a look-alike
        # with spaces around it must not drop the real key's kept answers.
        if call.fields.get("key") == call.license_key and any(marker in lowered for marker in _LICENSE_GONE):
            removed = await self.cache.forget(call.product_id, call.license_key)
            log.info("license_refused_kept_answers_dropped", product_id=call.product_id, removed=removed)
        elif cache_key is not None:
            await self.cache.forget_key(cache_key)

    async def _fallback(self, call: Call, cache_key: bytes | None, failure: UpstreamFailure) -> Outcome:
        """Upstream cannot answer: a kept answer young enough, else a license file, else a JSON error."""
        too_old: float | None = None
        if cache_key is not None:
            kept = await self.cache.get(cache_key)
            if kept is not None:
                age = self._age(kept)
                if age <= self.keep.max_age:
                    if not await self._seat_free(call):
                        return self._seat_refused(call, failure)
                    self.stale_served += 1
                    return self._serve_kept(call, kept, Action.KEPT_STALE, failure)
                too_old = age
        if call.keepable:
            if call.kind is Kind.ACTIVATE:
                found = self.files.for_activate(call.product_id, call.license_key, call.machine_code)
            else:
                found = self.files.for_getkey(call.product_id, call.license_key)
            if found is not None:
                if not await self._seat_free(call):
                    return self._seat_refused(call, failure)
                return Outcome(
                    Action.LICENSE_FILE,
                    200,
                    found.body,
                    upstream_status=failure.upstream_status,
                    result=0,
                    failure=failure.reason,
                    age=None
                    if found.signed.sign_date is None
                    else max(0.0, self.clock() - found.signed.sign_date),
                    licensed=call.kind is Kind.ACTIVATE,  # the file lists the machine; the bound held
                )
        message = self._failure_message(call, failure, too_old)
        return Outcome(
            Action.UPSTREAM_FAILED,
            failure.status,
            error_body(message),
            upstream_status=failure.upstream_status,
            result=1,
            message=message,
            failure=failure.reason,
        )

    async def _seat_free(self, call: Call) -> bool:
        """For a floating activation answered offline: take (or renew) a local seat if one is free."""
        if call.kind is not Kind.ACTIVATE or call.floating_interval <= 0:
            return True
        # durable before the answer: a restart must not forget who holds a seat
        return await self.seats.take(
            call.license, call.machine_code, call.floating_interval, call.max_overdraft
        )

    def _seat_refused(self, call: Call, failure: UpstreamFailure) -> Outcome:
        """The refusal upstream itself gives when every floating seat is taken."""
        seats, interval = self.seats, call.floating_interval
        seats.denied(call.license, call.machine_code, by="local", message=LIMIT_REACHED, interval=interval)
        return Outcome(
            Action.REFUSED,
            200,
            json.dumps({"result": 1, "message": LIMIT_REACHED}).encode(),
            upstream_status=failure.upstream_status,
            result=1,
            message=LIMIT_REACHED,
            failure=failure.reason,
        )

    def _failure_message(self, call: Call, failure: UpstreamFailure, too_old: float | None) -> str:
        """Words for an admin: what went wrong upstream and why nothing kept could stand in."""
        reason = failure.reason[0].upper() + failure.reason[1:]
        if not call.keepable:
            return f"{reason}."
        what = "license and machine" if call.kind is Kind.ACTIVATE else "license"
        if too_old is not None:
            return (
                f"{reason}, and the answer this license server keeps for this {what} is"
                f" {_days(too_old)} old, older than the {_days(self.keep.max_age)} it may serve."
            )
        return f"{reason}, and this license server keeps no answer or license file for this {what}."

    def _serve_kept(
        self, call: Call, kept: Kept, action: Action, failure: UpstreamFailure | None = None
    ) -> Outcome:
        """Serve a kept answer's bytes exactly as upstream sent them."""
        return Outcome(
            action,
            200,
            kept.body,
            upstream_status=None if failure is None else failure.upstream_status,
            result=0,
            failure=None if failure is None else failure.reason,
            age=self._age(kept),
            licensed=call.kind is Kind.ACTIVATE,  # kept only when it named the machine; the bound held
        )

    def _age(self, kept: Kept) -> float:
        # A wall clock that went backwards makes an answer look new, not negative.
        return max(0.0, self.clock() - kept.fetched_at)


def _same_product(signed: int | None, call: Call) -> bool:
    """Whether a signed license is of the call's product; upstream reads ProductId as a number (03349)."""
    try:
        return int(call.product_id) == signed
    except ValueError:
        return False


def _days(seconds: float) -> str:
    """A duration in words an admin reads at a glance."""
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds:.0f} seconds"
