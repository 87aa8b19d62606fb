"""The console's two secrets, the admins' token and the upstream token: from files or systemd credentials."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from license_server.config import AdminConfig

ADMIN_CREDENTIAL = "admin-token"  # LoadCredential=admin-token:/path in the systemd unit
UPSTREAM_CREDENTIAL = "upstream-token"
_MAX_TOKEN_BYTES = 4096


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
    admin, admin_source = _token(config.token_file, "admin.token_file", ADMIN_CREDENTIAL, env)
    upstream, upstream_source = _token(
        config.upstream_token_file, "admin.upstream_token_file", UPSTREAM_CREDENTIAL, env
    )
    return Credentials(admin, upstream, admin_source, upstream_source)


def _token(
    path: Path | None, setting: str, credential: str, env: Mapping[str, str]
) -> tuple[Secret | None, str | None]:
    """One token and its source, or (None, None) when neither the setting nor the credential exists."""
    if path is not None:
        return _read(path, f"{setting} {path}"), f"{setting} {path}"
    folder = env.get("CREDENTIALS_DIRECTORY", "")
    if not folder or not Path(folder).is_absolute():
        return None, None
    candidate = Path(folder) / credential
    if not candidate.exists():
        return None, None
    source = f"systemd credential {credential}"
    return _read(candidate, source), source


def _read(path: Path, source: str) -> Secret:
    """The token in a file: its text without surrounding blanks, one line of printable characters."""
    try:
        with path.open("rb") as stream:
            raw = stream.read(_MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise CredentialError(f"{source}: cannot be read ({exc.strerror or type(exc).__name__})") from None
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
    return Secret(text)
