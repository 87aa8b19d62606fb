"""The fake Cryptolens service behaves like the real one as far as the real Python SDK can tell."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from licensing.internal import HelperMethods
from licensing.methods import Data, Helpers, Key
from licensing.models import LicenseKey, RSAPublicKey
from pytest_aiohttp import AiohttpClient, AiohttpServer

from tests.fake_upstream import (
    MSG_ACCESS_DENIED,
    MSG_AUTH,
    MSG_BLOCKED,
    MSG_LIMIT,
    MSG_NOT_ACTIVATED,
    MSG_NOT_FOUND,
    REDIRECT_TARGET,
    Activation,
    FakeCryptolens,
    generate_key,
    normalise_path,
)

PRODUCT = 3941
KEY = "ABCDE-FGHIJ-KLMNO-PQRST"
TOKEN = "good-token"
LICENSE_FIELDS = [
    "ProductId", "ID", "Key", "Created", "Expires", "Period", "F1", "F2", "F3", "F4", "F5", "F6", "F7", "F8",
    "Notes", "Block", "GlobalId", "Customer", "ActivatedMachines", "TrialActivation", "MaxNoOfMachines",
    "AllowedMachines", "DataObjects", "SignDate", "Reseller",
]  # fmt: skip
COULD_NOT_CONTACT = "Could not contact the server."

SdkResult = tuple[Any, ...]


class Clock:
    """A clock the tests move by hand."""

    def __init__(self) -> None:
        """Start at the real current second, so SDK signature-age checks see a fresh SignDate."""
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        """The current fake time."""
        return self.now


@pytest.fixture(scope="module")
def private_key() -> rsa.RSAPrivateKey:
    """One vendor key for the whole module: generating one is slow."""
    return generate_key()


@pytest.fixture
def clock() -> Clock:
    """The fake's clock."""
    return Clock()


@pytest.fixture
def fake(private_key: rsa.RSAPrivateKey, clock: Clock) -> FakeCryptolens:
    """A fake holding one two-machine license."""
    fake = FakeCryptolens(private_key, clock=clock)
    fake.add_license(PRODUCT, KEY, max_machines=2, notes="Ünïcode notes")
    return fake


@pytest.fixture
async def server(aiohttp_server: AiohttpServer, fake: FakeCryptolens) -> TestServer:
    """The fake served on a loopback port."""
    return await aiohttp_server(fake.make_app())


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, server: TestServer) -> TestClient[Any, Any]:
    """A raw HTTP client for the fake."""
    return await aiohttp_client(server)


@pytest.fixture
def sdk(server: TestServer) -> Iterator[None]:
    """Point the real Python SDK at the fake for one test."""
    old = HelperMethods.server_address
    HelperMethods.server_address = f"http://127.0.0.1:{server.port}/api/"
    yield
    HelperMethods.server_address = old


async def activate(fake: FakeCryptolens, machine: str, key: str = KEY, **kw: Any) -> SdkResult:
    """Key.activate through the real SDK, off the event loop."""
    result: SdkResult = await asyncio.to_thread(
        Key.activate, TOKEN, fake.public_key_xml, PRODUCT, key, machine, **kw
    )
    return result


async def get_key(fake: FakeCryptolens, key: str = KEY) -> SdkResult:
    """Key.get_key through the real SDK, off the event loop."""
    result: SdkResult = await asyncio.to_thread(Key.get_key, TOKEN, fake.public_key_xml, PRODUCT, key)
    return result


async def deactivate(machine: str, *, floating: bool = False) -> SdkResult:
    """Key.deactivate through the real SDK, off the event loop."""
    result: SdkResult = await asyncio.to_thread(Key.deactivate, TOKEN, PRODUCT, KEY, machine, floating)
    return result


def mids(license_key: Any) -> list[str]:
    """The Mid of every activated machine in an SDK LicenseKey."""
    return [machine.Mid for machine in license_key.activated_machines]


def activate_form(**extra: str) -> dict[str, str]:
    """The form the Python SDK sends to activate machine `m1`."""
    form = {
        "token": TOKEN,
        "ProductId": str(PRODUCT),
        "key": KEY,
        "MachineCode": "m1",
        "Sign": "True",
        "SignMethod": "1",
    }
    form.update(extra)
    return form


class TestSigning:
    """Answers and license files are signed the way Cryptolens signs them."""

    def test_public_key_xml_is_the_dashboard_format(self, fake: FakeCryptolens) -> None:
        """The XML key has a 256-byte unsigned modulus and AQAB, and matches the PEM."""
        found = re.fullmatch(
            r"<RSAKeyValue><Modulus>([A-Za-z0-9+/=]+)</Modulus><Exponent>AQAB</Exponent></RSAKeyValue>",
            fake.public_key_xml,
        )
        assert found is not None
        modulus = base64.b64decode(found.group(1))
        assert len(modulus) == 256
        pem_key = serialization.load_pem_public_key(fake.public_key_pem.encode())
        assert isinstance(pem_key, rsa.RSAPublicKey)
        assert pem_key.public_numbers().n == int.from_bytes(modulus, "big")

    def test_signed_license_json_is_compact_and_ordered(self, fake: FakeCryptolens, clock: Clock) -> None:
        """licenseKey decodes to compact UTF-8 JSON with the service's field order and unix times."""
        body = fake.sign_answer(fake.license(PRODUCT, KEY))
        answer = json.loads(body)
        assert list(answer) == ["licenseKey", "signature", "result", "message"]
        assert b" " not in body
        raw = base64.b64decode(answer["licenseKey"])
        assert "Ünïcode".encode() in raw
        obj = json.loads(raw)
        assert list(obj) == LICENSE_FIELDS
        assert obj["SignDate"] == int(clock.now)
        assert obj["Expires"] == obj["Created"] + 30 * 86_400
        assert HelperMethods.verify_signature(
            type("R", (), {"license_key": answer["licenseKey"], "signature": answer["signature"]})(),
            RSAPublicKey.from_string(fake.public_key_xml),
        )

    @pytest.mark.parametrize("pascal_case", [False, True])
    def test_license_file_loads_in_the_sdk(self, fake: FakeCryptolens, pascal_case: bool) -> None:
        """An .skm file from the fake loads with LicenseKey.load_from_string in either key case."""
        lic = fake.license(PRODUCT, KEY)
        lic.activations["m1"] = Activation("m1", "10.0.0.1", fake.now(), "desk")
        text = fake.license_file(lic, pascal_case=pascal_case)
        assert ('"LicenseKey"' in text) is pascal_case
        loaded = LicenseKey.load_from_string(fake.public_key_xml, text, 30)
        assert loaded is not None
        assert loaded.key == KEY
        assert Helpers.IsOnRightMachine(loaded, custom_machine_code="m1")

    def test_tampered_license_file_is_rejected(self, fake: FakeCryptolens) -> None:
        """Changing one byte of the signed license makes the SDK refuse the file."""
        answer = json.loads(fake.license_file(fake.license(PRODUCT, KEY)))
        raw = base64.b64decode(answer["licenseKey"]).replace(b'"MaxNoOfMachines":2', b'"MaxNoOfMachines":9')
        answer["licenseKey"] = base64.b64encode(raw).decode()
        assert LicenseKey.load_from_string(fake.public_key_xml, json.dumps(answer)) is None

    def test_metadata_signature_verifies(self, fake: FakeCryptolens) -> None:
        """The metadata envelope is SHA-512 signed Data the SDK accepts."""
        answer = json.loads(fake.sign_answer(fake.license(PRODUCT, KEY), metadata=True))
        ok, data = HelperMethods.verify_signature_metadata(
            answer["metadata"]["signature"], RSAPublicKey.from_string(fake.public_key_xml)
        )
        assert ok
        assert json.loads(data)["LicenseStatus"]["IsValid"] is True
        envelope = json.loads(base64.b64decode(answer["metadata"]["signature"]))
        assert set(envelope) == {"Data", "Signature", "Date", "Version"}


@pytest.mark.usefixtures("sdk")
class TestActivate:
    """Key.activate through the real SDK."""

    async def test_activation_verifies_and_lists_the_machine(self, fake: FakeCryptolens) -> None:
        """A new machine is activated, recorded with its IP, and the SDK accepts the signature."""
        license_key, message = await activate(fake, "m1")
        assert message == ""
        assert mids(license_key) == ["m1"]
        assert license_key.activated_machines[0].IP == "127.0.0.1"
        assert Helpers.IsOnRightMachine(license_key, custom_machine_code="m1")
        stored = fake.license(PRODUCT, KEY).activations["m1"]
        assert stored.ip == "127.0.0.1"
        assert stored.friendly_name == "None"  # the Python SDK sends an unset name as the string None
        (call,) = fake.calls_to("/api/Key/Activate/")
        assert call.http_method == "POST"
        assert call.path == "key/activate"
        assert call.fields["machinecode"] == "m1"
        assert call.fields["sign"] == "True"
        assert call.fields["friendlyname"] == "None"

    async def test_same_machine_again_refreshes_friendly_name(self, fake: FakeCryptolens) -> None:
        """Activating a machine again succeeds without taking a second seat."""
        await activate(fake, "m1")
        license_key, _ = await activate(fake, "m1", friendly_name="desk 7")
        assert mids(license_key) == ["m1"]
        assert fake.license(PRODUCT, KEY).activations["m1"].friendly_name == "desk 7"

    async def test_limit_reached(self, fake: FakeCryptolens) -> None:
        """A machine beyond MaxNoOfMachines is refused with the service's message."""
        assert (await activate(fake, "m1"))[0] is not None
        assert (await activate(fake, "m2"))[0] is not None
        assert await activate(fake, "m3") == (None, MSG_LIMIT)
        assert list(fake.license(PRODUCT, KEY).activations) == ["m1", "m2"]

    async def test_metadata_verifies(self, fake: FakeCryptolens) -> None:
        """With metadata=True the SDK verifies the metadata signature and returns its content."""
        license_key, message, metadata = await activate(fake, "m1", metadata=True)
        assert license_key is not None
        assert message == ""
        assert metadata["ActivatedMachines"] == 1
        assert metadata["LicenseStatus"]["IsValid"] is True

    async def test_unknown_key(self, fake: FakeCryptolens) -> None:
        """A key the account does not hold is not found."""
        assert await activate(fake, "m1", key="NOPE-NOPE") == (None, MSG_NOT_FOUND)

    async def test_blocked_then_unblocked(self, fake: FakeCryptolens) -> None:
        """A blocked key is refused until it is unblocked."""
        fake.block(PRODUCT, KEY)
        assert await activate(fake, "m1") == (None, MSG_BLOCKED)
        fake.unblock(PRODUCT, KEY)
        assert (await activate(fake, "m1"))[0] is not None

    async def test_removed_license(self, fake: FakeCryptolens) -> None:
        """A removed license is no longer found."""
        fake.remove_license(PRODUCT, KEY)
        assert await activate(fake, "m1") == (None, MSG_NOT_FOUND)

    async def test_unknown_token(self, fake: FakeCryptolens) -> None:
        """A token the account does not know cannot authenticate."""
        result = await asyncio.to_thread(Key.activate, "bad", fake.public_key_xml, PRODUCT, KEY, "m1")
        assert result == (None, MSG_AUTH)

    async def test_activation_not_set_up(self, fake: FakeCryptolens) -> None:
        """With MaxNoOfMachines 0 activation succeeds without recording machines."""
        fake.add_license(PRODUCT, "OPEN-KEY", max_machines=0)
        license_key, _ = await activate(fake, "m1", key="OPEN-KEY")
        assert license_key is not None
        assert mids(license_key) == []


@pytest.mark.usefixtures("sdk")
class TestFloating:
    """Floating activations: seat leases, their expiry and overdraft."""

    async def test_floating_lease(self, fake: FakeCryptolens, clock: Clock) -> None:
        """A floating activation is listed as floating:<mc> with its expiry."""
        license_key, _ = await activate(fake, "m1", floating_time_interval=300)
        assert mids(license_key) == ["floating:m1"]
        assert license_key.activated_machines[0].FloatingExpires == int(clock.now) + 300
        assert Helpers.IsOnRightMachine(license_key, is_floating_license=True, custom_machine_code="m1")

    async def test_floating_limit_and_expiry(self, fake: FakeCryptolens, clock: Clock) -> None:
        """Live leases fill the seats; a holder renews; an expired lease frees its seat."""
        await activate(fake, "m1", floating_time_interval=300)
        clock.now += 100
        await activate(fake, "m2", floating_time_interval=300)
        assert await activate(fake, "m3", floating_time_interval=300) == (None, MSG_LIMIT)
        renewed, _ = await activate(fake, "m2", floating_time_interval=300)
        assert renewed is not None
        clock.now += 250  # m1 lapsed, m2 renewed at +100 holds until +400
        license_key, _ = await activate(fake, "m3", floating_time_interval=300)
        assert mids(license_key) == ["floating:m2", "floating:m3"]

    async def test_node_locked_seats_do_not_count_as_floating(self, fake: FakeCryptolens) -> None:
        """Node-locked activations and floating leases are counted apart."""
        await activate(fake, "m1")
        await activate(fake, "m2")
        await activate(fake, "m3", floating_time_interval=60)
        license_key, _ = await activate(fake, "m4", floating_time_interval=60)
        assert mids(license_key) == ["m1", "m2", "floating:m3", "floating:m4"]

    async def test_overdraft(self, fake: FakeCryptolens) -> None:
        """Beyond the limit a machine gets an overdraft seat while MaxOverdraft allows."""
        for machine in ("m1", "m2"):
            await activate(fake, machine, floating_time_interval=60, max_overdraft=1)
        license_key, _ = await activate(fake, "m3", floating_time_interval=60, max_overdraft=1)
        assert "floating:overdraft:m3" in mids(license_key)
        assert len("floating:overdraft:") == 19
        assert Helpers.IsOnRightMachine(
            license_key, is_floating_license=True, allow_overdraft=True, custom_machine_code="m3"
        )
        assert not Helpers.IsOnRightMachine(license_key, is_floating_license=True, custom_machine_code="m3")
        assert await activate(fake, "m4", floating_time_interval=60, max_overdraft=1) == (None, MSG_LIMIT)

    async def test_deactivate_floating_frees_the_seat(self, fake: FakeCryptolens) -> None:
        """Releasing a floating seat lets another machine take it."""
        for machine in ("m1", "m2"):
            await activate(fake, machine, floating_time_interval=60)
        assert await deactivate("m1", floating=True) == (True, "")
        assert (await activate(fake, "m3", floating_time_interval=60))[0] is not None


@pytest.mark.usefixtures("sdk")
class TestGetKeyAndDeactivate:
    """Key.get_key and Key.deactivate through the real SDK."""

    async def test_get_key_lists_all_activations(self, fake: FakeCryptolens) -> None:
        """GetKey returns the signed license with every live activation."""
        await activate(fake, "m1")
        await activate(fake, "m2", floating_time_interval=60)
        license_key, message = await get_key(fake)
        assert message == ""
        assert mids(license_key) == ["m1", "floating:m2"]
        (call,) = fake.calls_to("key/getkey")
        assert "machinecode" not in call.fields

    async def test_get_key_blocked(self, fake: FakeCryptolens) -> None:
        """GetKey refuses a blocked key, or returns it with Block set when configured so."""
        fake.block(PRODUCT, KEY)
        assert await get_key(fake) == (None, MSG_BLOCKED)
        fake.getkey_refuses_blocked = False
        license_key, _ = await get_key(fake)
        assert license_key.block is True

    async def test_get_key_unknown(self, fake: FakeCryptolens) -> None:
        """GetKey on a key the account does not hold is not found."""
        assert await get_key(fake, key="NOPE") == (None, MSG_NOT_FOUND)

    async def test_deactivate(self, fake: FakeCryptolens) -> None:
        """Deactivating frees the machine once; a second time it was never activated."""
        await activate(fake, "m1")
        assert await deactivate("m1") == (True, "")
        assert fake.license(PRODUCT, KEY).activations == {}
        assert await deactivate("m1") == (False, MSG_NOT_ACTIVATED)


@pytest.mark.usefixtures("sdk")
class TestOtherMethods:
    """The unsigned calls SDKs also make."""

    async def test_create_trial_key(self, fake: FakeCryptolens) -> None:
        """A trial key is made once per machine and activated on it."""
        key, message = await asyncio.to_thread(Key.create_trial_key, TOKEN, PRODUCT, "t1")
        assert message == ""
        assert re.fullmatch(r"[A-Z]{5}(-[A-Z]{5}){3}", key)
        again, _ = await asyncio.to_thread(Key.create_trial_key, TOKEN, PRODUCT, "t1")
        assert again == key
        trial = fake.license(PRODUCT, key)
        assert trial.trial_activation
        assert list(trial.activations) == ["t1"]

    async def test_increment_and_decrement(self, fake: FakeCryptolens) -> None:
        """Int values of a key's data objects change by name or id; the path has the SDK's `//`."""
        lic = fake.license(PRODUCT, KEY)
        lic.data_objects.append({"Id": 7, "Name": "usage", "StringValue": "", "IntValue": 1})
        result, _ = await asyncio.to_thread(
            Data.increment_int_value_to_key, TOKEN, PRODUCT, KEY, 0, "usage", 5
        )
        assert result == {"result": 0, "message": ""}
        await asyncio.to_thread(Data.decrement_int_value_to_key, TOKEN, PRODUCT, KEY, 7, "", 2)
        assert lic.data_objects[0]["IntValue"] == 4
        assert len(fake.calls_to("data/IncrementIntValueToKey")) == 1
        assert fake.calls[0].path == "data/incrementintvaluetokey"

    async def test_other_method_is_denied(self, client: TestClient[Any, Any]) -> None:
        """A method the fake does not implement answers Access denied."""
        resp = await client.post("/api/key/CreateKey", data={"token": TOKEN})
        assert await resp.json() == {"result": 1, "message": MSG_ACCESS_DENIED}


class TestRouting:
    """Paths, methods and field names are matched the ASP.NET way."""

    @pytest.mark.parametrize(
        "path", ["/api/key/activate", "/api//key/activate/", "/API/Key/Activate", "/api//Key//Activate//"]
    )
    async def test_path_spellings(
        self, client: TestClient[Any, Any], fake: FakeCryptolens, path: str
    ) -> None:
        """Every SDK's spelling of the path reaches the same method."""
        resp = await client.post(path, data=activate_form())
        assert resp.status == 200
        answer = await resp.json()
        assert answer["result"] == 0
        assert fake.calls_to("key/activate")[0].path == "key/activate"

    async def test_get_with_query_and_any_field_case(
        self, client: TestClient[Any, Any], fake: FakeCryptolens
    ) -> None:
        """GET with a query string works and field names are case-insensitive."""
        params = {
            "TOKEN": TOKEN,
            "productid": str(PRODUCT),
            "KEY": KEY,
            "machineCODE": "m9",
            "sign": "true",
            "signmethod": "StringSign",
        }
        resp = await client.get("/api/key/activate", params=params)
        answer = await resp.json()
        assert answer["result"] == 0
        assert "signature" in answer
        (call,) = fake.calls
        assert call.http_method == "GET"
        assert call.fields["machinecode"] == "m9"
        assert "machineCODE=m9" in call.query
        assert call.body == b""

    async def test_unsigned_answer(self, client: TestClient[Any, Any]) -> None:
        """Without Sign the license comes back as a plain JSON object and no signature."""
        form = activate_form()
        del form["Sign"]
        answer = await (await client.post("/api/key/activate", data=form)).json()
        assert set(answer) == {"licenseKey", "result", "message"}
        assert answer["licenseKey"]["Key"] == KEY
        assert answer["licenseKey"]["ActivatedMachines"][0]["Mid"] == "m1"

    async def test_body_and_headers_recorded(
        self, client: TestClient[Any, Any], fake: FakeCryptolens
    ) -> None:
        """The raw body and headers of a call are kept."""
        await client.post("/api/key/getkey", data={"token": TOKEN, "ProductId": str(PRODUCT), "Key": KEY})
        (call,) = fake.calls
        assert call.body == f"token={TOKEN}&ProductId={PRODUCT}&Key={KEY}".encode()
        assert call.headers["Content-Type"] == "application/x-www-form-urlencoded"
        assert call.remote == "127.0.0.1"

    async def test_token_checked_before_method(self, client: TestClient[Any, Any]) -> None:
        """An unknown token is refused on every path, with HTTP 200."""
        resp = await client.post("/api/nothing/here", data={"token": "bad"})
        assert resp.status == 200
        assert await resp.json() == {"result": 1, "message": MSG_AUTH}

    async def test_not_an_api_path(self, client: TestClient[Any, Any]) -> None:
        """Paths outside /api/ are not found."""
        resp = await client.get("/favicon.ico")
        assert resp.status == 404

    def test_normalise_path(self) -> None:
        """normalise_path folds every spelling to controller/method."""
        assert normalise_path("/api//data/IncrementIntValueToKey/") == "data/incrementintvaluetokey"
        assert normalise_path("key/activate") == "key/activate"


@pytest.mark.usefixtures("sdk")
class TestFailureModesWithSdk:
    """What the real SDK makes of each failure mode."""

    @pytest.mark.parametrize(
        ("mode", "expected"),
        [
            ("http500", (None, "Internal error")),
            ("garbage", (None, COULD_NOT_CONTACT)),
            ("bad_signature", (None, "The signature check failed.")),
            ("truncated", (None, COULD_NOT_CONTACT)),
        ],
    )
    async def test_refused(self, fake: FakeCryptolens, mode: str, expected: SdkResult) -> None:
        """The SDK turns these into an error message."""
        fake.mode = mode
        assert await activate(fake, "m1") == expected

    @pytest.mark.parametrize("mode", ["reset", "redirect"])
    async def test_cannot_contact(self, fake: FakeCryptolens, mode: str) -> None:
        """A reset connection or a redirect to a closed port leaves the SDK unable to contact the server."""
        fake.mode = mode
        license_key, message = await activate(fake, "m1")
        assert license_key is None
        assert message.startswith(COULD_NOT_CONTACT[:-1])

    @pytest.mark.parametrize("mode", ["html502", "empty504"])
    async def test_sdk_raises_on_non_json_error(self, fake: FakeCryptolens, mode: str) -> None:
        """A non-2xx answer that is not JSON makes the SDK raise in the application."""
        fake.mode = mode
        with pytest.raises(json.JSONDecodeError):
            await activate(fake, "m1")

    async def test_bad_signature_spares_unsigned_calls(self, fake: FakeCryptolens) -> None:
        """bad_signature only spoils signed answers."""
        await activate(fake, "m1")
        fake.mode = "bad_signature"
        assert await deactivate("m1") == (True, "")

    async def test_modes_change_no_state_but_truncated_does(self, fake: FakeCryptolens) -> None:
        """Failure modes answer before processing, except truncated, whose answer is lost after it."""
        fake.mode = "http500"
        await activate(fake, "m1")
        assert fake.license(PRODUCT, KEY).activations == {}
        fake.mode = "truncated"
        await activate(fake, "m1")
        assert list(fake.license(PRODUCT, KEY).activations) == ["m1"]
        assert len(fake.calls) == 2


class TestFailureModesOnTheWire:
    """What each failure mode puts on the wire."""

    async def test_http500(self, client: TestClient[Any, Any], fake: FakeCryptolens) -> None:
        """http500 answers 500 with a JSON error."""
        fake.mode = "http500"
        resp = await client.post("/api/key/activate", data=activate_form())
        assert resp.status == 500
        assert await resp.json() == {"result": 1, "message": "Internal error"}

    async def test_html502(self, client: TestClient[Any, Any], fake: FakeCryptolens) -> None:
        """html502 answers a 502 HTML page."""
        fake.mode = "html502"
        resp = await client.post("/api/key/activate", data=activate_form())
        assert resp.status == 502
        assert resp.content_type == "text/html"
        assert "<html>" in await resp.text()

    async def test_empty504(self, client: TestClient[Any, Any], fake: FakeCryptolens) -> None:
        """empty504 answers 504 with no body."""
        fake.mode = "empty504"
        resp = await client.post("/api/key/activate", data=activate_form())
        assert resp.status == 504
        assert await resp.read() == b""

    async def test_garbage(self, client: TestClient[Any, Any], fake: FakeCryptolens) -> None:
        """garbage answers 200 with a body that is not JSON."""
        fake.mode = "garbage"
        resp = await client.post("/api/key/activate", data=activate_form())
        assert resp.status == 200
        assert await resp.read() == b"not json at all"

    async def test_bad_signature(self, client: TestClient[Any, Any], fake: FakeCryptolens) -> None:
        """bad_signature keeps the answer's shape but the signature no longer verifies."""
        fake.mode = "bad_signature"
        answer = await (await client.post("/api/key/activate", data=activate_form())).json()
        assert answer["result"] == 0
        assert len(base64.b64decode(answer["signature"])) == 256
        response = type("R", (), {"license_key": answer["licenseKey"], "signature": answer["signature"]})()
        assert not HelperMethods.verify_signature(response, RSAPublicKey.from_string(fake.public_key_xml))

    async def test_truncated(self, client: TestClient[Any, Any], fake: FakeCryptolens) -> None:
        """truncated announces the full length, sends half and closes."""
        fake.mode = "truncated"
        resp = await client.post("/api/key/activate", data=activate_form())
        assert resp.status == 200
        assert resp.content_length is not None
        assert resp.content_length > 100
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()

    async def test_reset(self, client: TestClient[Any, Any], fake: FakeCryptolens) -> None:
        """reset drops the connection without an answer."""
        fake.mode = "reset"
        with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            await client.post("/api/key/activate", data=activate_form())
        assert len(fake.calls) == 1

    async def test_redirect(self, client: TestClient[Any, Any], fake: FakeCryptolens) -> None:
        """redirect answers 302 to a port where nothing listens."""
        fake.mode = "redirect"
        resp = await client.post("/api/key/activate", data=activate_form(), allow_redirects=False)
        assert resp.status == 302
        assert resp.headers["Location"] == REDIRECT_TARGET

    async def test_hang(self, client: TestClient[Any, Any], fake: FakeCryptolens) -> None:
        """hang never answers; the call is still recorded."""
        fake.mode = "hang"
        with pytest.raises(TimeoutError):
            await client.post(
                "/api/key/activate", data=activate_form(), timeout=aiohttp.ClientTimeout(total=0.2)
            )
        assert len(fake.calls) == 1

    async def test_hang_is_released_at_shutdown(
        self, aiohttp_server: AiohttpServer, fake: FakeCryptolens
    ) -> None:
        """Stopping the server drops hung requests at once instead of waiting for them."""
        server = await aiohttp_server(fake.make_app())
        fake.mode = "hang"

        async def post() -> None:
            async with aiohttp.ClientSession() as session:
                await session.post(server.make_url("/api/key/activate"), data=activate_form())

        request = asyncio.create_task(post())
        for _ in range(200):
            if fake.calls:
                break
            await asyncio.sleep(0.01)
        assert fake.calls
        started = time.monotonic()
        await server.close()
        assert time.monotonic() - started < 2
        with pytest.raises(aiohttp.ClientError):
            await request

    async def test_delay(self, client: TestClient[Any, Any], fake: FakeCryptolens) -> None:
        """delay holds every answer back by that many seconds."""
        fake.delay = 0.2
        started = time.monotonic()
        resp = await client.post("/api/key/activate", data=activate_form())
        assert (await resp.json())["result"] == 0
        assert time.monotonic() - started >= 0.2

    def test_unknown_mode_is_refused(self, fake: FakeCryptolens) -> None:
        """Setting a mode that does not exist fails at once."""
        with pytest.raises(ValueError, match="unknown mode"):
            fake.mode = "refusal"
