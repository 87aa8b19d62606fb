"""An upgrade never strands a customer: a state folder written by version 0.1 is read by this code unchanged.

tests/data/state-0.1/state is the state_dir of license-server 0.1.0 (commit c230f2d) after this traffic,
made through that version's tests/conftest.py (its daemon in front of the fake upstream, the Python SDK):
ws-node activates MUYVD-... (3 machines, node-locked) and gets its key; a minute later ws-float takes a
floating seat of FLOAT-... (2 seats) for an hour, ws-one activates KQXJA-... (1 machine) and ws-two is
refused it; then the daemon stops. recorded.json has the clocks at the stop, vendor.xml the vendor key.
It holds kept answers (written before kept answers were counted in the database), a seat ledger with a live
lease, machines and a denial, the fingerprint key and an audit trail of 7 records.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from license_server.cli import main
from license_server.storage.state import StateFolder
from license_server.web.app import SERVICES
from tests.conftest import Clock, Daemon, Workstation, make_config, send_form
from tests.test_proxy import activate_form

FIXTURE = Path(__file__).parent / "data" / "state-0.1"
RECORDED: dict[str, Any] = json.loads((FIXTURE / "recorded.json").read_text())
VENDOR_KEY = (FIXTURE / "vendor.xml").read_text()
PRODUCT = str(RECORDED["product"])
NODE_LOCKED = RECORDED["licenses"]["node_locked"]
ONE_SEAT = RECORDED["licenses"]["one_seat"]
FLOATING = RECORDED["licenses"]["floating"]
OLD_RECORDS = 7
UNREACHABLE = "http://127.0.0.1:9"  # never called: the daemon runs in offline mode

ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A copy of the 0.1 state folder, in the place make_config names."""
    copy = tmp_path / "state"
    shutil.copytree(FIXTURE / "state", copy)
    return copy


@pytest.fixture
def later(clock: Clock) -> Clock:
    """The clocks a minute after version 0.1 stopped, on the same boot: its lease has most of an hour left."""
    clock.wall = RECORDED["wall"] + 60
    clock.boot = RECORDED["boot"] + 60
    clock.boot_id = RECORDED["boot_id"]
    return clock


@pytest.fixture
async def upgraded(state: Path, later: Clock, aiohttp_server: ServerFactory) -> Daemon:
    """This version's daemon, offline, over the old state folder."""
    config = await asyncio.to_thread(
        make_config, state.parent, UNREACHABLE, VENDOR_KEY, "upstream.offline=true"
    )
    assert config.state_dir == state
    return await Daemon(config, aiohttp_server, later).start()


def kept_bodies(path: Path) -> dict[tuple[str, str, str], bytes]:
    """The kept answers of an answers database as 0.1 wrote them, by (method, key, machine)."""
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT method, license_key, machine_code, body FROM answers").fetchall()
    return {(method, key, machine): bytes(body) for method, key, machine, body in rows}


def utc_text(moment: float) -> str:
    """A unix time as the report's --since and --until take it."""
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_cli(*args: str) -> tuple[int, str]:
    """Run the license-server command in this process; its exit code and standard output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


class TestUpgradeFrom01:
    """The files of version 0.1, opened by this version without a change by hand."""

    async def test_kept_activation_served_byte_for_byte(self, state: Path, upgraded: Daemon) -> None:
        """Offline, the kept Activate answer is served exactly as upstream signed it, and the SDK takes it."""
        kept = await asyncio.to_thread(kept_bodies, StateFolder(state).answers)
        form = activate_form(machine="ws-node", key=NODE_LOCKED, FriendlyName="NODE-PC")
        status, headers, body = await send_form(upgraded.base, "/api/key/activate", form)
        assert (status, headers["X-License-Server-Source"]) == (200, "kept_stale")
        assert body == kept[("key/activate", NODE_LOCKED, "ws-node")]
        found, message = await Workstation(lambda: upgraded.api, VENDOR_KEY, "ws-node").activate(
            NODE_LOCKED, product=int(PRODUCT), friendly_name="NODE-PC"
        )
        assert found is not None, message
        assert found.key == NODE_LOCKED
        assert "ws-node" in [machine.Mid for machine in found.activated_machines]

    async def test_kept_getkey_served(self, upgraded: Daemon) -> None:
        """The kept GetKey answer verifies in the SDK too."""
        found, message = await Workstation(lambda: upgraded.api, VENDOR_KEY, "ws-node").get_key(
            NODE_LOCKED, product=int(PRODUCT)
        )
        assert found is not None, message

    async def test_counts_leases_and_limits_carried(self, state: Path, upgraded: Daemon) -> None:
        """Kept answers are counted, the live lease still holds its seat, and the seat limits are known."""
        services = upgraded.app[SERVICES]
        assert services.kept_answers == 4
        seats = services.licensing.seats
        assert seats.in_use() == {(PRODUCT, FLOATING): 1}
        assert list(seats.live((PRODUCT, FLOATING))) == ["ws-float"]
        assert [seats.limit((PRODUCT, key)) for key in (NODE_LOCKED, ONE_SEAT, FLOATING)] == [3, 1, 2]
        await upgraded.stop()
        fixture_key = await asyncio.to_thread((FIXTURE / "state" / "fingerprint.key").read_bytes)
        assert await asyncio.to_thread(StateFolder(state).fingerprint_key.read_bytes) == fixture_key

    async def test_reports_show_its_machines_and_seats(self, state: Path, upgraded: Daemon) -> None:
        """`report machines` and `report seats` read the old ledger, before and after the daemon wrote it."""
        await upgraded.stop()
        where = f"state_dir={state}"
        code, out = await asyncio.to_thread(run_cli, "report", "machines", "--set", where, "--format", "json")
        assert code == 0
        machines = {row["machine_code"]: row for row in map(json.loads, out.splitlines())}
        assert {code: row["friendly_name"] for code, row in machines.items()} == {
            "ws-float": "FLOAT-PC",
            "ws-node": "NODE-PC",
            "ws-one": "ONE-PC",
            "ws-two": "TWO-PC",  # 0.1 recorded refused machines too
        }
        assert machines["ws-float"]["floating"] is True
        since, until = (utc_text(RECORDED["wall"] + days * 86400) for days in (-1, 1))
        code, out = await asyncio.to_thread(
            run_cli, "report", "seats", "--set", where, "--since", since, "--until", until, "--format", "json"
        )
        assert code == 0
        rows = {row["key"]: row for row in map(json.loads, out.splitlines())}
        assert (rows[FLOATING]["peak_seats"], rows[FLOATING]["seat_limit"]) == (1, 2)
        assert (rows[ONE_SEAT]["denials"], rows[ONE_SEAT]["seat_limit"]) == (1, 1)
        assert rows[NODE_LOCKED]["node_locked_machines"] == 1
        # 0.1 kept no interval with ws-two's refusal; ONE-SEAT had no floating lease: a node-locked refusal
        code, out = await asyncio.to_thread(
            run_cli, "report", "plan", "--set", where, "--since", since, "--until", until, "--format", "json"
        )
        assert code == 0
        planned = {row["key"]: row for row in map(json.loads, out.splitlines())}
        assert (planned[ONE_SEAT]["denials"], planned[ONE_SEAT]["peak_demand"]) == (1, 0)
        assert (planned[FLOATING]["peak_seats"], planned[FLOATING]["peak_demand"]) == (1, 1)

    async def test_audit_trail_continues_and_verifies(self, state: Path, upgraded: Daemon) -> None:
        """The new records continue the old chain, and `audit verify` passes over both."""
        form = activate_form(machine="ws-node", key=NODE_LOCKED, FriendlyName="NODE-PC")
        assert (await send_form(upgraded.base, "/api/key/activate", form))[0] == 200
        await upgraded.stop()
        code, out = await asyncio.to_thread(run_cli, "audit", "verify", "--set", f"state_dir={state}")
        assert code == 0, out
        records = [
            json.loads(line)
            for path in sorted((state / "audit").glob("audit-*.jsonl"))
            for line in path.read_text().splitlines()
        ]
        assert [record["seq"] for record in records] == list(range(1, len(records) + 1))
        assert len(records) > OLD_RECORDS
        assert [record["type"] for record in records[OLD_RECORDS - 1 : OLD_RECORDS + 1]] == ["stop", "start"]
        assert any(
            record.get("machine") == "ws-node" and record.get("action") == "kept_stale"
            for record in records[OLD_RECORDS:]
        )
