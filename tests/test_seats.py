"""The seat ledger: floating seats bounded during outages, leases timed against jumps, nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sqlite3
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from license_server.cli import main
from license_server.storage.seats import LIMIT_REACHED, MachineRow, SeatLedger
from license_server.storage.state import StateFolder
from tests.admin_support import Admin
from tests.conftest import LICENSE, PRODUCT, Clock, Daemon, Upstream, Workstation, send_form
from tests.test_proxy import activate_form

DaemonFactory = Callable[..., Awaitable[Daemon]]
MakeWorkstation = Callable[..., Workstation]
SEATS = "FLOAT-FLOAT-FLOAT-FLOAT"
LIC = (str(PRODUCT), SEATS)
MACHINES = [f"m{i}" for i in range(6)]


class LedgerMachine(RuleBasedStateMachine):
    """Random sequences of takes, upstream grants, releases, time passing, clock jumps and restarts."""

    LIMIT, OVERDRAFT = 2, 1

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = tempfile.TemporaryDirectory()
        self.clock = Clock()
        self.model: dict[str, tuple[float, bool]] = {}  # machine -> (deadline on the lease clock, overdraft)
        self.jumped = False
        self.ledger = self._open()
        self._in_loop(lambda: self.ledger.set_limit(LIC, self.LIMIT))

    def _in_loop(self, fn: Callable[[], Any]) -> Any:
        """Run a ledger call on the event loop (its writes are queued there) and wait for what it returns."""

        async def call() -> Any:
            result = fn()
            return await result if isinstance(result, asyncio.Future) else result

        return self.loop.run_until_complete(call())

    def _open(self) -> SeatLedger:
        ledger = SeatLedger(
            StateFolder(Path(self.folder.name)).seats, lease_clock=self.clock, clock=self.clock
        )
        self.loop.run_until_complete(ledger.open())
        return ledger

    def _live_model(self) -> dict[str, tuple[float, bool]]:
        return {m: v for m, v in self.model.items() if v[0] > self.clock.now()}

    @rule(machine=st.sampled_from(MACHINES), interval=st.integers(1, 120), overdraft=st.integers(0, 2))
    def take(self, machine: str, interval: int, overdraft: int) -> None:
        """A workstation asks for a floating seat while upstream is down."""
        live = self._live_model()
        granted = self.loop.run_until_complete(self.ledger.take(LIC, machine, interval, overdraft))
        regular = sum(1 for _, od in live.values() if not od)
        if machine in live:
            expected, as_overdraft = True, live[machine][1]
        elif regular < self.LIMIT:
            expected, as_overdraft = True, False
        else:
            expected, as_overdraft = len(live) - regular < overdraft, True
        assert granted == expected
        if granted:
            self.model[machine] = (self.clock.now() + interval, as_overdraft)

    @rule(machine=st.sampled_from(MACHINES), seconds=st.integers(1, 120))
    def upstream_grants(self, machine: str, seconds: int) -> None:
        """Upstream grants or renews a seat (upstream itself keeps within the limit)."""
        live = self._live_model()
        holds_regular = machine in live and not live[machine][1]
        if not holds_regular and sum(1 for _, od in live.values() if not od) >= self.LIMIT:
            return  # upstream keeps within the limit too
        self._in_loop(lambda: self.ledger.granted(LIC, machine, seconds, overdraft=False))
        self.model[machine] = (self.clock.now() + seconds, False)

    @rule(machine=st.sampled_from(MACHINES))
    def release(self, machine: str) -> None:
        """A deactivation passes through."""
        self._in_loop(lambda: self.ledger.released(LIC, machine))
        self.model.pop(machine, None)

    @rule(seconds=st.integers(0, 90))
    def time_passes(self, seconds: int) -> None:
        """Time passes for both clocks."""
        self.clock.advance(seconds)

    @rule(seconds=st.integers(-86400 * 30, 86400 * 30))
    def wall_clock_jumps(self, seconds: int) -> None:
        """The wall clock is set wrong, or corrected; no time passes."""
        self.clock.jump_wall(seconds)
        self.jumped = True

    @rule()
    def restart(self) -> None:
        """The daemon stops and starts again within the same boot."""
        self.loop.run_until_complete(self.ledger.close())
        self.ledger = self._open()

    @precondition(lambda self: not self.jumped)
    @rule()
    def reboot(self) -> None:
        """The machine reboots: leases fall back to their wall-clock expiry (right while it never jumped)."""
        self.loop.run_until_complete(self.ledger.close())
        self.clock.boot_id = f"{self.clock.boot_id}+"
        self.clock.boot, shift = 10.0, 10.0 - self.clock.boot
        self.model = {m: (deadline + shift, od) for m, (deadline, od) in self.model.items()}
        self.ledger = self._open()

    @invariant()
    def never_more_than_allowed(self) -> None:
        """Live leases never exceed the limit plus the largest overdraft any request allowed."""
        assert len(self._in_loop(lambda: self.ledger.live(LIC))) <= self.LIMIT + 2

    @invariant()
    def ledger_matches_model(self) -> None:
        """Exactly the machines that should hold a seat do, across restarts: none lost, none extra."""
        assert set(self._in_loop(lambda: self.ledger.live(LIC))) == set(self._live_model())

    def teardown(self) -> None:
        """Close the ledger and remove its folder."""
        self.loop.run_until_complete(self.ledger.close())
        self.loop.close()
        self.folder.cleanup()


class TestLedgerStateMachine(LedgerMachine.TestCase):  # type: ignore[name-defined,misc]
    """Hypothesis drives the ledger through random histories."""

    settings = settings(
        max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


async def post_activation(
    daemon: Daemon, machine: str, interval: int = 60, key: str = SEATS
) -> dict[str, Any]:
    """A floating activation as the SDK sends it, answered by the daemon."""
    form = activate_form(machine=machine, key=key, FloatingTimeInterval=str(interval))
    _, _, body = await send_form(daemon.base, "/api/key/activate", form)
    answer: dict[str, Any] = json.loads(body)
    return answer


@pytest.fixture
async def floating(upstream: Upstream, daemon_factory: DaemonFactory) -> Daemon:
    """A daemon in front of a license with 10 floating seats."""
    upstream.fake.add_license(PRODUCT, SEATS, max_machines=10)
    return await daemon_factory()


async def kept_for(daemon: Daemon, clock: Clock, machines: list[str], interval: int = 10) -> None:
    """Give each machine a kept floating answer, in rounds that let upstream's seats lapse in between."""
    for start in range(0, len(machines), 10):
        for machine in machines[start : start + 10]:
            assert (await post_activation(daemon, machine, interval))["result"] == 0
        clock.advance(interval + 1)


class TestOutageSeats:
    """During an outage the daemon grants no more floating seats than the license has."""

    async def test_concurrent_activations_bounded(
        self, floating: Daemon, upstream: Upstream, clock: Clock
    ) -> None:
        """50 concurrent new activations against 10 free seats: exactly 10 get one, the rest a refusal."""
        machines = [f"ws-{i:02d}" for i in range(50)]
        await kept_for(floating, clock, machines)
        await upstream.stop()
        answers = await asyncio.gather(*(post_activation(floating, m, 10) for m in machines))
        granted = [a for a in answers if a["result"] == 0]
        assert len(granted) == 10
        assert {a["message"] for a in answers if a["result"] != 0} == {LIMIT_REACHED}

    async def test_sdk_outage_with_more_machines_than_seats(
        self, upstream: Upstream, daemon_factory: DaemonFactory, clock: Clock
    ) -> None:
        """Four machines with kept answers, two seats: two run; a lapsed seat is taken by a waiting one."""
        upstream.fake.add_license(PRODUCT, SEATS, max_machines=2)
        daemon = await daemon_factory()
        stations = {m: Workstation(lambda: daemon.api, upstream.fake.public_key_xml, m) for m in "ABCD"}
        for name in "AB":
            assert (await stations[name].activate(SEATS, floating=30))[0] is not None
        clock.advance(31)  # A's and B's seats lapse upstream and here
        for name in "CD":
            assert (await stations[name].activate(SEATS, floating=30))[0] is not None
        await upstream.stop()
        results = {name: await ws.activate(SEATS, floating=30) for name, ws in stations.items()}
        assert [name for name, (lic, _) in results.items() if lic is not None] == ["C", "D"]
        assert results["A"] == (None, LIMIT_REACHED)
        clock.advance(31)  # C and D do not renew: their seats lapse
        assert (await stations["A"].activate(SEATS, floating=30))[0] is not None
        assert (await stations["B"].activate(SEATS, floating=30))[0] is not None
        assert (await stations["C"].activate(SEATS, floating=30))[0] is None

    async def test_wall_clock_jump_frees_nothing(
        self, upstream: Upstream, daemon_factory: DaemonFactory, clock: Clock
    ) -> None:
        """A wall clock set a day ahead neither frees held seats nor lets a third machine in."""
        upstream.fake.add_license(PRODUCT, SEATS, max_machines=2)
        daemon = await daemon_factory()
        for machine in ("a", "b"):
            assert (await post_activation(daemon, machine, 600))["result"] == 0
        clock.advance(601)
        assert (await post_activation(daemon, "c", 600))["result"] == 0
        assert (await post_activation(daemon, "d", 600))["result"] == 0
        await upstream.stop()
        clock.jump_wall(86400)
        assert (await post_activation(daemon, "a", 600))["result"] == 1
        clock.jump_wall(-2 * 86400)
        assert (await post_activation(daemon, "c", 600))["result"] == 0

    async def test_leases_survive_restart(self, floating: Daemon, upstream: Upstream, clock: Clock) -> None:
        """Seats granted during an outage are still held after a restart."""
        machines = [f"ws-{i:02d}" for i in range(12)]
        await kept_for(floating, clock, machines, interval=600)
        await upstream.stop()
        for machine in machines[:10]:
            assert (await post_activation(floating, machine, 600))["result"] == 0
        await floating.restart()
        assert (await post_activation(floating, machines[10], 600))["result"] == 1
        assert (await post_activation(floating, machines[3], 600))["result"] == 0


class TestFlush:
    """What the ledger sums in memory reaches its readers on a flush, with no waiting."""

    async def test_flush_writes_the_calls_summed_in_memory(self, tmp_path: Path, clock: Clock) -> None:
        """Machines seen a moment ago are on the read side after flush(), their calls summed."""
        ledger = SeatLedger(StateFolder(tmp_path).seats, lease_clock=clock, clock=clock)
        await ledger.open()
        try:
            for _ in range(3):
                ledger.seen(LIC, "m1", friendly_name="PC-1", client="10.0.0.7", floating=False)
            await ledger.flush()
            row = await asyncio.to_thread(machine_row, ledger, "m1")
            assert row is not None
            assert (row.friendly_name, row.client, row.calls, row.floating) == ("PC-1", "10.0.0.7", 3, False)
            ledger.seen(LIC, "m1", friendly_name="", client="10.0.0.8", floating=True)
            await ledger.flush()
            row = await asyncio.to_thread(machine_row, ledger, "m1")
            assert row is not None
            assert (row.friendly_name, row.client, row.calls, row.floating) == ("PC-1", "10.0.0.8", 4, True)
        finally:
            await ledger.close()

    async def test_console_knows_a_machine_activated_a_moment_ago(
        self, admin: Admin, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """A deactivation from the console right after a floating activation is sent as floating."""
        license_key, message = await workstation("f1").activate(floating=3600, friendly_name="FLOAT-1")
        assert license_key is not None, message
        status, body, _ = await admin.api(
            "POST",
            "/api/v1/machines/deactivate",
            json={"product_id": PRODUCT, "key": LICENSE, "machine_code": "f1"},
        )
        assert status == 200, body
        assert upstream.fake.calls_to("key/deactivate")[0].fields["floating"] == "true"


def machine_row(ledger: SeatLedger, machine: str) -> MachineRow | None:
    """A machine of LIC as the ledger's read side has it."""
    with ledger.reader.snapshot() as snapshot:
        return snapshot.machine(LIC, machine)


class TestLedgerRecords:
    """What passes through lands in the ledger for reports."""

    async def test_machines_and_leases_recorded(self, floating: Daemon, upstream: Upstream) -> None:
        """Activations record machine, friendly name, address and lease; denials and releases are recorded."""
        form = activate_form(machine="alice-pc", key=SEATS, FloatingTimeInterval="300", FriendlyName="ALICE")
        async with aiohttp.ClientSession() as session:
            await session.post(
                f"{floating.base}/api/key/activate",
                data=urlencode(form),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        upstream.fake.add_license(PRODUCT, "ONEONE", max_machines=1)
        for machine in ("x", "y"):
            await post_activation(floating, machine, key="ONEONE")
        await floating.stop()
        db = sqlite3.connect(floating.config.state_dir / "seats.sqlite3")
        try:
            name, client, is_floating = db.execute(
                "SELECT friendly_name, client, floating FROM machines WHERE machine_code = 'alice-pc'"
            ).fetchone()
            assert (name, client, is_floating) == ("ALICE", "127.0.0.1", 1)
            started, expires, granted_by = db.execute(
                "SELECT started, expires, granted_by FROM leases WHERE machine_code = 'alice-pc'"
            ).fetchone()
            assert round(expires - started) == 300
            assert granted_by == "upstream"
            assert db.execute(
                "SELECT max_machines FROM licenses WHERE license_key = ?", (SEATS,)
            ).fetchone() == (10,)
            assert db.execute("SELECT machine_code, denied_by FROM denials").fetchall() == [("y", "upstream")]
        finally:
            db.close()


def run_cli(*args: str) -> tuple[int, str]:
    """Run the license-server command in this process and return its exit code and standard output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


class TestReportsFromTraffic:
    """Reports over a ledger filled by real SDK traffic through the daemon."""

    async def test_peak_idle_and_chart(
        self, upstream: Upstream, daemon_factory: DaemonFactory, clock: Clock, tmp_path: Path
    ) -> None:
        """Machines take floating seats at known times; the report shows each day's peak and the idle ones."""
        upstream.fake.add_license(PRODUCT, SEATS, max_machines=5)
        clock.jump_wall(-10 * 86400)  # the traffic happened ten days ago
        daemon = await daemon_factory()
        names = {"A": "ALICE-PC", "B": "BOB-PC", "C": "CAROL-PC", "D": "DAVE-PC", "E": "ERIN-PC"}
        names |= {"F": "FRANK-PC", "G": "GRACE-PC"}
        stations = {m: Workstation(lambda: daemon.api, upstream.fake.public_key_xml, m) for m in names}

        async def take(machine: str) -> None:
            found, message = await stations[machine].activate(
                SEATS, floating=300, friendly_name=names[machine]
            )
            assert found is not None, message

        for machine in "ABC":
            await take(machine)
        clock.advance(100)
        await take("D")  # four at once
        clock.advance(100)
        assert await stations["A"].deactivate(SEATS, floating=True) == (True, "")
        clock.advance(50)
        await take("E")  # four again, never five
        clock.advance(86400)
        await take("F")
        await take("G")
        await daemon.stop()
        state = f"state_dir={daemon.config.state_dir}"

        code, out = await asyncio.to_thread(
            run_cli, "report", "seats", "--set", state, "--since", "12d", "--every", "day", "--format", "json"
        )
        assert code == 0
        rows = [json.loads(line) for line in out.splitlines()]
        assert [(r["key"], r["peak_seats"], r["seat_limit"]) for r in rows] == [(SEATS, 4, 5), (SEATS, 2, 5)]
        assert rows[0]["distinct_machines"] == 5

        code, out = await asyncio.to_thread(
            run_cli, "report", "machines", "--set", state, "--idle-days", "5", "--format", "json"
        )
        assert code == 0
        idle = [json.loads(line)["friendly_name"] for line in out.splitlines()]
        assert sorted(idle) == ["BOB-PC", "CAROL-PC", "DAVE-PC", "ERIN-PC", "FRANK-PC", "GRACE-PC"]

        chart = tmp_path / "seats.svg"
        code, _ = await asyncio.to_thread(
            run_cli, "report", "seats", "--set", state, "--since", "12d", "--chart", str(chart)
        )
        assert code == 0
        assert "<svg" in chart.read_text()


class TestOnlyLicensedMachines:
    """The ledger's machines are those a seat was licensed to; refused and failed attempts stay out of it."""

    async def test_refused_failed_and_denied_activations_are_not_machines(
        self, daemon: Daemon, upstream: Upstream, workstation: MakeWorkstation, admin: Admin, clock: Clock
    ) -> None:
        """Bad tokens, an unknown key, an outage and a denied seat leave reports and console at 3 machines."""
        for machine in ("m1", "m2", "m3"):  # the license's three seats
            found, message = await workstation(machine).activate(friendly_name=f"PC-{machine}")
            assert found is not None, message
        for n in range(5):
            refused = await workstation(f"alice-{n}", token="bad-token").activate(
                friendly_name="ALICE-LAPTOP"
            )
            assert refused == (None, "Unable to authenticate.")
        unknown = await workstation("m1").activate("NOKEY-NOKEY-NOKEY-NOKEY", friendly_name="PC-m1")
        assert unknown == (None, "Could not find the key.")
        assert await workstation("m4").activate(friendly_name="PC-m4") == (None, LIMIT_REACHED)
        await upstream.stop()
        found, message = await workstation("newcomer").activate(friendly_name="NEWCOMER")
        assert found is None
        assert "could not be reached" in message
        found, message = await workstation("m2").activate(friendly_name="PC-m2")  # kept: still licensed
        assert found is not None, message

        await admin.settle()
        clock.advance(1)  # the console's period ends now, and leaves out what happened at this very moment
        status, body, _ = await admin.api("GET", "/api/v1/licenses")
        assert status == 200, body
        counts = [
            (r["key"], r["machines_active"], r["machines_known"], r["denials"]) for r in body["licenses"]
        ]
        assert counts == [(LICENSE, 3, 3, 1)]
        await daemon.stop()
        state = f"state_dir={daemon.config.state_dir}"
        code, out = await asyncio.to_thread(run_cli, "report", "machines", "--set", state, "--format", "json")
        assert code == 0
        listed = [json.loads(line) for line in out.splitlines()]
        assert [(m["machine_code"], m["friendly_name"]) for m in listed] == [
            ("m1", "PC-m1"),
            ("m2", "PC-m2"),
            ("m3", "PC-m3"),
        ]
        code, out = await asyncio.to_thread(
            run_cli, "report", "seats", "--set", state, "--since", "1d", "--format", "json"
        )
        assert code == 0
        rows = [json.loads(line) for line in out.splitlines()]
        assert [
            (r["key"], r["node_locked_machines"], r["distinct_machines"], r["denials"], r["seat_limit"])
            for r in rows
        ] == [(LICENSE, 3, 3, 1, 3)]
        # m4's refusal was of a node-locked activation: a denial, but no floating demand
        code, out = await asyncio.to_thread(
            run_cli, "report", "plan", "--set", state, "--since", "1d", "--format", "json"
        )
        assert code == 0
        (planned,) = [json.loads(line) for line in out.splitlines()]
        assert (planned["key"], planned["denials"], planned["peak_demand"], planned["seats_100"]) == (
            LICENSE,
            1,
            0,
            0,
        )
        assert (planned["node_locked_machines"], planned["idle_machines"]) == (3, 0)
