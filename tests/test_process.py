"""The daemon as customer IT runs it: a real process, killed, restarted and stopped with signals."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest
import yaml

from license_server.audit import chain
from license_server.audit.verify import read_checkpoints, verify
from tests.conftest import LICENSE, PRODUCT, TOKEN, Upstream, Workstation

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
                yaml.safe_dump({**config, "listen": {"host": "127.0.0.1", "port": self.port}})
            )
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.scheme = "http"
        self.tls: ssl.SSLContext | None = None

    async def start(self) -> None:
        """Start the process and wait until /healthz answers."""
        args = [sys.executable, "-m", "license_server", "serve"]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=self.env)
        deadline = time.monotonic() + 15
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log_path.read_text()
                try:
                    async with session.get(f"{self.base}/healthz", ssl=self.tls or True) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"daemon did not become healthy:\n{self.log_path.read_text()}")

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
        """A canary token sent in forms, queries and bad requests appears in no log or state file."""
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
        upstream.fake.mode = "http500"
        await ws(process, upstream, "alice-pc", canary).activate()
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
            {"XDG_STATE_HOME": str(tmp_path / "xdg"), "LICENSE_SERVER_LISTEN__PORT": str(port)},
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
            for _ in range(50):
                if "license_files_reloaded" in proc.log_text():
                    break
                await asyncio.sleep(0.05)
            license_key, message = await lab.activate("ETXYI-GFILQ-UXAXK-GGKSU", product=3941)
            assert license_key is not None, message
        finally:
            proc.kill(signal.SIGTERM)
            assert await proc.wait() == 0


class TestKillUnderLoad:
    """kill -9 at random moments under load loses no answered call from the audit trail."""

    async def test_no_answered_call_lost(self, process: DaemonProcess, upstream: Upstream) -> None:
        """Every call that got an answer is in the trail after repeated kill -9, and the chain verifies."""
        rng = random.Random(7)
        answered: set[str] = set()
        form = urlencode(
            {"token": TOKEN, "ProductId": str(PRODUCT), "Key": LICENSE, "Sign": "True", "SignMethod": "1"}
        )

        async def client(session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
            while not stop.is_set():
                try:
                    async with session.post(
                        f"{process.base}/api/key/getkey",
                        data=form,
                        headers={"Content-Type": "application/x-www-form-urlencoded"},
                    ) as response:
                        await response.read()
                        answered.add(response.headers["X-Request-Id"])
                except (TimeoutError, aiohttp.ClientError):
                    await asyncio.sleep(0.01)

        for _ in range(6):
            stop = asyncio.Event()
            async with aiohttp.ClientSession() as session:
                clients = [asyncio.ensure_future(client(session, stop)) for _ in range(8)]
                await asyncio.sleep(rng.uniform(0.2, 0.6))
                process.kill(signal.SIGKILL)
                await process.wait()
                stop.set()
                await asyncio.gather(*clients)
            await process.start()
        process.kill(signal.SIGTERM)
        assert await process.wait() == 0
        folder = process.tmp_path / "state" / "audit"
        recorded = await asyncio.to_thread(_recorded_ids, folder)
        assert len(answered) > 50
        assert answered <= recorded
        checkpoints = read_checkpoints(process.log_text().splitlines())
        assert (
            len(checkpoints) >= 6
        )  # one at each of the 7 starts and at the clean stop, less any lost to a kill
        report = await asyncio.to_thread(verify, folder, checkpoints=checkpoints)
        assert report.ok, report.problem


def _recorded_ids(folder: Path) -> set[str]:
    """The request ids of every call record in the trail."""
    ids = set()
    for audit_file in chain.list_files(folder):
        for line in audit_file.path.read_bytes().splitlines():
            record = json.loads(line)
            if record["type"] == chain.CALL:
                ids.add(record["request_id"])
    return ids
