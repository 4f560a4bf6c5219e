"""Liveness, readiness (a worker has the model loaded), Prometheus metrics and the webhook JWKS."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from wanserve import __version__
from wanserve.api.context import Context, ServerContext
from wanserve.api.metrics import live_workers
from wanserve.errors import NotFound
from wanserve.jobs.model import WorkerInfo
from wanserve.jobs.service import visible_to

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:  # on the event loop: answers while every worker thread is busy
    return {"status": "ok", "version": __version__}


@router.get("/ready")
def ready(ctx: Context, request: Request, authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
    """200 while some worker can take a job, with how many can. Open to load balancers and probes. `workers` names
    the ready ones and `details` is every live worker as it advertises itself (host, GPUs, model, engine, current
    request, draining): on a server with API keys, both only for a valid key (worker ids carry host names), and the
    current request's id only to the key that submitted it (a request id names its output file), others seeing only
    that the worker is busy. `problems` (when there are any) says why this server's own workers are not running:
    settings that cannot run on this machine, such as a GPU it does not have (tried again every few minutes)."""
    now = ctx.store.now()
    live = live_workers(ctx.store, ctx.settings.job_lease_s)
    ready_ids = [w.id for w in live if w.ready]
    body: dict[str, Any] = {"ready": bool(ready_ids), "ready_workers": len(ready_ids)}
    if problems := request.app.state.supervisor.problems():
        body["problems"] = problems
    caller = ctx.api_keys.identify(authorization) if ctx.api_keys.enabled else None
    if not ctx.api_keys.enabled or caller is not None:
        body["workers"] = ready_ids
        body["details"] = [
            {"id": w.id, "ready": w.ready, "heartbeat_age_s": round(now - w.heartbeat_at, 3), **_shown(ctx, w, caller)}
            for w in live
        ]
    return JSONResponse(body, status_code=200 if ready_ids else 503)


def _shown(ctx: ServerContext, worker: WorkerInfo, caller: str | None) -> dict[str, Any]:
    """The worker's advertised detail as `caller` may see it (None: a server without keys, where everyone may)."""
    detail = dict(worker.detail)
    job_id = detail.get("current_job")
    detail["busy"] = job_id is not None
    if job_id is not None and caller is not None:
        job = ctx.store.get(str(job_id))
        if job is None or not visible_to(job, caller):
            detail["current_job"] = None
    return detail


@router.get("/metrics")
def metrics(ctx: Context, authorization: Annotated[str | None, Header()] = None) -> Response:
    """Prometheus metrics. They name workers and their hosts: on a server with API keys, for a valid key only,
    unless the operator opens them (`metrics_open`)."""
    if not ctx.settings.metrics_open:
        ctx.api_keys.check(authorization)
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# The official clients ask rest.fal.ai/tokens/ (the proxy route's /rest/tokens/) for a short-lived token before a
# realtime connection or a browser's client-mode stream; the queue's catch-all submit route would answer it as an
# unknown endpoint named "rest/tokens/".
@router.post("/rest/tokens/", include_in_schema=False)
@router.post("/rest/tokens", include_in_schema=False)
def temporary_tokens() -> None:
    raise NotFound(
        "temporary tokens are not issued here: Wan 2.2 text-to-video has no realtime endpoint, and streams take "
        "the API key (connectionMode 'server', the default, or a server-side proxy)"
    )


# fal serves it from rest.alpha.fal.ai, which the proxy route maps to /rest.
@router.get("/.well-known/jwks.json")
@router.get("/rest/.well-known/jwks.json", include_in_schema=False)
def jwks(ctx: Context) -> dict[str, Any]:
    return ctx.webhook_signer.jwks()
