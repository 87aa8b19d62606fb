"""The console in a real daemon process: own port, systemd credentials, no token where it should not be."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.admin_support import write_secret
from tests.conftest import LICENSE, PRODUCT, Upstream
from tests.test_process import DaemonProcess, free_port, ws

pytestmark = pytest.mark.slow

ADMIN = "process-admin-token-77c1e4b9a2d6f0c3e8a5b1d7"
CANARY = "canary-upstream-token-4b8e2f"


def start_config(tmp_path: Path, upstream: Upstream, admin_port: int) -> dict[str, object]:
    """A daemon configuration with the console on its own port."""
    return {
        "upstream": {"url": upstream.url, "timeout": "1s", "breaker": {"reset_after": "0.2s"}},
        "public_key": upstream.fake.public_key_xml,
        "state_dir": str(tmp_path / "state"),
        "log": {"format": "json"},
        "admin": {"listen": {"host": "127.0.0.1", "port": admin_port}},
    }


def log_events(process: DaemonProcess) -> list[dict[str, object]]:
    """The daemon's JSON log lines."""
    return [json.loads(line) for line in process.log_text().splitlines() if line.startswith("{")]


async def test_console_with_systemd_credentials(tmp_path: Path, upstream: Upstream) -> None:
    """Tokens from $CREDENTIALS_DIRECTORY; the console acts; the upstream token shows up nowhere."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    write_secret(credentials / "admin-token", ADMIN + "\n", 0o440)  # systemd's 0400 plus its ACL's mask
    write_secret(credentials / "upstream-token", CANARY + "\n", 0o400)
    upstream.fake.tokens.add(CANARY)
    admin_port = free_port()
    process = DaemonProcess(
        tmp_path, start_config(tmp_path, upstream, admin_port), {"CREDENTIALS_DIRECTORY": str(credentials)}
    )
    admin = f"http://127.0.0.1:{admin_port}"
    await process.start(also=[f"{admin}/healthz"])
    bearer = {"Authorization": f"Bearer {ADMIN}"}
    seen: list[str] = []
    try:
        license_key, message = await ws(process, upstream, "alice-1").activate(friendly_name="ALICE-LAPTOP")
        assert license_key is not None, message
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async with session.get(f"{process.base}/api/v1/status", headers=bearer) as r:
                assert (r.status, (await r.json())["result"]) == (403, 1)  # a workstation API refusal
            for _ in range(50):  # the ledger writes what it saw about once a second
                async with session.get(f"{admin}/api/v1/machines?q=alice", headers=bearer) as r:
                    machines = (await r.json())["machines"]
                if machines:
                    break
                await asyncio.sleep(0.1)
            assert machines[0]["friendly_name"] == "ALICE-LAPTOP"
            body = {"product_id": PRODUCT, "key": LICENSE, "machine_code": "lab-1", "friendly_name": "LAB-1"}
            async with session.post(f"{admin}/api/v1/activations", json=body, headers=bearer) as r:
                assert r.status == 200
                seen.append((await r.read()).decode())
            upstream.fake.mode = "http500"
            async with session.post(f"{admin}/api/v1/activations", json=body, headers=bearer) as r:
                seen.append(await r.text())
            upstream.fake.mode = "ok"
            body = {"product_id": PRODUCT, "key": LICENSE, "machine_code": "alice-1"}
            async with session.post(f"{admin}/api/v1/machines/deactivate", json=body, headers=bearer) as r:
                assert r.status == 200, await r.text()
                seen.append(await r.text())
            async with session.post(f"{admin}/login", data={"token": ADMIN, "name": "carol"}) as r:
                assert r.status == 200
                seen.append(await r.text())
            for path in ("/api/v1/audit?per_page=500", "/api/v1/status"):
                async with session.get(admin + path, headers=bearer) as r:
                    seen.append(await r.text())
        assert "alice-1" not in upstream.fake.license(PRODUCT, LICENSE).activations
    finally:
        process.kill(signal.SIGTERM)
        assert await process.wait() == 0
    events = log_events(process)
    listening = [e for e in events if e["event"] == "admin_listening"]
    assert listening
    assert listening[0]["address"] == f"http://127.0.0.1:{admin_port}/"
    assert listening[0]["token"] == "systemd credential admin-token"
    assert any(call.fields.get("token") == CANARY for call in upstream.fake.calls)
    assert CANARY not in "\n".join(seen)
    files = await asyncio.to_thread(lambda: [p for p in tmp_path.rglob("*") if p.is_file()])
    for path in files:
        if path.parent != credentials:
            content = await asyncio.to_thread(path.read_bytes)
            assert CANARY.encode() not in content, path
            assert ADMIN.encode() not in content, path


async def test_no_token_no_console(tmp_path: Path, upstream: Upstream) -> None:
    """Without an admin token the workstation side runs and the log says why the console does not."""
    admin_port = free_port()
    process = DaemonProcess(
        tmp_path, start_config(tmp_path, upstream, admin_port), {"CREDENTIALS_DIRECTORY": ""}
    )
    await process.start()
    try:
        license_key, message = await ws(process, upstream, "alice-1").activate()
        assert license_key is not None, message
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.get(f"http://127.0.0.1:{admin_port}/healthz")
    finally:
        process.kill(signal.SIGTERM)
        assert await process.wait() == 0
    (event,) = [e for e in log_events(process) if e["event"] == "admin_console_not_started"]
    assert "no admin token configured" in str(event["reason"])
