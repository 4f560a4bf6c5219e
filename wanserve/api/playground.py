"""The playground page at `/`: plain HTML/CSS/JS (no build step) whose form is generated in the browser from
the request schema served at `/playground/schema.json`. The page itself needs no key; its API calls carry the
key the user types in, like any client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from wanserve.api.context import Context
from wanserve.errors import NotFound
from wanserve.jobs.endpoints import app_of
from wanserve.schema import WanLoRAT2VRequest

STATIC = Path(__file__).parent / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}

router = APIRouter()


# The page acts with the key typed in (or remembered): another site must not frame it and trick clicks into it.
NO_FRAMING = {"content-security-policy": "frame-ancestors 'none'", "x-frame-options": "DENY"}


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(
        STATIC / "index.html", media_type=MEDIA_TYPES[".html"], headers={"cache-control": "no-cache", **NO_FRAMING}
    )


@router.get("/playground/schema.json", include_in_schema=False)
def schema(ctx: Context) -> dict[str, Any]:
    """The LoRA request's JSON schema (a superset of the plain one), the endpoint the page submits to, and the
    `owner/app` its status, result and cancel URLs live under."""
    endpoint = ctx.settings.app_ids[0].strip("/")
    return {"app": endpoint, "queue_app": app_of(endpoint), "schema": WanLoRAT2VRequest.model_json_schema()}


@router.get("/playground/{name}", include_in_schema=False)
def asset(name: str) -> FileResponse:
    path = STATIC / name
    if "/" in name or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise NotFound(f"no playground file {name}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers={"cache-control": "no-cache"})
