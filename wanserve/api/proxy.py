"""The JS client's proxy route, `/api/fal/proxy`: the target fal URL arrives in `x-fal-target-url`.

Instead of forwarding over the network (as `@fal-ai/server-proxy` does to fal), the request is
dispatched in-process to the route that serves that role here, with its method, headers, query and
body unchanged, so the answer is exactly what the direct route answers.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from wanserve.api.responses import error_response
from wanserve.errors import BadRequest

PROXY_PATH = "/api/fal/proxy"

# fal host -> the path prefix that serves that role on this server
FAL_HOSTS = {
    "queue.fal.run": "",
    "fal.run": "/run",
    "rest.fal.ai": "/rest",
    "rest.alpha.fal.ai": "/rest",
    "v3.fal.media": "/cdn",
}


def local_target(target: str, public_url: str) -> tuple[str, bytes] | None:
    """(path, query) on this server for a fal (or our own) URL, or None when it is neither."""
    try:
        parts = urlsplit(target)
        hostname = parts.hostname or ""
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return None
    if parts.scheme not in ("http", "https"):
        return None
    own = urlsplit(public_url)
    if parts.netloc == own.netloc:
        return parts.path or "/", parts.query.encode()
    prefix = FAL_HOSTS.get(hostname)
    if prefix is None:
        return None
    return prefix + (parts.path or "/"), parts.query.encode()


class FalProxyMiddleware:
    def __init__(self, app: ASGIApp, public_url: str) -> None:
        self.app = app
        self.public_url = public_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != PROXY_PATH:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        target = headers.get("x-fal-target-url")
        resolved = local_target(target, self.public_url) if target else None
        if resolved is None:
            detail = "Invalid request: missing x-fal-target-url" if not target else f"Invalid target URL: {target}"
            await error_response(BadRequest(detail))(scope, receive, send)
            return
        raw_path, query = resolved
        scope = {**scope, "path": unquote(raw_path), "raw_path": raw_path.encode(), "query_string": query}
        await self.app(scope, receive, send)
