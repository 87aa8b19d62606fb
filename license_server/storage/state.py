"""The state directory: its file names, the lock that keeps one daemon per directory, the fingerprint key.

Also how every folder and file under `state_dir` and `audit.path` is made: readable by the daemon's user
only (folders 0700, files 0600), whatever the umask the daemon was started with.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# The files of a state directory. An upgrade must find them where an earlier version left them: never rename
# one without moving the old file (tests/test_upgrade.py reads a folder written by version 0.1).
ANSWERS_FILE = "answers.sqlite3"  # kept answers (storage.answers)
SEATS_FILE = "seats.sqlite3"  # the seat ledger (storage.seats)
SPOOL_FILE = "spool.sqlite3"  # writes for the shared database that wait for it (storage.spool)
FINGERPRINT_FILE = "fingerprint.key"  # the key of token fingerprints
LOCK_FILE = ".lock"  # held by the daemon that uses the directory
_KEY_BYTES = 32
PRIVATE_FOLDER = 0o700
PRIVATE_FILE = 0o600


@dataclass(frozen=True, slots=True)
class StateFolder:
    """A state directory and the path of each file the daemon keeps in it."""

    path: Path

    @property
    def answers(self) -> Path:
        """The kept answers' database."""
        return self.path / ANSWERS_FILE

    @property
    def seats(self) -> Path:
        """The seat ledger's database."""
        return self.path / SEATS_FILE

    @property
    def spool(self) -> Path:
        """The writes waiting for the shared database (several nodes only)."""
        return self.path / SPOOL_FILE

    @property
    def fingerprint_key(self) -> Path:
        """The per-installation key of token fingerprints."""
        return self.path / FINGERPRINT_FILE

    @property
    def lock(self) -> Path:
        """The file a running daemon holds locked."""
        return self.path / LOCK_FILE


def private_folder(folder: Path) -> None:
    """Create a folder (and missing parents) only the daemon's user can enter; leave an existing one as is."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=PRIVATE_FOLDER)
    except FileExistsError:
        if not folder.is_dir():
            raise
        return
    folder.chmod(PRIVATE_FOLDER)  # exactly 0700: a umask may have taken bits the daemon needs


def open_private(path: Path, flags: int) -> int:
    """Open a file, creating it readable and writable by the daemon's user only (0600) if it is missing."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        return os.open(path, flags)
    try:
        os.fchmod(fd, PRIVATE_FILE)
    except OSError:
        os.close(fd)
        raise
    return fd


def create_private(path: Path) -> None:
    """Make sure a file exists, created 0600 if it did not (SQLite then gives its -wal and -shm its mode)."""
    os.close(open_private(path, os.O_RDONLY))


def warn_if_open(folder: Path) -> None:
    """Log a warning naming a folder of the daemon's state that other users may enter or read."""
    try:
        mode = stat.S_IMODE(folder.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning(
            "state_folder_open_to_others",
            folder=str(folder),
            mode=f"{mode:04o}",
            detail=f"other users may read kept answers, seat ledger or audit trail: chmod 0700 {folder}",
        )


class StateInUseError(RuntimeError):
    """Another daemon already holds this state directory."""


class StateLock:
    """An exclusive lock on a directory, held for the life of the daemon; the kernel frees it on any exit."""

    def __init__(self, folder: Path) -> None:
        private_folder(folder)
        self._fd = open_private(StateFolder(folder).lock, os.O_RDWR)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise StateInUseError(
                f"another license-server is already using {folder}; two daemons cannot share a folder"
            ) from None

    def release(self) -> None:
        """Give the lock back."""
        os.close(self._fd)


def load_fingerprint_key(state_dir: Path) -> bytes:
    """The per-installation key for token fingerprints, created on first start (write-temp-fsync-rename)."""
    path = StateFolder(state_dir).fingerprint_key
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = b""
    if len(key) == _KEY_BYTES:
        return key
    if key:
        log.error("fingerprint_key_corrupt_replaced", path=str(path))
    key = secrets.token_bytes(_KEY_BYTES)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)  # a leftover from a crash may have another mode
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    return key
