"""What every dashboard request passes first: the host's auth hook, and CSRF protection.

Auth: ``auth(request)`` (sync or async) is asked on every request, pages and static
files alike. It returns True to let the request through, False to refuse it (403), or
a ``Response`` to send instead (a 401 with ``WWW-Authenticate``, a redirect to a login
page). It may also raise Starlette's (or FastAPI's) ``HTTPException``, as FastAPI's
security helpers do (``await HTTPBasic()(request)``): that becomes the response.

CSRF: every action is a POST that must carry the token of the ``taskrunner_csrf``
cookie (a random 256-bit value, ``HttpOnly``, ``SameSite=Strict``, scoped to the
dashboard's path) in its ``csrf`` form field or ``X-CSRF-Token`` header (the double
submit pattern); a cross-site page can neither read the cookie nor make the browser
send it. An ``Origin`` header, when present, must name this host too.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

AuthResult = bool | Response
Auth = Callable[[Request], AuthResult | Awaitable[AuthResult]]
"""The host app's check: ``auth(request)`` -> True (allowed), False (403) or a Response."""

COOKIE = "taskrunner_csrf"
HEADER = "x-csrf-token"
FIELD = "csrf"


class Guard:
    """ASGI middleware: runs ``auth``, and hands out the CSRF cookie (the token is in
    ``request.state.csrf`` for the templates)."""

    def __init__(self, app: ASGIApp, auth: Auth | None = None) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        refusal = await self._refusal(request)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        token = request.cookies.get(COOKIE)
        fresh = not _well_formed(token)
        if fresh:
            token = secrets.token_urlsafe(32)
        scope.setdefault("state", {})["csrf"] = token
        if not fresh:
            await self.app(scope, receive, send)
            return
        cookie = _cookie(token or "", _base_path(scope), scope.get("scheme") == "https")

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"set-cookie", cookie.encode()))
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    async def _refusal(self, request: Request) -> Response | None:
        if self.auth is None:
            return None
        try:
            verdict: Any = self.auth(request)
            if inspect.isawaitable(verdict):
                verdict = await verdict
        except HTTPException as exc:
            return PlainTextResponse(exc.detail, exc.status_code, headers=exc.headers)
        if isinstance(verdict, Response):
            return verdict
        if verdict is True:
            return None
        return PlainTextResponse("Forbidden", 403)


def _well_formed(token: str | None) -> bool:
    return token is not None and 40 <= len(token) <= 64 and token.isascii()


def _base_path(scope: Scope) -> str:
    return str(scope.get("root_path") or "") or "/"


def _cookie(token: str, path: str, secure: bool) -> str:
    cookie: SimpleCookie = SimpleCookie()
    cookie[COOKIE] = token
    morsel = cookie[COOKIE]
    morsel["path"] = path
    morsel["httponly"] = True
    morsel["samesite"] = "Strict"
    if secure:
        morsel["secure"] = True
    return morsel.OutputString()


def check_csrf(request: Request, submitted: str | None) -> None:
    """Refuse (HTTPException 403) a POST whose token does not match its cookie, or whose
    Origin names another host."""
    expected = request.cookies.get(COOKIE)
    given = submitted or request.headers.get(HEADER)
    if not expected or not given or not secrets.compare_digest(expected, given):
        raise HTTPException(403, "CSRF token missing or wrong: reload the page and try again")
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
        raise HTTPException(403, "cross-origin request refused")
    if origin == "null":
        raise HTTPException(403, "cross-origin request refused")
