"""Offline license files answer for their license and machines when upstream cannot."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from licensing.methods import Helpers

from license_server.web.app import SERVICES
from tests.conftest import LICENSE, PRODUCT, Daemon, Upstream, Workstation
from tests.fake_upstream import Activation

DATA = Path(__file__).parent / "data"
VECTOR_KEY = (DATA / "cryptolens-example-2019.pubkey.xml").read_text()
VECTOR_PRODUCT, VECTOR_LICENSE = 3941, "ETXYI-GFILQ-UXAXK-GGKSU"

DaemonFactory = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def files_daemon(tmp_path: Path, upstream: Upstream, daemon_factory: DaemonFactory) -> Daemon:
    """A daemon whose license_files folder holds the real 2019 vector, a PascalCase file and a forged one."""
    folder = tmp_path / "licenses"
    lab = upstream.fake.add_license(PRODUCT, "LABXX-LABXX-LABXX-LABXX", max_machines=2)
    lab.activations["lab-7"] = Activation(
        mid="lab-7", ip="10.0.0.7", time=upstream.fake.now(), friendly_name="LAB-7"
    )
    pascal = upstream.fake.license_file(lab, pascal_case=True)
    saved = json.loads(pascal)
    saved["Signature"] = (
        saved["Signature"][:40] + ("B" if saved["Signature"][40] == "A" else "A") + saved["Signature"][41:]
    )
    forged = json.dumps(saved)

    def write() -> Path:
        folder.mkdir()
        (folder / "vector.skm").write_bytes((DATA / "cryptolens-example-2019.skm").read_bytes())
        (folder / "lab.SKM").write_text(pascal)
        (folder / "forged.skm").write_text(forged)
        (folder / "notes.txt").write_text("not a license file")
        keys = tmp_path / "vector.xml"
        keys.write_text(VECTOR_KEY)
        return keys

    vector_key_file = await asyncio.to_thread(write)
    return await daemon_factory(f"license_files={folder}", f"public_keys=[{vector_key_file}]")


class TestLicenseFiles:
    """Files verified at start stand in for upstream, for the machines they list."""

    async def test_vector_file_serves_sdk(self, files_daemon: Daemon, upstream: Upstream) -> None:
        """The real Cryptolens-signed file answers Activate for its machine while upstream is down."""
        await upstream.stop()
        ws = Workstation(lambda: files_daemon.api, VECTOR_KEY, "test")
        license_key, message = await ws.activate(VECTOR_LICENSE, product=VECTOR_PRODUCT)
        assert license_key is not None, message
        assert license_key.key == VECTOR_LICENSE
        assert Helpers.IsOnRightMachine(license_key, custom_machine_code="test")
        other, message = await Workstation(lambda: files_daemon.api, VECTOR_KEY, "other").activate(
            VECTOR_LICENSE, product=VECTOR_PRODUCT
        )
        assert other is None
        assert "keeps no answer or license file" in message

    async def test_pascal_case_file_and_getkey(self, files_daemon: Daemon, upstream: Upstream) -> None:
        """A PascalCase file (as .NET writes it) answers Activate and GetKey through the Python SDK."""
        upstream.fake.mode = "http500"
        ws = Workstation(lambda: files_daemon.api, upstream.fake.public_key_xml, "lab-7")
        license_key, message = await ws.activate("LABXX-LABXX-LABXX-LABXX")
        assert license_key is not None, message
        license_key, message = await ws.get_key("LABXX-LABXX-LABXX-LABXX")
        assert license_key is not None, message

    async def test_upstream_first_when_up(self, files_daemon: Daemon, upstream: Upstream) -> None:
        """While upstream answers, it decides: a file never overrides its refusal."""
        upstream.fake.block(PRODUCT, "LABXX-LABXX-LABXX-LABXX")
        ws = Workstation(lambda: files_daemon.api, upstream.fake.public_key_xml, "lab-7")
        assert await ws.activate("LABXX-LABXX-LABXX-LABXX") == (
            None,
            "The key is blocked and cannot be accessed.",
        )

    async def test_bad_files_skipped(self, files_daemon: Daemon) -> None:
        """The forged file is skipped; the good ones are loaded."""
        files = files_daemon.app[SERVICES].licensing.files
        assert sorted(f.path.name for f in files) == ["lab.SKM", "vector.skm"]
        assert files.for_activate(PRODUCT, LICENSE, "lab-7") is None
