"""Stored files under /files/: public by unguessable URL (as fal's CDN), with HTTP Range for video seeking."""

from __future__ import annotations

import re
import time
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import FileResponse, Response, StreamingResponse

from wanserve.api.context import Context
from wanserve.api.responses import error_response
from wanserve.errors import BadRequest, RangeNotSatisfiable

router = APIRouter()

INLINE_TYPES = {"video", "image", "audio"}


_RANGE = re.compile(r"bytes=\s*\d*-\d*(\s*,\s*\d*-\d*)*")


def check_range(header: str | None, size: int) -> None:
    """Answers bad Range headers here, in JSON like every other error (the file response would answer them
    in plain text): 400 when malformed, 416 when no requested byte exists."""
    if header is None:
        return
    if not _RANGE.fullmatch(header.strip()):
        raise BadRequest(f"malformed Range header: {header[:100]!r}")
    satisfiable = False
    for spec in header.strip()[len("bytes=") :].split(","):
        start, _, end = spec.strip().partition("-")
        if not start and not end:
            raise BadRequest(f"malformed Range header: {header[:100]!r}")
        if start and end and int(end) < int(start):
            raise BadRequest(f"Range ends before it starts: {header[:100]!r}")
        satisfiable |= int(start) < size if start else int(end) > 0
    if not satisfiable:
        raise RangeNotSatisfiable(f"no byte of {header[:100]!r} exists in a {size}-byte file")


@router.api_route("/files/{key:path}", methods=["GET", "HEAD"])
def get_file(ctx: Context, key: str, range: Annotated[str | None, Header()] = None) -> Response:
    stored = ctx.files.stat(key, time.time())
    try:
        check_range(range, stored.size)
    except RangeNotSatisfiable as exc:
        return error_response(exc, {"Content-Range": f"bytes */{stored.size}"})
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
