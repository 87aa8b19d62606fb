"""Real HAProxy for tests: deploy/haproxy.cfg rendered for loopback ports, run in the foreground."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.test_process import free_port

DEPLOYED = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
# Global lines only root can use (privileges dropped, a chroot, a raised file limit) or naming system paths.
_ROOT_ONLY = ("chroot", "user", "group", "log", "stats socket", "maxconn")


def render(text: str, bind: str, servers: dict[str, str], socket: Path) -> str:
    """deploy/haproxy.cfg as a test runs it: its bind address and server lines replaced, root-only lines out.

    The rest (timeouts, checks, retries) is the shipped file's, line for line.
    """
    lines: list[str] = []
    section = ""
    for line in text.splitlines():
        stripped = line.strip()
        if line and not line[0].isspace():
            section = stripped.split()[0]
        if section == "global" and stripped.startswith(_ROOT_ONLY):
            if stripped.startswith("log"):
                lines.append("    log stdout format raw local0")
            elif stripped.startswith("stats socket"):
                lines.append(f"    stats socket {socket} mode 600 level admin")
            elif stripped.startswith("maxconn"):
                lines.append("    maxconn 1000")
            continue
        if stripped.startswith("bind "):
            lines.append(f"    bind {bind}")
            continue
        if stripped.startswith("server "):
            if servers:
                lines.extend(f"    server {name} {address}" for name, address in servers.items())
                servers = {}
            continue
        lines.append(line)
    assert not servers, "deploy/haproxy.cfg has no server lines to replace"
    return "\n".join(lines) + "\n"


class HAProxy:
    """`haproxy -f cfg -db` on a free loopback port, in front of the given nodes."""

    def __init__(self, folder: Path, servers: dict[str, str]) -> None:
        self.port = free_port()
        self.folder = folder
        self.socket = folder / "haproxy.sock"
        self.config_path = folder / "haproxy.cfg"
        self.log_path = folder / "haproxy.log"
        self.config_path.write_text(
            render(DEPLOYED.read_text(), f"127.0.0.1:{self.port}", servers, self.socket)
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        """The one address workstations use."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start HAProxy and wait until it accepts connections."""
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([binary, "-f", str(self.config_path), "-db"], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            return
        raise AssertionError(f"haproxy did not accept connections:\n{self.log_path.read_text()}")

    async def stop(self) -> None:
        """Stop HAProxy (SIGTERM) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            await asyncio.to_thread(self.proc.wait, 10)

    async def command(self, line: str) -> str:
        """One command on HAProxy's admin socket, e.g. `show servers state`; its answer."""
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        writer.write(line.encode() + b"\n")
        await writer.drain()
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        return answer.decode()

    async def states(self) -> dict[str, str]:
        """Each server's state as HAProxy sees it: UP, DOWN, ... (from `show stat`)."""
        found: dict[str, str] = {}
        lines = (await self.command("show stat")).splitlines()
        header = lines[0].lstrip("# ").split(",")
        for row in lines[1:]:
            fields = dict(zip(header, row.split(","), strict=False))
            if fields.get("svname") not in (None, "FRONTEND", "BACKEND"):
                found[fields["svname"]] = re.split(r"\s", fields["status"])[0]
        return found

    async def wait_for(self, server: str, state: str, within: float = 10.0) -> float:
        """Wait until HAProxy sees `server` in `state` ("UP", "DOWN"); seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < within:
            if (await self.states()).get(server) == state:
                return time.monotonic() - started
            await asyncio.sleep(0.05)
        raise AssertionError(f"{server} not {state} within {within:g} s: {await self.states()}")
