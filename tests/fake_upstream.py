"""A fake Cryptolens Web API for tests: keeps licenses, signs answers as Cryptolens does, fails on demand.

What it mirrors (see /work/shared/docs/protocol.md):
- Any `/api/...` path, POST form or GET query, matched the ASP.NET way (case-insensitive, `//` collapsed,
  trailing `/` ignored); field names case-insensitive; booleans as `True`/`false`/`1`.
- `key/activate`, `key/getkey`, `key/deactivate`, `key/createtrialkey`, `data/incrementintvaluetokey`,
  `data/decrementintvaluetokey`; any other method answers `Access denied.`.
- Signed answers (`Sign=true` with `SignMethod=1` or `StringSign`): `licenseKey` is base64 of the compact
  UTF-8 JSON license and `signature` is RSASSA-PKCS1-v1_5/SHA-256 over exactly those bytes. Without them
  the answer carries the license as a plain JSON object under `licenseKey` and no signature: the real
  service's legacy (SignMethod=0) signature cannot be reproduced, so a fake one is not attempted.

Choices where the real service's behaviour is not known for sure:
- Expired floating leases are dropped from the license when a call touches it and never appear in answers.
- `MaxNoOfMachines == 0` means activation is not set up: Activate succeeds without recording the machine.
- `FriendlyName` is stored verbatim, so the Python SDK's unset name arrives and stays as the string `None`.
- Failure modes other than `bad_signature` and `truncated` answer before the request is processed, so they
  change no license state; `truncated` processes the request and loses the answer on the way.
- Metadata's signed `Data` is the PascalCase JSON of the metadata object without its signature.
- GetKey refuses a blocked key like Activate does; the SDK's own docs say GetKey still returns it, which
  `getkey_refuses_blocked = False` gives (with `"Block": true` in the signed license).
- `data/*IntValueToKey` always succeeds for a known token and changes a matching data object if there is one.

`hang` and a pending `delay` end when the client goes away or the app shuts down (the connection is then
reset), so stopping a test server never waits for them. `reset` aborts with SO_LINGER 0 (a TCP RST).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qsl

from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

JSONObject = dict[str, object]

MSG_AUTH: Final = "Unable to authenticate."
MSG_ACCESS_DENIED: Final = "Access denied."
MSG_NOT_FOUND: Final = "Could not find the key."
MSG_BLOCKED: Final = "The key is blocked and cannot be accessed."
MSG_LIMIT: Final = "Cannot activate the new device as the limit has been reached."
MSG_NOT_ACTIVATED: Final = (
    "Either the machine code was never activated or key activation feature was never set up."
)

FLOATING_PREFIX: Final = "floating:"
OVERDRAFT_PREFIX: Final = "floating:overdraft:"

MODES: Final = frozenset(
    {
        "ok",
        "hang",
        "http500",
        "html502",
        "empty504",
        "garbage",
        "bad_signature",
        "truncated",
        "reset",
        "redirect",
    }
)
REDIRECT_TARGET: Final = "http://127.0.0.1:9/evil"
GARBAGE_BODY: Final = b"not json at all"
HTML_502: Final = (
    "<html><head><title>502 Bad Gateway</title></head>"
    "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>\n"
)
TRIAL_DAYS: Final = 15
DAY: Final = 86_400
_TRUE: Final = frozenset({"true", "1"})
_STRING_SIGN: Final = frozenset({"1", "stringsign"})


def generate_key() -> rsa.RSAPrivateKey:
    """Generate a vendor signing key like Cryptolens's (2048-bit, e=65537); slow, so share it across tests."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def normalise_path(path: str) -> str:
    """Route a path the ASP.NET way: lower-case, `//` collapsed, no trailing `/`, no leading `api/`."""
    parts = [part for part in path.lower().split("/") if part]
    if parts and parts[0] == "api":
        parts = parts[1:]
    return "/".join(parts)


def _b64(data: bytes) -> str:
    """Standard base64 text of some bytes, as the service writes it."""
    return base64.b64encode(data).decode("ascii")


def _compact(obj: object) -> bytes:
    """Serialise JSON the way the service does: compact, UTF-8, non-ASCII left as is."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _int(value: str | None, default: int = 0) -> int:
    """Read an integer form field, falling back to a default when it is missing or not a number."""
    if value is None:
        return default
    try:
        return int(value.strip())
    except ValueError:
        return default


def _flag(fields: dict[str, str], name: str) -> bool:
    """Read a boolean form field the way ASP.NET binds it (True/true/1)."""
    return fields.get(name, "").strip().lower() in _TRUE


async def _wait(release: asyncio.Event, seconds: float | None) -> bool:
    """Sleep `seconds` (None: for ever) unless the app shuts down first; True if it did."""
    try:
        await asyncio.wait_for(release.wait(), seconds)
    except TimeoutError:
        return False
    return True


@dataclass
class Activation:
    """One entry of a license's ActivatedMachines."""

    mid: str
    ip: str
    time: int
    friendly_name: str
    floating_expires: int | None = None

    def is_floating(self) -> bool:
        """Whether this entry is a floating seat lease rather than a node-locked activation."""
        return self.mid.startswith(FLOATING_PREFIX)

    def is_overdraft(self) -> bool:
        """Whether this entry is a floating seat taken beyond the license's limit."""
        return self.mid.startswith(OVERDRAFT_PREFIX)

    def is_live(self, now: int) -> bool:
        """Whether this entry still holds its seat at unix time `now` (node-locked ones always do)."""
        return not self.is_floating() or (self.floating_expires is not None and self.floating_expires > now)

    def to_json(self) -> JSONObject:
        """The entry as the signed license lists it."""
        return {
            "Mid": self.mid,
            "IP": self.ip,
            "Time": self.time,
            "FriendlyName": self.friendly_name,
            "FloatingExpires": self.floating_expires,
        }


@dataclass(kw_only=True)
class FakeLicense:
    """A license key as the vendor's Cryptolens account holds it."""

    product_id: int
    key: str
    id: int
    created: int
    expires: int
    max_machines: int = 1
    block: bool = False
    period: int = 30
    features: tuple[bool, ...] = (False,) * 8
    notes: str = ""
    trial_activation: bool = False
    activations: dict[str, Activation] = field(default_factory=dict)
    data_objects: list[dict[str, object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Check that the license has exactly the eight feature flags F1..F8."""
        if len(self.features) != 8:
            raise ValueError(f"a license has 8 features, got {len(self.features)}")

    def live_activations(self, now: int) -> list[Activation]:
        """The activations that hold a seat at unix time `now`."""
        return [a for a in self.activations.values() if a.is_live(now)]

    def drop_expired(self, now: int) -> None:
        """Forget floating leases that have lapsed by unix time `now`."""
        for mid in [mid for mid, a in self.activations.items() if not a.is_live(now)]:
            del self.activations[mid]


@dataclass
class Call:
    """One request as the fake received it."""

    http_method: str
    path: str
    fields: dict[str, str]
    body: bytes
    query: str
    headers: dict[str, str]
    remote: str | None = None


@dataclass
class _Answer:
    """A JSON answer to write, and whether it carries a license signature that `bad_signature` may spoil."""

    obj: JSONObject
    signed: bool = False


def _error(message: str) -> _Answer:
    """The service's refusal answer."""
    return _Answer({"result": 1, "message": message})


_OK: Final = {"result": 0, "message": ""}


class FakeCryptolens:
    """The fake service: license state, the signing key, recorded calls and the failure mode to act out."""

    def __init__(
        self, private_key: rsa.RSAPrivateKey | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        """Make a fake with no licenses accepting the token `good-token`; generates a key if none given."""
        self.private_key = private_key if private_key is not None else generate_key()
        self.clock = clock
        public = self.private_key.public_key()
        numbers = public.public_numbers()
        modulus = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
        exponent = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
        self.public_key_xml = (
            f"<RSAKeyValue><Modulus>{_b64(modulus)}</Modulus>"
            f"<Exponent>{_b64(exponent)}</Exponent></RSAKeyValue>"
        )
        self.public_key_pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")
        self.tokens: set[str] = {"good-token"}
        self.licenses: dict[tuple[int, str], FakeLicense] = {}
        self.calls: list[Call] = []
        self.delay = 0.0
        # API path ("key/getkey") -> an answer to it is made at once but sent only once the event is set
        self.held: dict[str, asyncio.Event] = {}
        self.getkey_refuses_blocked = True
        self._mode = "ok"
        self._next_id = 1
        self._trial_count = 0

    @property
    def mode(self) -> str:
        """The failure mode acted out on every request; one of MODES."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        """Set the failure mode, refusing names that are not in MODES."""
        if value not in MODES:
            raise ValueError(f"unknown mode {value!r}; expected one of {sorted(MODES)}")
        self._mode = value

    def now(self) -> int:
        """The fake's current unix time in whole seconds."""
        return int(self.clock())

    # --- license state -------------------------------------------------------------------------------

    def add_license(
        self,
        product_id: int,
        key: str,
        *,
        max_machines: int = 1,
        block: bool = False,
        id: int | None = None,
        created: int | None = None,
        expires: int | None = None,
        period: int = 30,
        features: Sequence[bool] = (),
        notes: str = "",
        trial_activation: bool = False,
        activations: Sequence[Activation] = (),
        data_objects: Sequence[dict[str, object]] = (),
    ) -> FakeLicense:
        """Add (or replace) a license; created defaults to now and expires to created plus `period` days."""
        if id is None:
            id = self._next_id
        self._next_id = max(self._next_id, id + 1)
        created = self.now() if created is None else created
        flags = tuple(features) + (False,) * (8 - len(features))
        lic = FakeLicense(
            product_id=product_id,
            key=key,
            id=id,
            created=created,
            expires=created + period * DAY if expires is None else expires,
            max_machines=max_machines,
            block=block,
            period=period,
            features=flags,
            notes=notes,
            trial_activation=trial_activation,
            activations={a.mid: a for a in activations},
            data_objects=[dict(d) for d in data_objects],
        )
        self.licenses[(product_id, key)] = lic
        return lic

    def license(self, product_id: int, key: str) -> FakeLicense:
        """The license with this product and key; KeyError if there is none."""
        return self.licenses[(product_id, key)]

    def block(self, product_id: int, key: str) -> None:
        """Block a license so the service refuses it."""
        self.license(product_id, key).block = True

    def unblock(self, product_id: int, key: str) -> None:
        """Unblock a license."""
        self.license(product_id, key).block = False

    def remove_license(self, product_id: int, key: str) -> None:
        """Delete a license so the service no longer finds it."""
        del self.licenses[(product_id, key)]

    def calls_to(self, path: str) -> list[Call]:
        """The recorded calls to one method, named in any spelling (`key/activate`, `/api/Key/Activate/`)."""
        wanted = normalise_path(path)
        return [call for call in self.calls if call.path == wanted]

    # --- signing ---------------------------------------------------------------------------------------

    def license_object(self, lic: FakeLicense) -> JSONObject:
        """The license as the signed `licenseKey` JSON holds it, fields in the service's order."""
        now = self.now()
        f1, f2, f3, f4, f5, f6, f7, f8 = lic.features
        return {
            "ProductId": lic.product_id,
            "ID": lic.id,
            "Key": lic.key,
            "Created": lic.created,
            "Expires": lic.expires,
            "Period": lic.period,
            "F1": f1,
            "F2": f2,
            "F3": f3,
            "F4": f4,
            "F5": f5,
            "F6": f6,
            "F7": f7,
            "F8": f8,
            "Notes": lic.notes,
            "Block": lic.block,
            "GlobalId": 100_000 + lic.id,
            "Customer": None,
            "ActivatedMachines": [a.to_json() for a in lic.live_activations(now)],
            "TrialActivation": lic.trial_activation,
            "MaxNoOfMachines": lic.max_machines,
            "AllowedMachines": "",
            "DataObjects": [dict(d) for d in lic.data_objects],
            "SignDate": now,
            "Reseller": None,
        }

    def _sign(self, data: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
        """RSASSA-PKCS1-v1_5 signature with the vendor key."""
        return self.private_key.sign(data, padding.PKCS1v15(), algorithm)

    def _metadata(self, lic: FakeLicense) -> JSONObject:
        """The `metadata` object of an answer, with its own SHA-512 signature envelope."""
        now = self.now()
        live = lic.live_activations(now)
        valid = not lic.block and lic.expires > now
        status = {
            "IsValid": valid,
            "ReasonForInvalidity": 0 if valid else (2 if lic.block else 1),
            "Trial": lic.trial_activation,
            "TimeLimited": True,
            "TimeLeft": max(0, (lic.expires - now) // DAY),
        }
        data: JSONObject = {
            "ActivatedMachines": len(live),
            "LicenseStatus": status,
            "UsedFloatingMachines": sum(1 for a in live if a.is_floating()),
        }
        data_bytes = _compact(data)
        envelope = {
            "Data": _b64(data_bytes),
            "Signature": _b64(self._sign(data_bytes, hashes.SHA512())),
            "Date": now,
            "Version": 1,
        }
        return {
            "activatedMachines": data["ActivatedMachines"],
            "licenseStatus": {name[0].lower() + name[1:]: value for name, value in status.items()},
            "usedFloatingMachines": data["UsedFloatingMachines"],
            "signature": _b64(_compact(envelope)),
        }

    def _signed(self, lic: FakeLicense, *, metadata: bool) -> JSONObject:
        """A successful signed answer as a JSON object."""
        message = _compact(self.license_object(lic))
        answer: JSONObject = {
            "licenseKey": _b64(message),
            "signature": _b64(self._sign(message, hashes.SHA256())),
            "result": 0,
            "message": "",
        }
        if metadata:
            answer["metadata"] = self._metadata(lic)
        return answer

    def sign_answer(self, lic: FakeLicense, *, metadata: bool = False) -> bytes:
        """The exact body of a successful signed Activate/GetKey answer for this license, signed now."""
        return _compact(self._signed(lic, metadata=metadata))

    def license_file(self, lic: FakeLicense, *, pascal_case: bool = False) -> str:
        """An offline `.skm` license file: a saved signed answer, camelCase or .NET's PascalCase."""
        answer = self._signed(lic, metadata=False)
        if pascal_case:
            answer = {name[0].upper() + name[1:]: value for name, value in answer.items()}
        return _compact(answer).decode("utf-8")

    def _success(self, lic: FakeLicense, fields: dict[str, str]) -> _Answer:
        """The success answer for a license in the shape the request asked for."""
        metadata = _flag(fields, "metadata")
        if _flag(fields, "sign") and fields.get("signmethod", "").strip().lower() in _STRING_SIGN:
            return _Answer(self._signed(lic, metadata=metadata), signed=True)
        answer: JSONObject = {"licenseKey": self.license_object(lic), "result": 0, "message": ""}
        if metadata:
            answer["metadata"] = self._metadata(lic)
        return _Answer(answer)

    # --- methods --------------------------------------------------------------------------------------

    def _find(self, fields: dict[str, str], *, refuse_blocked: bool = True) -> FakeLicense | _Answer:
        """The license a call names, or the refusal to answer when it is unknown or blocked."""
        lic = self.licenses.get((_int(fields.get("productid"), -1), fields.get("key", "")))
        if lic is None:
            return _error(MSG_NOT_FOUND)
        if lic.block and refuse_blocked:
            return _error(MSG_BLOCKED)
        lic.drop_expired(self.now())
        return lic

    def _activate(self, fields: dict[str, str], ip: str) -> _Answer:
        """Key.Activate: node-locked or floating activation of one machine."""
        lic = self._find(fields)
        if isinstance(lic, _Answer):
            return lic
        machine = fields.get("machinecode", "")
        friendly = fields.get("friendlyname")
        interval = _int(fields.get("floatingtimeinterval"))
        if lic.max_machines > 0:
            if interval > 0:
                refusal = self._take_floating(
                    lic, machine, ip, friendly, interval, _int(fields.get("maxoverdraft"))
                )
            else:
                refusal = self._take_node_locked(lic, machine, ip, friendly)
            if refusal is not None:
                return refusal
        return self._success(lic, fields)

    def _take_node_locked(
        self, lic: FakeLicense, machine: str, ip: str, friendly: str | None
    ) -> _Answer | None:
        """Activate a machine on a node-locked seat; the refusal if none is left."""
        existing = lic.activations.get(machine)
        if existing is not None:
            if friendly is not None:
                existing.friendly_name = friendly
            return None
        if sum(1 for a in lic.activations.values() if not a.is_floating()) >= lic.max_machines:
            return _error(MSG_LIMIT)
        lic.activations[machine] = Activation(machine, ip, self.now(), friendly or "")
        return None

    def _take_floating(
        self, lic: FakeLicense, machine: str, ip: str, friendly: str | None, interval: int, max_overdraft: int
    ) -> _Answer | None:
        """Lease or renew a floating seat for `interval` seconds, in overdraft if allowed; refusal if full."""
        now = self.now()
        live = lic.live_activations(now)
        for mid in (FLOATING_PREFIX + machine, OVERDRAFT_PREFIX + machine):
            held = lic.activations.get(mid)
            if held is not None and held.is_live(now):
                held.floating_expires = now + interval
                held.ip = ip
                if friendly is not None:
                    held.friendly_name = friendly
                return None
        if sum(1 for a in live if a.is_floating() and not a.is_overdraft()) < lic.max_machines:
            mid = FLOATING_PREFIX + machine
        elif max_overdraft > 0 and sum(1 for a in live if a.is_overdraft()) < max_overdraft:
            mid = OVERDRAFT_PREFIX + machine
        else:
            return _error(MSG_LIMIT)
        lic.activations[mid] = Activation(mid, ip, now, friendly or "", now + interval)
        return None

    def _get_key(self, fields: dict[str, str], _ip: str) -> _Answer:
        """Key.GetKey: the license with all its live activations."""
        lic = self._find(fields, refuse_blocked=self.getkey_refuses_blocked)
        if isinstance(lic, _Answer):
            return lic
        return self._success(lic, fields)

    def _deactivate(self, fields: dict[str, str], _ip: str) -> _Answer:
        """Key.Deactivate: free a machine's node-locked activation or floating seat."""
        lic = self._find(fields)
        if isinstance(lic, _Answer):
            return lic
        machine = fields.get("machinecode", "")
        if _flag(fields, "floating"):
            mids = [FLOATING_PREFIX + machine, OVERDRAFT_PREFIX + machine]
        else:
            mids = [machine]
        removed = [lic.activations.pop(mid) for mid in mids if mid in lic.activations]
        return _Answer(dict(_OK)) if removed else _error(MSG_NOT_ACTIVATED)

    def _change_int(self, fields: dict[str, str], sign: int) -> _Answer:
        """Data.Increment/DecrementIntValueToKey: change a key's data object found by Id or Name, if any."""
        lic = self.licenses.get((_int(fields.get("productid"), -1), fields.get("key", "")))
        if lic is not None:
            object_id, name = _int(fields.get("id")), fields.get("name", "")
            change = sign * _int(fields.get("intvalue"))
            for obj in lic.data_objects:
                if obj.get("Id") == object_id if object_id else (name and obj.get("Name") == name):
                    current = obj.get("IntValue", 0)
                    obj["IntValue"] = (current if isinstance(current, int) else 0) + change
        return _Answer(dict(_OK))

    def _increment(self, fields: dict[str, str], _ip: str) -> _Answer:
        """Data.IncrementIntValueToKey."""
        return self._change_int(fields, 1)

    def _decrement(self, fields: dict[str, str], _ip: str) -> _Answer:
        """Data.DecrementIntValueToKey."""
        return self._change_int(fields, -1)

    def _create_trial_key(self, fields: dict[str, str], ip: str) -> _Answer:
        """Key.CreateTrialKey: a 15-day key activated on the machine; the same key again for that machine."""
        product_id = _int(fields.get("productid"), -1)
        machine = fields.get("machinecode", "")
        for lic in self.licenses.values():
            if lic.product_id == product_id and lic.trial_activation and machine in lic.activations:
                return _Answer({"key": lic.key, "result": 0, "message": ""})
        self._trial_count += 1
        digest = hashlib.sha256(f"{product_id}:{self._trial_count}".encode()).digest()
        letters = "".join(chr(ord("A") + b % 26) for b in digest[:20])
        key = "-".join(letters[i : i + 5] for i in range(0, 20, 5))
        now = self.now()
        friendly = fields.get("friendlyname", "")
        self.add_license(
            product_id,
            key,
            period=TRIAL_DAYS,
            trial_activation=True,
            activations=[Activation(machine, ip, now, friendly)],
        )
        return _Answer({"key": key, "result": 0, "message": ""})

    def _answer(self, call: Call) -> _Answer:
        """What the service answers to a call that got through."""
        if call.fields.get("token") not in self.tokens:
            return _error(MSG_AUTH)
        methods: dict[str, Callable[[dict[str, str], str], _Answer]] = {
            "key/activate": self._activate,
            "key/getkey": self._get_key,
            "key/deactivate": self._deactivate,
            "key/createtrialkey": self._create_trial_key,
            "data/incrementintvaluetokey": self._increment,
            "data/decrementintvaluetokey": self._decrement,
        }
        method = methods.get(call.path)
        if method is None:
            return _error(MSG_ACCESS_DENIED)
        return method(call.fields, call.remote or "")

    # --- HTTP -----------------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """An aiohttp application serving this fake on every path."""
        app = web.Application()
        app[FAKE_KEY] = self
        app[_RELEASE_KEY] = release = asyncio.Event()

        async def release_waiters(_app: web.Application) -> None:
            """Let hung and delayed handlers go at shutdown, so stopping the server does not wait for them."""
            release.set()

        app.on_shutdown.append(release_waiters)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """Record the request, wait `delay`, then act out the mode or answer as the service would."""
        body = await request.read()
        fields = {
            name.lower(): value for name, value in parse_qsl(request.query_string, keep_blank_values=True)
        }
        if request.headers.get("Content-Type", "").lower().startswith("application/x-www-form-urlencoded"):
            form = parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)
            fields.update((name.lower(), value) for name, value in form)
        is_api = [part for part in request.path.lower().split("/") if part][:1] == ["api"]
        call = Call(
            http_method=request.method,
            path=normalise_path(request.path),
            fields=fields,
            body=body,
            query=request.query_string,
            headers=dict(request.headers),
            remote=request.remote,
        )
        self.calls.append(call)
        release = request.app[_RELEASE_KEY]
        if self.delay > 0 and await _wait(release, self.delay):
            return _reset(request)
        mode = self._mode
        if mode == "hang":
            await _wait(release, None)  # until the client goes away (cancelled) or the app shuts down
        if mode in {"hang", "reset"}:
            return _reset(request)
        failure = _failure_response(mode)
        if failure is not None:
            return failure
        if not is_api:
            return web.Response(
                status=404, text="<h1>404 - File or directory not found.</h1>", content_type="text/html"
            )
        answer = self._answer(call)
        if mode == "bad_signature" and answer.signed:
            answer.obj["signature"] = _spoil(str(answer.obj["signature"]))
        data = _compact(answer.obj)
        if (held := self.held.get(call.path)) is not None:
            await held.wait()  # signed now, delivered later: as over a slow way back
        if mode == "truncated":
            return await _truncated(request, data)
        return web.Response(body=data, content_type="application/json", charset="utf-8")


FAKE_KEY: Final = web.AppKey("fake_cryptolens", FakeCryptolens)
_RELEASE_KEY: Final = web.AppKey("fake_cryptolens_release", asyncio.Event)


def _failure_response(mode: str) -> web.Response | None:
    """The canned answer of a failure mode that needs no license state, or None for the others."""
    if mode == "http500":
        return web.Response(
            status=500,
            body=_compact({"result": 1, "message": "Internal error"}),
            content_type="application/json",
        )
    if mode == "html502":
        return web.Response(status=502, text=HTML_502, content_type="text/html")
    if mode == "empty504":
        return web.Response(status=504)
    if mode == "garbage":
        return web.Response(body=GARBAGE_BODY, content_type="text/plain")
    if mode == "redirect":
        return web.Response(status=302, headers={"Location": REDIRECT_TARGET})
    return None


def _spoil(signature: str) -> str:
    """Flip one bit of a base64 signature so it keeps its shape but no longer verifies."""
    raw = bytearray(base64.b64decode(signature))
    raw[len(raw) // 2] ^= 0x01
    return _b64(bytes(raw))


def _reset(request: web.Request) -> web.Response:
    """Drop the connection with a TCP reset and no answer; the response returned is never written."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=204)


async def _truncated(request: web.Request, data: bytes) -> web.StreamResponse:
    """Announce the whole body's Content-Length, send half of it, then close the connection."""
    response = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
    response.content_length = len(data)
    await response.prepare(request)
    await response.write(data[: len(data) // 2])
    if request.transport is not None:
        request.transport.close()
    return response
