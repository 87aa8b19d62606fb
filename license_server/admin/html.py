"""A tiny template helper: string.Template files, every value escaped unless it is already Markup."""

from __future__ import annotations

import html
import string
from collections.abc import Iterable, Mapping
from importlib import resources

_PACKAGE = "license_server.admin"


class Markup(str):
    """HTML that is safe as it is: escaped text, or built only from escaped parts."""

    __slots__ = ()


def esc(value: object) -> Markup:
    """A value as HTML text: escaped (quotes too), None as nothing, Markup as it is."""
    if isinstance(value, Markup):
        return value
    return Markup("" if value is None else html.escape(str(value), quote=True))


def join(parts: Iterable[object], separator: str = "") -> Markup:
    """Several values escaped and put together."""
    return Markup(separator.join(esc(part) for part in parts))


def tag(name: str, content: object = "", **attributes: object) -> Markup:
    """One element; attributes named with a trailing _ lose it (class_), False or None leaves one out."""
    attrs = "".join(
        f" {key.rstrip('_').replace('_', '-')}" + ("" if value is True else f'="{esc(value)}"')
        for key, value in attributes.items()
        if value is not None and value is not False
    )
    return Markup(f"<{name}{attrs}>{esc(content)}</{name}>")


def hidden(fields: Mapping[str, object]) -> Markup:
    """Hidden form inputs carrying values to the next request."""
    return Markup(
        "".join(
            f'<input type="hidden" name="{esc(key)}" value="{esc(value)}">' for key, value in fields.items()
        )
    )


class Templates:
    """The console's page templates, read once at start."""

    def __init__(self, texts: Mapping[str, str]) -> None:
        self._templates = {name: string.Template(text) for name, text in texts.items()}

    @classmethod
    def load(cls) -> Templates:
        """Read every template shipped with the package (file reads: call it off the event loop)."""
        folder = resources.files(_PACKAGE) / "templates"
        return cls(
            {
                item.name.removesuffix(".html"): item.read_text("utf-8")
                for item in folder.iterdir()
                if item.name.endswith(".html")
            }
        )

    def render(self, template: str, /, **values: object) -> Markup:
        """A template filled in; a placeholder without a value is an error, never left showing."""
        return Markup(
            self._templates[template].substitute({key: esc(value) for key, value in values.items()})
        )


def asset(name: str) -> bytes:
    """A file shipped with the console: stylesheet, OpenAPI document (a file read: off the event loop)."""
    return (resources.files(_PACKAGE) / name).read_bytes()
