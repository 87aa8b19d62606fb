"""One address for workstations: the drain on SIGTERM, and three nodes behind real HAProxy losing one."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest
import yaml

from tests.admin_support import write_secret
from tests.conftest import Upstream
from tests.haproxy import HAProxy
from tests.test_nodes import NAMES, Nodes
from tests.test_process import DaemonProcess, free_port
from tests.test_proxy import activate_form

pytestmark = pytest.mark.slow

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
MACHINES = ("ws-0", "ws-1", "ws-2")  # the test license allows 3 machines


def set_drain(proc: DaemonProcess, drain: str) -> None:
    """Give a daemon process (tests/test_process.py writes shutdown_drain: 0s) a drain of its own."""
    assert proc.config_path is not None
    data = yaml.safe_load(proc.config_path.read_text())
    data["shutdown_drain"] = drain
    proc.config_path.write_text(yaml.safe_dump(data))


async def readyz(session: aiohttp.ClientSession, base: str) -> int:
    """The status /readyz answers with."""
    async with session.get(f"{base}/readyz") as response:
        return response.status


async def until_draining(session: aiohttp.ClientSession, base: str, since: float) -> float:
    """Wait until /readyz answers 503; seconds from `since` (a monotonic time) to that answer."""
    while time.monotonic() - since < 5:
        if await readyz(session, base) == 503:
            return time.monotonic() - since
        await asyncio.sleep(0.005)
    raise AssertionError("/readyz did not turn 503")


async def sdk_call(session: aiohttp.ClientSession, base: str, machine: str) -> tuple[int, int | None]:
    """An Activate as the SDK sends it; the status and the answer's `result`."""
    body = urlencode(activate_form(machine=machine))
    async with session.post(f"{base}/api/key/activate", data=body, headers=FORM) as response:
        answer = await response.read()
        result = json.loads(answer).get("result") if response.status == 200 else None
        return response.status, result


class TestDrain:
    """SIGTERM: /readyz says 503 at once, calls are answered for shutdown_drain, then the daemon stops."""

    async def test_readyz_503_at_once_calls_answered_then_exit(
        self, tmp_path: Path, upstream: Upstream
    ) -> None:
        """SIGTERM: /readyz 503 within 100 ms, SDK calls still 200; exit 0 after about the drain."""
        drain = 1.5
        proc = daemon(tmp_path, upstream, f"{drain}s")
        console = console_on(proc, tmp_path)
        await proc.start(also=[f"{console}/healthz"])
        async with aiohttp.ClientSession() as session:
            assert await readyz(session, proc.base) == 200
            assert await readyz(session, console) == 200
            signalled = time.monotonic()
            proc.kill(signal.SIGTERM)
            assert await until_draining(session, proc.base, signalled) < 0.1
            assert await readyz(session, console) == 503  # the admin port says the same
            status, result = await sdk_call(session, proc.base, "drain-ws")
            assert (status, result) == (200, 0)
            async with session.get(f"{proc.base}/healthz") as response:
                assert response.status == 200  # alive: only readiness changes
        assert await proc.wait() == 0
        stopped = time.monotonic() - signalled
        assert drain <= stopped < drain + 1.5, stopped
        lines = [json.loads(line) for line in proc.log_text().splitlines() if line.startswith("{")]
        assert [line["seconds"] for line in lines if line.get("event") == "draining"] == [drain]

    async def test_second_signal_stops_at_once(self, tmp_path: Path, upstream: Upstream) -> None:
        """A second SIGTERM during a long drain ends it: the daemon stops as it would without one."""
        proc = daemon(tmp_path, upstream, "60s")
        await proc.start()
        async with aiohttp.ClientSession() as session:
            proc.kill(signal.SIGTERM)
            await until_draining(session, proc.base, time.monotonic())
        signalled = time.monotonic()
        proc.kill(signal.SIGINT)
        assert await proc.wait() == 0
        assert time.monotonic() - signalled < 2


def console_on(proc: DaemonProcess, tmp_path: Path) -> str:
    """Give a daemon process the admin console on a port of its own; the console's base URL."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    write_secret(credentials / "admin-token", "drain-admin-token-5c2f9e81b7d34a60\n", 0o400)
    proc.env["CREDENTIALS_DIRECTORY"] = str(credentials)
    port = free_port()
    assert proc.config_path is not None
    data = yaml.safe_load(proc.config_path.read_text())
    data["admin"] = {"listen": {"host": "127.0.0.1", "port": port}}
    proc.config_path.write_text(yaml.safe_dump(data))
    return f"http://127.0.0.1:{port}"


def daemon(tmp_path: Path, upstream: Upstream, drain: str) -> DaemonProcess:
    """One daemon process in front of the fake upstream, with the given shutdown_drain."""
    return DaemonProcess(
        tmp_path,
        {
            "upstream": {"url": upstream.url, "timeout": "1s"},
            "public_key": upstream.fake.public_key_xml,
            "state_dir": str(tmp_path / "state"),
            "log": {"format": "json"},
            "shutdown_drain": drain,
        },
    )


@dataclass(slots=True)
class Sent:
    """One SDK-shaped call the load generator made through HAProxy, and how it ended."""

    sent: float  # monotonic
    done: float = 0.0
    status: int = 0  # 0: no HTTP answer at all
    result: int | None = None
    request_id: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the workstation got its licence: 200 with result 0."""
        return self.status == 200 and self.result == 0


class Load:
    """Steady SDK-shaped calls (Activate and GetKey in turn) through one address, at a fixed rate."""

    def __init__(self, base: str, rate: float) -> None:
        self.base = base
        self.rate = rate
        self.calls: list[Sent] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Send calls on schedule (not waiting for answers: workstations do not) until stopped."""
        # A call never waits for a free connection here: the generator's own limits are not the test's.
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            tasks: list[asyncio.Task[None]] = []
            started = time.monotonic()
            index = 0
            while not self._stop.is_set():
                tasks.append(asyncio.ensure_future(self._call(session, index)))
                index += 1
                delay = started + index / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await asyncio.gather(*tasks)

    def stop(self) -> None:
        """Send no more calls; run() returns once those sent are answered."""
        self._stop.set()

    async def _call(self, session: aiohttp.ClientSession, index: int) -> None:
        """One call: Activate for one of the license's machines, or GetKey."""
        machine = MACHINES[index % len(MACHINES)]
        form = activate_form(machine=machine)
        path = "/api/key/activate"
        if index % 2:
            form = {k: v for k, v in form.items() if k != "MachineCode"}
            path = "/api/key/getkey"
        call = Sent(time.monotonic())
        self.calls.append(call)
        try:
            async with session.post(self.base + path, data=urlencode(form), headers=FORM) as response:
                body = await response.read()
                call.status = response.status
                call.request_id = response.headers.get("X-Request-Id")
                if response.status == 200:
                    call.result = json.loads(body).get("result")
                else:
                    call.error = body[:200].decode(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            call.error = repr(exc)
        call.done = time.monotonic()

    @property
    def failed(self) -> list[Sent]:
        """Calls a workstation would have seen fail."""
        return [call for call in self.calls if not call.ok]


@pytest.fixture
async def behind_haproxy(
    tmp_path: Path, upstream: Upstream, pg_url: str
) -> AsyncIterator[tuple[Nodes, HAProxy]]:
    """Three nodes on one database, each draining 3 s on SIGTERM (the default), behind real HAProxy."""
    group = Nodes(tmp_path, upstream, pg_url)
    for name in NAMES:
        set_drain(group[name], "3s")
    balancer = HAProxy(tmp_path, {name: f"127.0.0.1:{group[name].port}" for name in NAMES})
    try:
        await group.start()
        await balancer.start()
        for name in NAMES:
            await balancer.wait_for(name, "UP")
        yield group, balancer
    finally:
        await balancer.stop()
        await stop_at_once(group)


async def stop_at_once(group: Nodes) -> None:
    """Stop every node without its drain: SIGTERM, then a second one, which ends the drain."""
    running = [p for p in group.procs.values() if p.proc is not None and p.proc.poll() is None]
    for proc in running:
        proc.kill(signal.SIGTERM)
    await asyncio.sleep(0.3)
    for proc in running:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill(signal.SIGTERM)
    for proc in running:
        await proc.wait()


def summary(load: Load) -> str:
    """The failed calls, for an assertion's message."""
    failed = load.failed
    shown = [(round(c.sent, 3), c.status, c.result, c.error) for c in failed[:10]]
    return f"{len(failed)} of {len(load.calls)} failed: {shown}"


class TestBehindHAProxy:
    """deploy/haproxy.cfg with real HAProxy in front of three real nodes under steady SDK-shaped load."""

    async def test_rolling_restart_fails_no_call(
        self, behind_haproxy: tuple[Nodes, HAProxy], upstream: Upstream
    ) -> None:
        """Each node in turn: SIGTERM, exit 0, start again, back in HAProxy; zero failed calls throughout."""
        group, balancer = behind_haproxy
        load = Load(balancer.base, rate=80)
        running = asyncio.ensure_future(load.run())
        await asyncio.sleep(1)
        for name in NAMES:
            proc = group[name]
            proc.kill(signal.SIGTERM)
            assert await proc.wait() == 0
            assert "draining" in proc.log_text()
            await proc.start("/readyz")
            await balancer.wait_for(name, "UP")
        await asyncio.sleep(1)
        load.stop()
        await running
        slowest = max(c.done - c.sent for c in load.calls)
        print(f"rolling restart: {len(load.calls)} calls, {len(load.failed)} failed, slowest {slowest:.3f} s")
        assert len(load.calls) > 80 * 10  # three drains of 3 s and more
        assert load.failed == [], summary(load)

    async def test_kill_9_costs_at_most_a_few_calls_and_loses_none_from_the_trail(
        self, behind_haproxy: tuple[Nodes, HAProxy], upstream: Upstream
    ) -> None:
        """kill -9 of one at 200 calls/s: <= 0.1 % fail, none 3 s after; the trail has every answer."""
        group, balancer = behind_haproxy
        victim = group["node-b"]
        load = Load(balancer.base, rate=200)
        running = asyncio.ensure_future(load.run())
        await asyncio.sleep(3)
        killed = time.monotonic()
        victim.kill(signal.SIGKILL)
        assert await victim.wait() == -signal.SIGKILL
        await asyncio.sleep(7 - (time.monotonic() - killed))
        load.stop()
        await running
        failed = load.failed
        late = [c.done - killed for c in failed if c.done - killed > 3]
        last = max((c.done - killed for c in failed), default=None)
        slowest = max(c.done - c.sent for c in load.calls)
        print(
            f"kill: {len(load.calls)} calls, {len(failed)} failed, last {last} s after; slowest {slowest:.3f}"
        )
        assert len(load.calls) > 200 * 9
        assert len(failed) <= len(load.calls) / 1000, summary(load)
        assert late == [], summary(load)
        # Back again, the killed node ships what it wrote before it died; every answered call is in the trail.
        await victim.start("/readyz")
        answered = {c.request_id for c in load.calls if c.status == 200}
        assert None not in answered
        deadline = time.monotonic() + 15
        while True:
            found = await asyncio.to_thread(group.cli, "node-a", "audit", "search", "--format", "json")
            assert found.returncode == 0, found.stderr
            trail = {json.loads(line).get("request_id") for line in found.stdout.splitlines() if line.strip()}
            missing = answered - trail
            if not missing:
                break
            assert time.monotonic() < deadline, f"{len(missing)} answered calls not in the trail"
            await asyncio.sleep(0.5)
        verified = await asyncio.to_thread(group.cli, "node-c", "audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
