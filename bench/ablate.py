"""Where a kept-copy answer's time goes: `python bench/ablate.py` from the repository root (about 3 minutes).

Runs the benchmark's kept-copy daemon (bench/run.py's data and settings) with one part of the per-call work
replaced by a no-op at a time (bench/ablation/sitecustomize.py), and reports the server's CPU time per answer
under wrk at 64 connections: the median of the repetitions, and the difference from the whole daemon. CPU
time per answer, unlike answers per second, hardly moves when the load generator is starved.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import os
import statistics
import tempfile

from bench import run
from bench.load import wrk, wrk_pass
from bench.procs import Processes, cpu_seconds

PARTS = ("", "audit", "log", "seats", "metrics", "gc")  # "": the whole daemon


def measure(bench: run.Bench, part: str, seconds: int) -> float:
    """Start the kept-copy daemon without `part`, warm it up, and return its CPU µs per answer under wrk."""
    os.environ["BENCH_ABLATE"] = part
    server = run.start_variant(bench, "kept")
    try:
        run.check_answer(bench, server)
        forms = bench.results["dataset"]["forms"]
        wrk_pass(server.url, bench.forms, count=forms, connections=64, core=run.LOAD_CORE, limit=120)
        before = cpu_seconds(server.proc.pid)
        load = wrk(server.url, bench.forms, connections=64, seconds=seconds, core=run.LOAD_CORE)
        return (cpu_seconds(server.proc.pid) - before) / max(load.requests, 1) * 1e6
    finally:
        bench.procs.stop(server.proc)


def main() -> int:
    """Measure every part in rotated order, several times, and print a table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4)
    args = parser.parse_args()
    plan = run.Plan(
        licenses=run.FULL.licenses,
        repetitions=args.repetitions,
        measure_s=args.seconds,
        latency_s=1,
        kept_many=1,
        startup_runs=1,
        ledger=run.QUICK.ledger,
        report_runs=1,
    )
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent / "ablation"), os.environ.get("PYTHONPATH")])
    )
    costs: dict[str, list[float]] = {part: [] for part in PARTS}
    scratch = tempfile.TemporaryDirectory(prefix="license-server-ablate-", dir="/var/tmp")
    with scratch as work, Processes() as procs:
        bench = run.prepare(plan, Path(work), procs)
        for rep in range(args.repetitions):
            shift = rep % len(PARTS)
            for part in PARTS[shift:] + PARTS[:shift]:
                costs[part].append(measure(bench, part, args.seconds))
                print(f"  rep {rep + 1} {part or 'whole daemon':13s} {costs[part][-1]:6.1f} µs", flush=True)
    whole = statistics.median(costs[""])
    print("\n| without | server CPU per answer | difference |\n|---|---|---|")
    for part in PARTS:
        cost = statistics.median(costs[part])
        print(f"| {part or '(whole daemon)'} | {cost:.0f} µs | {cost - whole:+.0f} µs |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
