"""One node cut off from the database while the other reaches it; PostgreSQL itself stopped and started.

Each run plays the same SDK-shaped calls through two real daemon processes; node-a reaches PostgreSQL
through the suite's fault proxy. In the faulty run node-a's database traffic is refused, then reset, then
blackholed, while node-b's is not. Every call must answer as in the run without the failure and within the
upstream timeout; once healed, node-a's backlog drains, `audit verify` passes, and the reports and the trail
equal those of the run without the failure.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from license_server.web.keys import SERVICES
from tests.conftest import PRODUCT, Daemon, Upstream, send_form
from tests.pgcluster import Cluster
from tests.test_db_down import proxy_to, through
from tests.test_nodes import Nodes
from tests.test_proxy import activate_form

pytestmark = pytest.mark.slow

LOCKED = "PARTI-LOCKE-DXXXX-XXXXX"  # node-locked, 10 machines
FLOATING = "PARTI-FLOAT-INGXX-XXXXX"  # floating, 10 seats
TIMEOUT = 2.0  # the nodes' upstream.timeout: no call may take longer, whatever the database does
PHASES = ("before", "refuse", "rst", "blackhole", "after")  # node-a's database path in the faulty run


@dataclass(frozen=True, slots=True)
class Step:
    """One SDK call of the script: through which node, what, for which machine."""

    phase: str
    node: str
    kind: str  # activate, float (a floating seat), deactivate, unfloat (its release), getkey
    machine: str


def script() -> list[Step]:
    """The calls both runs make: every kind through both nodes in every phase."""
    steps: list[Step] = []
    for n, phase in enumerate(PHASES):
        steps += [
            Step(phase, "node-a", "activate", f"a-{n}"),
            Step(phase, "node-b", "activate", f"b-{n}"),
            Step(phase, "node-a", "float", f"fa-{n}"),
            Step(phase, "node-b", "float", f"fb-{n}"),
            Step(phase, "node-a", "getkey", ""),
            Step(phase, "node-a", "activate", f"a-{n}"),  # again: one machine, two calls
        ]
        if n:  # each earlier phase's machine leaves, through the other node than the one it came in by
            steps += [
                Step(phase, "node-b", "deactivate", f"a-{n - 1}"),
                Step(phase, "node-a", "deactivate", f"b-{n - 1}"),
                Step(phase, "node-b", "unfloat", f"fa-{n - 1}"),
            ]
    return steps


def form(step: Step) -> tuple[str, dict[str, str]]:
    """The path and form of a step, as the Python SDK sends them."""
    if step.kind == "float":
        return "/api/key/activate", activate_form(
            machine=step.machine, key=FLOATING, FloatingTimeInterval="600"
        )
    if step.kind == "unfloat":
        return "/api/key/deactivate", activate_form(machine=step.machine, key=FLOATING, Floating="true")
    sent = activate_form(machine=step.machine, key=LOCKED, FriendlyName=f"PC {step.machine}")
    if step.kind == "getkey":
        return "/api/key/getkey", {k: v for k, v in sent.items() if k != "MachineCode"}
    return f"/api/key/{step.kind}", sent


def reconfigure(nodes: Nodes, name: str, changes: dict[str, Any]) -> None:
    """Change top-level sections of one node's configuration file (merged one level deep)."""
    path = nodes[name].config_path
    assert path is not None
    data = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values}
    path.write_text(yaml.safe_dump(data))


async def status(nodes: Nodes, name: str) -> dict[str, Any]:
    """A node's /status."""
    async with aiohttp.ClientSession() as session, session.get(f"{nodes[name].base}/status") as response:
        found: dict[str, Any] = await response.json()
        return found


async def wait_database(nodes: Nodes, name: str, state: str, within: float) -> None:
    """Wait until a node's /status says the database is `state`, and (when up) nothing waits for it."""
    started = time.monotonic()
    while True:
        shown = (await status(nodes, name))["database"]
        done = shown["backlog"] == {"writes": 0, "audit_records": 0} if state == "up" else True
        if shown["state"] == state and done:
            return
        assert time.monotonic() - started < within, shown
        await asyncio.sleep(0.1)


@dataclass(slots=True)
class Played:
    """What a run of the script left: what workstations saw, and the shared state afterwards."""

    answers: list[tuple[str, int, int | None]]  # per step: kind, status, result
    machines: list[dict[str, Any]]
    seats: list[dict[str, Any]]
    trail: Counter[tuple[Any, ...]]


async def play(
    tmp_path: Path, upstream: Upstream, database: str, *, faulty: bool
) -> tuple[Played, Nodes, list[float]]:
    """Run the script through node-a (behind a fault proxy to the database) and node-b; stop them after."""
    upstream.fake.add_license(PRODUCT, LOCKED, max_machines=10, id=9001)
    upstream.fake.add_license(PRODUCT, FLOATING, max_machines=10, id=9002)
    proxy = await proxy_to(database)
    nodes = Nodes(tmp_path, upstream, database, names=("node-a", "node-b"))
    reconfigure(nodes, "node-a", {"database": {"url": through(proxy, database)}})
    for name in nodes.procs:
        reconfigure(nodes, name, {"upstream": {"timeout": f"{TIMEOUT}s"}})
    took: list[float] = []
    answers: list[tuple[str, int, int | None]] = []
    try:
        await nodes.start()
        for phase in PHASES:
            if faulty:
                await proxy.set("pass" if phase in ("before", "after") else phase)
            if phase == "after" and faulty:
                await wait_database(nodes, "node-a", "up", within=15)
            for i, step in enumerate(s for s in script() if s.phase == phase):
                if i == 2 and faulty and phase not in ("before", "after"):
                    await wait_database(nodes, "node-a", "down", within=3)  # the rest: while it knows
                path, sent = form(step)
                started = time.monotonic()
                code, _, body = await send_form(nodes[step.node].base, path, sent)
                took.append(time.monotonic() - started)
                result = json.loads(body).get("result") if code == 200 else None
                answers.append((step.kind, code, result))
        await wait_database(nodes, "node-a", "up", within=15)
        await asyncio.sleep(1.5)  # calls are summed in memory for a second before they are written
        played = Played(answers, *await asyncio.to_thread(reports, nodes))
    finally:
        await nodes.stop()
        await proxy.stop()
    return played, nodes, took


def reports(nodes: Nodes) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Counter[tuple[Any, ...]]]:
    """The machines and seats reports, and the trail's calls, without the times that differ between runs."""
    found = {
        name: nodes.cli("node-b", *args, "--format", "json")
        for name, args in (
            ("machines", ("report", "machines")),
            ("seats", ("report", "seats")),
            ("trail", ("audit", "search")),
        )
    }
    for done in found.values():
        assert done.returncode == 0, done.stderr
    rows = {
        name: [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        for name, done in found.items()
    }
    machines = sorted(
        (
            {k: v for k, v in row.items() if k not in ("first_seen", "last_seen", "idle_days")}
            | {"deactivated": row["deactivated"] is not None}
            for row in rows["machines"]
        ),
        key=lambda row: (row["key"], row["machine_code"]),
    )
    trail = Counter(
        (r.get("node"), r["api_method"], r["key"], r["machine"], r["action"], r["status"], r["result"])
        for r in rows["trail"]
        if r.get("type") == "call"
    )
    return machines, rows["seats"], trail


async def test_one_node_cut_off_answers_alike_and_leaves_the_state_of_a_run_without_it(
    tmp_path: Path, upstream: Upstream, pg_cluster: Cluster
) -> None:
    """Refused, reset, blackholed for node-a alone: same answers, in time; same reports and trail after."""
    (tmp_path / "clean").mkdir()
    (tmp_path / "faulty").mkdir()
    clean, _, _ = await play(tmp_path / "clean", upstream, pg_cluster.new_database(), faulty=False)
    faulty, nodes, took = await play(tmp_path / "faulty", upstream, pg_cluster.new_database(), faulty=True)
    assert max(took) < TIMEOUT, sorted(took)[-5:]
    assert faulty.answers == clean.answers
    assert [a for a in clean.answers if a[1:] != (200, 0)] == []  # every call a licence, in both runs
    assert faulty.machines == clean.machines
    assert len(clean.machines) == 20  # 10 node-locked, 10 floating
    assert sum(row["deactivated"] for row in clean.machines) == 12  # 8 node-locked, 4 floating again
    assert faulty.seats == clean.seats
    peaks = {row["key"]: row["peak_seats"] for row in clean.seats if row["peak_seats"]}
    assert peaks == {FLOATING: 7}  # 2 seats a phase, then one of the phase before freed: peak 5 * 2 - 3
    assert faulty.trail == clean.trail
    assert sum(clean.trail.values()) == len(script())
    verified = await asyncio.to_thread(nodes.cli, "node-b", "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for name in ("node-a", "node-b"):
        log = nodes[name].log_text()
        assert "database_spooled_write_dropped" not in log
        assert "database_write_failed" not in log


@pytest.fixture
async def own_cluster() -> AsyncIterator[Cluster]:
    """A PostgreSQL server of this test's own, to stop and start."""
    cluster = await asyncio.to_thread(Cluster().start)
    try:
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_postgres_stopped_and_started_again(
    daemon_factory: Callable[..., Awaitable[Daemon]], own_cluster: Cluster
) -> None:
    """The server itself goes away: calls answer in time, what they wrote lands once it is back."""
    database = own_cluster.new_database()
    daemon = await daemon_factory(f"database.url={database}", "node.name=solo", "upstream.timeout=2s")
    heartbeat = daemon.app[SERVICES].heartbeat
    assert heartbeat is not None
    await asyncio.to_thread(own_cluster.pause)
    for machine in ("pg-1", "pg-2"):
        started = time.monotonic()
        code, _, body = await send_form(daemon.base, "/api/key/activate", activate_form(machine=machine))
        assert (code, json.loads(body)["result"]) == (200, 0)
        assert time.monotonic() - started < 2
    assert not heartbeat.up
    await asyncio.to_thread(own_cluster.resume)
    started = time.monotonic()
    while not heartbeat.up or daemon.app[SERVICES].database_backlog() != (0, 0):
        assert time.monotonic() - started < 10, daemon.app[SERVICES].database_backlog()
        await asyncio.sleep(0.1)
