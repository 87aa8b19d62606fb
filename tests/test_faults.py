"""Every way the road to upstream can fail, acted out on a real socket: kept answers ride out each one."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import sqlite3
import struct
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from license_server.storage.state import StateFolder
from license_server.web.app import SERVICES
from tests.conftest import LICENSE, OTHER_LICENSE, PRODUCT, Clock, Daemon, Upstream, Workstation, send_form
from tests.fault_proxy import FaultProxy
from tests.pki import Pki
from tests.test_process import DaemonProcess
from tests.test_proxy import DAEMON_HEADERS, FAILURE_MODES, activate_form

ServerFactory = Callable[..., Awaitable[TestServer]]
DaemonFactory = Callable[..., Awaitable[Daemon]]

TIMEOUT = 0.5  # upstream.timeout of the daemons here: a hung upstream costs this much per call
# The breaker is not what these tests are about: it stays closed however often the faults repeat.
SETTINGS = (f"upstream.timeout={TIMEOUT}s", "upstream.breaker.failures=1000")
MIB = 1 << 20


# --- answers no real upstream sends, served by the proxy itself -------------------------------------


def http_answer(status: str, body: bytes = b"", *headers: str) -> bytes:
    """A complete raw HTTP/1.1 answer with a Content-Length."""
    lines = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def zero_bomb(encoding: str, inflated: int = 1 << 30) -> bytes:
    """A gzip or deflate (zlib) body of `inflated` zero bytes, about a thousand times smaller."""
    block = bytes(MIB)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    # After a full flush the compressor starts afresh, so every block compresses to the same bytes.
    segment = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    deflated = segment * (inflated // MIB) + compressor.flush()
    if encoding == "gzip":
        crc = 0
        for _ in range(inflated // MIB):
            crc = zlib.crc32(block, crc)
        header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
        return header + deflated + struct.pack("<II", crc, inflated & 0xFFFFFFFF)
    adler = 1
    for _ in range(inflated // MIB):
        adler = zlib.adler32(block, adler)
    return b"\x78\xda" + deflated + struct.pack(">I", adler)


@functools.cache
def bomb_answer(encoding: str) -> bytes:
    """A 200 JSON answer whose body inflates to 1 GiB of zeros."""
    return http_answer(
        "200 OK",
        zero_bomb(encoding),
        "Content-Type: application/json; charset=utf-8",
        f"Content-Encoding: {encoding}",
    )


def endless_chunked() -> AsyncIterator[bytes]:
    """A chunked 200 answer that keeps coming (256 MiB, far past any limit, then it ends)."""

    async def pieces() -> AsyncIterator[bytes]:
        yield b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b"%x\r\n%s\r\n" % (MIB, b" " * MIB)
        for _ in range(256):
            yield chunk
        yield b"0\r\n\r\n"

    return pieces()


def trickle_after_huge_length() -> AsyncIterator[bytes]:
    """An answer announcing a terabyte, then sending 1 KiB every 10 ms: only its headers say it is too big."""

    async def pieces() -> AsyncIterator[bytes]:
        yield b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1099511627776\r\n\r\n"
        for _ in range(1000):
            yield b" " * 1024
            await asyncio.sleep(0.01)

    return pieces()


# --- the fault classes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One way upstream fails: how to bring it about, and the outcome the daemon must count it as."""

    name: str
    kind: str  # the outcome label of license_server_upstream_requests_total
    status: int  # what a workstation with nothing kept gets
    apply: Callable[[FaultProxy, Upstream, bytes], Awaitable[None]]


def proxy_fault(fault: str, **settings: object) -> Callable[[FaultProxy, Upstream, bytes], Awaitable[None]]:
    """Switch the proxy to a fault with fixed settings."""

    async def apply(proxy: FaultProxy, _upstream: Upstream, _good: bytes) -> None:
        await proxy.set(fault, **settings)  # type: ignore[arg-type]

    return apply


def cut_half(fault: str) -> Callable[[FaultProxy, Upstream, bytes], Awaitable[None]]:
    """Let half of the answer's body through, then break the connection."""

    async def apply(proxy: FaultProxy, _upstream: Upstream, good: bytes) -> None:
        await proxy.set(fault, cut_after=len(good) // 2)

    return apply


def unsigned_flip(good: bytes) -> tuple[int, int]:
    """Where and how to flip bits of a signed answer so it stays JSON with a readable license, unsigned."""
    start = good.index(b'"licenseKey":"') + len(b'"licenseKey":"')
    end = good.index(b'"', start)
    for offset in range(start, end):
        for xor in (0x01, 0x02, 0x04, 0x20):
            spoiled = bytearray(good)
            spoiled[offset] ^= xor
            license_text = bytes(spoiled[start:end])
            try:
                json.loads(base64.b64decode(license_text, validate=True))
            except ValueError:
                continue
            return offset, xor
    raise AssertionError("no bit flip keeps this answer readable")


async def flip_license_bits(proxy: FaultProxy, _upstream: Upstream, good: bytes) -> None:
    """Flip bits inside the signed license: still JSON, base64 and a license, no longer signed."""
    offset, xor = unsigned_flip(good)
    await proxy.set("garble", garble_at=offset, garble_xor=xor)


async def half_json(proxy: FaultProxy, _upstream: Upstream, good: bytes) -> None:
    """A complete HTTP answer whose JSON body stops halfway."""
    await proxy.set("serve", canned=http_answer("200 OK", good[: len(good) // 2], "Content-Type: text/json"))


def bomb(encoding: str) -> Callable[[FaultProxy, Upstream, bytes], Awaitable[None]]:
    """Answer with a compression bomb (built on first use: it takes a moment)."""

    async def apply(proxy: FaultProxy, _upstream: Upstream, _good: bytes) -> None:
        await proxy.set("serve", canned=await asyncio.to_thread(bomb_answer, encoding))

    return apply


def fake_mode(mode: str) -> Callable[[FaultProxy, Upstream, bytes], Awaitable[None]]:
    """One of the fake upstream's own failure modes."""

    async def apply(_proxy: FaultProxy, upstream: Upstream, _good: bytes) -> None:
        upstream.fake.mode = mode

    return apply


_FAKE_KINDS = {
    "http500": ("http_5xx", 502),
    "html502": ("http_5xx", 502),
    "empty504": ("http_5xx", 502),
    "garbage": ("invalid", 502),
    "bad_signature": ("bad_signature", 502),
    "truncated": ("unreachable", 502),
    "reset": ("unreachable", 502),
    "redirect": ("redirect", 502),
}

FAULTS = [
    Fault("refused", "unreachable", 502, proxy_fault("refuse")),
    Fault("reset_on_connect", "unreachable", 502, proxy_fault("rst")),
    Fault("blackhole", "timeout", 504, proxy_fault("blackhole")),
    Fault("latency_beyond_timeout", "timeout", 504, proxy_fault("pass", latency=TIMEOUT + 0.5)),
    Fault("reset_mid_body", "unreachable", 502, cut_half("reset_body")),
    Fault("truncated_mid_body", "unreachable", 502, cut_half("truncate")),
    Fault("garbled_json", "invalid", 502, proxy_fault("garble", garble_at=0, garble_xor=0x20)),
    Fault("garbled_signed_license", "bad_signature", 502, flip_license_bits),
    Fault("truncated_json", "invalid", 502, half_json),
    Fault(
        "http503",
        "http_5xx",
        502,
        proxy_fault(
            "serve",
            canned=http_answer(
                "503 Service Unavailable", b"busy", "Retry-After: 30", "Content-Type: text/plain"
            ),
        ),
    ),
    Fault("gzip_bomb", "too_large", 502, bomb("gzip")),
    Fault("deflate_bomb", "too_large", 502, bomb("deflate")),
    Fault("endless_chunked", "too_large", 502, proxy_fault("serve", canned=endless_chunked)),
    Fault("huge_content_length", "too_large", 502, proxy_fault("serve", canned=trickle_after_huge_length)),
    *(Fault(mode, *_FAKE_KINDS[mode], fake_mode(mode)) for mode in FAILURE_MODES),
]


# --- helpers -----------------------------------------------------------------------------------------


@pytest.fixture
async def fault_proxy(upstream: Upstream) -> AsyncIterator[FaultProxy]:
    """A fault-injecting TCP proxy in front of the fake upstream, passing everything through for now."""
    proxy = FaultProxy(("127.0.0.1", upstream.port))
    await proxy.start()
    yield proxy
    await proxy.stop()


def peak_rss(pid: int) -> int:
    """A process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


async def outcomes(daemon: Daemon) -> dict[str, float]:
    """The daemon's upstream outcome counters, read from /metrics."""
    prefix = 'license_server_upstream_requests_total{outcome="'
    async with aiohttp.ClientSession() as session, session.get(f"{daemon.base}/metrics") as response:
        text = await response.text()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            label, _, value = line[len(prefix) :].partition('"} ')
            counts[label] = float(value)
    return counts


async def sent_upstream(daemon: Daemon) -> tuple[int, int]:
    """Requests the daemon sent upstream and the retries among them, read from /metrics.

    Each call asked upstream counts one outcome, and only those the open breaker stopped were never sent;
    each retry is one request more.
    """
    async with aiohttp.ClientSession() as session, session.get(f"{daemon.base}/metrics") as response:
        text = await response.text()
    asked = retries = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "license_server_upstream_requests_total":
                asked += sample.value if sample.labels["outcome"] != "breaker_open" else 0
            elif sample.name == "license_server_upstream_retries_total":
                retries = sample.value
    return int(asked + retries), int(retries)


async def kept_bodies(daemon: Daemon) -> list[bytes]:
    """Every answer body the daemon's store holds on disk."""
    await daemon.app[SERVICES].store.flush()
    path = StateFolder(daemon.config.state_dir).answers

    def read() -> list[bytes]:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            return [bytes(row[0]) for row in db.execute("SELECT body FROM answers")]

    return await asyncio.to_thread(read)


async def activate(daemon: Daemon) -> tuple[int, str, bytes]:
    """Activate machine-a with the SDK's form; status, answer source and body."""
    status, headers, body = await send_form(daemon.base, "/api/key/activate", activate_form())
    return status, headers["X-License-Server-Source"], body


async def ride_out(
    daemon: Daemon,
    upstream: Upstream,
    clock: Clock,
    kind: str,
    break_it: Callable[[bytes], Awaitable[None]],
    mend_it: Callable[[], Awaitable[None]],
) -> None:
    """A kept answer stands in, byte for byte and SDK-verified, and stays kept until a good answer comes."""
    status, source, good = await activate(daemon)
    assert (status, source) == (200, "forwarded"), good
    assert await kept_bodies(daemon) == [good]
    before = await outcomes(daemon)
    await break_it(good)

    status, source, served = await activate(daemon)
    assert (status, source) == (200, "kept_stale"), served
    assert served == good
    sdk = Workstation(lambda: daemon.api, upstream.fake.public_key_xml, "machine-a")
    license_key, message = await sdk.activate()
    assert license_key is not None, message
    assert license_key.raw_response.signature == json.loads(good)["signature"]
    after = await outcomes(daemon)
    assert after.get(kind, 0) - before.get(kind, 0) == 2, (before, after)
    assert await kept_bodies(daemon) == [good]

    await mend_it()
    clock.advance(60)  # the next signed answer differs from the kept one
    status, source, fresh = await activate(daemon)
    assert (status, source) == (200, "forwarded"), fresh
    assert fresh != good
    assert await kept_bodies(daemon) == [fresh]


class TestFaultClasses:
    """Each failure class is covered by the kept answer, and never replaces it."""

    @pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
    async def test_kept_answer_rides_out(
        self,
        fault: Fault,
        fault_proxy: FaultProxy,
        upstream: Upstream,
        daemon_factory: DaemonFactory,
        clock: Clock,
    ) -> None:
        """The workstation gets the kept bytes, its SDK verifies them, and the store keeps the original."""
        daemon = await daemon_factory(*SETTINGS, url=fault_proxy.url)

        async def mend() -> None:
            upstream.fake.mode = "ok"
            await fault_proxy.set("pass")

        await ride_out(
            daemon, upstream, clock, fault.kind, lambda good: fault.apply(fault_proxy, upstream, good), mend
        )

    async def test_latency_within_timeout_forwarded(
        self, fault_proxy: FaultProxy, upstream: Upstream, daemon_factory: DaemonFactory, clock: Clock
    ) -> None:
        """The proxy's latency is real, and a slow answer inside upstream.timeout is forwarded and kept."""
        daemon = await daemon_factory(*SETTINGS, url=fault_proxy.url)
        status, _, good = await activate(daemon)
        assert status == 200
        await fault_proxy.set("pass", latency=TIMEOUT / 2)
        clock.advance(60)
        started = time.monotonic()
        status, source, slow = await activate(daemon)
        assert time.monotonic() - started >= TIMEOUT / 2
        assert (status, source) == (200, "forwarded"), slow
        assert await kept_bodies(daemon) == [slow] != [good]

    @pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
    async def test_nothing_kept_gives_json_error(
        self, fault: Fault, fault_proxy: FaultProxy, upstream: Upstream, daemon_factory: DaemonFactory
    ) -> None:
        """With nothing kept the workstation gets the daemon's JSON error, never what upstream sent."""
        daemon = await daemon_factory(*SETTINGS, url=fault_proxy.url)
        good = upstream.fake.sign_answer(upstream.fake.license(PRODUCT, LICENSE))
        await fault.apply(fault_proxy, upstream, good)
        status, source, body = await activate(daemon)
        assert (status, source) == (fault.status, "upstream_failed"), body
        answer = json.loads(body)
        assert answer["result"] == 1
        assert "keeps no answer" in answer["message"]
        assert (await outcomes(daemon)).get(fault.kind) == 1


class TestLimits:
    """Oversized answers are cut at upstream.max_answer_bytes, however they are framed or compressed."""

    @pytest.mark.parametrize("encoding", ["gzip", "deflate"])
    async def test_bomb_does_not_inflate(
        self, encoding: str, fault_proxy: FaultProxy, upstream: Upstream, daemon_factory: DaemonFactory
    ) -> None:
        """1 GiB of zeros in 1 MB: read only up to the limit, quickly, without memory growing."""
        daemon = await daemon_factory(
            "upstream.timeout=10s", "upstream.breaker.failures=1000", url=fault_proxy.url
        )
        await bomb(encoding)(fault_proxy, upstream, b"")
        tracemalloc.start()
        try:
            started = time.monotonic()
            status, source, body = await activate(daemon)
            elapsed = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert (status, source) == (502, "upstream_failed"), body
        assert "larger than 1048576 bytes" in json.loads(body)["message"]
        assert peak < 16 * MIB, f"peak {peak / MIB:.1f} MiB"
        assert elapsed < 2, f"{elapsed:.2f} s"

    async def test_endless_chunked_cut(
        self, fault_proxy: FaultProxy, upstream: Upstream, daemon_factory: DaemonFactory
    ) -> None:
        """A chunked answer that never ends is cut at the limit, long before the timeout."""
        daemon = await daemon_factory(
            "upstream.timeout=10s", "upstream.breaker.failures=1000", url=fault_proxy.url
        )
        await fault_proxy.set("serve", canned=endless_chunked)
        started = time.monotonic()
        status, _, body = await activate(daemon)
        assert status == 502, body
        assert "larger than" in json.loads(body)["message"]
        assert time.monotonic() - started < 2
        assert fault_proxy.bytes_down < 64 * MIB  # socket buffers hold some; the whole stream is 256 MiB

    async def test_huge_content_length_refused_from_headers(
        self, fault_proxy: FaultProxy, upstream: Upstream, daemon_factory: DaemonFactory
    ) -> None:
        """An answer announcing more than the limit fails at once, without waiting for its body."""
        daemon = await daemon_factory(
            "upstream.timeout=10s", "upstream.breaker.failures=1000", url=fault_proxy.url
        )
        await fault_proxy.set("serve", canned=trickle_after_huge_length)
        started = time.monotonic()
        status, _, body = await activate(daemon)
        assert status == 502, body
        assert "larger than" in json.loads(body)["message"]
        assert time.monotonic() - started < 1

    @pytest.mark.slow
    async def test_bomb_leaves_process_memory_flat(
        self, tmp_path: Path, fault_proxy: FaultProxy, upstream: Upstream
    ) -> None:
        """A daemon process's peak RSS barely moves while it is sent gzip and deflate bombs."""
        process = DaemonProcess(
            tmp_path,
            {
                "upstream": {"url": fault_proxy.url, "timeout": "10s", "breaker": {"failures": 1000}},
                "public_key": upstream.fake.public_key_xml,
                "state_dir": str(tmp_path / "state"),
                "log": {"format": "json"},
            },
        )
        await process.start()
        try:
            assert (await send_form(process.base, "/api/key/activate", activate_form()))[0] == 200
            assert process.proc is not None
            before = peak_rss(process.proc.pid)
            for encoding in ("gzip", "deflate", "gzip", "deflate"):
                await bomb(encoding)(fault_proxy, upstream, b"")
                status, headers, _ = await send_form(process.base, "/api/key/activate", activate_form())
                assert (status, headers["X-License-Server-Source"]) == (200, "kept_stale")
            grown = peak_rss(process.proc.pid) - before
        finally:
            process.kill()
            await process.wait()
        assert grown < 16 * MIB, f"peak RSS grew by {grown / MIB:.1f} MiB"

    def test_bomb_is_well_formed(self) -> None:
        """The bomb builder makes streams zlib inflates to exactly the zeros it claims."""
        assert zlib.decompress(zero_bomb("gzip", 4 * MIB), wbits=31) == bytes(4 * MIB)
        assert zlib.decompress(zero_bomb("deflate", 4 * MIB)) == bytes(4 * MIB)


class TestRedirects:
    """A redirect from upstream is a failure, and its target is never contacted."""

    @pytest.mark.parametrize(
        "status",
        [
            "301 Moved Permanently",
            "302 Found",
            "303 See Other",
            "307 Temporary Redirect",
            "308 Permanent Redirect",
        ],
    )
    async def test_internal_redirect_not_followed(
        self,
        status: str,
        fault_proxy: FaultProxy,
        upstream: Upstream,
        daemon_factory: DaemonFactory,
        clock: Clock,
    ) -> None:
        """Redirected to another loopback port, the daemon serves the kept answer and calls nothing there."""
        trap = FaultProxy(("127.0.0.1", upstream.port))
        await trap.start()
        try:
            daemon = await daemon_factory(*SETTINGS, url=fault_proxy.url)
            location = f"Location: http://127.0.0.1:{trap.port}/api/key/activate"

            async def break_it(_good: bytes) -> None:
                await fault_proxy.set("serve", canned=http_answer(status, b"", location))

            async def mend() -> None:
                await fault_proxy.set("pass")

            await ride_out(daemon, upstream, clock, "redirect", break_it, mend)
            assert trap.connections == 0
            assert trap.bytes_up == 0
        finally:
            await trap.stop()


# --- TLS ---------------------------------------------------------------------------------------------


TLS_FAULTS = {
    "self_signed": ({"self_signed": True}, "self-signed certificate"),
    "wrong_host": ({"host": "licensing.example"}, "IP address mismatch"),
    "expired": ({"expired": True}, "certificate has expired"),
}


class TestTlsFaults:
    """A certificate that fails verification is an outage like any other, never a reason to trust it."""

    @pytest.mark.parametrize("case", sorted(TLS_FAULTS))
    async def test_bad_certificate_rides_out(
        self,
        case: str,
        fault_proxy: FaultProxy,
        upstream: Upstream,
        aiohttp_server: ServerFactory,
        daemon_factory: DaemonFactory,
        clock: Clock,
        tmp_path: Path,
    ) -> None:
        """With the CA trusted, only the certificate's one bad property makes the daemon refuse it."""
        settings, reason = TLS_FAULTS[case]
        pki = await asyncio.to_thread(Pki.create, tmp_path)
        good_context = await asyncio.to_thread(pki.server_context, "good")
        bad_context = await asyncio.to_thread(pki.server_context, case, **settings)  # type: ignore[arg-type]
        good = await aiohttp_server(upstream.fake.make_app(), host="127.0.0.1", ssl=good_context)
        bad = await aiohttp_server(upstream.fake.make_app(), host="127.0.0.1", ssl=bad_context)
        fault_proxy.target = ("127.0.0.1", good.port or 0)
        await fault_proxy.set("pass")
        daemon = await daemon_factory(
            f"upstream.ca_file={pki.ca_file}",
            *SETTINGS,
            url=f"https://127.0.0.1:{fault_proxy.port}",
        )

        async def break_it(_good: bytes) -> None:
            fault_proxy.target = ("127.0.0.1", bad.port or 0)
            await fault_proxy.set("pass")

        async def mend() -> None:
            fault_proxy.target = ("127.0.0.1", good.port or 0)
            await fault_proxy.set("pass")

        calls = len(upstream.fake.calls)
        await ride_out(daemon, upstream, clock, "tls", break_it, mend)
        assert len(upstream.fake.calls) == calls + 2, "nothing may be sent over an unverified connection"
        services = daemon.app[SERVICES]
        assert services.upstream is not None
        assert services.upstream.breaker.last_failure is not None
        assert reason in services.upstream.breaker.last_failure


class TestUpstreamHeaders:
    """Nothing in upstream's headers reaches a workstation but the Content-Type, and never a line break."""

    @pytest.mark.parametrize(
        "extra",
        [
            # hop-by-hop headers, and a header the Connection header names
            (
                "Connection: keep-alive, X-Secret",
                "Keep-Alive: timeout=5",
                "X-Secret: 1",
                "Upgrade: h2c",
                "Proxy-Authenticate: Basic",
                "Trailer: X-After",
            ),
            # headers a workstation must never be handed by the licensing service
            ("Set-Cookie: session=1; Path=/", "Location: http://10.0.0.1/", "Access-Control-Allow-Origin: *"),
            # an obsolete folded line trying to start a header of its own
            (
                "X-Note: a",
                " X-Injected: 1",
            ),
        ],
        ids=["hop-by-hop", "never-passed", "folded-line"],
    )
    async def test_only_content_type_passes(
        self,
        extra: tuple[str, ...],
        fault_proxy: FaultProxy,
        upstream: Upstream,
        daemon_factory: DaemonFactory,
    ) -> None:
        """A signed answer with odd headers still reaches the workstation, with the daemon's headers only."""
        daemon = await daemon_factory(*SETTINGS, url=fault_proxy.url)
        status, _, good = await activate(daemon)
        assert status == 200
        await fault_proxy.set(
            "serve",
            canned=http_answer("200 OK", good, "Content-Type: application/json; charset=utf-8", *extra),
        )
        status, headers, body = await send_form(daemon.base, "/api/key/activate", activate_form())
        assert status == 200
        assert body == good
        assert {name.lower() for name in headers} <= DAEMON_HEADERS
        assert all("\r" not in value and "\n" not in value for value in headers.values())


# --- answers that arrive but cannot be trusted -------------------------------------------------------


def spoil_metadata(body: bytes) -> bytes:
    """A signed answer whose metadata signature no longer verifies, while the license's still does."""
    answer = json.loads(body)
    envelope = json.loads(base64.b64decode(answer["metadata"]["signature"]))
    raw = bytearray(base64.b64decode(envelope["Signature"]))
    raw[len(raw) // 2] ^= 0x01
    envelope["Signature"] = base64.b64encode(bytes(raw)).decode()
    packed = json.dumps(envelope, separators=(",", ":")).encode()
    answer["metadata"]["signature"] = base64.b64encode(packed).decode()
    return json.dumps(answer, separators=(",", ":")).encode()


def serve_json(make: Callable[[Upstream], bytes]) -> Callable[[FaultProxy, Upstream], Awaitable[None]]:
    """Let the proxy answer every call with a JSON body made from the fake's licenses."""

    async def apply(proxy: FaultProxy, upstream: Upstream) -> None:
        canned = http_answer("200 OK", make(upstream), "Content-Type: application/json; charset=utf-8")
        await proxy.set("serve", canned=canned)

    return apply


async def spoil_signatures(_proxy: FaultProxy, upstream: Upstream) -> None:
    """The fake signs every answer with a signature one bit off."""
    upstream.fake.mode = "bad_signature"


@dataclass(frozen=True)
class Forgery:
    """An answer that parses but must not be trusted, and the outcome it counts as."""

    name: str
    kind: str
    fields: dict[str, str]  # form fields the calls add, e.g. to ask for metadata
    apply: Callable[[FaultProxy, Upstream], Awaitable[None]]


FORGERIES = [
    Forgery("bad_signature", "bad_signature", {}, spoil_signatures),
    Forgery(
        "bad_metadata_signature",
        "bad_signature",
        {"metadata": "True"},
        serve_json(
            lambda up: spoil_metadata(up.fake.sign_answer(up.fake.license(PRODUCT, LICENSE), metadata=True))
        ),
    ),
    Forgery(
        "other_license",
        "other_license",
        {},
        serve_json(lambda up: up.fake.sign_answer(up.fake.license(PRODUCT, OTHER_LICENSE))),
    ),
    Forgery(
        "malformed_signed_license",
        "invalid",
        {},
        serve_json(lambda _: b'{"result":0,"message":"","licenseKey":"not base64!","signature":"AAAA"}'),
    ),
]


async def status_document(daemon: Daemon) -> dict[str, Any]:
    """The daemon's /status."""
    async with aiohttp.ClientSession() as session, session.get(f"{daemon.base}/status") as response:
        document: dict[str, Any] = await response.json()
    return document


class TestForgedAnswers:
    """An answer that cannot be trusted is a failure like any other: for the breaker, metrics and /status."""

    @pytest.mark.parametrize("forgery", FORGERIES, ids=lambda f: f.name)
    async def test_forged_answers_open_the_breaker(
        self, forgery: Forgery, fault_proxy: FaultProxy, upstream: Upstream, daemon_factory: DaemonFactory
    ) -> None:
        """Ten forged answers in a row: three reach upstream, then the breaker opens; all get the kept one."""
        daemon = await daemon_factory(
            "upstream.breaker.failures=3", "upstream.breaker.reset_after=60s", url=fault_proxy.url
        )
        form = activate_form(**forgery.fields)
        status, headers, good = await send_form(daemon.base, "/api/key/activate", form)
        assert (status, headers["X-License-Server-Source"]) == (200, "forwarded"), good
        before = await status_document(daemon)
        sent, _ = await sent_upstream(daemon)
        await forgery.apply(fault_proxy, upstream)

        for _ in range(10):
            status, headers, body = await send_form(daemon.base, "/api/key/activate", form)
            assert (status, headers["X-License-Server-Source"]) == (200, "kept_stale"), body
            assert body == good
        assert (await sent_upstream(daemon))[0] - sent == 3
        after = await status_document(daemon)
        assert after["upstream"]["state"] == "open"
        assert after["upstream"]["last_success"] == before["upstream"]["last_success"]
        assert after["upstream"]["last_failure"] is not None
        counts = await outcomes(daemon)
        assert (counts.get(forgery.kind), counts.get("breaker_open")) == (3, 7)
