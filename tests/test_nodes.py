"""Three real daemon processes sharing one PostgreSQL database, driven as workstations drive them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from license_server.storage.seats import LIMIT_REACHED
from tests.conftest import LICENSE, PRODUCT, Clock, Upstream, Workstation, send_form
from tests.test_process import DaemonProcess
from tests.test_proxy import activate_form

pytestmark = pytest.mark.slow

SEATS = "FLOAT-TENSE-ATSXX-XXXXX"  # a floating license with 10 seats
NAMES = ("node-a", "node-b", "node-c")


class Nodes:
    """Daemon processes in front of one fake upstream, sharing one database, each with its own state_dir."""

    def __init__(
        self, tmp_path: Path, upstream: Upstream, database: str, names: tuple[str, ...] = NAMES
    ) -> None:
        self.upstream = upstream
        self.database = database
        self.procs: dict[str, DaemonProcess] = {}
        for name in names:
            folder = tmp_path / name
            folder.mkdir()
            self.procs[name] = DaemonProcess(
                folder,
                {
                    "upstream": {"url": upstream.url, "timeout": "1s", "breaker": {"reset_after": "0.2s"}},
                    "public_key": upstream.fake.public_key_xml,
                    "state_dir": str(folder / "state"),
                    "log": {"format": "json"},
                    "database": {"url": database},
                    "node": {"name": name},
                },
            )

    def __getitem__(self, name: str) -> DaemonProcess:
        return self.procs[name]

    async def start(self) -> None:
        """Start every node at the same moment (they migrate the empty database together)."""
        await asyncio.gather(*(proc.start() for proc in self.procs.values()))

    async def stop(self) -> None:
        """Stop every node with SIGTERM, as systemd does."""
        for proc in self.procs.values():
            if proc.proc is not None and proc.proc.poll() is None:
                proc.proc.terminate()
        for proc in self.procs.values():
            if proc.proc is not None:
                await proc.wait()

    def cli(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        """A license-server command run with one node's configuration."""
        config = self.procs[name].config_path
        assert config is not None
        return subprocess.run(
            [sys.executable, "-m", "license_server", *args, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def station(self, name: str, machine: str) -> Workstation:
        """An SDK workstation pointed at one node."""
        proc = self.procs[name]
        return Workstation(lambda: f"{proc.base}/api/", self.upstream.fake.public_key_xml, machine)


@pytest.fixture
async def nodes(tmp_path: Path, upstream: Upstream, pg_url: str) -> AsyncIterator[Nodes]:
    """Three nodes on one fresh database, started together."""
    upstream.fake.add_license(PRODUCT, SEATS, max_machines=10)
    group = Nodes(tmp_path, upstream, pg_url)
    try:
        await group.start()
        yield group
    finally:
        await group.stop()


async def floating(node: DaemonProcess, machine: str, interval: int) -> dict[str, Any]:
    """A floating activation as the SDK sends it."""
    form = activate_form(machine=machine, key=SEATS, FloatingTimeInterval=str(interval))
    status, _, body = await send_form(node.base, "/api/key/activate", form)
    assert status == 200, body
    answer: dict[str, Any] = json.loads(body)
    return answer


async def status(node: DaemonProcess) -> dict[str, Any]:
    """The node's /status."""
    async with aiohttp.ClientSession() as session, session.get(f"{node.base}/status") as response:
        found: dict[str, Any] = await response.json()
        return found


class TestSharedState:
    """What one node learns, every node knows."""

    async def test_kept_answer_through_a_served_by_b(self, nodes: Nodes, upstream: Upstream) -> None:
        """During an outage B serves the answer A kept, byte for byte, to the same call only."""
        form = activate_form(machine="ws-1")
        status_a, _, body_a = await send_form(nodes["node-a"].base, "/api/key/activate", form)
        assert status_a == 200
        assert json.loads(body_a)["result"] == 0
        await upstream.stop()
        status_b, headers_b, body_b = await send_form(nodes["node-b"].base, "/api/key/activate", form)
        assert status_b == 200
        assert body_b == body_a
        assert headers_b["X-License-Server-Source"] == "kept_stale"
        # The SDK on node C verifies it too.
        license_key, message = (await nodes.station("node-c", "ws-1").activate())[:2]
        assert license_key is not None, message
        # Another machine's call is not answered with it.
        other = activate_form(machine="ws-2")
        _, _, body_other = await send_form(nodes["node-b"].base, "/api/key/activate", other)
        assert json.loads(body_other)["result"] == 1

    async def test_deactivation_through_a_stops_b_within_a_second(
        self, nodes: Nodes, upstream: Upstream
    ) -> None:
        """B holds the kept answers in memory; a deactivation through A drops them on B too."""
        station_b = nodes.station("node-b", "ws-gone")
        assert (await station_b.activate())[0] is not None
        assert (await station_b.get_key())[0] is not None
        await upstream.stop()
        assert (await station_b.activate())[0] is not None  # B serves it from memory now
        await upstream.start()
        ok, message = await nodes.station("node-a", "ws-gone").deactivate()
        assert ok, message
        deactivated = time.monotonic()
        await upstream.stop()
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - deactivated)))
        license_key, _ = (await station_b.activate())[:2]
        assert license_key is None
        license_key, _ = (await station_b.get_key())[:2]
        assert license_key is None or not any(
            getattr(item, "machine_code", None) == "ws-gone" for item in license_key.activated_machines or []
        )

    async def test_status_names_the_node_and_the_shared_ledger(self, nodes: Nodes) -> None:
        """Each node says its name; seats granted through one are in use on all."""
        assert (await floating(nodes["node-a"], "seat-1", 600))["result"] == 0
        for name in NAMES:
            found = await status(nodes[name])
            assert found["node"] == name
        await asyncio.sleep(1.2)  # the in-use figure is refreshed from the database once a second
        for name in NAMES:
            assert (await status(nodes[name]))["floating_seats_in_use"] == 1


class TestSeatRace:
    """The floating bound holds across nodes during an outage."""

    async def test_fifty_activations_over_three_nodes_grant_exactly_ten(
        self, nodes: Nodes, upstream: Upstream, clock: Clock
    ) -> None:
        """50 machines with kept answers race for 10 seats through 3 nodes: 10 win, three times over."""
        interval = 5
        machines = [f"race-{i:02d}" for i in range(50)]
        names = list(NAMES)
        # Give every machine a kept answer: 10 at a time, letting upstream's and the ledger's seats lapse.
        for start in range(0, 50, 10):
            batch = machines[start : start + 10]
            answers = await asyncio.gather(
                *(floating(nodes[names[i % 3]], m, interval) for i, m in enumerate(batch))
            )
            assert all(a["result"] == 0 for a in answers), answers
            clock.advance(interval + 1)
            await asyncio.sleep(interval + 0.5)
        await upstream.stop()
        for _ in range(3):
            answers = await asyncio.gather(
                *(floating(nodes[names[i % 3]], m, interval) for i, m in enumerate(machines))
            )
            granted = [a for a in answers if a["result"] == 0]
            assert len(granted) == 10
            assert {a["message"] for a in answers if a["result"] != 0} == {LIMIT_REACHED}
            await asyncio.sleep(interval + 0.5)  # every seat lapses before the next round


class TestCommandsOnTheDatabase:
    """Reports and the audit trail read the shared state whichever node's configuration they run with."""

    async def test_reports_equal_from_every_node(self, nodes: Nodes) -> None:
        """`report seats` and `report machines` give the same figures with each node's configuration."""
        for i, name in enumerate(NAMES):
            assert (await floating(nodes[name], f"rep-{i}", 600))["result"] == 0
        await asyncio.sleep(1.5)  # calls are summed in memory for a second before they are written
        seats = {name: nodes.cli(name, "report", "seats", "--format", "json") for name in NAMES}
        machines = {name: nodes.cli(name, "report", "machines", "--format", "json") for name in NAMES}
        for found in (*seats.values(), *machines.values()):
            assert found.returncode == 0, found.stderr
        assert len({found.stdout for found in seats.values()}) == 1
        assert len({found.stdout for found in machines.values()}) == 1
        listed = [json.loads(line) for line in machines["node-a"].stdout.splitlines()]
        assert {row["machine_code"] for row in listed} >= {"rep-0", "rep-1", "rep-2"}

    async def test_audit_search_and_verify_see_every_node(self, nodes: Nodes) -> None:
        """Calls answered by each node are found, with its name, from any node; the trail verifies."""
        for i, name in enumerate(NAMES):
            await nodes.station(name, f"aud-{i}").activate()
        wanted = {("node-a", "aud-0"), ("node-b", "aud-1"), ("node-c", "aud-2")}
        deadline = time.monotonic() + 10  # records reach the database once synced (audit.fsync: 1s)
        while True:
            found = nodes.cli("node-b", "audit", "search", "--format", "json", "--key", LICENSE)
            assert found.returncode == 0, found.stderr
            records = [json.loads(line) for line in found.stdout.splitlines() if line.strip()]
            if wanted <= {(r.get("node"), r.get("machine")) for r in records}:
                break
            assert time.monotonic() < deadline, found.stdout
            await asyncio.sleep(0.5)
        verified = nodes.cli("node-c", "audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        for name in NAMES:
            assert name in verified.stdout

    async def test_check_config_names_the_schema(self, nodes: Nodes) -> None:
        """check-config reaches the database and says its schema version, never a password."""
        found = nodes.cli("node-a", "check-config")
        assert found.returncode == 0, found.stderr
        assert "schema version" in found.stdout
