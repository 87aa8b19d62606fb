"""A throw-away PostgreSQL cluster from Debian's packages: initdb in a temporary folder, loopback only.

Run as an unprivileged user: root hands the folder to Debian's `postgres` user and runs the server as it;
anyone else runs it as themselves. Each test gets a database of its own (`CREATE DATABASE`, a file copy).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg

SERVER_USER = "postgres"  # made by Debian's postgresql package
SUPERUSER = "postgres"  # the cluster's own superuser role


def bin_dir() -> Path | None:
    """The newest installed PostgreSQL's programs, or None without the package."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[4]))
    return found[-1].parent if found else None


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """One PostgreSQL server on 127.0.0.1, its data in a temporary folder removed by stop()."""

    def __init__(self) -> None:
        found = bin_dir()
        if found is None:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
        self.bin = found
        self.folder = Path(tempfile.mkdtemp(prefix="license-server-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self._names = itertools.count(1)
        self._as_other = os.geteuid() == 0

    def _run(self, *argv: str) -> None:
        """A PostgreSQL program as the server's user."""
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self._as_other:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> Cluster:
        """initdb and start the server; returns self."""
        if self._as_other:
            shutil.chown(self.folder, SERVER_USER)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-sync")
        self.resume()
        return self

    def pause(self) -> None:
        """Stop the server as an administrator would (`pg_ctl stop -m fast`), keeping its data."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start the server over its data, on the same port."""
        options = " ".join(
            (
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.folder}",
                "-c max_connections=200",
                "-c fsync=off",  # a test cluster: durability across a power cut is not what is tested
                "-c full_page_writes=off",
            )
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "server.log"),
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self) -> None:
        """Stop the server at once and remove its folder."""
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres", user: str = SUPERUSER) -> str:
        """A libpq URL for a database of this cluster."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        """A superuser connection in autocommit mode."""
        return psycopg.connect(self.url(), autocommit=True)

    def new_database(self) -> str:
        """A fresh empty database; returns its URL."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]  # a name made here
        return self.url(name)
