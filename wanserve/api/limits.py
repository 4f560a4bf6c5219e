"""The request body limit of the JSON routes, as a pure ASGI middleware.

Bytes are counted as they stream in, so a chunked body (no Content-Length) is stopped at the limit too,
never buffered whole; a declared Content-Length over the limit is refused before a byte is read. Uploads
are not counted here: their routes stream to disk under their own `max_upload_bytes`.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ERROR_TYPE = "payload_too_large"


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the limit. An HTTPException, so the framework's body parsing
    passes it through (it turns other errors into a 400) and the app's handler answers it as a JSON 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is over the {limit}-byte limit; upload files and pass their URLs",
            headers={"connection": "close"},  # the rest of the body is never read: the server hangs up after this
        )


class ResponseWatch:
    """What a middleware that guards a request body (its size here, its pace in `timeouts`) needs to know of the
    response: whether it has begun, and so how a body that breaks the rule ends."""

    def __init__(self, send: Send) -> None:
        self.started = False
        self._send = send

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    def refuse(self, exc: HTTPException) -> Message:
        """What `receive` gives the app for a body past the rule: `exc`, answered by the app's handler; once the
        response has begun (a stream that watches for a hang-up reads on) too late for that, so the rest of the
        body is not read, as if the client had gone, and the server closes the connection."""
        if self.started:
            return {"type": "http.disconnect"}
        raise exc


def is_upload(method: str, path: str) -> bool:
    """The storage routes that take file bytes (see wanserve.api.storage): a signed PUT, a multipart part
    (both flows), the CDN upload. Exactly those paths: any other (`/cdn/files/upload/` too) is a submit's path."""
    if method == "PUT":
        return path.startswith(("/rest/storage/upload/", "/files/"))
    return method == "POST" and path == "/cdn/files/upload"


async def read_body(request: Request, max_bytes: int) -> bytes:
    """A JSON route's body, refused past `max_bytes` as it streams in. The middleware counts too; this keeps a route
    that reads a body safe whatever path the middleware was told is an upload's."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise BodyTooLarge(max_bytes)
    return bytes(body)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_upload(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope["headers"]:
            declared = value.strip()  # bytes: isdigit() is ASCII digits only; a long one is past any limit
            if name == b"content-length" and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
                await _refuse(send, BodyTooLarge(limit))
                return

        received = 0
        over = False
        response = ResponseWatch(send)

        async def counted_receive() -> Message:
            nonlocal received, over
            if not over:
                message = await receive()
                if message["type"] != "http.request":
                    return message
                received += len(message.get("body", b""))
                if received <= limit:
                    return message
                over = True
            return response.refuse(BodyTooLarge(limit))

        try:
            await self.app(scope, counted_receive, response.send)
        except BodyTooLarge as exc:
            # A route that read the body outside the framework's handlers: answer here unless it already began.
            if response.started:
                raise
            await _refuse(send, exc)


async def _refuse(send: Send, exc: BodyTooLarge) -> None:
    payload = json.dumps({"detail": exc.detail, "error_type": ERROR_TYPE}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": exc.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"x-fal-error-type", ERROR_TYPE.encode()),
                *[(name.encode(), value.encode()) for name, value in (exc.headers or {}).items()],
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
