"""One ASGI middleware for every request: security headers, the bearer token, the Host and
Origin checks, and a cap on requests in flight (503 + Retry-After beyond it).

* **Headers**: a Content-Security-Policy that allows only the server's own scripts, styles and
  images (no inline script, no framing), ``X-Content-Type-Options: nosniff``,
  ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer``, and ``Cache-Control: no-store``
  on the API (patient images must not stay in a shared browser cache).
* **Token**: with ``--token``, every ``/api/`` request except ``/api/health`` needs
  ``Authorization: Bearer <token>``, compared with :func:`hmac.compare_digest`.
* **Host**: bound to loopback, only ``Host: localhost / 127.x / [::1]`` is served, so a web page
  elsewhere cannot reach the API by pointing its own domain name at 127.0.0.1 (DNS rebinding).
* **Origin**: a request that changes anything and carries an ``Origin`` header must come from
  this server's own origin (no cross-site uploads from another tab).
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import urlsplit

from .settings import ServeSettings, is_loopback

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]

PUBLIC_API = ("/api/health",)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _host_only(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def send_json(send, status: int, detail: str, code: str, extra_headers: list | None = None) -> None:
    body = json.dumps({"detail": detail, "code": code}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store")] + SECURITY_HEADERS + (extra_headers or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class SecurityMiddleware:
    def __init__(self, app, settings: ServeSettings, max_in_flight: int = 64):
        self.app = app
        self.settings = settings
        self.token = settings.token.encode() if settings.token else None
        self.loopback = is_loopback(settings.host)
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.loopback and host and not is_loopback(_host_only(host)):
            return await send_json(send, 421, f"this server answers to localhost only, not to Host {host!r}", "bad_host")
        origin = headers.get("origin")
        if origin and method not in SAFE_METHODS:
            parts = urlsplit(origin)
            if parts.netloc != host:
                return await send_json(send, 403, f"cross-origin request from {origin} refused", "bad_origin")
        if self.token is not None and path.startswith("/api/") and path not in PUBLIC_API:
            auth = headers.get("authorization", "")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
                return await send_json(send, 401, "missing or wrong token: send 'Authorization: Bearer <token>' "
                                                  "(the --token the server was started with)", "unauthorized",
                                       [(b"www-authenticate", b'Bearer realm="nerveseg"')])
        if self.in_flight >= self.max_in_flight:
            return await send_json(send, 503, "the server is busy; try again in a moment", "busy", [(b"retry-after", b"2")])
        self.in_flight += 1
        is_api = path.startswith("/api/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [h for h in SECURITY_HEADERS if h[0] not in names]
                if is_api and b"cache-control" not in names:
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            self.in_flight -= 1
