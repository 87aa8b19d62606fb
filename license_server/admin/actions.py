"""What an admin does to licenses: deactivate a machine, activate one for a license file, fetch a kept file.

Deactivation and activation go through the daemon's own answering policy (`Licensing.answer`), exactly as a
workstation's call would: a deactivation drops the machine's kept answers and frees its seat, an activation
is verified and kept. Every attempt, done or refused, leaves an `admin` record in the audit trail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import structlog

from license_server.admin.credentials import Secret
from license_server.admin.ledger import machine_facts
from license_server.audit.chain import ADMIN, Action
from license_server.audit.writer import AuditUnavailableError
from license_server.licensing.license_files import answer_body
from license_server.licensing.policy import Outcome
from license_server.licensing.protocol import Call, Forward, parse_fields
from license_server.licensing.signatures import (
    AnswerFormatError,
    SignedLicense,
    parse_signed_answer,
    verify_signed,
)
from license_server.storage.interfaces import StoreUnreachableError
from license_server.storage.seats import LedgerMissingError, LedgerUnreadableError
from license_server.web.keys import Services

log = structlog.get_logger(__name__)

FORM = "application/x-www-form-urlencoded"
CONSOLE_CLIENT = "admin console"  # the address the seat ledger shows for machines activated here
MAX_KEY = 200
MAX_MACHINE = 1000
MAX_NAME = 200
_PRODUCT = re.compile(r"[0-9]{1,10}", re.ASCII)
_FILE_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_MESSAGE = 500


class InvalidInputError(ValueError):
    """Input an admin must correct; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Target:
    """The machine of a license an action is about."""

    product_id: str
    key: str
    machine_code: str
    friendly_name: str = ""
    floating: bool | None = None  # None: as the machine last activated, per the seat ledger

    @classmethod
    def checked(
        cls,
        product_id: object,
        key: object,
        machine_code: object,
        friendly_name: object = "",
        *,
        floating: bool | None = None,
    ) -> Target:
        """A target from untrusted input; InvalidInputError names the field that is wrong."""
        product = _text(product_id, "product_id", 10)
        if not _PRODUCT.fullmatch(product) or int(product) == 0:
            raise InvalidInputError("product_id: expected the product's number, e.g. 3349")
        return cls(
            product,
            _text(key, "key", MAX_KEY, required=True),
            _text(machine_code, "machine_code", MAX_MACHINE, required=True, strip=False),
            _text(friendly_name, "friendly_name", MAX_NAME),
            floating,
        )

    def fields(self) -> dict[str, object]:
        """The target as an audit record and the API name it."""
        return {
            "product_id": self.product_id,
            "key": self.key,
            "machine": self.machine_code,
            "friendly_name": self.friendly_name,
        }

    @property
    def file_name(self) -> str:
        """A safe download name for this machine's license file."""
        label = self.friendly_name or self.machine_code[:16]
        return _FILE_NAME_UNSAFE.sub("_", f"{self.key}-{label}")[:120].strip("._") + ".skm"


def _text(value: object, name: str, limit: int, *, required: bool = False, strip: bool = True) -> str:
    """One text field: a string of printable characters within a length."""
    if value is None:
        value = ""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise InvalidInputError(f"{name}: expected text")
    text = value.strip() if strip else value
    if required and not text.strip():
        raise InvalidInputError(f"{name}: required")
    if len(text) > limit:
        raise InvalidInputError(f"{name}: at most {limit} characters")
    if not text.isprintable():
        raise InvalidInputError(f"{name}: control characters are not allowed")
    return text


@dataclass(frozen=True, slots=True)
class Result:
    """How an action ended: an HTTP status for the API, words for the admin, upstream's answer, a file."""

    ok: bool
    status: int
    message: str
    upstream: dict[str, Any] | None = None  # status, result, message of upstream's answer, when it answered
    source: str | None = None  # how the daemon answered (forwarded, kept_stale, license_file, ...)
    file: bytes | None = field(default=None, repr=False)
    file_name: str | None = None
    audited: bool = True

    def as_json(self) -> dict[str, Any]:
        """The result as the API answers it (a file is sent as itself, not in JSON)."""
        return {
            "ok": self.ok,
            "message": self.message,
            "upstream": self.upstream,
            "source": self.source,
            "audited": self.audited,
        }


class Console:
    """The actions, bound to the running daemon and the console's upstream token."""

    def __init__(self, services: Services, upstream_token: Secret | None) -> None:
        self.services = services
        self._token = upstream_token

    @property
    def can_act(self) -> bool:
        """Whether Deactivate and Activate can reach upstream: not offline, and an upstream token is set."""
        return self.services.upstream is not None and self._token is not None

    async def deactivate(self, actor: dict[str, str], target: Target) -> Result:
        """Free a machine's seat upstream (key/deactivate) and, on success, locally too."""
        target = await self._known(target)
        refusal = self._cannot_act("deactivate")
        if refusal is None:
            outcome = await self._send(
                "key/deactivate",
                {
                    "ProductId": target.product_id,
                    "Key": target.key,
                    "MachineCode": target.machine_code,
                    "Floating": "true" if target.floating else "false",
                },
            )
            result = self._judge(outcome, done="The machine was deactivated; its seat is free.")
        else:
            result = refusal
        details = {**target.fields(), "floating": target.floating}
        return await self._record(actor, "deactivate", details, result)

    async def activate(self, actor: dict[str, str], target: Target) -> Result:
        """Activate a machine upstream and hand out its signed license file, verified first."""
        refusal = self._cannot_act("activate") or self._cannot_verify()
        if refusal is None:
            fields = {
                "ProductId": target.product_id,
                "Key": target.key,
                "MachineCode": target.machine_code,
                "Sign": "True",
                "SignMethod": "1",
                "ModelVersion": "3",
            }
            if target.friendly_name:
                fields["FriendlyName"] = target.friendly_name
            outcome = await self._send("key/activate", fields)
            result = self._judge(outcome, done="Activated.")
            if result.ok:
                result = self._license_file(outcome.body, target, result)
        else:
            result = refusal
        return await self._record(actor, "activate", target.fields(), result)

    async def kept_file(self, actor: dict[str, str], target: Target) -> Result:
        """The license file of a machine from a signed answer the daemon keeps (or a license file it has)."""
        target = await self._known(target)
        result = self._cannot_verify()
        if result is None:
            result = await self._find_kept(target)
        return await self._record(actor, "download", target.fields(), result)

    async def record(self, actor: dict[str, str], action: str, **details: object) -> bool:
        """Write an admin record that is not about a target (login, logout); whether it was written."""
        return await self._append({"type": ADMIN, **actor, "action": action, **details})

    # -- the pieces ----------------------------------------------------------------------------------

    async def _known(self, target: Target) -> Target:
        """The target with the ledger's friendly name (for the audit record) and seat kind, where unknown.

        A ledger that cannot be read now (a shared database out of reach) leaves the target as given: the
        action does not need it.
        """
        ledger = self.services.licensing.seats
        await ledger.flush()
        try:
            facts = await asyncio.to_thread(
                machine_facts, ledger.reader, target.product_id, target.key, target.machine_code
            )
        except (LedgerMissingError, LedgerUnreadableError) as exc:
            log.warning("admin_ledger_unreadable", error=str(exc))
            facts = None
        name, floating = facts if facts is not None else ("", False)
        return dataclasses.replace(
            target,
            friendly_name=target.friendly_name or name,
            floating=floating if target.floating is None else target.floating,
        )

    def _cannot_act(self, action: str) -> Result | None:
        """Why nothing can be sent upstream now, or None."""
        if self.services.upstream is None:
            return Result(
                False,
                503,
                f"The daemon runs in offline mode (upstream.offline): it cannot {action} upstream.",
            )
        if self._token is None:
            return Result(
                False,
                503,
                "No upstream access token is configured for the console (admin.upstream_token_file or the"
                f" systemd credential upstream-token): it cannot {action}.",
            )
        audit = self.services.audit
        if not audit.writable and self.services.config.audit.on_failure == "refuse":
            return Result(False, 503, "The audit trail cannot be written, so admin actions are refused.")
        return None

    def _cannot_verify(self) -> Result | None:
        """Why a license file cannot be checked before it is handed out, or None."""
        if not self.services.licensing.keyring:
            return Result(
                False,
                503,
                "No vendor public key is configured (public_key): the daemon cannot check a license file,"
                " so it hands none out.",
            )
        return None

    async def _send(self, method: str, fields: dict[str, str]) -> Outcome:
        """One call upstream through the daemon's policy, with the console's upstream token."""
        assert self._token is not None
        body = urlencode({"token": self._token.reveal(), **fields}).encode()
        call = Call.from_fields(method, parse_fields(body.decode()))
        outcome = await self.services.licensing.answer(
            call, Forward(method, "POST", body, "", FORM), CONSOLE_CLIENT
        )
        self.services.metrics.count_upstream(outcome)
        return outcome

    def _judge(self, outcome: Outcome, *, done: str) -> Result:
        """A Result from the daemon's outcome, with upstream's own words."""
        message = self._scrub(outcome.message)
        upstream = None
        if outcome.upstream_status is not None and outcome.action is Action.FORWARDED:
            upstream = {"status": outcome.upstream_status, "result": outcome.result, "message": message}
        source = outcome.action.value
        if outcome.result == 0:
            return Result(True, 200, done, upstream, source)
        if outcome.action is Action.FORWARDED:
            return Result(
                False, 409, f"The licensing service refused: {message or '(no message)'}", upstream, source
            )
        return Result(False, outcome.status if outcome.status >= 500 else 502, message, upstream, source)

    def _license_file(self, body: bytes, target: Target, result: Result) -> Result:
        """The .skm for an activation answer once its signature verifies and it names this machine."""
        signed = self._signed(body, target)
        if signed is None:
            return Result(
                False,
                502,
                "The activation answer is not a license signed by a configured vendor key for this machine;"
                " no license file was made.",
                result.upstream,
                result.source,
            )
        message = "Activated; the license file was handed out."
        if result.source != Action.FORWARDED.value:
            message = (
                f"Upstream could not answer; the file comes from what the daemon keeps ({result.source})."
            )
        return Result(
            True, 200, message, result.upstream, result.source, answer_body(signed), target.file_name
        )

    def _signed(self, body: bytes, target: Target) -> SignedLicense | None:
        """The verified signed license in an answer if it is this target's, else None."""
        try:
            answer = json.loads(body)
            signed = parse_signed_answer(answer) if isinstance(answer, dict) else None
        except (ValueError, AnswerFormatError):
            return None
        if signed is None or not verify_signed(self.services.licensing.keyring, signed):
            return None
        if signed.key.upper() != target.key.upper() or str(signed.product_id) != target.product_id:
            return None
        return signed if signed.matches_machine(target.machine_code) else None

    async def _find_kept(self, target: Target) -> Result:
        """The newest kept answer for the machine that still verifies, else a license file, else a refusal."""
        try:
            kept = await self.services.store.kept_activations(
                target.product_id, target.key.upper(), target.machine_code
            )
        except StoreUnreachableError:
            return Result(
                False,
                503,
                "The shared database cannot be reached now, so the kept answers cannot be read;"
                " try again once it is back (the status page shows it).",
            )
        for body, _fetched in kept:
            signed = self._signed(body, target)
            if signed is not None:
                return Result(
                    True,
                    200,
                    "From the signed answer the daemon keeps.",
                    source="kept",
                    file=answer_body(signed),
                    file_name=target.file_name,
                )
        found = self.services.licensing.files.for_activate(target.product_id, target.key, target.machine_code)
        if found is not None:
            return Result(
                True,
                200,
                f"From the license file {found.path.name}.",
                source="license_file",
                file=answer_body(found.signed),
                file_name=target.file_name,
            )
        return Result(
            False,
            404,
            "The daemon keeps no signed answer for this machine of this license; activate it to get a file.",
        )

    async def _record(
        self, actor: dict[str, str], action: str, details: dict[str, object], result: Result
    ) -> Result:
        """Write the action's audit record; a record that cannot be written is said, not hidden."""
        record: dict[str, object] = {
            "type": ADMIN,
            **actor,
            "action": action,
            **details,
            "ok": result.ok,
            "status": result.status,
            "message": result.message[:_MAX_MESSAGE],
            "source": result.source,
            "upstream": result.upstream,
        }
        if result.file is not None:
            record["file_sha256"] = hashlib.sha256(result.file).hexdigest()
        if await self._append(record):
            return result
        return Result(
            result.ok,
            result.status,
            f"{result.message} (The audit trail could not record this.)",
            result.upstream,
            result.source,
            result.file,
            result.file_name,
            audited=False,
        )

    async def _append(self, record: dict[str, object]) -> bool:
        """Append one record; False when the trail refuses it."""
        try:
            await self.services.audit.append(record)
        except AuditUnavailableError:
            log.error("admin_action_not_audited", action=record.get("action"), actor=record.get("actor"))  # noqa: TRY400
            return False
        return True

    def _scrub(self, text: str) -> str:
        """Upstream's words without the token, should they ever echo it."""
        return text if self._token is None else self._token.scrub(text)
