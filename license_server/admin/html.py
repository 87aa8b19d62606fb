"""The console's Jinja2 templates, with autoescape on and the console's own escaping of values."""

from __future__ import annotations

import html
from collections.abc import Mapping
from importlib import resources

import jinja2
from markupsafe import Markup

_PACKAGE = "license_server.admin"


def escaped(value: object) -> Markup:
    """A printed value as HTML text: escaped with its quotes (&quot; and &#x27;), None as nothing."""
    if isinstance(value, Markup):  # a macro's output, already escaped
        return value
    return Markup("" if value is None else html.escape(str(value), quote=True))  # noqa: S704 - escaped


def clock_time(text: object) -> str:
    """A record's ISO time to the second, as "2026-11-04 09:15:02"; nothing when there is none."""
    return str(text)[:19].replace("T", " ") if text else ""


class Templates:
    """The console's page templates, read once at start, each compiled once when a page first needs it."""

    def __init__(self, sources: Mapping[str, str]) -> None:
        # Compiling all of them at start costs tens of milliseconds, which would open the console's port
        # that much later than the workstation port; compiled on first use, they are kept for good.
        self._environment = jinja2.Environment(
            loader=jinja2.DictLoader(dict(sources)),  # in memory: a request never reads a file
            autoescape=True,  # every template is HTML or SVG
            finalize=escaped,  # the escaping the console has always written, before autoescape sees it
            undefined=jinja2.StrictUndefined,  # a value a template names but was not given is an error
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            auto_reload=False,
            cache_size=-1,
        )
        self._environment.filters["clock_time"] = clock_time

    @classmethod
    def load(cls) -> Templates:
        """Read every template shipped with the package (file reads: call it off the event loop)."""
        folder = resources.files(_PACKAGE) / "templates"
        return cls({item.name: item.read_text("utf-8") for item in folder.iterdir() if item.is_file()})

    def render(self, template: str, /, **values: object) -> str:
        """A template filled in, every value escaped unless a macro of the templates made it."""
        return self._environment.get_template(template).render(values)


def asset(name: str) -> bytes:
    """A file shipped with the console: stylesheet, OpenAPI document (a file read: off the event loop)."""
    return (resources.files(_PACKAGE) / name).read_bytes()
