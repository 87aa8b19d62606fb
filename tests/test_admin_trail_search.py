"""`audit search` over the records the admin console really writes: every action it records is searchable."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from license_server.audit import search
from license_server.cli import main
from tests.admin_support import ADMIN_TOKEN, Admin
from tests.conftest import LICENSE, PRODUCT, Workstation


async def console_actions(admin: Admin, workstation: Callable[..., Workstation]) -> None:
    """Every kind of admin record: failed logins and bearer tokens, a good login, the actions, logout."""
    license_key, message = await workstation("m1").activate(friendly_name="LAB-PC-1")
    assert license_key is not None, message
    await admin.settle()
    async with admin.browser() as session:
        async with session.post("/login", data={"token": "wrong", "name": "mallory"}) as r:
            assert r.status == 401
        async with session.get("/api/v1/status", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        csrf = await admin.login(session)
        target = {"product_id": PRODUCT, "key": LICENSE, "machine_code": "m1"}
        status, body, _ = await admin.api("POST", "/api/v1/machines/deactivate", json=target)
        assert status == 200, body
        lab = {"product_id": PRODUCT, "key": LICENSE, "machine_code": "lab-7", "friendly_name": "LAB-PC-7"}
        status, body, _ = await admin.api("POST", "/api/v1/activations", json=lab)
        assert status == 200, body
        params = {"product_id": str(PRODUCT), "key": LICENSE, "machine_code": "lab-7"}
        status, body, _ = await admin.api("GET", "/api/v1/license-file", params=params)
        assert status == 200, body
        async with session.post("/logout", data={"csrf": csrf}) as r:
            assert r.status == 200


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Run the command line; its exit code and the lines it printed that are not the daemon's log."""
    code = main(argv)
    lines = capsys.readouterr().out.splitlines()
    return code, [line for line in lines if line.startswith(('{"seq"', "time ")) or "(admin)" in line]


class TestConsoleRecordsInSearch:
    """What the console writes, `audit search --action` finds, and its table shows what each is about."""

    async def test_every_console_action_can_be_searched(
        self,
        admin: Admin,
        workstation: Callable[..., Workstation],
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Each action the console recorded is accepted by --action and finds exactly its records."""
        await console_actions(admin, workstation)
        base = ["audit", "search", "--set", f"state_dir={tmp_path / 'state'}"]
        written = [
            record["action"]
            for record in await asyncio.to_thread(
                lambda: list(search.search(admin.services.config.audit_dir, search.Query()))
            )
            if record["type"] == "admin"
        ]
        assert sorted(set(written)) == sorted(search.ADMIN_ACTIONS)
        for action in sorted(set(written)):
            code, lines = await asyncio.to_thread(
                cli, [*base, "--action", action, "--format", "json"], capsys
            )
            assert code == 0, action
            assert [json.loads(line)["action"] for line in lines] == [action] * written.count(action)
        assert ADMIN_TOKEN not in str(written)

    async def test_the_table_names_the_license_machine_and_name(
        self,
        admin: Admin,
        workstation: Callable[..., Workstation],
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A deactivation's row shows its license key, machine code and friendly name, not '-'."""
        await console_actions(admin, workstation)
        argv = ["audit", "search", "--set", f"state_dir={tmp_path / 'state'}", "--action", "deactivate"]
        code, (header, row) = await asyncio.to_thread(cli, argv, capsys)
        assert code == 0
        shown = {name: row[header.index(name) :].split()[0] for name in ("key", "machine", "friendly_name")}
        assert shown == {"key": LICENSE, "machine": "m1", "friendly_name": "LAB-PC-1"}
