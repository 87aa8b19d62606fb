"""Load generators: wrk for throughput (and for one pass over many forms), h2load for fixed-rate latency."""

from __future__ import annotations

import json
import re
import shlex
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.procs import ROOT, die_with_parent, pinned

FORMS_SCRIPT = ROOT / "bench" / "forms.lua"
FORM_TYPE = "Content-Type: application/x-www-form-urlencoded"
WARM_UP_S = 0.5  # the start of a latency run, dropped: connections opening, first requests


class LoadError(RuntimeError):
    """A load generator failed or gave output the benchmark cannot read."""


@dataclass(frozen=True, slots=True)
class Throughput:
    """One wrk run."""

    command: str
    requests: int
    seconds: float
    errors: int  # socket errors, timeouts and HTTP statuses >= 400
    latency_p50_ms: float
    latency_p99_ms: float
    bytes: int

    @property
    def rate(self) -> float:
        """Answers per second."""
        return self.requests / self.seconds

    def as_dict(self) -> dict[str, Any]:
        """The run for the results file."""
        return {**asdict(self), "rate": round(self.rate, 1)}


@dataclass(frozen=True, slots=True)
class Latency:
    """One h2load run at a fixed rate."""

    command: str
    rate: float  # answers per second h2load achieved
    requests: int  # measured ones (after the warm-up)
    failed: int  # not a 2xx
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, Any]:
        """The run for the results file."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Pass:
    """One wrk pass over a number of forms."""

    command: str
    answered: int
    failed: int  # not a 200
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """The pass for the results file."""
        return {**asdict(self), "rate": round(self.answered / self.seconds, 1)}


def _wrk_argv(url: str, forms: Path, connections: int, seconds: int, core: int) -> list[str]:
    """wrk, one thread pinned to a core, POSTing the forms in rotation."""
    argv = pinned(core, ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"])
    return [*argv, "-s", str(FORMS_SCRIPT.relative_to(ROOT)), url, "--", str(forms)]


def wrk_pass(url: str, forms: Path, *, count: int, connections: int, core: int, limit: int) -> Pass:
    """Have wrk POST the first `count` forms (and a few more in flight), giving up after `limit` seconds."""
    argv = [*_wrk_argv(url, forms, connections, limit, core), str(count)]
    began = time.perf_counter()
    output = _run(argv, timeout=limit + 30)
    seconds = time.perf_counter() - began
    found = re.search(r"^WRK_PASS (\{.*\})$", output, re.MULTILINE)
    if found is None:
        raise LoadError(f"wrk did not finish a pass over {count} forms in {limit} s:\n{output}")
    raw = json.loads(found.group(1))
    return Pass(shlex.join(argv), raw["answered"], raw["failed"], seconds)


def wrk(url: str, forms: Path, *, connections: int, seconds: int, core: int) -> Throughput:
    """Run wrk for `seconds` at `connections` connections, rotating through the forms."""
    argv = _wrk_argv(url, forms, connections, seconds, core)
    output = _run(argv, timeout=seconds + 30)
    found = re.search(r"^WRK_JSON (\{.*\})$", output, re.MULTILINE)
    if found is None:
        raise LoadError(f"no summary from wrk:\n{output}")
    raw = json.loads(found.group(1))
    errors = sum(
        raw[name] for name in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return Throughput(
        command=shlex.join(argv),
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        errors=errors,
        latency_p50_ms=raw["latency_p50_us"] / 1000,
        latency_p99_ms=raw["latency_p99_us"] / 1000,
        bytes=raw["bytes"],
    )


def h2load(url: str, form: Path, *, rate: int, seconds: float, core: int, log_file: Path) -> Latency:
    """Run h2load at `rate` calls/s spread over rate/100 connections of 100 calls/s, one form POSTed."""
    clients = max(1, rate // 100)
    total = int(rate * seconds)
    argv = pinned(core, ["h2load", "--h1", f"-c{clients}", f"--rps={rate / clients:g}", f"-n{total}"])
    argv += ["-r1", "--rate-period=1ms", "-d", str(form), "-H", FORM_TYPE, f"--log-file={log_file}", url]
    output = _run(argv, timeout=seconds * 3 + 30)
    found = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", output)
    if found is None:
        raise LoadError(f"no summary from h2load:\n{output}")
    rows = [line.split("\t") for line in log_file.read_text().splitlines() if line]
    if not rows:
        raise LoadError(f"h2load logged no requests:\n{output}")
    start = min(int(row[0]) for row in rows)
    measured = [row for row in rows if int(row[0]) - start >= WARM_UP_S * 1e6]
    times = sorted(int(row[2]) / 1000 for row in measured)
    return Latency(
        command=shlex.join(argv),
        rate=float(found.group(1)),
        requests=len(measured),
        failed=sum(1 for row in measured if not row[1].startswith("2")),
        p50_ms=statistics.median(times),
        p99_ms=_percentile(times, 99.0),
        p999_ms=_percentile(times, 99.9),
        max_ms=times[-1],
    )


def _percentile(ordered: list[float], percent: float) -> float:
    """The nearest-rank percentile of sorted values."""
    rank = max(1, -(-len(ordered) * percent // 100))
    return ordered[int(rank) - 1]


def _run(argv: list[str], timeout: float) -> str:
    """Run a load generator to the end (killed past `timeout`); its output, or LoadError if it failed."""
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            check=False,
            preexec_fn=die_with_parent,  # one libc call: safe after fork
        )
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"{argv[3]} ran past {timeout:g} s and was stopped") from exc
    if done.returncode != 0:
        raise LoadError(f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout
