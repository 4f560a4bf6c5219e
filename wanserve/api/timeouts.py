"""Time limits on how slowly a client may send a request: its headers, then its body.

A connection holds a file descriptor (and, for an upload, a temporary file) for as long as its request is
incomplete. Without limits, a few hundred clients sending a byte now and then, none with an API key, exhaust the
process's descriptors and every request fails. Uvicorn bounds only the idle time between kept-alive requests.

- Headers: a connection whose request headers are not complete `header_timeout_s` after it opened (or after its
  last response, unless a pipelined request is being answered) is closed (`with_header_timeout`, a subclass of
  uvicorn's HTTP protocol).
- Body: while a body streams in, each wait for more must end within `idle_s`, and after that long the body must
  have come at `min_rate` bytes per second of waiting at least (`BodyTimeoutMiddleware`): 408 `request_timeout`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wanserve.api.limits import ResponseWatch

ERROR_TYPE = "request_timeout"


class RequestTimedOut(HTTPException):
    """Raised from `receive`. An HTTPException, so the framework's body parsing passes it through (it turns other
    errors into a 400) and the app's handler answers a JSON 408."""

    def __init__(self, detail: str) -> None:
        super().__init__(408, detail, headers={"connection": "close"})


class BodyTimeoutMiddleware:
    def __init__(self, app: ASGIApp, idle_s: float, min_rate: float) -> None:
        self.app = app
        self.idle_s = idle_s
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        body_done = False
        received, waited = 0, 0.0
        response = ResponseWatch(send)

        async def timed_receive() -> Message:
            nonlocal body_done, received, waited
            if body_done:  # what follows the body is a wait for the hang-up (a stream watching it): unbounded
                return await receive()
            began = loop.time()
            try:
                async with asyncio.timeout(self.idle_s):
                    message = await receive()
            except TimeoutError:
                return response.refuse(_too_slow(f"no part of the request body arrived for {self.idle_s:g} s"))
            waited += loop.time() - began
            if message["type"] != "http.request":
                return message
            received += len(message.get("body", b""))
            body_done = not message.get("more_body", False)
            if not body_done and waited > self.idle_s and received < self.min_rate * waited:
                why = f"the request body came at under {self.min_rate:g} bytes/s ({received} in {waited:.0f} s)"
                return response.refuse(_too_slow(why))
            return message

        await self.app(scope, timed_receive, response.send)


def _too_slow(why: str) -> RequestTimedOut:
    return RequestTimedOut(f"{why}: request timed out")


def with_header_timeout(base: type[Any], header_timeout_s: float) -> type[Any]:
    """Uvicorn's HTTP protocol `base` (httptools' or h11's), closing a connection whose request headers are not
    complete `header_timeout_s` after it opened or after its last response (the same request cycle still current:
    a request whose headers arrived has a new one)."""

    class HeaderTimeoutProtocol(base):  # type: ignore[misc,valid-type]
        _header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.cycle is None or self.cycle.response_complete:  # else a pipelined request is being answered
                self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
            self._header_deadline = self.loop.call_later(header_timeout_s, self._headers_too_slow, self.cycle)

        def _headers_too_slow(self, cycle_when_armed: object) -> None:
            # Not a connection handed to another protocol (a WebSocket upgrade leaves the cycle as it was).
            handed_over = self.transport.get_protocol() is not self
            if self.cycle is cycle_when_armed and not handed_over and not self.transport.is_closing():
                self.transport.close()

    HeaderTimeoutProtocol.__name__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeoutProtocol


# How long an idle kept-alive connection stays open. Longer than the clients keep theirs (httpx, under both fal
# clients and ours: 5 s; Node's fetch: 4 s), so that it is always the client that lets one go: with uvicorn's own
# 5 s, a poll sent on a connection the server was closing at that moment failed with "Server disconnected without
# sending a response". The header time limit (re-armed after each answer) still bounds what an idle client holds.
KEEP_ALIVE_S = 20.0


def http_protocol(header_timeout_s: float) -> type[Any]:
    """The protocol uvicorn's "auto" picks (httptools if installed, else h11), with the header time limit."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base: type[Any] = HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base = H11Protocol
    return with_header_timeout(base, header_timeout_s)
