"""The shared database's schema: made on an empty database, migrated once when nodes start together."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from license_server.config import DatabaseConfig, redact_url
from license_server.storage import pg_schema
from license_server.storage.postgres import Database, DatabaseError, connect_info, probe


async def test_empty_database_gets_the_newest_schema(pg_url: str) -> None:
    assert probe(connect_info(DatabaseConfig(url=pg_url))).schema_version == 0
    db = Database(connect_info(DatabaseConfig(url=pg_url)))
    assert await db.open() == pg_schema.LATEST
    await db.close()
    found = probe(connect_info(DatabaseConfig(url=pg_url)))
    assert found.reachable
    assert found.schema_version == pg_schema.LATEST
    assert "current" in found.detail


async def test_nodes_starting_together_migrate_once(pg_url: str) -> None:
    nodes = [Database(connect_info(DatabaseConfig(url=pg_url))) for _ in range(3)]
    versions = await asyncio.gather(*(node.open() for node in nodes))
    assert versions == [pg_schema.LATEST] * 3
    await asyncio.gather(*(node.close() for node in nodes))
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert [row[0] for row in rows] == [version for version, _ in pg_schema.MIGRATIONS]


async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    db = Database(connect_info(DatabaseConfig(url=pg_url)))
    await db.open()
    await db.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (pg_schema.LATEST + 1,))
    with pytest.raises(DatabaseError, match="newer than this daemon"):
        await Database(connect_info(DatabaseConfig(url=pg_url))).open()


def test_unreachable_database_is_named_without_its_password() -> None:
    url = "postgresql://license:hunter2-secret@127.0.0.1:1/nothing"
    found = probe(connect_info(DatabaseConfig(url=url)))
    assert not found.reachable
    assert "hunter2" not in found.detail
    assert "***" in found.detail


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://license:s3cret@db:5432/ls", "postgresql://license:***@db:5432/ls"),
        (
            "postgresql://license@db/ls?password=s3cret&sslmode=require",
            "postgresql://license@db/ls?password=***&sslmode=require",
        ),
        ("postgresql://db/ls", "postgresql://db/ls"),
    ],
)
def test_a_shown_url_never_holds_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in repr(connect_info(DatabaseConfig(url=url)))


def test_a_daemon_that_cannot_reach_its_database_says_so_and_exits(tmp_path: Path) -> None:
    """No traceback, libpq's reason, the password hidden, exit 1 (systemd starts it again)."""
    found = subprocess.run(
        [
            sys.executable,
            "-m",
            "license_server",
            "serve",
            "--set",
            f"state_dir={tmp_path / 'state'}",
            "--set",
            "listen.port=0",
            "--set",
            "database.url=postgresql://license:hunter2@127.0.0.1:1/ls",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert found.returncode == 1
    assert (
        "cannot start: cannot connect to the database at postgresql://license:***@127.0.0.1:1/ls"
        in found.stderr
    )
    assert "Connection refused" in found.stderr
    assert "Traceback" not in found.stderr
    assert "hunter2" not in found.stderr + found.stdout
