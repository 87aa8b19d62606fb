"""The console's two secrets, the admins' token and the upstream token: from files or systemd credentials."""

from __future__ import annotations

import hmac
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from license_server.config import AdminConfig

ADMIN_CREDENTIAL = "admin-token"  # LoadCredential=admin-token:/path in the systemd unit
UPSTREAM_CREDENTIAL = "upstream-token"
_MAX_TOKEN_BYTES = 4096
# The admins' token is all that guards the console: shorter or plainer ones can be guessed.
MIN_TOKEN_CHARS = 32  # `openssl rand -hex 32` makes 64
MIN_DISTINCT_CHARS = 8  # refuses "aaaa...", "abab..." and the like, whatever their length
MAKE_TOKEN = "openssl rand -hex 32"  # noqa: S105 - a command, not a password


class Secret:
    """A token that never shows itself in a repr, a log line or a message."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The token itself, for the one place that must send it."""
        return self._value

    def matches(self, given: str) -> bool:
        """Whether `given` is the token, compared in constant time."""
        return hmac.compare_digest(_bytes(given), _bytes(self._value))

    def scrub(self, text: str) -> str:
        """Text with every occurrence of the token blanked out (upstream messages might echo a request)."""
        return text.replace(self._value, "[token]") if self._value else text

    def __repr__(self) -> str:
        return "Secret(<hidden>)"

    __str__ = __repr__


def _bytes(text: str) -> bytes:
    """Text as bytes for comparison; lone surrogates from odd form input must not raise."""
    return text.encode("utf-8", "surrogatepass")


class CredentialError(Exception):
    """A configured token that cannot be used; the message names the file, never its content."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """The tokens the console found at start, and where each came from (for the start-up log)."""

    admin: Secret | None
    upstream: Secret | None
    admin_source: str | None
    upstream_source: str | None


def load_credentials(config: AdminConfig, env: Mapping[str, str]) -> Credentials:
    """Read both tokens: the configured files, else systemd's $CREDENTIALS_DIRECTORY (blocking reads)."""
    admin, admin_source = _token(config.token_file, "admin.token_file", ADMIN_CREDENTIAL, env, strong=True)
    upstream, upstream_source = _token(
        config.upstream_token_file, "admin.upstream_token_file", UPSTREAM_CREDENTIAL, env, strong=False
    )
    return Credentials(admin, upstream, admin_source, upstream_source)


def token_file_problems(config: AdminConfig) -> list[str]:
    """What stops the configured token files from being used, as `check-config` reports it (blocking)."""
    problems: list[str] = []
    for path, setting, strong in (
        (config.token_file, "admin.token_file", True),
        (config.upstream_token_file, "admin.upstream_token_file", False),
    ):
        if path is not None:
            try:
                _read(path, f"{setting} {path}", _PRIVATE, strong=strong)
            except CredentialError as exc:
                problems.append(str(exc))
    return problems


# Permission bits a token file must not have: like ssh with a private key, nobody but its owner may use it.
_PRIVATE = 0o077
# systemd writes a credential 0400 into the unit's own folder and lets the service's user read it through an
# ACL, whose mask shows as group bits (0440): there only others' bits count.
_CREDENTIAL_PRIVATE = 0o007


def _token(
    path: Path | None, setting: str, credential: str, env: Mapping[str, str], *, strong: bool
) -> tuple[Secret | None, str | None]:
    """One token and its source, or (None, None) when neither the setting nor the credential exists."""
    if path is not None:
        source = f"{setting} {path}"
        return _read(path, source, _PRIVATE, strong=strong), source
    folder = env.get("CREDENTIALS_DIRECTORY", "")
    if not folder or not Path(folder).is_absolute():
        return None, None
    candidate = Path(folder) / credential
    if not candidate.exists():
        return None, None
    source = f"systemd credential {credential}"
    return _read(candidate, f"{source} ({candidate})", _CREDENTIAL_PRIVATE, strong=strong), source


def _read(path: Path, source: str, forbidden: int, *, strong: bool) -> Secret:
    """The token in a private file: one line of printable characters; `strong`: long enough not to guess."""
    try:
        # O_NONBLOCK: a FIFO put in the token's place must not hang the start (or check-config) for ever
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as stream:  # noqa: PTH123 - opening a descriptor, not a path
            status = os.fstat(fd)
            raw = stream.read(_MAX_TOKEN_BYTES + 1) if stat.S_ISREG(status.st_mode) else b""
    except OSError as exc:
        raise CredentialError(f"{source}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    mode = status.st_mode
    if not stat.S_ISREG(mode):
        raise CredentialError(f"{source}: not a regular file")
    if forbidden == _PRIVATE and status.st_uid not in (0, os.geteuid()):
        # as ssh requires of a key: whoever owns the file could put a token of their own in it
        raise CredentialError(
            f"{source}: owned by user id {status.st_uid}, neither root nor the user the daemon runs as"
            f" ({os.geteuid()}): chown it to that user"
        )
    if mode & forbidden:
        others = "others" if forbidden == _CREDENTIAL_PRIVATE else "group or others"
        raise CredentialError(
            f"{source}: open to {others} (mode {stat.S_IMODE(mode):04o}); a token file must be private,"
            f" as ssh requires of a key: chmod 600 {path}"
        )
    if len(raw) > _MAX_TOKEN_BYTES:
        raise CredentialError(f"{source}: larger than {_MAX_TOKEN_BYTES} bytes; expected one token")
    try:
        text = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise CredentialError(f"{source}: not UTF-8 text") from None
    if not text:
        raise CredentialError(f"{source}: the file is empty")
    if not text.isprintable() or any(char.isspace() for char in text):
        raise CredentialError(f"{source}: expected one token on one line, without spaces")
    if strong:
        _strong_enough(text, source, str(path) if forbidden == _PRIVATE else "FILE")
    return Secret(text)


def _strong_enough(text: str, source: str, target: str) -> None:
    """Refuse an admin token that could be guessed; the message tells how to make one, never shows it."""
    if len(text) < MIN_TOKEN_CHARS:
        weakness = f"has {len(text)} characters, fewer than the {MIN_TOKEN_CHARS} needed"
    elif len(set(text)) < MIN_DISTINCT_CHARS:
        weakness = f"uses {len(set(text))} different characters, fewer than the {MIN_DISTINCT_CHARS} needed"
    else:
        return
    raise CredentialError(
        f"{source}: the admin token {weakness} to resist guessing; it guards every license action."
        f" Make a random one: {MAKE_TOKEN} | install -m 0600 /dev/stdin {target}"
    )
