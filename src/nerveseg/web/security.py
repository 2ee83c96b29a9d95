"""One ASGI middleware for every request: security headers, the bearer token, the Host and
Origin checks, a cap on requests in flight (503 + Retry-After beyond it), and a read timeout on
request bodies.

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
* **In flight**: at most ``max_in_flight`` API requests at once; the page itself (``/``, its
  static files, ``/docs``, ``/openapi.json``) and ``/api/health`` are never counted or refused
  here, so a crowd of slow uploads cannot make the page or the liveness check answer 503. A
  request that announces a body takes its place only once that body has arrived: bodies that
  never come hold a connection until the body timeout, never a place another upload needs.
* **Slow bodies**: a body that sends nothing for ``body_timeout_s`` seconds, or that averages
  under :data:`MIN_BODY_RATE` once it has taken that long (1 byte/s "slowloris" uploads), is
  answered 408 and its connection closed. The upload limiter's slot is taken only after the body
  has arrived (``routers/cases.py``), so slow senders hold a connection, never a worker.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
from urllib.parse import urlsplit

from fastapi import HTTPException

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
# never counted against the in-flight cap: the page, its files and the liveness check are cheap
# and must answer while uploads crowd the server
ALWAYS_ON = ("/", "/api/health", "/docs", "/openapi.json")
ALWAYS_ON_PREFIX = "/static/"
MIN_BODY_RATE = 1024  # bytes/s: the slowest body accepted once it has taken body_timeout_s
BUSY = "the server is busy; try again in a moment"

# a Host header is a name or an IP literal in brackets, then at most ":port"; anything else
# ("[::1]evil.com", "localhost:80:80", "a b") is refused, not parsed leniently into a loopback name
_HOST = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9.-]+))(?::[0-9]{1,5})?$")


def host_name(host: str) -> str | None:
    """The host part of a ``Host`` header (``[::1]`` keeps its brackets), or None when the header
    is not ``name[:port]`` / ``[ipv6][:port]``."""
    m = _HOST.match(host)
    if m is None:
        return None
    return f"[{m['v6']}]" if m["v6"] else m["name"]


class InFlightFull(HTTPException):
    """Raised when a request's body has arrived and every in-flight place is taken: 503 ``busy``
    with Retry-After, as for a request refused on arrival. An HTTPException because FastAPI turns
    any other exception raised while it parses a body into a 400."""

    code = "busy"

    def __init__(self):
        super().__init__(503, BUSY, headers={"Retry-After": "2"})


def announces_body(headers: dict[bytes, bytes]) -> bool:
    """Whether a request says a body follows: ``Content-Length`` above 0 or a chunked
    ``Transfer-Encoding`` (HTTP/1.1's only two ways to send one)."""
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        return True
    length = headers.get(b"content-length", b"").strip()
    return length.isdigit() and int(length) > 0


def timed_receive(receive, idle_s: float, min_rate: float = MIN_BODY_RATE, on_body_complete=None):
    """``receive`` with a read timeout while the request body arrives: 408 (and the connection
    closed) when a part takes more than ``idle_s`` seconds, or when the body has averaged under
    ``min_rate`` bytes/s after ``idle_s``. Once the body is complete it is ``receive`` itself
    (Starlette then waits there for a disconnect, which may rightly take long).
    ``on_body_complete()`` runs once, when the last part of the body has arrived (it may raise an
    HTTPException to refuse the request then)."""
    done = False
    received = 0
    started: float | None = None

    async def wrapped():
        nonlocal done, received, started
        if done:
            return await receive()
        if started is None:
            started = time.monotonic()
        try:
            message = await asyncio.wait_for(receive(), idle_s)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"the request body sent nothing for {idle_s:g} s; send it again "
                                     "(a slow or stalled connection is cut off)", headers={"Connection": "close"}) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            done = True
            if on_body_complete is not None and message["type"] == "http.request":
                on_body_complete()
            return message
        received += len(message.get("body", b""))
        elapsed = time.monotonic() - started
        if elapsed > idle_s and received < min_rate * elapsed:
            raise HTTPException(408, f"the request body arrives at {received / elapsed:.0f} bytes/s, slower than the "
                                     f"server accepts ({min_rate / 1024:g} KB/s after {idle_s:g} s); send it again over "
                                     "a faster connection", headers={"Connection": "close"})
        return message

    return wrapped


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
        self.token = settings.token.encode("utf-8") if settings.token else None
        self.loopback = is_loopback(settings.host)
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        raw = {k.lower(): v for k, v in scope.get("headers", [])}
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw.items()}
        host = headers.get("host", "")
        if self.loopback and host and not is_loopback(host_name(host) or ""):
            return await send_json(send, 421, f"this server answers to localhost only, not to Host {host!r}", "bad_host")
        origin = headers.get("origin")
        if origin and method not in SAFE_METHODS:
            parts = urlsplit(origin)
            if parts.netloc != host:
                return await send_json(send, 403, f"cross-origin request from {origin} refused", "bad_origin")
        if self.token is not None and path.startswith("/api/") and path not in PUBLIC_API:
            # the header's own bytes against the token's UTF-8 bytes: no decoding that could make
            # two different byte strings equal, or a valid token never match
            scheme, _, given = raw.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                return await send_json(send, 401, "missing or wrong token: send 'Authorization: Bearer <token>' "
                                                  "(the --token the server was started with)", "unauthorized",
                                       [(b"www-authenticate", b'Bearer realm="nerveseg"')])
        counts = not (method in SAFE_METHODS and (path in ALWAYS_ON or path.startswith(ALWAYS_ON_PREFIX)))
        places = 0  # the in-flight places this request holds (0 or 1), given back in `finally`
        if counts and not announces_body(raw):
            if self.in_flight >= self.max_in_flight:
                return await send_json(send, 503, BUSY, "busy", [(b"retry-after", b"2")])
            self.in_flight += 1
            places = 1

        def take_place_after_body():
            # the body is here: only now does this request compete for a place (a body that never
            # arrives is cut off by the read timeout instead, holding no place meanwhile)
            nonlocal places
            if not counts or places:
                return
            if self.in_flight >= self.max_in_flight:
                raise InFlightFull()
            self.in_flight += 1
            places = 1

        is_api = path.startswith("/api/")
        receive = timed_receive(receive, self.settings.body_timeout_s, on_body_complete=take_place_after_body)

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
            self.in_flight -= places
