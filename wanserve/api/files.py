"""Stored files under /files/: public by unguessable URL (as fal's CDN), with HTTP Range for video seeking.
A store that offers a direct URL (S3's presigned GET) gets a redirect there; otherwise the API sends the bytes.

When the server has API keys, a file URL also needs a signature with an expiry (`?exp=...&sig=...`): the URLs this
server hands out (upload answers, and results, whose stored URLs are signed afresh each time they are read) carry
one, so browsers and the fal clients still download them with a plain GET, and a leaked key alone opens nothing."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Annotated, Any, BinaryIO
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from wanserve.api.context import Context, ServerContext
from wanserve.api.responses import error_response, reply_response
from wanserve.api.security import UrlSigner
from wanserve.errors import BadRequest, Forbidden, PreconditionFailed, RangeNotSatisfiable
from wanserve.files.base import (
    PATH_SIGNATURE_MARK,
    FileStore,
    StoredFile,
    content_disposition,
    key_from_file_ref,
    split_path_signature,
)
from wanserve.jobs.service import Reply
from wanserve.numbers import ascii_int

router = APIRouter()


def file_url(ctx: ServerContext, key: str, now: float | None = None) -> str:
    """The URL of a stored file to hand to a client: signed, with an expiry, when the server has API keys."""
    url = ctx.files.url(key)
    if not ctx.api_keys.enabled:
        return url
    return f"{url}?{ctx.url_signer.file_query(key, ctx.settings.file_url_ttl_s, time.time() if now is None else now)}"


def _signed_key(path: str, exp: str | None, sig: str | None) -> tuple[str, str | None, str | None]:
    """(key, expiry, signature) of the path after `/files/`: the signature in the path when it has one there (see
    `path_signed_file_url`), else the query's `exp` and `sig`."""
    key, path_exp, path_sig = split_path_signature(path)
    return (key, path_exp, path_sig) if path_sig is not None else (key, exp, sig)


def file_url_signed(signer: UrlSigner, url: str) -> bool:
    """Whether `url`, a URL of this server's files, carries a valid, unexpired signature (in its query or its
    path), as a download of it would need."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    key, exp, sig = _signed_key(parts.path.split("/files/", 1)[-1], *(query.get(n, [None])[0] for n in ("exp", "sig")))
    return signer.file_signature_valid(key, exp, sig, time.time())


def path_signed_file_url(ctx: ServerContext, key: str) -> str:
    """As `file_url`, with the signature in the path (`/files/~<expiry>.<signature>/<key>`): for a client that
    appends paths to the URL, where a query would end up in the middle."""
    if not ctx.api_keys.enabled:
        return ctx.files.url(key)
    expires, signature = ctx.url_signer.file_signature(key, ctx.settings.file_url_ttl_s, time.time())
    folder = ctx.files.url(key).removesuffix(key)  # `<public URL>/files/`
    return f"{folder}{PATH_SIGNATURE_MARK}{expires}.{signature}/{key}"


def with_file_urls(ctx: ServerContext, value: Any) -> Any:
    """`value` (a request's output) with every `url` field that names one of this server's files made into the URL
    a client downloads it from, now: this server's public URL, and a fresh signature when it has API keys (a stored
    signature would expire). Workers store `files.base.file_ref`s; outputs stored before those, whole URLs under
    this public URL, are made again the same way. Only `url` fields (fal's File objects) are touched: a prompt
    quoting a file URL must not come back changed."""
    now = time.time()

    def walk(item: Any) -> Any:
        if isinstance(item, list):
            return [walk(x) for x in item]
        if not isinstance(item, dict):
            return item
        out = {}
        for name, field in item.items():
            key = _stored_file_key(ctx, field) if name == "url" and isinstance(field, str) else None
            out[name] = file_url(ctx, key, now) if key is not None else walk(field)
        return out

    return walk(value)


def _stored_file_key(ctx: ServerContext, url: str) -> str | None:
    key = key_from_file_ref(url)
    return key if key is not None else ctx.files.key_from_url(url)


def output_reply(ctx: ServerContext, reply: Reply) -> JSONResponse:
    """A result as a response, its file URLs made for the client (see `with_file_urls`)."""
    return reply_response(replace(reply, body=with_file_urls(ctx, reply.body)))


# Offsets of up to 18 digits (a file over an exabyte is not served here): int() of them is safe and fast.
# The unit's name is case-insensitive (RFC 9110 14.1).
_RANGE = re.compile(r"(?i:bytes)=\s*\d{0,18}-\d{0,18}(\s*,\s*\d{0,18}-\d{0,18})*")


def ranges_to_serve(header: str | None, if_range: str | None, etag: str, size: int) -> str | None:
    """The Range header to answer, or None for the whole file: none is sent, or an If-Range does not name this
    version of the file by its ETag (RFC 9110 13.1.5: then the Range is ignored; an If-Range date is taken as not
    matching, which is always safe: the whole file is sent)."""
    if header is None or (if_range is not None and if_range.strip() != etag):
        return None
    if not header.strip().lower().startswith("bytes="):  # RFC 9110 14.2: a range unit we do not know is ignored
        return None
    return satisfiable_ranges(header, size)


def satisfiable_ranges(header: str, size: int) -> str:
    """The Range header with the ranges that name no byte of the file left out (RFC 9110 14.1.1: a set of ranges is
    satisfiable when one of them is, and the others are ignored). Bad ones are answered here, in JSON like every
    other error (the file response would answer them in plain text): 400 when malformed, 416 when no requested byte
    exists."""
    if not _RANGE.fullmatch(header.strip()):
        raise BadRequest(f"malformed Range header: {header[:100]!r}")
    kept = []
    for spec in header.strip()[len("bytes=") :].split(","):
        start, _, end = spec.strip().partition("-")
        if not start and not end:
            raise BadRequest(f"malformed Range header: {header[:100]!r}")
        if start and end and int(end) < int(start):
            raise BadRequest(f"Range ends before it starts: {header[:100]!r}")
        if int(start) < size if start else int(end) > 0 and size > 0:
            kept.append(spec.strip())
    if not kept:
        raise RangeNotSatisfiable(f"no byte of {header[:100]!r} exists in a {size}-byte file")
    return "bytes=" + ",".join(kept)


def precondition_status(if_match: str | None, if_none_match: str | None, etag: str) -> int | None:
    """What the preconditions of a GET or HEAD answer instead of the file (RFC 9110 13.2.2): 412 when If-Match names
    another version (strong comparison), 304 when If-None-Match names this one (weak comparison: a cache that
    stored the file revalidates it without downloading it again). None: send the file."""

    def tags(header: str) -> set[str]:
        return {t.strip() for t in header.split(",") if t.strip()}

    if if_match is not None and not ({"*", etag} & tags(if_match)):
        return 412
    if if_none_match is not None:
        listed = {t.removeprefix("W/") for t in tags(if_none_match)}
        if {"*", etag} & listed:
            return 304
    return None


def single_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (first, last) byte a satisfiable (see `satisfiable_ranges`) Range header asks for, or None to send the whole
    file: no header, or several ranges (which a server may answer whole)."""
    if header is None or "," in header or size == 0:
        return None
    start, _, end = header.strip()[len("bytes=") :].strip().partition("-")
    if not start:  # `-N`: the last N bytes
        return max(0, size - int(end)), size - 1
    return int(start), (min(int(end), size - 1) if end else size - 1)


@router.api_route("/files/{key:path}", methods=["GET", "HEAD"])
def get_file(
    ctx: Context,
    key: str,
    request: Request,
    range: Annotated[str | None, Header()] = None,
    if_range: Annotated[str | None, Header()] = None,
    if_match: Annotated[str | None, Header()] = None,
    if_none_match: Annotated[str | None, Header()] = None,
    exp: Annotated[str | None, Query(description="expiry of a signed URL (servers with API keys)")] = None,
    sig: Annotated[str | None, Query(description="signature of a signed URL (servers with API keys)")] = None,
    download: Annotated[
        bool, Query(description="send it as an attachment, which a browser saves instead of playing")
    ] = False,
) -> Response:
    now = time.time()
    key, exp, sig = _signed_key(key, exp, sig)
    if ctx.api_keys.enabled and not ctx.url_signer.file_signature_valid(key, exp, sig, now):
        # Checked before the file is looked up: the answer says nothing about whether it exists.
        raise Forbidden("this file URL is not signed, or its signature is invalid or expired: read the result again")
    # HEAD is answered here: a presigned URL signs one method (GET), and HEAD moves no bytes anyway.
    direct = ctx.files.download_url(key, now, download) if request.method == "GET" else None
    if direct is not None:
        # Never cached: the presigned URL behind the stable one expires.
        return RedirectResponse(direct, status_code=307, headers={"Cache-Control": "no-store, private"})
    stored = ctx.files.stat(key, now)
    etag = f'"{stored.etag}"'
    # Cached for an hour at most, never past the file's expiry or its signed URL's (a cache would outlive them).
    limits = [3600.0] + [float(t) - now for t in (stored.expires_at, ascii_int(exp)) if t]
    max_age = max(0, int(min(limits)))
    cache_control = f"{'private' if ctx.api_keys.enabled else 'public'}, max-age={max_age}"
    precondition = precondition_status(if_match, if_none_match, etag)
    if precondition == 304:
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": cache_control})
    if precondition == 412:
        return error_response(PreconditionFailed(f"If-Match names another version of {key!r} (now {etag})"))
    try:
        range = ranges_to_serve(range, if_range, etag, stored.size)
    except RangeNotSatisfiable as exc:
        return error_response(exc, {"Content-Range": f"bytes */{stored.size}"})
    # Files share the API's origin here: never let a browser run one as a page. The type is sent as stored (the
    # media_type argument would add a charset to a text/* type that the uploader never declared).
    headers = {
        "Content-Type": stored.content_type,
        "ETag": etag,
        "Cache-Control": cache_control,
        "Content-Disposition": content_disposition(stored, download),
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox; default-src 'none'",
    }
    path = ctx.files.local_path(stored)  # the bytes `stored` describes, even if the key was written again since
    if path is not None:
        # FileResponse answers Range requests (206 + Content-Range) and sets Content-Length. It reads the header from
        # the request, and refuses a whole set for one unsatisfiable range: it gets the satisfiable ones only.
        request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"range"]
        if range is not None:
            request.scope["headers"].append((b"range", range.encode("latin-1")))
        return FileResponse(path, headers=headers)
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
        return Response(status_code=status, headers=headers)
    return StreamingResponse(_chunks(files.open(stored.key, span)), status_code=status, headers=headers)


def _chunks(handle: BinaryIO) -> Iterator[bytes]:
    """Closes the source however the response ends (a client that hangs up included): a remote store's
    connection goes back to its pool instead of waiting for the garbage collector."""
    with handle:
        yield from iter(lambda: handle.read(1 << 20), b"")
