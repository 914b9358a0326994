"""What the server checks before any request reaches a route: the API key (from the headers,
before the body is read), the request-body size and the time a client may take to send its
headers and its body.

``RequestGuard`` is an ASGI middleware in front of the whole app; ``timed_h11`` gives uvicorn
an HTTP/1.1 protocol that closes connections whose request headers do not arrive in time
(uvicorn itself only times out idle keep-alive connections).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

from jvt.server.errors import error_body

OPEN_PATHS = frozenset({"/health", "/version", "/metrics"})  # reachable without the API key
DEFAULT_MAX_REQUEST_BYTES = 2**20
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0


def json_error(status: int, message: str, param: str | None = None,
               headers: dict[str, str] | None = None) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The OpenAI error body as ASCII JSON (always encodable, lone surrogates escaped) and its
    response headers."""
    body = json.dumps(error_body(status, message, param).model_dump(), ensure_ascii=True).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return body, raw


class RequestGuard:
    """ASGI middleware: 401 without the key (paths outside ``open_paths``; checked on the headers,
    the body is never read), 413 for a body over ``max_request_bytes`` (from Content-Length
    at once, else while reading), 408 when the body has not fully arrived ``body_timeout_s``
    after the headers. These answers close the connection. The app receives the body read
    here, then the connection's own events (a disconnect)."""

    def __init__(self, app, *, api_key: str | None, max_request_bytes: int,
                 body_timeout_s: float, open_paths: frozenset[str] = OPEN_PATHS):
        self.app = app
        self.open_paths = open_paths
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_request_bytes = max_request_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if (self.expected is not None and scope["path"] not in self.open_paths
                and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected)):
            await _refuse(send, 401, "invalid or missing API key (Authorization: Bearer <key>)")
            return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            await self._too_large(send)
            return
        body = await self._read_body(receive, send)
        if body is None:
            return
        first = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay():
            return first.pop() if first else await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive, send) -> bytes | None:
        """The whole body, or None once an error was answered (or the client left)."""
        parts, size = [], 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                await _refuse(send, 408, f"the request body did not arrive within "
                                         f"{self.body_timeout_s:g} s")
                return None
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                await self._too_large(send)
                return None
            parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts)

    async def _too_large(self, send) -> None:
        await _refuse(send, 413, f"the request body is larger than {self.max_request_bytes} "
                                 f"bytes (--max-request-bytes)")


async def _refuse(send, status: int, message: str) -> None:
    body, headers = json_error(status, message, headers={"Connection": "close"})
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def timed_h11(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request's headers are not
    complete ``header_timeout_s`` after the connection opened or the previous response ended
    (a client dribbling its headers cannot hold a connection)."""

    class TimedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are complete
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # before super(), which may start a pipelined request at once
            super().on_response_complete()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _timed_out(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol
