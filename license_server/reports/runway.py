"""Runway: until when each machine stays licensed if upstream is unreachable from now on, and what limits it.

The daemon answers a machine during an outage with its kept Activate answer (while younger than
`keep.max_age`), else with a license file listing it. The application then checks the signed license
itself: SDKs refuse one signed longer ago than the application's signatureExpirationInterval
(`products.<id>.signature_expiration`, unknown unless set), and applications of time-limited licenses refuse
it after its `Expires` (`products.<id>.time_limited`). The earliest of the limits that apply is when the
machine stops being licensed; of a kept answer and a license file, the one that lasts longer counts. A
floating machine also needs a seat: while it holds a live lease it renews it; without one it gets a seat
only while one is free, which no date can promise.
"""

from __future__ import annotations

import binascii
import functools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple, TextIO

import orjson

from license_server.config import Config, ProductConfig
from license_server.licensing.license_files import LicenseFile
from license_server.licensing.signatures import AnswerFormatError, SignedLicense, parse_signed_answer
from license_server.reports.tables import cell, csv_value, iso, write_json, write_prepared_csv, write_table
from license_server.storage.answers import KeptActivation
from license_server.storage.interfaces import AnswerReader, SeatReader
from license_server.storage.seats import LedgerMissingError, License, MachineRow

KEEP_MAX_AGE = "keep.max_age"
SIGNATURE = "signature"
EXPIRES = "expires"
NOTHING_KEPT = "nothing kept"  # a machine of the ledger with no kept answer nor license file
NO_LIMIT = "no limit known"
OUTLOOK = (("1h", 3600.0), ("24h", 86400.0), ("7d", 7 * 86400.0))  # the buckets status pages count
_FLOATING_PREFIXES = ("floating:", "overdraft:")
_WHOLE = (int, type(None))  # SignDate and Expires: whole seconds, or absent (bool is not a time)
# F1..F8 for each value of the facts' feature bits (F1 lowest): read by index, not rebuilt for each answer
_FEATURES = tuple(tuple(bool(bits >> index & 1) for index in range(8)) for bits in range(256))

EMPTY_RUNWAY = "(no matching machines)"
_OWN_COLUMNS = frozenset({0, 3, 6, 8})  # friendly name, machine code, licensed until, seat: rarely shared
RUNWAY_COLUMNS: tuple[str, ...] = (
    "friendly_name",
    "product_id",
    "key",
    "machine_code",
    "floating",
    "source",
    "licensed_until",
    "limited_by",
    "seat",
    "remaining",
)


class Holding(NamedTuple):
    """What the daemon could answer one machine with during an outage: a kept answer or a license file."""

    product_id: str
    key: str
    machine_code: str
    source: str  # "kept answer" or "license file"
    fetched_at: float | None  # a kept answer's fetch time, from which keep.max_age counts
    sign_date: float | None
    expires: float | None
    features: tuple[bool, ...]
    floating: bool

    @property
    def license(self) -> License:
        """The (product id, key) this holding is of."""
        return self.product_id, self.key


class Runway(NamedTuple):
    """One machine's runway: until when it stays licensed without upstream (None: no limit known), and why."""

    product_id: str
    key: str
    machine_code: str
    friendly_name: str
    floating: bool
    source: str
    until: float | None
    limited_by: str
    lease_until: float | None  # a floating machine's live lease, which it renews while it runs

    def remaining(self, now: float) -> float | None:
        """Seconds left from `now` (0 once passed), None without a limit."""
        return None if self.until is None else max(0.0, self.until - now)


def from_kept(kept: KeptActivation) -> Holding | None:
    """The holding a kept Activate answer gives its machine; None for one that carries no signed license.

    From the runway facts kept beside it when they hold for its body; else from the body, reading only the
    fields a runway needs (it was verified when it was kept), or by the full parser for an answer whose
    fields are not named as Cryptolens names them.
    """
    if kept.body is None:  # the facts kept beside it hold for its body
        assert kept.facts is not None
        _, sign_date, expires, bits, floating = orjson.loads(kept.facts)
        return Holding(
            kept.product_id,
            kept.license_key,
            kept.machine_code,
            "kept answer",
            kept.fetched_at,
            None if sign_date is None else float(sign_date),
            None if expires is None else float(expires),
            _FEATURES[bits & 0xFF],
            bool(floating),
        )
    try:
        payload = binascii.a2b_base64(orjson.loads(kept.body)["licenseKey"])
        fields = orjson.loads(payload)
        sign_date, expires = fields["SignDate"], fields["Expires"]
        get = fields.get
        features = (
            get("F1") is True, get("F2") is True, get("F3") is True, get("F4") is True,
            get("F5") is True, get("F6") is True, get("F7") is True, get("F8") is True,
        )  # fmt: skip
    except (ValueError, KeyError, TypeError, binascii.Error):
        return _parsed(kept)
    if type(sign_date) not in _WHOLE or type(expires) not in _WHOLE:
        return _parsed(kept)
    code = kept.machine_code
    floating = False
    if b'"floating:' in payload or b'"overdraft:' in payload:  # a floating activation is listed: whose?
        quoted = orjson.dumps(code)[1:-1]  # as the machine code is written inside a JSON string
        floating = b'"floating:' + quoted + b'"' in payload or b'"overdraft:' + quoted + b'"' in payload
        if not floating:  # written another way than orjson writes it (escapes): read it exactly
            return _parsed(kept)
    return Holding(
        kept.product_id,
        kept.license_key,
        code,
        "kept answer",
        kept.fetched_at,
        None if sign_date is None else float(sign_date),
        None if expires is None else float(expires),
        features,
        floating,
    )


def _parsed(kept: KeptActivation) -> Holding | None:
    """A kept answer read by the full parser (any casing of its field names)."""
    assert kept.body is not None
    try:
        signed = parse_signed_answer(orjson.loads(kept.body))
    except (ValueError, AnswerFormatError):
        return None
    if signed is None:
        return None
    floating = signed.floating_lease(kept.machine_code) is not None
    return _holding(
        signed, kept.product_id, kept.license_key, kept.machine_code, "kept answer", kept.fetched_at, floating
    )


def from_file(file: LicenseFile) -> list[Holding]:
    """The holdings a license file gives: one per machine it lists."""
    signed = file.signed
    if signed.product_id is None:
        return []
    found: list[Holding] = []
    for mid in signed.machines:
        machine = mid
        floating = False
        for prefix in _FLOATING_PREFIXES:
            if mid.startswith(prefix):
                machine, floating = mid[len(prefix) :], True
        found.append(
            _holding(signed, str(signed.product_id), signed.key, machine, "license file", None, floating)
        )
    return found


def _holding(
    signed: SignedLicense,
    product_id: str,
    key: str,
    machine: str,
    source: str,
    fetched_at: float | None,
    floating: bool,
) -> Holding:
    """A holding from a signed license."""
    sign_date = None if signed.sign_date is None else float(signed.sign_date)
    expires = None if signed.expires is None else float(signed.expires)
    return Holding(
        product_id, key, machine, source, fetched_at, sign_date, expires, signed.features, floating
    )


def limit(holding: Holding, config: Config, product: ProductConfig | None = None) -> tuple[float | None, str]:
    """When a holding stops licensing its machine, and which limit that is (None: no limit known).

    `product`: the settings of the holding's product, when the caller already looked them up.
    """
    limits: list[tuple[float, str]] = []
    if holding.fetched_at is not None:
        limits.append((holding.fetched_at + config.keep.max_age, KEEP_MAX_AGE))
    if product is None:
        product = config.product(holding.product_id)
    if product.signature_expiration is not None and holding.sign_date is not None:
        limits.append((holding.sign_date + product.signature_expiration, SIGNATURE))
    if holding.expires is not None and product.checks_expiry(holding.features):
        limits.append((holding.expires, EXPIRES))
    if not limits:
        return None, NO_LIMIT
    return min(limits)


def runways(
    holdings: Iterable[Holding],
    machines: Iterable[MachineRow],
    leases: Mapping[tuple[License, str], float],
    config: Config,
    now: float,
) -> list[Runway]:
    """One runway per machine: its longest-lasting holding; a ledger machine without one locks out now."""
    best: dict[tuple[str, str, str], tuple[Holding, float | None, str]] = {}
    product = functools.cache(config.product)  # looked up once per product, not per machine
    for holding in holdings:
        until, why = limit(holding, config, product(holding.product_id))
        name = (holding.product_id, holding.key, holding.machine_code)
        known = best.get(name)
        if known is None or _later(until, known[1]):
            best[name] = (holding, until, why)
    names: dict[tuple[str, str, str], MachineRow] = {}
    for row in machines:
        if row.deactivated is None:
            names[(row.product_id, row.license_key, row.machine_code)] = row
    found: list[Runway] = []
    for name, (holding, until, why) in best.items():
        known_row = names.get(name)
        lease = leases.get((holding.license, holding.machine_code)) if holding.floating else None
        found.append(
            Runway(
                *name,
                friendly_name=known_row.friendly_name if known_row is not None else "",
                floating=holding.floating,
                source=holding.source,
                until=until,
                limited_by=why,
                lease_until=lease,
            )
        )
    for name, row in names.items():
        if name not in best:
            lease = (
                leases.get(((row.product_id, row.license_key), row.machine_code)) if row.floating else None
            )
            found.append(Runway(*name, row.friendly_name, row.floating, "", now, NOTHING_KEPT, lease))
    return found


def _later(until: float | None, than: float | None) -> bool:
    """Whether a limit lasts longer than another (None: no limit, the longest)."""
    if than is None:
        return False
    return until is None or until > than


@dataclass(frozen=True, slots=True, kw_only=True)
class RunwayQuery:
    """Which runways to list; `now` is unix seconds."""

    now: float
    within: float | None = None  # only machines that stop within this many seconds
    name: str | None = None  # part of the friendly name, any case
    product: str | None = None  # product id, exact
    key: str | None = None  # license key, any case


def select(found: Iterable[Runway], query: RunwayQuery) -> list[Runway]:
    """The runways the query asks for, soonest lock-out first (no limit last), then by name and key."""
    wanted = query.name.casefold() if query.name is not None else None
    key = query.key.casefold() if query.key is not None else None
    chosen = [
        runway
        for runway in found
        if (query.product is None or runway.product_id == query.product)
        and (key is None or runway.key.casefold() == key)
        and (wanted is None or wanted in runway.friendly_name.casefold())
        and (query.within is None or (runway.until is not None and runway.until - query.now <= query.within))
    ]
    return sorted(chosen, key=_order)


def _order(runway: Runway) -> tuple[bool, float, str, str, str, str]:
    """Soonest first, machines without a limit last."""
    return (
        runway.until is None,
        runway.until or 0.0,
        runway.friendly_name.casefold(),
        runway.key,
        runway.product_id,
        runway.machine_code,
    )


def seat(runway: Runway, now: float) -> str:
    """What a floating machine needs besides its answer: its live lease, or a free seat; "" if node-locked."""
    if not runway.floating:
        return ""
    if runway.lease_until is not None and runway.lease_until > now:
        return f"holds a lease until {iso(runway.lease_until)}"
    return "needs a free seat"


def duration_text(seconds: float | None) -> str:
    """A remaining time for people: "no limit known", "locked out", "45m", "5h 20m", "3d 4h"."""
    if seconds is None:
        return NO_LIMIT
    if seconds <= 0:
        return "locked out"
    minutes = int(seconds // 60)
    days, hours, mins = minutes // 1440, minutes % 1440 // 60, minutes % 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {mins}m"
    return f"{max(mins, 1)}m"


def as_row(runway: Runway, now: float) -> dict[str, object]:
    """One runway as the report shows it (JSON keeps the seconds left as a number)."""
    row = dict(zip(RUNWAY_COLUMNS[:-1], _cells(runway, now)[:-1], strict=True))  # all but the words left
    left = runway.remaining(now)
    row["remaining_s"] = None if left is None else round(left)
    return row


def write_runway(found: Iterable[Runway], out: TextIO, form: str, now: float) -> int:
    """Write runways as a table, CSV or JSON lines; returns how many rows."""
    if form == "json":
        return write_json((as_row(runway, now) for runway in found), out)
    if form == "csv":
        return write_prepared_csv(RUNWAY_COLUMNS, _csv_rows(found, now), out)
    cells = [[cell(value) for value in _cells(runway, now)] for runway in found]
    return write_table(RUNWAY_COLUMNS, cells, out, empty=EMPTY_RUNWAY)


def _cells(runway: Runway, now: float) -> tuple[object, ...]:
    """One runway's values in RUNWAY_COLUMNS' order, the time left in words."""
    return (
        runway.friendly_name,
        runway.product_id,
        runway.key,
        runway.machine_code,
        runway.floating,
        runway.source or None,
        iso(runway.until),
        runway.limited_by,
        seat(runway, now) or None,
        duration_text(runway.remaining(now)),
    )


def _csv_rows(found: Iterable[Runway], now: float) -> Iterator[list[object]]:
    """CSV rows, each cell through csv_value; the values many rows share are made once."""
    shared: dict[object, object] = {}
    for runway in found:
        row = list(_cells(runway, now))
        for index, value in enumerate(row):
            if index in _OWN_COLUMNS:
                row[index] = csv_value(value)
                continue
            made = shared.get(value)
            if made is None:
                made = shared[value] = csv_value(value)
            row[index] = made
        yield row


@dataclass(frozen=True, slots=True)
class Outlook:
    """How many machines lock out within each of OUTLOOK's spans, and the shortest runway per product."""

    within: dict[str, int]  # "1h", "24h", "7d": machines whose runway ends within it (counted in each)
    shortest: dict[str, float]  # product id: seconds left for its machine with the shortest runway
    machines: int  # machines counted


# Product id -> machine -> when its runway ends (inf: no limit known). A machine is the hash of its key and
# machine code: the daemon counts 100,000 of them without keeping their names (about 10 MB, not 100). Two
# machines sharing a hash (about one chance in ten billion) would count once.
Ends = dict[str, dict[int, float]]


def ends(holdings: Iterable[Holding], machines: Iterable[MachineRow], config: Config, now: float) -> Ends:
    """When each machine's runway ends, by product: its longest-lasting holding, else now (nothing kept)."""
    found: Ends = {}
    product = functools.cache(config.product)  # looked up once per product, not per machine
    for holding in holdings:
        until, _ = limit(holding, config, product(holding.product_id))
        per = found.setdefault(holding.product_id, {})
        name = hash((holding.key, holding.machine_code))
        end = math.inf if until is None else until
        if end > per.get(name, -math.inf):
            per[name] = end
    for row in machines:
        if row.deactivated is None:
            found.setdefault(row.product_id, {}).setdefault(hash((row.license_key, row.machine_code)), now)
    return found


def outlook(found: Ends, now: float) -> Outlook:
    """Counts for status pages and metrics."""
    within = dict.fromkeys((label for label, _ in OUTLOOK), 0)
    shortest: dict[str, float] = {}
    count = 0
    for product, machines in found.items():
        count += len(machines)
        soonest = min(machines.values(), default=math.inf)
        if soonest < math.inf:
            shortest[product] = max(0.0, soonest - now)
        for end in machines.values():
            for label, span in OUTLOOK:
                if end - now <= span:
                    within[label] += 1
    return Outlook(within, shortest, count)


def holdings(kept: Iterable[KeptActivation], files: Iterable[LicenseFile]) -> Iterator[Holding]:
    """Every holding from kept Activate answers and license files."""
    for answer in kept:
        found = from_kept(answer)
        if found is not None:
            yield found
    for file in files:
        yield from from_file(file)


def collect(
    answers: AnswerReader, ledger: SeatReader, files: Iterable[LicenseFile], config: Config, now: float
) -> list[Runway]:
    """Every machine's runway from the kept answers, the ledger and the license files (blocking)."""
    machines, leases = _ledger(ledger, now)
    return runways(holdings(answers.activations(), files), machines, leases, config, now)


def collect_ends(
    answers: AnswerReader, ledger: SeatReader, files: Iterable[LicenseFile], config: Config, now: float
) -> Ends:
    """When each machine's runway ends, read as `collect` reads it, keeping no machine's name (blocking)."""
    machines, _ = _ledger(ledger, now)
    return ends(holdings(answers.activations(), files), machines, config, now)


def _ledger(ledger: SeatReader, now: float) -> tuple[list[MachineRow], dict[tuple[License, str], float]]:
    """The ledger's machines and live leases; none of either before the daemon wrote its ledger."""
    try:
        with ledger.snapshot() as snapshot:
            return snapshot.machines(), snapshot.live_leases(now)
    except LedgerMissingError:
        return [], {}
