"""The console's door: every route needs the admin token, logins are sessions, changes need a CSRF token."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from license_server.admin.app import create_admin_app, start_admin
from license_server.admin.auth import PUBLIC_ROUTES
from license_server.admin.credentials import CredentialError, Secret, load_credentials
from license_server.admin.keys import Assets
from license_server.admin.sessions import COOKIE
from license_server.config import AdminConfig, AdminListenConfig, ConfigError, load_config
from license_server.keys import SERVICES
from tests.admin_support import ADMIN_TOKEN, Admin, csrf_of
from tests.conftest import Clock, Daemon

_SAMPLE = {"product_id": "3349", "key": "K", "machine_code": "m"}


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
    async def test_every_other_route_answers_401(self, admin: Admin, headers: dict[str, str]) -> None:
        """Each route but the public ones answers 401 without a valid credential, whatever is sent."""
        routes = [(n, m, p) for n, m, p in admin_routes(admin) if n not in PUBLIC_ROUTES]
        assert len(routes) >= 18
        async with aiohttp.ClientSession(admin.base) as session:
            for name, method, path in routes:
                async with session.request(method, path, headers=headers, params=_SAMPLE, data=_SAMPLE) as r:
                    assert r.status == 401, (name, method, path, r.status)
                    body = await r.text()
                    assert "Log in" in body or "Bearer" in body
            for path in ("/nothing-here", "/api/v2/whatever"):
                async with session.get(path, headers=headers) as r:
                    assert r.status == 401, path
        assert upstream_untouched(admin)

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


def upstream_untouched(admin: Admin) -> bool:
    """Whether the console never sent anything upstream."""
    upstream = admin.services.upstream
    return upstream is not None and upstream.calls_sent == 0


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

    async def test_post_without_or_with_a_wrong_csrf_token_is_refused(self, admin: Admin) -> None:
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
        assert upstream_untouched(admin)

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
        (creds / "admin-token").write_text("from-systemd\n")
        (creds / "upstream-token").write_text("upstream-from-systemd\n")
        settings = AdminConfig(listen=AdminListenConfig(port=0))
        env = {"CREDENTIALS_DIRECTORY": str(creds)}
        server = await start_admin(daemon.app[SERVICES], settings, shutdown_timeout=1, env=env)
        assert server is not None
        try:
            host, port = server.bound[0]
            assert host == "127.0.0.1"
            async with aiohttp.ClientSession() as session:
                headers = {"Authorization": "Bearer from-systemd"}
                async with session.get(f"http://{host}:{port}/api/v1/status", headers=headers) as r:
                    assert r.status == 200
                    assert (await r.json())["console"]["can_act"] is True
        finally:
            await server.stop()
        token_file = tmp_path / "admin.token"
        token_file.write_text("from-file")
        found = await asyncio.to_thread(load_credentials, AdminConfig(token_file=token_file), env)
        assert found.admin is not None
        assert found.admin.matches("from-file")
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
