"""A job's state machine and the records the job store keeps.

States follow the fal queue: IN_QUEUE -> IN_PROGRESS -> COMPLETED. A failed or cancelled job is
COMPLETED with a `Failure`; there is no other terminal state on the wire.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from enum import IntEnum, StrEnum
from typing import Any


class JobState(StrEnum):
    QUEUED = "IN_QUEUE"
    RUNNING = "IN_PROGRESS"
    COMPLETED = "COMPLETED"


class Priority(IntEnum):
    """Lower value runs first. fal's `x-fal-queue-priority` header has `normal` and `low`."""

    NORMAL = 0
    LOW = 1

    @classmethod
    def parse(cls, header: str | None) -> Priority:
        return cls.LOW if (header or "").strip().lower() == "low" else cls.NORMAL


class LogLevel(StrEnum):
    INFO = "INFO"
    WARN = "WARN"
    ERROR = "ERROR"
    DEBUG = "DEBUG"


@dataclass(frozen=True)
class Failure:
    """Why a job did not produce an output: the fal error type, the HTTP status its result answers with,
    a human message and the exact body the result endpoint returns."""

    error_type: str
    message: str
    http_status: int
    body: dict[str, Any] | None = None

    def result_body(self) -> dict[str, Any]:
        return self.body if self.body is not None else {"detail": self.message, "error_type": self.error_type}

    def log_line(self) -> tuple[LogLevel, str]:
        """The log line a job gets when it completes with this failure (in the same write as the completion)."""
        level = LogLevel.INFO if self.error_type == "client_cancelled" else LogLevel.ERROR
        return level, f"{self.message} ({self.error_type})"

    def to_json(self) -> str:
        return json.dumps(
            {"error_type": self.error_type, "message": self.message, "http_status": self.http_status, "body": self.body}
        )

    @classmethod
    def from_json(cls, text: str) -> Failure:
        data = json.loads(text)
        return cls(data["error_type"], data["message"], int(data["http_status"]), data.get("body"))


# The failures the queue itself produces (the worker adds the engine's own from wanserve.errors).
def cancelled_failure() -> Failure:
    return Failure("client_cancelled", "Request was cancelled", 499)


# Statuses the official JS client answers by posting the whole request again, up to 3 times (FAL_PROTOCOL.md
# section 5). A job that ran and failed is not helped by running it again, so a worker never settles a job with one
# (`settled`). `runner_disconnected` (503, from the queue, not a worker) keeps the status the spec gives it.
CLIENT_RETRIED_STATUSES = frozenset({429, 502, 503, 504})


def settled(failure: Failure) -> Failure:
    """`failure` as a worker stores it: a status the clients would retry becomes 500 (the error type stays)."""
    if failure.http_status in CLIENT_RETRIED_STATUSES:
        return replace(failure, http_status=500)
    return failure


def start_timeout_failure(seconds: float) -> Failure:
    return Failure("request_timeout", f"Request did not start within its {seconds:g} s start timeout", 504)


def disconnected_failure(attempts: int) -> Failure:
    return Failure(
        "runner_disconnected", f"The worker running this request stopped unexpectedly ({attempts} attempts)", 503
    )


@dataclass(frozen=True)
class NewJob:
    """What the API knows at submit time."""

    id: str
    endpoint: str  # full endpoint id, e.g. `fal-ai/wan-22/lora`
    app: str  # `owner/app` (namespace included), what status/result/cancel URLs carry
    input: dict[str, Any]
    priority: Priority = Priority.NORMAL
    start_timeout_s: float | None = None
    webhook_url: str | None = None
    output_lifecycle: dict[str, Any] | None = None
    owner: str | None = None  # the public id of the API key that submitted it (None: the server has no keys)


@dataclass
class Job:
    id: str
    endpoint: str
    app: str
    input: dict[str, Any]
    priority: Priority
    state: JobState
    seq: int
    created_at: float
    start_deadline: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    worker_id: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False
    output: dict[str, Any] | None = None
    failure: Failure | None = None
    inference_time: float | None = None
    webhook_url: str | None = None
    output_lifecycle: dict[str, Any] | None = None
    owner: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.state is JobState.COMPLETED and self.failure is None


@dataclass(frozen=True)
class LogEntry:
    seq: int
    timestamp: float
    level: LogLevel
    message: str


class CancelOutcome(StrEnum):
    CANCELLED = "CANCELLED"  # was queued: it ended at once
    REQUESTED = "CANCELLATION_REQUESTED"  # is running: stops at the next denoising step
    ALREADY_COMPLETED = "ALREADY_COMPLETED"
    NOT_FOUND = "NOT_FOUND"


@dataclass(frozen=True)
class Webhook:
    id: int
    job_id: str
    url: str
    attempts: int
    next_attempt_at: float


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    ready: bool
    heartbeat_at: float
    detail: dict[str, Any] = field(default_factory=dict)
