"""A long soak of the daemon process: steady workstation load while the upstream flaps through failure modes.

    .venv/bin/python ops/soak.py --minutes 60

Hosts the test suite's fake Cryptolens service in this process (so its failure mode can be switched at will),
runs the daemon as a child process in front of it, and drives a few hundred machines at a steady rate:
Activate, GetKey, floating Activate and Deactivate as raw SDK-shaped forms, plus a Key.activate through the
real Python SDK every couple of seconds. The upstream cycles ok / http500 / ok / hang / ok / reset / ok /
garbage / ok / bad_signature / ok / stopped (listener closed). Every signed answer is verified with the
vendor key and must name the license (and machine) asked for; a call that had a kept answer standing
must get it during an outage, and one whose seat a deactivation freed must not. At the end the daemon is
stopped with SIGTERM; every answered call must be in its audit trail, which `audit verify` must find intact
(against the log's checkpoints), the SQLite stores must pass integrity_check, and descriptors and memory
must not have grown. The summary is printed; the exit code is 1 if any promise was broken, and the state
and logs are then kept in --workdir.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import yaml
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from license_server.audit import chain
from tests.conftest import PRODUCT, TOKEN
from tests.fake_upstream import FakeCryptolens
from tests.test_proxy import activate_form as sdk_activate_form

FLOATING_INTERVAL = 60
FAILURES = ("http500", "hang", "reset", "garbage", "bad_signature", "stopped")
KEPT = frozenset({"kept_fresh", "kept_stale"})
UPSTREAM_TIMEOUT = 1.0
MAX_LATENCY = UPSTREAM_TIMEOUT + 3.0  # a hung upstream costs a call its timeout, plus room for a busy machine
LOAD_CONNECTIONS = 64  # keep-alive connections of the load generator
UPSTREAM_CONNECTIONS = 32  # upstream.max_connections (its default)
_FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@dataclasses.dataclass
class Machine:
    """A workstation: one machine code on one license, node-locked or floating."""

    code: str
    key: str
    floating: bool
    busy: bool = False


@dataclasses.dataclass
class Tally:
    """What the workstations saw."""

    calls: int = 0
    sdk_calls: int = 0
    client_errors: int = 0
    sources: Counter[str] = dataclasses.field(default_factory=Counter)
    by_mode: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)
    wrong: list[str] = dataclasses.field(default_factory=list)
    missing_kept: list[str] = dataclasses.field(default_factory=list)
    revived: list[str] = dataclasses.field(default_factory=list)
    latencies: list[float] = dataclasses.field(default_factory=list)
    request_ids: set[str] = dataclasses.field(default_factory=set)
    # (kind, license, machine) -> True: a kept answer must stand in; False: dropped, must not. The SDK and
    # the raw forms send the same fields, so they share kept answers.
    kept: dict[tuple[str, str, str], bool] = dataclasses.field(default_factory=dict)


class FakeHost:
    """The fake upstream served from this process on a fixed loopback port, stoppable and restartable."""

    def __init__(self, fake: FakeCryptolens) -> None:
        self.fake = fake
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen (on the same port as before, after the first start)."""
        self.runner = web.AppRunner(self.fake.make_app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        """Close the listener: connections are refused until the next start."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def set_mode(self, mode: str) -> None:
        """Act out `mode`: one of the fake's failure modes, or `stopped`."""
        if mode == "stopped":
            await self.stop()
            return
        if self.runner is None:
            await self.start()
        self.fake.mode = mode


class DaemonProcess:
    """The daemon as a child process, with its log in a file."""

    def __init__(self, workdir: Path, upstream_url: str, public_key: str, port: int) -> None:
        self.port = port
        self.log_path = workdir / "daemon.log"
        self.config_path = workdir / "config.yaml"
        self.state = workdir / "state"
        config = {
            "listen": {"host": "127.0.0.1", "port": port},
            "upstream": {
                "url": upstream_url,
                "timeout": f"{UPSTREAM_TIMEOUT}s",
                "connect_timeout": "0.5s",
                "breaker": {"failures": 3, "reset_after": "0.5s", "max_reset_after": "5s"},
            },
            "public_key": public_key,
            "shutdown_drain": "0s",
            "state_dir": str(self.state),
            "log": {"format": "json"},
            "audit": {"checkpoint_interval": "1m"},
        }
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        """Base URL of the daemon."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> float:
        """Start the process; seconds until /readyz answers 200."""
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: ASYNC220, S603 - returns at once; our own interpreter
                [sys.executable, "-m", "license_server", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
            )
        async with aiohttp.ClientSession() as session:
            while time.monotonic() - started < 30:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited at start, see {self.log_path}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{self.base}/readyz") as response:
                        if response.status == 200:
                            return time.monotonic() - started
                await asyncio.sleep(0.02)
        raise RuntimeError(f"daemon not ready within 30 s, see {self.log_path}")

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc is not None and self.proc.poll() is None

    def usage(self) -> tuple[float, int]:
        """Resident memory (MB) and open file descriptors of the process."""
        assert self.proc is not None
        rss_kb = 0
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
        return rss_kb / 1024, len(list(Path(f"/proc/{self.proc.pid}/fd").iterdir()))

    async def stop(self) -> int:
        """SIGTERM, and the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, 30)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def schedule(total: float, phase: float) -> list[tuple[str, float]]:
    """Upstream modes and how long each lasts: ok between failures, ending with a settling ok phase."""
    phases: list[tuple[str, float]] = []
    spent = 0.0
    settle = max(10.0, phase)
    index = 0
    while spent + 1.5 * phase + phase + settle <= total:
        phases += [("ok", 1.5 * phase), (FAILURES[index % len(FAILURES)], phase)]
        spent += 2.5 * phase
        index += 1
    phases.append(("ok", max(settle, total - spent)))
    return phases


def activate_form(machine: Machine) -> dict[str, str]:
    """The form the Python SDK sends for Key.activate (floating with FloatingTimeInterval)."""
    interval = str(FLOATING_INTERVAL if machine.floating else 0)
    return sdk_activate_form(machine.code, machine.key, FloatingTimeInterval=interval)


def getkey_form(machine: Machine) -> dict[str, str]:
    """The form the Python SDK sends for Key.get_key."""
    return {
        "token": TOKEN,
        "ProductId": str(PRODUCT),
        "key": machine.key,
        "FieldsToReturn": "0",
        "metadata": "False",
        "FloatingTimeInterval": "0",
        "Sign": "True",
        "ModelVersion": "3",
        "SignMethod": "1",
    }


def deactivate_form(machine: Machine) -> dict[str, str]:
    """The form the Python SDK sends for Key.deactivate."""
    return {
        "token": TOKEN,
        "ProductId": str(PRODUCT),
        "Key": machine.key,
        "Floating": str(machine.floating),
        "MachineCode": machine.code,
    }


def check_signed(answer: dict[str, Any], public: rsa.RSAPublicKey, machine: Machine, kind: str) -> str | None:
    """Why a successful Activate/GetKey answer is wrong or unverifiable, or None when it is right."""
    try:
        message = base64.b64decode(answer["licenseKey"], validate=True)
        public.verify(
            base64.b64decode(answer["signature"], validate=True), message, padding.PKCS1v15(), hashes.SHA256()
        )
        lic = json.loads(message)
    except (KeyError, TypeError, ValueError, binascii.Error, InvalidSignature) as exc:
        return f"unverifiable {kind}: {type(exc).__name__}"
    if lic.get("Key") != machine.key or lic.get("ProductId") != PRODUCT:
        return f"{kind} answer for another license"
    if kind == "activate":
        mids = {entry.get("Mid") for entry in lic.get("ActivatedMachines") or []}
        wanted = {f"floating:{machine.code}", f"floating:overdraft:{machine.code}"}
        if not (mids & wanted if machine.floating else machine.code in mids):
            return "activate answer does not list the machine"
    return None


class Soak:
    """The load, the checks and the upstream schedule."""

    def __init__(self, args: argparse.Namespace, host: FakeHost, daemon: DaemonProcess) -> None:
        self.args = args
        self.host = host
        self.daemon = daemon
        self.public = host.fake.private_key.public_key()
        self.rng = random.Random(args.seed)  # noqa: S311 - a load pattern, not a secret
        self.tally = Tally()
        self.mode = "ok"
        self.machines: list[Machine] = []
        for n in range(args.licenses):
            key = f"SOAK{n:04d}-NODE-LOCKED"
            host.fake.add_license(PRODUCT, key, max_machines=5)
            self.machines += [Machine(f"node-{n}-{m}", key, floating=False) for m in range(5)]
        for n in range(args.floating_licenses):
            key = f"SOAK{n:04d}-FLOATING"
            host.fake.add_license(PRODUCT, key, max_machines=3)
            self.machines += [Machine(f"float-{n}-{m}", key, floating=True) for m in range(6)]
        self.sdk_lock = asyncio.Lock()

    def note(self, source: str, ok: bool) -> None:
        """Count an answer by source, result and the upstream mode of the moment."""
        label = source if source != "forwarded" or ok else "forwarded_refusal"
        self.tally.sources[label] += 1
        self.tally.by_mode[(self.mode, "ok" if ok else "error")] += 1

    def wrong(self, text: str) -> None:
        """A wrong or unverifiable answer (a broken promise)."""
        self.tally.wrong.append(f"{self.mode}: {text}")

    async def raw_call(self, session: aiohttp.ClientSession, machine: Machine) -> None:
        """One SDK-shaped call as a raw form, its answer checked."""
        roll = self.rng.random()
        if machine.floating:
            kind = "activate" if roll < 0.8 else "deactivate"
        else:
            kind = "activate" if roll < 0.55 else "getkey" if roll < 0.85 else "deactivate"
        form = {"activate": activate_form, "getkey": getkey_form, "deactivate": deactivate_form}[kind](
            machine
        )
        started = time.monotonic()
        try:
            async with session.post(
                f"{self.daemon.base}/api/key/{kind}", data=urlencode(form), headers=_FORM
            ) as response:
                body = await response.read()
                headers = response.headers
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.tally.client_errors += 1
            self.wrong(f"{kind}: no answer ({type(exc).__name__})")
            return
        self.tally.latencies.append(time.monotonic() - started)
        self.tally.calls += 1
        if "X-Request-Id" in headers:
            self.tally.request_ids.add(headers["X-Request-Id"])
        else:
            self.wrong(f"{kind}: no X-Request-Id")
        source = headers.get("X-License-Server-Source", "")
        try:
            answer = json.loads(body)
            result = answer["result"]
        except (ValueError, KeyError, TypeError):
            self.wrong(f"{kind}: not a licensing answer ({source})")
            return
        ok = result == 0
        self.note(source, ok)
        if ok and kind != "deactivate" and (problem := check_signed(answer, self.public, machine, kind)):
            self.wrong(f"{problem} ({source})")
        self.expect(kind, machine, source, ok)

    def expect(self, kind: str, machine: Machine, source: str, ok: bool) -> None:
        """Check and track kept answers: served when one stands, never after a deactivation dropped it."""
        kept = self.tally.kept
        slot = (kind, machine.key, "" if kind == "getkey" else machine.code)
        if kind == "deactivate":
            if source == "forwarded" and ok and (activate := ("activate", machine.key, machine.code)) in kept:
                kept[activate] = False
            return
        if source == "forwarded":
            kept[slot] = ok  # a refusal drops the kept answer as a deactivation does
        elif source in KEPT and ok and kept.get(slot) is False:
            self.tally.revived.append(f"{self.mode}: {kind} {machine.code} served after it was freed")
        elif source == "upstream_failed" and kept.get(slot) and not machine.floating:
            self.tally.missing_kept.append(f"{self.mode}: {kind} {machine.code} not served")

    async def sdk_call(self, machine: Machine) -> None:
        """Key.activate through the real Python SDK (node-locked machines only)."""
        from licensing.methods import Helpers, Key

        def run() -> tuple[Any, str]:
            result = Key.activate(TOKEN, self.host.fake.public_key_xml, PRODUCT, machine.key, machine.code)
            return result[0], str(result[1])

        started = time.monotonic()
        async with self.sdk_lock:
            license_key, message = await asyncio.to_thread(run)
        self.tally.latencies.append(time.monotonic() - started)
        self.tally.sdk_calls += 1
        slot = ("activate", machine.key, machine.code)
        ok = license_key is not None
        self.tally.sources["sdk_licensed" if ok else "sdk_refused"] += 1
        self.tally.by_mode[(self.mode, "ok" if ok else "error")] += 1
        if ok:
            if license_key.key != machine.key or not Helpers.IsOnRightMachine(
                license_key, custom_machine_code=machine.code
            ):
                self.wrong("SDK got a license for another key or machine")
            self.tally.kept[slot] = True
        elif self.tally.kept.get(slot):
            self.tally.missing_kept.append(f"{self.mode}: sdk activate {machine.code} not served: {message}")

    async def run_machine(self, coro: Any, machine: Machine) -> None:
        """Run one call with the machine marked busy, so each machine's calls come one after another."""
        machine.busy = True
        try:
            await coro
        finally:
            machine.busy = False

    async def load(self, stop: asyncio.Event) -> None:
        """Start calls at the configured rate until told to stop; wait for those in flight."""
        from licensing.internal import HelperMethods

        HelperMethods.server_address = f"{self.daemon.base}/api/"
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        connector = aiohttp.TCPConnector(limit=LOAD_CONNECTIONS)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            tick = loop.time()
            last_sdk = tick
            while not stop.is_set():
                machine = self.rng.choice(self.machines)
                if not machine.busy:
                    if loop.time() - last_sdk >= self.args.sdk_every and not machine.floating:
                        last_sdk = loop.time()
                        coro = self.sdk_call(machine)
                    else:
                        coro = self.raw_call(session, machine)
                    task = asyncio.ensure_future(self.run_machine(coro, machine))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                tick += 1 / self.args.rate
                await asyncio.sleep(max(0.0, tick - loop.time()))
            await asyncio.gather(*tasks)


def percentile(values: list[float], fraction: float) -> float:
    """The value below which `fraction` of the values lie."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def audit_calls(folder: Path) -> tuple[int, set[str]]:
    """Number of call records in the trail, and their request ids."""
    count, ids = 0, set()
    for audit_file in chain.list_files(folder):
        for line in audit_file.path.read_bytes().splitlines():
            record = json.loads(line)
            if record["type"] == chain.CALL:
                count += 1
                ids.add(record["request_id"])
    return count, ids


def integrity(path: Path) -> str:
    """PRAGMA integrity_check of one SQLite file."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return ", ".join(row[0] for row in db.execute("PRAGMA integrity_check"))


async def soak(args: argparse.Namespace) -> int:
    """Run the soak; 0 when every promise held, 1 otherwise."""
    workdir: Path = args.workdir
    host = FakeHost(FakeCryptolens())
    await host.start()
    daemon = DaemonProcess(
        workdir, f"http://127.0.0.1:{host.port}", host.fake.public_key_xml, args.port or free_port()
    )
    runner = Soak(args, host, daemon)
    phases = schedule(args.minutes * 60, args.phase_seconds)
    print(
        f"soak: {args.minutes:g} min, {len(runner.machines)} machines, {args.rate:g} calls/s, "
        f"seed {args.seed}, workdir {workdir}",
        flush=True,
    )
    ready = await daemon.start()
    usage = {"start": daemon.usage()}
    peak_rss, peak_fds = usage["start"]
    stop = asyncio.Event()
    load = asyncio.ensure_future(runner.load(stop))
    began = time.monotonic()
    broken: list[str] = []
    try:
        for mode, seconds in phases:
            runner.mode = mode
            await host.set_mode(mode)
            print(f"soak: {time.monotonic() - began:7.1f}s upstream {mode} for {seconds:g}s", flush=True)
            host.fake.calls.clear()  # the fake records every call; keep its memory flat
            phase_end = time.monotonic() + seconds
            while time.monotonic() < phase_end:
                await asyncio.sleep(min(5.0, max(0.0, phase_end - time.monotonic())))
                if not daemon.alive():
                    broken.append("the daemon process died")
                    break
                rss, fds = daemon.usage()
                peak_rss, peak_fds = max(peak_rss, rss), max(peak_fds, fds)
                if "middle" not in usage and time.monotonic() - began >= args.minutes * 30:
                    usage["middle"] = (rss, fds)
            if broken:
                break
        if not broken:
            usage["end"] = daemon.usage()
    finally:
        stop.set()
        await load
    code = await daemon.stop() if daemon.alive() else None
    await host.stop()
    tally = runner.tally
    records, ids = await asyncio.to_thread(audit_calls, daemon.state / "audit")
    verify = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "license_server",
            "audit",
            "verify",
            "--config",
            str(daemon.config_path),
            "--checkpoints",
            str(daemon.log_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    stores = {
        name: await asyncio.to_thread(integrity, daemon.state / name)
        for name in ("answers.sqlite3", "seats.sqlite3")
    }
    answered = tally.calls + tally.sdk_calls
    if code != 0:
        broken.append(f"SIGTERM exit code {code}")
    if tally.wrong:
        broken.append(f"{len(tally.wrong)} wrong or unverifiable answers")
    if tally.missing_kept:
        broken.append(f"{len(tally.missing_kept)} errors where a kept answer should have stood in")
    if tally.revived:
        broken.append(f"{len(tally.revived)} freed seats served from kept answers")
    if records != answered:
        broken.append(f"audit call records {records} != answered calls {answered}")
    if not tally.request_ids <= ids:
        broken.append(f"{len(tally.request_ids - ids)} answered request ids missing from the audit trail")
    if verify.returncode != 0:
        broken.append("audit verify failed")
    if any(result != "ok" for result in stores.values()):
        broken.append(f"SQLite integrity: {stores}")
    if "end" in usage and usage["end"][1] > usage["start"][1] + LOAD_CONNECTIONS + UPSTREAM_CONNECTIONS + 16:
        broken.append(f"descriptors grew from {usage['start'][1]} to {usage['end'][1]}")
    if "middle" in usage and "end" in usage and usage["end"][0] > usage["middle"][0] + 50:
        broken.append(f"memory grew from {usage['middle'][0]:.0f} MB to {usage['end'][0]:.0f} MB")
    if tally.latencies and max(tally.latencies) > MAX_LATENCY:
        broken.append(f"a call took {max(tally.latencies):.2f}s (> {MAX_LATENCY:g}s)")
    lat = tally.latencies
    print("\nsoak summary")
    print(f"  ran {time.monotonic() - began:.0f}s, daemon ready in {ready:.2f}s, SIGTERM exit code {code}")
    print(f"  calls answered: {answered} ({tally.calls} raw forms, {tally.sdk_calls} through the SDK)")
    print(f"  client errors (no answer): {tally.client_errors}")
    print("  answers by source: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.sources.items())))
    per_mode = ", ".join(f"{m}/{r} {n}" for (m, r), n in sorted(tally.by_mode.items()))
    print(f"  answers by upstream mode: {per_mode}")
    print(f"  wrong or unverifiable answers: {len(tally.wrong)}")
    print(
        f"  kept answer missing where one stood: {len(tally.missing_kept)}; "
        f"freed seat served again: {len(tally.revived)}"
    )
    print(
        f"  audit call records {records} vs answered calls {answered}; raw request ids missing: "
        f"{len(tally.request_ids - ids)}"
    )
    print(f"  audit verify: exit {verify.returncode}: {(verify.stdout + verify.stderr).strip()[-300:]}")
    print(f"  SQLite integrity_check: {stores}")
    for point in ("start", "middle", "end"):
        if point in usage:
            rss, fds = usage[point]
            print(f"  {point:6} RSS {rss:.1f} MB, fds {fds}")
    print(f"  peak   RSS {peak_rss:.1f} MB, fds {peak_fds}")
    print(
        f"  latency: p50 {1000 * percentile(lat, 0.5):.1f} ms, p99 {1000 * percentile(lat, 0.99):.1f} ms, "
        f"max {1000 * max(lat, default=0):.1f} ms"
    )
    for text in (tally.wrong + tally.missing_kept + tally.revived)[:20]:
        print(f"  ! {text}")
    if broken:
        print("BROKEN: " + "; ".join(broken))
        print(f"state and logs kept in {workdir}")
        return 1
    print("all promises held")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="soak the daemon under load while the upstream flaps")
    parser.add_argument("--minutes", type=float, default=60.0, help="how long to run")
    parser.add_argument("--rate", type=float, default=25.0, help="workstation calls a second")
    parser.add_argument("--phase-seconds", type=float, default=30.0, help="length of each failure phase")
    parser.add_argument("--licenses", type=int, default=48, help="node-locked licenses (5 machines each)")
    parser.add_argument(
        "--floating-licenses", type=int, default=10, help="floating licenses (3 seats, 6 machines)"
    )
    parser.add_argument("--sdk-every", type=float, default=2.0, help="seconds between real SDK calls")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    parser.add_argument("--port", type=int, default=0, help="daemon port (default: a free one)")
    parser.add_argument("--workdir", type=Path, default=None, help="state and logs (default: a new temp dir)")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = int(time.time())
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="license-server-soak-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    sys.exit(asyncio.run(soak(args)))


if __name__ == "__main__":
    main()
