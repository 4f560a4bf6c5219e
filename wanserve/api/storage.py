"""Uploads, as both official clients perform them.

- REST flow (JS `fal.storage.upload`, Python's `fal` repository): POST /rest/storage/upload/initiate
  answers a signed `upload_url` (a plain PUT, no Authorization needed) and the final `file_url`.
- CDN flow (Python's default `fal_v3`): POST /rest/storage/auth/token gives a short-lived bearer
  token, then POST /cdn/files/upload carries the bytes.
- Multipart for both: JS PUTs `{upload_url}/{n}` and POSTs `{upload_url}/complete`; Python POSTs
  /cdn/files/upload/multipart, PUTs `{access_url}/multipart/{id}/{n}` and POSTs `.../complete`.

Ownership: an upload belongs to the key that started it. The REST flow's signed URLs are its proof (only that key
was given them); the CDN flow's upload id carries a MAC of its file and owner, so another key's token cannot add
parts to it or complete it. File URLs in the answers are signed when the server has keys (see wanserve.api.files),
the CDN multipart `access_url` among them: the Python client appends paths to it, and then returns it as the file's URL,
so its signature is in its path (`/files/~<expiry>.<signature>/<key>`).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator
from starlette.requests import ClientDisconnect

from wanserve.api.context import (
    Authorized,
    Caller,
    Context,
    ServerContext,
    SubmitLimited,
    check_cross_site,
    check_submit_rate,
)
from wanserve.api.files import file_url, path_signed_file_url
from wanserve.errors import ClientDisconnected, InvalidUpload, NotFound, PayloadTooLarge, Unauthorized
from wanserve.files.base import (
    StoredFile,
    check_content_type,
    lifecycle_expiry,
    new_key,
    parse_lifecycle_header,
    split_path_signature,
)
from wanserve.files.space import check_room, is_disk_full, upload_disk_full
from wanserve.jobs.service import iso_time
from wanserve.numbers import ascii_int
from wanserve.tempdirs import process_temp_dir

UPLOAD_URL_TTL_S = 3600
CDN_TOKEN_TTL_S = 3600

rest = APIRouter(prefix="/rest/storage")
cdn = APIRouter()


class InitiateUpload(BaseModel):
    content_type: str = Field("application/octet-stream", max_length=255)
    file_name: str | None = Field(None, max_length=1024)

    @field_validator("content_type")
    @classmethod
    def _mime(cls, value: str) -> str:
        return check_content_type(value)


class Part(BaseModel):
    partNumber: int = Field(ge=1, le=10_000)
    etag: str = ""


class CompleteMultipart(BaseModel):
    parts: list[Part]


def _lifecycle_seconds(*headers: str | None) -> str:
    """The expiry requested by an object lifecycle header, as a string for signing ("" = never)."""
    for header in headers:
        preference = parse_lifecycle_header(header)
        expiry = lifecycle_expiry(preference, 0.0)
        if expiry is not None:
            return str(math.ceil(expiry))  # whole seconds, never rounded down to "already expired"
    return ""


def _expiry(lifecycle_s: str, now: float) -> float | None:
    return now + int(lifecycle_s) if lifecycle_s else None


def requested_lifetime(
    x_fal_object_lifecycle: Annotated[str | None, Header()] = None,
    x_fal_object_lifecycle_preference: Annotated[str | None, Header()] = None,
) -> str:
    """Dependency: the lifetime the upload's lifecycle headers ask for (the JS and Python clients differ)."""
    return _lifecycle_seconds(x_fal_object_lifecycle, x_fal_object_lifecycle_preference)


Lifetime = Annotated[str, Depends(requested_lifetime)]


ROOM_CHECK_EVERY = 64 * 1024**2  # a body without Content-Length is checked against the disk reserve this often


@contextmanager
def _disk_full_is_507() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise upload_disk_full(exc) from exc
        raise


async def _receive_to_file(
    request: Request, ctx: ServerContext, limit: int | None = None, what: str = "upload"
) -> Path:
    """The request body in a temporary file on the file store's disk (or the temp dir), refusing anything over
    `limit` (default: the upload limit), or that would leave less than the disk reserve free, while it streams."""
    limit = ctx.settings.max_upload_bytes if limit is None else limit
    reserve = ctx.settings.upload_disk_reserve_bytes
    declared = ascii_int(request.headers.get("content-length"))
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"{what} of {declared} bytes is over the {limit}-byte limit")
    # A remote store's uploads stage in this process's own temp folder: what a killed process left there is
    # removed by the next one to start (tempdirs.remove_stale_temp_dirs).
    staging = ctx.files.staging_dir() or process_temp_dir("uploads")
    check_room(staging, declared or 0, reserve)
    with _disk_full_is_507():  # no inode left: the file cannot even be created
        fd, name = tempfile.mkstemp(prefix="upload-", dir=staging)
    size, checked = 0, 0
    try:
        with _disk_full_is_507(), os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"{what} is over the {limit}-byte limit")
                if size - checked >= ROOM_CHECK_EVERY:
                    check_room(staging, 0, reserve)
                    checked = size
                out.write(chunk)
    except BaseException as exc:
        Path(name).unlink(missing_ok=True)
        if isinstance(exc, ClientDisconnect):  # nobody to answer: not an error of this server's
            raise ClientDisconnected(f"the client hung up during the {what}, after {size} bytes") from None
        raise
    return Path(name)


async def _store_body(request: Request, ctx: ServerContext, key: str, content_type: str, expires: float | None) -> Any:
    tmp = await _receive_to_file(request, ctx)
    try:
        with _disk_full_is_507():
            return await run_in_threadpool(ctx.files.put, key, tmp, content_type, expires, time.time())
    finally:
        tmp.unlink(missing_ok=True)


def _check_cdn_auth(ctx: ServerContext, authorization: str | None) -> str | None:
    """CDN routes take the bearer token from /rest/storage/auth/token, or an API key: the caller's key id (None when
    the server has no keys)."""
    if not ctx.api_keys.enabled:
        return None
    scheme, _, credential = (authorization or "").partition(" ")
    owner = ctx.url_signer.token_owner(credential.strip()) if scheme.lower() == "bearer" else None
    if owner and owner in ctx.api_keys.ids:  # a token outlives nothing: a key removed since has no tokens left
        return owner
    owner = ctx.api_keys.identify(authorization)
    if owner is not None:
        return owner
    raise Unauthorized("Missing or expired upload token")


def _bound_upload(ctx: ServerContext, handed_out: str, key: str, owner: str | None) -> str:
    """The store's upload id behind a CDN upload id, if it was made for this file and caller; else not found (as
    an unknown one: another key's upload is not revealed)."""
    upload_id = ctx.url_signer.bound_upload(handed_out, key, owner or "")
    if upload_id is None:
        raise NotFound(f"no such multipart upload: {handed_out[:100]!r}")
    return upload_id


# --- REST: initiate + signed PUT ---
@rest.post("/upload/initiate", dependencies=[Authorized, SubmitLimited])
def initiate(ctx: Context, body: InitiateUpload, life: Lifetime) -> dict[str, str]:
    key = new_key(body.file_name, "upload.bin")
    exp = str(int(time.time() + UPLOAD_URL_TTL_S))
    sig = ctx.url_signer.sign("put", key, body.content_type, life, exp)
    query = urlencode({"content_type": body.content_type, "life": life, "exp": exp, "sig": sig})
    return {"upload_url": f"{ctx.public_url}/rest/storage/upload/put/{key}?{query}", "file_url": file_url(ctx, key)}


@rest.put("/upload/put/{key:path}")
async def put_upload(
    ctx: Context,
    key: str,
    request: Request,
    content_type: Annotated[str, Query()],
    exp: Annotated[str, Query()],
    sig: Annotated[str, Query()],
    life: Annotated[str, Query()] = "",
) -> JSONResponse:
    if not ctx.url_signer.verify(sig, "put", key, content_type, life, exp) or int(exp or 0) < time.time():
        raise Unauthorized("upload URL signature is invalid or expired")
    stored = await _store_body(request, ctx, key, content_type, _expiry(life, time.time()))
    return JSONResponse({"file_url": file_url(ctx, key), "file_size": stored.size})


@rest.post("/upload/initiate-multipart", dependencies=[Authorized, SubmitLimited])
def initiate_multipart(ctx: Context, body: InitiateUpload, life: Lifetime) -> dict[str, str]:
    key = new_key(body.file_name, "upload.bin")
    upload_id = _create_multipart(ctx, key, body.content_type, _expiry(life, time.time()))
    exp = str(int(time.time() + UPLOAD_URL_TTL_S))
    query = urlencode({"exp": exp, "sig": ctx.url_signer.sign("multipart", upload_id, exp)})
    return {
        "upload_url": f"{ctx.public_url}/rest/storage/upload/multipart/{upload_id}?{query}",
        "file_url": file_url(ctx, key),
    }


def _create_multipart(ctx: ServerContext, key: str, content_type: str, expires_at: float | None) -> str:
    with _disk_full_is_507():
        return ctx.files.create_multipart(key, content_type, expires_at)


def _check_multipart_sig(ctx: ServerContext, upload_id: str, exp: str, sig: str) -> None:
    if not ctx.url_signer.verify(sig, "multipart", upload_id, exp) or int(exp or 0) < time.time():
        raise Unauthorized("multipart upload URL signature is invalid or expired")


def _complete(ctx: ServerContext, upload_id: str, body: CompleteMultipart) -> StoredFile:
    with _disk_full_is_507():
        stored = ctx.files.complete_multipart(upload_id, [(p.partNumber, p.etag) for p in body.parts], time.time())
    if stored.size > ctx.settings.max_upload_bytes:
        ctx.files.delete(stored.key)
        raise PayloadTooLarge(f"the upload is over the {ctx.settings.max_upload_bytes}-byte limit")
    return stored


@rest.post("/upload/multipart/{upload_id}/complete")
def complete_multipart_rest(
    ctx: Context, upload_id: str, body: CompleteMultipart, exp: str = "", sig: str = ""
) -> dict[str, Any]:
    _check_multipart_sig(ctx, upload_id, exp, sig)
    stored = _complete(ctx, upload_id, body)
    return {"file_url": file_url(ctx, stored.key), "file_size": stored.size}


@rest.put("/upload/multipart/{upload_id}/{part_number}")
async def put_part_rest(
    ctx: Context, upload_id: str, part_number: int, request: Request, exp: str = "", sig: str = ""
) -> JSONResponse:
    _check_multipart_sig(ctx, upload_id, exp, sig)
    etag = await _put_part(ctx, upload_id, part_number, request)
    return JSONResponse({"partNumber": part_number, "etag": etag}, headers={"ETag": f'"{etag}"'})


MAX_PART_BYTES = 100 * 1024 * 1024  # both clients send 10 MiB parts


async def _put_part(ctx: ServerContext, upload_id: str, part_number: int, request: Request) -> str:
    # Staged on disk as it streams in, like a whole upload: parts in flight never sit in memory.
    tmp = await _receive_to_file(request, ctx, min(MAX_PART_BYTES, ctx.settings.max_upload_bytes), "a multipart part")
    try:
        with _disk_full_is_507():
            return await run_in_threadpool(
                ctx.files.put_part, upload_id, part_number, tmp, ctx.settings.max_upload_bytes
            )
    finally:
        tmp.unlink(missing_ok=True)


# --- CDN token + direct upload (Python's fal_v3 repository) ---
@rest.post("/auth/token", dependencies=[Authorized, SubmitLimited])
def cdn_token(ctx: Context, caller: Caller) -> dict[str, str]:
    token, expires = ctx.url_signer.token(CDN_TOKEN_TTL_S, caller or "")
    return {
        "token": token,
        "token_type": "Bearer",
        "base_url": f"{ctx.public_url}/cdn",
        # The Python client compares this with an aware datetime: it must carry a UTC offset.
        "expires_at": iso_time(expires).replace("Z", "+00:00"),
    }


@dataclass(frozen=True)
class CdnUpload:
    """What the CDN upload headers say about a new file, once its token (or key) is checked."""

    key: str
    content_type: str
    expires_at: float | None
    owner: str | None  # the uploading key's id (None when the server has no keys)


def cdn_upload_headers(
    ctx: Context,
    life: Lifetime,
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    content_type: Annotated[str, Header()] = "application/octet-stream",
    x_fal_file_name: Annotated[str | None, Header()] = None,
) -> CdnUpload:
    owner = _check_cdn_auth(ctx, authorization)
    check_cross_site(ctx, owner, request)
    check_submit_rate(ctx, owner)
    return CdnUpload(
        new_key(x_fal_file_name, "upload.bin"), check_content_type(content_type), _expiry(life, time.time()), owner
    )


NewCdnUpload = Annotated[CdnUpload, Depends(cdn_upload_headers)]


@cdn.post("/cdn/files/upload")
async def cdn_upload(ctx: Context, request: Request, upload: NewCdnUpload) -> dict[str, Any]:
    stored = await _store_body(request, ctx, upload.key, upload.content_type, upload.expires_at)
    return {"access_url": file_url(ctx, upload.key), "file_size": stored.size}


@cdn.post("/cdn/files/upload/multipart")
def cdn_multipart(ctx: Context, upload: NewCdnUpload) -> dict[str, str]:
    upload_id = _create_multipart(ctx, upload.key, upload.content_type, upload.expires_at)
    # Signed in its path: the client appends `/multipart/...` to it (a query would end up in the middle), and then
    # returns it as the uploaded file's URL, which must download like any other.
    return {
        "access_url": path_signed_file_url(ctx, upload.key),
        "uploadId": ctx.url_signer.bind_upload(upload_id, upload.key, upload.owner or ""),
    }


@cdn.put("/files/{key:path}/multipart/{upload_id}/{part_number}")
async def cdn_put_part(
    ctx: Context,
    key: str,
    upload_id: str,
    part_number: int,
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    upload_id = _bound_upload(ctx, upload_id, split_path_signature(key)[0], _check_cdn_auth(ctx, authorization))
    etag = await _put_part(ctx, upload_id, part_number, request)
    return JSONResponse({"partNumber": part_number, "etag": etag}, headers={"ETag": f'"{etag}"'})


@cdn.post("/files/{key:path}/multipart/{upload_id}/complete")
def cdn_complete(
    ctx: Context,
    key: str,
    upload_id: str,
    body: CompleteMultipart,
    authorization: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    key = split_path_signature(key)[0]  # the access_url fal-client appends to is signed in its path
    stored = _complete(ctx, _bound_upload(ctx, upload_id, key, _check_cdn_auth(ctx, authorization)), body)
    if stored.key != key:  # cannot happen with a bound upload id; kept as the last line of defence
        raise InvalidUpload("the multipart upload belongs to another file")
    return {"access_url": file_url(ctx, stored.key), "file_size": stored.size}
