"""Pages in the console's layout, and error answers as HTML for browsers or JSON for the API."""

from __future__ import annotations

import json

from aiohttp import web

from license_server import __version__
from license_server.admin.html import Markup, hidden, tag
from license_server.admin.keys import ASSETS, PRINCIPAL

HTML = "text/html"
NAV = (
    ("/", "Status"),
    ("/licenses", "Licenses"),
    ("/machines", "Machines"),
    ("/activate", "Activate"),
    ("/audit", "Audit log"),
)


def is_api(request: web.Request) -> bool:
    """Whether a request is for the JSON API rather than a page."""
    return request.path == "/api" or request.path.startswith("/api/")


def page(request: web.Request, title: str, content: Markup, *, status: int = 200) -> web.Response:
    """A console page: navigation, who is logged in (with a logout button) and the content."""
    templates = request.app[ASSETS].templates
    principal = request.get(PRINCIPAL)
    user = Markup("")
    if principal is not None and principal.session is not None:
        user = templates.render("user", who=principal.who, csrf=hidden({"csrf": principal.session.csrf}))
    links = Markup(
        "".join(
            tag("a", label, href=href, aria_current="page" if _current(request.path, href) else None)
            for href, label in NAV
        )
    )
    body = templates.render("layout", title=title, nav=links, user=user, content=content, version=__version__)
    return web.Response(status=status, text=body, content_type=HTML, charset="utf-8")


def _current(path: str, href: str) -> bool:
    """Whether a navigation link names the page shown."""
    return path == href if href == "/" else path.startswith(href)


def error(request: web.Request, status: int, message: str) -> web.Response:
    """An error: JSON {"error": ...} for the API, a page with the message for a browser."""
    if is_api(request):
        return json_response({"error": message}, status=status)
    content = Markup(
        tag("h1", "Something went wrong" if status >= 500 else "Not done")
        + tag("p", message, class_="flash error")
    )
    return page(request, f"Error {status}", content, status=status)


def json_response(data: object, *, status: int = 200) -> web.Response:
    """A JSON answer of the API."""
    return web.Response(
        status=status,
        text=json.dumps(data, ensure_ascii=False),
        content_type="application/json",
        charset="utf-8",
    )
