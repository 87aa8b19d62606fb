"""The admin console in a real browser: Debian's Chromium, headless, driven by Playwright.

An admin finds every device of a departed employee by name, frees their seats in a few clicks, and hands
an offline device its license file, which the real Cryptolens SDK loads. Also the file of a machine whose
signed answer the daemon keeps, and the audit log that recorded it all.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from licensing.models import LicenseKey

from license_server.admin.sessions import COOKIE
from tests.admin_support import ADMIN_TOKEN, Admin
from tests.conftest import LICENSE, OTHER_LICENSE, PRODUCT, Clock, Upstream, Workstation

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
FLOATING = "FLOAT-FLOAT-FLOAT-FLOAT"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DAY = 86400


@pytest.fixture
async def browser_page(tmp_path: Path) -> AsyncIterator[Any]:
    """A page in headless Chromium from Debian's package; the test is skipped only if it is not installed."""
    if not await asyncio.to_thread(CHROMIUM.exists):
        pytest.skip("/usr/bin/chromium is missing: apt-get install -y chromium (CI installs it)")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = await browser.new_context(accept_downloads=True, viewport={"width": 1366, "height": 900})
        page = await context.new_page()
        page.set_default_timeout(10_000)
        try:
            yield page
        finally:
            await context.close()
            await browser.close()


async def download(page: Any, click: Callable[[], Any], folder: Path) -> str:
    """Click something that downloads a file; returns the file's text."""
    async with page.expect_download() as waiting:
        await click()
    saved = await waiting.value
    target = folder / saved.suggested_filename
    await saved.save_as(target)
    assert target.suffix == ".skm"
    return await asyncio.to_thread(target.read_text)


def load_license(pubkey: str, text: str) -> Any:
    """The license as the real SDK loads a saved license file (None if it does not verify)."""
    return LicenseKey.load_from_string(pubkey, text)


async def test_departed_employee_and_offline_device(
    admin: Admin,
    browser_page: Any,
    workstation: Callable[..., Workstation],
    upstream: Upstream,
    clock: Clock,
    tmp_path: Path,
) -> None:
    """Log in, find alice's machines, deactivate them, download license files, read the audit log."""
    page = browser_page
    pubkey = upstream.fake.public_key_xml
    for machine, name, key in (
        ("alice-1", "ALICE-LAPTOP", LICENSE),
        ("alice-2", "alice-desktop", OTHER_LICENSE),
    ):
        license_key, message = await workstation(machine).activate(key, friendly_name=name)
        assert license_key is not None, message
    clock.advance(40 * DAY)  # alice left weeks ago; bob still works
    license_key, message = await workstation("bob-1").activate(friendly_name="BOB-PC")
    assert license_key is not None, message
    await admin.settle()

    # Not logged in: the login form, with a 401.
    response = await page.goto(admin.base + "/machines")
    assert response.status == 401
    await page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    await page.get_by_label("Your name").fill("carol")
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_url(admin.base + "/machines")
    cookie = next(c for c in await page.context.cookies() if c["name"] == COOKIE)
    assert cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict"
    await page.screenshot(path=str(tmp_path / "machines-all.png"), full_page=True)

    # Search "alice": both of her machines, across two licenses, both idle; bob is not listed.
    await page.get_by_placeholder("friendly name, machine code, license or address").fill("alice")
    await page.get_by_role("button", name="Search").click()
    rows = page.locator("table.machines tbody tr")
    assert await rows.count() == 2
    assert await page.locator("tr.idle", has_text="ALICE-LAPTOP").count() == 1
    assert await page.locator("tr.idle", has_text="alice-desktop").count() == 1
    assert await page.locator("tr", has_text="BOB-PC").count() == 0
    await page.screenshot(path=str(tmp_path / "machines-alice.png"), full_page=True)

    # Deactivate both, each after a confirmation page that shows upstream's answer afterwards.
    for name, key in (("ALICE-LAPTOP", LICENSE), ("alice-desktop", OTHER_LICENSE)):
        await page.locator("tr", has_text=name).get_by_role("link", name="Deactivate…").click()
        await page.get_by_role("heading", name="Deactivate this machine?").wait_for()
        await page.get_by_role("button", name="Deactivate").click()
        await page.get_by_role("heading", name="Deactivated").wait_for()
        answer = page.locator("table.answer")
        assert "0" in await answer.locator("tr", has_text="result").inner_text()
        await page.screenshot(path=str(tmp_path / f"deactivated-{name}.png"), full_page=True)
        assert upstream.fake.license(PRODUCT, key).activations.keys().isdisjoint({"alice-1", "alice-2"})
        await page.get_by_role("link", name="Back to the machines").click()
    assert await page.locator("tr", has_text="ALICE-LAPTOP").locator(".badge.off").count() == 1

    # An offline lab PC: activate it here and download its license file; the SDK loads it.
    await page.get_by_role("link", name="Activate").click()
    await page.get_by_label("Product id").fill(str(PRODUCT))
    await page.get_by_label("License key").fill(LICENSE)
    await page.get_by_label("Machine code").fill("lab-pc-7")
    await page.get_by_label("Friendly name").fill("LAB-PC-7")
    text = await download(
        page, page.get_by_role("button", name="Activate and download the license file").click, tmp_path
    )
    offline = await asyncio.to_thread(load_license, pubkey, text)
    assert offline is not None, text
    assert offline.key == LICENSE
    assert "lab-pc-7" in [machine.Mid for machine in offline.activated_machines]
    assert "lab-pc-7" in upstream.fake.license(PRODUCT, LICENSE).activations

    # Bob's machine: the daemon keeps its signed answer, so its file comes without asking upstream.
    calls_before = len(upstream.fake.calls)
    await page.get_by_role("link", name="Machines").click()
    await page.get_by_placeholder("friendly name, machine code, license or address").fill("bob")
    await page.get_by_role("button", name="Search").click()
    text = await download(
        page, page.locator("tr", has_text="BOB-PC").get_by_role("link", name="License file").click, tmp_path
    )
    kept = await asyncio.to_thread(load_license, pubkey, text)
    assert kept is not None
    assert "bob-1" in [machine.Mid for machine in kept.activated_machines]
    assert len(upstream.fake.calls) == calls_before

    # Bob's runway: without upstream his kept answer licenses him for keep.max_age (7 days): not highlighted.
    await page.get_by_role("link", name="sort by runway").click()
    bob = page.locator("tr", has_text="BOB-PC")
    assert "(7d 0h; keep.max_age)" in await bob.inner_text()
    assert await bob.locator("td.runway-short").count() == 0
    await page.screenshot(path=str(tmp_path / "machines-by-runway.png"), full_page=True)

    # The audit log: who did what, searchable, with the chain intact.
    await page.get_by_role("link", name="Audit log").click()
    await page.get_by_label("Action").fill("deactivate")
    await page.get_by_role("button", name="Search").click()
    assert await page.locator("p.flash.ok", has_text="intact").count() == 1
    table = page.locator("table.audit tbody")
    assert await table.locator("tr").count() == 2
    assert "carol@127.0.0.1#" in await table.inner_text()
    await page.screenshot(path=str(tmp_path / "audit.png"), full_page=True)

    # A floating license of one seat: one machine holds it, a second is refused for its 600 s interval.
    upstream.fake.add_license(PRODUCT, FLOATING, max_machines=1)
    assert (await workstation("float-1").activate(FLOATING, floating=600))[0] is not None
    assert (await workstation("float-2").activate(FLOATING, floating=600))[0] is None
    await admin.settle()
    clock.advance(300)  # the licenses page's period ends now: five minutes of both wanting a seat
    await page.goto(admin.base + "/licenses")
    header = await page.locator("table thead").inner_text()
    for column in (
        "Peak demand",
        "Unmet demand",
        "Seats for 95 %",
        "Seats for 100 %",
        "Idle machines to free",
    ):
        assert column in header
    cells = page.locator("tr", has_text=FLOATING).locator("td")
    texts = [text.strip() for text in await cells.all_inner_texts()]
    names = [name.strip() for name in await page.locator("table thead th").all_inner_texts()]
    row = dict(zip(names, texts, strict=True))
    assert (row["Seat limit"], row["Peak floating"], row["Peak demand"]) == ("1", "1", "2")
    assert (row["Seats for 95 %"], row["Seats for 100 %"], row["Denials"]) == ("2", "2", "1")
    assert row["Unmet demand (seat-hours)"] == "0.08"  # the refused machine waited 300 s of the period
    assert int(row["Hours over the limit"]) >= 1
    chart = await page.request.get(admin.base + "/licenses/chart.svg?days=30")
    assert "demand, refused machines included" in await chart.text()

    for path in ("/", "/licenses"):
        await page.goto(admin.base + path)
        await page.screenshot(path=str(tmp_path / f"page-{path.strip('/') or 'status'}.png"), full_page=True)
    await page.goto(admin.base + "/")
    assert await page.get_by_role("heading", name="Runway").count() == 1

    records = [r for r in admin_records(admin) if r["action"] in ("deactivate", "activate", "download")]
    assert [(r["action"], r["friendly_name"], r["ok"]) for r in records] == [
        ("deactivate", "ALICE-LAPTOP", True),
        ("deactivate", "alice-desktop", True),
        ("activate", "LAB-PC-7", True),
        ("download", "BOB-PC", True),
    ]
    assert all(r["actor"].startswith("carol@127.0.0.1#") for r in records)


def admin_records(admin: Admin) -> list[dict[str, Any]]:
    """Every admin record in the daemon's audit trail."""
    folder = admin.services.config.audit_dir
    records = [
        json.loads(line)
        for path in sorted(folder.glob("audit-*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    return [record for record in records if record["type"] == "admin"]
