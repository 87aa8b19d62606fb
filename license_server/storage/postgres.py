"""The shared database of several nodes: connections, the password, and the schema and how it migrates.

psycopg 3: an `AsyncConnectionPool` for the daemon, plain blocking connections for the report and audit
commands and the console's snapshots (run off the event loop). Statements are never prepared on the server
(`prepare_threshold=None`), so that pgbouncer in transaction mode works between the nodes and PostgreSQL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from license_server.config import DatabaseConfig, redact_url
from license_server.storage import pg_schema

log = structlog.get_logger(__name__)

CREDENTIAL = "database-password"  # the systemd credential read when database.password_file is unset
_CONNECT_TIMEOUT = 5  # seconds libpq waits for a connection
# Any number the daemon alone uses: nodes starting together take this lock, so one of them migrates.
_MIGRATION_LOCK = 0x4C53_4D49  # "LSMI"
_POOL_SIZE = (1, 8)


class DatabaseError(Exception):
    """The database cannot be used: unreachable, login refused, or a schema this daemon cannot run."""


@dataclass(frozen=True, slots=True)
class ConnectInfo:
    """How to reach the database: the URL and, apart from it, a password from a file or credential."""

    url: str
    password: str | None = None  # never shown: not in repr, logs, errors or check-config

    def __repr__(self) -> str:
        """The URL with any password hidden."""
        return f"ConnectInfo({self.shown!r})"

    @property
    def shown(self) -> str:
        """The URL as logs and check-config may show it."""
        return redact_url(self.url)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for psycopg's connect beside the URL."""
        extra: dict[str, Any] = {
            "connect_timeout": _CONNECT_TIMEOUT,
            "application_name": "license-server",
            "prepare_threshold": None,  # pgbouncer in transaction mode cannot keep prepared statements
        }
        if self.password is not None:
            extra["password"] = self.password
        return extra

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection[Any]:
        """A blocking connection (reports, audit commands, snapshots); DatabaseError if it cannot be had."""
        try:
            return psycopg.connect(self.url, autocommit=autocommit, **self.kwargs())
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to the database at {self.shown}: {_reason(exc)}") from None


def connect_info(config: DatabaseConfig, env: Mapping[str, str] | None = None) -> ConnectInfo:
    """The URL and password: database.password_file, else the systemd credential, else libpq's own ways."""
    assert config.url is not None
    env = os.environ if env is None else env
    path = config.password_file
    if path is None and env.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL
        path = candidate if candidate.is_file() else None
    if path is None:
        return ConnectInfo(config.url)
    try:
        password = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatabaseError(
            f"cannot read the database password from {path}: {exc.__class__.__name__}"
        ) from None
    if not password:
        raise DatabaseError(f"the database password file {path} is empty")
    return ConnectInfo(config.url, password)


class Database:
    """The daemon's pool of connections to the shared database, opened with the schema migrated."""

    def __init__(self, info: ConnectInfo) -> None:
        self.info = info
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            info.url,
            kwargs=info.kwargs(),
            min_size=_POOL_SIZE[0],
            max_size=_POOL_SIZE[1],
            open=False,
            check=AsyncConnectionPool.check_connection,
            max_lifetime=30 * 60,
            reconnect_timeout=5 * 60,
            name="license-server",
        )
        self.schema_version = 0

    async def open(self) -> int:
        """Connect and create or migrate the schema; returns its version. DatabaseError if it cannot."""
        # One connection of its own first: libpq's reason (refused, no such database, password) is kept,
        # where a pool that cannot fill itself only says that it timed out.
        try:
            conn = await psycopg.AsyncConnection.connect(self.info.url, **self.info.kwargs())
        except psycopg.Error as exc:
            raise DatabaseError(
                f"cannot connect to the database at {self.info.shown}: {_reason(exc)}"
            ) from None
        try:
            async with conn:
                self.schema_version = await migrate(conn)
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot migrate the database at {self.info.shown}: {_reason(exc)}") from None
        try:
            await self.pool.open(wait=True, timeout=_CONNECT_TIMEOUT * 2)
        except (PoolTimeout, psycopg.Error) as exc:
            await self.pool.close()
            raise DatabaseError(
                f"cannot connect to the database at {self.info.shown}: {_reason(exc)}"
            ) from None
        log.info("database_opened", database=self.info.shown, schema_version=self.schema_version)
        return self.schema_version

    async def close(self) -> None:
        """Close every connection."""
        await self.pool.close()


async def migrate(conn: psycopg.AsyncConnection[Any]) -> int:
    """Bring the schema to the newest version, one node at a time; returns the version now in force."""
    async with conn.transaction():
        # Held to the end of this transaction: a second node starting at the same moment waits here, then
        # finds the schema made and has nothing to do.
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute(pg_schema.VERSION_TABLE)
        row = await (await conn.execute("SELECT coalesce(max(version), 0) FROM schema_version")).fetchone()
        current = int(row[0]) if row else 0
        if current > pg_schema.LATEST:
            raise DatabaseError(
                f"the database's schema is version {current}, newer than this daemon's {pg_schema.LATEST}:"
                " upgrade this node to the version the other nodes run"
            )
        for version, statements in pg_schema.MIGRATIONS:
            if version <= current:
                continue
            for statement in statements:
                await conn.execute(statement)
            await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
            log.info("database_migrated", schema_version=version)
        return max(current, pg_schema.LATEST)


@dataclass(frozen=True, slots=True)
class Reachability:
    """What check-config says of the database."""

    reachable: bool
    detail: str  # the schema version, or why it cannot be reached
    schema_version: int | None = None


def probe(info: ConnectInfo) -> Reachability:
    """Whether the database answers, and at which schema version (blocking; changes nothing)."""
    try:
        with info.connect(autocommit=True) as conn:
            exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
            if not exists or not exists[0]:
                return Reachability(True, "reachable, no schema yet (the daemon creates it at start)", 0)
            row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
            version = int(row[0]) if row else 0
    except DatabaseError as exc:
        return Reachability(False, str(exc))
    except psycopg.Error as exc:
        return Reachability(False, f"the database at {info.shown} answered: {_reason(exc)}")
    state = (
        "current"
        if version == pg_schema.LATEST
        else ("the daemon migrates it at start" if version < pg_schema.LATEST else "newer than this daemon")
    )
    return Reachability(True, f"reachable, schema version {version} ({state})", version)


def _reason(exc: BaseException) -> str:
    """An error's first line, which libpq never fills with a password."""
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
