"""Storms against upstream: a retry budget, the breaker under load, coalescing at scale, offline mode behind a
tripwire, and a minute of HTTP 500s while 200 workstations keep verifying."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from licensing.internal import HelperMethods
from licensing.methods import Helpers
from licensing.models import LicenseKey, Response, RSAPublicKey

from bench.dataset import MACHINES_PER_LICENSE, activate_form, license_key, machine_code, product_of
from license_server.config import BreakerConfig, RetryConfig
from license_server.licensing.upstream import Upstream as Egress
from license_server.web.app import SERVICES
from tests.conftest import LICENSE, PRODUCT, TOKEN, Daemon, Upstream, Workstation, send_form
from tests.fake_upstream import Activation, FakeCryptolens
from tests.test_faults import sent_upstream
from tests.test_process import DaemonProcess, _recorded_ids

DaemonFactory = Callable[..., Awaitable[Daemon]]
MakeWorkstation = Callable[..., Workstation]

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
DEFAULTS = BreakerConfig()
RETRY = RetryConfig()
RETRY_WINDOW = 10  # seconds the retry budget looks back over (upstream._RETRY_WINDOW)
STORM = 60  # seconds of the minute-long outage
WARM_UP = 5.0  # seconds of the storm before memory is compared
CONCURRENCY = 32  # connections the load generator opens at most, so at most this many calls are in flight
RSS_MARGIN = 0.08  # how much more resident memory the storm's last 20 s may average than its first 20 s

# IncrementIntValueToKey and DecrementIntValueToKey take the same fields.
COUNTER_FORM = urlencode(
    {
        "token": TOKEN,
        "ProductId": PRODUCT,
        "Key": LICENSE,
        "Id": 0,
        "Name": "usage",
        "IntValue": 1,
        "EnableBound": "False",
        "Bound": 0,
    }
)

# State-changing calls as the Python SDK posts them: none may reach upstream twice.
STATE_CHANGING = {
    "key/activate": activate_form(0, 0),
    "key/deactivate": urlencode(
        {"token": TOKEN, "ProductId": PRODUCT, "Key": LICENSE, "Floating": False, "MachineCode": "m-1"}
    ),
    "key/createtrialkey": urlencode(
        {"token": TOKEN, "ProductId": PRODUCT, "MachineCode": "m-1", "FriendlyName": "ENG-WS-00001"}
    ),
    "data/incrementintvaluetokey": COUNTER_FORM,
    "data/decrementintvaluetokey": COUNTER_FORM,
}


def get_key_form(key: str = LICENSE, product: int | str = PRODUCT, token: str = TOKEN) -> str:
    """The exact body `licensing.methods.Key.get_key` (SDK 0.54) posts, fields in its order."""
    return urlencode(
        {
            "token": token,
            "ProductId": product,
            "key": key,
            "FieldsToReturn": 0,
            "metadata": False,
            "FloatingTimeInterval": 0,
            "Sign": "True",
            "ModelVersion": 3,
            "SignMethod": 1,
        }
    )


def probes_within(seconds: float, breaker: BreakerConfig) -> int:
    """How many probes an open breaker lets through in `seconds`: waits from reset_after, doubling to max."""
    elapsed, wait, probes = 0.0, breaker.reset_after, 0
    while elapsed + wait <= seconds:
        elapsed += wait
        probes += 1
        wait = min(wait * 2, breaker.max_reset_after)
    return probes


def add_fleet(fake: FakeCryptolens, licenses: int) -> list[tuple[int, int]]:
    """Give the fake the benchmark's licenses and product tokens; every (license, machine) of them."""
    for index in range(licenses):
        product, token = product_of(index)
        fake.tokens.add(token)
        fake.add_license(int(product), license_key(index), max_machines=MACHINES_PER_LICENSE)
    return [(index, machine) for index in range(licenses) for machine in range(MACHINES_PER_LICENSE)]


def sdk_accepts(body: bytes, public_key_xml: str, machine: str | None) -> bool:
    """Whether the Python SDK's own checks accept an answer: signature, and machine when given."""
    response = Response.from_string(body.decode("utf-8"))
    if not HelperMethods.verify_signature(response, RSAPublicKey.from_string(public_key_xml)):
        return False
    license_key_ = LicenseKey.from_response(response)
    return machine is None or bool(Helpers.IsOnRightMachine(license_key_, custom_machine_code=machine))


@dataclass
class Reply:
    """One answer the load generator got: when it was sent (loop time), status, source, body, request id."""

    sent: float
    status: int
    source: str
    body: bytes
    request_id: str


async def post(session: aiohttp.ClientSession, url: str, body: str) -> Reply:
    """POST one SDK form through a shared session."""
    sent = asyncio.get_running_loop().time()
    async with session.post(url, data=body, headers=FORM, allow_redirects=False) as response:
        return Reply(
            sent,
            response.status,
            response.headers.get("X-License-Server-Source", ""),
            await response.read(),
            response.headers.get("X-Request-Id", ""),
        )


async def paced(rate: float, seconds: float, send: Callable[[int], Awaitable[Reply]]) -> list[Reply]:
    """Start `send(n)` at a steady `rate` per second for `seconds`, never waiting for earlier calls."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: list[asyncio.Future[Reply]] = []
    for n in range(round(rate * seconds)):
        delay = start + n / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(send(n)))
    return await asyncio.gather(*tasks)


async def sample_rss(pid: int, samples: list[tuple[float, int]], every: float) -> None:
    """Append (seconds since start, VmRSS bytes) of a process every `every` seconds until cancelled."""
    status = Path(f"/proc/{pid}/status")
    started = time.monotonic()
    while True:
        text = await asyncio.to_thread(status.read_text)
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                samples.append((time.monotonic() - started, int(line.split()[1]) * 1024))
        await asyncio.sleep(every)


async def count_at(seconds: float, count: Callable[[], int]) -> int:
    """A counter's value `seconds` from now."""
    await asyncio.sleep(seconds)
    return count()


async def sent_after(seconds: float, daemon: Daemon) -> int:
    """The requests the daemon has sent upstream `seconds` from now."""
    await asyncio.sleep(seconds)
    sent, _ = await sent_upstream(daemon)
    return sent


def egress(daemon: Daemon) -> Egress:
    """The daemon's upstream egress."""
    upstream = daemon.app[SERVICES].upstream
    assert upstream is not None
    return upstream


class TestRetryBudget:
    """A failed call is tried once more only when that cannot repeat a change, and only within budget."""

    @pytest.mark.parametrize("method", sorted(STATE_CHANGING))
    async def test_state_changing_call_reaches_upstream_once(
        self, daemon: Daemon, upstream: Upstream, method: str
    ) -> None:
        """An upstream that resets the connection after reading the request sees a changing call once."""
        upstream.fake.mode = "reset"
        status, headers, _ = await send_form(daemon.base, f"/api/{method}", STATE_CHANGING[method])
        assert status == 502
        assert headers["X-License-Server-Source"] == "upstream_failed"
        assert len(upstream.fake.calls_to(method)) == 1
        assert await sent_upstream(daemon) == (1, 0)

    async def test_get_key_tried_once_more(self, daemon: Daemon, upstream: Upstream) -> None:
        """A GetKey whose connection is reset is tried exactly once more: it only reads."""
        upstream.fake.mode = "reset"
        status, _, _ = await send_form(daemon.base, "/api/key/getkey", get_key_form())
        assert status == 502
        assert len(upstream.fake.calls_to("key/getkey")) == 2

    async def test_refused_connection_retried(self, daemon: Daemon, upstream: Upstream) -> None:
        """An Activate whose connection was refused certainly never arrived, so it is tried once more."""
        await upstream.stop()
        status, _, _ = await send_form(daemon.base, "/api/key/activate", activate_form(0, 0))
        assert status == 502
        assert await sent_upstream(daemon) == (2, 1)

    async def test_retry_does_not_bypass_breaker(
        self, daemon_factory: DaemonFactory, upstream: Upstream
    ) -> None:
        """When the first failure opens the breaker, the retry is not sent."""
        daemon = await daemon_factory("upstream.breaker.failures=1")
        upstream.fake.mode = "http500"
        status, _, _ = await send_form(daemon.base, "/api/key/getkey", get_key_form())
        assert status == 502
        assert len(upstream.fake.calls_to("key/getkey")) == 1
        assert egress(daemon).breaker.state.value == "open"

    async def test_retry_stays_within_call_timeout(self, daemon: Daemon, upstream: Upstream) -> None:
        """A GetKey that used its whole upstream.timeout is not retried: the workstation waits no longer."""
        upstream.fake.mode = "hang"
        started = time.monotonic()
        status, _, _ = await send_form(daemon.base, "/api/key/getkey", get_key_form())
        elapsed = time.monotonic() - started
        assert status == 504
        assert elapsed < daemon.config.upstream.timeout + 0.5
        assert len(upstream.fake.calls_to("key/getkey")) == 1

    async def test_flood_of_failing_get_key_within_budget(
        self, daemon_factory: DaemonFactory, upstream: Upstream
    ) -> None:
        """Under a flood of failing GetKeys, attempts stay within calls x (1 + budget) + the floor."""
        # A breaker that never opens, so that only the budget stands between the flood and upstream.
        daemon = await daemon_factory("upstream.breaker.failures=1000000")
        upstream.fake.mode = "http500"
        calls = 400
        started = time.monotonic()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as session:
            url = f"{daemon.base}/api/key/getkey"
            # distinct licenses, so that no two calls share one upstream request
            replies = await asyncio.gather(
                *(post(session, url, get_key_form(key=f"FLOOD-{n:05d}")) for n in range(calls))
            )
        assert time.monotonic() - started < RETRY_WINDOW - 1, "the bound below holds within one window"
        assert {reply.status for reply in replies} == {502}
        attempts = len(upstream.fake.calls_to("key/getkey"))
        floor = RETRY.min_per_second * RETRY_WINDOW
        assert attempts <= calls * (1 + RETRY.budget_percent / 100) + floor
        assert attempts >= calls + floor, "retries within the budget must still happen"


class TestBreakerUnderLoad:
    """A minute of refused connections at 200 calls/s costs upstream a handful of attempts."""

    @pytest.mark.slow
    @pytest.mark.timeout(150)
    async def test_refused_for_a_minute(self, daemon_factory: DaemonFactory, upstream: Upstream) -> None:
        """Attempts stay within the probe schedule; the first successful probe closes the breaker."""
        breaker = BreakerConfig(failures=3, reset_after=1.0, max_reset_after=8.0)
        daemon = await daemon_factory(
            f"upstream.breaker.failures={breaker.failures}",
            f"upstream.breaker.reset_after={breaker.reset_after}s",
            f"upstream.breaker.max_reset_after={breaker.max_reset_after}s",
        )
        fleet = add_fleet(upstream.fake, 40)
        forms = [activate_form(index, machine) for index, machine in fleet]
        url = f"{daemon.base}/api/key/activate"
        await upstream.stop()
        outage, rate = 60.0, 200.0
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        async with aiohttp.ClientSession(connector=connector) as session:
            # what the breaker let through before its first probe was due: the calls that opened it
            opening = asyncio.ensure_future(sent_after(0.75 * breaker.reset_after, daemon))
            storm = await paced(rate, outage, lambda n: post(session, url, forms[n % len(forms)]))
            attempts, _ = await sent_upstream(daemon)
            opened_with = await opening
            await upstream.start()
            # the next probe is due within max_reset_after; keep the load on until well after it
            after = await paced(
                rate, breaker.max_reset_after + 3, lambda n: post(session, url, forms[n % len(forms)])
            )
        assert len(storm) == rate * outage
        assert {reply.status for reply in storm} <= {502, 503}
        assert sum(reply.source == "upstream_failed" for reply in storm) == len(storm)
        # until it opens, `failures` attempts (retries included) fail, plus one per call then in flight
        assert opened_with <= breaker.failures + CONCURRENCY
        probes = attempts - opened_with
        assert probes <= probes_within(outage + 1, breaker), f"{probes} probes in {outage:.0f} s"
        forwarded = [n for n, reply in enumerate(after) if reply.source == "forwarded"]
        assert forwarded, "the breaker must let a probe through once upstream is back"
        first = forwarded[0]
        assert all(reply.source == "forwarded" for reply in after[first + 5 :]), "traffic must flow again"
        assert len(upstream.fake.calls_to("key/activate")) == len(forwarded)
        assert egress(daemon).breaker.state.value == "closed"


class TestCoalescing:
    """Identical concurrent GetKeys for a cold key share one upstream call, at scale."""

    @pytest.mark.slow
    async def test_500_identical_get_keys_one_upstream_call(
        self, daemon_factory: DaemonFactory, upstream: Upstream
    ) -> None:
        """500 concurrent identical GetKeys, slow upstream: one upstream call, one signed answer for all."""
        # slow enough that all 500 have arrived before upstream answers, well inside the call budget
        daemon = await daemon_factory("upstream.timeout=15s")
        upstream.fake.delay = 5.0
        url = f"{daemon.base}/api/key/getkey"
        form = get_key_form()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            replies = await asyncio.gather(*(post(session, url, form) for _ in range(500)))
        assert len(upstream.fake.calls_to("key/getkey")) == 1
        assert {(reply.status, reply.source) for reply in replies} == {(200, "forwarded")}
        bodies = {reply.body for reply in replies}
        assert len(bodies) == 1
        assert await asyncio.to_thread(sdk_accepts, bodies.pop(), upstream.fake.public_key_xml, None)


@dataclass
class Tripwire:
    """Records every name lookup and outbound connection except to the allowed (host, port) addresses."""

    allowed: set[tuple[str, int]] = field(default_factory=set)
    hits: list[str] = field(default_factory=list)

    def check(self, what: str, host: object, port: object) -> None:
        """Let an allowed address through; record and refuse anything else."""
        if isinstance(host, str) and isinstance(port, int | str) and (host, int(port)) in self.allowed:
            return
        self.hits.append(f"{what} {host}:{port}")
        raise OSError(f"tripwire: {what} {host}:{port}")


def arm_tripwire(monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop) -> Tripwire:
    """Guard name lookups and outbound connections, in threads and on the loop, until the test ends."""
    wire = Tripwire()
    getaddrinfo = socket.getaddrinfo
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
    loop_getaddrinfo, loop_connect, loop_sock_connect = (
        loop.getaddrinfo,
        loop.create_connection,
        loop.sock_connect,
    )

    def guarded_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        wire.check("getaddrinfo", host, port)
        return getaddrinfo(host, port, *args, **kwargs)

    def guarded_connect(sock: socket.socket, address: Any) -> None:
        if sock.family in {socket.AF_INET, socket.AF_INET6}:
            wire.check("connect", address[0], address[1])
        connect(sock, address)

    def guarded_connect_ex(sock: socket.socket, address: Any) -> int:
        if sock.family in {socket.AF_INET, socket.AF_INET6}:
            wire.check("connect_ex", address[0], address[1])
        return connect_ex(sock, address)

    async def guarded_loop_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        wire.check("loop.getaddrinfo", host, port)
        return await loop_getaddrinfo(host, port, *args, **kwargs)

    async def guarded_create_connection(
        factory: Any, host: Any = None, port: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        sock = kwargs.get("sock")
        if sock is not None:
            peer = sock.getpeername()
            wire.check("loop.create_connection", peer[0], peer[1])
        else:
            wire.check("loop.create_connection", host, port)
        return await loop_connect(factory, host, port, *args, **kwargs)

    async def guarded_sock_connect(sock: socket.socket, address: Any) -> None:
        wire.check("loop.sock_connect", address[0], address[1])
        await loop_sock_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(loop, "getaddrinfo", guarded_loop_getaddrinfo)
    monkeypatch.setattr(loop, "create_connection", guarded_create_connection)
    monkeypatch.setattr(loop, "sock_connect", guarded_sock_connect)
    return wire


class TestOfflineTripwire:
    """Offline mode makes no name lookup and no outbound connection at all."""

    async def test_offline_never_looks_up_or_connects(
        self,
        daemon_factory: DaemonFactory,
        upstream: Upstream,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Kept answers and a license file answer offline; Deactivate is refused; nothing leaves."""
        fake = upstream.fake
        file_key = "LABFL-EEEEE-KKKKK-EEEEY"
        lab = fake.add_license(
            PRODUCT, file_key, activations=[Activation("lab-pc", "10.0.0.9", fake.now(), "")]
        )
        folder = tmp_path / "licenses"
        folder.mkdir()
        (folder / "lab.skm").write_text(fake.license_file(lab))
        daemon = await daemon_factory(f"license_files={folder}")
        alice = Workstation(lambda: daemon.api, fake.public_key_xml, "alice-pc")
        assert (await alice.activate())[0] is not None
        assert (await alice.get_key())[0] is not None
        await daemon.flush()
        await daemon.stop()
        calls = len(fake.calls)

        wire = arm_tripwire(monkeypatch, asyncio.get_running_loop())
        offline = replace(daemon.config.upstream, offline=True, url="https://licensing.tripwire.test")
        await daemon.start(upstream=offline)
        assert daemon.server is not None
        wire.allowed.add(("127.0.0.1", daemon.server.port or 0))

        lab_pc = Workstation(lambda: daemon.api, fake.public_key_xml, "lab-pc")
        kept_activate, kept_get_key = await alice.activate(), await alice.get_key()
        file_activate, file_get_key = await lab_pc.activate(file_key), await lab_pc.get_key(file_key)
        success, message = await alice.deactivate()
        assert wire.hits == []
        for license_key_, message_ in (kept_activate, kept_get_key, file_activate, file_get_key):
            assert license_key_ is not None, message_
        assert not success
        assert "offline" in message.lower()
        status, headers, _ = await send_form(
            daemon.base, "/api/key/getkey", get_key_form(key="NOKEP-TTTTT-AAAAA-BBBBB")
        )
        assert (status, headers["X-License-Server-Source"]) == (503, "upstream_failed")

        assert wire.hits == []
        assert len(fake.calls) == calls
        # the tripwire is live: the configured upstream host cannot even be looked up
        with pytest.raises(OSError, match="tripwire"):
            await asyncio.get_running_loop().getaddrinfo("licensing.tripwire.test", 443)
        assert wire.hits == ["loop.getaddrinfo licensing.tripwire.test:443"]


class TestOutageMinute:
    """Upstream answers 500 for a minute while 200 workstations verify every second."""

    @pytest.mark.slow
    @pytest.mark.timeout(180)
    async def test_minute_of_500s_with_200_workstations(self, tmp_path: Path, upstream: Upstream) -> None:
        """Each call gets its kept answer byte for byte and is audited; upstream sees few probes; RSS flat."""
        fake = upstream.fake
        fleet = add_fleet(fake, 40)
        forms = [activate_form(index, machine) for index, machine in fleet]
        process = DaemonProcess(
            tmp_path,
            {
                "upstream": {"url": upstream.url, "timeout": "1s"},
                "public_key": fake.public_key_xml,
                "state_dir": str(tmp_path / "state"),
                "log": {"format": "json"},
            },
        )
        await process.start()
        assert process.proc is not None
        pid = process.proc.pid
        url = f"{process.base}/api/key/activate"
        try:
            connector = aiohttp.TCPConnector(limit=CONCURRENCY)
            async with aiohttp.ClientSession(connector=connector) as session:
                kept = [await post(session, url, form) for form in forms]
                assert {(reply.status, reply.source) for reply in kept} == {(200, "forwarded")}
                fake.mode = "http500"
                before = len(fake.calls)
                rss: list[tuple[float, int]] = []
                sampler = asyncio.ensure_future(sample_rss(pid, rss, every=2.0))
                opening = asyncio.ensure_future(
                    count_at(0.75 * DEFAULTS.reset_after, lambda: len(fake.calls))
                )
                started = time.monotonic()
                replies = await paced(200, STORM, lambda n: post(session, url, forms[n % len(forms)]))
                sampler.cancel()
            storm_seconds = time.monotonic() - started
            opened_with = await opening - before
            probes = len(fake.calls) - before - opened_with
        finally:
            process.kill(signal.SIGTERM)
            assert await process.wait() == 0

        assert len(replies) == 200 * STORM
        wrong = [n for n, reply in enumerate(replies) if reply.body != kept[n % len(kept)].body]
        assert wrong == [], f"{len(wrong)} answers differ from the kept ones"
        assert {(reply.status, reply.source) for reply in replies} == {(200, "kept_stale")}
        distinct = {reply.body: fleet[n % len(fleet)] for n, reply in enumerate(replies)}
        assert len(distinct) == len(fleet)
        for body, (index, machine) in distinct.items():
            assert await asyncio.to_thread(
                sdk_accepts, body, fake.public_key_xml, machine_code(index, machine)
            ), (index, machine)

        assert opened_with <= DEFAULTS.failures + CONCURRENCY
        bound = probes_within(storm_seconds + 1, DEFAULTS)
        assert probes <= bound, f"upstream saw {probes} probes in a {storm_seconds:.0f} s storm"

        ids = [reply.request_id for reply in replies]
        assert len(set(ids)) == len(ids)
        recorded = await asyncio.to_thread(_recorded_ids, tmp_path / "state" / "audit")
        missing = set(ids) - recorded
        assert not missing, f"{len(missing)} answered calls are not in the audit trail"

        warm = [size for at, size in rss if WARM_UP <= at < WARM_UP + 20]
        last = [size for at, size in rss if at >= STORM - 20]
        assert warm
        assert last
        first_mean, last_mean = sum(warm) / len(warm), sum(last) / len(last)
        assert last_mean <= first_mean * (1 + RSS_MARGIN), (first_mean, last_mean, rss)
