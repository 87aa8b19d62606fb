"""Slow and idle clients at scale against the daemon process: header deadline, connection cap, keep-alive.

The small version (five trickling clients, a cap of five) is TestProcessOperations in test_operations.py;
these run hundreds of connections while real workstations keep calling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import Upstream, send_form
from tests.test_operations import base_config
from tests.test_process import DaemonProcess, ws
from tests.test_proxy import activate_form

pytestmark = pytest.mark.slow

ATTACKERS = 360
ANSWER_WITHIN = 1.0  # seconds for a real workstation's call while the attack runs


@pytest.fixture(autouse=True)
def enough_descriptors() -> None:
    """Hundreds of client sockets in this process: raise the soft descriptor limit if it is low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def start_daemon(tmp_path: Path, upstream: Upstream, **listen: object) -> DaemonProcess:
    """A daemon process in front of the fake upstream with these `listen` settings."""
    proc = DaemonProcess(tmp_path, base_config(upstream, tmp_path))
    assert proc.config_path is not None
    data = yaml.safe_load(proc.config_path.read_text())
    data["listen"].update(listen)
    proc.config_path.write_text(yaml.safe_dump(data))
    await proc.start()
    return proc


@pytest.fixture
async def stopper() -> AsyncIterator[list[DaemonProcess]]:
    """Daemon processes to stop with SIGTERM (exit 0 expected) at the end of a test."""
    procs: list[DaemonProcess] = []
    yield procs
    for proc in procs:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill(signal.SIGTERM)
            assert await proc.wait() == 0


def open_fds(proc: DaemonProcess) -> int:
    """How many file descriptors the daemon process holds."""
    assert proc.proc is not None
    return len(list(Path(f"/proc/{proc.proc.pid}/fd").iterdir()))


async def hold(port: int, trickle: bool, stop: float) -> tuple[float, bytes]:
    """Connect and trickle header bytes (or idle) until the daemon closes; lifetime and bytes received.

    Gives up at monotonic time `stop` with whatever it has: a lifetime past the deadline fails the test.
    """
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        if trickle:
            writer.write(b"POST /api/key/activate HTTP/1.1\r\nHost: x\r\n")
        while time.monotonic() < stop:
            if trickle:
                writer.write(b"X")  # one more byte of a header line that never ends
            try:
                chunk = await asyncio.wait_for(reader.read(1024), 0.3)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            if not chunk:
                break
            received += chunk
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return time.monotonic() - started, received


class TestSlowloris:
    """Hundreds of slow or idle connections cost the daemon nothing it cannot afford."""

    @pytest.mark.timeout(90)
    async def test_header_deadline_at_scale(
        self, tmp_path: Path, upstream: Upstream, stopper: list[DaemonProcess]
    ) -> None:
        """Hundreds of trickling and idle clients are cut off at the deadline; workstations are answered."""
        header_timeout = 1.0
        proc = await start_daemon(
            tmp_path, upstream, max_connections=2000, header_timeout=f"{header_timeout}s"
        )
        stopper.append(proc)
        deadline = time.monotonic() + 12  # well short of keepalive_timeout (30 s), which would also close
        attack_until = time.monotonic() + 3 * header_timeout
        lifetimes: list[tuple[float, bytes]] = []

        async def attacker(n: int) -> None:
            while time.monotonic() < attack_until:  # every closed connection is opened again at once
                lifetimes.append(await hold(proc.port, trickle=n % 2 == 0, stop=deadline))

        attack = [asyncio.ensure_future(attacker(n)) for n in range(ATTACKERS)]
        await asyncio.sleep(0.3)
        latencies = []
        alice = ws(proc, upstream, "alice-pc")
        try:
            while time.monotonic() < attack_until:
                started = time.monotonic()
                license_key, message = await alice.activate()
                latencies.append(time.monotonic() - started)
                assert license_key is not None, message
                started = time.monotonic()
                status, headers, _ = await send_form(proc.base, "/api/key/activate", activate_form())
                latencies.append(time.monotonic() - started)
                assert status == 200
                assert headers["X-License-Server-Source"] == "forwarded"
            peak_fds = open_fds(proc)
        finally:
            await asyncio.gather(*attack)
        print(
            f"{len(lifetimes)} slow connections, longest {max(t for t, _ in lifetimes):.2f} s; "
            f"{len(latencies)} calls, slowest {max(latencies):.3f} s; daemon fds {peak_fds}"
        )
        assert len(lifetimes) >= 2 * ATTACKERS  # each attacker was cut off at least twice
        assert all(received == b"" for _, received in lifetimes), "closed without an answer"
        assert max(t for t, _ in lifetimes) <= header_timeout + 1.5
        assert len(latencies) >= 4
        assert max(latencies) <= ANSWER_WITHIN, latencies

    @pytest.mark.timeout(90)
    async def test_connection_cap_at_scale(
        self, tmp_path: Path, upstream: Upstream, stopper: list[DaemonProcess]
    ) -> None:
        """Over max_connections each connection gets the JSON 503; the daemon's descriptors stay bounded."""
        cap = 300
        proc = await start_daemon(tmp_path, upstream, max_connections=cap, header_timeout="30s")
        stopper.append(proc)
        before = open_fds(proc)
        idle = [await asyncio.open_connection("127.0.0.1", proc.port) for _ in range(cap)]
        await asyncio.sleep(0.2)
        over = [await asyncio.open_connection("127.0.0.1", proc.port) for _ in range(100)]
        answers = await asyncio.gather(*(asyncio.wait_for(reader.read(), 5) for reader, _ in over))
        peak = open_fds(proc)
        status, _, body = await send_form(proc.base, "/api/key/activate", activate_form())
        for _, writer in over:
            writer.close()
        print(f"daemon fds: {before} before, {peak} with {cap} held and 100 more refused")
        for answer in answers:
            head, _, payload = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503"), answer[:80]
            assert json.loads(payload)["result"] == 1
        assert status == 503
        assert json.loads(body)["result"] == 1
        assert peak <= cap + before + 8
        for _, writer in idle[:10]:
            writer.close()
        await asyncio.sleep(0.3)
        status, _, _ = await send_form(proc.base, "/api/key/activate", activate_form())
        assert status == 200, "a freed slot serves workstations again"
        for _, writer in idle[10:]:
            writer.close()

    @pytest.mark.timeout(60)
    async def test_idle_keepalive_closed(
        self, tmp_path: Path, upstream: Upstream, stopper: list[DaemonProcess]
    ) -> None:
        """Kept-alive connections idle past keepalive_timeout are closed; a busy one stays open."""
        keepalive = 1.0
        proc = await start_daemon(tmp_path, upstream, keepalive_timeout=f"{keepalive}s", header_timeout="30s")
        stopper.append(proc)
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"

        async def one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)

        async def idle_after_request() -> float:
            reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
            await one_request(reader, writer)
            answered = time.monotonic()
            rest = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert rest == b""
            return time.monotonic() - answered

        idle = [asyncio.ensure_future(idle_after_request()) for _ in range(200)]
        reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
        for _ in range(8):  # busy for 3 s, three keep-alive periods: never idle long enough to be closed
            await one_request(reader, writer)
            await asyncio.sleep(keepalive * 0.4)
        writer.close()
        closed_after = await asyncio.gather(*idle)
        print(
            f"200 idle keep-alive connections closed after {min(closed_after):.2f}-{max(closed_after):.2f} s"
        )
        assert min(closed_after) >= keepalive * 0.8
        assert max(closed_after) <= keepalive + 1.5
