"""The kept and forwarded paths on the SQLite and PostgreSQL backends: `python bench/backends.py [--quick]`.

Same data, load generators and pinning as bench/run.py (the daemon on core 0; wrk, h2load, the fake upstream
and PostgreSQL on core 1, as a database server would be another machine). A throw-away PostgreSQL cluster
(tests/pgcluster.py, `apt-get install postgresql`) is started for the run; each PostgreSQL daemon gets a fresh
database. The kept path: `upstream.offline`, the answers moved in from the same SQLite state with
`license_server.storage.move_in` (what `license-server database move-in` does) and held in the memory LRU
after the warm-up pass. The forwarded path: every answer verified, kept (committed to the backend) and
audited. Each repetition runs the four variants in rotated order; figures are medians. About 70 s in full,
20 s with --quick. Raw runs go to bench/results/backends.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import psycopg

from bench import run
from bench.load import h2load, wrk, wrk_pass
from bench.procs import Processes, cpu_seconds
from license_server.config import DatabaseConfig
from license_server.storage.move_in import move_in
from license_server.storage.postgres import Database, connect_info
from tests.pgcluster import Cluster

PATHS = ("kept", "forwarding")
BACKENDS = ("sqlite", "postgresql")
VARIANTS = tuple((path, backend) for path in PATHS for backend in BACKENDS)


@dataclass(frozen=True, slots=True)
class Shape:
    """How big and how long the comparison is."""

    licenses: int
    repetitions: int
    measure_s: int
    latency_s: float
    latency_rate: int = 500
    connections: int = 64


FULL = Shape(licenses=200, repetitions=3, measure_s=3, latency_s=2)
QUICK = Shape(licenses=20, repetitions=1, measure_s=1, latency_s=1)


def plan(shape: Shape) -> run.Plan:
    """bench/run.py's plan for this comparison's data."""
    return run.Plan(
        licenses=shape.licenses,
        repetitions=shape.repetitions,
        measure_s=shape.measure_s,
        latency_s=shape.latency_s,
        kept_many=1,
        startup_runs=1,
        ledger=run.QUICK.ledger,
        report_runs=1,
        connections=shape.connections,
        latency_rate=shape.latency_rate,
    )


async def _migrate(url: str) -> None:
    """Create the schema in a fresh database."""
    database = Database(connect_info(DatabaseConfig(url=url)))
    await database.open()
    await database.close()


def postgres_database(cluster: Cluster, kept_from: Path | None) -> str:
    """A fresh, migrated database; with `kept_from`, that node's kept answers moved in."""
    url = cluster.new_database()
    asyncio.run(_migrate(url))
    if kept_from is not None:
        move_in(kept_from, connect_info(DatabaseConfig(url=url)), "bench")
    return url


def start(bench: run.Bench, cluster: Cluster, path: str, backend: str) -> tuple[run.Server, str | None]:
    """The daemon of one variant with fresh state; its database URL for PostgreSQL."""
    state = bench.work / "state" / f"{path}-{backend}-{bench.serial + 1:03d}"
    url = None
    if backend == "postgresql":
        url = postgres_database(cluster, bench.kept_template if path == "kept" else None)
        state.mkdir(parents=True, mode=0o700)
    elif path == "kept":
        shutil.copytree(bench.kept_template, state)
    server = run.start_daemon(bench, path, state_dir=state, offline=path == "kept", database_url=url)
    return server, url


def kept_after(server: run.Server, url: str | None) -> int:
    """How many answers the backend keeps once the daemon has stopped."""
    if url is None:
        assert server.state_dir is not None
        return run.kept_rows(server.state_dir)
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM answers").fetchone()
    return int(row[0]) if row else 0


def measure(
    bench: run.Bench, cluster: Cluster, shape: Shape, path: str, backend: str, rep: int
) -> dict[str, Any]:
    """One daemon start: check, warm-up pass, wrk at 64 connections, h2load at a fixed rate, stop, check."""
    server, url = start(bench, cluster, path, backend)
    record: dict[str, Any] = {"path": path, "backend": backend, "repetition": rep}
    forms = bench.results["dataset"]["forms"]
    try:
        run.check_answer(bench, server)
        warm = wrk_pass(
            server.url, bench.forms, count=forms, connections=shape.connections, core=run.LOAD_CORE, limit=120
        )
        if warm.failed:
            raise RuntimeError(
                f"{path}/{backend}: {warm.failed} failed calls in the warm-up; see {server.output}"
            )
        record["warm_up"] = warm.as_dict()
        before = cpu_seconds(server.proc.pid)
        load = wrk(
            server.url,
            bench.forms,
            connections=shape.connections,
            seconds=shape.measure_s,
            core=run.LOAD_CORE,
        )
        if load.errors:
            raise RuntimeError(
                f"{path}/{backend}: {load.errors} failed calls under load; see {server.output}"
            )
        record["throughput"] = load.as_dict()
        record["server_cpu_us_per_answer"] = round(
            (cpu_seconds(server.proc.pid) - before) / load.requests * 1e6
        )
        time.sleep(0.3)
        latency = h2load(
            server.url,
            bench.first_form,
            rate=shape.latency_rate,
            seconds=shape.latency_s,
            core=run.LOAD_CORE,
            log_file=server.output.parent / "latency.tsv",
        )
        if latency.failed:
            raise RuntimeError(
                f"{path}/{backend}: {latency.failed} failed calls at a fixed rate; see {server.output}"
            )
        record["latency"] = latency.as_dict()
    finally:
        record["exit_status"] = bench.procs.stop(server.proc)
    record["daemon_log_problems"] = problems = run.daemon_log_problems(server)
    if problems:
        print(f"  ({path}/{backend} logged warnings or errors: {problems}; see {server.output})")
    record["kept_answers_after"] = kept = kept_after(server, url)
    if kept != forms:
        raise RuntimeError(
            f"{path}/{backend}: {kept} answers kept after the run, not {forms}; see {server.output}"
        )
    return record


def compare(bench: run.Bench, shape: Shape) -> list[dict[str, Any]]:
    """Every variant in each repetition, rotated, with one PostgreSQL cluster and one fake upstream."""
    runs: list[dict[str, Any]] = []
    cluster = Cluster().start()
    upstream = run.start_upstream(bench)
    try:
        for rep in range(shape.repetitions):
            shift = rep % len(VARIANTS)
            for path, backend in VARIANTS[shift:] + VARIANTS[:shift]:
                runs.append(measure(bench, cluster, shape, path, backend, rep))
                done = runs[-1]
                print(
                    f"  rep {rep + 1} {path:<10} {backend:<10} {done['throughput']['rate']:>8,.0f} answers/s"
                    f" ({done['server_cpu_us_per_answer']} µs CPU each)"
                    f"   at {done['latency']['rate']:,.0f}/s: p50 {done['latency']['p50_ms']:.2f} ms,"
                    f" p99 {done['latency']['p99_ms']:.2f} ms",
                    flush=True,
                )
    finally:
        bench.procs.stop(upstream.proc)
        cluster.stop()
    return runs


def table(runs: list[dict[str, Any]], shape: Shape) -> str:
    """Medians per variant as a Markdown table, PostgreSQL's rate relative to SQLite's on the same path."""
    lines = [
        f"| path | backend | answers/s, {shape.connections} connections | server CPU per answer"
        f" | p50 / p99 at {shape.latency_rate:,}/s | rate vs SQLite |",
        "|---|---|---|---|---|---|",
    ]
    medians: dict[tuple[str, str], float] = {}
    for path, backend in VARIANTS:
        mine = [r for r in runs if (r["path"], r["backend"]) == (path, backend)]
        rates = [r["throughput"]["rate"] for r in mine]
        medians[(path, backend)] = rate = statistics.median(rates)
        cpu = statistics.median(r["server_cpu_us_per_answer"] for r in mine)
        p50 = statistics.median(r["latency"]["p50_ms"] for r in mine)
        p99 = statistics.median(r["latency"]["p99_ms"] for r in mine)
        ratio = "reference" if backend == "sqlite" else f"{rate / medians[(path, 'sqlite')]:.2f}"
        label = "kept (offline, in memory)" if path == "kept" else "forwarded (verified, kept, audited)"
        spread = f" ({min(rates):,.0f}-{max(rates):,.0f})" if len(rates) > 1 else ""
        lines.append(
            f"| {label} | {backend} | {rate:,.0f}{spread} | {cpu:.0f} µs"
            f" | {p50:.2f} / {p99:.2f} ms | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print its table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny data, one short repetition)")
    args = parser.parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        print("bench: needs two cores, one for the servers and one for the load", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {run.LOAD_CORE})  # PostgreSQL, started from here, runs beside the load
    shape = QUICK if args.quick else FULL
    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="license-server-backends-", dir="/var/tmp"))
    try:
        with Processes() as procs:
            bench = run.prepare(plan(shape), work, procs)
            runs = compare(bench, shape)
    except Exception:  # what the daemons logged explains it
        print(f"bench: scratch files (configurations, daemon logs) kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    text = table(runs, shape)
    fields = {
        "environment": run.environment(),
        "shape": dataclasses.asdict(shape),
        "dataset": bench.results["dataset"],
        "runs": runs,
    }
    return run.write_comparison("backends", argv, args.quick, fields, text, began)


if __name__ == "__main__":
    sys.exit(main())
