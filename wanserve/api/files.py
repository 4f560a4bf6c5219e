"""Stored files under /files/: public by unguessable URL (as fal's CDN), with HTTP Range for video seeking.
A store that offers a direct URL (S3's presigned GET) gets a redirect there; otherwise the API sends the bytes."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Annotated, BinaryIO

from fastapi import APIRouter, Header, Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from wanserve.api.context import Context
from wanserve.api.responses import error_response
from wanserve.errors import BadRequest, RangeNotSatisfiable
from wanserve.files.base import FileStore, StoredFile, content_disposition

router = APIRouter()


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


def single_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (first, last) byte a valid (see `check_range`) Range header asks for, or None to send the whole
    file: no header, or several ranges (which a server may answer whole)."""
    if header is None or "," in header or size == 0:
        return None
    start, _, end = header.strip()[len("bytes=") :].strip().partition("-")
    if not start:  # `-N`: the last N bytes
        return max(0, size - int(end)), size - 1
    return int(start), (min(int(end), size - 1) if end else size - 1)


@router.api_route("/files/{key:path}", methods=["GET", "HEAD"])
def get_file(ctx: Context, key: str, request: Request, range: Annotated[str | None, Header()] = None) -> Response:
    now = time.time()
    # HEAD is answered here: a presigned URL signs one method (GET), and HEAD moves no bytes anyway.
    direct = ctx.files.download_url(key, now) if request.method == "GET" else None
    if direct is not None:
        # Never cached: the presigned URL behind the stable one expires.
        return RedirectResponse(direct, status_code=307, headers={"Cache-Control": "no-store, private"})
    stored = ctx.files.stat(key, now)
    try:
        check_range(range, stored.size)
    except RangeNotSatisfiable as exc:
        return error_response(exc, {"Content-Range": f"bytes */{stored.size}"})
    # Files share the API's origin here: never let a browser run one as a page.
    headers = {
        "ETag": f'"{stored.etag}"',
        "Cache-Control": "public, max-age=3600",
        "Content-Disposition": content_disposition(stored),
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox; default-src 'none'",
    }
    path = ctx.files.local_path(key)
    if path is not None:
        # FileResponse answers Range requests (206 + Content-Range) and sets Content-Length.
        return FileResponse(path, media_type=stored.content_type, headers=headers)
    return _relay(ctx.files, stored, single_range(range, stored.size), headers, request.method == "HEAD")


def _relay(
    files: FileStore, stored: StoredFile, span: tuple[int, int] | None, headers: dict[str, str], head_only: bool
) -> Response:
    """The bytes of a remote file (or the asked span of them: 206), passed through as they arrive."""
    headers = {**headers, "Accept-Ranges": "bytes", "Content-Length": str(stored.size)}
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{stored.size}"
        headers["Content-Length"] = str(span[1] - span[0] + 1)
    if head_only:
        return Response(status_code=status, media_type=stored.content_type, headers=headers)
    return StreamingResponse(
        _chunks(files.open(stored.key, span)), status_code=status, media_type=stored.content_type, headers=headers
    )


def _chunks(handle: BinaryIO) -> Iterator[bytes]:
    """Closes the source however the response ends (a client that hangs up included): a remote store's
    connection goes back to its pool instead of waiting for the garbage collector."""
    with handle:
        yield from iter(lambda: handle.read(1 << 20), b"")
