"""Liveness, readiness (a worker has the model loaded), Prometheus metrics and the webhook JWKS."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from wanserve import __version__
from wanserve.api.context import Context
from wanserve.api.metrics import ready_workers

router = APIRouter()


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@router.get("/ready")
def ready(ctx: Context) -> JSONResponse:
    workers = ready_workers(ctx.store, ctx.settings.job_lease_s)
    return JSONResponse({"ready": bool(workers), "workers": workers}, status_code=200 if workers else 503)


@router.get("/metrics")
def metrics(ctx: Context) -> Response:
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/.well-known/jwks.json")
def jwks(ctx: Context) -> dict[str, Any]:
    return ctx.webhook_signer.jwks()
