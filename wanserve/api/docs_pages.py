"""`/docs`: Swagger UI for `/openapi.json`, its script and style served from here.

FastAPI's own page loads them from a CDN, unpinned and without integrity hashes: a server on a private network
showed a blank page, and one that reaches the CDN ran whatever it served on a page that takes the API key. The
files come from the `fastapi-offline` package (Swagger UI 5, as distributed). FastAPI's `/redoc` is not served:
ReDoc fetches its logo from its own CDN whatever it is told."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

from wanserve.errors import NotFound

ASSETS_PATH = "/docs/assets"
OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"
# Only these files are served (the package's folder may hold others); they change only with the package's version.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}


def _assets_dir() -> Path:
    spec = find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        raise RuntimeError("the fastapi-offline package is missing: reinstall wanserve (pip install -e .)")
    return Path(spec.origin).parent / "static"


router = APIRouter(include_in_schema=False)


def _root(request: Request) -> str:
    """The path prefix a proxy serves this app under (`--root-path`), as FastAPI's own pages use it."""
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_PATH}",
        swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
    )


@router.get(OAUTH2_REDIRECT_PATH)
def swagger_ui_oauth2_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get(ASSETS_PATH + "/{name}")
def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no documentation file {name}")
    return FileResponse(_assets_dir() / name, media_type=media_type, headers={"cache-control": "public, max-age=86400"})
