"""End to end: the real Cryptolens Python SDK through the daemon to a signing fake upstream."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from licensing.methods import Helpers
from multidict import CIMultiDict

from license_server.audit import chain
from license_server.web.app import SERVICES
from tests.conftest import (
    LICENSE,
    OTHER_LICENSE,
    PRODUCT,
    TOKEN,
    Clock,
    Daemon,
    Upstream,
    Workstation,
    send_form,
)

MakeWorkstation = Callable[..., Workstation]
DaemonFactory = Callable[..., Awaitable[Daemon]]

FAILURE_MODES = [
    "http500",
    "html502",
    "empty504",
    "garbage",
    "bad_signature",
    "truncated",
    "reset",
    "redirect",
]


# The only headers a workstation ever gets: aiohttp's framing and the daemon's own.
DAEMON_HEADERS = frozenset(
    {
        *("content-type", "content-length", "date", "server"),
        *("x-license-server-source", "x-license-server-age", "x-request-id"),
    }
)


def activate_form(
    machine: str = "machine-a", key: str = LICENSE, token: str = TOKEN, **extra: str
) -> dict[str, str]:
    """The form the Python SDK sends for Key.activate."""
    form = {
        "token": token,
        "ProductId": str(PRODUCT),
        "key": key,
        "MachineCode": machine,
        "FieldsToReturn": "0",
        "metadata": "False",
        "FloatingTimeInterval": "0",
        "MaxOverdraft": "0",
        "FriendlyName": "None",
        "ModelVersion": "3",
        "Sign": "True",
        "SignMethod": "1",
    }
    form.update(extra)
    return form


async def post(
    daemon: Daemon, path: str, data: bytes | str | dict[str, str], headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    """POST to the daemon (an SDK-shaped form by default) and return status, headers and body."""
    return await send_form(daemon.base, path, data, headers)


def call_records(folder: Path) -> list[dict[str, Any]]:
    """The call records of an audit trail, oldest first."""
    return [
        record
        for audit_file in chain.list_files(folder)
        for record in map(json.loads, audit_file.path.read_bytes().splitlines())
        if record["type"] == chain.CALL
    ]


async def audit_record(daemon: Daemon, request_id: str) -> dict[str, Any]:
    """The audit record of one answered call (written before its answer was sent)."""
    records = await asyncio.to_thread(call_records, daemon.config.audit_dir)
    [record] = [r for r in records if r["request_id"] == request_id]
    return record


class TestForwarding:
    """Calls pass through to the one upstream, byte for byte, whatever the SDK's path spelling."""

    async def test_sdk_activation_verifies(self, workstation: MakeWorkstation, upstream: Upstream) -> None:
        """The SDK activates through the daemon and accepts the signed answer."""
        license_key, message = await workstation("alice-pc").activate()
        assert license_key is not None, message
        assert license_key.key == LICENSE
        assert Helpers.IsOnRightMachine(license_key, custom_machine_code="alice-pc")
        assert len(upstream.fake.calls_to("key/activate")) == 1

    async def test_body_and_answer_unchanged(self, daemon: Daemon, upstream: Upstream) -> None:
        """The form goes upstream as sent and the answer comes back as upstream sent it."""
        form = urlencode(activate_form())
        status, headers, body = await post(daemon, "/api/key/activate", form)
        assert status == 200
        assert headers["X-License-Server-Source"] == "forwarded"
        sent = upstream.fake.calls_to("key/activate")[-1]
        assert sent.body == form.encode()
        answer = json.loads(body)
        assert answer["result"] == 0
        license_json = json.loads(base64.b64decode(answer["licenseKey"]))
        assert license_json["ActivatedMachines"][0]["Mid"] == "machine-a"

    @pytest.mark.parametrize(
        "path", ["/api/key/activate", "/api//key/activate/", "/api/Key/Activate", "/API/KEY/ACTIVATE//"]
    )
    async def test_every_sdk_path_spelling(self, daemon: Daemon, upstream: Upstream, path: str) -> None:
        """Double slashes, trailing slashes and any case route the same, without a redirect."""
        status, _, body = await post(daemon, path, activate_form())
        assert status == 200, body
        assert json.loads(body)["result"] == 0
        assert upstream.fake.calls[-1].path == "key/activate"

    async def test_get_with_query(self, daemon: Daemon, upstream: Upstream) -> None:
        """A GET with a query string, as Node users send it, is forwarded as such."""
        query = urlencode(activate_form())
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{daemon.base}/api/key/activate?{query}") as r,
        ):
            assert r.status == 200
            assert (await r.json(content_type=None))["result"] == 0
        call = upstream.fake.calls[-1]
        assert call.http_method == "GET"
        assert call.query == query

    async def test_post_with_query_reaches_upstream_whole(self, daemon: Daemon, upstream: Upstream) -> None:
        """Fields split over the query and a POST form all go upstream; the ledger and audit hold those."""
        form = activate_form(machine="split-pc")
        query = urlencode({"FloatingTimeInterval": "300", "FriendlyName": "lab-7"})
        del form["FloatingTimeInterval"], form["FriendlyName"]
        status, headers, body = await post(daemon, f"/api/key/activate?{query}", form)
        assert status == 200
        assert json.loads(body)["result"] == 0
        sent = upstream.fake.calls_to("key/activate")[-1]
        assert (sent.http_method, sent.query, sent.body) == ("POST", query, urlencode(form).encode())
        assert (sent.fields["floatingtimeinterval"], sent.fields["friendlyname"]) == ("300", "lab-7")
        assert "floating:split-pc" in upstream.fake.licenses[(PRODUCT, LICENSE)].activations
        assert "split-pc" in daemon.app[SERVICES].licensing.seats.live((str(PRODUCT), LICENSE))
        record = await audit_record(daemon, headers["X-Request-Id"])
        assert (record["floating_interval"], record["friendly_name"]) == (300, "lab-7")

    async def test_get_key_and_deactivate(self, workstation: MakeWorkstation, upstream: Upstream) -> None:
        """GetKey and Deactivate work through the daemon."""
        ws = workstation("bob-pc")
        assert (await ws.activate())[0] is not None
        license_key, message = await ws.get_key()
        assert license_key is not None, message
        assert [m.Mid for m in license_key.activated_machines] == ["bob-pc"]
        assert await ws.deactivate() == (True, "")
        assert upstream.fake.licenses[(PRODUCT, LICENSE)].activations == {}

    async def test_floating_activation(self, workstation: MakeWorkstation) -> None:
        """A floating activation comes back with the machine's floating seat."""
        license_key, message = await workstation("carol-pc").activate(floating=300)
        assert license_key is not None, message
        assert Helpers.IsOnRightMachine(license_key, is_floating_license=True, custom_machine_code="carol-pc")

    async def test_metadata_verifies(self, workstation: MakeWorkstation) -> None:
        """Metadata answers pass through with their own signature intact."""
        result = await workstation("dave-pc").activate(metadata=True)
        assert result[0] is not None
        assert isinstance(result[2], dict)

    async def test_refusal_passed_verbatim(self, workstation: MakeWorkstation) -> None:
        """An upstream refusal reaches the SDK with its exact message."""
        await workstation("m1").activate(OTHER_LICENSE)
        license_key, message = await workstation("m2").activate(OTHER_LICENSE)
        assert license_key is None
        assert message == "Cannot activate the new device as the limit has been reached."

    async def test_wrong_token_refused(self, workstation: MakeWorkstation) -> None:
        """A bad access token gets upstream's own answer."""
        assert await workstation("m1", token="nope").activate() == (None, "Unable to authenticate.")


class TestRefusedInput:
    """Bad input gets a clear JSON error, never reaches upstream, and the daemon stays up."""

    @pytest.mark.parametrize("method", ["key/createkey", "key/blockkey", "product/getproducts", "user/login"])
    async def test_method_not_allowlisted(self, daemon: Daemon, upstream: Upstream, method: str) -> None:
        """Vendor-side and unknown API methods are refused and never forwarded."""
        status, _, body = await post(daemon, f"/api/{method}", {"token": TOKEN})
        assert status == 403
        assert json.loads(body) == {
            "result": 1,
            "message": f"The API method '{method}' is not allowed through this license server.",
        }
        assert upstream.fake.calls == []

    @pytest.mark.parametrize(
        "path", ["/", "/api", "/api/key", "/api/key/activate/extra", "/api/key/../activate", "/other"]
    )
    async def test_not_an_api_path(self, daemon: Daemon, upstream: Upstream, path: str) -> None:
        """Anything that is not /api/controller/method gets a 404 JSON answer."""
        status, _, body = await post(daemon, path, {"token": TOKEN})
        assert status == 404
        assert json.loads(body)["result"] == 1
        assert upstream.fake.calls == []

    @pytest.mark.parametrize(
        ("body", "content_type", "status"),
        [
            (b"token=a&token=b", "application/x-www-form-urlencoded", 400),
            (b"token=a&TOKEN=b", "application/x-www-form-urlencoded", 400),
            (b"\xff\xfe=1", "application/x-www-form-urlencoded", 400),
            (b"not a form", "application/x-www-form-urlencoded", 400),
            (b'{"token": "a"}', "application/json", 415),
            (b"x=" + b"a" * 70_000, "application/x-www-form-urlencoded", 413),
        ],
    )
    async def test_malformed_bodies(
        self, daemon: Daemon, upstream: Upstream, body: bytes, content_type: str, status: int
    ) -> None:
        """Duplicate fields, bad encodings, other media types and oversized bodies are refused as JSON."""
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{daemon.base}/api/key/activate", data=body, headers={"Content-Type": content_type}
            ) as response,
        ):
            assert response.status == status
            answer = await response.json(content_type=None)
        assert answer["result"] == 1
        assert answer["message"]
        assert upstream.fake.calls == []
        # still serving
        assert (await post(daemon, "/api/key/activate", activate_form()))[0] == 200

    async def test_get_with_body_refused(self, daemon: Daemon, upstream: Upstream) -> None:
        """A GET's body never becomes fields: upstream would read only the query, so the call is a 400."""
        query = urlencode(activate_form(machine="m1"))
        ghost = "FloatingTimeInterval=100000000&FriendlyName=ghost"
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{daemon.base}/api/key/activate?{query}",
                data=ghost,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ) as response,
        ):
            assert response.status == 400
            answer = await response.json(content_type=None)
            request_id = response.headers["X-Request-Id"]
        assert answer["result"] == 1
        assert "GET" in answer["message"]
        assert upstream.fake.calls == []
        assert daemon.app[SERVICES].licensing.seats.in_use() == {}
        record = await audit_record(daemon, request_id)
        assert (record["status"], record["floating_interval"], record["friendly_name"]) == (400, 0, "")

    async def test_other_http_methods(self, daemon: Daemon) -> None:
        """PUT and DELETE get a 405 JSON answer."""
        async with aiohttp.ClientSession() as session, session.put(f"{daemon.base}/api/key/activate") as r:
            assert r.status == 405
            assert (await r.json(content_type=None))["result"] == 1

    async def test_healthz(self, daemon: Daemon) -> None:
        """GET /healthz answers 200."""
        async with aiohttp.ClientSession() as session, session.get(f"{daemon.base}/healthz") as r:
            assert r.status == 200
            assert (await r.json())["status"] == "alive"


class TestOutages:
    """A workstation that activated once keeps getting answers its SDK accepts while upstream fails."""

    @pytest.mark.parametrize("mode", FAILURE_MODES)
    async def test_kept_answer_served(
        self, workstation: MakeWorkstation, upstream: Upstream, mode: str
    ) -> None:
        """Each failure mode is covered by the kept answer, which the SDK verifies."""
        ws = workstation("alice-pc")
        first, _ = await ws.activate()
        upstream.fake.mode = mode
        again, message = await ws.activate()
        assert again is not None, message
        assert again.raw_response.license_key == first.raw_response.license_key

    @pytest.mark.parametrize("mode", FAILURE_MODES)
    async def test_no_kept_answer_gives_json_error(
        self, workstation: MakeWorkstation, upstream: Upstream, mode: str
    ) -> None:
        """With nothing kept, the SDK gets a JSON error that says what happened, never a bad signature."""
        upstream.fake.mode = mode
        license_key, message = await workstation("new-pc").activate()
        assert license_key is None
        assert "keeps no answer" in message

    async def test_connection_refused(self, workstation: MakeWorkstation, upstream: Upstream) -> None:
        """An upstream that refuses connections is covered by the kept answer."""
        ws = workstation("alice-pc")
        assert (await ws.activate())[0] is not None
        await upstream.stop()
        license_key, message = await ws.activate()
        assert license_key is not None, message
        license_key, message = await workstation("stranger").activate()
        assert license_key is None
        assert "could not be reached" in message

    async def test_hung_upstream_bounded_then_breaker(
        self, daemon: Daemon, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """A hung upstream costs the configured timeout, then the breaker answers without asking it."""
        ws = workstation("alice-pc")
        assert (await ws.activate())[0] is not None
        upstream.fake.mode = "hang"
        for _ in range(3):  # breaker.failures defaults to 3
            assert (await ws.activate())[0] is not None
        hung_calls = len(upstream.fake.calls)
        for _ in range(5):
            assert (await ws.activate())[0] is not None
        assert len(upstream.fake.calls) == hung_calls, "the open breaker must not call upstream"
        assert daemon.app[SERVICES].upstream is not None
        assert daemon.app[SERVICES].upstream.breaker.state.value == "open"

    async def test_breaker_probes_and_closes(
        self, daemon: Daemon, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """After the reset delay one probe goes upstream; its success closes the breaker."""
        ws = workstation("alice-pc")
        assert (await ws.activate())[0] is not None
        upstream.fake.mode = "http500"
        for _ in range(4):
            await ws.activate()
        upstream.fake.mode = "ok"
        await asyncio.sleep(0.25)  # breaker.reset_after is 0.2 s in tests
        await ws.activate()
        services = daemon.app[SERVICES]
        assert services.upstream is not None
        assert services.upstream.breaker.state.value == "closed"
        assert upstream.fake.calls[-1].http_method == "POST"

    async def test_stale_bound(self, workstation: MakeWorkstation, upstream: Upstream, clock: Clock) -> None:
        """Just inside the maximum age the kept answer is served; just outside, a clean error."""
        ws = workstation("alice-pc")
        assert (await ws.activate())[0] is not None
        upstream.fake.mode = "http500"
        clock.advance(7 * 86400 - 5)
        assert (await ws.activate())[0] is not None
        clock.advance(10)
        license_key, message = await ws.activate()
        assert license_key is None
        assert "older than" in message

    async def test_only_same_machine_token_and_license(
        self, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """A kept answer is never served to another machine, token or license."""
        assert (await workstation("alice-pc").activate())[0] is not None
        upstream.fake.tokens.add("other-token")
        upstream.fake.mode = "http500"
        assert (await workstation("bob-pc").activate())[0] is None
        assert (await workstation("alice-pc", token="other-token").activate())[0] is None
        assert (await workstation("alice-pc").activate(OTHER_LICENSE))[0] is None
        assert (await workstation("alice-pc").activate())[0] is not None

    async def test_get_key_kept(self, workstation: MakeWorkstation, upstream: Upstream) -> None:
        """GetKey answers are kept and served during an outage too."""
        ws = workstation("alice-pc")
        assert (await ws.get_key())[0] is not None
        upstream.fake.mode = "garbage"
        license_key, message = await ws.get_key()
        assert license_key is not None, message

    async def test_get_key_coalesced(self, daemon: Daemon, upstream: Upstream) -> None:
        """Identical concurrent GetKey calls share one upstream call."""
        upstream.fake.delay = 0.3
        form = activate_form()
        form.pop("MachineCode")
        results = await asyncio.gather(*(post(daemon, "/api/key/getkey", form) for _ in range(20)))
        assert {status for status, _, _ in results} == {200}
        assert len({body for _, _, body in results}) == 1
        assert len(upstream.fake.calls_to("key/getkey")) == 1


class TestExactValues:
    """A machine code is taken exactly as sent: a look-alike spelt with a tab is another machine."""

    async def test_refused_look_alike_keeps_answer(
        self, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """A look-alike refused on a full license leaves the real machine's kept answer for outages."""
        victim = workstation("victim-ws")
        first, message = await victim.activate(OTHER_LICENSE)  # a one-seat license, now full
        assert first is not None, message
        refused, message = await workstation("victim-ws\t").activate(OTHER_LICENSE)
        assert (refused, message) == (None, "Cannot activate the new device as the limit has been reached.")
        upstream.fake.mode = "http500"
        served, message = await victim.activate(OTHER_LICENSE)
        assert served is not None, message
        assert served.raw_response.signature == first.raw_response.signature

    async def test_look_alike_never_replaces_answer(
        self, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """A look-alike activated, then deactivated: the real machine is still served its own kept answer."""
        victim, ghost = workstation("victim-ws"), workstation("victim-ws\t")
        first, message = await victim.activate()
        assert first is not None, message
        assert (await ghost.activate())[0] is not None
        assert await ghost.deactivate() == (True, "")
        upstream.fake.mode = "http500"
        served, message = await victim.activate()
        assert served is not None, message
        assert served.raw_response.signature == first.raw_response.signature
        assert Helpers.IsOnRightMachine(served, custom_machine_code="victim-ws")

    async def test_product_id_read_as_a_number(self, daemon: Daemon, upstream: Upstream) -> None:
        """ProductId 03349 is the product 3349 to upstream: its answer is forwarded and kept, no failure."""
        for _ in range(4):  # more than the breaker's failures in a row
            status, headers, body = await post(
                daemon, "/api/key/activate", activate_form(ProductId=f"0{PRODUCT}")
            )
            assert (status, headers["X-License-Server-Source"]) == (200, "forwarded"), body
            assert json.loads(body)["result"] == 0
        upstream.fake.mode = "http500"
        status, headers, _ = await post(daemon, "/api/key/activate", activate_form(ProductId=f"0{PRODUCT}"))
        assert (status, headers["X-License-Server-Source"]) == (200, "kept_stale")

    async def test_unknown_look_alike_key_keeps_license(
        self, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """A key spelt with a space that upstream does not know drops no kept answer of the real key."""
        victim = workstation("victim-ws")
        first, message = await victim.activate()
        assert first is not None, message
        assert await workstation("attacker").get_key(LICENSE + " ") == (None, "Could not find the key.")
        upstream.fake.mode = "http500"
        served, message = await victim.activate()
        assert served is not None, message
        assert served.raw_response.signature == first.raw_response.signature


class TestRefusalsAreNotFailures:
    """Upstream refusals pass through and stop kept answers from standing in."""

    async def test_blocked_license_not_revived(
        self, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """Once upstream says a license is blocked, an outage does not bring it back."""
        ws = workstation("alice-pc")
        assert (await ws.activate())[0] is not None
        upstream.fake.licenses[(PRODUCT, LICENSE)].block = True
        assert await ws.activate() == (None, "The key is blocked and cannot be accessed.")
        upstream.fake.mode = "http500"
        assert (await ws.activate())[0] is None
        assert (await ws.get_key())[0] is None

    async def test_deleted_license_not_revived(
        self, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """A license upstream no longer knows is not served from kept answers."""
        ws = workstation("alice-pc")
        assert (await ws.activate())[0] is not None
        del upstream.fake.licenses[(PRODUCT, LICENSE)]
        assert await ws.activate() == (None, "Could not find the key.")
        upstream.fake.mode = "reset"
        assert (await ws.activate())[0] is None

    async def test_deactivated_seat_not_revived(
        self, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """A deactivation that passed through drops that machine's kept answers."""
        alice, bob = workstation("alice-pc"), workstation("bob-pc")
        assert (await alice.activate())[0] is not None
        assert (await bob.activate())[0] is not None
        assert await alice.deactivate() == (True, "")
        upstream.fake.mode = "http500"
        assert (await alice.activate())[0] is None
        assert (await bob.activate())[0] is not None


class TestRestart:
    """Kept answers survive a restart of the daemon."""

    async def test_restart_during_outage(
        self, daemon: Daemon, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """Activate, restart the daemon while upstream is down: the SDK still gets its license."""
        ws = workstation("alice-pc")
        assert (await ws.activate())[0] is not None
        assert (await ws.get_key())[0] is not None
        await upstream.stop()
        await daemon.restart()
        license_key, message = await ws.activate()
        assert license_key is not None, message
        assert (await ws.get_key())[0] is not None

    async def test_offline_mode_never_calls_upstream(
        self, daemon: Daemon, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """Offline mode answers from kept answers and never contacts upstream."""
        ws = workstation("alice-pc")
        assert (await ws.activate())[0] is not None
        await daemon.stop()
        calls = len(upstream.fake.calls)
        await daemon.start(upstream=dataclasses.replace(daemon.config.upstream, offline=True))
        assert (await ws.activate())[0] is not None
        license_key, message = await workstation("new-pc").activate()
        assert license_key is None
        assert "offline mode" in message.lower()
        assert len(upstream.fake.calls) == calls


class TestKeptAnswers:
    """What is kept, and what never replaces it."""

    async def test_bad_signature_never_replaces_kept(
        self, daemon: Daemon, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """A forged answer is neither passed on nor kept: the original answer stays, even after a restart."""
        ws = workstation("alice-pc")
        first, _ = await ws.activate()
        upstream.fake.mode = "bad_signature"
        for _ in range(2):
            served, message = await ws.activate()
            assert served is not None, message
            assert served.raw_response.signature == first.raw_response.signature
        await daemon.restart()
        upstream.fake.mode = "http500"
        served, _ = await ws.activate()
        assert served.raw_response.signature == first.raw_response.signature

    async def test_blocked_flag_in_signed_answer(
        self, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """A signed GetKey answer saying Block=true drops the license's kept answers."""
        upstream.fake.getkey_refuses_blocked = False
        ws = workstation("alice-pc")
        assert (await ws.activate())[0] is not None
        upstream.fake.block(PRODUCT, LICENSE)
        blocked, _ = await ws.get_key()
        assert blocked is not None
        assert blocked.block is True
        upstream.fake.mode = "http500"
        assert (await ws.activate())[0] is None
        assert (await ws.get_key())[0] is None

    async def test_fresh_for_serves_without_upstream(
        self, daemon_factory: DaemonFactory, upstream: Upstream
    ) -> None:
        """With keep.fresh_for a young kept answer is served without upstream; floating calls still go."""
        daemon = await daemon_factory("keep.fresh_for=60s")
        form = activate_form()
        first = await post(daemon, "/api/key/activate", form)
        second = await post(daemon, "/api/key/activate", form)
        assert second[1]["X-License-Server-Source"] == "kept_fresh"
        assert second[2] == first[2]
        assert len(upstream.fake.calls) == 1
        floating = activate_form(FloatingTimeInterval="300")
        await post(daemon, "/api/key/activate", floating)
        again = await post(daemon, "/api/key/activate", floating)
        assert again[1]["X-License-Server-Source"] == "forwarded"
        assert len(upstream.fake.calls) == 3

    async def test_no_vendor_key_keeps_nothing(
        self, daemon_factory: DaemonFactory, upstream: Upstream
    ) -> None:
        """Without a vendor key answers are forwarded but nothing is kept for outages."""
        daemon = await daemon_factory("public_key=null")
        assert (await post(daemon, "/api/key/activate", activate_form()))[0] == 200
        await daemon.flush()
        assert await daemon.app[SERVICES].store.count() == 0
        upstream.fake.mode = "http500"
        status, _, body = await post(daemon, "/api/key/activate", activate_form())
        assert status == 502
        assert "keeps no answer" in json.loads(body)["message"]

    async def test_headers_not_passed_through(self, daemon: Daemon, upstream: Upstream) -> None:
        """No workstation header reaches upstream; the workstation gets only the daemon's own headers."""
        status, headers, _ = await post(
            daemon,
            "/api/key/activate",
            activate_form(),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Authorization": "Bearer x",
                "Cookie": "a=b",
                "X-Forwarded-For": "10.9.9.9",
                "X-Custom": "1",
                "Connection": "keep-alive, X-Custom",
            },
        )
        assert status == 200
        sent = {name.lower() for name in upstream.fake.calls[-1].headers}
        assert sent.isdisjoint({"authorization", "cookie", "x-forwarded-for", "x-custom"})
        assert {name.lower() for name in headers} <= DAEMON_HEADERS

    async def test_corrupt_store_set_aside(self, daemon: Daemon, workstation: MakeWorkstation) -> None:
        """A corrupt state database is moved aside and a fresh one started; the daemon serves on."""
        await daemon.stop()
        store = daemon.config.state_dir / "answers.sqlite3"
        await asyncio.to_thread(store.write_bytes, b"this is not a database" * 100)
        await daemon.start()
        assert (await workstation("alice-pc").activate())[0] is not None
        aside = [p.name for p in daemon.config.state_dir.iterdir() if ".corrupt-" in p.name]
        assert aside, "the corrupt file must be kept for inspection"
