"""The license-server benchmark: `python bench/run.py [--quick]` from the repository root.

Needs the repo venv and `apt-get install -y wrk nghttp2-client`. Servers run on core 0, load generators
and the fake upstream on core 1. Each repetition runs every variant in rotated order; figures are medians,
ratios are paired within a repetition. Prints a Markdown table; raw runs and exact commands go to
bench/results/latest.json (latest-quick.json for --quick). `--profile kept` (or another variant) instead
samples that server under wrk with py-spy.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import platform
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import aiohttp
import yaml

from bench import dataset, ledger
from bench.load import LoadError, h2load, wrk, wrk_pass
from bench.procs import (
    ROOT,
    Processes,
    core_seconds,
    cpu_seconds,
    die_with_parent,
    free_port,
    pinned,
    rss_mb,
    wait_ready,
)
from license_server.config import KeepConfig

SERVER_CORE = 0
LOAD_CORE = 1
RESULTS = ROOT / "bench" / "results"
VARIANTS = ("baseline", "kept", "passthrough", "forwarding")
UPSTREAM_CONNECTIONS = 32  # the daemon's upstream.max_connections default; the pass-through gets the same
BASELINE_BYTES = 2048
_SOURCE_HEADER = "X-License-Server-Source"
SAMPLES_PER_S = 200  # py-spy's sampling rate for --profile


@dataclass(frozen=True, slots=True)
class Plan:
    """How big and how long each part of the benchmark is."""

    licenses: int  # licenses in the load, 5 machines each
    repetitions: int
    measure_s: int  # wrk counts whole seconds
    latency_s: float
    kept_many: int  # kept answers on disk for memory and start-up
    startup_runs: int
    ledger: ledger.LedgerShape
    report_runs: int
    connections: int = 64
    latency_rate: int = 1000


FULL = Plan(
    licenses=800,
    repetitions=5,
    measure_s=6,
    latency_s=5,
    kept_many=100_000,
    startup_runs=3,
    ledger=ledger.LedgerShape(),
    report_runs=3,
)
QUICK = Plan(
    licenses=40,
    repetitions=1,
    measure_s=1,
    latency_s=1,
    kept_many=2_000,
    startup_runs=1,
    ledger=ledger.LedgerShape().scaled(licenses=20, days=30),
    report_runs=1,
)


@dataclass(slots=True)
class Server:
    """A server under test: its process, port, output file and (for the daemon) state directory."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    output: Path
    command: str
    state_dir: Path | None = None
    config: dict[str, Any] | None = None  # the daemon's, as written to its config.yaml

    @property
    def url(self) -> str:
        """Where workstations call it."""
        return f"http://127.0.0.1:{self.port}{dataset.PATH}"


@dataclass(slots=True)
class Bench:
    """One benchmark run: its plan, scratch folder, data files and running processes."""

    plan: Plan
    work: Path
    procs: Processes
    vendor: dataset.Vendor
    forms: Path
    first_form: Path
    baseline_answer: Path
    public_key: Path
    kept_template: Path
    upstream_port: int = 0
    serial: int = 0
    results: dict[str, Any] = field(default_factory=dict)

    def run_dir(self, name: str) -> Path:
        """A fresh folder for one server run."""
        self.serial += 1
        folder = self.work / "runs" / f"{self.serial:03d}-{name}"
        folder.mkdir(parents=True)
        return folder


# --- setup --------------------------------------------------------------------------------------------


def prepare(plan: Plan, work: Path, procs: Processes) -> Bench:
    """Sign the answers and write the forms, the fake upstream's table and the kept-answer state."""
    started = time.perf_counter()
    vendor = dataset.Vendor.sign(plan.licenses)
    data = work / "data"
    data.mkdir(parents=True)
    forms = data / "forms.txt"
    count = dataset.write_forms(forms, plan.licenses)
    first_form = data / "first-form.txt"
    first_form.write_text(forms.read_text().splitlines()[0])
    baseline_answer = data / "baseline-answer.json"
    baseline_answer.write_bytes(fixed_answer(BASELINE_BYTES))
    public_key = data / "vendor-public-key.xml"
    public_key.write_text(vendor.public_key_xml)
    vendor.write_upstream_answers(data / "upstream-answers.json")
    kept_template = data / "kept-state"
    kept = dataset.fill_state_dir(kept_template, vendor, plan.licenses)
    bench = Bench(plan, work, procs, vendor, forms, first_form, baseline_answer, public_key, kept_template)
    sizes = [len(answer) for answer in vendor.answers]
    bench.results["dataset"] = {
        "licenses": plan.licenses,
        "machines_per_license": dataset.MACHINES_PER_LICENSE,
        "forms": count,
        "form_bytes": statistics.median(len(line) for line in forms.read_text().splitlines()),
        "signed_answers": len(vendor.answers),
        "answer_bytes": {"min": min(sizes), "median": statistics.median(sizes), "max": max(sizes)},
        "kept_answers": kept,
        "setup_s": round(time.perf_counter() - started, 2),
    }
    return bench


def fixed_answer(size: int) -> bytes:
    """A Cryptolens-shaped JSON answer of exactly `size` bytes."""
    shape = {"licenseKey": "", "signature": "S" * 344, "result": 0, "message": ""}
    shape["licenseKey"] = "e" * (size - len(json.dumps(shape, separators=(",", ":"))))
    return json.dumps(shape, separators=(",", ":")).encode()


# --- servers ------------------------------------------------------------------------------------------


def start_small(bench: Bench, kind: str, *extra: str, core: int = SERVER_CORE) -> Server:
    """Start one of bench/servers.py's servers and wait until it accepts connections."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.servers", kind, "--port", str(port), *extra]
    output = bench.run_dir(kind) / "output.log"
    proc = bench.procs.start(argv, core=core, output=output)
    wait_ready(proc, port, None, output)
    return Server(kind, proc, port, output, shlex.join(pinned(core, argv)))


def start_upstream(bench: Bench) -> Server:
    """The fast fake upstream both forwarding variants share, on the load generator's core."""
    answers = bench.work / "data" / "upstream-answers.json"
    server = start_small(bench, "upstream", "--answers", str(answers), core=LOAD_CORE)
    bench.upstream_port = server.port
    return server


def start_daemon(
    bench: Bench,
    name: str,
    *,
    state_dir: Path,
    offline: bool,
    memory_entries: int | None = None,
    database_url: str | None = None,
    core: int = SERVER_CORE,
    node_name: str = "bench",
) -> Server:
    """Write a configuration and start `license-server serve`, JSON log at level info to a file."""
    folder = bench.run_dir(name)
    port = free_port()
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"offline": True} if offline else {"url": f"http://127.0.0.1:{bench.upstream_port}"},
        "public_key": str(bench.public_key),
        "state_dir": str(state_dir),
        "log": {"level": "info", "format": "json"},
        "shutdown_drain": "0s",  # no balancer to drain for: a stop need not wait
    }
    if memory_entries is not None:
        config["keep"] = {"memory_entries": memory_entries}
    if database_url is not None:  # the PostgreSQL backend (bench/backends.py)
        config["database"] = {"url": database_url}
        config["node"] = {"name": node_name}
    config_file = folder / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [str(Path(sys.executable).parent / "license-server"), "serve", "--config", str(config_file)]
    output = folder / "daemon.log"
    proc = bench.procs.start(argv, core=core, output=output)
    wait_ready(proc, port, "/readyz", output)
    return Server(name, proc, port, output, shlex.join(pinned(core, argv)), state_dir, config)


def start_variant(bench: Bench, name: str) -> Server:
    """Start the server a throughput variant measures, with fresh state."""
    if name == "baseline":
        return start_small(bench, "baseline", "--answer", str(bench.baseline_answer))
    if name == "passthrough":
        upstream = f"http://127.0.0.1:{bench.upstream_port}"
        return start_small(
            bench, "passthrough", "--upstream", upstream, "--connections", str(UPSTREAM_CONNECTIONS)
        )
    state = bench.work / "state" / f"{name}-{bench.serial + 1:03d}"
    if name == "kept":
        shutil.copytree(bench.kept_template, state)
        return start_daemon(bench, name, state_dir=state, offline=True)
    return start_daemon(bench, name, state_dir=state, offline=False)


def check_answer(bench: Bench, server: Server) -> None:
    """One call before the load: the right bytes, and (for the daemon) answered the way the variant means."""
    form = bench.first_form.read_bytes()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", dataset.PATH, form, {"Content-Type": "application/x-www-form-urlencoded"})
        answer = conn.getresponse()
        body, source = answer.read(), answer.getheader(_SOURCE_HEADER)
    finally:
        conn.close()
    expected = bench.baseline_answer.read_bytes() if server.name == "baseline" else bench.vendor.answer(0)
    wanted_source = {"kept": "kept_stale", "forwarding": "forwarded"}.get(server.name)
    if answer.status != 200 or body != expected or source != wanted_source:
        raise RuntimeError(
            f"{server.name}: HTTP {answer.status}, {_SOURCE_HEADER}: {source}, {len(body)} bytes"
            f" (expected 200, {wanted_source}, the signed answer); see {server.output}"
        )


def daemon_log_problems(server: Server) -> dict[str, int]:
    """Warnings and errors the daemon logged, by event."""
    problems: Counter[str] = Counter()
    for line in server.output.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            problems["(not JSON)"] += 1
            continue
        if entry.get("level") in ("warning", "error", "critical"):
            problems[str(entry.get("event"))] += 1
    return dict(problems)


def kept_rows(state_dir: Path) -> int:
    """How many answers a stopped daemon keeps in its state directory."""
    db = sqlite3.connect(f"{(state_dir / dataset.ANSWERS_FILE).as_uri()}?mode=ro", uri=True)
    try:
        count: int = db.execute("SELECT count(*) FROM answers").fetchone()[0]
        return count
    finally:
        db.close()


# --- the measurements ---------------------------------------------------------------------------------


def throughput_and_latency(bench: Bench) -> None:
    """Every variant in each repetition, rotated: a pass over every form, wrk at 64 connections, h2load."""
    plan = bench.plan
    runs: list[dict[str, Any]] = []
    upstream = start_upstream(bench)
    bench.results["upstream_command"] = upstream.command
    try:
        for rep in range(plan.repetitions):
            shift = rep % len(VARIANTS)
            for name in VARIANTS[shift:] + VARIANTS[:shift]:
                runs.append(measure_variant(bench, name, rep))
                _progress(runs[-1])
    finally:
        bench.procs.stop(upstream.proc)
    bench.results["throughput_runs"] = runs


def measure_variant(bench: Bench, name: str, rep: int) -> dict[str, Any]:
    """One server start: check, warm up (every form once), throughput, latency, stop, check log and state."""
    plan = bench.plan
    server = start_variant(bench, name)
    record: dict[str, Any] = {"variant": name, "repetition": rep, "server_command": server.command}
    if server.config is not None:
        record["server_config"] = server.config
    try:
        check_answer(bench, server)
        forms = bench.results["dataset"]["forms"]
        warm = wrk_pass(
            server.url, bench.forms, count=forms, connections=plan.connections, core=LOAD_CORE, limit=120
        )
        if warm.failed:
            raise RuntimeError(f"{name}: {warm.failed} failed calls in the warm-up; see {server.output}")
        record["warm_up"] = warm.as_dict()
        record["loadavg_before"] = os.getloadavg()[0]
        server_before, core_before = cpu_seconds(server.proc.pid), core_seconds(SERVER_CORE)
        run = wrk(
            server.url, bench.forms, connections=plan.connections, seconds=plan.measure_s, core=LOAD_CORE
        )
        if run.errors:
            raise RuntimeError(f"{name}: {run.errors} failed calls under load; see {server.output}")
        record["throughput"] = run.as_dict()
        record.update(core_use(server, server_before, core_before, run.seconds))
        time.sleep(0.5)
        latency = h2load(
            server.url,
            bench.first_form,
            rate=plan.latency_rate,
            seconds=plan.latency_s,
            core=LOAD_CORE,
            log_file=server.output.parent / "latency.tsv",
        )
        if latency.failed:
            raise RuntimeError(f"{name}: {latency.failed} failed calls at a fixed rate; see {server.output}")
        record["latency"] = latency.as_dict()
        record["rss_mb"] = round(rss_mb(server.proc.pid)[0], 1)
    finally:
        record["exit_status"] = bench.procs.stop(server.proc)
    if server.state_dir is not None:
        record["daemon_log_problems"] = problems = daemon_log_problems(server)
        if problems:
            print(f"  ({name} logged warnings or errors: {problems}; see {server.output})")
        record["kept_answers_after"] = kept = kept_rows(server.state_dir)
        if kept != bench.results["dataset"]["forms"]:
            raise RuntimeError(f"{name}: {kept} answers kept after the run, not {forms}; see {server.output}")
        shutil.rmtree(server.state_dir)
    return record


def core_use(
    server: Server, server_before: float, core_before: tuple[float, float], seconds: float
) -> dict[str, float]:
    """How the server core was shared during a run: the server, other processes, the hypervisor (%)."""
    server_cpu = cpu_seconds(server.proc.pid) - server_before
    busy_after, stolen_after = core_seconds(SERVER_CORE)
    busy, stolen = busy_after - core_before[0], stolen_after - core_before[1]
    return {
        "server_cpu_percent": round(100 * server_cpu / seconds, 1),  # below 100: the server waited
        "core_others_percent": round(100 * max(0.0, busy - server_cpu) / seconds, 1),
        "core_steal_percent": round(100 * stolen / seconds, 1),
    }


def startup_and_memory(bench: Bench) -> None:
    """Start-up to READY with many kept answers on disk, then RSS after a pass over all of them."""
    plan = bench.plan
    licenses = plan.kept_many // dataset.MACHINES_PER_LICENSE
    state = bench.work / "state" / "many"
    started = time.perf_counter()
    kept = dataset.fill_state_dir(state, bench.vendor, licenses)
    forms = bench.work / "data" / "forms-many.txt"
    dataset.write_forms(forms, licenses)
    bench.results["many"] = {"kept_answers": kept, "setup_s": round(time.perf_counter() - started, 2)}
    startups = []
    for _ in range(plan.startup_runs):
        began = time.perf_counter()
        server = start_daemon(bench, "startup", state_dir=state, offline=True)
        ready = time.perf_counter() - began
        rss = rss_mb(server.proc.pid)[0]
        bench.procs.stop(server.proc)
        startups.append(
            {
                "seconds": round(ready, 3),
                "rss_mb": round(rss, 1),
                "command": server.command,
                "config": server.config,
            }
        )
        print(f"  start-up to READY with {kept:,} kept answers: {ready:.2f} s", flush=True)
    bench.results["startup_runs"] = startups
    memory = []
    for entries in (None, plan.kept_many):
        server = start_daemon(bench, "memory", state_dir=state, offline=True, memory_entries=entries)
        try:
            at_start = rss_mb(server.proc.pid)[0]
            passed = wrk_pass(server.url, forms, count=kept, connections=32, core=LOAD_CORE, limit=600)
            after, peak = rss_mb(server.proc.pid)
        finally:
            bench.procs.stop(server.proc)
        if passed.failed:
            raise RuntimeError(f"memory pass: {passed.failed} calls failed; see {server.output}")
        in_memory = entries if entries is not None else KeepConfig().memory_entries
        memory.append(
            {
                "memory_entries": in_memory,
                "configured": entries is not None,
                "rss_at_start_mb": round(at_start, 1),
                "rss_after_pass_mb": round(after, 1),
                "peak_rss_mb": round(peak, 1),
                "pass": passed.as_dict(),
                "server_command": server.command,
                "server_config": server.config,
                "daemon_log_problems": daemon_log_problems(server),
            }
        )
        print(f"  RSS after a pass over {kept:,} kept answers, memory_entries {in_memory:,}: {after:.0f} MB")
    bench.results["memory_runs"] = memory


def runway_report(bench: Bench) -> None:
    """Time `license-server report runway` over the kept answers of the start-up state."""
    state = bench.work / "state" / "many"
    argv = pinned(SERVER_CORE, [str(Path(sys.executable).parent / "license-server"), "report", "runway"])
    argv += ["--set", f"state_dir={state}", "--format", "csv"]
    kept = bench.results["many"]["kept_answers"]
    runs = []
    for _ in range(bench.plan.report_runs):
        began = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True, cwd=ROOT, timeout=300)
        runs.append(round(time.perf_counter() - began, 3))
        print(f"  runway report over {kept:,} kept answers: {runs[-1]:.2f} s", flush=True)
    bench.results["runway_runs"] = {"command": shlex.join(argv) + " > /dev/null", "seconds": runs}


def seat_report(bench: Bench) -> None:
    """Time `license-server report seats` and `report plan` over a ledger of about 1,000,000 calls."""
    plan = bench.plan
    state = bench.work / "state" / "ledger"
    state.mkdir(parents=True)
    started = time.perf_counter()
    calls = ledger.build(state / ledger.LEDGER_FILE, plan.ledger)
    bench.results["ledger"] = {
        "calls": calls,
        "shape": dataclasses.asdict(plan.ledger),
        "setup_s": round(time.perf_counter() - started, 2),
    }
    since = f"{plan.ledger.days}d"
    command = [str(Path(sys.executable).parent / "license-server"), "report"]
    for name, options, key in (
        ("seats", ["--every", "day", "--format", "csv"], "report_runs"),
        ("plan", ["--format", "csv"], "plan_report_runs"),
    ):
        argv = pinned(
            SERVER_CORE, [*command, name, "--set", f"state_dir={state}", "--since", since, *options]
        )
        bench.results[key] = {
            "command": shlex.join(argv) + " > /dev/null",
            "seconds": timed_runs(argv, plan.report_runs, f"{name} report over {calls:,} calls"),
        }


def timed_runs(argv: list[str], runs: int, what: str) -> list[float]:
    """Seconds each of `runs` runs of a report command took, its output thrown away."""
    seconds = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True, cwd=ROOT, timeout=300)
        seconds.append(round(time.perf_counter() - began, 3))
        print(f"  {what}: {seconds[-1]:.2f} s", flush=True)
    return seconds


# --- summary ------------------------------------------------------------------------------------------


Row = tuple[str, str, str, str]  # figure, measured, target, ratio or verdict


def summarise(results: dict[str, Any], plan: Plan) -> list[Row]:
    """The table: throughput, latency, memory, start-up and the seat report."""
    return [
        *_throughput_rows(results["throughput_runs"], plan),
        *_latency_rows(results["throughput_runs"], plan),
        *_memory_rows(results["memory_runs"], results["many"]["kept_answers"]),
        *_startup_and_report_rows(results, plan),
    ]


def _throughput_rows(runs: list[dict[str, Any]], plan: Plan) -> list[Row]:
    """Answers per second at 64 connections; ratios paired within each repetition."""
    rate = {name: _rate([r for r in runs if r["variant"] == name]) for name in VARIANTS}
    at = f"{plan.connections} connections"
    return [
        (f"baseline: aiohttp answering a fixed 2 KB JSON, {at}", rate["baseline"], "", "reference"),
        (
            f"kept-copy answers, {at}",
            rate["kept"],
            "≥ 0.60 of baseline",
            _ratio(_paired(runs, "kept", "baseline"), 0.60),
        ),
        (
            f"minimal aiohttp pass-through to the fake upstream, {at}",
            rate["passthrough"],
            "",
            "reference",
        ),
        (
            f"forwarded answers (verified, kept, audited), {at}",
            rate["forwarding"],
            "≥ 0.70 of pass-through",
            _ratio(_paired(runs, "forwarding", "passthrough"), 0.70),
        ),
    ]


def _latency_rows(runs: list[dict[str, Any]], plan: Plan) -> list[Row]:
    """p50 and p99 at the fixed rate; a server that could not keep up with the rate is named so."""
    rows = []
    for name, label in (
        ("kept", "kept-copy answers"),
        ("forwarding", "forwarded answers"),
        ("baseline", "baseline"),
        ("passthrough", "pass-through"),
    ):
        latency = [r["latency"] for r in runs if r["variant"] == name]
        p50 = statistics.median(run["p50_ms"] for run in latency)
        p99 = statistics.median(run["p99_ms"] for run in latency)
        achieved = statistics.median(run["rate"] for run in latency)
        measured = f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"
        target = "p99 ≤ 2 ms" if name == "kept" else ""
        verdict = (
            _verdict(p99 <= 2.0) if name == "kept" else "no target" if name == "forwarding" else "reference"
        )
        if achieved < 0.95 * plan.latency_rate:
            measured += f" (saturated: {achieved:,.0f} calls/s achieved)"
            verdict = "missed: cannot sustain the rate" if name == "kept" else verdict
        rows.append((f"latency of {label} at {plan.latency_rate:,} calls/s", measured, target, verdict))
    return rows


def _memory_rows(runs: list[dict[str, Any]], many: int) -> list[Row]:
    """RSS after a pass over every kept answer, with the default and with every answer in memory."""
    rows = []
    default = next(run for run in runs if not run["configured"])
    for run in runs:
        entries, rss = run["memory_entries"], run["rss_after_pass_mb"]
        figure = f"resident memory after a pass over {many:,} kept answers, keep.memory_entries {entries:,}"
        if not run["configured"]:
            rows.append((f"{figure} (default)", f"{rss:.0f} MB", "≤ 250 MB", _verdict(rss <= 250)))
            continue
        extra = entries - default["memory_entries"]
        grown = rss - default["rss_after_pass_mb"]
        verdict = (
            f"+{grown:.0f} MB for {extra:,} more in memory ({grown * 1000 / extra:.1f} KB each)"
            if extra > 0
            else ""
        )
        within = "within" if rss <= 250 else "over"
        rows.append(
            (figure, f"{rss:.0f} MB", "bounded by configuration", f"{within} 250 MB; {verdict}".rstrip("; "))
        )
    return rows


def _startup_and_report_rows(results: dict[str, Any], plan: Plan) -> list[Row]:
    """Start-up to READY and the seat report, medians of their runs."""
    many = results["many"]["kept_answers"]
    startup = statistics.median(run["seconds"] for run in results["startup_runs"])
    calls = results["ledger"]["calls"]
    report = statistics.median(results["report_runs"]["seconds"])
    runway = statistics.median(results["runway_runs"]["seconds"])
    planned = statistics.median(results["plan_report_runs"]["seconds"])
    return [
        (
            f"start-up to READY, {many:,} kept answers on disk",
            f"{startup:.2f} s",
            "≤ 2 s",
            _verdict(startup <= 2),
        ),
        (
            f"seat report over {calls:,} recorded calls ({plan.ledger.days} days, by day)",
            f"{report:.2f} s",
            "≤ 3 s",
            _verdict(report <= 3),
        ),
        (
            f"plan report over the same ledger ({plan.ledger.days} days)",
            f"{planned:.2f} s",
            "≤ 3 s",
            _verdict(planned <= 3),
        ),
        (
            f"runway report over {many:,} kept answers",
            f"{runway:.2f} s",
            "≤ 3 s",
            _verdict(runway <= 3),
        ),
    ]


def _paired(runs: list[dict[str, Any]], name: str, reference: str) -> list[float]:
    """The ratio of a variant's rate to its reference's, one per repetition."""
    by_rep: dict[int, dict[str, float]] = {}
    for run in runs:
        by_rep.setdefault(run["repetition"], {})[run["variant"]] = run["throughput"]["rate"]
    return [rates[name] / rates[reference] for rates in by_rep.values()]


def _rate(runs: list[dict[str, Any]]) -> str:
    """A variant's median rate, the spread of its runs, and who used core 0 (medians)."""
    rates = [run["throughput"]["rate"] for run in runs]
    cpu = statistics.median(run["server_cpu_percent"] for run in runs)
    others = statistics.median(run["core_others_percent"] for run in runs)
    spread = f"{min(rates):,.0f}-{max(rates):,.0f}"
    core = f"core 0: server {cpu:.0f} %, others {others:.0f} %"
    return f"{statistics.median(rates):,.0f} answers/s ({spread}); {core}"


def _ratio(ratios: list[float], target: float) -> str:
    """A median paired ratio, its spread, and whether it meets the target."""
    median = statistics.median(ratios)
    return f"{median:.2f} ({min(ratios):.2f}-{max(ratios):.2f}): {_verdict(median >= target)}"


def _verdict(met: bool) -> str:
    """Met or missed."""
    return "met" if met else "missed"


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| figure | measured | target | ratio / verdict |", "|---|---|---|---|"]
    lines += [
        f"| {figure} | {measured} | {target or '—'} | {verdict} |"
        for figure, measured, target, verdict in rows
    ]
    return "\n".join(lines)


def source_digest() -> str:
    """SHA-256 over the daemon's sources: others may edit them while the benchmark runs."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "license_server").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def write_comparison(
    script: str, argv: list[str] | None, quick: bool, fields: dict[str, Any], text: str, began: float
) -> int:
    """Write a comparison's raw runs to bench/results/<script>[-quick].json and print its table."""
    results = {
        "command": shlex.join(
            ["python", f"bench/{script}.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        **fields,
        "table": text,
        "total_s": round(time.perf_counter() - began, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"{script}-quick" if quick else script
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(text)
    print(f"\nbench: {results['total_s']:.0f} s; raw runs in bench/results/{name}.json")
    return 0


def environment() -> dict[str, Any]:
    """What the figures were measured on."""

    def output(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT)
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else ""

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "",
    )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": output(["git", "rev-parse", "HEAD"]),
        "daemon_sources_sha256": source_digest(),
        "uncommitted_changes": bool(output(["git", "status", "--porcelain", "--untracked-files=no"])),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "wrk": output(["wrk", "--version"]),
        "h2load": output(["h2load", "--version"]),
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "server_core": SERVER_CORE,
        "load_core": LOAD_CORE,
    }


# --- profile ------------------------------------------------------------------------------------------


def profile(bench: Bench, name: str, seconds: int) -> None:
    """Sample the daemon with py-spy while wrk loads it; print the top functions by own and total time."""
    spy = shutil.which(
        "py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if spy is None:
        raise SystemExit("bench: --profile needs py-spy: .venv/bin/pip install -e '.[bench]'")
    upstream = start_upstream(bench) if name in ("forwarding", "passthrough") else None
    server = start_variant(bench, name)
    stacks = RESULTS / f"profile-{name}.txt"
    try:
        check_answer(bench, server)
        wrk(server.url, bench.forms, connections=bench.plan.connections, seconds=2, core=LOAD_CORE)
        # --gil: only the thread running Python, with whole stacks (a paused process; --nonblocking cuts them)
        options = ["--gil", "--threads", "--rate", str(SAMPLES_PER_S), "--format", "raw"]
        argv = pinned(LOAD_CORE, [spy, "record", *options])
        argv += ["--duration", str(seconds), "--output", str(stacks), "--pid", str(server.proc.pid)]
        spy_proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, preexec_fn=die_with_parent
        )
        try:
            run = wrk(
                server.url,
                bench.forms,
                connections=bench.plan.connections,
                seconds=seconds + 1,
                core=LOAD_CORE,
            )
        finally:
            spy_proc.wait(seconds + 30)
    finally:
        bench.procs.stop(server.proc)
        if upstream is not None:
            bench.procs.stop(upstream.proc)
    print(f"{name}: {run.rate:,.0f} answers/s while sampled; stacks in {stacks.relative_to(ROOT)}")
    print(profile_summary(stacks.read_text(), ticks=SAMPLES_PER_S * seconds))


def profile_summary(collapsed: str, ticks: int, top: int = 10) -> str:
    """Sample shares by thread, by the function a sample was in, and by daemon function on the stack."""
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    daemon: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        thread, *frames = stack.split(";")
        if not count_text.isdigit() or not frames:
            continue
        count = int(count_text)
        threads[thread.split(": ", 1)[-1].rstrip("_0123456789")] += count
        names = [_frame(frame) for frame in frames]
        own[names[-1]] += count
        for name in set(names):
            if "(license_server/" in name:
                daemon[name] += count
    samples = sum(threads.values())

    def rows(title: str, counts: Counter[str], limit: int) -> list[str]:
        share = [f"| {100 * n / samples:.1f} | `{name}` |" for name, n in counts.most_common(limit)]
        return ["", f"| % of samples | {title} |", "|---|---|", *share]

    held = 100 * samples / ticks
    lines = [f"{samples} samples of the thread holding the GIL; a thread held it {held:.0f} % of the time"]
    lines += rows("thread", threads, top)
    lines += rows("function the sample was in (own time)", own, top)
    lines += rows("daemon function on the stack (own time plus callees)", daemon, top + 5)
    return "\n".join(lines)


def _frame(frame: str) -> str:
    """`function (path:line)` without the line number and with the path shortened to the package."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


# --- main ---------------------------------------------------------------------------------------------


def _progress(run: dict[str, Any]) -> None:
    """One line per measured server run."""
    lat = run["latency"]
    print(
        f"  rep {run['repetition'] + 1} {run['variant']:<11} {run['throughput']['rate']:>9,.0f} answers/s"
        f" (server CPU {run['server_cpu_percent']:.0f} %, others {run['core_others_percent']:.0f} %)"
        f"   at {lat['rate']:,.0f}/s: p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms",
        flush=True,
    )


def _stop_on_signal(signum: int, _frame: FrameType | None) -> None:
    """SIGINT (also when started in the background, where it is ignored), SIGTERM, SIGHUP: stop everything."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def scratch(keep: bool) -> Iterator[Path]:
    """A scratch folder on the disk a real state_dir is on (/var/tmp); removed unless asked or failed."""
    work = Path(tempfile.mkdtemp(prefix="license-server-bench-", dir="/var/tmp"))
    try:
        yield work
    except Exception:  # a failure: what the servers logged explains it; an interrupt cleans up
        print(f"bench: scratch files (configurations, daemon logs) kept in {work}", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if keep:
        print(f"bench: scratch files kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run of a few seconds (CI): tiny data, one repetition"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (state, configs, logs)")
    parser.add_argument(
        "--profile",
        choices=VARIANTS,
        help="instead: sample this variant's server under wrk with py-spy (needs the bench extra)",
    )
    parser.add_argument("--profile-seconds", type=int, default=10, help="how long to sample (default 10)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or a profile) and print the table."""
    args = parse_args(argv)
    for tool in ("wrk", "h2load", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is missing: apt-get install -y wrk nghttp2-client", file=sys.stderr)
            return 2
    if (os.cpu_count() or 1) < 2:
        print("bench: needs two cores, one for the servers and one for the load", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_on_signal)
    os.sched_setaffinity(0, {LOAD_CORE})  # this script and what it starts unpinned stay off the server core
    plan = QUICK if args.quick else FULL
    RESULTS.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    try:
        with scratch(args.keep) as work, Processes() as procs:
            print(f"bench: setting up in {work}", flush=True)
            bench = prepare(plan, work, procs)
            if args.profile is not None:
                profile(bench, args.profile, args.profile_seconds)
                return 0
            bench.results["command"] = shlex.join(["python", "bench/run.py", *sys.argv[1:]])
            bench.results["environment"] = environment()
            bench.results["plan"] = dataclasses.asdict(plan)
            print("bench: throughput and latency", flush=True)
            throughput_and_latency(bench)
            print("bench: start-up and memory", flush=True)
            startup_and_memory(bench)
            runway_report(bench)
            print("bench: seat and plan reports", flush=True)
            seat_report(bench)
            if args.quick:  # the full comparison is bench/backends.py (about 70 s)
                from bench import backends

                print("bench: kept and forwarded paths, SQLite and PostgreSQL backends", flush=True)
                runs = backends.compare(bench, backends.QUICK)
                bench.results["backends"] = {"runs": runs, "table": backends.table(runs, backends.QUICK)}
    except KeyboardInterrupt:
        print("bench: interrupted; every server was stopped", file=sys.stderr)
        return 130
    except (RuntimeError, LoadError, subprocess.CalledProcessError) as exc:
        print(f"bench: failed: {exc}", file=sys.stderr)
        return 1
    results = bench.results
    results["environment"]["loadavg_after"] = os.getloadavg()
    if source_digest() != results["environment"]["daemon_sources_sha256"]:
        results["environment"]["daemon_sources_changed_during_run"] = True
        print("bench: warning: license_server/ changed during the run; run it again", file=sys.stderr)
    results["total_s"] = round(time.perf_counter() - began, 1)
    rows = summarise(results, plan)
    results["table"] = [
        dict(zip(("figure", "measured", "target", "verdict"), row, strict=True)) for row in rows
    ]
    name = "latest-quick" if args.quick else "latest"  # a smoke run never replaces the full figures
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(rows)
    (RESULTS / f"{name}.md").write_text(text + "\n")
    print()
    if args.quick:
        print(
            "(--quick: tiny data and one short repetition; a smoke run, not figures to compare with targets)"
        )
    print(text)
    if "backends" in results:
        print(f"\n{results['backends']['table']}")
    latest = (RESULTS / f"{name}.json").relative_to(ROOT)
    print(f"\nbench: {results['total_s']:.0f} s; raw runs and commands in {latest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
