"""What the HTTP routers call: submit, status, result, cancel. No HTTP here, only the queue's rules."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from wanserve.errors import (
    BadRequest,
    InputFetchError,
    InputValidationError,
    NotFound,
    PrivateAddress,
    QueueFull,
    StillInProgress,
    TooManyQueued,
)
from wanserve.files.base import FileStore, delete_outputs, lifecycle_expiry, parse_lifecycle_header
from wanserve.files.inputs import HostNotResolved, check_public_url, submit_lookup_deadline
from wanserve.jobs.endpoints import EndpointRegistry
from wanserve.jobs.limits import check_input_limits
from wanserve.jobs.model import (
    CancelOutcome,
    Job,
    JobState,
    LogEntry,
    LogLevel,
    NewJob,
    Priority,
    cancelled_failure,
    disconnected_failure,
)
from wanserve.lora.sources import check_lora_urls
from wanserve.numbers import ascii_int
from wanserve.schema import unknown_fields
from wanserve.store.base import JobStore

log = logging.getLogger(__name__)

# A webhook URL longer than this is refused at submit (it is stored with the job and sent at every try).
MAX_WEBHOOK_URL = 8192
# Validation errors reported for one input: a list of a million bad entries gets this many, not a million.
MAX_REPORTED_ERRORS = 50


def iso_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def log_json(entry: LogEntry) -> dict[str, Any]:
    return {
        "message": entry.message,
        "level": entry.level.value,
        "source": "USER",
        "timestamp": iso_time(entry.timestamp),
    }


def _json_safe(value: Any) -> bool:
    """Whether a value echoed back in an error can be written as strict JSON (no NaN, no lone surrogates)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return len(value) <= 1000
    return isinstance(value, int | bool) or value is None


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic errors in the shape fal and FastAPI answer with: `loc` starts at `body`. The offending input
    is echoed only when it is plain JSON (a NaN or a broken string would make the error itself fail)."""
    out = []
    for err in exc.errors(include_url=False)[:MAX_REPORTED_ERRORS]:
        loc = [part if _json_safe(part) else "?" for part in err["loc"]]
        entry: dict[str, Any] = {"loc": ["body", *loc], "msg": err["msg"], "type": err["type"]}
        if "ctx" in err:
            entry["ctx"] = {k: v if _json_safe(v) else str(v) for k, v in err["ctx"].items()}
        if "input" in err and _json_safe(err["input"]):
            entry["input"] = err["input"]
        out.append(entry)
    return out


def parse_start_timeout(header: str | None) -> float | None:
    if header is None or header.strip() == "":
        return None
    try:
        seconds = float(header)
    except ValueError:
        raise BadRequest(f"x-fal-request-timeout must be a number of seconds, got {header!r}") from None
    if not seconds > 1 or seconds != seconds or seconds == float("inf"):
        raise BadRequest(f"x-fal-request-timeout must be more than 1 second, got {header!r}")
    return seconds


@dataclass(frozen=True)
class Reply:
    """An HTTP answer without HTTP: status code, JSON body, extra headers."""

    status: int
    body: Any
    headers: dict[str, str]


class JobService:
    def __init__(
        self,
        store: JobStore,
        endpoints: EndpointRegistry,
        public_url: str,
        allow_private_urls: bool = False,
        max_loras: int = 8,
        max_queued_per_key: int = 0,
        own_file_url_valid: Callable[[str], bool] | None = None,
    ) -> None:
        """`own_file_url_valid`: whether an input URL naming one of this server's files may be read (None: any)."""
        self.own_file_url_valid = own_file_url_valid
        self.max_queued_per_key = max_queued_per_key  # 0: no limit
        self.allow_private_urls = allow_private_urls
        self.max_loras = max_loras
        self.store = store
        self.endpoints = endpoints
        self.public_url = public_url.rstrip("/")

    # --- URLs, as the Python client takes them from submit and status ---
    def urls(self, job: Job) -> dict[str, str]:
        base = f"{self.public_url}/{job.app}/requests/{job.id}"
        return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}

    # --- submit ---
    def submit(
        self,
        endpoint_id: str,
        body: Any,
        *,
        priority: str | None = None,
        start_timeout: str | None = None,
        webhook_url: str | None = None,
        lifecycle: str | None = None,
        owner: str | None = None,
        max_queue_length: str | None = None,
    ) -> Job:
        """Queues a request for `owner` (the caller's key id; None when the server has no keys). With
        `max_queue_length` (fal's `fal_max_queue_length` query parameter), only while fewer requests are queued."""
        endpoint = self.endpoints.get(endpoint_id)
        if endpoint is None:
            raise NotFound(f"unknown endpoint: {endpoint_id}; this server serves {', '.join(self.endpoints.ids)}")
        if not isinstance(body, dict):
            raise InputValidationError(
                [{"loc": ["body"], "msg": "the input must be a JSON object", "type": "model_attributes_type"}]
            )
        # Counted before the entries are validated: each of a long list's entries costs a validation and an error.
        if "loras" in endpoint.request_model.model_fields:
            self._check_lora_count(body.get("loras"))
        try:
            request = endpoint.request_model.model_validate(body)
        except ValidationError as exc:
            raise InputValidationError(validation_errors(exc)) from None
        loras = getattr(request, "loras", None) or []
        check_input_limits(request, endpoint.limits)
        lookups = submit_lookup_deadline()  # one budget for all of this request's name lookups
        check_lora_urls(  # before a job exists
            loras, self.public_url, self.allow_private_urls, lookups, own_file_url_valid=self.own_file_url_valid
        )
        if webhook_url is not None:
            self._check_webhook_url(webhook_url, lookups)
        output_lifecycle = parse_lifecycle_header(lifecycle)
        lifecycle_expiry(output_lifecycle, 0.0)  # validates it now rather than after the generation
        self._check_queued(owner)
        self._check_queue_length(max_queue_length)
        now = self.store.now()
        job = self.store.submit(
            NewJob(
                id=str(uuid.uuid4()),
                endpoint=endpoint.id,
                app=endpoint.app,
                input=request.model_dump(mode="json", exclude_unset=True),
                priority=Priority.parse(priority),
                start_timeout_s=parse_start_timeout(start_timeout),
                webhook_url=webhook_url,
                output_lifecycle=output_lifecycle,
                owner=owner,
            ),
            now,
        )
        unknown = unknown_fields(endpoint.request_model, body)
        if unknown:
            names = ", ".join(name.encode("utf-8", "backslashreplace").decode()[:100] for name in unknown)
            self.store.add_log(job.id, LogLevel.WARN, f"Ignored unknown input fields: {names}", now)
        return job

    def _check_lora_count(self, loras: object) -> None:
        if isinstance(loras, list) and len(loras) > self.max_loras:
            raise InputValidationError(
                [
                    {
                        "loc": ["body", "loras"],
                        "msg": f"at most {self.max_loras} LoRAs per request on this server, got {len(loras)}",
                        "type": "too_long",
                        "ctx": {"max_length": self.max_loras},
                    }
                ]
            )

    def _check_queued(self, owner: str | None) -> None:
        """Refuses a key's submit while it has `max_queued_per_key` requests queued. Counted before the job is
        stored, so submits racing each other may overshoot by how many arrive at once (the rate limit bounds it)."""
        if owner is None or not self.max_queued_per_key:
            return
        if self.store.queued_count(owner) >= self.max_queued_per_key:
            raise TooManyQueued(
                f"This API key already has {self.max_queued_per_key} requests queued: wait for some to start"
            )

    def _check_queue_length(self, text: str | None) -> None:
        """The caller's cap on the queue it joins (all requests queued on this server, every key's): counted before
        the job is stored, like `_check_queued`."""
        if text is None:
            return
        limit = ascii_int(text.strip())
        if limit is None or len(text.strip()) > 9:
            raise BadRequest(f"fal_max_queue_length must be a whole number of requests, got {text[:30]!r}")
        if (queued := self.store.queued_count()) >= limit:
            raise QueueFull(f"{queued} requests are queued, and fal_max_queue_length is {limit}: not queued")

    def _check_webhook_url(self, url: str, lookup_deadline: float) -> None:
        if not url.startswith(("http://", "https://")):
            raise BadRequest(f"fal_webhook must be an http(s) URL, got {url[:200]!r}")
        # A URL has no blank or control character (a percent-encoded one arrives decoded): refused rather than
        # stored, since urlsplit drops some silently and the raw text would reach the delivery logs.
        if any(char <= " " or "\x7f" <= char <= "\x9f" for char in url):
            raise BadRequest(f"fal_webhook has a blank or control character: {url[:200]!r}")
        if len(url) > MAX_WEBHOOK_URL:
            raise BadRequest(f"fal_webhook is longer than {MAX_WEBHOOK_URL} characters")
        if not self.allow_private_urls:
            try:
                check_public_url(url, lookup_deadline)
            except HostNotResolved:
                pass  # DNS may answer by delivery time, which checks again (and retries, as for any failed try)
            except PrivateAddress as exc:
                raise BadRequest(f"fal_webhook is refused: {exc} (the operator can allow private URLs)") from None
            except InputFetchError as exc:
                raise BadRequest(f"fal_webhook is refused: {exc}") from None

    def submit_reply(self, job: Job) -> dict[str, Any]:
        return {
            "status": JobState.QUEUED.value,
            "request_id": job.id,
            "gateway_request_id": job.id,
            **self.urls(job),
            "queue_position": self.store.queue_position(job),
        }

    # --- status ---
    def find(self, app: str, job_id: str, owner: str | None = None) -> Job:
        """The job, if `owner` may see it: the key that submitted it (any caller when the server has no keys,
        and any key for a job submitted before it had keys). Another key's job is not found, not forbidden: its
        existence is not revealed."""
        job = self.store.get(job_id)
        if job is None or job.app != app.strip("/") or not visible_to(job, owner):
            raise NotFound(f"request {job_id} not found for {app}")
        return job

    def status_body(self, job: Job, logs: list[LogEntry] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"status": job.state.value, "request_id": job.id, **self.urls(job)}
        if job.state is JobState.QUEUED:
            body["queue_position"] = self.store.queue_position(job)
            return body
        body["logs"] = [log_json(e) for e in logs] if logs is not None else None
        if job.state is JobState.COMPLETED:
            body["metrics"] = {"inference_time": job.inference_time}
            if job.failure is not None:
                body["error"] = job.failure.message
                body["error_type"] = job.failure.error_type
        return body

    def status(self, app: str, job_id: str, with_logs: bool, owner: str | None = None) -> Reply:
        job = self.find(app, job_id, owner)
        logs = self.store.logs(job.id) if with_logs else None
        code = 200 if job.state is JobState.COMPLETED else 202
        return Reply(code, self.status_body(job, logs), {"x-fal-request-id": job.id})

    # --- result ---
    def result(self, app: str, job_id: str, owner: str | None = None) -> Reply:
        job = self.find(app, job_id, owner)
        return self.result_of(job)

    def result_of(self, job: Job) -> Reply:
        if job.state is not JobState.COMPLETED:
            raise StillInProgress("Request is still in progress")
        headers = {"x-fal-request-id": job.id}
        if job.failure is None:
            return Reply(200, job.output, headers)
        headers["x-fal-error-type"] = job.failure.error_type
        if job.failure.error_type == "request_timeout":
            headers["x-fal-request-timeout-type"] = "user"
        return Reply(job.failure.http_status, job.failure.result_body(), headers)

    # --- cancel ---
    def cancel(self, app: str, job_id: str, owner: str | None = None) -> Reply:
        job = self.store.get(job_id)
        if job is None or job.app != app.strip("/") or not visible_to(job, owner):
            return Reply(404, {"status": CancelOutcome.NOT_FOUND.value}, {})
        outcome = self.store.cancel(job_id, cancelled_failure(), self.store.now())
        if outcome in (CancelOutcome.CANCELLED, CancelOutcome.REQUESTED):
            return Reply(202, {"status": CancelOutcome.REQUESTED.value}, {})
        if outcome is CancelOutcome.ALREADY_COMPLETED:
            return Reply(400, {"status": outcome.value}, {})
        return Reply(404, {"status": outcome.value}, {})


def visible_to(job: Job, owner: str | None) -> bool:
    return owner is None or job.owner is None or job.owner == owner


def recover_lost_jobs(
    store: JobStore,
    dead_workers: list[str],
    max_attempts: int,
    expired_leases: bool = False,
    files: FileStore | None = None,
) -> list[str]:
    """Requeues the running jobs of dead workers, and with `expired_leases` those whose lease ran out; fails those
    out of attempts, removing from `files` any video their attempts stored but never reported (no later attempt
    will, as it does for its earlier ones). Expired leases are the housekeeping's to judge (`LeaseRecovery`, which
    holds off after an outage): a supervisor that saw its own worker exit takes that worker's jobs only."""
    now = store.now()
    failed = []
    # Epoch 0 as the lease cutoff: no lease ran out before it, so only the dead workers' jobs come back.
    for job in store.recover_lost(now if expired_leases else 0.0, dead_workers, max_attempts):
        if job.worker_id is None:  # never finish without the owner check: a queued job is not this sweep's
            continue
        failure = cancelled_failure() if job.cancel_requested else disconnected_failure(job.attempts)
        # As the worker that held it: if it was handed back and claimed again meanwhile, the new run is left alone.
        if store.finish(job.id, now, worker_id=job.worker_id, failure=failure):
            failed.append(job.id)
            if files is not None:
                delete_outputs(files, job.id, range(1, job.attempts + 1))
    return failed


# A store clock that gains this much more than the monotonic clock between two housekeeping passes has jumped.
CLOCK_JUMP_S = 5.0


class LeaseRecovery:
    """The housekeeping's side of `recover_lost_jobs`: jobs whose lease ran out go back to the queue (or fail),
    except for one lease after a time in which healthy workers may not have been able to renew theirs:
    - no housekeeping pass got through for longer than a heartbeat interval: the store took no writes (a full
      disk, a Redis outage, including one its client rode out inside a single slow call) or this process stalled;
      the first pass after would take every running job from its worker (and its video with it);
    - the store clock jumped ahead (a stepped wall clock): every lease would look expired at once;
    - this process has just started: it cannot know whether the store was unreachable just before (a replica
      started by a deploy or an autoscaler right after a Redis outage would take every lease that ran out in it).
    Within that lease each live worker renews its lease (every lease/4); a worker that really died is recovered a
    lease later than it would have been. Dead worker processes the supervisor saw exit are recovered at once."""

    def __init__(
        self,
        store: JobStore,
        lease_s: float,
        max_attempts: int,
        pass_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        files: FileStore | None = None,
    ) -> None:
        self.store, self.lease_s, self.max_attempts, self.clock = store, lease_s, max_attempts, clock
        self.files = files
        # A gap between passes longer than this means workers may have missed a heartbeat.
        self.max_gap_s = max(lease_s / 4, 3 * pass_interval_s)
        self._held_until = -math.inf
        self._failed = False  # a pass failed since the last one that got through
        self._last: tuple[float, float] | None = None  # (store clock, monotonic clock) at the last whole pass

    def run(self) -> list[str]:
        """One housekeeping pass: the ids of jobs failed after their last attempt. Raises when the store does."""
        try:
            now = self.store.now()
            mono = self.clock()  # read together: a slow store call after this is not mistaken for a clock jump
            self.store.probe_write(now)
        except Exception:
            self._failed = True
            raise
        probe_s = self.clock() - mono
        if self._failed:  # also before any pass got through (a start during an outage)
            self._hold(mono, "the job store took no writes for a while")
        elif self._last is None:
            self._hold(mono, "housekeeping has just started", quiet=True)
        elif probe_s > self.max_gap_s:  # a store client that rode out an outage inside this one call
            self._hold(mono, f"one write to the job store took {probe_s:.0f} s")
        else:
            gap = mono - self._last[1]
            jump = (now - self._last[0]) - gap
            if gap > self.max_gap_s:
                self._hold(mono, f"no housekeeping pass got through for {gap:.0f} s")
            elif jump > CLOCK_JUMP_S:
                self._hold(mono, f"the store clock jumped {jump:.0f} s ahead")
        self._failed, self._last = False, (now, mono)
        if mono < self._held_until:
            return []
        return recover_lost_jobs(self.store, [], self.max_attempts, expired_leases=True, files=self.files)

    def _hold(self, mono: float, why: str, quiet: bool = False) -> None:
        self._held_until = mono + self.lease_s
        log.log(
            logging.INFO if quiet else logging.WARNING,
            "%s: running jobs keep their leases for %.0f s, for their workers to renew them",
            why,
            self.lease_s,
        )


def forget_silent_workers(store: JobStore, silent_s: float) -> list[str]:
    """Drops the registrations of workers silent for `silent_s` (killed machines never unregister); their
    jobs were already recovered when the leases ran out."""
    now = store.now()
    gone = [w.id for w in store.workers() if now - w.heartbeat_at > silent_s]
    for worker_id in gone:
        store.remove_worker(worker_id)
    return gone
