"""Synchronous run under /run/ (fal.run): queue the request, wait, answer with the output itself.

The request goes through the same queue as everyone else's (so priorities and the single GPU are
shared fairly). A caller that hangs up cancels its request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import anyio
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from wanserve.api.context import Authorized, Caller, Context, ServerContext, SubmitLimited, read_store
from wanserve.api.files import output_reply, with_file_urls
from wanserve.api.queue import STREAM_POLL_S, status_events, submit_job
from wanserve.jobs.model import CLIENT_RETRIED_STATUSES, Job, JobState
from wanserve.jobs.service import Reply

router = APIRouter(prefix="/run", dependencies=[Authorized])


async def wait_for(ctx: ServerContext, job: Job, request: Request) -> Job | None:
    """The completed job, or None when the caller went away first (the job is then cancelled)."""
    while True:
        current = await read_store(ctx, ctx.store.get, job.id)
        if current is None:
            return None
        if current.state is JobState.COMPLETED:
            return current
        if await request.is_disconnected():
            await run_in_threadpool(ctx.service.cancel, job.app, job.id)
            return None
        await asyncio.sleep(STREAM_POLL_S / 2)


async def stream_run(ctx: ServerContext, job: Job) -> AsyncIterator[bytes]:
    """Progress events (status with the new log lines), then the output (or error body) as the last event.
    A caller that hangs up mid-stream cancels the request, as with the plain run. A stream the server itself cuts
    off as it stops does not: its worker hands the request back to the queue, for the next start."""
    finished = False
    try:
        async for event in status_events(ctx, job.id, with_logs=True):
            yield event
        finished = True
    finally:
        if not finished and not ctx.shutting_down.is_set():
            # The hang-up cancelled this task: only a shielded scope may still await (anyio re-raises).
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(ctx.service.cancel, job.app, job.id)
    done = await read_store(ctx, ctx.store.get, job.id)
    if done is not None:
        reply = ctx.service.result_of(done)
        yield f"data: {json.dumps(with_file_urls(ctx, reply.body))}\n\n".encode()


@router.api_route("/{endpoint:path}", methods=["POST", "GET"], dependencies=[SubmitLimited])
async def run(ctx: Context, caller: Caller, endpoint: str, request: Request) -> Response:
    streaming = endpoint.endswith("/stream") and ctx.service.endpoints.get(endpoint) is None
    job = await submit_job(ctx, endpoint.removesuffix("/stream") if streaming else endpoint, request, caller)
    if streaming:
        return StreamingResponse(
            stream_run(ctx, job), media_type="text/event-stream", headers={"x-fal-request-id": job.id}
        )
    done = await wait_for(ctx, job, request)
    if done is None:
        return JSONResponse({"detail": "client disconnected", "error_type": "client_disconnected"}, status_code=499)
    return output_reply(ctx, not_reposted(ctx.service.result_of(done)))


def not_reposted(reply: Reply) -> Reply:
    """A run's failure in a status the JS client would answer by posting the request again (a new job: a request
    whose worker died every time would run up to three times more) becomes 500; the error type stays. The queue's
    result route keeps the spec's status (`runner_disconnected`: 503): fetching a result again runs nothing. A start
    timeout keeps its 504: with `x-fal-request-timeout-type: user` neither client retries it (FAL_PROTOCOL.md
    section 5), and the JS client's `ApiError.isUserTimeout` reads both."""
    user_timeout = reply.status == 504 and reply.headers.get("x-fal-request-timeout-type") == "user"
    if reply.status in CLIENT_RETRIED_STATUSES and not user_timeout:
        return Reply(500, reply.body, reply.headers)
    return reply
