"""Calls per second through HAProxy with one node and with two: `python bench/nodes.py [--quick]`.

Needs `apt-get install -y wrk haproxy postgresql`. Every variant serves the kept path: `upstream.offline`,
the answers moved into a fresh PostgreSQL database with `license_server.storage.move_in` as in
bench/backends.py, every node of a start pointing at that database with a state_dir and `node.name` of its
own, and the answers held in each node's memory after its warm-up pass. The variants: one node with wrk
straight at it (the reference), one node behind HAProxy, two nodes behind HAProxy. HAProxy runs the shipped
deploy/haproxy.cfg rendered for loopback ports by tests/haproxy.py (leastconn, keep-alive to the nodes,
health checks on /readyz, a log line per call).

Pinning: node A on core 0; wrk, HAProxy and PostgreSQL on core 1, as in bench/backends.py. This machine has
two cores, so with two nodes there is no free core for node B: it is pinned to core 1 and shares it with
wrk, HAProxy and PostgreSQL, which stay where they were, so that the two-node variant differs from the
one-node one by node B only. What it adds here is what core 1 had left over; each node's CPU time per answer
(and the share of answers each served, from its /metrics) says what a node on a host of its own would add.

Each start: check an answer, a pass over every form (each node directly, then through HAProxy) with no
failed call, then wrk at 64 connections. Each repetition runs the variants in rotated order; figures are
medians. About 70 s in full, 20 s with --quick. Raw runs go to bench/results/nodes.json (nodes-quick.json).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import dataclasses
import http.client
import os
import shlex
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench import backends, run
from bench.load import wrk, wrk_pass
from bench.procs import Processes, core_seconds, cpu_seconds, free_port, pinned, wait_ready
from tests.haproxy import DEPLOYED, render
from tests.pgcluster import Cluster

HAPROXY = "/usr/sbin/haproxy"
NODES = (("node-a", run.SERVER_CORE), ("node-b", run.LOAD_CORE))  # HAProxy's server names, their cores
CORES = (run.SERVER_CORE, run.LOAD_CORE)


@dataclass(frozen=True, slots=True)
class Variant:
    """One way of serving the load: how many nodes, and whether HAProxy stands in front of them."""

    label: str
    nodes: int
    proxied: bool


VARIANTS = (
    Variant("one node, direct", 1, proxied=False),
    Variant("one node behind HAProxy", 1, proxied=True),
    Variant("two nodes behind HAProxy", 2, proxied=True),
)


@dataclass(frozen=True, slots=True)
class Shape:
    """How big and how long the comparison is."""

    licenses: int
    repetitions: int
    measure_s: int
    connections: int = 64


FULL = Shape(licenses=200, repetitions=3, measure_s=5)
QUICK = Shape(licenses=20, repetitions=2, measure_s=2)


def plan(shape: Shape) -> run.Plan:
    """bench/run.py's plan for this comparison's data."""
    return dataclasses.replace(
        run.QUICK, licenses=shape.licenses, repetitions=shape.repetitions, connections=shape.connections
    )


def start_node(bench: run.Bench, url: str, name: str, core: int) -> run.Server:
    """A kept-path daemon on one core with a fresh state_dir, its shared state in the database at `url`."""
    state = bench.work / "state" / f"{name}-{bench.serial + 1:03d}"
    state.mkdir(parents=True, mode=0o700)
    return run.start_daemon(
        bench, "kept", state_dir=state, offline=True, database_url=url, core=core, node_name=name
    )


def start_haproxy(bench: run.Bench, servers: dict[str, run.Server]) -> run.Server:
    """HAProxy with the shipped configuration in front of the nodes, on the load core, once it answers."""
    folder = bench.run_dir("haproxy")
    port = free_port()
    config = folder / "haproxy.cfg"
    addresses = {name: f"127.0.0.1:{server.port}" for name, server in servers.items()}
    config.write_text(render(DEPLOYED.read_text(), f"127.0.0.1:{port}", addresses, folder / "haproxy.sock"))
    argv = [HAPROXY, "-f", str(config), "-db"]
    output = folder / "haproxy.log"
    proc = bench.procs.start(argv, core=run.LOAD_CORE, output=output)
    wait_ready(proc, port, "/readyz", output)  # forwarded to a node: HAProxy and a node both up
    return run.Server("haproxy", proc, port, output, shlex.join(pinned(run.LOAD_CORE, argv)))


def answered(node: run.Server) -> int:
    """Workstation calls a node has answered since it started, from license_server_calls on its /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return round(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "license_server_calls"
            for sample in family.samples
            if sample.name.endswith("_total")
        )
    )


def warm_up(bench: run.Bench, shape: Shape, server: run.Server, what: str) -> dict[str, Any]:
    """A pass over every form; RuntimeError if a call failed."""
    warm = wrk_pass(
        server.url,
        bench.forms,
        count=bench.results["dataset"]["forms"],
        connections=shape.connections,
        core=run.LOAD_CORE,
        limit=120,
    )
    if warm.failed:
        raise RuntimeError(f"{what}: {warm.failed} failed calls in the warm-up; see {server.output}")
    return warm.as_dict()


def load(
    bench: run.Bench, shape: Shape, variant: Variant, nodes: dict[str, run.Server], proxy: run.Server | None
) -> dict[str, Any]:
    """Check, warm up, then wrk at the target; rate, each node's share and CPU per answer, HAProxy's CPU."""
    target = proxy or next(iter(nodes.values()))
    for node in nodes.values():
        run.check_answer(bench, node)
    if proxy is not None:  # a node's check, sent through HAProxy
        run.check_answer(bench, dataclasses.replace(next(iter(nodes.values())), port=proxy.port))
    warm = {name: warm_up(bench, shape, node, f"{variant.label}, {name}") for name, node in nodes.items()}
    if proxy is not None:
        warm["haproxy"] = warm_up(bench, shape, proxy, f"{variant.label}, through HAProxy")
    watched = {name: node.proc.pid for name, node in nodes.items()}
    if proxy is not None:
        watched["haproxy"] = proxy.proc.pid
    cpu_before = {name: cpu_seconds(pid) for name, pid in watched.items()}
    answers_before = {name: answered(node) for name, node in nodes.items()}
    cores_before = {core: core_seconds(core)[0] for core in CORES}
    result = wrk(
        target.url, bench.forms, connections=shape.connections, seconds=shape.measure_s, core=run.LOAD_CORE
    )
    if result.errors:
        raise RuntimeError(f"{variant.label}: {result.errors} failed calls under load; see {target.output}")
    cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in watched.items()}
    cores = {core: core_seconds(core)[0] - cores_before[core] for core in CORES}
    served = {name: answered(node) - answers_before[name] for name, node in nodes.items()}
    total = sum(served.values())
    record: dict[str, Any] = {"warm_up": warm, "throughput": result.as_dict()}
    record["nodes"] = {
        name: {
            "core": dict(NODES)[name],
            "answers": served[name],
            "share_percent": round(100 * served[name] / total, 1),
            "cpu_us_per_answer": round(cpu[name] / served[name] * 1e6) if served[name] else None,
            "cpu_percent": round(100 * cpu[name] / result.seconds, 1),
        }
        for name in nodes
    }
    if proxy is not None:
        record["haproxy"] = {
            "cpu_us_per_answer": round(cpu["haproxy"] / result.requests * 1e6),
            "cpu_percent": round(100 * cpu["haproxy"] / result.seconds, 1),
        }
    record["core_busy_percent"] = {
        str(core): round(100 * busy / result.seconds, 1) for core, busy in cores.items()
    }
    return record


def measure(bench: run.Bench, cluster: Cluster, shape: Shape, variant: Variant, rep: int) -> dict[str, Any]:
    """One start of a variant on a fresh database: its nodes, HAProxy if any, the load; stop; check."""
    url = backends.postgres_database(cluster, bench.kept_template)
    record: dict[str, Any] = {"variant": variant.label, "repetition": rep}
    nodes: dict[str, run.Server] = {}
    try:
        for name, core in NODES[: variant.nodes]:
            nodes[name] = start_node(bench, url, name, core)
        if variant.proxied:
            proxy = start_haproxy(bench, nodes)
            record["haproxy_command"] = proxy.command
            try:
                record.update(load(bench, shape, variant, nodes, proxy))
            finally:
                record["haproxy_exit_status"] = bench.procs.stop(proxy.proc)
            record["haproxy_saw_down"] = down = [
                line for line in proxy.output.read_text(errors="replace").splitlines() if " is DOWN" in line
            ]
            if down:
                print(f"  ({variant.label}: HAProxy took a node out: {down}; see {proxy.output})")
        else:
            record.update(load(bench, shape, variant, nodes, None))
    finally:
        record["exit_status"] = {name: bench.procs.stop(node.proc) for name, node in nodes.items()}
    record["node_commands"] = {name: node.command for name, node in nodes.items()}
    record["daemon_log_problems"] = {name: run.daemon_log_problems(node) for name, node in nodes.items()}
    for name, problems in record["daemon_log_problems"].items():
        if problems:
            print(
                f"  ({variant.label}, {name} logged warnings or errors: {problems}; see {nodes[name].output})"
            )
    record["kept_answers_after"] = kept = backends.kept_after(nodes["node-a"], url)
    forms = bench.results["dataset"]["forms"]
    if kept != forms:
        raise RuntimeError(f"{variant.label}: {kept} answers kept after the run, not {forms}")
    return record


def compare(bench: run.Bench, shape: Shape) -> list[dict[str, Any]]:
    """Every variant in each repetition, rotated, with one PostgreSQL cluster."""
    runs: list[dict[str, Any]] = []
    cluster = Cluster().start()
    try:
        for rep in range(shape.repetitions):
            shift = rep % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                runs.append(measure(bench, cluster, shape, variant, rep))
                done = runs[-1]
                nodes = ", ".join(
                    f"{name} {node['share_percent']:.0f} % of them, {node['cpu_us_per_answer']} µs CPU each"
                    for name, node in done["nodes"].items()
                )
                proxy = (
                    f"; HAProxy {done['haproxy']['cpu_us_per_answer']} µs each" if "haproxy" in done else ""
                )
                print(
                    f"  rep {rep + 1} {variant.label:<25} {done['throughput']['rate']:>8,.0f} answers/s"
                    f" ({nodes}{proxy})",
                    flush=True,
                )
    finally:
        cluster.stop()
    return runs


def caption(shape: Shape) -> str:
    """What the table measured, and where each process ran."""
    return (
        f"Kept path (offline; answers in PostgreSQL, served from each node's memory), wrk at"
        f" {shape.connections} connections. Node A on core 0; wrk, HAProxy and PostgreSQL on core 1."
        " With two nodes there is no free core: node B is pinned to core 1 too and shares it with wrk,"
        " HAProxy and PostgreSQL. A core's busy time counts every process on it, not only these."
    )


def table(runs: list[dict[str, Any]], shape: Shape) -> str:
    """Medians per variant as a Markdown table under its caption, each rate relative to the direct one's."""
    lines = [
        caption(shape),
        "",
        "| variant | answers/s | vs direct | node A (core 0): share, CPU per answer"
        " | node B (core 1): share, CPU per answer | HAProxy CPU per answer | core 0 / core 1 busy |",
        "|---|---|---|---|---|---|---|",
    ]
    reference = 0.0
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant.label]
        rates = [r["throughput"]["rate"] for r in mine]
        rate = statistics.median(rates)
        reference = reference or rate
        spread = f" ({min(rates):,.0f}-{max(rates):,.0f})" if len(rates) > 1 else ""
        ratio = "reference" if variant is VARIANTS[0] else f"{rate / reference:.2f}"
        cells = [_node_cell(mine, name) for name, _ in NODES]
        proxy = (
            f"{statistics.median(r['haproxy']['cpu_us_per_answer'] for r in mine):.0f} µs"
            if variant.proxied
            else "—"
        )
        busy = " / ".join(
            f"{statistics.median(r['core_busy_percent'][str(core)] for r in mine):.0f} %" for core in CORES
        )
        row = [variant.label, f"{rate:,.0f}{spread}", ratio, *cells, proxy, busy]
        lines.append(f"| {' | '.join(row)} |")
    return "\n".join(lines)


def _node_cell(runs: list[dict[str, Any]], name: str) -> str:
    """A node's median share of the answers and CPU per answer, or a dash where it did not run."""
    if name not in runs[0]["nodes"]:
        return "—"
    share = statistics.median(r["nodes"][name]["share_percent"] for r in runs)
    costs = [r["nodes"][name]["cpu_us_per_answer"] for r in runs]
    cost = f"{statistics.median(costs):.0f} µs" if None not in costs else "—"
    return f"{share:.0f} %, {cost}"


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print its table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny data, two short repetitions)")
    args = parser.parse_args(argv)
    for tool in ("wrk", "taskset", HAPROXY):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is missing: apt-get install -y wrk haproxy", file=sys.stderr)
            return 2
    if (os.cpu_count() or 1) < 2:
        print("bench: needs two cores, one for node A and one for the load", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {run.LOAD_CORE})  # PostgreSQL, started from here, runs beside the load
    shape = QUICK if args.quick else FULL
    began = time.perf_counter()
    with run.scratch(keep=False) as work, Processes() as procs:
        bench = run.prepare(plan(shape), work, procs)
        runs = compare(bench, shape)
    text = table(runs, shape)
    version = subprocess.run([HAPROXY, "-v"], capture_output=True, text=True, check=False).stdout
    fields = {
        "environment": {**run.environment(), "haproxy": version.splitlines()[0] if version else ""},
        "shape": dataclasses.asdict(shape),
        "dataset": bench.results["dataset"],
        "runs": runs,
    }
    return run.write_comparison("nodes", argv, args.quick, fields, text, began)


if __name__ == "__main__":
    sys.exit(main())
