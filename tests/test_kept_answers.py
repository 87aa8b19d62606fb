"""Kept answers after a deactivation, and the count of kept answers that monitoring shows."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from licensing.methods import Helpers

from tests.admin_support import Admin
from tests.conftest import LICENSE, OTHER_LICENSE, PRODUCT, Daemon, Upstream, Workstation

MakeWorkstation = Callable[..., Workstation]
DaemonFactory = Callable[..., Awaitable[Daemon]]


def lists(license_key: Any, machine: str) -> bool:
    """Whether the SDK finds a machine on a license, as applications check it."""
    return bool(Helpers.IsOnRightMachine(license_key, custom_machine_code=machine))


async def kept_counts(daemon: Daemon) -> tuple[object, float]:
    """Kept answers as /status and /metrics (license_server_kept_answers) report them."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{daemon.base}/status") as response:
            status = (await response.json())["kept_answers"]
        async with session.get(f"{daemon.base}/metrics") as response:
            text = await response.text()
    (gauge,) = [line for line in text.splitlines() if line.startswith("license_server_kept_answers ")]
    return status, float(gauge.split()[1])


class TestFreedMachineNotRevived:
    """A deactivation that passed through stops every kept answer listing the machine from being served."""

    async def test_get_key_signed_before_a_deactivation_not_kept(
        self, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """A GetKey signed before alice's deactivation but arriving after it is passed on, not kept."""
        alice = workstation("alice-pc")
        assert (await alice.activate())[0] is not None
        held = upstream.fake.held["key/getkey"] = asyncio.Event()
        pending = asyncio.ensure_future(alice.get_key())
        for _ in range(500):
            if any(call.path == "key/getkey" for call in upstream.fake.calls):
                break
            await asyncio.sleep(0.01)
        assert await alice.deactivate() == (True, "")
        held.set()
        late, message = await pending
        assert lists(late, "alice-pc"), message  # signed while she was still on the license

        upstream.fake.mode = "http500"
        served, message = await alice.get_key()
        assert served is None, "an answer signed before the deactivation was kept"
        assert "keeps no answer" in message

    async def test_kept_get_key_listing_the_machine_dropped(
        self, daemon_factory: DaemonFactory, upstream: Upstream
    ) -> None:
        """After alice deactivates, no outage answer shows her on the license; one signed later is served."""
        daemon = await daemon_factory("upstream.breaker.failures=1000")  # upstream comes back at once
        alice, bob = (
            Workstation(lambda: daemon.api, upstream.fake.public_key_xml, m) for m in ("alice-pc", "bob-pc")
        )
        for ws in (alice, bob):
            assert (await ws.activate())[0] is not None
        assert (await alice.activate(OTHER_LICENSE))[0] is not None
        listed, _ = await bob.get_key()
        assert lists(listed, "alice-pc")
        assert (await bob.get_key(OTHER_LICENSE))[0] is not None
        assert await alice.deactivate() == (True, "")

        upstream.fake.mode = "http500"
        for ws in (alice, bob):
            served, message = await ws.get_key()
            assert served is None, "a kept GetKey answer still lists the freed machine"
            assert "keeps no answer" in message
        await daemon.restart()  # what is on disk was dropped too
        served, _ = await bob.get_key()
        assert served is None, "a kept GetKey answer on disk still lists the freed machine"
        other, message = await bob.get_key(OTHER_LICENSE)  # another license's answers are left alone
        assert other is not None, message
        assert lists(other, "alice-pc")

        upstream.fake.mode = "ok"
        assert (await bob.get_key())[0] is not None  # signed after alice left: kept
        upstream.fake.mode = "http500"
        served, message = await bob.get_key()
        assert served is not None, message
        assert lists(served, "bob-pc")
        assert not lists(served, "alice-pc")

    async def test_console_deactivation_drops_kept_get_key(
        self, admin: Admin, workstation: MakeWorkstation, upstream: Upstream
    ) -> None:
        """A machine freed from the console is not brought back by a kept GetKey answer either."""
        alice = workstation("alice-pc")
        assert (await alice.activate(friendly_name="ALICE-LAPTOP"))[0] is not None
        listed, _ = await alice.get_key()
        assert lists(listed, "alice-pc")
        status, body, _ = await admin.api(
            "POST",
            "/api/v1/machines/deactivate",
            json={"product_id": PRODUCT, "key": LICENSE, "machine_code": "alice-pc"},
        )
        assert status == 200, body
        upstream.fake.mode = "http500"
        served, _ = await alice.get_key()
        assert served is None or not lists(served, "alice-pc"), "the console's deactivation was undone"


class TestKeptCount:
    """/status and /metrics count kept answers exactly, the moment they are kept or dropped."""

    async def test_count_follows_every_change(self, daemon: Daemon, workstation: MakeWorkstation) -> None:
        """Kept, replaced, dropped by a deactivation, and after a restart: the count is right at once."""
        alice, bob = workstation("alice-pc"), workstation("bob-pc")
        assert await kept_counts(daemon) == (0, 0)
        assert (await alice.activate())[0] is not None
        assert await kept_counts(daemon) == (1, 1)
        assert (await alice.activate())[0] is not None  # the same call: its answer is replaced
        assert await kept_counts(daemon) == (1, 1)
        assert (await alice.get_key())[0] is not None
        assert (await bob.activate())[0] is not None
        assert await kept_counts(daemon) == (3, 3)
        assert await alice.deactivate() == (True, "")  # her activation, and the GetKey listing her
        assert await kept_counts(daemon) == (1, 1)
        await daemon.restart()
        assert await kept_counts(daemon) == (1, 1)
