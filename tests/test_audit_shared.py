"""One audit trail across nodes: each node's chain shipped into PostgreSQL, searched and verified there."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from license_server.admin.trail import Verifier, query_from, read_page
from license_server.audit import chain
from license_server.audit.search import Query, search_database
from license_server.audit.shipping import FolderShipper, Shipper, ShipRefusedError, ship_folder
from license_server.audit.verify import verify_database
from license_server.audit.writer import AuditLog
from license_server.cli import main
from license_server.config import AuditConfig, DatabaseConfig
from license_server.storage.pg_audit import AuditConflictError, PgAuditStore
from license_server.storage.postgres import Database, connect_info
from tests.audit_builder import LICENSE, T0
from tests.conftest import Daemon
from tests.test_proxy import activate_form, post

DaemonFactory = Callable[..., Awaitable[Daemon]]


def open_schema(url: str) -> None:
    """Create the shared schema in the test's database, as a node does at start."""

    async def run() -> None:
        database = Database(connect_info(DatabaseConfig(url=url)))
        await database.open()
        await database.close()

    asyncio.run(run())


def call(node: str, number: int) -> dict[str, Any]:
    """A call record's own fields, as the daemon writes them."""
    return {
        "type": chain.CALL,
        "request_id": f"{node}-{number}",
        "client": "10.0.0.9",
        "http_method": "POST",
        "api_method": "activate",
        "product_id": "3",
        "key": LICENSE,
        "machine": f"{node}-machine-{number}",
        "friendly_name": f"{node} laptop",
        "floating_interval": 0,
        "action": "forwarded",
        "status": 200,
        "upstream_status": 200,
        "result": 0,
        "message": "",
        "failure": None,
        "latency_ms": 1.5,
        "bytes": 300,
    }


def write_node(folder: Path, node: str, calls: int, *, start: float = T0) -> None:
    """A node's daemon run: start record, `calls` call records (one a second), stop record."""
    ticks = itertools.count()

    def clock() -> float:
        return start + next(ticks)

    async def run() -> None:
        log = AuditLog(folder, AuditConfig(fsync=0.0), clock)
        await log.open("test")
        for number in range(calls):
            await log.append(call(node, number))
        await log.close()

    asyncio.run(run())


@pytest.fixture
def store(pg_url: str) -> Iterator[PgAuditStore]:
    """The shared trail's store over a fresh database with the schema made."""
    open_schema(pg_url)
    opened = PgAuditStore(connect_info(DatabaseConfig(url=pg_url)))
    yield opened
    opened.close()


@pytest.fixture
def two_nodes(tmp_path: Path, store: PgAuditStore) -> dict[str, Path]:
    """Nodes A (3 calls) and B (5 calls), their records interleaved in time, both shipped."""
    folders = {"A": tmp_path / "a", "B": tmp_path / "b"}
    write_node(folders["A"], "A", 3, start=T0)
    write_node(folders["B"], "B", 5, start=T0 + 0.5)
    assert ship_folder(folders["A"], "A", store) == 5
    assert ship_folder(folders["B"], "B", store) == 7
    return folders


def sql(url: str, statement: str, *params: Any) -> None:
    """Tamper with the database by hand, as someone with access to it could."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement, params)  # type: ignore[arg-type]


def stored_line(url: str, node: str, seq: int) -> bytes:
    """One stored record's line."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT line FROM audit_records WHERE node = %s AND seq = %s", (node, seq)
        ).fetchone()
    assert row is not None
    return bytes(row[0])


def count(url: str, node: str) -> int:
    """How many records of a node the database holds."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM audit_records WHERE node = %s", (node,)).fetchone()
    assert row is not None
    return int(row[0])


def head_seq(store: PgAuditStore, node: str) -> int | None:
    """The seq of a node's anchored head."""
    head = store.head(node)
    return None if head is None else head[0]


def cli(url: str, tmp_path: Path, *args: str) -> list[str]:
    """Arguments for the CLI against the shared database."""
    return [
        *args,
        "--set",
        f"state_dir={tmp_path / 'state'}",
        "--set",
        f"database.url={url}",
        "--set",
        "node.name=A",
    ]


class TestSearch:
    """Admins see one trail: every node's calls, each with its node's name."""

    def test_finds_calls_of_both_nodes(self, store: PgAuditStore, two_nodes: dict[str, Path]) -> None:
        """Records of A and B come back together, by time, each naming its node."""
        found = list(search_database(store, Query()))
        assert sorted((r["node"], r["request_id"]) for r in found) == [
            *(("A", f"A-{n}") for n in range(3)),
            *(("B", f"B-{n}") for n in range(5)),
        ]
        times = [r["time"] for r in found]
        assert times == sorted(times)
        assert [r["node"] for r in found][:2] == ["A", "B"]  # interleaved by time, not node after node
        only_b = list(search_database(store, Query(node="B", machine="B-machine-3")))
        assert [r["request_id"] for r in only_b] == ["B-3"]
        assert next(iter(search_database(store, Query(key=LICENSE.lower(), node="A"))))["node"] == "A"

    def test_cli_shows_the_node(
        self, pg_url: str, tmp_path: Path, two_nodes: dict[str, Path], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`audit search` reads the database: JSON, CSV and table name the node of each record."""
        assert main(cli(pg_url, tmp_path, "audit", "search", "--format", "json", "--node", "B")) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(r["node"], r["request_id"]) for r in rows] == [("B", f"B-{n}") for n in range(5)]
        assert main(cli(pg_url, tmp_path, "audit", "search", "--format", "csv", "--limit", "2")) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("node,seq,time,type,")
        assert {lines[1][:4], lines[2][:4]} == {"A,2,", "B,2,"}
        assert main(cli(pg_url, tmp_path, "audit", "search", "--machine", "A-machine-1")) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split()[:2] == ["time", "node"]
        assert table[1].split()[1] == "A"


class TestVerify:
    """`audit verify` walks every node's chain against its anchored head."""

    def test_intact(
        self,
        pg_url: str,
        tmp_path: Path,
        store: PgAuditStore,
        two_nodes: dict[str, Path],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Both chains check out, and the command says so per node with exit 0."""
        report = verify_database(store)
        assert report.ok
        assert [(n.node, n.records, n.last_seq) for n in report.nodes] == [("A", 5, 5), ("B", 7, 7)]
        assert main(cli(pg_url, tmp_path, "audit", "verify")) == 0
        out = capsys.readouterr().out
        assert "node A: intact: 5 records" in out
        assert "node B: intact: 7 records" in out

    @pytest.mark.parametrize(
        ("tamper", "seq", "words"),
        [
            ("change", 3, "record changed"),
            ("change_last", 7, "record changed"),
            ("delete_middle", 4, "records removed"),
            ("delete_last", 7, "records cut off"),
            ("delete_head", 1, "no anchored head"),
            ("insert", 8, "record inserted"),
            ("swap", 3, "records reordered"),
            ("time_column", 5, "time stored beside"),
        ],
    )
    def test_tampering_caught(
        self,
        pg_url: str,
        tmp_path: Path,
        store: PgAuditStore,
        two_nodes: dict[str, Path],
        capsys: pytest.CaptureFixture[str],
        tamper: str,
        seq: int,
        words: str,
    ) -> None:
        """Each change made to node B's records in SQL is reported with node B and the seq."""
        if tamper in ("change", "change_last"):
            record = json.loads(stored_line(pg_url, "B", seq))
            record["machine"] = "someone-else"
            forged = chain.canonical_line(record)
            sql(pg_url, "UPDATE audit_records SET line = %s WHERE node = 'B' AND seq = %s", forged, seq)
        elif tamper == "delete_middle":
            sql(pg_url, "DELETE FROM audit_records WHERE node = 'B' AND seq = 4")
        elif tamper == "delete_last":
            sql(pg_url, "DELETE FROM audit_records WHERE node = 'B' AND seq = 7")
        elif tamper == "delete_head":
            sql(pg_url, "DELETE FROM audit_heads WHERE node = 'B'")
        elif tamper == "insert":  # a forger who even chains it right
            last = stored_line(pg_url, "B", 7)
            record = {
                "seq": 8,
                "time": chain.utc_now_text(T0 + 99),
                "prev": chain.line_hash(last),
                **call("B", 9),
            }
            sql(
                pg_url,
                "INSERT INTO audit_records (node, seq, time, line) VALUES ('B', 8, %s, %s)",
                T0 + 99,
                chain.canonical_line(record),
            )
        elif tamper == "swap":
            for old, new in ((3, -1), (4, 3), (-1, 4)):
                sql(pg_url, "UPDATE audit_records SET seq = %s WHERE node = 'B' AND seq = %s", new, old)
        elif tamper == "time_column":
            sql(pg_url, "UPDATE audit_records SET time = 0 WHERE node = 'B' AND seq = 5")
        report = verify_database(store)
        assert not report.ok
        assert [(p.node, p.seq) for p in report.problems] == [("B", seq)], report.problems
        assert words in report.problems[0].reason
        assert report.nodes[0].ok  # node A untouched
        assert main(cli(pg_url, tmp_path, "audit", "verify")) == 1
        out = capsys.readouterr().out
        assert f"node B: NOT INTACT at seq {seq}" in out
        assert "node A: intact" in out

    def test_database_unreachable(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """No verdict without the database: exit 2, and no password in what is said."""
        url = "postgresql://license:secret-pw@127.0.0.1:1/none"
        assert main(cli(url, tmp_path, "audit", "verify")) == 2
        assert main(cli(url, tmp_path, "audit", "search")) == 2
        err = capsys.readouterr().err
        assert "cannot read the shared audit trail" in err
        assert "secret-pw" not in err


class TestConsole:
    """The console's trail page and its verification read the shared trail when there is one."""

    def test_page_and_verification(self, pg_url: str, tmp_path: Path, two_nodes: dict[str, Path]) -> None:
        """Every node's records, newest first, with the node; the verdict names node and seq."""
        database = DatabaseConfig(url=pg_url)
        query = query_from({"node": "", "key": LICENSE}, datetime.now(UTC))
        page = read_page(tmp_path / "no-trail-here", query, 1, 3, database)
        assert page.total == 8
        assert [(r["node"], r["request_id"]) for r in page.records] == [
            ("B", "B-4"),
            ("B", "B-3"),
            ("B", "B-2"),
        ]
        only_a = read_page(tmp_path, query_from({"node": "A"}, datetime.now(UTC)), 1, 50, database)
        assert {r["node"] for r in only_a.records} == {"A"}
        assert only_a.total == 3
        verifier = Verifier(tmp_path / "no-trail-here", database=database)
        verification = asyncio.run(verifier.current())
        assert verification.ok
        assert verification.headline == "Intact: 12 records from 2 nodes."
        sql(pg_url, "DELETE FROM audit_records WHERE node = 'A' AND seq = 2")
        verification = asyncio.run(verifier.current(force=True))
        assert not verification.ok
        assert verification.headline.startswith("NOT INTACT at node A seq 2: seq 2 missing")


class TestShipping:
    """Shipping copies each record once, picks up where it stopped, and never merges two chains."""

    def test_idempotent(self, pg_url: str, store: PgAuditStore, two_nodes: dict[str, Path]) -> None:
        """Shipping again adds nothing; the same records again are fine, other bytes are refused."""
        assert ship_folder(two_nodes["B"], "B", store) == 0
        assert count(pg_url, "B") == 7
        rows = [(seq, moment, line) for seq, moment, line in store.chain("B")]
        assert store.append("B", rows[2:5], chain.line_hash(rows[4][2])) == 0
        assert store.head("B") == (7, chain.line_hash(rows[6][2]))
        changed = [(rows[3][0], rows[3][1], rows[3][2].replace(b"B laptop", b"X laptop"))]
        with pytest.raises(AuditConflictError):
            store.append("B", changed, chain.line_hash(changed[0][2]))
        assert verify_database(store).ok

    def test_resumes_after_restart(self, tmp_path: Path, store: PgAuditStore) -> None:
        """A node's next run is shipped from where the last stopped, by a new shipper and the same one."""
        folder = tmp_path / "a"
        write_node(folder, "A", 2)
        shipper = FolderShipper(folder, "A", store)
        assert shipper.ship() == 4
        write_node(folder, "A", 3, start=T0 + 100)  # the daemon restarted: start, 3 calls, stop
        assert shipper.ship() == 5
        write_node(folder, "A", 1, start=T0 + 200)
        assert ship_folder(folder, "A", store) == 3  # a new shipper finds the database's head in the files
        assert shipper.ship() == 0  # its position is stale: it finds the head again, ships nothing twice
        assert head_seq(store, "A") == 12
        report = verify_database(store)
        assert report.ok
        assert report.nodes[0].records == 12

    def test_refuses_another_chain_under_the_same_name(
        self, tmp_path: Path, store: PgAuditStore, two_nodes: dict[str, Path]
    ) -> None:
        """A second node configured with node.name A is reported, and nothing of it is merged."""
        other = tmp_path / "impostor"
        write_node(other, "A", 4)  # its own chain from seq 1, under the same name
        with pytest.raises(ShipRefusedError, match=r"node\.name"):
            ship_folder(other, "A", store)
        shorter = tmp_path / "short"
        write_node(shorter, "A", 1, start=T0 + 5)  # ends before the database's head
        with pytest.raises(ShipRefusedError, match=r"node\.name"):
            ship_folder(shorter, "A", store)
        assert head_seq(store, "A") == 5
        assert verify_database(store).ok

    def test_only_durable_records(self, tmp_path: Path, store: PgAuditStore) -> None:
        """A line written after the last fsync (beyond the head marker) waits, unless fsync is never."""
        folder = tmp_path / "a"
        write_node(folder, "A", 1)
        last = chain.list_files(folder)[-1].path
        tail = last.read_bytes().splitlines()[-1]
        extra = {
            "seq": 4,
            "time": chain.utc_now_text(T0 + 9),
            "prev": chain.line_hash(tail),
            "type": chain.STOP,
        }
        with last.open("ab") as stream:
            stream.write(chain.canonical_line(extra) + b"\n" + b'{"seq": 5, "ti')  # and a line being written
        assert ship_folder(folder, "A", store) == 3
        assert ship_folder(folder, "A", store, durable_only=False) == 1
        assert head_seq(store, "A") == 4


async def test_daemon_ships_its_records(daemon_factory: DaemonFactory, pg_url: str) -> None:
    """A daemon with database.url puts each call record in the shared trail within a second."""
    daemon = await daemon_factory(f"database.url={pg_url}", "node.name=alpha", "audit.fsync=always")
    store = PgAuditStore(connect_info(DatabaseConfig(url=pg_url)))
    try:
        status, headers, _ = await post(daemon, "/api/key/activate", activate_form())
        assert status == 200
        sent = time.monotonic()
        query = Query(node="alpha")
        while True:
            found = await asyncio.to_thread(lambda: list(search_database(store, query)))
            if found:
                break
            assert time.monotonic() - sent < 1.0, "the call record was not shipped within a second"
            await asyncio.sleep(0.05)
        assert found[0]["request_id"] == headers["X-Request-Id"]
        await daemon.stop()  # the stop record is shipped at close
        head = await asyncio.to_thread(store.head, "alpha")
        marker = await asyncio.to_thread(chain.read_head, daemon.config.audit_dir)
        assert marker is not None
        assert head == (marker.seq, marker.hash)
        report = await asyncio.to_thread(verify_database, store)
        assert report.ok
        assert [n.node for n in report.nodes] == ["alpha"]
    finally:
        await daemon.stop()
        await asyncio.to_thread(store.close)


async def test_shipper_rides_out_an_unreachable_database(tmp_path: Path, pg_url: str) -> None:
    """Shipping failures are logged and retried; once the database answers, the backlog goes in."""
    folder = tmp_path / "a"
    await asyncio.to_thread(write_node, folder, "A", 2)
    down = PgAuditStore(connect_info(DatabaseConfig(url="postgresql://x:pw@127.0.0.1:1/none")))
    shipper = Shipper(folder, "A", down, durable_only=True)
    assert await shipper.ship_now() == 0
    assert shipper.error is not None
    assert "pw" not in shipper.error
    await shipper.close()
    await asyncio.to_thread(open_schema, pg_url)
    up = PgAuditStore(connect_info(DatabaseConfig(url=pg_url)))
    shipper = Shipper(folder, "A", up, durable_only=True)
    assert await shipper.ship_now() == 4
    assert shipper.error is None
    await shipper.close()


async def test_shipper_closes_when_told_of_a_batch_at_the_same_moment(tmp_path: Path, pg_url: str) -> None:
    """The stop record's notice and close() in one turn: the waiting task ends instead of looping on."""
    folder = tmp_path / "a"
    await asyncio.to_thread(write_node, folder, "A", 1)
    await asyncio.to_thread(open_schema, pg_url)
    shipper = Shipper(folder, "A", PgAuditStore(connect_info(DatabaseConfig(url=pg_url))), durable_only=True)
    shipper.start()
    await asyncio.sleep(0.3)  # shipped once, now waiting for the next notice
    shipper.notify()  # the wake-up and the cancellation arrive together
    closing = asyncio.ensure_future(shipper.close())
    done, _ = await asyncio.wait({closing}, timeout=5)  # not cancelled on timeout: a hang stays a hang
    if not done:
        closing.cancel()  # its second cancellation of the task gets through; the test has failed already
        await asyncio.gather(closing, return_exceptions=True)
    assert done, "close() waited for a shipping task that never ends"
    assert count(pg_url, "A") == 3  # start, the call, stop: all shipped
