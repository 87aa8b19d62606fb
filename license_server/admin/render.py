"""Pages in the console's layout, and error answers as HTML for browsers or JSON for the API."""

from __future__ import annotations

import json

from aiohttp import web

from license_server import __version__
from license_server.admin.keys import ASSETS, CONSOLE, PRINCIPAL

HTML = "text/html"


def is_api(request: web.Request) -> bool:
    """Whether a request is for the JSON API rather than a page."""
    return request.path == "/api" or request.path.startswith("/api/")


def page(request: web.Request, template: str, /, *, status: int = 200, **values: object) -> web.Response:
    """A console page: a template that extends layout.html, given the page's values and the layout's own.

    The layout's values: the path (for the navigation), who is logged in (None without a session), the
    session's CSRF token ("" without one), the daemon's version, this node's name and the answer's status.
    """
    principal = request.get(PRINCIPAL)
    session = None if principal is None else principal.session
    body = request.app[ASSETS].templates.render(
        template,
        path=request.path,
        user=None if principal is None or session is None else principal.who,
        csrf="" if session is None else session.csrf,
        version=__version__,
        node=request.app[CONSOLE].services.config.node.name,
        status=status,
        **values,
    )
    return web.Response(status=status, text=body, content_type=HTML, charset="utf-8")


def error(request: web.Request, status: int, message: str) -> web.Response:
    """An error: JSON {"error": ...} for the API, a page with the message for a browser."""
    if is_api(request):
        return json_response({"error": message}, status=status)
    return page(request, "error.html", status=status, message=message)


def json_response(data: object, *, status: int = 200) -> web.Response:
    """A JSON answer of the API."""
    return web.Response(
        status=status,
        text=json.dumps(data, ensure_ascii=False),
        content_type="application/json",
        charset="utf-8",
    )
