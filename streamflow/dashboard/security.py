"""Who may see the dashboard and act through it: the token, its cookie, CSRF, the path prefix.

A pure ASGI middleware (no response buffering, so server-sent events stream through): it strips
the ``--root-path`` prefix when a proxy passes it on, and lets a request through only with the
token, as ``Authorization: Bearer <token>`` or the session cookie the login form sets. Forms
carry a CSRF token: an HMAC of a per-process secret, which a page of another origin cannot read.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from streamflow.dashboard.settings import DashboardSettings

#: The cookie the login form sets.
SESSION_COOKIE = "streamflow_dashboard"
#: Paths served without the token: the login form and the stylesheet it uses.
OPEN_PATHS = ("/login", "/static/")
#: The largest form body read (a form holds ids, a role, a CSRF token: 50 ids fit easily).
MAX_FORM = 16 * 1024


class Guard:
    """Checks the token, strips the prefix, and knows the CSRF token of this process.

    Args:
        app: The application it guards.
        settings: The dashboard's options.
    """

    def __init__(self, app: ASGIApp, settings: DashboardSettings) -> None:
        self.app = app
        self.settings = settings
        self._secret = secrets.token_bytes(32)
        self.csrf = hmac.new(self._secret, b"csrf", hashlib.sha256).hexdigest()

    def session(self) -> str:
        """The session cookie's value: derived from the token, never the token itself."""
        token = (self.settings.token or "").encode()
        return hmac.new(token, b"streamflow dashboard session", hashlib.sha256).hexdigest()

    def authorized(self, request: Request) -> bool:
        """Whether ``request`` carries the token (always, when there is none)."""
        token = self.settings.token
        if token is None:
            return True
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer ") and _same(header[7:].strip(), token):
            return True
        return _same(request.cookies.get(SESSION_COOKIE, ""), self.session())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Strip the prefix, then let the request through or turn it away."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        prefix = self.settings.prefix
        path: str = scope["path"]
        if prefix and (path == prefix or path.startswith(prefix + "/")):
            path = path[len(prefix) :] or "/"
        scope = {**scope, "path": path, "root_path": "", "raw_path": path.encode()}
        request = Request(scope)
        send = _with_headers(send)
        if path.startswith(OPEN_PATHS) or self.authorized(request):
            await self.app(scope, receive, send)
            return
        if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            response: Any = RedirectResponse(f"{prefix}/login", status_code=303)
        else:
            response = PlainTextResponse("a token is needed", status_code=401)
        await response(scope, receive, send)


#: Sent with every response: no inline script or style runs, no frame embeds the pages, nothing
#: is loaded from elsewhere (a second line behind autoescaping).
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


def _with_headers(send: Send) -> Send:
    async def sending(message: Any) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
        await send(message)

    return sending


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


async def read_form(request: Request) -> dict[str, str]:
    """A urlencoded form's fields (the first value of each), bounded to :data:`MAX_FORM`."""
    return {name: values[0] for name, values in (await read_fields(request)).items()}


async def read_fields(request: Request) -> dict[str, list[str]]:
    """A urlencoded form's fields with every value (checkboxes), bounded to :data:`MAX_FORM`."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            return {}
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


def same_origin(request: Request) -> bool:
    """Whether a POST's Origin (when the browser sends one) is the dashboard's own."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1] == host
