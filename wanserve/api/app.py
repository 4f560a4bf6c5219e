"""The FastAPI application: routers, error handlers, the proxy route, and the background loops
(webhook delivery, start deadlines, lost-lease recovery, expired-file sweep, worker supervision)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wanserve import __version__
from wanserve.api import docs_pages, files, health, playground, queue, run, storage
from wanserve.api.context import ServerContext
from wanserve.api.hosts import AllowedHosts, HostCheckMiddleware
from wanserve.api.limits import ERROR_TYPE as PAYLOAD_TOO_LARGE
from wanserve.api.limits import BodyLimitMiddleware
from wanserve.api.metrics import Metrics
from wanserve.api.openapi import install_openapi
from wanserve.api.proxy import FalProxyMiddleware
from wanserve.api.responses import error_response
from wanserve.api.security import ApiKeys, UrlSigner, read_or_create_secret, without_plain_keys
from wanserve.api.timeouts import ERROR_TYPE as REQUEST_TIMEOUT
from wanserve.api.timeouts import BodyTimeoutMiddleware
from wanserve.backends import open_file_store, open_job_store, open_rate_limiter
from wanserve.config import Settings
from wanserve.errors import RateLimited, WanserveError
from wanserve.files.inputs import pinned_async_client
from wanserve.jobs.endpoints import EndpointRegistry
from wanserve.jobs.limits import InputLimits
from wanserve.jobs.service import JobService, LeaseRecovery, forget_silent_workers
from wanserve.tempdirs import remove_stale_temp_dirs
from wanserve.webhooks import WebhookDispatcher, WebhookSigner
from wanserve.worker.supervisor import WorkerSupervisor

log = logging.getLogger("wanserve.api")

HOUSEKEEPING_S = 1.0
WEBHOOK_POLL_S = 0.25


def build_context(settings: Settings) -> ServerContext:
    """The stores the settings name, plus the keys kept under the data directory."""
    settings = without_plain_keys(settings)
    keys = settings.resolved_keys_dir()
    public_url = settings.resolved_public_url()
    store = open_job_store(settings)
    file_store = open_file_store(settings)
    api_keys = ApiKeys(settings.api_key_hashes)
    url_signer = UrlSigner(read_or_create_secret(keys / "url-secret"))
    return ServerContext(
        settings=settings,
        public_url=public_url,
        store=store,
        files=file_store,
        service=JobService(
            store,
            EndpointRegistry(settings.app_ids, InputLimits.from_settings(settings)),
            public_url,
            settings.allow_private_urls,
            max_loras=settings.max_loras,
            max_queued_per_key=settings.max_queued_per_key,
            # With keys, an input naming one of this server's files needs the URL a download would: signed, unexpired
            own_file_url_valid=(lambda url: files.file_url_signed(url_signer, url)) if api_keys.enabled else None,
        ),
        api_keys=api_keys,
        url_signer=url_signer,
        webhook_signer=WebhookSigner.load_or_create(keys / "webhook-ed25519.pem"),
        metrics=Metrics(store, settings.job_lease_s),
        submit_limit=open_rate_limiter(settings, "submit", settings.rate_limit_per_s, settings.rate_limit_burst),
        read_limit=open_rate_limiter(settings, "read", settings.read_rate_limit_per_s, settings.read_rate_limit_burst),
        key_read_limit=open_rate_limiter(
            settings, "key-read", settings.key_read_rate_limit_per_s, settings.key_read_rate_limit_burst
        ),
    )


async def _every(seconds: float, work: Callable[[], Awaitable[object]], name: str) -> None:
    while True:
        try:
            await work()
        except Exception:  # a failing loop logs and keeps going: it must never take the server down
            log.exception("%s failed", name)
        await asyncio.sleep(seconds)


def create_app(settings: Settings, *, workers: int | None = None) -> FastAPI:
    """The app for `settings` (whose `public_url` should be set: workers build output URLs from it)."""
    settings = without_plain_keys(settings)  # from here on, only the keys' hashes are kept
    ctx = build_context(settings)
    supervisor = WorkerSupervisor(settings, ctx.store, settings.workers if workers is None else workers, ctx.files)
    dispatcher = WebhookDispatcher(
        ctx.store,
        ctx.webhook_signer,
        user_id=settings.webhook_user_id,
        timeout_s=settings.webhook_timeout_s,
        max_attempts=settings.webhook_max_attempts,
        retry_base_s=settings.webhook_retry_base_s,
        allow_private=settings.allow_private_urls,
        output_urls=lambda output: files.with_file_urls(ctx, output),
    )
    last_sweep = [0.0]
    lease_recovery = LeaseRecovery(
        ctx.store, settings.job_lease_s, settings.job_max_attempts, HOUSEKEEPING_S, files=ctx.files
    )

    async def housekeeping() -> None:
        # store.now() may ask the store (Redis's clock): in the thread too, never on the event loop.
        await asyncio.to_thread(lambda: ctx.store.expire_overdue(ctx.store.now()))
        await asyncio.to_thread(forget_silent_workers, ctx.store, max(20 * settings.job_lease_s, 600.0))
        if time.monotonic() - last_sweep[0] >= settings.file_sweep_s:
            last_sweep[0] = time.monotonic()
            deleted = await asyncio.to_thread(ctx.files.sweep_expired, time.time())
            if deleted:
                log.info("deleted %d expired file(s)", deleted)
            if settings.job_retention_s:
                pruned = await asyncio.to_thread(
                    lambda: ctx.store.prune_completed(ctx.store.now() - settings.job_retention_s)
                )
                if pruned:
                    log.info("deleted %d request(s) past their %.0f s retention", pruned, settings.job_retention_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(remove_stale_temp_dirs)  # uploads a killed API process was staging
        await asyncio.to_thread(supervisor.start)
        async with pinned_async_client(settings.webhook_timeout_s) as client:
            tasks = [
                # A task of its own: the gaps between its passes mean the store's, not a slow file sweep's.
                asyncio.create_task(_every(HOUSEKEEPING_S, lambda: asyncio.to_thread(lease_recovery.run), "leases")),
                asyncio.create_task(_every(HOUSEKEEPING_S, housekeeping, "housekeeping")),
                asyncio.create_task(_every(WEBHOOK_POLL_S, lambda: dispatcher.deliver_due(client), "webhooks")),
            ]
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with suppress(asyncio.CancelledError):
                        await task
                # Together: webhooks in flight finish while the worker finishes or hands back its job.
                await asyncio.gather(dispatcher.close(), asyncio.to_thread(supervisor.stop))
                ctx.store_reads.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="wanserve",
        version=__version__,
        description="Self-hosted Wan 2.2 text-to-video, wire-compatible with fal-ai/wan-22.",
        lifespan=lifespan,
        docs_url=None,  # served by docs_pages, without a CDN
        redoc_url=None,  # see docs_pages
    )
    app.state.context = ctx
    app.state.supervisor = supervisor

    def begin_shutdown() -> None:
        # Runs in a signal handler: is_set() takes no lock, so a second signal inside the first set() cannot hang.
        if not ctx.shutting_down.is_set():
            ctx.shutting_down.set()
            supervisor.begin_shutdown()

    app.state.begin_shutdown = begin_shutdown  # called by `wanserve serve` as soon as a stop signal arrives
    _install_error_handlers(app)
    install_openapi(app)
    for router in (
        health.router,
        docs_pages.router,
        playground.router,
        files.router,
        storage.rest,
        storage.cdn,
        run.router,
        queue.router,
    ):
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        BodyTimeoutMiddleware, idle_s=settings.request_body_idle_timeout_s, min_rate=settings.request_body_min_rate
    )
    app.add_middleware(MetricsMiddleware, metrics=ctx.metrics)
    app.add_middleware(FalProxyMiddleware, public_url=ctx.public_url)
    if not ctx.api_keys.enabled:  # anyone who reaches it may use it: only under its own names (DNS rebinding)
        names = [*settings.allowed_hosts, settings.host, *([settings.public_url] if settings.public_url else [])]
        app.add_middleware(HostCheckMiddleware, allowed=AllowedHosts(names))
    if settings.cors_origins:  # outermost: preflights and every answer, errors included, carry the CORS headers
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE"],
            allow_headers=["*"],  # the requested ones are echoed, Authorization and the x-fal-* headers included
            expose_headers=CORS_EXPOSED_HEADERS,
            max_age=600,
        )
    return app


# What a page may read from answers: the request id (sync runs), error details, upload ETags, rate-limit waits.
CORS_EXPOSED_HEADERS = [
    "x-fal-request-id",
    "x-fal-error-type",
    "x-fal-retryable",
    "x-fal-request-timeout-type",
    "etag",
    "content-range",
    "retry-after",
]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(WanserveError)
    async def wanserve_error(request: Request, exc: WanserveError) -> JSONResponse:
        response = error_response(exc, exc.headers if isinstance(exc, RateLimited) else None)
        if exc.http_status == 413:  # the rest of the body is never read: hang up rather than keep receiving it
            response.headers["connection"] = "close"
        return response

    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422, headers={"x-fal-error-type": "validation_error"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = {404: "not_found", 405: "method_not_allowed", 408: REQUEST_TIMEOUT, 413: PAYLOAD_TOO_LARGE}.get(
            exc.status_code, "bad_request"
        )
        return JSONResponse(
            {"detail": exc.detail, "error_type": error_type},
            status_code=exc.status_code,
            headers={"x-fal-error-type": error_type, **(exc.headers or {})},
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"detail": "Internal server error", "error_type": "internal_error"},
            status_code=500,
            headers={"x-fal-error-type": "internal_error", **_cors_headers(request)},
        )


def _cors_headers(request: Request) -> dict[str, str]:
    """CORS headers for an answer made outside CORSMiddleware: Starlette answers an unhandled error from its
    outermost layer, so without these a page would see a CORS failure instead of the `internal_error` body."""
    origin = request.headers.get("origin")
    allowed = request.app.state.context.settings.cors_origins
    if not origin or not (origin in allowed or "*" in allowed):
        return {}
    return {
        "access-control-allow-origin": "*" if "*" in allowed else origin,
        "access-control-expose-headers": ", ".join(CORS_EXPOSED_HEADERS),
        "vary": "Origin",
    }


class MetricsMiddleware:
    """Counts requests by route template (not by raw path, which would explode label cardinality)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.http_requests.labels(scope["method"], route, str(status[0])).inc()
            self.metrics.http_seconds.labels(scope["method"], route).observe(time.perf_counter() - start)
