"""The state directory's own files: the lock that keeps one daemon per directory, and the fingerprint key."""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_LOCK_FILE = ".lock"
_FINGERPRINT_FILE = "fingerprint.key"
_KEY_BYTES = 32


class StateInUseError(RuntimeError):
    """Another daemon already holds this state directory."""


class StateLock:
    """An exclusive lock on a directory, held for the life of the daemon; the kernel frees it on any exit."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(folder / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
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
    path = state_dir / _FINGERPRINT_FILE
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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    return key
