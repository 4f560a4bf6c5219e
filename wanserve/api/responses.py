"""JSON responses in the shape the fal clients parse: `detail` (+ `error_type`) for every error."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse

from wanserve.errors import InputValidationError, WanserveError
from wanserve.jobs.service import Reply

# Why a fal-style `{"status": ...}` error body (cancel's) failed, said as every other error says it.
STATUS_REASONS = {
    "NOT_FOUND": ("request not found", "not_found"),
    "ALREADY_COMPLETED": ("the request has already completed", "bad_request"),
}


def _with_message(body: Any, status: int) -> Any:
    """The JS client's error message is `body.message`, else the status line's reason phrase. 499 (cancelled,
    client gone) has none: uvicorn sends an empty one. There the body's `detail` is repeated as `message`."""
    if status < 400 or _has_reason_phrase(status) or not isinstance(body, dict) or "message" in body:
        return body
    detail = body.get("detail")
    return {**body, "message": detail} if isinstance(detail, str) else body


def _has_reason_phrase(status: int) -> bool:
    try:
        HTTPStatus(status)
    except ValueError:
        return False
    return True


def reply_response(reply: Reply) -> JSONResponse:
    body, headers = reply.body, reply.headers
    if reply.status >= 400 and isinstance(body, dict) and not (body.get("detail") or body.get("error_type")):
        # Keeps the fal fields (`status`) and adds the `detail` and `error_type` the clients show.
        detail, error_type = STATUS_REASONS.get(str(body.get("status")), (f"HTTP {reply.status}", "bad_request"))
        body = {**body, "detail": detail, "error_type": error_type}
        headers = {"x-fal-error-type": error_type, **headers}
    return JSONResponse(_with_message(body, reply.status), status_code=reply.status, headers=headers)


def error_response(exc: WanserveError, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any]
    if isinstance(exc, InputValidationError):
        body = {"detail": exc.errors}
    else:
        body = {"detail": str(exc), "error_type": exc.error_type}
    return JSONResponse(
        _with_message(body, exc.http_status),
        status_code=exc.http_status,
        headers={"x-fal-error-type": exc.error_type, **(headers or {})},
    )
