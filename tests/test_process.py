"""The daemon as customer IT runs it: a real process, killed, restarted and stopped with signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest
import yaml

from license_server.audit import chain
from license_server.audit.verify import read_checkpoints, verify
from tests.conftest import CHILDREN, LICENSE, PRODUCT, TOKEN, Upstream, Workstation

pytestmark = pytest.mark.slow


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class DaemonProcess:
    """`python -m license_server serve` in a child process, with its log in a file."""

    def __init__(
        self, tmp_path: Path, config: dict[str, object] | None, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.tmp_path = tmp_path
        self.log_path = tmp_path / "daemon.log"
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = tmp_path / "config.yaml"
            self.config_path.write_text(
                # shutdown_drain 0s: stopping takes no 3 s here; tests/test_failover.py drains for real
                yaml.safe_dump(
                    {"shutdown_drain": "0s", **config, "listen": {"host": "127.0.0.1", "port": self.port}}
                )
            )
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.scheme = "http"
        self.tls: ssl.SSLContext | None = None

    async def start(self, path: str = "/healthz", also: Sequence[str] = ()) -> float:
        """Start the process and wait until `path` answers 200; seconds from spawn to that answer.

        `also` are further URLs to wait for, such as the console's on its own port: the daemon opens that
        listener after the workstation one.
        """
        spawned = self.spawn()
        deadline = spawned + 15
        assert self.proc is not None
        waiting = [f"{self.base}{path}", *also]
        answered = 0.0
        async with aiohttp.ClientSession() as session:
            while waiting and time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log_path.read_text()
                try:
                    async with session.get(waiting[0], ssl=self.tls or True) as response:
                        if response.status == 200:
                            answered = answered or time.monotonic() - spawned
                            waiting.pop(0)
                            continue
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.01)
        if waiting:
            raise AssertionError(f"daemon did not answer {waiting[0]}:\n{self.log_path.read_text()}")
        return answered

    def spawn(self) -> float:
        """Start the process without waiting for it; the monotonic time it was started at."""
        args = [sys.executable, "-m", "license_server", "serve"]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=self.env)
        CHILDREN.append(self.proc)
        return started

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send a signal to the daemon."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self) -> int:
        """Wait for the process to exit and return its exit code."""
        assert self.proc is not None
        return await asyncio.to_thread(self.proc.wait, 15)

    @property
    def base(self) -> str:
        """Base URL of the daemon."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        """Everything the daemon logged so far."""
        return self.log_path.read_text()


@pytest.fixture
async def process(tmp_path: Path, upstream: Upstream) -> AsyncIterator[DaemonProcess]:
    """A daemon process configured in front of the fake upstream."""
    proc = DaemonProcess(
        tmp_path,
        {
            "upstream": {"url": upstream.url, "timeout": "1s", "breaker": {"reset_after": "0.2s"}},
            "public_key": upstream.fake.public_key_xml,
            "state_dir": str(tmp_path / "state"),
            "log": {"format": "json"},
        },
    )
    await proc.start()
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        proc.kill()
        await proc.wait()


def ws(process: DaemonProcess, upstream: Upstream, machine: str, token: str = TOKEN) -> Workstation:
    """An SDK workstation pointed at the daemon process."""
    return Workstation(lambda: f"{process.base}/api/", upstream.fake.public_key_xml, machine, token)


class TestProcess:
    """Signals and restarts of a real daemon process."""

    async def test_kill9_then_restart_during_outage(self, process: DaemonProcess, upstream: Upstream) -> None:
        """An answer given just before kill -9 is served after a restart while upstream is unreachable."""
        alice = ws(process, upstream, "alice-pc")
        first, message = await alice.activate()
        assert first is not None, message
        process.kill(signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL
        await upstream.stop()
        await process.start()
        again, message = await alice.activate()
        assert again is not None, message
        assert again.raw_response.license_key == first.raw_response.license_key
        license_key, message = await ws(process, upstream, "bob-pc").activate()
        assert license_key is None
        assert "could not be reached" in message

    async def test_sigterm_finishes_in_flight_call(self, process: DaemonProcess, upstream: Upstream) -> None:
        """SIGTERM stops accepting, lets the call in flight finish, and exits 0."""
        upstream.fake.delay = 0.6
        call = asyncio.ensure_future(ws(process, upstream, "alice-pc").activate())
        await asyncio.sleep(0.3)
        process.kill(signal.SIGTERM)
        license_key, message = await call
        assert license_key is not None, message
        assert await process.wait() == 0
        events = [
            json.loads(line)["event"] for line in process.log_text().splitlines() if line.startswith("{")
        ]
        assert events[-1] == "stopped"
        assert "state_flushed" in events

    async def test_token_never_written(self, process: DaemonProcess, upstream: Upstream) -> None:
        """A canary token in forms, queries, headers and bad requests appears in no log, metric or file."""
        canary = "canary-7f3e9a1c5b"
        upstream.fake.tokens.add(canary)
        await ws(process, upstream, "alice-pc", canary).activate()
        await ws(process, upstream, "alice-pc", canary).get_key()
        async with aiohttp.ClientSession() as session:
            query = f"token={canary}&ProductId={PRODUCT}&Key={LICENSE}&Sign=true&SignMethod=1"
            async with session.get(f"{process.base}/api/key/getkey?{query}") as r:
                assert r.status == 200
            async with session.get(f"{process.base}/api/key/createkey?{query}") as r:
                assert r.status == 403
            async with session.post(
                f"{process.base}/api/key/activate",
                data=f"token={canary}&token={canary}",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ) as r:
                assert r.status == 400
            async with session.post(
                f"{process.base}/api/key/getkey?{query}",
                headers={"Authorization": f"Bearer {canary}", "Cookie": f"t={canary}", "X-Token": canary},
            ) as r:
                assert r.status == 200
        # Requests aiohttp's parser refuses, before any handler runs.
        for broken in (
            f"POST /api/key/activate?token={canary} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            "Content-Length: 5\r\n\r\nabcde",
            f"GET /api/key/getkey?token={canary} HTTP/1.1\r\nHost: x\x00\r\nX-T: {canary}\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
            writer.write(broken.encode())
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert answer.split(b" ", 2)[1] == b"400", answer[:40]
            assert canary.encode() not in answer
        upstream.fake.mode = "http500"
        await ws(process, upstream, "alice-pc", canary).activate()
        async with aiohttp.ClientSession() as session:
            for page in ("/metrics", "/status"):
                async with session.get(f"{process.base}{page}") as r:
                    assert canary not in await r.text(), page
        process.kill(signal.SIGTERM)
        assert await process.wait() == 0
        for path in process.tmp_path.rglob("*"):
            if path.is_file() and path.name != "config.yaml":
                assert canary.encode() not in path.read_bytes(), path

    async def test_second_daemon_on_same_state_refused(self, process: DaemonProcess) -> None:
        """A second daemon pointed at a state directory in use exits 1 with a clear message."""
        assert process.config_path is not None
        second = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "license_server",
                "serve",
                "--config",
                str(process.config_path),
                "--set",
                f"listen.port={free_port()}",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert second.returncode == 1
        assert "already using" in second.stderr


class TestDefaults:
    """Start-up with nothing configured, and configuration checks."""

    async def test_runs_with_no_config(self, tmp_path: Path) -> None:
        """With no config file the daemon runs on defaults, creates its state directory and says so."""
        port = free_port()
        proc = DaemonProcess(
            tmp_path,
            None,
            {
                "XDG_STATE_HOME": str(tmp_path / "xdg"),
                "LICENSE_SERVER_LISTEN__PORT": str(port),
                "LICENSE_SERVER_SHUTDOWN_DRAIN": "0s",
            },
        )
        proc.port = port
        await proc.start()
        proc.kill(signal.SIGTERM)
        assert await proc.wait() == 0
        assert (tmp_path / "xdg" / "license-server").is_dir()
        log = proc.log_text()
        assert "https://api.cryptolens.io" in log
        assert "no_vendor_key" in log

    def test_check_config_names_bad_key(self, tmp_path: Path) -> None:
        """check-config exits non-zero with a message naming the offending key."""
        config = tmp_path / "bad.yaml"
        config.write_text("listen:\n  port: seventy\n")
        result = subprocess.run(
            [sys.executable, "-m", "license_server", "check-config", "--config", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode != 0
        assert "listen.port" in result.stderr

    def test_check_config_accepts_example(self) -> None:
        """The shipped example configuration passes check-config."""
        example = Path(__file__).parent.parent / "config.example.yaml"
        result = subprocess.run(
            [sys.executable, "-m", "license_server", "check-config", "--config", str(example)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr

    async def test_sighup_rereads_license_files(self, tmp_path: Path, upstream: Upstream) -> None:
        """A license file dropped into the folder is served after SIGHUP, without a restart."""
        data = Path(__file__).parent / "data"
        folder = tmp_path / "licenses"
        folder.mkdir()
        proc = DaemonProcess(
            tmp_path,
            {
                "upstream": {"url": upstream.url, "timeout": "1s"},
                "public_keys": [str(data / "cryptolens-example-2019.pubkey.xml")],
                "state_dir": str(tmp_path / "state"),
                "license_files": str(folder),
            },
        )
        await proc.start()
        try:
            await upstream.stop()
            vector_key = (data / "cryptolens-example-2019.pubkey.xml").read_text()
            lab = Workstation(lambda: f"{proc.base}/api/", vector_key, "test")
            assert (await lab.activate("ETXYI-GFILQ-UXAXK-GGKSU", product=3941))[0] is None
            (folder / "lab.skm").write_bytes((data / "cryptolens-example-2019.skm").read_bytes())
            proc.kill(signal.SIGHUP)
            for _ in range(100):
                if '"reloaded"' in proc.log_text():
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the daemon never logged that it reloaded")
            license_key, message = await lab.activate("ETXYI-GFILQ-UXAXK-GGKSU", product=3941)
            assert license_key is not None, message
        finally:
            proc.kill(signal.SIGTERM)
            assert await proc.wait() == 0


FLOATING = "FLOAT-ZKQPR-MWXNC-TYBVA"
READY_WITHIN = 2.0  # seconds from spawn to /readyz 200 after a kill -9


def _forms(rng: random.Random) -> tuple[str, str]:
    """A random workstation call: node-locked or floating Activate, GetKey or Deactivate; (method, form)."""
    machine = f"m{rng.randrange(3)}"
    floating = rng.random() < 0.4
    key = FLOATING if floating else LICENSE
    base = {"token": TOKEN, "ProductId": str(PRODUCT), "Key": key}
    roll = rng.random()
    if roll < 0.5:
        interval = "60" if floating else "0"
        fields = {**base, "MachineCode": machine, "FloatingTimeInterval": interval, "Sign": "True"}
        return "activate", urlencode({**fields, "SignMethod": "1"})
    if roll < 0.85:
        return "getkey", urlencode({**base, "Sign": "True", "SignMethod": "1"})
    return "deactivate", urlencode({**base, "MachineCode": machine, "Floating": str(floating)})


def _integrity(state: Path, scratch: Path) -> dict[str, str]:
    """PRAGMA integrity_check of a copy of each SQLite store as a crash left it (WAL included)."""
    results = {}
    for name in ("answers.sqlite3", "seats.sqlite3"):
        if not (state / name).exists():
            continue
        scratch.mkdir(exist_ok=True)
        for suffix in ("", "-wal"):  # a copy, so opening it here cannot tidy up what the daemon must recover
            source, copy = state / f"{name}{suffix}", scratch / f"{name}{suffix}"
            copy.unlink(missing_ok=True)
            if source.exists():
                copy.write_bytes(source.read_bytes())
        with contextlib.closing(sqlite3.connect(scratch / name)) as db:
            results[name] = ", ".join(row[0] for row in db.execute("PRAGMA integrity_check"))
    return results


async def kill_loop(
    process: DaemonProcess, upstream: Upstream, rng: random.Random, kills: int
) -> tuple[set[str], list[float]]:
    """kill -9 the loaded daemon `kills` times at random moments, restarting it each time.

    Some kills land while it is still starting. The stores must pass integrity_check after every kill.
    Returns the request ids of every answered call and each restart's seconds from spawn to /readyz 200.
    """
    upstream.fake.add_license(PRODUCT, FLOATING, max_machines=2)
    answered: set[str] = set()
    ready: list[float] = []
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession, seed: int) -> None:
        calls = random.Random(seed)
        while not stop.is_set():
            method, form = _forms(calls)
            try:
                async with session.post(
                    f"{process.base}/api/key/{method}",
                    data=form,
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                ) as response:
                    body = await response.read()
                    assert "result" in json.loads(body)
                    answered.add(response.headers["X-Request-Id"])
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.1)  # the daemon is down: let it start

    state = process.tmp_path / "state"
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        clients = [asyncio.ensure_future(client(session, rng.randrange(2**32))) for _ in range(8)]
        try:
            for _ in range(kills):
                upstream.fake.mode = "http500" if rng.random() < 0.3 else "ok"
                if rng.random() < 0.2:  # during start-up: a crash while recovering from the last one
                    process.spawn()
                    await asyncio.sleep(rng.uniform(0.05, 0.5))
                else:
                    ready.append(await process.start("/readyz"))
                    await asyncio.sleep(rng.uniform(0.05, 0.6))
                process.kill(signal.SIGKILL)
                await process.wait()
                checks = await asyncio.to_thread(_integrity, state, process.tmp_path / "integrity")
                assert all(result == "ok" for result in checks.values()), checks
            upstream.fake.mode = "ok"
            ready.append(await process.start("/readyz"))
            await asyncio.sleep(0.2)
        finally:
            stop.set()
            await asyncio.gather(*clients)
    return answered, ready


class TestKillUnderLoad:
    """kill -9 at random moments under load loses no answered call from the audit trail."""

    async def _crash_loop(self, process: DaemonProcess, upstream: Upstream, seed: int, kills: int) -> None:
        """Kill, restart, then check the trail, the stores and the restart times."""
        print(f"kill -9 loop: seed {seed}, {kills} kills")
        process.kill(signal.SIGKILL)  # the fixture's process: the loop starts its own
        await process.wait()
        answered, ready = await kill_loop(process, upstream, random.Random(seed), kills)
        load = ", ".join(f"{n:.1f}" for n in os.getloadavg())
        print(
            f"restarts to READY: {len(ready)}, max {max(ready):.3f} s, mean {sum(ready) / len(ready):.3f} s"
        )
        print(f"load average {load}")
        process.kill(signal.SIGTERM)
        assert await process.wait() == 0
        folder = process.tmp_path / "state" / "audit"
        recorded = await asyncio.to_thread(_recorded_ids, folder)
        assert len(answered) > 10 * kills
        assert answered <= recorded
        checkpoints = read_checkpoints(process.log_text().splitlines())
        assert len(checkpoints) >= len(ready) // 2  # one at each start and at the clean stop, less any killed
        report = await asyncio.to_thread(verify, folder, checkpoints=checkpoints)
        assert report.ok, report.problem
        assert process.config_path is not None
        cli = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "license_server", "audit", "verify", "--config", str(process.config_path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
        stores = await asyncio.to_thread(_integrity, process.tmp_path / "state", process.tmp_path / "final")
        assert stores == {"answers.sqlite3": "ok", "seats.sqlite3": "ok"}
        assert max(ready) <= READY_WITHIN, f"{ready} (load average {load})"

    async def test_no_answered_call_lost(self, process: DaemonProcess, upstream: Upstream) -> None:
        """Every call that got an answer is in the trail after repeated kill -9, and the chain verifies."""
        await self._crash_loop(process, upstream, seed=7, kills=6)

    @pytest.mark.timeout(240)
    async def test_fifty_kills(self, process: DaemonProcess, upstream: Upstream) -> None:
        """Fifty kill -9 at random moments: no answered call lost, stores intact, READY within 2 s each."""
        seed = int(os.environ.get("KILL_LOOP_SEED", time.time_ns() % 2**32))
        await self._crash_loop(process, upstream, seed=seed, kills=50)


def _recorded_ids(folder: Path) -> set[str]:
    """The request ids of every call record in the trail."""
    ids = set()
    for audit_file in chain.list_files(folder):
        for line in audit_file.path.read_bytes().splitlines():
            record = json.loads(line)
            if record["type"] == chain.CALL:
                ids.add(record["request_id"])
    return ids
