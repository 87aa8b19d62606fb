"""Offline .skm license files an admin drops in a folder: verified, indexed and served as answers."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from license_server.licensing.signatures import (
    AnswerFormatError,
    KeyRing,
    SignedLicense,
    parse_signed_answer,
    verify_signed,
)

__all__ = ["MAX_FILE_BYTES", "FileProblem", "LicenseFile", "LicenseFiles"]

MAX_FILE_BYTES = 1024 * 1024
_SUFFIX = ".skm"
_DECIMAL = re.compile(r"[0-9]+")


@dataclass(frozen=True, slots=True)
class LicenseFile:
    """A verified offline license file and the answer body the daemon serves for it."""

    path: Path
    signed: SignedLicense
    body: bytes


@dataclass(frozen=True, slots=True)
class FileProblem:
    """A license file (or the folder) that was skipped, and why, in words for the admin."""

    path: Path
    reason: str


class _SkipFileError(Exception):
    """Internal: the file being loaded is not usable, for the stated reason."""


def answer_body(signed: SignedLicense) -> bytes:
    """A successful signed answer around the exact signed strings, as every SDK expects it."""
    # The file may be PascalCase and lack "result"; the Python SDK treats a missing result as an error.
    answer = {
        "licenseKey": signed.license_key_b64,
        "signature": signed.signature_b64,
        "result": 0,
        "message": "",
    }
    return json.dumps(answer, separators=(",", ":")).encode("ascii")


def _product_id(value: str | int) -> int | None:
    """A request's product id as an integer, or None if it is not a plain decimal number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = value.strip()
    # int() alone would also take "3_941", "+3941" and non-ASCII digits.
    return int(text) if _DECIMAL.fullmatch(text) else None


def _normal_key(key: str) -> str:
    """A license key in the form used for comparison: case-insensitive, surrounding whitespace ignored."""
    return key.strip().upper()


class LicenseFiles:
    """The verified offline license files, indexed by product and key."""

    __slots__ = ("_by_license", "_files")

    def __init__(self, files: Iterable[LicenseFile] = ()) -> None:
        self._files: tuple[LicenseFile, ...] = tuple(files)
        index: dict[tuple[int, str], list[LicenseFile]] = {}
        for file in self._files:
            if file.signed.product_id is not None:
                index.setdefault((file.signed.product_id, _normal_key(file.signed.key)), []).append(file)
        for candidates in index.values():
            candidates.sort(key=lambda f: (f.signed.sign_date or 0, f.path.name), reverse=True)
        self._by_license: dict[tuple[int, str], tuple[LicenseFile, ...]] = {
            lic: tuple(candidates) for lic, candidates in index.items()
        }

    def __len__(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[LicenseFile]:
        return iter(self._files)

    @classmethod
    def load(cls, folder: Path | None, keyring: KeyRing) -> tuple[LicenseFiles, list[FileProblem]]:
        """Read, check and index the *.skm files directly in `folder`; bad files become problems."""
        if folder is None:
            return cls(), []
        problems: list[FileProblem] = []
        try:
            root = folder.resolve(strict=True)
            entries = sorted(folder.iterdir(), key=lambda p: p.name) if root.is_dir() else None
        except FileNotFoundError:
            return cls(), [FileProblem(folder, "the license file folder does not exist")]
        except OSError as exc:
            return cls(), [FileProblem(folder, f"the license file folder cannot be read: {_describe(exc)}")]
        if entries is None:
            return cls(), [FileProblem(folder, "the license file folder is not a directory")]

        files: list[LicenseFile] = []
        for entry in entries:
            if not entry.name.lower().endswith(_SUFFIX):
                continue
            try:
                files.append(_load_file(root, entry, keyring))
            except _SkipFileError as skip:
                problems.append(FileProblem(entry, str(skip)))
        return cls(files), problems

    def for_activate(self, product_id: str | int, key: str, machine_code: str) -> LicenseFile | None:
        """The newest file for that product and key that lists the machine, if any."""
        candidates = self._candidates(product_id, key)
        return next((f for f in candidates if f.signed.matches_machine(machine_code)), None)

    def for_getkey(self, product_id: str | int, key: str) -> LicenseFile | None:
        """The newest file for that product and key, if any."""
        return next(iter(self._candidates(product_id, key)), None)

    def _candidates(self, product_id: str | int, key: str) -> tuple[LicenseFile, ...]:
        """The files for that product and key, newest signature first."""
        pid = _product_id(product_id)
        if pid is None:
            return ()
        return self._by_license.get((pid, _normal_key(key)), ())


def _load_file(root: Path, entry: Path, keyring: KeyRing) -> LicenseFile:
    """Read, parse and verify one license file, raising _SkipFileError with the reason it is unusable."""
    raw = _read_bounded(root, entry)
    try:
        answer: Any = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise _SkipFileError("not a license file: the content is not UTF-8 text") from exc
    except (ValueError, RecursionError) as exc:
        raise _SkipFileError(f"not a license file: the content is not JSON ({exc})") from exc
    if not isinstance(answer, dict):
        raise _SkipFileError(f"not a license file: the JSON is {type(answer).__name__}, not an object")
    try:
        signed = parse_signed_answer(answer)
    except AnswerFormatError as exc:
        raise _SkipFileError(f"the signed license cannot be decoded: {exc}") from exc
    if signed is None:
        raise _SkipFileError(_unsigned_reason(answer))
    if len(keyring) == 0:
        raise _SkipFileError("no vendor public key is configured, so the signature cannot be checked")
    if not verify_signed(keyring, signed):
        raise _SkipFileError("signature does not verify with any configured vendor key")
    if signed.product_id is None:
        raise _SkipFileError("the signed license has no ProductId")
    if not signed.key.strip():
        raise _SkipFileError("the signed license has no Key")
    return LicenseFile(path=entry, signed=signed, body=answer_body(signed))


def _unsigned_reason(answer: Mapping[str, Any]) -> str:
    """Why an answer without a usable licenseKey/signature pair cannot be served."""
    if isinstance(_field(answer, "licenseKey"), Mapping):
        return (
            "legacy SignMethod=0 license file (licenseKey is a JSON object), which cannot be verified; "
            "export it again with SignMethod=1"
        )
    message = _field(answer, "message")
    if isinstance(message, str) and message:
        return f"not a signed license: the file holds an error answer ({message[:200]!r})"
    return "not a signed license: no licenseKey and signature"


def _field(answer: Mapping[str, Any], name: str) -> Any:
    """A top-level field of the answer, its name compared case-insensitively."""
    return next((v for k, v in answer.items() if isinstance(k, str) and k.lower() == name.lower()), None)


def _read_bounded(root: Path, entry: Path) -> bytes:
    """The file's bytes, refusing symlinks that leave the folder, non-regular files and files over 1 MiB."""
    try:
        target = entry.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on older Pythons
        raise _SkipFileError(f"cannot be opened: {_describe(exc)}") from exc
    if not target.is_relative_to(root):
        raise _SkipFileError("is a symlink that points outside the license file folder; skipped")
    # O_NONBLOCK so that a FIFO named *.skm cannot hang the daemon; O_NOFOLLOW as `target` has no links left.
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags)
    except OSError as exc:
        raise _SkipFileError(f"cannot be opened: {_describe(exc)}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _SkipFileError("is not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise _SkipFileError(
                f"is {info.st_size} bytes, larger than the {MAX_FILE_BYTES} byte limit; skipped"
            )
        chunks: list[bytes] = []
        size = 0
        # Read one byte past the limit so that a file that grew since fstat is still caught.
        while size <= MAX_FILE_BYTES and (chunk := os.read(fd, MAX_FILE_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise _SkipFileError(f"cannot be read: {_describe(exc)}") from exc
    finally:
        os.close(fd)
    if size > MAX_FILE_BYTES:
        raise _SkipFileError(f"is larger than the {MAX_FILE_BYTES} byte limit; skipped")
    return b"".join(chunks)


def _describe(exc: BaseException) -> str:
    """A short text for an OS error, without the path (the problem already names the file)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
