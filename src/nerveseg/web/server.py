"""How ``nerveseg serve`` runs the app under uvicorn: timeouts and limits against slow clients.

uvicorn's defaults leave a connection that sends half its request headers open for as long as
it likes (the keep-alive timeout starts only after a first response), and admit any number of
connections. Here:

* **header timeout** (``--header-timeout``, 10 s): a connection must send a request's complete
  headers within it, from when it opens or its previous response ended; else it is closed.
  (:class:`HeaderTimeoutH11Protocol`; h11's own cap on the header size, 16 KB, stays.)
* **keep-alive** 5 s between requests on one connection.
* **connections**: at most ``--max-connections`` (uvicorn's ``limit_concurrency``) connections
  and requests at once; beyond it uvicorn answers 503.
* **bodies**: the app's middleware cuts off a stalled or crawling body (``security.py``).

That keeps one machine's page usable under a careless or mildly hostile client. Public use
belongs behind a reverse proxy that buffers uploads and limits connections per address
(docs/WEB.md has an nginx example).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import ServeSettings

KEEP_ALIVE_S = 5
MAX_HEADER_BYTES = 16 * 1024  # h11's incomplete-event limit: the request line and headers


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that takes more than ``header_timeout``
    seconds to send a request's headers (counted from when it opened or its previous response
    ended), or to finish a body the app answered without reading (a 401 to a large upload)."""

    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def _waiting(self) -> bool:
        """Whether the connection waits on the client with no request in the app."""
        their, ours = self.conn.their_state, self.conn.our_state
        return their is h11.IDLE or (their is h11.SEND_BODY and ours in (h11.DONE, h11.MUST_CLOSE))

    def _update_header_timer(self) -> None:
        if self._waiting():
            if self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)
        elif self._header_timer is not None:  # the headers are in: the body has the app's own timeout
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._waiting() and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._update_header_timer()

    def handle_events(self) -> None:
        super().handle_events()
        self._update_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)


def protocol_for(settings: ServeSettings) -> type[H11Protocol]:
    return type("NervesegH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout": settings.header_timeout_s})


def uvicorn_config(app, settings: ServeSettings, **overrides):
    """The ``uvicorn.Config`` of ``nerveseg serve`` (tests start the same one)."""
    import uvicorn

    options = dict(
        host=settings.host, port=settings.port, log_level="warning", server_header=False,
        http=protocol_for(settings), timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=settings.max_connections,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
    options.update(overrides)
    return uvicorn.Config(app, **options)
