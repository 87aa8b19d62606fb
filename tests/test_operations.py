"""Operations: monitoring endpoints, metrics, reloads, systemd notifications, TLS and network limits."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from license_server.audit.chain import Action
from license_server.licensing.policy import Outcome
from license_server.web.metrics import Metrics
from tests.conftest import LICENSE, TOKEN, Daemon, Upstream, send_form
from tests.test_egress import make_tls
from tests.test_process import DaemonProcess
from tests.test_proxy import activate_form, post

DaemonFactory = Callable[..., Awaitable[Daemon]]


async def get(base: str, path: str, **kwargs: Any) -> tuple[int, str]:
    """GET a path from the daemon; status and body text."""
    async with aiohttp.ClientSession() as session, session.get(base + path, **kwargs) as response:
        return response.status, await response.text()


class TestMonitoring:
    """/healthz, /readyz, /status and /metrics on the workstation listener."""

    async def test_endpoints(self, daemon: Daemon, upstream: Upstream) -> None:
        """Alive, ready, a status document and Prometheus metrics; none names a key, machine or token."""
        await post(daemon, "/api/key/activate", activate_form(machine="secret-machine"))
        upstream.fake.mode = "http500"
        await post(daemon, "/api/key/activate", activate_form(machine="secret-machine"))
        assert (await get(daemon.base, "/healthz"))[0] == 200
        assert (await get(daemon.base, "/readyz"))[0] == 200
        status, text = await get(daemon.base, "/status")
        assert status == 200
        document = json.loads(text)
        assert document["upstream"]["state"] == "closed"
        assert document["upstream"]["last_success"] is not None
        assert document["stale_answers_served"] == 1
        assert document["audit"]["writable"] is True
        status, metrics = await get(daemon.base, "/metrics")
        assert status == 200
        for family in (
            "license_server_calls_total",
            "license_server_upstream_requests_total",
            "license_server_upstream_latency_seconds_bucket",
            "license_server_upstream_retries_total",
            "license_server_call_latency_seconds_bucket",
            "license_server_kept_answers",
            "license_server_floating_seats_in_use",
            "license_server_audit_records_total",
            "license_server_upstream_breaker_state",
            "license_server_build_info",
        ):
            assert family in metrics, family
        assert (
            'license_server_calls_total{action="kept_stale",api_method="key/activate",status="200"} 1.0'
            in metrics
        )
        assert 'license_server_upstream_requests_total{outcome="http_5xx"} 1.0' in metrics
        for secret in (LICENSE, "secret-machine", TOKEN, "127.0.0.1"):
            for body in (text, metrics):
                assert secret not in body

    async def test_client_allowlist(self, daemon_factory: DaemonFactory, upstream: Upstream) -> None:
        """A client outside listen.allow gets a 403 JSON answer, recorded, and nothing reaches upstream."""
        daemon = await daemon_factory("listen.allow=[10.0.0.0/8, 192.168.1.7]")
        status, _, body = await post(daemon, "/api/key/activate", activate_form())
        assert status == 403
        assert json.loads(body)["result"] == 1
        assert upstream.fake.calls == []
        assert (await get(daemon.base, "/metrics"))[0] == 403
        allowed = (ipaddress.ip_network("127.0.0.0/8"),)
        await daemon.restart(listen=dataclasses.replace(daemon.config.listen, allow=allowed))
        assert (await post(daemon, "/api/key/activate", activate_form()))[0] == 200


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def wait_for(self, text: str) -> None:
        """Collect messages until one contains `text` (at most 10 seconds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not any(text in m for m in self.messages):
            remaining = deadline - loop.time()
            assert remaining > 0, f"no {text!r} in {self.messages}"
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), remaining)
                self.messages.append(data.decode())


@pytest.fixture
async def notify(tmp_path: Path) -> AsyncIterator[NotifySocket]:
    """A NOTIFY_SOCKET the daemon process reports to."""
    stand_in = NotifySocket(tmp_path / "notify.sock")
    yield stand_in
    stand_in.sock.close()


def base_config(fake: Upstream, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """A daemon configuration in front of the fake upstream."""
    return {
        "upstream": {"url": fake.url, "timeout": "1s"},
        "public_key": fake.fake.public_key_xml,
        "state_dir": str(tmp_path / "state"),
        "log": {"format": "json"},
        **extra,
    }


@pytest.mark.slow
class TestProcessOperations:
    """The daemon process as systemd and monitoring see it."""

    async def test_systemd_notifications_and_reload(
        self, tmp_path: Path, upstream: Upstream, notify: NotifySocket
    ) -> None:
        """READY with a STATUS line, watchdog pings, RELOADING/READY around SIGHUP, STOPPING at the end."""
        proc = DaemonProcess(
            tmp_path,
            base_config(upstream, tmp_path),
            {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"},
        )
        proc.env.pop("WATCHDOG_PID", None)
        await proc.start()
        await notify.wait_for("READY=1")
        assert any("STATUS=upstream closed" in m for m in notify.messages)
        await notify.wait_for("WATCHDOG=1")
        proc.kill(signal.SIGHUP)
        await notify.wait_for("RELOADING=1")
        notify.messages.clear()
        await notify.wait_for("READY=1")
        proc.kill(signal.SIGTERM)
        await notify.wait_for("STOPPING=1")
        assert await proc.wait() == 0

    async def test_reload_changes_allowlist_without_failed_calls(
        self, tmp_path: Path, upstream: Upstream
    ) -> None:
        """Calls succeed through a reload that adds a method; a broken file is refused, the old one stays."""
        config = base_config(
            upstream, tmp_path, upstream={"url": upstream.url, "allowed_methods": ["key/activate"]}
        )
        proc = DaemonProcess(tmp_path, config)
        await proc.start()
        form = activate_form()
        getkey = {k: v for k, v in form.items() if k != "MachineCode"}
        failures: list[int] = []
        stop = asyncio.Event()

        async def steady(session: aiohttp.ClientSession) -> int:
            sent = 0
            while not stop.is_set():
                async with session.post(
                    f"{proc.base}/api/key/activate",
                    data=form,
                ) as response:
                    await response.read()
                    sent += 1
                    if response.status != 200:
                        failures.append(response.status)
            return sent

        async with aiohttp.ClientSession() as session:
            load = [asyncio.ensure_future(steady(session)) for _ in range(4)]
            async with session.post(f"{proc.base}/api/key/getkey", data=getkey) as response:
                assert response.status == 403
            assert proc.config_path is not None
            data = yaml.safe_load(proc.config_path.read_text())
            data["upstream"]["allowed_methods"] = ["key/activate", "key/getkey"]
            proc.config_path.write_text(yaml.safe_dump(data))
            proc.kill(signal.SIGHUP)
            for _ in range(100):
                async with session.post(f"{proc.base}/api/key/getkey", data=getkey) as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.05)
            assert response.status == 200
            proc.config_path.write_text("upstream: [not, a, mapping\n")
            proc.kill(signal.SIGHUP)
            for _ in range(100):
                if "reload_refused" in proc.log_text():
                    break
                await asyncio.sleep(0.05)
            async with session.post(f"{proc.base}/api/key/getkey", data=getkey) as response:
                assert response.status == 200
            stop.set()
            sent = await asyncio.gather(*load)
        assert sum(sent) > 20
        assert failures == []
        proc.kill(signal.SIGTERM)
        assert await proc.wait() == 0

    async def test_tls_listener(self, tmp_path: Path, upstream: Upstream) -> None:
        """With listen.tls_cert and tls_key workstations talk HTTPS; plain HTTP is not answered."""
        server_context, ca_file = await asyncio.to_thread(make_tls, tmp_path)
        del server_context
        cert, key = tmp_path / "server.pem", tmp_path / "server.key"
        proc = DaemonProcess(tmp_path, base_config(upstream, tmp_path))
        assert proc.config_path is not None
        data = yaml.safe_load(proc.config_path.read_text())
        data["listen"].update({"tls_cert": str(cert), "tls_key": str(key)})
        proc.config_path.write_text(yaml.safe_dump(data))
        proc.scheme = "https"
        proc.tls = ssl.create_default_context(cafile=str(ca_file))
        await proc.start()
        status, _ = await get(proc.base, "/healthz", ssl=proc.tls)
        assert status == 200
        with pytest.raises(aiohttp.ClientError):
            await get(f"http://127.0.0.1:{proc.port}", "/healthz")
        proc.kill(signal.SIGTERM)
        assert await proc.wait() == 0

    async def test_connection_cap_and_header_deadline(self, tmp_path: Path, upstream: Upstream) -> None:
        """Trickling clients are cut off at the header deadline; past the cap a JSON 503; real calls go on."""
        config = base_config(upstream, tmp_path)
        proc = DaemonProcess(tmp_path, config)
        assert proc.config_path is not None
        data = yaml.safe_load(proc.config_path.read_text())
        data["listen"].update({"max_connections": 5, "header_timeout": "1s"})
        proc.config_path.write_text(yaml.safe_dump(data))
        await proc.start()
        trickling = []
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
            writer.write(b"POST /api/key/activate HTTP/1.1\r\nHost: x\r\n")
            await writer.drain()
            trickling.append((reader, writer))
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503")
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["result"] == 1
        for reader, writer in trickling:
            writer.write(b"X-Slow: 1\r\n")
            try:
                rest = await asyncio.wait_for(reader.read(), 5)
            except ConnectionResetError:  # closed while the last bytes were on their way: closed all the same
                rest = b""
            assert rest == b"", "the deadline must close a trickling client"
            writer.close()
        status, _, _ = await send_form(proc.base, "/api/key/activate", activate_form())
        assert status == 200
        proc.kill(signal.SIGTERM)
        assert await proc.wait() == 0


class TestCallMetrics:
    """Call counts and latencies as Prometheus reads them: bounded labels, cumulative inclusive buckets."""

    def test_rendered(self) -> None:
        """Every call counted once under its label set; each latency in its bucket and every one above it."""
        metrics = Metrics(["key/activate"])
        for elapsed in (0.0001, 0.0005, 0.0007, 0.003, 7.0):
            metrics.count_call("key/activate", "kept_stale", 200, elapsed)
        metrics.count_call("key/createkey", "refused", 403, 0.0002)
        metrics.count_call(None, "refused", 404, 0.0002)
        text = metrics.render().decode()
        for line in (
            'license_server_calls_total{action="kept_stale",api_method="key/activate",status="200"} 5.0',
            'license_server_calls_total{action="refused",api_method="other",status="403"} 1.0',
            'license_server_calls_total{action="refused",api_method="not_api",status="404"} 1.0',
            'license_server_call_latency_seconds_bucket{le="0.0005"} 4.0',
            'license_server_call_latency_seconds_bucket{le="0.001"} 5.0',
            'license_server_call_latency_seconds_bucket{le="0.005"} 6.0',
            'license_server_call_latency_seconds_bucket{le="5.0"} 6.0',
            'license_server_call_latency_seconds_bucket{le="+Inf"} 7.0',
            "license_server_call_latency_seconds_count 7.0",
        ):
            assert line in text, line

    def test_upstream_counted_from_the_outcome(self) -> None:
        """Answers count as answered or refused, with latency; failures by kind; offline mode not at all."""
        metrics = Metrics(["key/activate"])
        metrics.count_upstream(Outcome(Action.FORWARDED, 200, b"", result=0, upstream_latency=0.03))
        metrics.count_upstream(Outcome(Action.FORWARDED, 200, b"", result=1, upstream_latency=0.3))
        for retried in (False, True):
            metrics.count_upstream(
                Outcome(
                    Action.KEPT_STALE, 200, b"", failure="no answer", failure_kind="timeout", retried=retried
                )
            )
        metrics.count_upstream(Outcome(Action.UPSTREAM_FAILED, 503, b"", failure="offline mode is on"))
        metrics.count_upstream(Outcome(Action.KEPT_FRESH, 200, b""))
        text = metrics.render().decode()
        for line in (
            'license_server_upstream_requests_total{outcome="answered"} 1.0',
            'license_server_upstream_requests_total{outcome="refused"} 1.0',
            'license_server_upstream_requests_total{outcome="timeout"} 2.0',
            "license_server_upstream_retries_total 1.0",
            'license_server_upstream_latency_seconds_bucket{le="0.05"} 1.0',
            "license_server_upstream_latency_seconds_count 2.0",
        ):
            assert line in text, line
        assert text.count("license_server_upstream_requests_total{") == 3
