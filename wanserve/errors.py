"""The error tree. Each error knows the HTTP status and the fal `error_type` it maps to."""

from __future__ import annotations

import sys
from collections.abc import Iterator


class WanserveError(Exception):
    """Base of every error this project raises on purpose."""

    http_status: int = 500
    error_type: str = "internal_error"


class ModelLoadError(WanserveError):
    """A model directory is missing, incomplete or corrupt. The message names the file."""

    http_status = 503
    error_type = "runner_server_error"


class GenerationCancelled(WanserveError):
    """The caller cancelled a generation between two denoising steps."""

    http_status = 499
    error_type = "client_cancelled"


class ClientDisconnected(WanserveError):
    """The client hung up before its request body was read whole (an upload cancelled midway): nobody reads the
    answer, and nothing of the request is kept."""

    http_status = 499
    error_type = "client_disconnected"


class NonFiniteOutput(WanserveError):
    """The denoised latents hold NaN or infinity (a numerical failure of the model, a LoRA or a speed preset): failed
    with a reason instead of delivering the black or noisy video that uint8 frames would silently make of them."""

    http_status = 500
    error_type = "internal_error"


class InvalidGenerationInput(WanserveError):
    """An input the schema admits but the loaded model cannot honour."""

    http_status = 422
    error_type = "bad_request"


class NotFound(WanserveError):
    """An unknown endpoint, request id or route."""

    http_status = 404
    error_type = "not_found"


class BadRequest(WanserveError):
    """A malformed header, query parameter or body outside the request schema."""

    http_status = 400
    error_type = "bad_request"


class StillInProgress(WanserveError):
    """The result of a request that has not completed yet (never a 2xx, so clients do not take it as output)."""

    http_status = 400
    error_type = "bad_request"


class Unauthorized(WanserveError):
    http_status = 401
    error_type = "unauthorized"


class PayloadTooLarge(WanserveError):
    """A request body, upload or upload part over its size limit."""

    http_status = 413
    error_type = "payload_too_large"


class FileNotFound(NotFound):
    """A stored file that does not exist (or has expired)."""

    error_type = "file_not_found"


class InvalidFileKey(BadRequest):
    """A file key from a URL that this server could never have made (so cannot name a stored file)."""


class InvalidUpload(BadRequest):
    """An upload this server refuses: a bad content type, lifecycle, part number or multipart completion."""


class StorageUnavailable(WanserveError):
    """The remote file store (S3) refused or could not be reached: the message names the operation and cause.
    `transient`: worth trying again (unreachable, a 5xx, throttling), unlike a refusal such as AccessDenied or
    NoSuchBucket, which only the operator can fix."""

    http_status = 503
    error_type = "storage_unavailable"

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class StorageFull(WanserveError):
    """No space left where a worker writes (the file store's disk, or its own temp dir): the job fails, the worker
    goes on, and the next job succeeds once space is freed."""

    http_status = 507
    error_type = "storage_full"


class PreconditionFailed(WanserveError):
    """An If-Match header names another version of the file (RFC 9110 13.1.1)."""

    http_status = 412
    error_type = "precondition_failed"


class RangeNotSatisfiable(WanserveError):
    """No byte of the requested HTTP Range exists in the file."""

    http_status = 416
    error_type = "range_not_satisfiable"


class InputFetchError(WanserveError):
    """A URL input could not be read: the message says which URL and why. `answered`: the HTTP status the source
    answered with, when it answered (None: unreachable, too slow, too large, refused here)."""

    http_status = 422
    error_type = "file_download_error"

    def __init__(self, message: str, answered: int | None = None) -> None:
        super().__init__(message)
        self.answered = answered


class PrivateAddress(InputFetchError):
    """The URL points at a private, loopback or link-local address (final: retrying will not help)."""


class InputValidationError(WanserveError):
    """The request body does not match the endpoint's schema: 422 with FastAPI/fal-style `detail` entries."""

    http_status = 422
    error_type = "validation_error"

    def __init__(self, errors: list[dict[str, object]]) -> None:
        self.errors = errors
        fields = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in errors)  # type: ignore[attr-defined]
        super().__init__(f"invalid input: {fields}")


class LoraError(WanserveError):
    """A LoRA that cannot be used: not found, not allowed, not a safetensors file, in no known key format,
    or with shapes that do not fit the model (the message names the first offending key)."""

    http_status = 422
    error_type = "invalid_lora"


class FieldError(WanserveError):
    """An input field that could not be used while running the request (a LoRA path, a file URL): answered
    as a fal/FastAPI-style 422 `detail` entry whose `loc` names the field and whose `type` is the cause's."""

    def __init__(self, loc: tuple[str | int, ...], cause: WanserveError, value: object = None) -> None:
        self.loc = loc
        self.cause = cause
        self.value = value
        # The request's input is what could not be used (a missing file is a bad input here, not a missing route),
        # unless the server itself failed (a storage outage): that keeps its status.
        self.http_status = cause.http_status if cause.http_status >= 500 else 422
        self.error_type = cause.error_type
        super().__init__(f"{'.'.join(str(p) for p in loc)}: {cause}")

    def detail(self) -> dict[str, object]:
        entry: dict[str, object] = {"loc": ["body", *self.loc], "msg": str(self.cause), "type": self.error_type}
        if isinstance(self.value, str):
            entry["input"] = self.value
        return entry


class ContentPolicyViolation(WanserveError):
    """The safety checker flagged the prompt or the generated video. `target` says which, for the result body."""

    http_status = 422
    error_type = "content_policy_violation"

    def __init__(self, target: str, reason: str) -> None:
        self.target = target  # "prompt" or "output"
        self.reason = reason
        super().__init__(f"the {'prompt' if target == 'prompt' else 'generated video'} was flagged: {reason}")

    def detail(self) -> dict[str, object]:
        loc = ["body", "prompt"] if self.target == "prompt" else ["output", "video"]
        return {"loc": loc, "msg": str(self), "type": self.error_type}


class ParallelGroupFailed(WanserveError):
    """A process of a multi-GPU worker died or stopped answering in the middle of a generation: the job fails and
    the worker restarts its whole process group."""

    http_status = 503
    error_type = "runner_server_error"


class Forbidden(WanserveError):
    """A stored file's URL without a valid, unexpired signature (when the server has API keys)."""

    http_status = 403
    error_type = "forbidden"


class RateLimited(WanserveError):
    """One API key sent more requests than its rate allows: answered with a `Retry-After` (whole seconds)."""

    http_status = 429
    error_type = "rate_limited"

    def __init__(self, message: str, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class QueueFull(WanserveError):
    """A submit with `fal_max_queue_length=N` while N or more requests are queued: nothing is created."""

    http_status = 429
    error_type = "queue_full"


class TooManyQueued(WanserveError):
    """A submit while the key already has its maximum of queued requests: nothing is created."""

    http_status = 429
    error_type = "too_many_queued"


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what caused it (or what it was raised while handling), and so on; each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA or another accelerator), older torch's `RuntimeError: CUDA out of
    memory`, or host memory running out, here or behind the exception. Found without importing torch: an
    exception raised by torch means torch is loaded already."""
    torch = sys.modules.get("torch")
    oom_types: tuple[type[BaseException], ...] = (MemoryError,)
    if torch is not None:
        oom_types += tuple(t for t in (getattr(torch, "OutOfMemoryError", None),) if isinstance(t, type))
    for current in exception_chain(exc):
        if isinstance(current, oom_types):
            return True
        if isinstance(current, RuntimeError) and "out of memory" in str(current).lower():
            return True
    return False
