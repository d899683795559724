"""One ASGI guard in front of every route, the websocket and the page included.

In order: credentials (HTTP Basic ``--api-auth`` or ``Authorization: Bearer`` ``--api-token``;
the page ``/`` and the websocket may pass ``?token=``, which the page keeps in a SameSite=Strict
cookie for its own files), the Origin rule (a state-changing request or a
websocket from a page of another origin, or ``Origin: null``, is refused unless
``--cors-allow-origins`` lists it: the CSRF defence, since browsers send simple cross-site POSTs
without asking), the body-size limit (read before the app parses anything), and
``X-Content-Type-Options: nosniff`` on every response.
"""

from __future__ import annotations

import base64
import hmac
import json
from urllib.parse import parse_qs

from ldm.serve.config import ServeConfig

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
COOKIE = "ldm_token"


class Guard:
    """ASGI middleware enforcing ``config``'s credentials, origins and body limit."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        websocket = scope["type"] == "websocket"
        if not self._authorized(scope, headers):
            return await _refuse(send, websocket, 401, "missing or wrong credentials",
                                 {"www-authenticate": 'Basic realm="ldm"'})  # fmt: skip
        if self.config.token is not None and _query_token(scope) == self.config.token:
            send = _with_cookie(send, self.config.token)  # the page's own files need it next
        origin = headers.get("origin")
        changes = websocket or scope["method"] not in SAFE_METHODS
        if changes and origin is not None and not self._origin_ok(origin, scope, headers):
            return await _refuse(send, websocket, 403, f"origin {origin} is not allowed "
                                 "(--cors-allow-origins)")  # fmt: skip
        if websocket:
            return await self.app(scope, receive, send)
        body = await _read_body(receive, headers, self.config.limits.max_body)
        if body is None:
            limit = self.config.limits.max_body
            return await _refuse(send, False, 413, f"the request body is over the server's "
                                 f"limit of {limit} bytes (--max-body-mb)")  # fmt: skip
        return await self.app(scope, _replay(body, receive), _nosniff(send))

    def _authorized(self, scope, headers: dict) -> bool:
        auth, token = self.config.auth, self.config.token
        if auth is None and token is None:
            return True
        given = headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if token is not None:
            if scheme.lower() == "bearer" and hmac.compare_digest(value.strip(), token):
                return True
            # a browser cannot set headers on a navigation or a websocket: the page takes
            # ?token= once and keeps it in a SameSite=Strict cookie for its own files
            page = scope["type"] == "websocket" or scope["path"] == "/"
            if page and hmac.compare_digest(_query_token(scope) or "", token):
                return True
            if hmac.compare_digest(_cookies(headers).get(COOKIE, ""), token):
                return True
        if auth is not None and scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            return hmac.compare_digest(user, auth[0]) & hmac.compare_digest(password, auth[1])
        return False

    def _origin_ok(self, origin: str, scope, headers: dict) -> bool:
        if origin in self.config.cors_origins or "*" in self.config.cors_origins:
            return True  # listed, or every origin allowed on purpose
        if origin == "null":
            return False
        scheme = {"websocket": "http", "http": scope.get("scheme", "http")}[scope["type"]]
        scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
        host = headers.get("host", "")
        return origin.rstrip("/") in (f"{scheme}://{host}", f"{_other(scheme)}://{host}")


def _query_token(scope) -> str | None:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return (query.get("token") or [None])[0]


def _cookies(headers: dict) -> dict:
    from http.cookies import CookieError, SimpleCookie

    jar = SimpleCookie()
    try:
        jar.load(headers.get("cookie", ""))
    except CookieError:
        return {}
    return {k: m.value for k, m in jar.items()}


def _with_cookie(send, token: str):
    cookie = f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/".encode("latin-1")

    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = dict(message, headers=[*message.get("headers", []), (b"set-cookie", cookie)])
        await send(message)

    return wrapped


def _other(scheme: str) -> str:
    # a websocket scope's scheme does not say whether the page was http or https
    return "https" if scheme == "http" else "http"


async def _read_body(receive, headers: dict, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is known to be over ``limit`` bytes."""
    try:
        if int(headers.get("content-length", "0")) > limit:
            return None
    except ValueError:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later: the disconnect, for is_disconnected()

    return replay


def _nosniff(send):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            headers = [
                h for h in message.get("headers", []) if h[0].lower() != b"x-content-type-options"
            ]
            headers.append((b"x-content-type-options", b"nosniff"))
            message = dict(message, headers=headers)
        await send(message)

    return wrapped


async def _refuse(send, websocket: bool, status: int, message: str, extra: dict | None = None):
    if websocket:  # before accept: the handshake is answered with an HTTP 403
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    body = json.dumps({"detail": message, "error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-content-type-options", b"nosniff")]  # fmt: skip
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
