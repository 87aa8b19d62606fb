"""What the console does: find machines, deactivate them, hand out license files, search the audit log."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from licensing.models import LicenseKey
from structlog.testing import capture_logs

from license_server.audit import search
from license_server.licensing.policy import Rules
from license_server.licensing.signatures import KeyRing
from tests.admin_support import Admin
from tests.conftest import LICENSE, OTHER_LICENSE, PRODUCT, Clock, Daemon, Upstream, Workstation

DAY = 86400
BIG_LICENSE = "PAGES-WITHM-ANYSE-ATSXX"  # ten seats, for lists longer than a page
Factory = Callable[..., Awaitable[Admin]]


def target(machine: str, key: str = LICENSE, **extra: Any) -> dict[str, Any]:
    """The JSON body naming one machine of a license."""
    return {"product_id": PRODUCT, "key": key, "machine_code": machine, **extra}


async def activate(
    workstation: Callable[..., Workstation], machine: str, name: str, key: str = LICENSE
) -> None:
    """A workstation activates through the daemon with a friendly name."""
    license_key, message = await workstation(machine).activate(key, friendly_name=name)
    assert license_key is not None, message


async def admin_records(admin: Admin, query: search.Query | None = None) -> list[dict[str, Any]]:
    """The admin records in the trail that match, oldest first."""
    folder = admin.services.config.audit_dir
    found = await asyncio.to_thread(lambda: list(search.search(folder, query or search.Query())))
    return [record for record in found if record["type"] == "admin"]


class TestMachines:
    """Finding machines across all licenses."""

    async def test_search_by_name_code_license_and_address(
        self, admin: Admin, workstation: Callable[..., Workstation], clock: Clock
    ) -> None:
        """One search box finds machines by any part of name, machine code, license key or address."""
        await activate(workstation, "a1", "ALICE-LAPTOP")
        await activate(workstation, "a2", "alice-desktop", OTHER_LICENSE)
        clock.advance(31 * DAY)
        await activate(workstation, "b1", "BOB-PC")
        await admin.settle()

        async def names(**params: str) -> list[str]:
            status, body, _ = await admin.api("GET", "/api/v1/machines", params=params)
            assert status == 200, body
            return sorted(row["friendly_name"] for row in body["machines"])

        assert await names(q="alice") == ["ALICE-LAPTOP", "alice-desktop"]
        assert await names(q="b1") == ["BOB-PC"]
        assert await names(q=OTHER_LICENSE.lower()) == ["alice-desktop"]
        assert await names(q="127.0.0") == ["ALICE-LAPTOP", "BOB-PC", "alice-desktop"]
        assert await names(q="", idle="true") == ["ALICE-LAPTOP", "alice-desktop"]
        _, body, _ = await admin.api("GET", "/api/v1/machines", params={"q": "alice"})
        assert all(row["idle"] and row["idle_days"] == 31 for row in body["machines"])

    async def test_names_are_escaped_in_pages(
        self, admin: Admin, workstation: Callable[..., Workstation]
    ) -> None:
        """A workstation chooses its friendly name: the console never lets it write HTML."""
        await activate(workstation, "evil", '<script>alert("x")</script><b onmouseover=1>')
        await admin.settle()
        async with admin.browser() as session:
            await admin.login(session)
            async with session.get("/machines", params={"q": "script"}) as r:
                page = await r.text()
        assert "<script>alert" not in page
        assert "<b onmouseover" not in page
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


class TestLists:
    """Every list, page or API answer, comes a bounded page at a time; page links keep the search."""

    async def test_machines_api_pages_with_limit_and_offset(
        self, admin: Admin, workstation: Callable[..., Workstation], upstream: Upstream
    ) -> None:
        """limit and offset walk the whole search; total and next_offset say where it ends."""
        upstream.fake.add_license(PRODUCT, BIG_LICENSE, max_machines=10)
        for index in range(5):
            await activate(workstation, f"pc{index}", f"PC-{index}", BIG_LICENSE)
        await activate(workstation, "other", "OTHER")
        await admin.settle()
        seen: list[str] = []
        offset: int | None = 0
        while offset is not None:
            params = {"q": "pc-", "limit": "2", "offset": str(offset)}
            status, body, _ = await admin.api("GET", "/api/v1/machines", params=params)
            assert status == 200, body
            assert (body["total"], body["limit"], body["offset"]) == (5, 2, offset)
            assert len(body["machines"]) <= 2
            assert body["truncated"] is (body["next_offset"] is not None)
            seen += [row["friendly_name"] for row in body["machines"]]
            offset = body["next_offset"]
        assert seen == [f"PC-{index}" for index in range(5)]
        _, body, _ = await admin.api("GET", "/api/v1/machines", params={"offset": "99"})
        assert (body["machines"], body["total"], body["next_offset"]) == ([], 6, None)
        for bad in ({"limit": "0"}, {"limit": "501"}, {"offset": "-1"}, {"offset": "x"}):
            status, body, _ = await admin.api("GET", "/api/v1/machines", params=bad)
            assert status == 400
            assert body["error"].startswith(next(iter(bad)) + ":")

    async def test_licenses_api_pages_with_limit_and_offset(
        self, admin: Admin, workstation: Callable[..., Workstation]
    ) -> None:
        """The licenses come a page at a time too."""
        await activate(workstation, "a1", "A1")
        await activate(workstation, "b1", "B1", OTHER_LICENSE)
        await admin.settle()
        status, body, _ = await admin.api("GET", "/api/v1/licenses", params={"limit": "1"})
        assert status == 200, body
        assert (len(body["licenses"]), body["total"], body["next_offset"]) == (1, 2, 1)
        _, second, _ = await admin.api("GET", "/api/v1/licenses", params={"limit": "1", "offset": "1"})
        assert (len(second["licenses"]), second["next_offset"]) == (1, None)
        assert {body["licenses"][0]["key"], second["licenses"][0]["key"]} == {LICENSE, OTHER_LICENSE}
        assert (await admin.api("GET", "/api/v1/licenses", params={"limit": "100000"}))[0] == 400
        status, body, _ = await admin.api("GET", "/api/v1/licenses", params={"days": "9" * 5000})
        assert status == 400, body  # not int() of a 5,000-digit number, which Python refuses with a 500
        assert body["error"].startswith("days:")

    async def test_pages_link_to_the_next_and_previous_page_of_the_same_search(
        self, admin: Admin, workstation: Callable[..., Workstation]
    ) -> None:
        """/machines and /licenses show per_page rows at most, and their links keep q, idle and days."""
        for index in range(3):
            await activate(workstation, f"pc{index}", f"PC-{index}")
        await activate(workstation, "b1", "B1", OTHER_LICENSE)
        await admin.settle()
        async with admin.browser() as session:
            await admin.login(session)
            async with session.get("/machines", params={"q": "pc-", "per_page": "2"}) as r:
                first = await r.text()
            assert first.count('<a href="/machines/license-file?') == 2
            assert "3 machine(s); 1 to 2 shown" in first
            assert "previous" not in first
            assert 'href="/machines?q=pc-&amp;per_page=2&amp;page=2">next' in first
            async with session.get("/machines", params={"q": "pc-", "per_page": "2", "page": "2"}) as r:
                second = await r.text()
            assert second.count('<a href="/machines/license-file?') == 1
            assert "PC-2" in second
            assert 'href="/machines?q=pc-&amp;per_page=2&amp;page=1">← previous' in second
            assert "next →" not in second
            async with session.get("/machines", params={"page": "0"}) as r:
                assert r.status == 400
                assert "page:" in await r.text()
            async with session.get("/machines?q=pc-&q=b1&per_page=2") as r:
                twice = await r.text()  # a field given twice: the page and its links read the first
            assert 'href="/machines?q=pc-&amp;per_page=2&amp;page=2">next' in twice
            async with session.get("/licenses", params={"days": "7", "per_page": "1"}) as r:
                licenses = await r.text()
            assert "2 license(s); 1 to 1 shown" in licenses
            assert 'href="/licenses?days=7&amp;per_page=1&amp;page=2">next' in licenses


class TestDeactivate:
    """Freeing a machine's seat from the console."""

    async def test_deactivation_frees_the_seat_everywhere_and_is_recorded(
        self, admin: Admin, workstation: Callable[..., Workstation], upstream: Upstream
    ) -> None:
        """Upstream frees the seat; kept answers go, so an outage cannot revive it; the trail says who."""
        await activate(workstation, "alice-1", "ALICE-LAPTOP")
        await admin.settle()
        async with admin.browser() as session:
            csrf = await admin.login(session, "carol")
            form = {"product_id": str(PRODUCT), "key": LICENSE, "machine_code": "alice-1", "csrf": csrf}
            async with session.post("/machines/deactivate", data=form) as r:
                assert r.status == 200
                assert "Deactivated" in await r.text()
        assert "alice-1" not in upstream.fake.license(PRODUCT, LICENSE).activations
        (call,) = upstream.fake.calls_to("key/deactivate")
        assert call.fields["floating"] == "false"
        await upstream.stop()
        license_key, message = await workstation("alice-1").activate()
        assert license_key is None, "a freed seat came back from a kept answer"
        assert "could not be reached" in message
        await admin.settle()
        _, body, _ = await admin.api("GET", "/api/v1/machines", params={"q": "alice"})
        assert body["machines"][0]["deactivated"] is not None
        record = (await admin_records(admin))[-1]
        assert record["action"] == "deactivate"
        assert record["actor"].startswith("carol@127.0.0.1#")
        assert (record["friendly_name"], record["machine"], record["ok"]) == ("ALICE-LAPTOP", "alice-1", True)
        assert record["upstream"] == {"status": 200, "result": 0, "message": ""}
        found = await admin_records(admin, search.Query(name="alice", action="deactivate"))
        assert [r["seq"] for r in found] == [record["seq"]]

    async def test_floating_seat_is_released(
        self, admin: Admin, workstation: Callable[..., Workstation], upstream: Upstream
    ) -> None:
        """A floating machine is deactivated with Floating=true and its lease ends here too."""
        license_key, message = await workstation("f1").activate(floating=3600, friendly_name="FLOAT-1")
        assert license_key is not None, message
        await admin.settle()
        assert admin.services.licensing.seats.in_use() == {(str(PRODUCT), LICENSE): 1}
        status, body, _ = await admin.api("POST", "/api/v1/machines/deactivate", json=target("f1"))
        assert status == 200, body
        assert upstream.fake.calls_to("key/deactivate")[0].fields["floating"] == "true"
        assert admin.services.licensing.seats.in_use() == {}

    async def test_upstream_refusal_is_shown_and_recorded(self, admin: Admin) -> None:
        """Upstream's own words come back, with 409, and the trail records the refusal."""
        status, body, _ = await admin.api("POST", "/api/v1/machines/deactivate", json=target("never-seen"))
        assert status == 409
        assert body["ok"] is False
        assert body["upstream"]["result"] == 1
        assert "never activated" in body["upstream"]["message"]
        assert (await admin_records(admin))[-1]["ok"] is False

    async def test_offline_mode_and_missing_token_are_clear_errors(
        self, daemon: Daemon, admin_factory: Factory
    ) -> None:
        """Offline mode, or no upstream token: 503 with words that say which, and a record."""
        admin = await admin_factory(upstream_token=None)
        status, body, _ = await admin.api("POST", "/api/v1/machines/deactivate", json=target("m"))
        assert status == 503
        assert "No upstream access token" in body["message"]
        await daemon.restart(upstream=dataclasses_replace_offline(daemon))
        admin = await admin_factory()
        status, body, _ = await admin.api("POST", "/api/v1/activations", json=target("m"))
        assert status == 503
        assert "offline mode" in body["message"]
        assert (await admin_records(admin))[-1]["action"] == "activate"

    @pytest.mark.parametrize(
        "body",
        [
            {"product_id": "x", "key": LICENSE, "machine_code": "m"},
            {"product_id": PRODUCT, "key": "", "machine_code": "m"},
            {"product_id": PRODUCT, "key": LICENSE, "machine_code": "m\x00"},
            {"product_id": PRODUCT, "key": LICENSE, "machine_code": "m", "floating": "yes"},
            [1, 2],
        ],
    )
    async def test_bad_input_is_a_400(self, admin: Admin, upstream: Upstream, body: object) -> None:
        """Input is checked before anything goes upstream."""
        status, answer, _ = await admin.api("POST", "/api/v1/machines/deactivate", json=body)
        assert status == 400, answer
        assert admin.services.upstream is not None
        assert upstream.fake.calls == []


class TestLicenseFiles:
    """License files for devices that cannot reach the daemon."""

    async def test_activation_hands_out_a_file_the_sdk_loads(
        self, admin: Admin, upstream: Upstream, tmp_path: Path
    ) -> None:
        """Activate upstream, verify, download: the real SDK loads the file for that machine."""
        status, data, headers = await admin.api(
            "POST", "/api/v1/activations", json=target("lab-7", friendly_name="LAB-PC-7")
        )
        assert status == 200, data
        assert headers["Content-Disposition"] == f'attachment; filename="{LICENSE}-LAB-PC-7.skm"'
        loaded = await asyncio.to_thread(
            LicenseKey.load_from_string, upstream.fake.public_key_xml, data.decode()
        )
        assert loaded is not None
        assert "lab-7" in [machine.Mid for machine in loaded.activated_machines]
        activation = upstream.fake.license(PRODUCT, LICENSE).activations["lab-7"]
        assert activation.friendly_name == "LAB-PC-7"
        (call,) = upstream.fake.calls_to("key/activate")
        assert (call.fields["sign"], call.fields["signmethod"], call.fields["modelversion"]) == (
            "True",
            "1",
            "3",
        )
        await admin.settle()
        _, body, _ = await admin.api("GET", "/api/v1/machines", params={"q": "LAB-PC"})
        assert body["machines"][0]["client"] == "admin console"
        record = (await admin_records(admin))[-1]
        assert record["action"] == "activate"
        assert len(record["file_sha256"]) == 64

    async def test_refused_activation_gives_no_file(
        self, admin: Admin, workstation: Callable[..., Workstation]
    ) -> None:
        """Upstream's refusal (the seat limit) comes back as 409 with its words."""
        await activate(workstation, "first", "FIRST", OTHER_LICENSE)
        status, body, _ = await admin.api("POST", "/api/v1/activations", json=target("second", OTHER_LICENSE))
        assert status == 409
        assert "limit has been reached" in body["message"]

    async def test_unverifiable_answer_gives_no_file(self, admin: Admin, upstream: Upstream) -> None:
        """A forged signature is never handed out."""
        upstream.fake.mode = "bad_signature"
        status, body, _ = await admin.api("POST", "/api/v1/activations", json=target("lab-8"))
        assert status == 502
        assert "signature" in body["message"]

    async def test_no_vendor_key_no_file(self, admin: Admin) -> None:
        """Without a vendor key the daemon cannot check a file, so it hands none out."""
        licensing = admin.services.licensing
        licensing.rules = Rules(licensing.upstream, KeyRing([]), licensing.files, licensing.keep)
        status, body, _ = await admin.api("POST", "/api/v1/activations", json=target("lab-9"))
        assert status == 503
        assert "public_key" in body["message"]

    async def test_kept_answer_is_downloadable_without_upstream(
        self, admin: Admin, workstation: Callable[..., Workstation], upstream: Upstream
    ) -> None:
        """The signed answer the daemon keeps for a machine is its license file, even during an outage."""
        await activate(workstation, "bob-1", "BOB-PC")
        await upstream.stop()
        params = {"product_id": str(PRODUCT), "key": LICENSE.lower(), "machine_code": "bob-1"}
        status, data, headers = await admin.api("GET", "/api/v1/license-file", params=params)
        assert status == 200
        assert headers["X-License-Server-Source"] == "kept"
        loaded = await asyncio.to_thread(
            LicenseKey.load_from_string, upstream.fake.public_key_xml, data.decode()
        )
        assert loaded is not None
        status, body, _ = await admin.api(
            "GET", "/api/v1/license-file", params={**params, "machine_code": "nope"}
        )
        assert status == 404
        assert "keeps no signed answer" in body["message"]
        assert [r["action"] for r in (await admin_records(admin))] == ["download", "download"]


class TestAuditAndStatus:
    """The audit log, the licenses and the status as the console shows them."""

    async def test_audit_search_pages_newest_first(
        self, admin: Admin, workstation: Callable[..., Workstation]
    ) -> None:
        """Records come newest first, a page at a time; a bad time is a 400 naming the field."""
        for index in range(3):
            await activate(workstation, f"m{index}", f"PC-{index}")
        params = {"per_page": "2", "api_method": "ignored", "key": LICENSE.lower()}
        status, body, _ = await admin.api("GET", "/api/v1/audit", params=params)
        assert status == 200
        assert (body["total"], body["pages"]) == (3, 2)
        assert [r["machine"] for r in body["records"]] == ["m2", "m1"]
        status, body, _ = await admin.api("GET", "/api/v1/audit", params={**params, "page": "2"})
        assert [r["machine"] for r in body["records"]] == ["m0"]
        status, body, _ = await admin.api("GET", "/api/v1/audit", params={"name": "pc-2"})
        assert [r["machine"] for r in body["records"]] == ["m2"]
        status, body, _ = await admin.api("GET", "/api/v1/audit", params={"since": "yesterday"})
        assert status == 400
        assert body["error"].startswith("since:")
        status, body, _ = await admin.api("GET", "/api/v1/audit/verification", params={"refresh": "true"})
        assert body["intact"] is True
        assert body["records"] >= 4

    async def test_broken_chain_shows(self, admin: Admin, workstation: Callable[..., Workstation]) -> None:
        """An edited record makes the status and the audit page say the chain is not intact."""
        await activate(workstation, "m1", "PC-1")
        await activate(workstation, "m2", "OTHER")  # its record chains to the one edited below
        folder = admin.services.config.audit_dir
        path = sorted(folder.glob("audit-*.jsonl"))[0]
        await asyncio.to_thread(lambda: path.write_text(path.read_text().replace("PC-1", "PC-2")))
        _status, body, _ = await admin.api("GET", "/api/v1/audit/verification", params={"refresh": "1"})
        assert body["intact"] is False
        assert body["headline"].startswith("NOT INTACT")

    async def test_licenses_and_status(self, admin: Admin, workstation: Callable[..., Workstation]) -> None:
        """Seats in use against the limit; the chart; upstream up since when, kept and stale answers."""
        await activate(workstation, "a1", "A1")
        license_key, _ = await workstation("f1").activate(floating=600)
        assert license_key is not None
        await admin.settle()
        status, body, _ = await admin.api("GET", "/api/v1/licenses", params={"days": "7"})
        assert status == 200
        (row,) = [r for r in body["licenses"] if r["key"] == LICENSE]
        assert (row["seat_limit"], row["floating_in_use"], row["machines_active"]) == (3, 1, 2)
        # the plan's columns: f1's lease began at the period's very end, so it counts no demand yet
        assert (row["peak_demand"], row["seats_100"], row["unmet_seat_hours"], row["idle_machines"]) == (
            0,
            0,
            0.0,
            0,
        )
        assert (await admin.api("GET", "/api/v1/licenses", params={"days": "0"}))[0] == 400
        status, body, _ = await admin.api("GET", "/api/v1/status")
        assert body["upstream"]["state"] == "closed"
        assert body["upstream"]["since"]
        assert body["stale_answers_served"] == 0
        assert body["audit"]["writable"] is True
        async with admin.browser() as session:
            await admin.login(session)
            async with session.get("/licenses/chart.svg", params={"days": "7"}) as r:
                assert r.content_type == "image/svg+xml"
                assert (await r.read()).startswith(b"<?xml")
            async with session.get("/") as r:
                assert "Up" in await r.text()


def dataclasses_replace_offline(daemon: Daemon) -> Any:
    """The daemon's upstream settings with offline mode on."""
    import dataclasses

    return dataclasses.replace(daemon.config.upstream, offline=True)


class TestCanary:
    """The console's upstream token never leaves the request it is sent in."""

    async def test_upstream_token_never_shown_logged_or_stored(
        self,
        admin_factory: Factory,
        workstation: Callable[..., Workstation],
        upstream: Upstream,
        tmp_path: Path,
    ) -> None:
        """Through successes, refusals, failures and outages: not in any answer, page, log line or file."""
        canary = "canary-upstream-5e1d0c9b7a"
        seen: list[str] = []
        with capture_logs() as logs:
            admin = await admin_factory(upstream_token=canary)
            await activate(workstation, "a1", "A1")
            for mode in ("ok", "http500", "garbage", "bad_signature", "ok"):
                upstream.fake.mode = mode
                for method, path, body in (
                    ("POST", "/api/v1/activations", target("lab")),
                    ("POST", "/api/v1/machines/deactivate", target("lab")),
                    ("POST", "/api/v1/machines/deactivate", target("nope")),
                ):
                    status, answer, headers = await admin.api(method, path, json=body)
                    seen.append(f"{status} {answer!r} {dict(headers)!r}")
            await upstream.stop()
            seen.append(repr(await admin.api("POST", "/api/v1/activations", json=target("a1"))))
            async with admin.browser() as session:
                await admin.login(session)
                for path in (
                    "/",
                    "/licenses",
                    "/machines",
                    "/audit",
                    "/activate",
                    "/api/v1/audit?per_page=500",
                ):
                    async with session.get(path) as r:
                        seen.append(await r.text())
        assert any(call.fields.get("token") == canary for call in upstream.fake.calls)  # it did go upstream
        assert canary not in "\n".join(seen)
        assert canary not in repr(logs)
        await admin.services.store.flush()
        for path in await asyncio.to_thread(lambda: [p for p in tmp_path.rglob("*") if p.is_file()]):
            assert canary.encode() not in await asyncio.to_thread(path.read_bytes), path

    async def test_console_pages_are_self_contained(self, admin: Admin) -> None:
        """No CDN: every page links only to the daemon's own assets."""
        async with admin.browser() as session:
            await admin.login(session)
            for path in ("/", "/licenses", "/machines", "/audit", "/activate"):
                async with session.get(path) as r:
                    page = await r.text()
                assert "http://" not in page, path
                assert "https://" not in page, path
                assert "<script" not in page


async def test_json_api_is_documented(admin: Admin) -> None:
    """Every API route of the app is in the OpenAPI file, and every path there is a route."""
    _, document, _ = await admin.api("GET", "/api/openapi.json")
    documented = {(path, method.upper()) for path, item in document["paths"].items() for method in item}
    routes = {
        (route.resource.canonical, route.method)
        for route in admin.server.app.router.routes()
        if route.resource is not None and route.resource.canonical.startswith("/api/")
    }
    assert documented == routes
    assert json.dumps(document).count("upstream_token") == 0


async def test_console_over_http_client_keeps_cookie_per_host(admin: Admin) -> None:
    """A session cookie is scoped to the console's path and host only."""
    async with admin.browser() as session:
        await admin.login(session)
        cookies = session.cookie_jar.filter_cookies(aiohttp.client.URL(admin.base))
        assert cookies
