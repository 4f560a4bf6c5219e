"""Everything a router needs, built once per app and reached through a FastAPI dependency."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from wanserve.api.metrics import Metrics
from wanserve.api.ratelimit import Limiter, RateLimiter, retry_after_s
from wanserve.api.security import ApiKeys, UrlSigner
from wanserve.config import Settings
from wanserve.errors import Forbidden, RateLimited
from wanserve.files.base import FileStore
from wanserve.jobs.service import JobService
from wanserve.store.base import JobStore
from wanserve.webhooks import WebhookSigner

STORE_READ_THREADS = 32


@dataclass
class ServerContext:
    settings: Settings
    public_url: str
    store: JobStore
    files: FileStore
    service: JobService
    api_keys: ApiKeys
    url_signer: UrlSigner
    webhook_signer: WebhookSigner
    metrics: Metrics
    # per API key: calls that create work (submit, run, uploads), and reads (status, result, cancel, stream)
    submit_limit: Limiter = field(default_factory=lambda: RateLimiter(0, 1))
    read_limit: Limiter = field(default_factory=lambda: RateLimiter(0, 1))  # per (key, request)
    key_read_limit: Limiter = field(default_factory=lambda: RateLimiter(0, 1))  # per key, all its reads
    # threads for store reads off the event loop (read_store); made on first use
    store_reads: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(STORE_READ_THREADS, thread_name_prefix="store-read")
    )
    # Set when the server is asked to stop (SIGTERM, Ctrl-C), before uvicorn cuts off the requests still open: a
    # request cut off then was not given up by its caller (a streamed run is not cancelled for it).
    shutting_down: threading.Event = field(default_factory=threading.Event)


T = TypeVar("T")


async def read_store(ctx: ServerContext, read: Callable[..., T], *args: Any) -> T:
    """A store read from an async route: on the event loop when the store's reads are local (SQLite: skipping the
    thread-pool hop gives ~1.5x the throughput under many pollers), else in a thread of the context's own pool (see
    JobStore). Not the pool that sync routes share: reads waiting on a stalled Redis would take all its threads,
    and file downloads and health checks would wait with them."""
    if ctx.store.reads_are_local:
        return read(*args)
    return await asyncio.get_running_loop().run_in_executor(ctx.store_reads, functools.partial(read, *args))


def get_context(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.context
    return ctx


Context = Annotated[ServerContext, Depends(get_context)]


# The dependencies below are async: they only hash and compare, so they run on the event loop (a sync one would
# cost each status poll a thread-pool hop).
# Declared as a security scheme (not a plain header parameter, which OpenAPI ignores for Authorization): /docs then
# offers to enter the key. The check itself is require_api_key's, and answers 401 in the API's own error format.
API_KEY_HEADER = APIKeyHeader(
    name="Authorization",
    scheme_name="apiKey",
    description="`Key <your key>` (as fal's clients send it; `Bearer <key>` also works). Not needed when the "
    "server runs without keys.",
    auto_error=False,
)


async def require_api_key(ctx: Context, authorization: Annotated[str | None, Security(API_KEY_HEADER)]) -> str | None:
    """The caller's key id (the owner of what it creates), or None when the server has no keys."""
    return ctx.api_keys.check(authorization)


Authorized = Depends(require_api_key)
# The same dependency, as a route parameter: FastAPI runs it once per request however often it is named.
Caller = Annotated[str | None, Depends(require_api_key)]


def _refuse_if_over(limiter: Limiter, wait: float, what: str) -> None:
    """RateLimited (429 + Retry-After) when the caller must wait for a token."""
    if wait > 0:
        raise RateLimited(
            f"Too many {what} for this API key (at most {limiter.rate_per_s:g} per second, {limiter.burst:g} at once)",
            retry_after_s(wait),
        )


SUBMITS, READS = "requests and uploads", "status and result calls"
READ_ONE = "status and result calls about one request"


def check_submit_rate(ctx: ServerContext, caller: str | None) -> None:
    """For sync routes (a thread of their own: a shared limit's Redis call may wait there)."""
    if caller is not None:  # no keys on this server: nothing to count by
        _refuse_if_over(ctx.submit_limit, ctx.submit_limit.acquire(caller), SUBMITS)


async def check_rate(ctx: ServerContext, limiter: Limiter, caller: str | None, what: str) -> None:
    """For async routes: a limit kept in Redis is asked from the context's store thread pool, never on the event
    loop (see read_store)."""
    if caller is None or not limiter.enabled:
        return
    if limiter.is_local:
        wait = limiter.acquire(caller)
    else:
        wait = await asyncio.get_running_loop().run_in_executor(ctx.store_reads, limiter.acquire, caller)
    _refuse_if_over(limiter, wait, what)


async def limit_submits(ctx: Context, caller: Caller, request: Request) -> None:
    check_cross_site(ctx, caller, request)
    await check_rate(ctx, ctx.submit_limit, caller, SUBMITS)


def check_cross_site(ctx: ServerContext, caller: str | None, request: Request) -> None:
    """A server with no API keys takes work from anyone who can reach it, a browser included: a page of another
    origin could start generations on a server at localhost with a plain form or image request. Browsers say so:
    `Sec-Fetch-Site` is `cross-site`, or `same-site` for another port or subdomain of the same site; a browser too old
    to send it still sends the page's `Origin` with a POST, which then names another host than the request's. Other
    clients send neither. Refused unless the page's origin is one the operator allowed (WANSERVE_CORS_ORIGINS). With
    API keys a request needs a key anyway."""
    if caller is not None or not _from_another_origin(request):
        return
    allowed = ctx.settings.cors_origins
    if "*" in allowed or request.headers.get("origin") in allowed:
        return
    raise Forbidden(
        "a page on another site may not create work on this server (it has no API keys): "
        "allow its origin with WANSERVE_CORS_ORIGINS, or set API keys"
    )


def _from_another_origin(request: Request) -> bool:
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("cross-site", "same-site")
    origin = request.headers.get("origin")
    if origin is None:  # not a browser's cross-origin request
        return False
    try:
        page = urlsplit(origin).netloc.lower()
    except ValueError:
        return True
    # Host and port only: behind a proxy that ends TLS the page is https and this server sees http.
    return not page or page != request.headers.get("host", "").lower()


async def limit_reads(ctx: Context, caller: Caller, request_id: str) -> None:
    """Reads are counted per request (fal's Python client polls each request it follows 10 times a second: a
    script following many at once must not run out of one shared budget) and, more loosely, per key."""
    await check_rate(ctx, ctx.read_limit, None if caller is None else f"{caller}/{request_id[:100]}", READ_ONE)
    await check_rate(ctx, ctx.key_read_limit, caller, READS)


SubmitLimited = Depends(limit_submits)
ReadLimited = Depends(limit_reads)
