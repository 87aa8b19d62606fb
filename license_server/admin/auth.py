"""Who may use the console: a bearer token or a login session on every route, CSRF on every change.

Public are only the login form, the stylesheet it needs, and the monitoring endpoints that the workstation
port serves without a credential too. Everything else, including paths that do not exist, answers 401
without a credential, so a route cannot be added unprotected by forgetting a check. Wrong tokens slow their
address down (throttle.py): past a few, its tokens are answered 429 unchecked for a while.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from license_server.admin.keys import (
    ADMIN_TOKEN,
    CONSOLE,
    FAILURE_RECORDS,
    PRINCIPAL,
    SESSIONS,
    SETTINGS,
    THROTTLE,
    Principal,
)
from license_server.admin.render import error, is_api, page
from license_server.admin.sessions import COOKIE, Session, csrf_ok
from license_server.admin.throttle import FREE_FAILURES
from license_server.storage.interfaces import StoreUnreachableError
from license_server.storage.postgres import DatabaseError
from license_server.storage.seats import LedgerUnreadableError

log = structlog.get_logger(__name__)

PUBLIC_ROUTES = frozenset({"login_form", "login", "stylesheet", "healthz", "readyz", "status", "metrics"})
CSRF_HEADER = "X-CSRF-Token"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_FORM = "application/x-www-form-urlencoded"
_MAX_WHO = 64
_HEADERS = {
    # No script, no framing, nothing from elsewhere: the console works without internet and is not embeddable.
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self';"
    " frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Require a credential (and a CSRF token for changes made with a session); add security headers."""
    try:
        response = await _checked(request, handler)
    except web.HTTPException as exc:  # the router's 404 and 405, and aiohttp's 413
        if exc.status < 400:
            raise
        response = error(request, exc.status, exc.reason)
    except (LedgerUnreadableError, StoreUnreachableError) as exc:  # a shared database out of reach
        log.warning("admin_store_unreadable", path=request.path, error=str(exc))
        response = error(request, 503, f"The shared state cannot be read now, try again shortly: {exc}")
    response.headers.update(_HEADERS)
    return response


async def _checked(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The handler's answer once the request is allowed, else the refusal."""
    route = request.match_info.route
    if route.name in PUBLIC_ROUTES:
        return await handler(request)
    given = _bearer_token(request)
    if given is not None:
        refusal = await _check_bearer(request, given)
        if refusal is not None:
            return refusal
        principal = Principal(request.app[SETTINGS].label or "admin", request.remote or "", None)
    else:
        try:
            session = await request.app[SESSIONS].find(request.cookies.get(COOKIE))
        except DatabaseError as exc:
            return unavailable(request, exc)
        if session is None:
            return unauthorized(request)
        principal = Principal(session.who, request.remote or "", session)
        if request.method not in _SAFE_METHODS and not await _csrf_ok(request, session):
            return error(
                request,
                403,
                "This change did not come from a page of this console (no valid CSRF token);"
                " reload the page and try again.",
            )
    request[PRINCIPAL] = principal
    return await handler(request)


def _bearer_token(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer` header, or None when the request has none."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else None


async def _check_bearer(request: web.Request, given: str) -> web.Response | None:
    """None for the admin token, else the refusal: 429 while the address must wait, else 401 (counted)."""
    client = request.remote or ""
    wait = request.app[THROTTLE].wait(client)
    if wait is not None:
        return too_many(request, wait, request.path_qs if request.method == "GET" else "/")
    if request.app[ADMIN_TOKEN].matches(given):
        request.app[THROTTLE].succeeded(client)
        return None
    who = request.app[SETTINGS].label or "admin"
    await _failed(request, "bearer", {"actor": f"{who}@{client}#api", "client": client, "session": "api"})
    return unauthorized(request)


async def _failed(request: web.Request, via: str, actor: dict[str, str]) -> None:
    """A wrong token: slow its address down, count it, and record it while the trail's budget allows."""
    client = actor["client"]
    wait = request.app[THROTTLE].failed(client)  # before any await: concurrent guesses are counted in turn
    console = request.app[CONSOLE]
    console.services.metrics.admin_auth_failures.labels(via=via).inc()
    if wait:
        log.warning("admin_auth_throttled", client=client, via=via, wait_s=wait)
    left_out = request.app[FAILURE_RECORDS].take()
    if left_out is not None:
        details = {"unrecorded": left_out} if left_out else {}
        await console.record(actor, "login_failed" if via == "login" else "bearer_failed", **details)


def too_many(request: web.Request, wait: int, target: str = "/") -> web.Response:
    """429 with Retry-After: too many wrong tokens from this address; none it sends is checked meanwhile."""
    request.app[CONSOLE].services.metrics.admin_auth_throttled.inc()
    message = (
        f"Too many wrong admin tokens came from your address ({FREE_FAILURES} or more in a row):"
        f" try again in {wait} seconds."
    )
    if is_api(request):
        response = error(request, 429, message)
    else:
        response = login_page(request, message, target, status=429)
    response.headers["Retry-After"] = str(wait)
    return response


async def _csrf_ok(request: web.Request, session: Session) -> bool:
    """Whether a change made with a session cookie carries the session's CSRF token (header or form)."""
    given = request.headers.get(CSRF_HEADER)
    if given is None and request.content_type == _FORM:
        value = (await request.post()).get("csrf")
        given = value if isinstance(value, str) else None
    return csrf_ok(session, given)


def unavailable(request: web.Request, exc: DatabaseError) -> web.Response:
    """503: the logins are in the shared database, which did not answer (a bearer token needs no login)."""
    log.warning("admin_sessions_unavailable", error=str(exc))  # the details for the admin, not the browser
    message = "The database that holds the console's logins did not answer: try again shortly."
    response = error(request, 503, message)
    response.headers["Retry-After"] = "5"
    return response


def unauthorized(request: web.Request, message: str = "") -> web.Response:
    """401: JSON with a Bearer challenge for the API, the login form for a browser."""
    if is_api(request):
        response = error(request, 401, "Send the admin token as 'Authorization: Bearer <token>'.")
        response.headers["WWW-Authenticate"] = 'Bearer realm="license-server admin"'
        return response
    target = request.path_qs if request.method == "GET" else "/"
    return login_page(request, message, target, status=401)


def login_page(request: web.Request, message: str, target: str, *, status: int) -> web.Response:
    """The login form."""
    return page(request, "login.html", status=status, message=message, target=_local(target))


async def login_form(request: web.Request) -> web.Response:
    """GET /login: the form."""
    return login_page(request, "", request.query.get("next", "/"), status=200)


async def login(request: web.Request) -> web.StreamResponse:
    """POST /login: the right token starts a session (cookie); a wrong one is recorded and refused."""
    if request.content_type != _FORM:
        return error(request, 415, f"Send the login form as {_FORM}.")
    form = await request.post()
    token, name, given_target = (form.get(field) for field in ("token", "name", "next"))
    target = given_target if isinstance(given_target, str) else "/"
    client = request.remote or ""
    who = _who(name) or request.app[SETTINGS].label or "admin"
    wait = request.app[THROTTLE].wait(client)
    if wait is not None:
        return too_many(request, wait, target)
    if not isinstance(token, str) or not request.app[ADMIN_TOKEN].matches(token):
        await _failed(request, "login", {"actor": f"{who}@{client}#-", "client": client, "session": "-"})
        return login_page(request, "That is not the admin token.", target, status=401)
    request.app[THROTTLE].succeeded(client)
    try:
        session, cookie = await request.app[SESSIONS].create(who, client)
    except DatabaseError as exc:
        return unavailable(request, exc)
    await request.app[CONSOLE].record(Principal(who, client, session).fields(), "login")
    response = see_other(_local(target))
    response.set_cookie(
        COOKIE,
        cookie,
        httponly=True,
        samesite="Strict",
        path="/",
        max_age=int(request.app[SETTINGS].session_lifetime),
        secure=secure_cookie(request),
    )
    return response


def secure_cookie(request: web.Request) -> bool:
    """Whether the login cookie is marked Secure: admin.secure_cookie, or for auto, whether HTTPS was used.

    auto also believes a reverse proxy's X-Forwarded-Proto or Forwarded header: a client that sends one
    falsely only gets a cookie its own browser keeps off plain HTTP.
    """
    setting = request.app[SETTINGS].secure_cookie
    if setting != "auto":
        return setting == "true"
    if request.secure:
        return True
    forwarded_proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    if forwarded_proto == "https":
        return True
    return bool(request.forwarded) and request.forwarded[0].get("proto", "").lower() == "https"


async def logout(request: web.Request) -> web.StreamResponse:
    """POST /logout: end the session."""
    principal = request[PRINCIPAL]
    if principal.session is not None:
        try:
            await request.app[SESSIONS].end(principal.session)
        except DatabaseError as exc:  # the login would stay valid on the other nodes: say so, do not pretend
            return unavailable(request, exc)
    await request.app[CONSOLE].record(principal.fields(), "logout")
    response = see_other("/login")
    response.del_cookie(COOKIE, path="/", secure=secure_cookie(request), httponly=True, samesite="Strict")
    return response


def see_other(location: str) -> web.Response:
    """303: go on to another page of the console with a GET."""
    return web.Response(status=303, headers={"Location": location})


def _who(name: object) -> str:
    """The name an admin typed at login, made safe for the trail: printable, short; "" if none."""
    if not isinstance(name, str):
        return ""
    cleaned = "".join(char for char in name.strip() if char.isprintable() and char not in "@#")
    return cleaned[:_MAX_WHO]


def _local(target: str) -> str:
    """A path on this console to go to after login; anything else (another site) becomes "/".

    A control character (CR, LF, NUL, tab) also makes it "/": urlsplit drops some before it looks, and a
    Location header cannot carry them, so what is returned is exactly what was checked.
    """
    if not target.isprintable():
        return "/"
    parts = urlsplit(target)
    if (
        parts.scheme
        or parts.netloc
        or not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
    ):
        return "/"
    return target
