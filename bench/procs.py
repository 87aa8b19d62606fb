"""Child processes pinned to a core, started and always stopped by the benchmark, even on Ctrl-C."""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark dies, even by SIGKILL."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(core: int, argv: list[str]) -> list[str]:
    """The command line that runs argv on one CPU core."""
    return ["taskset", "-c", str(core), *argv]


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB (10^6 bytes), from /proc/PID/status."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024 / 1e6  # the kernel counts KiB
    return values["VmRSS"], values["VmHWM"]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process (all its threads) has used, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def core_seconds(core: int) -> tuple[float, float]:
    """(busy, stolen by the hypervisor) CPU seconds of one core since boot, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        name, *ticks = line.split()
        if name == f"cpu{core}":
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(t) for t in ticks[:8])
            tick = os.sysconf("SC_CLK_TCK")
            return (user + nice + system + irq + softirq) / tick, steal / tick
    raise ValueError(f"no cpu{core} in /proc/stat")


def http_get(port: int, path: str, timeout: float = 1.0) -> int:
    """The status of GET path on 127.0.0.1:port; raises OSError if nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


class Processes:
    """The benchmark's servers: each started in its own process group, all stopped when the block ends."""

    def __init__(self) -> None:
        self._running: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for proc in reversed(self._running):
            self.stop(proc)

    def start(self, argv: list[str], *, core: int, output: Path) -> subprocess.Popen[bytes]:
        """Start argv pinned to a core, its output going to a file."""
        with output.open("ab") as out:
            proc = subprocess.Popen(
                pinned(core, argv),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,  # one libc call: safe after fork
            )
        self._running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
        """SIGTERM (the graceful stop), SIGKILL after `timeout` seconds; returns the exit status."""
        if proc in self._running:
            self._running.remove(proc)
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        return proc.returncode


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the process group a child leads (its own, from start_new_session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def wait_ready(
    proc: subprocess.Popen[bytes], port: int, path: str | None, output: Path, timeout: float = 60.0
) -> None:
    """Wait until GET path answers 200 (or, without a path, a connection is accepted); RuntimeError if not."""
    command = " ".join(str(arg) for arg in proc.args) if isinstance(proc.args, list) else str(proc.args)
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{command} exited with {proc.returncode}; see {output}")
        try:
            if path is None:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                return
            if http_get(port, path) == 200:
                return
        except OSError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"{command} not ready on port {port} within {timeout:g} s; see {output}")
