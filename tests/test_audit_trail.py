"""The audit trail as the daemon writes it: one record per answered call, chained, rotated, never lost."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest

from license_server.audit import chain
from license_server.audit.verify import verify
from tests.conftest import LICENSE, PRODUCT, TOKEN, Clock, Daemon, Upstream, Workstation
from tests.test_proxy import activate_form, post

DaemonFactory = Callable[..., Awaitable[Daemon]]
MakeWorkstation = Callable[..., Workstation]


def records(folder: Path) -> list[dict[str, Any]]:
    """Every record of the trail in chain order."""
    found: list[dict[str, Any]] = []
    for audit_file in chain.list_files(folder):
        found.extend(json.loads(line) for line in audit_file.path.read_bytes().splitlines())
    return found


def calls(folder: Path) -> list[dict[str, Any]]:
    """The call records of the trail."""
    return [r for r in records(folder) if r["type"] == chain.CALL]


async def read_trail(daemon: Daemon) -> list[dict[str, Any]]:
    """Stop the daemon (flushing the trail) and return its call records."""
    await daemon.stop()
    return await asyncio.to_thread(calls, daemon.config.audit_dir)


class TestRecords:
    """One record per answered call, whatever the answer, with the fields admins need."""

    async def test_every_answer_recorded(
        self, daemon: Daemon, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """Forwarded, refused, failed, stale and malformed calls each leave exactly one record."""
        answered: list[str] = []

        async def send(
            path: str, body: bytes | str | dict[str, str], headers: dict[str, str] | None = None
        ) -> None:
            status, response_headers, _ = await post(daemon, path, body, headers)
            assert status
            answered.append(response_headers["X-Request-Id"])

        await send("/api/key/activate", activate_form(FriendlyName="ALICE-LAPTOP"))
        await send("/api/key/activate", activate_form(key="NOPE-NOPE"))  # upstream refusal
        await send("/api/key/createkey", {"token": TOKEN})  # not allowlisted
        await send("/api/key/activate", b"token=a&token=b")  # malformed
        await send("/api/key/activate", b"x=" + b"a" * 70_000)  # too large
        await send("/nowhere", b"")  # not an API path
        upstream.fake.mode = "http500"
        await send("/api/key/activate", activate_form(FriendlyName="ALICE-LAPTOP"))  # kept answer, stale
        await send("/api/key/activate", activate_form(machine="bob-pc"))  # upstream failed, nothing kept
        trail = await read_trail(daemon)
        assert [r["request_id"] for r in trail] == answered
        assert [r["action"] for r in trail] == [
            "forwarded",
            "forwarded",
            "refused",
            "refused",
            "refused",
            "refused",
            "kept_stale",
            "upstream_failed",
        ]
        assert [r["status"] for r in trail] == [200, 200, 403, 400, 413, 404, 200, 502]
        first = trail[0]
        assert first["key"] == LICENSE
        assert first["product_id"] == str(PRODUCT)
        assert first["machine"] == "machine-a"
        assert first["friendly_name"] == "ALICE-LAPTOP"
        assert first["client"] == "127.0.0.1"
        assert first["api_method"] == "key/activate"
        assert (first["upstream_status"], first["result"]) == (200, 0)
        assert first["bytes"] > 0
        assert trail[1]["message"] == "Could not find the key."
        assert trail[6]["failure"] == "the licensing service failed with HTTP 500"
        assert TOKEN not in json.dumps(trail)

    async def test_sdk_none_friendly_name(self, daemon: Daemon, workstation: MakeWorkstation) -> None:
        """The Python SDK's unset friendly name ("None") is recorded as empty."""
        await workstation("alice-pc").activate()
        trail = await read_trail(daemon)
        assert trail[0]["friendly_name"] == ""

    async def test_chain_verifies_across_restarts(
        self, daemon: Daemon, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """Start, calls, stop, start again: one unbroken chain that verifies."""
        await workstation("alice-pc").activate()
        await daemon.restart()
        await workstation("alice-pc").get_key()
        await daemon.stop()
        trail = await asyncio.to_thread(records, daemon.config.audit_dir)
        assert [r["type"] for r in trail] == ["start", "call", "stop", "start", "call", "stop"]
        assert [r["seq"] for r in trail] == list(range(1, 7))
        report = await asyncio.to_thread(verify, daemon.config.audit_dir)
        assert report.ok, report.problem


class TestCrashes:
    """A record torn by a crash is cut on start and explained; the chain goes on."""

    async def test_torn_record_recovered(self, daemon: Daemon, workstation: MakeWorkstation) -> None:
        """A half-written last line is cut, a recovered record says so, and verify calls it a crash."""
        await workstation("alice-pc").activate()
        await daemon.stop()
        folder = daemon.config.audit_dir
        last = (await asyncio.to_thread(chain.list_files, folder))[-1].path
        torn = b'{"seq":99,"time":"2026-'
        await asyncio.to_thread(append_bytes, last, torn)
        await daemon.start()
        await workstation("alice-pc").activate()
        await daemon.stop()
        trail = await asyncio.to_thread(records, folder)
        recovered = [r for r in trail if r["type"] == "recovered"]
        assert len(recovered) == 1
        assert recovered[0]["torn_bytes"] == len(torn)
        report = await asyncio.to_thread(verify, folder)
        assert report.ok, report.problem
        assert len(report.recovered) == 1


class TestRotation:
    """Rotation by size splits the trail across files without losing or repeating a record."""

    async def test_rotation_under_load(self, daemon_factory: DaemonFactory) -> None:
        """Hundreds of concurrent calls over a small rotation size: every answer recorded exactly once."""
        daemon = await daemon_factory("audit.rotate_bytes=2KiB")
        form = urlencode(activate_form())

        async def one(session: aiohttp.ClientSession) -> str:
            async with session.post(
                f"{daemon.base}/api/key/activate",
                data=form,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ) as response:
                await response.read()
                return response.headers["X-Request-Id"]

        async with aiohttp.ClientSession() as session:
            answered = await asyncio.gather(*(one(session) for _ in range(300)))
        await daemon.stop()
        folder = daemon.config.audit_dir
        files = await asyncio.to_thread(chain.list_files, folder)
        assert len(files) > 5
        trail = await asyncio.to_thread(records, folder)
        assert [r["seq"] for r in trail] == list(range(1, len(trail) + 1))
        ids = [r["request_id"] for r in trail if r["type"] == "call"]
        assert sorted(ids) == sorted(answered)
        report = await asyncio.to_thread(verify, folder)
        assert report.ok, report.problem
        assert report.files == len(files)

    async def test_daily_rotation_and_retention(
        self, daemon_factory: DaemonFactory, upstream: Upstream, clock: Clock
    ) -> None:
        """A new UTC day starts a new file; files past the retention are removed, and that is recorded."""
        daemon = await daemon_factory("audit.retention=2d")
        ws = Workstation(lambda: daemon.api, upstream.fake.public_key_xml, "alice-pc")
        for _ in range(3):
            await ws.activate()
            clock.advance(86400)
            await ws.activate()
        folder = daemon.config.audit_dir
        assert len(await asyncio.to_thread(chain.list_files, folder)) == 4  # days 0, 1, 2 and 3
        clock.advance(86400 + 60)
        await daemon.restart()  # retention runs at start: days 0 and 1 go; day 4 starts a file
        await daemon.stop()
        files = await asyncio.to_thread(chain.list_files, folder)
        assert len(files) == 3
        trail = await asyncio.to_thread(records, folder)
        retention = [r for r in trail if r["type"] == "retention"]
        assert len(retention) == 1
        assert len(retention[0]["removed"]) == 2
        report = await asyncio.to_thread(verify, folder)
        assert report.ok, report.problem
        assert report.retention_start == retention[0]["last_seq"] + 1


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs the test can fill up, to make writes fail the way a full disk does."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def append_bytes(path: Path, data: bytes) -> None:
    """Append raw bytes to a file, as a crash mid-write leaves them."""
    with path.open("ab") as handle:
        handle.write(data)


def fill(folder: Path) -> Path:
    """Fill the file system under `folder` to the last byte; returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


@pytest.fixture
async def full_disk_daemon(
    small_disk: Path, daemon_factory: DaemonFactory, request: pytest.FixtureRequest
) -> tuple[Daemon, Path]:
    """A daemon whose audit trail lives on a small disk, with on_failure set by the test's parameter."""
    daemon = await daemon_factory(f"audit.path={small_disk / 'audit'}", f"audit.on_failure={request.param}")
    return daemon, small_disk


async def health(daemon: Daemon) -> dict[str, Any]:
    """The daemon's /status document."""
    async with aiohttp.ClientSession() as session, session.get(f"{daemon.base}/status") as response:
        assert response.status == 200
        result: dict[str, Any] = await response.json()
        return result


async def monitoring(daemon: Daemon, path: str) -> tuple[int, Any]:
    """A monitoring endpoint's status and JSON document."""
    async with aiohttp.ClientSession() as session, session.get(f"{daemon.base}{path}") as response:
        return response.status, await response.json()


async def scrape(daemon: Daemon) -> str:
    """The daemon's /metrics text."""
    async with aiohttp.ClientSession() as session, session.get(f"{daemon.base}/metrics") as response:
        assert response.status == 200
        return await response.text()


class TestDiskFull:
    """When the trail cannot be written the configured behaviour holds, shows in /status, and heals."""

    @pytest.mark.parametrize("full_disk_daemon", ["continue", "refuse"], indirect=True)
    async def test_alive_while_status_degraded(self, full_disk_daemon: tuple[Daemon, Path]) -> None:
        """A full disk leaves /healthz alive and /readyz ready; /status and the metrics show it, then heal."""
        daemon, disk = full_disk_daemon
        filler = await asyncio.to_thread(fill, disk)
        for _ in range(200):  # the open file's last page still takes a few records
            await post(daemon, "/api/key/activate", activate_form())
            if not (await health(daemon))["audit"]["writable"]:
                break
        await post(daemon, "/api/key/activate", activate_form())
        held = 0 if daemon.config.audit.on_failure == "refuse" else 2
        assert await monitoring(daemon, "/healthz") == (200, {"status": "alive"})
        assert await monitoring(daemon, "/readyz") == (200, {"status": "ready"})
        state = await health(daemon)
        assert state["status"] == "degraded"
        assert state["audit"]["writable"] is False
        assert "No space left" in state["audit"]["error"]
        assert state["audit"]["backlog"] == held
        metrics = await scrape(daemon)
        assert "license_server_audit_writable 0.0" in metrics
        assert f"license_server_audit_backlog {held}.0" in metrics
        await asyncio.to_thread(filler.unlink)
        for _ in range(40):
            if (await health(daemon))["audit"]["writable"]:
                break
            await asyncio.sleep(0.1)
        state = await health(daemon)
        assert (state["status"], state["audit"]["backlog"]) == ("ok", 0)
        metrics = await scrape(daemon)
        assert "license_server_audit_writable 1.0" in metrics
        assert "license_server_audit_backlog 0.0" in metrics

    @pytest.mark.parametrize("full_disk_daemon", ["continue"], indirect=True)
    async def test_continue_keeps_answering(self, full_disk_daemon: tuple[Daemon, Path]) -> None:
        """on_failure=continue: calls are answered, records wait in memory and land once space is back."""
        daemon, disk = full_disk_daemon
        filler = await asyncio.to_thread(fill, disk)
        answered = []
        # The open file's last page still takes a few records; the trail fails once it is used up.
        for _ in range(200):
            status, headers, _ = await post(daemon, "/api/key/activate", activate_form())
            assert status == 200
            answered.append(headers["X-Request-Id"])
            if not (await health(daemon))["audit"]["writable"]:
                break
        for _ in range(3):
            status, headers, _ = await post(daemon, "/api/key/activate", activate_form())
            assert status == 200
            answered.append(headers["X-Request-Id"])
        state = await health(daemon)
        assert state["status"] == "degraded"
        assert state["audit"]["writable"] is False
        assert state["audit"]["backlog"] == 4
        await asyncio.to_thread(filler.unlink)
        for _ in range(40):
            if (await health(daemon))["audit"]["writable"]:
                break
            await asyncio.sleep(0.1)
        status, headers, _ = await post(daemon, "/api/key/activate", activate_form())
        answered.append(headers["X-Request-Id"])
        trail = await read_trail(daemon)
        assert [r["request_id"] for r in trail] == answered
        report = await asyncio.to_thread(verify, daemon.config.audit_dir)
        assert report.ok, report.problem

    @pytest.mark.parametrize("full_disk_daemon", ["refuse"], indirect=True)
    async def test_refuse_answers_503(
        self, full_disk_daemon: tuple[Daemon, Path], upstream: Upstream
    ) -> None:
        """on_failure=refuse: calls get 503 and are not forwarded; after recovery a gap record counts them."""
        daemon, disk = full_disk_daemon
        filler = await asyncio.to_thread(fill, disk)
        for _ in range(200):  # the open file's last page still takes a few records
            status, _, _ = await post(daemon, "/api/key/activate", activate_form())
            if status == 503:  # this call was forwarded, but its record could not be written
                break
        assert status == 503
        forwarded = len(upstream.fake.calls)
        for _ in range(3):
            status, _, body = await post(daemon, "/api/key/activate", activate_form())
            assert status == 503
            assert "audit trail" in json.loads(body)["message"]
        assert len(upstream.fake.calls) == forwarded, "a refused call must not reach upstream"
        await asyncio.to_thread(filler.unlink)
        for _ in range(40):
            if (await health(daemon))["audit"]["writable"]:
                break
            await asyncio.sleep(0.1)
        status, _, _ = await post(daemon, "/api/key/activate", activate_form())
        assert status == 200
        await daemon.stop()
        trail = await asyncio.to_thread(records, daemon.config.audit_dir)
        gaps = [r for r in trail if r["type"] == "gap"]
        assert [g["lost"] for g in gaps] == [4]
        report = await asyncio.to_thread(verify, daemon.config.audit_dir)
        assert report.ok, report.problem


class TestFailureDocumented:
    """The docs send admins where a failing trail shows, as TestDiskFull pins the daemon's side."""

    def test_docs_point_to_status_and_metrics(self) -> None:
        """The failure paragraph names /status and the audit metrics, and says /healthz stays alive."""
        docs = Path(__file__).resolve().parent.parent / "docs"
        trail = (docs / "audit-trail.md").read_text(encoding="utf-8")
        paragraph = trail.split("**When the trail cannot be written**", 1)[1].split("\n\n", 1)[0]
        assert "the backlog in `/status`" in paragraph
        assert "`license_server_audit_writable 0`" in paragraph
        assert "`/healthz` stays `alive`" in paragraph
        operations = (docs / "operations.md").read_text(encoding="utf-8")
        healthz = next(line for line in operations.splitlines() if line.startswith("| `GET /healthz` |"))
        assert "also while the audit trail cannot be written" in healthz
