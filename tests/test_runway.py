"""Runway: until when each machine stays licensed without upstream, what limits it, where admins see it."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from licensing.models import LicenseKey
from structlog.testing import capture_logs

from license_server.cli import main
from license_server.config import Config, load_config
from license_server.reports import runway
from license_server.reports.runway import (
    EXPIRES,
    KEEP_MAX_AGE,
    NO_LIMIT,
    NOTHING_KEPT,
    SIGNATURE,
    Holding,
    RunwayQuery,
)
from license_server.storage.backend import answer_reader
from license_server.storage.seats import MachineRow
from license_server.web.keys import SERVICES
from tests.admin_support import Admin
from tests.conftest import LICENSE, PRODUCT, Clock, Daemon, Upstream, Workstation

DAY = 86400.0
NOW = 1_800_000_000.0
F1 = (True,) + (False,) * 7


def config(*overrides: str) -> Config:
    """Settings through the real loader."""
    return load_config(None, env={}, overrides=["state_dir=/nonexistent", *overrides])


def holding(
    *,
    machine: str = "ws-1",
    source: str = "kept answer",
    fetched_at: float | None = NOW - DAY,
    sign_date: float | None = NOW - DAY,
    expires: float | None = NOW + 100 * DAY,
    features: tuple[bool, ...] = (False,) * 8,
    floating: bool = False,
    product: str = "3349",
) -> Holding:
    """A holding with the times a test gives."""
    return Holding(product, "KEY", machine, source, fetched_at, sign_date, expires, features, floating)


def machine(
    code: str, *, name: str = "", floating: bool = False, deactivated: float | None = None
) -> MachineRow:
    """A ledger machine of license (3349, KEY)."""
    return MachineRow(name, "3349", "KEY", code, NOW - DAY, NOW - 60, "10.0.0.1", 3, floating, deactivated)


class TestLimit:
    """The earliest of the limits that apply, and its name."""

    def test_keep_max_age_alone(self) -> None:
        """Nothing known of the product: the daemon's own keep.max_age from the fetch."""
        assert runway.limit(holding(), config()) == (NOW - DAY + 7 * DAY, KEEP_MAX_AGE)

    def test_signature_expiration_when_sooner(self) -> None:
        """A product whose SDK refuses signatures older than 3 days: that ends it first."""
        settings = config("products={3349: {signature_expiration: 3d}}", "keep.max_age=30d")
        assert runway.limit(holding(sign_date=NOW - 2 * DAY), settings) == (NOW + DAY, SIGNATURE)
        assert runway.limit(holding(product="9999"), settings)[1] == KEEP_MAX_AGE  # another product

    def test_expiry_counts_only_for_time_limited_licenses(self) -> None:
        """Expires limits a license of a time-limited product: all of them, or those with the feature."""
        soon = holding(expires=NOW + 3600)
        assert runway.limit(soon, config())[1] == KEEP_MAX_AGE
        assert runway.limit(soon, config("products={3349: {time_limited: all}}")) == (NOW + 3600, EXPIRES)
        by_feature = config("products={3349: {time_limited: f1}}")
        assert runway.limit(soon, by_feature)[1] == KEEP_MAX_AGE
        assert runway.limit(holding(expires=NOW + 3600, features=F1), by_feature) == (NOW + 3600, EXPIRES)

    def test_license_file_without_product_settings_has_no_known_limit(self) -> None:
        """A license file is not a kept answer: keep.max_age does not apply to it."""
        assert runway.limit(holding(source="license file", fetched_at=None), config()) == (None, NO_LIMIT)


class TestRunways:
    """One runway per machine, from its best holding or from the ledger alone."""

    def test_longest_holding_wins_and_ledger_machines_without_one_lock_out_now(self) -> None:
        """A license file outlasting the kept answer counts; a machine with nothing kept stops at once."""
        settings = config("products={3349: {signature_expiration: 30d}}")
        found = runway.runways(
            [
                holding(machine="ws-1"),
                holding(machine="ws-1", source="license file", fetched_at=None, sign_date=NOW),
                holding(machine="ws-2"),
            ],
            [machine("ws-1", name="Lab 1"), machine("ws-3", name="Lab 3"), machine("gone", deactivated=NOW)],
            {},
            settings,
            NOW,
        )
        by_code = {r.machine_code: r for r in found}
        assert set(by_code) == {"ws-1", "ws-2", "ws-3"}  # a deactivated machine has no runway to watch
        assert (by_code["ws-1"].source, by_code["ws-1"].until, by_code["ws-1"].limited_by) == (
            "license file",
            NOW + 30 * DAY,
            SIGNATURE,
        )
        assert by_code["ws-1"].friendly_name == "Lab 1"
        assert (by_code["ws-3"].until, by_code["ws-3"].limited_by) == (NOW, NOTHING_KEPT)

    def test_floating_machines_say_what_their_seat_depends_on(self) -> None:
        """A live lease is renewed by its holder; without one a seat must be free: no date is promised."""
        found = runway.runways(
            [holding(machine="f-1", floating=True), holding(machine="f-2", floating=True)],
            [],
            {(("3349", "KEY"), "f-1"): NOW + 600},
            config(),
            NOW,
        )
        seats = {r.machine_code: runway.seat(r, NOW) for r in found}
        assert seats == {"f-1": "holds a lease until 2027-01-15T08:10:00Z", "f-2": "needs a free seat"}

    def test_select_and_outlook(self) -> None:
        """--within keeps those ending by then, soonest first; the outlook counts each in every span."""
        settings = config("keep.max_age=30d", "products={3349: {signature_expiration: 30d}}")
        holdings = [
            holding(machine="in-30m", sign_date=NOW - 30 * DAY + 1800),
            holding(machine="in-5h", sign_date=NOW - 30 * DAY + 5 * 3600),
            holding(machine="in-3d", sign_date=NOW - 30 * DAY + 3 * DAY),
            holding(machine="in-20d", sign_date=NOW - 10 * DAY),
            holding(machine="file", source="license file", fetched_at=None, sign_date=None),
        ]
        found = runway.runways(holdings, [], {}, settings, NOW)
        chosen = runway.select(found, RunwayQuery(now=NOW, within=DAY))
        assert [r.machine_code for r in chosen] == ["in-30m", "in-5h"]
        everything = runway.select(found, RunwayQuery(now=NOW))
        assert everything[-1].machine_code == "file"  # no limit known: last
        ledger = [machine("in-30m"), machine("nothing-kept"), machine("gone", deactivated=NOW)]
        seen = runway.outlook(runway.ends(holdings, ledger, settings, NOW), NOW)
        assert seen.within == {"1h": 2, "24h": 3, "7d": 4}  # nothing-kept ends now: in every span
        assert seen.shortest == {"3349": 0}
        assert seen.machines == 6  # the five held, and the one of the ledger with nothing kept
        alone = runway.outlook(runway.ends(holdings, [], settings, NOW), NOW)
        assert (alone.within, alone.shortest, alone.machines) == (
            {"1h": 1, "24h": 2, "7d": 3},
            {"3349": 1800},
            5,
        )


class TestOutput:
    """Table, CSV and JSON; text from workstations stays inert."""

    def test_hostile_name_in_every_format(self) -> None:
        """A friendly name with a formula, terminal escapes and a bidi override."""
        hostile = "=HYPERLINK(1)\x1b[2J\u202e"
        found = runway.runways([holding()], [machine("ws-1", name=hostile)], {}, config(), NOW)
        out = io.StringIO()
        runway.write_runway(found, out, "table", NOW)
        assert "\x1b" not in out.getvalue()
        assert "\u202e" not in out.getvalue()
        out = io.StringIO()
        runway.write_runway(found, out, "csv", NOW)
        header, row = csv.reader(io.StringIO(out.getvalue()))
        assert row[header.index("friendly_name")].startswith("'=")
        assert "\x1b" not in out.getvalue()
        out = io.StringIO()
        runway.write_runway(found, out, "json", NOW)
        assert "\x1b" not in out.getvalue()
        (line,) = out.getvalue().splitlines()
        row_json = json.loads(line)
        assert row_json["friendly_name"] == hostile  # exact for programs
        assert (row_json["limited_by"], row_json["remaining_s"]) == (KEEP_MAX_AGE, 6 * DAY)


def station(daemon: Daemon, upstream: Upstream, machine: str) -> Workstation:
    """An SDK workstation pointed at the daemon."""
    return Workstation(lambda: f"{daemon.base}/api/", upstream.fake.public_key_xml, machine)


async def activate_signed_at(
    upstream: Upstream, clock: Clock, station: Workstation, signed_at: float
) -> None:
    """Activate through the daemon with upstream signing at `signed_at` (the daemon's clock moves too)."""
    now = clock.wall
    clock.wall = signed_at
    try:
        license_key, message = (await station.activate())[:2]
        assert license_key is not None, message
    finally:
        clock.wall = now


class TestAtTheEdge:
    """The SDK's own signature check agrees with the runway the daemon reports, on both sides of its edge."""

    async def test_kept_answer_accepted_just_before_and_refused_just_after(
        self,
        daemon_factory: Callable[..., Awaitable[Daemon]],
        upstream: Upstream,
        clock: Clock,
    ) -> None:
        """signatureExpirationInterval 1 day: signed a day less or more 2 minutes ago, served in an outage."""
        daemon = await daemon_factory("products={3349: {signature_expiration: 1d}}", "keep.max_age=30d")
        real_now = time.time()
        clock.wall = real_now
        before, after = station(daemon, upstream, "edge-before"), station(daemon, upstream, "edge-after")
        await activate_signed_at(upstream, clock, before, real_now - DAY + 120)
        await activate_signed_at(upstream, clock, after, real_now - DAY - 120)
        await daemon.app[SERVICES].store.flush()
        files = daemon.app[SERVICES].licensing.files
        found = await asyncio.to_thread(
            runway.collect,
            answer_reader(daemon.config),
            daemon.app[SERVICES].licensing.seats.reader,
            files,
            daemon.config,
            real_now,
        )
        edges = {r.machine_code: (r.until, r.limited_by) for r in found}
        assert edges["edge-before"][1] == edges["edge-after"][1] == SIGNATURE
        assert edges["edge-before"][0] == pytest.approx(real_now + 120, abs=1)
        assert edges["edge-after"][0] == pytest.approx(real_now - 120, abs=1)

        await upstream.stop()
        for ws, accepted in ((before, True), (after, False)):
            license_key, message = (await ws.activate())[:2]
            assert license_key is not None, message  # the daemon serves the kept answer, as signed
            saved = license_key.save_as_string()
            checked = LicenseKey.load_from_string(upstream.fake.public_key_xml, saved, 1)
            assert (checked is not None) is accepted, ws.machine


class TestFactsKept:
    """The facts kept beside an Activate answer give the runway its body gives."""

    async def test_node_locked_and_floating(
        self, daemon_factory: Callable[..., Awaitable[Daemon]], upstream: Upstream
    ) -> None:
        """Read from the facts (no body), each machine's holding equals the one parsed from its body."""
        daemon = await daemon_factory("products={3349: {time_limited: all}}")
        assert (await station(daemon, upstream, "facts-locked").activate())[0] is not None
        assert (await station(daemon, upstream, "facts-float").activate(floating=600))[0] is not None
        services = daemon.app[SERVICES]
        await services.store.flush()
        rows = await asyncio.to_thread(lambda: list(answer_reader(daemon.config).activations()))
        assert sorted(row.machine_code for row in rows) == ["facts-float", "facts-locked"]
        for row in rows:
            assert row.body is None
            assert row.facts is not None
            ((body, _),) = await services.store.kept_activations(
                row.product_id, row.license_key, row.machine_code
            )
            parsed = runway.from_kept(row._replace(facts=None, body=body))
            assert parsed is not None
            assert runway.from_kept(row) == parsed
            assert parsed.floating is (row.machine_code == "facts-float")
            assert parsed.sign_date is not None
            assert parsed.expires is not None


class TestWhereAdminsLook:
    """The command, /status, /metrics, and the outage warnings."""

    async def test_report_runway_command(
        self,
        daemon_factory: Callable[..., Awaitable[Daemon]],
        upstream: Upstream,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """`report runway` reads the daemon's state; --within and --format as the other reports."""
        daemon = await daemon_factory()
        assert (await station(daemon, upstream, "cmd-1").activate())[0] is not None
        await daemon.app[SERVICES].store.flush()
        await daemon.app[SERVICES].licensing.seats.flush()
        state = f"state_dir={daemon.config.state_dir}"
        assert await asyncio.to_thread(main, ["report", "runway", "--set", state, "--format", "json"]) == 0
        (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert (row["machine_code"], row["limited_by"], row["key"]) == ("cmd-1", KEEP_MAX_AGE, LICENSE)
        assert 7 * DAY - 60 < row["remaining_s"] <= 7 * DAY
        assert await asyncio.to_thread(main, ["report", "runway", "--set", state, "--within", "1d"]) == 0
        assert "(no matching machines)" in capsys.readouterr().out
        assert await asyncio.to_thread(main, ["report", "runway", "--set", state, "--within", "soon"]) == 2
        assert "--within" in capsys.readouterr().err

    async def test_status_metrics_and_outage_warnings(
        self,
        daemon_factory: Callable[..., Awaitable[Daemon]],
        upstream: Upstream,
        clock: Clock,
    ) -> None:
        """Counts on /status and /metrics; during an outage each crossing is logged once."""
        daemon = await daemon_factory("keep.max_age=2h", "runway.warnings=[1h]")
        warned = station(daemon, upstream, "warn-1")
        assert (await warned.activate())[0] is not None
        await daemon.app[SERVICES].store.flush()
        watch = daemon.app[SERVICES].runway
        assert watch is not None
        await watch.refresh()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{daemon.base}/status") as response:
                shown = (await response.json())["runway"]
            async with session.get(f"{daemon.base}/metrics") as response:
                metrics = (await response.text()).splitlines()
        assert (shown["machines"], shown["within"]) == (1, {"1h": 0, "24h": 1, "7d": 1})
        assert 7000 < shown["shortest_s"][str(PRODUCT)] <= 7200
        assert 'license_server_runway_machines{within="24h"} 1.0' in metrics
        assert any(
            line.startswith(f'license_server_runway_shortest_seconds{{product_id="{PRODUCT}"}}')
            for line in metrics
        )

        with capture_logs() as logs:
            await watch.refresh()  # no outage: nothing to warn of
            await upstream.stop()
            for _ in range(3):  # the breaker opens after three failures
                await warned.activate()
            clock.advance(5400)  # 30 minutes left
            await watch.refresh()
            await watch.refresh()  # the same crossing: not again
            clock.advance(1800 + 1)  # past the end
            await watch.refresh()
            await watch.refresh()
        events = [
            (e["event"], e.get("within"), e.get("machines")) for e in logs if e["event"].startswith("runway_")
        ]
        assert events == [("runway_below", "1h", 1), ("runway_ended", None, 1)]


class TestConsole:
    """The machines page shows and sorts by runway, highlighting the short ones; the status page counts."""

    async def test_machines_page_api_and_status(
        self, admin: Admin, workstation: Callable[..., Workstation], clock: Clock
    ) -> None:
        """A machine fetched 6.5 days ago has half a day left: highlighted, first by runway, counted."""
        now = clock.wall
        clock.wall = now - 6.5 * DAY
        assert (await workstation("short-1").activate())[0] is not None
        clock.wall = now
        assert (await workstation("long-1").activate())[0] is not None
        await admin.services.store.flush()
        await admin.settle()
        async with admin.browser() as session:
            await admin.login(session)
            async with session.get("/machines") as response:
                by_name = await response.text()
            async with session.get("/machines", params={"sort": "runway"}) as response:
                by_runway = await response.text()
            async with session.get("/machines", params={"sort": "soon"}) as response:
                assert response.status == 400
            watch = admin.services.runway
            assert watch is not None
            await watch.refresh()
            async with session.get("/") as response:
                status_page = await response.text()
        assert "Licensed without upstream until" in by_name
        assert by_name.count('class="runway-short"') == 1
        assert "12h 0m; keep.max_age" in by_name
        assert by_name.index("long-1") < by_name.index("short-1")  # by name: the ledger's order
        assert by_runway.index("short-1") < by_runway.index("long-1")
        assert "within 24 hours</dt><dd>1</dd>" in status_page
        status, found, _ = await admin.api("GET", "/api/v1/machines", params={"sort": "runway"})
        assert status == 200
        first = found["machines"][0]
        assert (first["machine_code"], first["limited_by"], first["runway_s"]) == (
            "short-1",
            KEEP_MAX_AGE,
            DAY / 2,
        )
        assert "runway_short" not in first
