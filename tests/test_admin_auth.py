"""The console's door: every route needs the admin token, logins are sessions, changes need a CSRF token."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from license_server import cli
from license_server.admin.app import create_admin_app, start_admin
from license_server.admin.auth import PUBLIC_ROUTES
from license_server.admin.credentials import MIN_TOKEN_CHARS, CredentialError, Secret, load_credentials
from license_server.admin.keys import Assets
from license_server.admin.sessions import COOKIE
from license_server.admin.throttle import (
    FORGET_AFTER,
    FREE_FAILURES,
    MAX_ADDRESSES,
    MAX_WAIT,
    RECORDS_PER_MINUTE,
    Throttle,
)
from license_server.audit import search
from license_server.config import AdminConfig, AdminListenConfig, ConfigError, load_config
from license_server.web.keys import SERVICES
from tests.admin_support import ADMIN_TOKEN, Admin, csrf_of, write_secret
from tests.conftest import Clock, Daemon, Upstream

_SAMPLE = {"product_id": "3349", "key": "K", "machine_code": "m"}
SYSTEMD_TOKEN = "from-systemd-4c8e1a7f3b9d2e6a0c5f8b1d7e3a9c4f"
FILE_TOKEN = "from-file-9e2b7d4a1c6f3e8b0a5d2c7f4e1b9a6d"


def admin_routes(admin: Admin) -> list[tuple[str, str, str]]:
    """Every route of the console as (name, method, path); a new route shows up here by itself."""
    found = []
    for route in admin.server.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        assert path is not None, route
        assert "{" not in path, f"{route}: this test must learn to fill in dynamic paths"
        found.append((route.name or "", route.method, path))
    return found


class TestEveryRoute:
    """No credential, no console."""

    async def test_public_routes_are_only_login_stylesheet_and_monitoring(self, admin: Admin) -> None:
        """The routes without a credential are exactly the login form, its stylesheet and monitoring."""
        names = {name for name, _, _ in admin_routes(admin)}
        assert names >= PUBLIC_ROUTES
        assert {
            "login_form",
            "login",
            "stylesheet",
            "healthz",
            "readyz",
            "status",
            "metrics",
        } == PUBLIC_ROUTES

    @pytest.mark.parametrize(
        "headers",
        [
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {ADMIN_TOKEN}"},
            {"Cookie": f"{COOKIE}=x.y"},
        ],
    )
    async def test_every_other_route_answers_401(
        self, admin: Admin, upstream: Upstream, headers: dict[str, str]
    ) -> None:
        """Each route but the public ones answers 401 without a valid credential, whatever is sent.

        A wrong bearer token is a guess: after FREE_FAILURES of them the address gets 429 instead.
        """
        routes = [(n, m, p) for n, m, p in admin_routes(admin) if n not in PUBLIC_ROUTES]
        assert len(routes) >= 18
        routes += [("", "GET", "/nothing-here"), ("", "GET", "/api/v2/whatever")]
        guesses = headers.get("Authorization", "").startswith("Bearer")
        async with aiohttp.ClientSession(admin.base) as session:
            for number, (name, method, path) in enumerate(routes):
                async with session.request(method, path, headers=headers, params=_SAMPLE, data=_SAMPLE) as r:
                    expected = 429 if guesses and number >= FREE_FAILURES else 401
                    assert r.status == expected, (name, method, path, r.status)
                    body = await r.text()
                    assert "Log in" in body or "Bearer" in body or "Too many wrong admin tokens" in body
        assert upstream_untouched(admin, upstream)

    async def test_api_401_has_a_bearer_challenge(self, admin: Admin) -> None:
        """An API client learns how to authenticate; a browser gets the login form."""
        async with aiohttp.ClientSession(admin.base) as session:
            async with session.get("/api/v1/machines") as r:
                assert r.status == 401
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                assert "error" in await r.json()
            async with session.get("/machines?q=alice") as r:
                assert r.status == 401
                page = await r.text()
                assert 'name="token"' in page
                assert 'value="/machines?q=alice"' in page

    async def test_bearer_token_opens_the_api(self, admin: Admin) -> None:
        """`Authorization: Bearer <admin token>` is all a script needs."""
        status, body, headers = await admin.api("GET", "/api/v1/status")
        assert status == 200
        assert body["upstream"]["state"] == "closed"
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        status, document, _ = await admin.api("GET", "/api/openapi.json")
        assert status == 200
        assert document["openapi"].startswith("3.")

    async def test_monitoring_is_served_on_the_admin_port(self, admin: Admin) -> None:
        """/healthz, /readyz, /status and /metrics answer as on the workstation port."""
        async with aiohttp.ClientSession(admin.base) as session:
            for path in ("/healthz", "/readyz", "/status"):
                async with session.get(path) as r:
                    assert r.status == 200, path
            async with session.get("/metrics") as r:
                assert "license_server_build_info" in await r.text()


def upstream_untouched(admin: Admin, upstream: Upstream) -> bool:
    """Whether the console never sent anything upstream (the fake upstream counts what reaches it)."""
    return admin.services.upstream is not None and not upstream.fake.calls


class TestLogin:
    """Logging in and out of the console in a browser."""

    async def test_login_sets_a_strict_http_only_cookie_and_records_it(self, admin: Admin) -> None:
        """The right token gives a session cookie (HttpOnly, SameSite=Strict) and an audit record."""
        async with admin.browser() as session:
            async with session.post(
                "/login",
                data={"token": ADMIN_TOKEN, "name": "carol", "next": "/machines"},
                allow_redirects=False,
            ) as r:
                assert r.status == 303
                assert r.headers["Location"] == "/machines"
                cookie = r.headers["Set-Cookie"]
                assert "HttpOnly" in cookie
                assert "SameSite=Strict" in cookie
            async with session.get("/machines") as r:
                assert r.status == 200
                assert "carol" in await r.text()
        records = await admin_records(admin)
        assert records[-1]["action"] == "login"
        assert records[-1]["actor"].startswith("carol@127.0.0.1#")
        assert ADMIN_TOKEN not in str(records)

    async def test_wrong_token_is_refused_and_recorded(self, admin: Admin) -> None:
        """A wrong token gives 401, no cookie, and a login_failed record (without the attempt's text)."""
        form = {"token": "guess-123", "name": "mallory"}
        async with admin.browser() as session, session.post("/login", data=form) as r:
            assert r.status == 401
            assert COOKIE not in r.cookies
            assert "not the admin token" in await r.text()
        record = (await admin_records(admin))[-1]
        assert (record["action"], record["actor"]) == ("login_failed", "mallory@127.0.0.1#-")
        assert "guess-123" not in str(record)

    @pytest.mark.parametrize(
        "target", ["https://evil.example/", "//evil.example/x", "/\\evil", "javascript:x"]
    )
    async def test_no_open_redirect_after_login(self, admin: Admin, target: str) -> None:
        """After login the browser only goes to a page of this console."""
        async with admin.browser() as session:
            form = {"token": ADMIN_TOKEN, "next": target}
            async with session.post("/login", data=form, allow_redirects=False) as r:
                assert r.headers["Location"] == "/"

    async def test_logout_ends_the_session(self, admin: Admin) -> None:
        """After logout the same cookie opens nothing."""
        async with admin.browser() as session:
            csrf = await admin.login(session)
            cookie = session.cookie_jar.filter_cookies(aiohttp.client.URL(admin.base))[COOKIE].value
            async with session.post("/logout", data={"csrf": csrf}) as r:
                assert r.status == 200  # the login page after the redirect
        async with (
            aiohttp.ClientSession(admin.base, cookies={COOKIE: cookie}) as session,
            session.get("/") as r,
        ):
            assert r.status == 401

    async def test_session_expires(
        self, admin_factory: Callable[..., Awaitable[Admin]], clock: Clock
    ) -> None:
        """A login lasts admin.session_lifetime."""
        admin = await admin_factory(settings=AdminConfig(session_lifetime=60.0))
        async with admin.browser() as session:
            await admin.login(session)
            clock.advance(61)
            async with session.get("/") as r:
                assert r.status == 401

    async def test_forged_cookie_is_refused(self, admin: Admin) -> None:
        """A cookie whose signature does not match this process's key opens nothing."""
        async with admin.browser() as session:
            await admin.login(session)
            real = session.cookie_jar.filter_cookies(aiohttp.client.URL(admin.base))[COOKIE].value
        sid, _, _ = real.partition(".")
        async with (
            aiohttp.ClientSession(admin.base, cookies={COOKIE: f"{sid}.AAAA"}) as session,
            session.get("/") as r,
        ):
            assert r.status == 401


class TestCsrf:
    """A change made with a session cookie must come from a console page."""

    async def test_post_without_or_with_a_wrong_csrf_token_is_refused(
        self, admin: Admin, upstream: Upstream
    ) -> None:
        """Deactivate, activate and logout refuse a form without the session's CSRF token."""
        async with admin.browser() as session:
            csrf = await admin.login(session)
            for path in ("/machines/deactivate", "/activate", "/logout"):
                for token in (None, "wrong", csrf + "x"):
                    form = {**_SAMPLE, **({"csrf": token} if token is not None else {})}
                    async with session.post(path, data=form) as r:
                        assert r.status == 403, (path, token)
                        assert "CSRF" in await r.text()
            async with session.post("/api/v1/machines/deactivate", json=_SAMPLE) as r:
                assert r.status == 403
        assert upstream_untouched(admin, upstream)

    async def test_the_pages_token_works(self, admin: Admin) -> None:
        """The token in the page's form lets the change through (here: to upstream's refusal)."""
        async with admin.browser() as session:
            await admin.login(session)
            async with session.get("/activate") as r:
                csrf = csrf_of(await r.text())
            async with session.post("/machines/deactivate", data={**_SAMPLE, "csrf": csrf}) as r:
                assert r.status == 409  # upstream: no such key
                assert "Could not find the key" in await r.text()
            async with session.post(
                "/api/v1/machines/deactivate", json=_SAMPLE, headers={"X-CSRF-Token": csrf}
            ) as r:
                assert r.status == 409


async def admin_records(admin: Admin) -> list[dict[str, object]]:
    """The admin records of the trail."""
    status, body, _ = await admin.api("GET", "/api/v1/audit", params={"per_page": "500"})
    assert status == 200
    return [r for r in reversed(body["records"]) if r["type"] == "admin"]


class TestStart:
    """Whether and where the console listens."""

    async def test_no_admin_token_no_console(self, daemon: Daemon) -> None:
        """Without a token the console does not start, and the log says why."""
        with capture_logs() as logs:
            started = await start_admin(daemon.app[SERVICES], AdminConfig(), shutdown_timeout=1, env={})
        assert started is None
        assert [entry["event"] for entry in logs] == ["admin_console_not_started"]
        assert "no admin token configured" in logs[0]["reason"]

    async def test_token_file_and_systemd_credentials(self, daemon: Daemon, tmp_path: Path) -> None:
        """A token file, else $CREDENTIALS_DIRECTORY/admin-token; the console listens on loopback."""
        creds = tmp_path / "creds"
        creds.mkdir()
        write_secret(creds / "admin-token", SYSTEMD_TOKEN + "\n", 0o440)  # as systemd's ACL shows it
        write_secret(creds / "upstream-token", "upstream-from-systemd\n", 0o400)
        settings = AdminConfig(listen=AdminListenConfig(port=0))
        env = {"CREDENTIALS_DIRECTORY": str(creds)}
        server = await start_admin(daemon.app[SERVICES], settings, shutdown_timeout=1, env=env)
        assert server is not None
        try:
            host, port = server.bound[0]
            assert host == "127.0.0.1"
            async with aiohttp.ClientSession() as session:
                headers = {"Authorization": f"Bearer {SYSTEMD_TOKEN}"}
                async with session.get(f"http://{host}:{port}/api/v1/status", headers=headers) as r:
                    assert r.status == 200
                    assert (await r.json())["console"]["can_act"] is True
        finally:
            await server.stop()
        token_file = write_secret(tmp_path / "admin.token", FILE_TOKEN)
        found = await asyncio.to_thread(load_credentials, AdminConfig(token_file=token_file), env)
        assert found.admin is not None
        assert found.admin.matches(FILE_TOKEN)
        assert found.upstream is not None
        assert found.upstream.matches("upstream-from-systemd")
        assert found.admin_source == f"admin.token_file {token_file}"
        assert found.upstream_source == "systemd credential upstream-token"

    @pytest.mark.parametrize("content", [b"", b"  \n", b"two words", b"\xff\xfe"])
    async def test_unusable_token_file_stops_only_the_console(
        self, daemon: Daemon, tmp_path: Path, content: bytes
    ) -> None:
        """An empty or garbled token file is an error naming the file, never its content."""
        token_file = tmp_path / "admin.token"
        token_file.write_bytes(content)
        token_file.chmod(0o600)
        with pytest.raises(CredentialError, match=r"admin\.token_file"):
            await asyncio.to_thread(load_credentials, AdminConfig(token_file=token_file), {})
        with capture_logs() as logs:
            started = await start_admin(
                daemon.app[SERVICES], AdminConfig(token_file=token_file), shutdown_timeout=1, env={}
            )
        assert started is None
        assert logs[0]["event"] == "admin_console_not_started"
        assert str(token_file) in logs[0]["reason"]
        assert "words" not in str(logs)

    def test_never_on_the_workstation_port(self) -> None:
        """The console and the workstations never share a port."""
        with pytest.raises(ConfigError, match=r"admin\.listen\.port"):
            load_config(env={}, overrides=["listen.port=9000", "admin.listen.port=9000"])
        config = load_config(env={})
        assert (config.admin.listen.host, config.admin.listen.port) == ("127.0.0.1", 8081)

    def test_secrets_do_not_show_themselves(self) -> None:
        """A token in a repr, an f-string or a log line reads as hidden."""
        secret = Secret("s3cret-value")
        assert "s3cret" not in repr(secret)
        assert "s3cret" not in f"{secret}"
        assert secret.scrub("echo s3cret-value back") == "echo [token] back"

    async def test_console_app_serves_its_assets(self, daemon: Daemon) -> None:
        """The stylesheet comes from the daemon itself: no CDN, nothing from the internet."""
        assets = await asyncio.to_thread(Assets.load)
        app = create_admin_app(daemon.app[SERVICES], AdminConfig(), Secret("t"), None, assets)
        assert b"font-family" in assets.stylesheet
        assert all("http" not in text for text in [assets.stylesheet.decode()])
        assert app.router["stylesheet"].url_for().path == "/static/console.css"


async def records_of(admin: Admin, action: str) -> list[dict[str, Any]]:
    """The admin records of one action, oldest first, read from the trail's files."""
    folder = admin.services.config.audit_dir
    found = await asyncio.to_thread(lambda: list(search.search(folder, search.Query())))
    return [r for r in found if r["type"] == "admin" and r["action"] == action]


async def metric(admin: Admin, line_start: str) -> float:
    """The value of one sample of the console's /metrics, e.g. 'license_server_admin_auth_throttled_total'."""
    async with aiohttp.ClientSession(admin.base) as session, session.get("/metrics") as r:
        text = await r.text()
    (value,) = [line.split()[-1] for line in text.splitlines() if line.startswith(line_start + " ")]
    return float(value)


FAILURES = 'license_server_admin_auth_failures_total{via="%s"}'
THROTTLED = "license_server_admin_auth_throttled_total"


class TestThrottle:
    """Guessing the admin token is slowed per address, recorded within a budget, and counted."""

    async def test_wrong_logins_make_the_address_wait(self, admin: Admin, clock: Clock) -> None:
        """Past FREE_FAILURES wrong logins: 429, Retry-After doubling; not even the right token is checked."""
        wrong = {"token": "guess-0000", "name": "mallory"}
        right = {"token": ADMIN_TOKEN, "name": "carol"}
        async with admin.browser() as session:
            for _ in range(FREE_FAILURES):
                async with session.post("/login", data=wrong) as r:
                    assert r.status == 401
            for wait in ("1", "2"):
                async with session.post("/login", data=right, allow_redirects=False) as r:
                    assert r.status == 429
                    assert r.headers["Retry-After"] == wait
                    assert COOKIE not in r.cookies
                    assert "Too many wrong admin tokens" in await r.text()
                clock.advance(int(wait))
                if wait == "1":
                    async with session.post("/login", data=wrong) as r:
                        assert r.status == 401  # checked again once the wait is over, and it doubles
            async with session.post("/login", data=right, allow_redirects=False) as r:
                assert r.status == 303
            for _ in range(FREE_FAILURES - 1):  # a correct login wipes the slate
                async with session.post("/login", data=wrong) as r:
                    assert r.status == 401
        assert len(await records_of(admin, "login_failed")) == FREE_FAILURES + 1 + FREE_FAILURES - 1
        assert await metric(admin, FAILURES % "login") == 2 * FREE_FAILURES
        assert await metric(admin, THROTTLED) == 2

    async def test_wrong_bearer_tokens_are_recorded_counted_and_slowed(self, admin: Admin) -> None:
        """Each wrong bearer token is an audit record and a metric; past FREE_FAILURES the API answers 429."""
        async with admin.browser("127.0.0.2") as session:
            for number in range(FREE_FAILURES + 2):
                guess = {"Authorization": f"Bearer guess-{number:04}"}
                async with session.get("/api/v1/status", headers=guess) as r:
                    assert r.status == (401 if number < FREE_FAILURES else 429)
            async with session.get("/api/v1/status", headers=admin.bearer) as r:
                assert r.status == 429
                assert int(r.headers["Retry-After"]) >= 1
                assert "Too many wrong admin tokens" in (await r.json())["error"]
        records = await records_of(admin, "bearer_failed")
        assert [r["actor"] for r in records] == ["admin@127.0.0.2#api"] * FREE_FAILURES
        assert [r["client"] for r in records] == ["127.0.0.2"] * FREE_FAILURES
        assert "guess-" not in str(records)
        assert await metric(admin, FAILURES % "bearer") == FREE_FAILURES
        assert await metric(admin, THROTTLED) == 3

    async def test_other_addresses_still_get_in(self, admin: Admin) -> None:
        """While one address waits, a correct login and a correct bearer token from another one work."""
        async with admin.browser("127.0.0.2") as attacker:
            for number in range(FREE_FAILURES + 1):
                async with attacker.post("/login", data={"token": f"guess-{number}"}) as r:
                    pass
            assert r.status == 429
        form = {"token": ADMIN_TOKEN, "name": "carol"}
        async with admin.browser() as session, session.post("/login", data=form, allow_redirects=False) as r:
            assert r.status == 303
        status, _, _ = await admin.api("GET", "/api/v1/status")
        assert status == 200

    async def test_a_flood_cannot_fill_the_trail(self, admin: Admin, clock: Clock) -> None:
        """At most RECORDS_PER_MINUTE failures a minute are recorded; the next one counts those left out."""
        flood = RECORDS_PER_MINUTE + 7
        for number in range(flood):  # one guess per address: no address is throttled
            async with (
                admin.browser(f"127.0.1.{number + 1}") as session,
                session.get("/api/v1/machines", headers={"Authorization": "Bearer guess"}) as r,
            ):
                assert r.status == 401
        assert len(await records_of(admin, "bearer_failed")) == RECORDS_PER_MINUTE
        assert await metric(admin, FAILURES % "bearer") == flood
        clock.advance(60)
        async with admin.browser("127.0.2.1") as session, session.post("/login", data={"token": "x"}) as r:
            assert r.status == 401
        (last,) = await records_of(admin, "login_failed")
        assert last["unrecorded"] == 7

    def test_the_address_table_is_bounded(self, clock: Clock) -> None:
        """Addresses beyond MAX_ADDRESSES push out the quietest; a whole IPv6 /64 counts as one address."""
        throttle = Throttle(clock)
        for number in range(MAX_ADDRESSES + 5000):
            throttle.failed(str(ipaddress.IPv4Address(0x0A000000 + number)))
        assert len(throttle) == MAX_ADDRESSES
        for number in range(FREE_FAILURES):
            throttle.failed(f"2001:db8::{number + 1:x}")
        assert throttle.wait("2001:db8::ffff") == 1
        assert throttle.wait("2001:db8:0:1::1") is None
        assert len(throttle) == MAX_ADDRESSES
        clock.advance(FORGET_AFTER)
        assert throttle.wait("2001:db8::1") is None

    def test_rotating_addresses_past_a_full_table_wins_no_guesses(self, clock: Clock) -> None:
        """With every remembered address waiting, a newcomer waits after its first wrong token."""
        throttle = Throttle(clock, max_addresses=3)
        for number in range(3):
            for _ in range(FREE_FAILURES):
                throttle.failed(f"10.0.0.{number}")
        assert all(throttle.wait(f"10.0.0.{number}") for number in range(3))
        assert throttle.failed("10.0.1.1") > 0
        assert throttle.wait("10.0.1.1") is not None
        assert len(throttle) == 3
        clock.advance(
            MAX_WAIT + 1
        )  # nobody waits now: a quiet address makes room, and guesses are free again
        assert throttle.failed("10.0.2.1") == 0
        assert len(throttle) == 3


class TestWeakSecrets:
    """A console token that can be guessed or read by others is refused, naming the file and the fix."""

    @pytest.mark.parametrize(
        "token", ["x", "3f9c1d7e5b2a48c6e0d1f7a9b3c5d2e", "a" * 64, "abcdefg" * 10], ids=str.__len__
    )
    async def test_guessable_admin_token_is_refused(self, daemon: Daemon, tmp_path: Path, token: str) -> None:
        """Too short (under MIN_TOKEN_CHARS) or too plain: no console, and the log says how to make one."""
        token_file = write_secret(tmp_path / "admin.token", token + "\n")
        with capture_logs() as logs:
            started = await start_admin(
                daemon.app[SERVICES], AdminConfig(token_file=token_file), shutdown_timeout=1, env={}
            )
        assert started is None
        (event,) = logs
        reason = event["reason"]
        assert reason.startswith(f"admin.token_file {token_file}: the admin token")
        assert "openssl rand -hex 32" in reason
        assert token not in reason or len(token) < 3

    async def test_token_file_owned_by_another_user_is_refused(self, tmp_path: Path) -> None:
        """A private token file another user owns could hold that user's token: it is not used."""
        if os.geteuid() != 0:
            pytest.skip("making a file another user owns needs root")
        token_file = write_secret(tmp_path / "admin.token", FILE_TOKEN)
        os.chown(token_file, 12345, 12345)
        with pytest.raises(CredentialError, match="owned by user id 12345"):
            await asyncio.to_thread(load_credentials, AdminConfig(token_file=token_file), {})

    async def test_a_fifo_in_place_of_a_token_file_is_refused_at_once(self, tmp_path: Path) -> None:
        """A named pipe where the token file should be is refused, not waited on for ever."""
        fifo = tmp_path / "admin.token"
        os.mkfifo(fifo, 0o600)
        with pytest.raises(CredentialError, match="not a regular file"):
            await asyncio.wait_for(
                asyncio.to_thread(load_credentials, AdminConfig(token_file=fifo), {}), timeout=10
            )

    async def test_a_random_token_is_accepted(self, tmp_path: Path) -> None:
        """A token as `openssl rand -hex 32` makes it, in a private file, opens the console."""
        token = secrets.token_hex(32)
        found = await asyncio.to_thread(
            load_credentials, AdminConfig(token_file=write_secret(tmp_path / "t", token)), {}
        )
        assert found.admin is not None
        assert found.admin.matches(token)
        assert len(token) >= MIN_TOKEN_CHARS

    @pytest.mark.parametrize("setting", ["token_file", "upstream_token_file"])
    @pytest.mark.parametrize("mode", [0o666, 0o644, 0o640, 0o604, 0o620, 0o602], ids=oct)
    async def test_token_file_open_to_group_or_others_is_refused(
        self, tmp_path: Path, setting: str, mode: int
    ) -> None:
        """Like ssh with a key: a token file any other user or group may read or write is not used."""
        token_file = write_secret(tmp_path / "token", FILE_TOKEN, mode)
        settings = AdminConfig(**{setting: token_file})  # type: ignore[arg-type]
        with pytest.raises(CredentialError) as caught:
            await asyncio.to_thread(load_credentials, settings, {})
        message = str(caught.value)
        assert message.startswith(f"admin.{setting} {token_file}: open to group or others (mode 0{mode:o})")
        assert f"chmod 600 {token_file}" in message
        assert FILE_TOKEN not in message

    @pytest.mark.parametrize(
        ("mode", "usable"),
        [(0o400, True), (0o440, True), (0o444, False), (0o604, False)],
        ids=["0400", "0440", "0444", "0604"],
    )
    async def test_systemd_credentials_are_judged_as_systemd_makes_them(
        self, tmp_path: Path, mode: int, usable: bool
    ) -> None:
        """systemd's credential (0400, shown 0440 with its ACL) is used; one that others may read is not."""
        folder = tmp_path / "credentials"
        folder.mkdir()
        write_secret(folder / "admin-token", SYSTEMD_TOKEN, mode)
        env = {"CREDENTIALS_DIRECTORY": str(folder)}
        if usable:
            found = await asyncio.to_thread(load_credentials, AdminConfig(), env)
            assert found.admin is not None
            return
        with pytest.raises(CredentialError, match="open to others") as caught:
            await asyncio.to_thread(load_credentials, AdminConfig(), env)
        assert str(folder / "admin-token") in str(caught.value)

    @pytest.mark.parametrize(
        ("token", "mode", "problem"),
        [(FILE_TOKEN, 0o644, "open to group or others"), ("short", 0o600, "openssl rand -hex 32")],
    )
    def test_check_config_reports_the_same(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], token: str, mode: int, problem: str
    ) -> None:
        """`check-config` exits 2 with the message the console would log, naming the key and the file."""
        token_file = write_secret(tmp_path / "admin.token", token, mode)
        config = tmp_path / "config.yaml"
        config.write_text(f"state_dir: state\nadmin:\n  token_file: {token_file}\n")
        assert cli.main(["check-config", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"configuration error: admin.token_file {token_file}: " in err
        assert problem in err
        assert token not in err


class TestLoginTarget:
    """Where the browser goes after login is exactly what was checked."""

    @pytest.mark.parametrize(
        "target",
        ["/machines\r\nSet-Cookie: x=1", "/machines\nLocation: //evil.example", "/\x00", "/\t/evil.example"],
        ids=["crlf", "lf", "nul", "tab"],
    )
    async def test_control_characters_lead_home(self, admin: Admin, target: str) -> None:
        """A `next` with CR, LF, NUL or tab: the login still succeeds and goes to "/"; nothing is injected."""
        async with admin.browser() as session:
            form = {"token": ADMIN_TOKEN, "next": target}
            async with session.post("/login", data=form, allow_redirects=False) as r:
                assert r.status == 303
                assert r.headers["Location"] == "/"
                assert [c.key for c in r.cookies.values()] == [COOKIE]
            async with session.get("/") as r:
                assert r.status == 200
            async with session.get("/login", params={"next": target}) as r:
                assert 'name="next" value="/"' in await r.text()

    async def test_ordinary_targets_still_work(self, admin: Admin) -> None:
        """A path with a search, even in another script, is kept."""
        async with admin.browser() as session:
            form = {"token": ADMIN_TOKEN, "next": "/machines?q=Jürgen"}
            async with session.post("/login", data=form, allow_redirects=False) as r:
                assert r.headers["Location"] == "/machines?q=Jürgen"


class TestSecureCookie:
    """admin.secure_cookie marks the login cookie Secure behind a TLS reverse proxy."""

    @pytest.mark.parametrize(
        ("setting", "headers", "secure"),
        [
            ("auto", {}, False),
            ("auto", {"X-Forwarded-Proto": "https"}, True),
            ("auto", {"Forwarded": "for=192.0.2.7;proto=https"}, True),
            ("auto", {"X-Forwarded-Proto": "http"}, False),
            ("true", {}, True),
            ("false", {"X-Forwarded-Proto": "https"}, False),
        ],
    )
    async def test_cookie_is_secure_as_configured(
        self,
        admin_factory: Callable[..., Awaitable[Admin]],
        setting: str,
        headers: dict[str, str],
        secure: bool,
    ) -> None:
        """auto: Secure when a proxy says the browser used HTTPS; true: always; false: never."""
        admin = await admin_factory(settings=AdminConfig(secure_cookie=setting))
        async with admin.browser() as session:
            form = {"token": ADMIN_TOKEN}
            async with session.post("/login", data=form, headers=headers, allow_redirects=False) as r:
                morsel = r.cookies[COOKIE]
                assert bool(morsel["secure"]) is secure
                assert morsel["httponly"]
                assert morsel["samesite"] == "Strict"

    @pytest.mark.parametrize(
        ("override", "expected"),
        [("admin.secure_cookie=true", "true"), ("admin.secure_cookie=AUTO", "auto"), (None, "auto")],
    )
    def test_the_setting(self, override: str | None, expected: str) -> None:
        """Default auto; the command line and the environment take the words as they are."""
        config = load_config(env={}, overrides=[override] if override else [])
        assert config.admin.secure_cookie == expected

    def test_yaml_booleans_and_bad_values(self, tmp_path: Path) -> None:
        """YAML's true and false work too; anything else is an error naming the key."""
        path = tmp_path / "config.yaml"
        path.write_text("state_dir: state\nadmin:\n  secure_cookie: yes\n")
        assert load_config(path, env={}).admin.secure_cookie == "true"
        path.write_text("state_dir: state\nadmin:\n  secure_cookie: sometimes\n")
        with pytest.raises(ConfigError, match=r"admin\.secure_cookie.*expected one of auto, true, false"):
            load_config(path, env={})
