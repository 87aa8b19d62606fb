"""Shared fixtures: a signing fake upstream on a real socket, the daemon in front of it, SDK workstations."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from blockbuster import BlockBuster, blockbuster_ctx
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, settings
from licensing.internal import HelperMethods
from licensing.methods import Key
from multidict import CIMultiDict

from license_server.admin.app import create_admin_app
from license_server.admin.credentials import Secret
from license_server.admin.keys import Assets
from license_server.config import AdminConfig, Config, load_config
from license_server.web.app import SERVICES, create_app
from tests.admin_support import ADMIN_TOKEN, UPSTREAM_TOKEN, Admin
from tests.fake_upstream import FakeCryptolens, generate_key
from tests.pgcluster import Cluster

TOKEN = "good-token"
PRODUCT = 3349
LICENSE = "MUYVD-LSEBY-CXHRQ-XFAGY"
OTHER_LICENSE = "KQXJA-WBTFA-PMOZE-RNFRS"

ServerFactory = Callable[..., Awaitable[TestServer]]

# CI runs the same examples every time and neither reads nor writes `.hypothesis/`, so a CI run's outcome
# depends on the code alone, whichever Hypothesis version is installed (recent ones detect CI themselves).
# Locally the default profile keeps its database, so a failure found once is tried first until it is fixed.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default"))


CHILDREN: list[subprocess.Popen[bytes]] = []
"""Daemon processes tests started: those a failed test left running are killed before the next test."""


@pytest.fixture(autouse=True)
def reap_children() -> Iterator[None]:
    """Kill and wait for the daemon processes a test left behind, so none outlives it or warns later."""
    yield
    while CHILDREN:
        child = CHILDREN.pop()
        if child.poll() is None:
            child.kill()
        child.wait(15)


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fail any test in which the daemon blocks the event loop (file, socket or SQLite I/O, sleeps)."""
    with blockbuster_ctx("license_server") as detector:
        yield detector


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One throw-away PostgreSQL server for the whole run, started on first use."""
    cluster = Cluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> str:
    """The URL of a fresh, empty database of the test cluster."""
    return pg_cluster.new_database()


@pytest.fixture(scope="session")
def vendor_key() -> rsa.RSAPrivateKey:
    """One vendor signing key for the whole run: generating RSA keys is slow."""
    return generate_key()


class Clock:
    """A wall clock and a lease clock the tests move by hand, together or (a wall-clock jump) apart."""

    def __init__(self) -> None:
        self.wall = time.time()
        self.boot = 1000.0
        self.boot_id = "test-boot"

    def __call__(self) -> float:
        return self.wall

    def now(self) -> float:
        """The lease clock (CLOCK_BOOTTIME in production)."""
        return self.boot

    def advance(self, seconds: float) -> None:
        """Let time pass."""
        self.wall += seconds
        self.boot += seconds

    def jump_wall(self, seconds: float) -> None:
        """Set the wall clock forward or back without time passing."""
        self.wall += seconds


@pytest.fixture
def clock() -> Clock:
    """A controllable wall clock shared by the fake upstream and the daemon."""
    return Clock()


class Upstream:
    """The fake Cryptolens service on a real loopback socket, which tests can stop and start again."""

    def __init__(self, fake: FakeCryptolens, server_factory: ServerFactory) -> None:
        self.fake = fake
        self._factory = server_factory
        self.server: TestServer | None = None
        self.port = 0

    async def start(self) -> None:
        """Start listening (on the same port as before, if it was started before)."""
        self.server = await self._factory(self.fake.make_app(), host="127.0.0.1", port=self.port or None)
        self.port = self.server.port or 0

    async def stop(self) -> None:
        """Stop listening: connections are refused from now on."""
        if self.server is not None:
            await self.server.close()
            self.server = None

    @property
    def url(self) -> str:
        """Origin URL to configure as upstream.url."""
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def upstream(vendor_key: rsa.RSAPrivateKey, aiohttp_server: ServerFactory, clock: Clock) -> Upstream:
    """A running fake upstream with two licenses of product PRODUCT."""
    fake = FakeCryptolens(vendor_key, clock=clock)
    fake.add_license(PRODUCT, LICENSE, max_machines=3)
    fake.add_license(PRODUCT, OTHER_LICENSE, max_machines=1)
    up = Upstream(fake, aiohttp_server)
    await up.start()
    return up


class Daemon:
    """The daemon under test, served on loopback; restartable over the same state directory."""

    def __init__(self, config: Config, server_factory: ServerFactory, clock: Clock) -> None:
        self.config = config
        self._factory = server_factory
        self._clock = clock
        self.server: TestServer | None = None

    async def start(self, **changes: Any) -> Daemon:
        """Start (or restart) with optional config section replacements, e.g. upstream=..."""
        if changes:
            self.config = dataclasses.replace(self.config, **changes)
        app = create_app(self.config, clock=self._clock, lease_clock=self._clock)
        self.server = await self._factory(app, host="127.0.0.1")
        return self

    async def stop(self) -> None:
        """Stop the daemon as a shutdown would: cleanup contexts flush state."""
        if self.server is not None:
            await self.server.close()
            self.server = None

    async def restart(self, **changes: Any) -> Daemon:
        """Stop and start again over the same state directory."""
        await self.stop()
        return await self.start(**changes)

    @property
    def app(self) -> web.Application:
        """The running application."""
        assert self.server is not None
        return self.server.app  # type: ignore[return-value]

    @property
    def base(self) -> str:
        """Base URL workstations use."""
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def api(self) -> str:
        """The Python SDK's server_address for this daemon."""
        return f"{self.base}/api/"

    async def flush(self) -> None:
        """Wait until kept answers are on disk."""
        await self.app[SERVICES].store.flush()


def make_config(tmp_path: Path, upstream_url: str, public_key: str, *extra: str) -> Config:
    """A daemon configuration for tests, built through the real loader."""
    return load_config(
        None,
        env={},
        overrides=[
            "listen.port=0",
            f"upstream.url={upstream_url}",
            f"state_dir={tmp_path / 'state'}",
            "upstream.timeout=1s",
            "upstream.connect_timeout=0.5s",
            "upstream.breaker.reset_after=0.2s",
            "shutdown_timeout=2s",
            f"public_key={public_key}",
            *extra,
        ],
    )


@pytest.fixture
def daemon_factory(
    tmp_path: Path, upstream: Upstream, aiohttp_server: ServerFactory, clock: Clock
) -> Callable[..., Awaitable[Daemon]]:
    """Start a daemon in front of the fake upstream (or another `url`) with extra `--set` style overrides."""

    async def start(*extra: str, url: str | None = None) -> Daemon:
        config = await asyncio.to_thread(
            make_config, tmp_path, url or upstream.url, upstream.fake.public_key_xml, *extra
        )
        return await Daemon(config, aiohttp_server, clock).start()

    return start


@pytest.fixture
async def daemon(daemon_factory: Callable[..., Awaitable[Daemon]]) -> Daemon:
    """A daemon with default settings in front of the fake upstream."""
    return await daemon_factory()


async def send_form(
    base: str, path: str, data: bytes | str | dict[str, str], headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    """POST a form (an SDK-shaped one by default) to a daemon; status, headers and body."""
    body = urlencode(data) if isinstance(data, dict) else data
    headers = headers or {"Content-Type": "application/x-www-form-urlencoded"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(base + path, data=body, headers=headers, allow_redirects=False) as response,
    ):
        return response.status, CIMultiDict(response.headers), await response.read()


class Workstation:
    """A workstation application using the real Cryptolens Python SDK against the daemon."""

    def __init__(self, api: Callable[[], str], pubkey: str, machine: str, token: str = TOKEN) -> None:
        self._api = api
        self.pubkey = pubkey
        self.machine = machine
        self.token = token

    async def _sdk(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        api = self._api()

        def run() -> Any:
            HelperMethods.server_address = api  # process-wide in the SDK; tests run one at a time
            return fn(*args, **kwargs)

        return await asyncio.to_thread(run)

    async def activate(
        self, key: str = LICENSE, *, product: int = PRODUCT, floating: int = 0, **kwargs: Any
    ) -> tuple[Any, ...]:
        """Key.activate as an application calls it; returns the SDK's (license, message[, metadata])."""
        result: tuple[Any, ...] = await self._sdk(
            Key.activate,
            self.token,
            self.pubkey,
            product,
            key,
            self.machine,
            floating_time_interval=floating,
            **kwargs,
        )
        return result

    async def get_key(self, key: str = LICENSE, *, product: int = PRODUCT) -> tuple[Any, ...]:
        """Key.get_key as an application calls it."""
        result: tuple[Any, ...] = await self._sdk(Key.get_key, self.token, self.pubkey, product, key)
        return result

    async def deactivate(self, key: str = LICENSE, *, product: int = PRODUCT, floating: bool = False) -> Any:
        """Key.deactivate as an application calls it; returns (success, message)."""
        return await self._sdk(Key.deactivate, self.token, product, key, self.machine, floating)


@pytest.fixture
def workstation(daemon: Daemon, upstream: Upstream) -> Callable[..., Workstation]:
    """Make SDK workstations pointed at the daemon."""

    def make(machine: str = "machine-a", token: str = TOKEN) -> Workstation:
        return Workstation(lambda: daemon.api, upstream.fake.public_key_xml, machine, token)

    return make


@pytest.fixture
def admin_factory(
    daemon: Daemon, upstream: Upstream, aiohttp_server: ServerFactory, clock: Clock
) -> Callable[..., Awaitable[Admin]]:
    """Serve the admin console over the test daemon; the fake upstream accepts the console's token."""

    async def start(
        *, upstream_token: str | None = UPSTREAM_TOKEN, settings: AdminConfig | None = None
    ) -> Admin:
        if upstream_token is not None:
            upstream.fake.tokens.add(upstream_token)
        assets = await asyncio.to_thread(Assets.load)
        app = create_admin_app(
            daemon.app[SERVICES],
            settings or AdminConfig(),
            Secret(ADMIN_TOKEN),
            None if upstream_token is None else Secret(upstream_token),
            assets,
            clock=clock,
        )
        return Admin(await aiohttp_server(app, host="127.0.0.1"))

    return start


@pytest.fixture
async def admin(admin_factory: Callable[..., Awaitable[Admin]]) -> Admin:
    """The admin console with default settings over the test daemon."""
    return await admin_factory()
