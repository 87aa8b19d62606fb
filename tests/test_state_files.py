"""The daemon's state on disk is its user's alone: folders 0700, files 0600, whatever the umask."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from license_server.audit import chain
from license_server.storage.state import StateFolder
from tests.conftest import Daemon
from tests.test_proxy import activate_form, post

DaemonFactory = Callable[..., Awaitable[Daemon]]


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test (and the daemon in this process) under the umask given as the test's parameter."""
    value: int = request.param
    previous = os.umask(value)
    try:
        yield value
    finally:
        os.umask(previous)


def modes(*folders: Path) -> dict[str, str]:
    """The permission bits of every folder and file under `folders` (themselves included), as octal text."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            found[str(path)] = f"{stat.S_IMODE(path.lstat().st_mode):04o}"
    return found


def loose(*folders: Path) -> dict[str, str]:
    """Folders other than 0700 and files other than 0600 under `folders`: what other users might read."""
    found = modes(*folders)
    return {path: mode for path, mode in found.items() if mode != ("0700" if Path(path).is_dir() else "0600")}


class TestPrivateState:
    """Every folder and file the daemon makes under state_dir and audit.path is private to its user."""

    @pytest.mark.parametrize("umask", [0o022, 0o002, 0o000], indirect=True, ids=oct)
    async def test_state_and_trail_private(self, umask: int, daemon_factory: DaemonFactory) -> None:
        """Databases with their -wal and -shm, key, lock, trail and head marker: 0600 in 0700 folders."""
        daemon = await daemon_factory()
        status, _, _ = await post(daemon, "/api/key/activate", activate_form())
        assert status == 200
        await daemon.flush()
        state = daemon.config.state_dir
        names = {path.name for path in state.iterdir()}
        assert {"answers.sqlite3-wal", "seats.sqlite3-shm", "fingerprint.key"} <= names
        assert (state / "audit" / chain.HEAD_FILE).exists()
        assert await asyncio.to_thread(loose, state) == {}
        await daemon.stop()
        assert await asyncio.to_thread(loose, state) == {}

    @pytest.mark.parametrize("umask", [0o022], indirect=True, ids=oct)
    async def test_trail_outside_state_dir_private(
        self, umask: int, daemon_factory: DaemonFactory, tmp_path: Path
    ) -> None:
        """An audit.path outside state_dir is made the same way; its missing parents are only containers."""
        trail = tmp_path / "logs" / "license-server" / "audit"
        daemon = await daemon_factory(f"audit.path={trail}")
        assert (await post(daemon, "/api/key/activate", activate_form()))[0] == 200
        await daemon.stop()
        assert await asyncio.to_thread(chain.list_files, trail)
        assert await asyncio.to_thread(loose, trail, daemon.config.state_dir) == {}

    @pytest.mark.parametrize("umask", [0o022], indirect=True, ids=oct)
    async def test_replacements_private(
        self, umask: int, daemon_factory: DaemonFactory, tmp_path: Path
    ) -> None:
        """A database started afresh after corruption, and temp files a crash left open to all, end 0600."""
        state = tmp_path / "state"
        (state / "audit").mkdir(parents=True, mode=0o700)
        state.chmod(0o700)
        (state / "audit").chmod(0o700)
        (state / "answers.sqlite3").write_bytes(b"not a database, " * 512)
        for leftover in (state / "fingerprint.tmp", state / "audit" / f".{chain.HEAD_FILE}.tmp"):
            leftover.write_bytes(b"left by a crash")
            leftover.chmod(0o666)
        daemon = await daemon_factory()
        assert (await post(daemon, "/api/key/activate", activate_form()))[0] == 200
        await daemon.stop()
        assert any(path.name.startswith("answers.sqlite3.corrupt-") for path in state.iterdir())
        found = await asyncio.to_thread(modes, state)
        for name in ("answers.sqlite3", "fingerprint.key", f"audit/{chain.HEAD_FILE}"):
            assert found[str(state / name)] == "0600", name


class TestFileNames:
    """A state directory holds the files StateFolder names, under the names earlier versions gave them."""

    async def test_daemon_writes_the_named_files(self, daemon_factory: DaemonFactory) -> None:
        """After a clean stop: the two databases, the fingerprint key, the lock, and the audit folder."""
        daemon = await daemon_factory()
        assert (await post(daemon, "/api/key/activate", activate_form()))[0] == 200
        await daemon.stop()
        folder = StateFolder(daemon.config.state_dir)
        named = [folder.answers, folder.seats, folder.fingerprint_key, folder.lock]
        assert [path.name for path in named] == [
            "answers.sqlite3",
            "seats.sqlite3",
            "fingerprint.key",
            ".lock",
        ]
        found = await asyncio.to_thread(lambda: set(folder.path.iterdir()))
        assert found == {*named, daemon.config.audit_dir}


class TestOpenStateWarned:
    """An existing state or audit folder that others may enter is named in a warning at start, not refused."""

    @pytest.mark.parametrize("umask", [0o022], indirect=True, ids=oct)
    async def test_open_folders_warned(
        self, umask: int, daemon_factory: DaemonFactory, tmp_path: Path
    ) -> None:
        """A 0755 state folder and a 0750 audit folder elsewhere: a warning each naming its mode, kept."""
        state, trail = tmp_path / "state", tmp_path / "trail"
        state.mkdir(mode=0o755)
        trail.mkdir(mode=0o750)
        state.chmod(0o755)
        trail.chmod(0o750)
        with capture_logs() as logs:
            daemon = await daemon_factory(f"audit.path={trail}")
        warnings = [entry for entry in logs if entry["event"] == "state_folder_open_to_others"]
        assert [(w["folder"], w["mode"], w["log_level"]) for w in warnings] == [
            (str(state), "0755", "warning"),
            (str(trail), "0750", "warning"),
        ]
        assert (await post(daemon, "/api/key/activate", activate_form()))[0] == 200
        assert stat.S_IMODE(state.stat().st_mode) == 0o755
        assert stat.S_IMODE(trail.stat().st_mode) == 0o750

    @pytest.mark.parametrize("umask", [0o022], indirect=True, ids=oct)
    async def test_private_folders_not_warned(
        self, umask: int, daemon_factory: DaemonFactory, tmp_path: Path
    ) -> None:
        """A 0700 state folder (as systemd's StateDirectoryMode and the image make it) gives no warning."""
        (tmp_path / "state").mkdir(mode=0o700)
        with capture_logs() as logs:
            await daemon_factory()
        assert [entry for entry in logs if entry["event"] == "state_folder_open_to_others"] == []
