"""JSON responses in the shape the fal clients parse: `detail` (+ `error_type`) for every error."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from wanserve.errors import InputValidationError, WanserveError
from wanserve.jobs.service import Reply


def reply_response(reply: Reply) -> JSONResponse:
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


def error_response(exc: WanserveError, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any]
    if isinstance(exc, InputValidationError):
        body = {"detail": exc.errors}
    else:
        body = {"detail": str(exc), "error_type": exc.error_type}
    return JSONResponse(
        body, status_code=exc.http_status, headers={"x-fal-error-type": exc.error_type, **(headers or {})}
    )
