"""The one egress: TLS verified against the system store or a configured CA, an explicit proxy, no other."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import Daemon, Upstream, send_form
from tests.pki import Pki
from tests.test_proxy import activate_form

ServerFactory = Callable[..., Awaitable[TestServer]]
DaemonFactory = Callable[..., Awaitable[Daemon]]


def make_tls(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1: the server context and the CA file."""
    pki = Pki.create(tmp_path)
    return pki.server_context("server"), pki.ca_file


async def post_form(base: str, form: dict[str, str]) -> tuple[int, dict[str, object]]:
    """POST an SDK-shaped form to a daemon with a client that ignores proxy variables."""
    status, _, body = await send_form(base, "/api/key/activate", form)
    answer: dict[str, object] = json.loads(body)
    return status, answer


class TestTls:
    """Upstream TLS is always verified; a configured CA file is trusted in addition to the system store."""

    @pytest.fixture
    async def tls_upstream(
        self, upstream: Upstream, aiohttp_server: ServerFactory, tmp_path: Path
    ) -> tuple[str, Path]:
        """The fake upstream served over HTTPS with a certificate from a private CA."""
        context, ca_file = await asyncio.to_thread(make_tls, tmp_path)
        server = await aiohttp_server(upstream.fake.make_app(), host="127.0.0.1", ssl=context)
        return f"https://127.0.0.1:{server.port}", ca_file

    async def test_private_ca_trusted_when_configured(
        self, tls_upstream: tuple[str, Path], daemon_factory: DaemonFactory
    ) -> None:
        """With upstream.ca_file the daemon verifies the private certificate and forwards."""
        url, ca_file = tls_upstream
        daemon = await daemon_factory(f"upstream.ca_file={ca_file}", url=url)
        status, answer = await post_form(daemon.base, activate_form())
        assert (status, answer["result"]) == (200, 0)

    async def test_unknown_ca_refused(
        self, tls_upstream: tuple[str, Path], upstream: Upstream, daemon_factory: DaemonFactory
    ) -> None:
        """Without the CA file the certificate is not trusted and nothing is forwarded."""
        url, _ = tls_upstream
        daemon = await daemon_factory(url=url)
        status, answer = await post_form(daemon.base, activate_form())
        assert status == 502
        assert "TLS verification" in str(answer["message"])
        assert upstream.fake.calls == []


class TestProxy:
    """Egress goes through upstream.proxy when set, and never through the environment's proxy variables."""

    async def test_environment_proxy_ignored(
        self, daemon: Daemon, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """HTTP(S)_PROXY pointing at a dead port changes nothing: the daemon connects directly."""
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.setenv(name, "http://127.0.0.1:9")
        status, answer = await post_form(daemon.base, activate_form())
        assert (status, answer["result"]) == (200, 0)
        assert len(upstream.fake.calls) == 1

    async def test_configured_proxy_used(
        self, upstream: Upstream, aiohttp_server: ServerFactory, daemon_factory: DaemonFactory
    ) -> None:
        """With upstream.proxy set, every upstream call goes through that proxy."""
        seen: list[str] = []

        async def relay(request: web.Request) -> web.Response:
            """A minimal forward proxy for plain-http absolute-form requests."""
            seen.append(str(request.url))
            async with (
                aiohttp.ClientSession() as session,
                session.request(
                    request.method,
                    request.url,
                    data=await request.read(),
                    headers={"Content-Type": request.content_type},
                ) as answer,
            ):
                return web.Response(
                    status=answer.status, body=await answer.read(), content_type="application/json"
                )

        proxy_app = web.Application()
        proxy_app.router.add_route("*", "/{tail:.*}", relay)
        proxy = await aiohttp_server(proxy_app, host="127.0.0.1")
        daemon = await daemon_factory(f"upstream.proxy=http://127.0.0.1:{proxy.port}")
        status, answer = await post_form(daemon.base, activate_form())
        assert (status, answer["result"]) == (200, 0)
        assert seen == [f"{upstream.url}/api/key/activate"]
