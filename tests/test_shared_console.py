"""Several nodes on one database: one console login for all, each node named, check-config's verdict."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy

from license_server.admin.app import create_admin_app
from license_server.admin.credentials import Secret
from license_server.admin.keys import Assets
from license_server.admin.sessions import COOKIE, SharedSessions
from license_server.audit import search
from license_server.cli import main
from license_server.config import AdminConfig, DatabaseConfig
from license_server.storage import pg_schema
from license_server.storage.pg_sessions import PgSessionTable
from license_server.storage.postgres import Database, DatabaseError, connect_info
from license_server.web.keys import SERVICES
from tests.admin_support import ADMIN_TOKEN, UPSTREAM_TOKEN, csrf_of
from tests.conftest import LICENSE, PRODUCT, Daemon, ServerFactory, Upstream

NodeFactory = Callable[[str], Awaitable[Daemon]]
ODD_NAME = 'east<1> & "x"\\y'  # printable, so allowed: every place that shows it must escape it


@pytest.fixture
def node(daemon_factory: Callable[..., Awaitable[Daemon]], pg_url: str, tmp_path: Path) -> NodeFactory:
    """Start a daemon named `name` with its own state_dir, on the test's one database."""

    async def start(name: str) -> Daemon:
        return await daemon_factory(
            f"state_dir={tmp_path / name}", f"database.url={pg_url}", f"node.name={name}"
        )

    return start


class Console:
    """The console of one node, driven with explicit cookies (no jar: nothing is shared by accident)."""

    def __init__(self, server: TestServer, daemon: Daemon) -> None:
        self.server = server
        self.daemon = daemon

    @property
    def base(self) -> str:
        """The console's origin."""
        return f"http://127.0.0.1:{self.server.port}"

    async def request(
        self, method: str, path: str, cookie: str | None = None, data: dict[str, str] | None = None
    ) -> tuple[int, str, CIMultiDictProxy[str]]:
        """One request, with the login cookie when given: status, body and headers (no redirect followed)."""
        headers = {COOKIE_HEADER: f"{COOKIE}={cookie}"} if cookie else {}
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
            session.request(
                method, self.base + path, data=data, headers=headers, allow_redirects=False
            ) as response,
        ):
            return response.status, await response.text(), response.headers

    async def login(self, name: str = "carol") -> str:
        """Log in with the admin token; returns the cookie's value."""
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
            session.post(
                self.base + "/login", data={"token": ADMIN_TOKEN, "name": name}, allow_redirects=False
            ) as response,
        ):
            assert response.status == 303, await response.text()
            return response.cookies[COOKIE].value

    def records(self, action: str) -> list[dict[str, Any]]:
        """This node's admin records of an action (blocking: run in a thread)."""
        found = search.search(self.daemon.config.audit_dir, search.Query(action=action))
        return [record for record in found if record["type"] == "admin"]


COOKIE_HEADER = "Cookie"


@pytest.fixture
def console(aiohttp_server: ServerFactory, upstream: Upstream) -> Callable[[Daemon], Awaitable[Console]]:
    """Serve the console over a node's daemon, as the daemon does; the fake upstream accepts its token."""
    upstream.fake.tokens.add(UPSTREAM_TOKEN)

    async def start(daemon: Daemon) -> Console:
        assets = await asyncio.to_thread(Assets.load)
        app = create_admin_app(
            daemon.app[SERVICES], AdminConfig(), Secret(ADMIN_TOKEN), Secret(UPSTREAM_TOKEN), assets
        )
        return Console(await aiohttp_server(app, host="127.0.0.1"), daemon)

    return start


@pytest.fixture
async def pair(node: NodeFactory, console: Callable[[Daemon], Awaitable[Console]]) -> tuple[Console, Console]:
    """Two nodes, a and b, each with its console, sharing one database."""
    first, second = await node("node-a"), await node("node-b")
    return await console(first), await console(second)


def stored_sessions(pg_url: str) -> list[tuple[Any, ...]]:
    """Every row of console_sessions."""
    with psycopg.connect(pg_url) as conn:
        return conn.execute("SELECT sid_hash, csrf, who, client, expires FROM console_sessions").fetchall()


class TestOneLoginEveryNode:
    """A load balancer without stickiness: any node honours a login made on any other."""

    async def test_login_on_a_serves_a_page_and_an_action_on_b(self, pair: tuple[Console, Console]) -> None:
        """B shows its pages to A's cookie, takes B's page's CSRF token, and records the action once."""
        a, b = pair
        cookie = await a.login()
        status, page, _ = await b.request("GET", "/activate", cookie)
        assert status == 200, page
        assert "node-b" in page
        assert "carol" in page
        csrf = csrf_of(page)
        _, page_on_a, _ = await a.request("GET", "/activate", cookie)
        assert csrf_of(page_on_a) == csrf  # one session, whichever node shows it
        form = {"product_id": str(PRODUCT), "key": LICENSE, "machine_code": "lab-7", "friendly_name": "LAB"}
        status, body, _ = await b.request("POST", "/activate", cookie, form)
        assert status == 403, body  # no CSRF token: refused on B as on A
        status, body, headers = await b.request("POST", "/activate", cookie, {**form, "csrf": csrf})
        assert status == 200, body
        assert headers["Content-Disposition"].endswith('-LAB.skm"')
        on_a, on_b = await asyncio.gather(
            asyncio.to_thread(a.records, "activate"), asyncio.to_thread(b.records, "activate")
        )
        assert on_a == []
        (record,) = on_b
        assert record["session"] == hashlib.sha256(cookie.encode()).hexdigest()[:12]
        assert record["actor"].startswith("carol@")

    async def test_logout_on_b_ends_the_login_on_a(self, pair: tuple[Console, Console], pg_url: str) -> None:
        """One logout ends the login everywhere; the row is gone."""
        a, b = pair
        cookie = await a.login()
        _, page, _ = await b.request("GET", "/", cookie)
        status, _, headers = await b.request("POST", "/logout", cookie, {"csrf": csrf_of(page)})
        assert (status, headers["Location"]) == (303, "/login")
        for console in (a, b):
            status, page, _ = await console.request("GET", "/", cookie)
            assert status == 401
            assert 'name="token"' in page
        assert await asyncio.to_thread(stored_sessions, pg_url) == []

    async def test_an_expired_login_is_refused(self, pair: tuple[Console, Console], pg_url: str) -> None:
        """Expiry is the database's clock: a row past it opens nothing, on either node."""
        a, b = pair
        cookie = await a.login()
        assert (await b.request("GET", "/", cookie))[0] == 200

        def expire() -> None:
            with psycopg.connect(pg_url) as conn:
                conn.execute("UPDATE console_sessions SET expires = extract(epoch FROM now()) - 1")

        await asyncio.to_thread(expire)
        for console in (a, b):
            assert (await console.request("GET", "/", cookie))[0] == 401

    async def test_the_database_never_holds_the_session_id(
        self, pair: tuple[Console, Console], pg_url: str
    ) -> None:
        """Only a SHA-256 of the id is stored: a copy of the table logs no one in."""
        a, _ = pair
        cookie = await a.login()
        ((sid_hash, csrf, who, client, _),) = await asyncio.to_thread(stored_sessions, pg_url)
        assert bytes(sid_hash) == hashlib.sha256(cookie.encode()).digest()
        assert (who, client) == ("carol", "127.0.0.1")
        for value in (bytes(sid_hash), csrf.encode(), who.encode(), client.encode()):
            assert cookie.encode() not in value
        assert len(cookie) == 32  # 24 random bytes, unsigned: nothing but the stored hash vouches for it
        forged = hashlib.sha256(cookie.encode()).hexdigest()
        assert (await a.request("GET", "/", forged))[0] == 401

    async def test_a_node_that_cannot_reach_the_database_answers_503(
        self, pair: tuple[Console, Console]
    ) -> None:
        """Logins live in the database: without it a cookie is neither accepted nor refused, but 503."""
        a, b = pair
        cookie = await a.login()
        database = b.daemon.app[SERVICES].database
        assert database is not None
        await database.close()
        status, page, headers = await b.request("GET", "/", cookie)
        assert status == 503, page
        assert headers["Retry-After"] == "5"
        assert "did not answer" in page
        assert (await a.request("GET", "/", cookie))[0] == 200


async def test_the_oldest_logins_end_past_the_cap(pg_url: str) -> None:
    """The table is capped as the memory is: past the cap, the login that expires first ends."""
    database = Database(connect_info(DatabaseConfig(url=pg_url)))
    await database.open()
    try:
        sessions = SharedSessions(PgSessionTable(database, 3), lifetime=60)
        cookies = [(await sessions.create(f"admin{n}", "127.0.0.1"))[1] for n in range(5)]
        alive = [await sessions.find(cookie) is not None for cookie in cookies]
        assert alive == [False, False, True, True, True]
        assert await sessions.find("x" * 65) is None
    finally:
        await database.close()
    with pytest.raises(DatabaseError, match="did not answer"):
        await sessions.find(cookies[-1])


class TestNodeShown:
    """The node's name, and the database (never its password), in /status, /metrics and the console."""

    async def test_status_names_node_and_database(self, node: NodeFactory, pg_url: str) -> None:
        """/status: "node", and "database" with the URL as logs show it and the schema version."""
        daemon = await node(ODD_NAME)
        async with aiohttp.ClientSession() as session, session.get(daemon.base + "/status") as response:
            document = await response.json()
        assert document["node"] == ODD_NAME
        shared = document["database"]
        assert (shared["url"], shared["schema_version"], shared["state"]) == (pg_url, pg_schema.LATEST, "up")

    async def test_status_never_shows_the_password(
        self, daemon_factory: Callable[..., Awaitable[Daemon]], pg_url: str
    ) -> None:
        """A password in the URL is shown as ***: the test cluster trusts loopback, so it connects anyway."""
        with_password = pg_url.replace("@", ":hunter2-secret@", 1)
        daemon = await daemon_factory(f"database.url={with_password}", "node.name=a")
        async with aiohttp.ClientSession() as session, session.get(daemon.base + "/status") as response:
            text = await response.text()
        assert "hunter2" not in text
        assert ":***@127.0.0.1:" in json.loads(text)["database"]["url"]

    async def test_metrics_carry_the_node_info(self, node: NodeFactory) -> None:
        """license_server_node_info{node="..."} 1, escaped by the Prometheus client."""
        daemon = await node(ODD_NAME)
        async with aiohttp.ClientSession() as session, session.get(daemon.base + "/metrics") as response:
            text = await response.text()
        assert 'license_server_node_info{node="east<1> & \\"x\\"\\\\y"} 1.0' in text.splitlines()

    async def test_console_header_and_status_page_name_the_node(
        self, node: NodeFactory, console: Callable[[Daemon], Awaitable[Console]], pg_url: str
    ) -> None:
        """Every page's header names the node (escaped); the status page names the database too."""
        admin = await console(await node(ODD_NAME))
        cookie = await admin.login()
        for path in ("/", "/machines", "/login"):
            status, page, _ = await admin.request("GET", path, cookie if path != "/login" else None)
            assert status == 200, page
            assert "east&lt;1&gt; &amp; &quot;x&quot;\\y" in page
            assert ODD_NAME not in page
        _, page, _ = await admin.request("GET", "/", cookie)
        assert f"{pg_url} (schema version {pg_schema.LATEST})" in page


def check_config(
    folder: Path, url: str, capsys: pytest.CaptureFixture[str], password_file: Path | None = None
) -> tuple[int, str, str]:
    """`license-server check-config` with a database: exit code, stdout, stderr."""
    lines = [f"state_dir: {folder / 'state'}", "node:", "  name: node-c", "database:", f"  url: {url}"]
    if password_file is not None:
        lines.append(f"  password_file: {password_file}")
    path = folder / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    code = main(["check-config", "--config", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class TestCheckConfig:
    """check-config says whether the database answers and at which schema version, never its password."""

    async def test_reachable_database_and_its_schema_version(
        self, tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Before any node ran: reachable, no schema; after: the version in force. The node is named."""
        code, out, err = await asyncio.to_thread(check_config, tmp_path, pg_url, capsys)
        assert (code, err) == (0, "")
        summary = json.loads(out)
        assert summary["node"] == {"name": "node-c"}
        assert summary["database"]["reachable"] is True
        assert summary["database"]["schema_version"] == 0
        assert "no schema yet" in summary["database"]["state"]
        database = Database(connect_info(DatabaseConfig(url=pg_url)))
        await database.open()
        await database.close()
        capsys.readouterr()  # the migration's log lines
        code, out, err = await asyncio.to_thread(check_config, tmp_path, pg_url, capsys)
        assert (code, err) == (0, "")
        assert json.loads(out)["database"]["schema_version"] == pg_schema.LATEST

    def test_unreachable_database_exits_1_without_the_password(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Nothing listens there: exit 1 and one clear line; the URL's password is not printed anywhere."""
        url = "postgresql://license:hunter2-secret@127.0.0.1:1/license_server"
        code, out, err = check_config(tmp_path, url, capsys)
        assert code == 1
        (line,) = err.splitlines()
        assert line.startswith(
            "license-server: the database is not reachable: cannot connect to the database at"
        )
        assert "postgresql://license:***@127.0.0.1:1/license_server" in line
        assert json.loads(out)["database"]["reachable"] is False
        assert "hunter2" not in out + err

    @pytest.mark.parametrize("reachable", [True, False])
    def test_password_file_is_never_printed(
        self, tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str], reachable: bool
    ) -> None:
        """A password read from database.password_file is in neither output, reachable or not."""
        secret = tmp_path / "db-password"
        secret.write_text("filed-secret-4711\n")
        secret.chmod(0o600)
        url = pg_url if reachable else "postgresql://license@127.0.0.1:1/license_server"
        code, out, err = check_config(tmp_path, url, capsys, password_file=secret)
        assert code == (0 if reachable else 1), err
        assert "filed-secret" not in out + err
        assert json.loads(out)["database"]["password_file"] == str(secret)
