"""Stored files under /files/: public by unguessable URL (as fal's CDN), with HTTP Range for video seeking."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response, StreamingResponse

from wanserve.api.context import Context

router = APIRouter()

INLINE_TYPES = {"video", "image", "audio"}


@router.api_route("/files/{key:path}", methods=["GET", "HEAD"])
def get_file(ctx: Context, key: str) -> Response:
    stored = ctx.files.stat(key, time.time())
    # Anyone may upload, and files share the API's origin: never let a browser run one as a page.
    inline = stored.content_type.split("/")[0] in INLINE_TYPES
    headers = {
        "ETag": f'"{stored.etag}"',
        "Cache-Control": "public, max-age=3600",
        "Content-Disposition": f'{"inline" if inline else "attachment"}; filename="{stored.file_name}"',
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox; default-src 'none'",
    }
    path = ctx.files.local_path(key)
    if path is not None:
        # FileResponse answers Range requests (206 + Content-Range) and sets Content-Length.
        return FileResponse(path, media_type=stored.content_type, headers=headers)
    handle = ctx.files.open(key)
    return StreamingResponse(
        iter(lambda: handle.read(1 << 20), b""),
        media_type=stored.content_type,
        headers={**headers, "Content-Length": str(stored.size)},
    )
