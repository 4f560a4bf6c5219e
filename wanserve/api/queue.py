"""The fal queue protocol at the root: submit, status (+ SSE stream), result, cancel."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from wanserve.api.context import (
    Authorized,
    Caller,
    Context,
    ReadLimited,
    ServerContext,
    SubmitLimited,
    limit_submits,
    read_store,
)
from wanserve.api.files import output_reply
from wanserve.api.limits import read_body
from wanserve.api.responses import reply_response
from wanserve.errors import BadRequest, NotFound
from wanserve.jobs.model import JobState

router = APIRouter(dependencies=[Authorized])

STREAM_POLL_S = 0.2
KEEPALIVE_S = 15.0


def wants_logs(value: str | None) -> bool:
    """JS sends `logs=1|0`, Python `logs=true|false`."""
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


async def read_json(request: Request, max_bytes: int) -> Any:
    raw = await read_body(request, max_bytes)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw, parse_int=_parse_int)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {type(exc).__name__}") from None


def _parse_int(text: str) -> int | float:
    """Python refuses integers over 4,300 digits (a guard against quadratic conversion). Such a number is valid
    JSON and outside every field's range: it becomes an infinity, which validation then refuses (422, naming the
    field) like any other out-of-range value, instead of the body being called malformed."""
    try:
        return int(text)
    except ValueError:
        return float("-inf") if text.startswith("-") else float("inf")


RESERVED_QUERY = {"fal_webhook", "fal_max_queue_length"}


def query_input(request: Request) -> dict[str, Any]:
    """The input of a GET run (the JS client's `method: "get"` puts the input in `URLSearchParams`): values
    arrive as text and the schema converts them ("81" -> 81, "true" -> True)."""
    return {key: value for key, value in request.query_params.items() if key not in RESERVED_QUERY}


async def submit_job(ctx: ServerContext, endpoint: str, request: Request, owner: str | None) -> Any:
    if request.method == "GET":
        # Unused, but read: an oversized one is refused before a job exists.
        await read_body(request, ctx.settings.max_body_bytes)
        body: Any = query_input(request)
    else:
        body = await read_json(request, ctx.settings.max_body_bytes)
    headers = request.headers
    return await run_in_threadpool(
        ctx.service.submit,
        endpoint,
        body,
        priority=headers.get("x-fal-queue-priority"),
        start_timeout=headers.get("x-fal-request-timeout"),
        webhook_url=request.query_params.get("fal_webhook"),
        lifecycle=headers.get("x-fal-object-lifecycle-preference"),
        owner=owner,
        max_queue_length=request.query_params.get("fal_max_queue_length"),
    )


async def status_events(ctx: ServerContext, job_id: str, with_logs: bool) -> AsyncIterator[bytes]:
    """One `data:` event per change, carrying only the log lines that are new since the previous event."""
    last_seq, last_state, last_position, last_sent = 0, None, None, time.monotonic()
    while True:
        job = await read_store(ctx, ctx.store.get, job_id)
        if job is None:
            return
        # A queued status has no logs field: lines written meanwhile (an ignored-fields warning, a hand-back note)
        # go out with the first event that has one, instead of being skipped over.
        with_new_logs = with_logs and job.state is not JobState.QUEUED
        logs = await read_store(ctx, ctx.store.logs, job_id, last_seq) if with_new_logs else None
        body = await read_store(ctx, ctx.service.status_body, job, logs)
        position = body.get("queue_position")
        if job.state != last_state or logs or position != last_position:
            if logs:
                last_seq = logs[-1].seq
            last_state, last_position, last_sent = job.state, position, time.monotonic()
            yield f"data: {json.dumps(body)}\n\n".encode()
            if job.state is JobState.COMPLETED:
                return
        elif time.monotonic() - last_sent > KEEPALIVE_S:
            last_sent = time.monotonic()
            yield b": keep-alive\n\n"
        await asyncio.sleep(STREAM_POLL_S)


@router.get("/{app:path}/requests/{request_id}/status/stream", dependencies=[ReadLimited])
async def status_stream(
    ctx: Context, caller: Caller, app: str, request_id: str, logs: Annotated[str | None, Query()] = None
) -> StreamingResponse:
    job = await read_store(ctx, ctx.service.find, app, request_id, caller)
    return StreamingResponse(
        status_events(ctx, job.id, wants_logs(logs)),
        media_type="text/event-stream",
        headers={"x-fal-request-id": job.id, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


# Status and result only read the store: on the event loop for SQLite, whose readers never wait (read_store).
# Another key's request answers 404, as an unknown one: its existence is not revealed.
@router.get("/{app:path}/requests/{request_id}/status", dependencies=[ReadLimited])
async def status(
    ctx: Context, caller: Caller, app: str, request_id: str, logs: Annotated[str | None, Query()] = None
) -> JSONResponse:
    return reply_response(await read_store(ctx, ctx.service.status, app, request_id, wants_logs(logs), caller))


@router.get(
    "/{app:path}/requests/{request_id}",
    dependencies=[ReadLimited],
    responses={
        400: {"description": "Still queued or running: no result yet."},
        499: {"description": "Cancelled before it completed."},
        504: {"description": "Not started within its start timeout (`x-fal-request-timeout`)."},
    },
)
async def result(ctx: Context, caller: Caller, app: str, request_id: str) -> JSONResponse:
    return output_reply(ctx, await read_store(ctx, ctx.service.result, app, request_id, caller))


@router.put(
    "/{app:path}/requests/{request_id}/cancel",
    dependencies=[ReadLimited],
    status_code=202,
    responses={400: {"description": "The request had already completed (`status: ALREADY_COMPLETED`)."}},
)
def cancel(ctx: Context, caller: Caller, app: str, request_id: str) -> JSONResponse:
    return reply_response(ctx.service.cancel(app, request_id, caller))


@router.post("/{endpoint:path}", status_code=200, dependencies=[SubmitLimited])
async def submit(
    ctx: Context,
    caller: Caller,
    endpoint: str,
    request: Request,
    x_fal_queue_priority: Annotated[str | None, Header(description="normal | low")] = None,
    x_fal_request_timeout: Annotated[str | None, Header(description="start timeout, seconds")] = None,
) -> JSONResponse:
    """Queue a request. The body is the endpoint's input (see the schemas of `fal-ai/wan-22`)."""
    job = await submit_job(ctx, endpoint, request, caller)
    body = await run_in_threadpool(ctx.service.submit_reply, job)
    return JSONResponse(body, headers={"x-fal-request-id": job.id})


@router.get("/{path:path}", include_in_schema=False)
async def get_submit(ctx: Context, caller: Caller, path: str, request: Request) -> JSONResponse:
    """The JS client's `method: "get"` submits with the input as query parameters (FAL_PROTOCOL.md section 4).
    Registered last; any other GET that matches no route is a 404 (not the submit route's 405)."""
    if ctx.service.endpoints.get(path) is None:
        raise NotFound(f"Not Found: GET /{path}")
    await limit_submits(ctx, caller, request)
    return await submit(ctx, caller, path, request)
