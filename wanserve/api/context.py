"""Everything a router needs, built once per app and reached through a FastAPI dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from wanserve.api.metrics import Metrics
from wanserve.api.security import ApiKeys, UrlSigner
from wanserve.config import Settings
from wanserve.files.base import FileStore
from wanserve.jobs.service import JobService
from wanserve.store.base import JobStore
from wanserve.webhooks import WebhookSigner


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


def get_context(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.context
    return ctx


Context = Annotated[ServerContext, Depends(get_context)]


def require_api_key(ctx: Context, authorization: Annotated[str | None, Header()] = None) -> None:
    ctx.api_keys.check(authorization)


Authorized = Depends(require_api_key)
