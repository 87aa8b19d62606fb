"""`license-server database move-in`: one node's SQLite state copied into the shared database, once."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from license_server.cli import main
from license_server.config import DatabaseConfig
from license_server.storage.state import StateFolder, StateLock
from tests.conftest import LICENSE, OTHER_LICENSE, PRODUCT, Daemon, Upstream, Workstation, send_form
from tests.test_proxy import activate_form

DaemonFactory = Callable[..., Awaitable[Daemon]]
SEATS = "FLOAT-FLOAT-FLOAT-FLOAT"
NODE = "solo"


async def move_in(state_dir: Path, url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the command as an admin would, off the event loop; exit status, stdout and stderr."""
    argv = ["database", "move-in", "--set", f"state_dir={state_dir}", "--set", f"database.url={url}"]
    argv += ["--set", f"node.name={NODE}"]
    status = await asyncio.to_thread(main, argv)
    out, err = capsys.readouterr()
    return status, out, err


def rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a query on the shared database."""
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


def sqlite_rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a query on one of the node's SQLite files."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


async def single_node_state(daemon: Daemon, upstream: Upstream) -> bytes:
    """Real traffic through a SQLite node: a kept answer, a live floating lease, a refusal; the kept body."""
    upstream.fake.add_license(PRODUCT, SEATS, max_machines=2)
    status, _headers, body = await send_form(daemon.base, "/api/key/activate", activate_form("alice-pc"))
    assert status == 200, body
    bob = Workstation(lambda: daemon.api, upstream.fake.public_key_xml, "bob-pc")
    assert (await bob.activate(SEATS, floating=600))[0] is not None
    assert (await bob.activate(OTHER_LICENSE))[0] is not None
    carol = Workstation(lambda: daemon.api, upstream.fake.public_key_xml, "carol-pc")
    assert (await carol.activate(OTHER_LICENSE))[0] is None  # one machine only: refused upstream
    await daemon.stop()
    return body


async def test_moved_in_once_and_served_by_a_database_node(
    daemon_factory: DaemonFactory, upstream: Upstream, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Answers, ledger and leases copied; a second run copies nothing; a database node serves the answer."""
    daemon = await daemon_factory(f"node.name={NODE}")
    kept_body = await single_node_state(daemon, upstream)
    folder = StateFolder(daemon.config.state_dir)
    kept = await asyncio.to_thread(sqlite_rows, folder.answers, "SELECT count(*) FROM answers")
    calls = await asyncio.to_thread(sqlite_rows, folder.seats, "SELECT sum(calls) FROM machines")

    status, out, err = await move_in(daemon.config.state_dir, pg_url, capsys)
    assert status == 0, err
    assert f"node {NODE} moved in" in out
    assert f"kept answers: {kept[0][0]} copied" in out
    assert "leases: 1 live" in out
    assert "denials: 1" in out
    assert "audit records shipped: 0" not in out
    assert "audit records shipped: " in out

    assert await asyncio.to_thread(rows, pg_url, "SELECT count(*) FROM answers") == kept
    assert await asyncio.to_thread(rows, pg_url, "SELECT sum(calls) FROM machines") == calls
    leases = await asyncio.to_thread(
        rows, pg_url, "SELECT machine_code, node, expires - extract(epoch FROM now()) FROM leases WHERE open"
    )
    assert [(m, n) for m, n, _ in leases] == [("bob-pc", NODE)]
    assert 0 < leases[0][2] <= 600
    key = await asyncio.to_thread(rows, pg_url, "SELECT value FROM settings WHERE name = 'fingerprint-key'")
    assert key == [(folder.fingerprint_key.read_bytes(),)]

    status, out, err = await move_in(daemon.config.state_dir, pg_url, capsys)
    assert status == 0, err
    assert "already moved in" in out
    assert "nothing copied" in out
    assert "audit records shipped: 0" in out
    assert await asyncio.to_thread(rows, pg_url, "SELECT count(DISTINCT node) FROM audit_records") == [(1,)]
    assert await asyncio.to_thread(rows, pg_url, "SELECT count(*) FROM answers") == kept
    assert await asyncio.to_thread(rows, pg_url, "SELECT sum(calls) FROM machines") == calls
    # carol's refusal was of a node-locked activation: it asked for no floating interval (0, not unknown)
    denials = "SELECT count(*), max(floating_interval) FROM denials"
    assert await asyncio.to_thread(rows, pg_url, denials) == [(1, 0.0)]
    assert await asyncio.to_thread(rows, pg_url, "SELECT count(*) FROM leases WHERE open") == [(1,)]

    # The node now runs on the database; upstream fails: the moved answer is served, byte for byte.
    await daemon.start(database=DatabaseConfig(url=pg_url))
    upstream.fake.mode = "http500"
    status_code, headers, body = await send_form(daemon.base, "/api/key/activate", activate_form("alice-pc"))
    assert status_code == 200
    assert body == kept_body
    assert headers["X-License-Server-Source"] == "kept_stale"
    alice = Workstation(lambda: daemon.api, upstream.fake.public_key_xml, "alice-pc")
    licensed, message = await alice.activate(LICENSE)
    assert licensed is not None, message


async def test_refused_while_the_daemon_runs(
    daemon_factory: DaemonFactory, upstream: Upstream, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the daemon holding the state folder nothing is copied, and the admin is told to stop it."""
    daemon = await daemon_factory()
    await single_node_state(daemon, upstream)
    lock = await asyncio.to_thread(StateLock, daemon.config.state_dir)  # as a running daemon holds it
    try:
        status, _out, err = await move_in(daemon.config.state_dir, pg_url, capsys)
    finally:
        lock.release()
    assert status == 1
    assert "stop the daemon" in err
    # Refused before the schema was made: nothing was written.
    assert await asyncio.to_thread(rows, pg_url, "SELECT to_regclass('answers') IS NULL") == [(True,)]


async def test_second_node_answers_skipped(
    daemon_factory: DaemonFactory,
    upstream: Upstream,
    pg_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A node moving in after another keyed its answers differently: its ledger moves, its answers cannot."""
    daemon = await daemon_factory()
    await single_node_state(daemon, upstream)
    status, _, err = await move_in(daemon.config.state_dir, pg_url, capsys)
    assert status == 0, err
    upstream.fake.mode = "ok"
    await daemon.start(state_dir=tmp_path / "other-node")
    await single_node_state(daemon, upstream)
    argv = ["database", "move-in", "--set", f"state_dir={tmp_path / 'other-node'}"]
    argv += ["--set", f"database.url={pg_url}", "--set", "node.name=second"]
    status = await asyncio.to_thread(main, argv)
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "kept answers: 0 copied" in out
    assert "skipped" in out
    assert "another fingerprint key" in out
    assert await asyncio.to_thread(rows, pg_url, "SELECT count(DISTINCT node) FROM denials") == [(2,)]


async def test_a_ledger_from_before_intervals_were_kept_moves_in(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ledger file the version before made (no interval column) moves in; its denials have none."""
    from tests.test_plan import old_ledger

    await asyncio.to_thread(old_ledger, StateFolder(tmp_path).seats)
    status, out, err = await move_in(tmp_path, pg_url, capsys)
    assert status == 0, err
    assert "denials: 1" in out
    denials = "SELECT machine_code, floating_interval FROM denials"
    assert await asyncio.to_thread(rows, pg_url, denials) == [("m0", None)]
