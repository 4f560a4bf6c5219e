"""The wanserve Python client: the queue API (submit, status, SSE status stream, result, cancel), the sync run
route and uploads, sync (`WanserveClient`) and async (`AsyncWanserveClient`) with the same methods.

    from wanserve.client import WanserveClient
    client = WanserveClient()                  # WANSERVE_URL / WANSERVE_KEY, else http://127.0.0.1:8000
    video = client.subscribe({"prompt": "a fox in snow", "resolution": "480p"}, on_queue_update=print)
    client.download(video.video.url, "fox.mp4")

Requests and results are the server's own wire models (wanserve.schema); a failed call raises an `ApiError`
subclass carrying the server's status, `error_type` and detail. The two classes share every piece of
protocol logic below (URLs, bodies, parsing, SSE decoding); they differ only in how they do I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import mimetypes
import os
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict
from pydantic_core import to_jsonable_python

from wanserve.jobs.endpoints import app_of  # the server's own rule for status/result/cancel URLs
from wanserve.progress import StepLine
from wanserve.schema import WanLoRAT2VRequest, WanT2VRequest, WanT2VResponse

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_APP = "fal-ai/wan-22"
POLL_INTERVAL_S = 0.5
# How long `follow` keeps polling through a server that cannot be reached or answers 502-504 (a restart, a proxy
# between two upstreams) before it gives up: the request lives in the server's queue meanwhile.
RECONNECT_GRACE_S = 300.0

Arguments = WanT2VRequest | Mapping[str, Any]


# --- errors ---
class ApiError(Exception):
    """The server answered with an error: its HTTP status, fal `error_type` and detail (text or field errors)."""

    def __init__(
        self,
        status_code: int,
        detail: Any,
        error_type: str | None = None,
        request_id: str | None = None,
        retry_after_s: float | None = None,  # a 429's Retry-After
        for_request: bool = False,
    ):
        self.status_code = status_code
        self.detail = detail
        self.error_type = error_type
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        # The server answered for the request itself (x-fal-request-id): its stored outcome, such as a
        # runner_disconnected 503, not a proxy's or a restarting server's, which are worth trying again.
        self.for_request = for_request
        super().__init__(f"HTTP {status_code}{f' {error_type}' if error_type else ''}: {_detail_text(detail)}")


class ConfigError(ValueError):
    """The client cannot be used as configured (a server URL or API key no HTTP request can carry)."""


class InputError(ApiError):
    """422: the input does not fit the schema, or a field (a LoRA path...) could not be used."""

    @property
    def field_errors(self) -> list[dict[str, Any]]:
        return [e for e in self.detail if isinstance(e, dict)] if isinstance(self.detail, list) else []


class AuthError(ApiError):
    """401/403: a missing or wrong API key."""


class NotFoundError(ApiError):
    """404: unknown endpoint or request id."""


class NotReady(ApiError):
    """The result of a request that has not completed yet."""


class RequestCancelled(ApiError):
    """499: the request was cancelled."""


class ServerError(ApiError):
    """5xx: the server or the generation failed (`runner_disconnected`, `internal_error`, timeouts...)."""


def detail_lines(detail: Any) -> list[str]:
    """A server `detail` in words: one `field: reason` per field error, or the text itself."""
    if not isinstance(detail, list):
        return [str(detail)]
    lines = []
    for e in detail:
        if isinstance(e, dict):
            loc = ".".join(str(p) for p in e.get("loc", []) if p != "body")
            lines.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        else:
            lines.append(str(e))
    return lines


def _detail_text(detail: Any) -> str:
    return "; ".join(detail_lines(detail))


# An answer that is not the server's JSON (a proxy's error page, say) is shown this long at most.
MAX_SHOWN_TEXT = 300


def _shown_text(response: httpx.Response) -> str:
    """What to show of an answer that is not JSON: its reason, and its text when that is short plain text."""
    reason = f"HTTP {response.status_code} {response.reason_phrase}".strip()
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    text = " ".join(response.text.split())
    if kind not in ("", "text/plain") or not text:
        return f"{reason} ({kind or 'an empty answer'}, not this server's JSON: is the server URL right?)"
    return text if len(text) <= MAX_SHOWN_TEXT else text[:MAX_SHOWN_TEXT] + "..."


def error_from_response(response: httpx.Response, request_id: str | None = None) -> ApiError:
    code = response.status_code
    if 300 <= code < 400:
        location = response.headers.get("location", "")[:200]
        return ApiError(code, f"the server redirects to {location or 'another URL'}: give that as the server URL")
    try:
        body = response.json()
    except ValueError:
        body = {"detail": _shown_text(response)}
    detail = body.get("detail", body) if isinstance(body, dict) else body
    error_type = (body.get("error_type") if isinstance(body, dict) else None) or response.headers.get(
        "x-fal-error-type"
    )
    cls: type[ApiError] = ApiError
    if code == 422:
        cls = InputError
    elif code in (401, 403):
        cls = AuthError
    elif code == 404:
        cls = NotFoundError
    elif code == 499:
        cls = RequestCancelled
    elif code >= 500:
        cls = ServerError
    if cls is InputError and error_type is None and isinstance(detail, list) and detail:
        error_type = detail[0].get("type") if isinstance(detail[0], dict) else None
    retry_after = response.headers.get("retry-after", "")
    retry_after_s = float(retry_after) if retry_after.isascii() and retry_after.isdigit() else None
    for_request = "x-fal-request-id" in response.headers
    return cls(code, detail, error_type, request_id, retry_after_s, for_request)


# --- wire models of the queue ---
class LogEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    message: str
    level: str | None = None
    timestamp: str | None = None


class Submitted(BaseModel):
    model_config = ConfigDict(extra="allow")
    request_id: str
    status_url: str
    response_url: str
    cancel_url: str
    queue_position: int | None = None


class QueueStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    request_id: str | None = None
    queue_position: int | None = None
    logs: list[LogEntry] | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None

    @property
    def last_step(self) -> StepLine | None:
        """The latest denoising step reported in the logs, if any."""
        for entry in reversed(self.logs or []):
            step = StepLine.parse(entry.message)
            if step is not None:
                return step
        return None


# --- protocol pieces shared by both clients ---
def resolve_endpoint(arguments: Mapping[str, Any], app: str, endpoint: str | None) -> str:
    """The endpoint id a request goes to: the one named, else the client's app, with `/lora` for LoRA requests."""
    if endpoint is not None:
        return endpoint.strip("/")
    base = app.strip("/")
    lora = any(arguments.get(name) for name in LORA_ONLY_FIELDS) and not base.endswith("/lora")
    return f"{base}/lora" if lora else base


# Inputs that only the `/lora` endpoint reads (the base endpoint ignores unknown fields): a request that sets one
# goes there, or it would be silently dropped.
LORA_ONLY_FIELDS = tuple(sorted(set(WanLoRAT2VRequest.model_fields) - set(WanT2VRequest.model_fields)))


def cancel_accepted(response: httpx.Response, request_id: str) -> bool:
    """A cancel's answer: True when accepted, False when the request had already completed (400 with that status);
    any other error raises."""
    if response.status_code == 400:
        with contextlib.suppress(ValueError):
            body = response.json()
            if isinstance(body, dict) and body.get("status") == "ALREADY_COMPLETED":
                return False
    check(response, request_id)
    return True


def request_body(arguments: Arguments) -> dict[str, Any]:
    if isinstance(arguments, BaseModel):
        return arguments.model_dump(mode="json", exclude_unset=True)
    # A mapping may hold the request's models too (`"loras": [LoRAWeight(...)]`).
    return to_jsonable_python(dict(arguments))  # type: ignore[no-any-return]


def check(response: httpx.Response, request_id: str | None = None) -> httpx.Response:
    """`response` if it is a success (2xx); else its error. A redirect is one: nothing the server does answers
    one, so it comes from something else at that URL (http sent to https, say), and the call did not happen."""
    if not 200 <= response.status_code < 300:
        raise error_from_response(response, request_id)
    return response


def parse_result(response: httpx.Response, request_id: str) -> WanT2VResponse:
    if response.status_code == 400:
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        detail = body.get("detail", response.text) if isinstance(body, dict) else response.text
        raise NotReady(400, detail, "bad_request", request_id)
    return WanT2VResponse.model_validate(check(response, request_id).json())


class SseDecoder:
    """Turns the lines of a `text/event-stream` into the JSON of each `data:` event (comments are keep-alives)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> dict[str, Any] | None:
        line = line.rstrip("\r")
        if line == "":
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return json.loads(data)  # type: ignore[no-any-return]
        if line.startswith("data:"):
            self._data.append(line[5:].lstrip(" "))
        return None


@dataclass
class StatusAccumulator:
    """The stream sends only new log lines per event: keep them all, as the status route would return them."""

    logs: list[dict[str, Any]]

    def add(self, event: dict[str, Any]) -> QueueStatus:
        self.logs.extend(event.get("logs") or [])
        return QueueStatus.model_validate({**event, "logs": list(self.logs)})


class UploadTarget(BaseModel):
    """The server's answer to an upload's initiate: where to PUT the bytes, and the file's URL after."""

    model_config = ConfigDict(extra="allow")
    upload_url: str
    file_url: str


@dataclass(frozen=True)
class UploadSource:
    """What `upload_file` sends: bytes in memory, or a file read as it is sent (never whole into memory)."""

    data: bytes | Path
    name: str
    content_type: str

    @classmethod
    def of(cls, data: Path | str | bytes, file_name: str | None, content_type: str | None) -> UploadSource:
        if isinstance(data, bytes):
            source: bytes | Path = data
            name = file_name or "upload.bin"
        else:
            source = Path(data)
            name = file_name or source.name
            with source.open("rb") as f:  # unreadable (permissions, an I/O error): OSError before the server is asked
                if source.is_file():
                    f.read(1)
                else:  # a pipe, /dev/stdin: no size to send ahead, so read whole
                    source = f.read()
        return cls(source, name, content_type or mimetypes.guess_type(name)[0] or "application/octet-stream")

    def headers(self) -> dict[str, str]:
        # A length, never chunked: a presigned S3 PUT needs one.
        size = len(self.data) if isinstance(self.data, bytes) else self.data.stat().st_size
        return {"content-type": self.content_type, "content-length": str(size)}

    async def chunks(self) -> AsyncIterator[bytes]:
        assert isinstance(self.data, Path)
        with await asyncio.to_thread(self.data.open, "rb") as f:
            while chunk := await asyncio.to_thread(f.read, UPLOAD_CHUNK):
                yield chunk


UPLOAD_CHUNK = 1 << 20


def submit_options(webhook_url: str | None, priority: str | None, start_timeout: float | None) -> dict[str, Any]:
    """The query and headers of a submit, as the fal clients send them: the webhook URL, the queue priority, and
    the start timeout (a request not started within it fails, 504)."""
    headers = {"x-fal-queue-priority": priority} if priority else {}
    if start_timeout is not None:
        headers["x-fal-request-timeout"] = str(start_timeout)
    return {"params": {"fal_webhook": webhook_url} if webhook_url else None, "headers": headers or None}


def same_origin(base: str, url: str) -> bool:
    """Whether `url` is on the server itself: only then may the API key go with it (a result or upload URL can
    point at other storage, e.g. a presigned S3 URL, which must never see the key)."""
    if "://" not in url:
        return True
    a, b = httpx.URL(base), httpx.URL(url)
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def server_url(url: str | None) -> str:
    return (url or os.environ.get("WANSERVE_URL") or DEFAULT_URL).rstrip("/")


def _settings(url: str | None, key: str | None) -> tuple[str, dict[str, str]]:
    base = server_url(url)
    try:
        httpx.URL(base)
    except httpx.InvalidURL as exc:
        raise ConfigError(f"not a valid server URL: {base[:200]!r} ({exc})") from None
    # Stripped: a key read from a file often ends in a line break. Never echoed: it is a secret.
    key = (key if key is not None else os.environ.get("WANSERVE_KEY") or "").strip()
    if key and not (key.isascii() and key.isprintable()):
        raise ConfigError("the API key (--key or WANSERVE_KEY) has characters an HTTP header cannot carry")
    return base, ({"Authorization": f"Key {key}"} if key else {})


# Called when `follow` starts waiting out an outage: the error, and the seconds it will wait at most.
OnOutage = Callable[[Exception, float], None]


class _FailedPolls:
    """The status polls of `follow` that failed in a row: a server restart or a proxy (unreachable, 502-504) is
    waited out for RECONNECT_GRACE_S; anything else, or longer, is the caller's error. So is a server that could
    not be reached before it ever answered (a wrong URL): only a server that was there is worth waiting for."""

    def __init__(self, reached: Callable[[], bool], on_outage: OnOutage | None) -> None:
        self.reached = reached  # whether the server ever answered this client (any status, 503s included)
        self.on_outage = on_outage
        self.since: float | None = None

    def reset(self) -> None:
        """A status came: the next failure starts a new outage."""
        self.since = None

    def wait_s(self, exc: Exception) -> float:
        """How long to wait before polling again; raises `exc` when it is not worth trying again."""
        first = self.since is None
        self.since = self.since or time.monotonic()
        never_reached = isinstance(exc, httpx.TransportError) and not self.reached()  # a proxy's 503 is an answer
        if never_reached or not reconnectable(exc) or time.monotonic() - self.since > RECONNECT_GRACE_S:
            raise exc
        if first and self.on_outage is not None:
            self.on_outage(exc, RECONNECT_GRACE_S)
        wait = 4 * POLL_INTERVAL_S
        if isinstance(exc, ApiError) and exc.retry_after_s is not None:
            wait = max(wait, min(exc.retry_after_s, RECONNECT_GRACE_S))
        return wait


def reconnectable(exc: BaseException) -> bool:
    """A server restarting or a proxy in front of it (unreachable, or 502-504), or this key's read rate limit (429):
    nothing wrong with the request, which goes on. A status stream that fails so (opening or later) gives way to
    polling, which waits such failures out. A request's own outcome (a runner_disconnected 503) is not one."""
    return isinstance(exc, httpx.TransportError) or (
        isinstance(exc, ApiError) and exc.status_code in (429, 502, 503, 504) and not exc.for_request
    )


def staging_path(path: Path) -> Path:
    """Where a download to `path` is written before it is renamed into place: a hidden name beside it, its own for
    each download (two downloads to one path at once must not write into one file)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")


async def _called_back(callback: Callable[[Any], object], value: Any) -> None:
    """Calls an async client's callback, awaiting what it returns only when that can be awaited (a plain function
    may return anything: `lambda s: seen.append(s) or s.status`)."""
    outcome = callback(value)
    if inspect.isawaitable(outcome):
        await outcome


def run_timeout(client_timeout: httpx.Timeout, run_s: float) -> httpx.Timeout:
    """A one-call run waits `run_s` for its answer; connecting still gives up as soon as any other call would."""
    return httpx.Timeout(run_s, connect=client_timeout.connect)


# A status stream is quiet through a long step, but the server sends a keep-alive every 15 s: silence for much
# longer means a dead connection (a proxy that went away, a half-open socket), which subscribe() then replaces by
# polling instead of waiting for ever.
STREAM_TIMEOUT = httpx.Timeout(60.0, read=45.0)


def stream_timeout(client_timeout: httpx.Timeout) -> httpx.Timeout:
    """STREAM_TIMEOUT, except that connecting gives up as soon as any other call of the client would."""
    return httpx.Timeout(
        connect=client_timeout.connect, read=STREAM_TIMEOUT.read, write=STREAM_TIMEOUT.write, pool=STREAM_TIMEOUT.pool
    )


UPLOAD_INITIATE = "/rest/storage/upload/initiate"


class _Routes:
    """What both clients share: the server's URL and default app, and the paths of every call."""

    def __init__(self, url: str | None, key: str | None, app: str) -> None:
        self.url, self.headers = _settings(url, key)
        self.app = app
        self.answered = False  # the server has answered this client at least once (follow() waits out outages then)

    def _answered(self, _response: httpx.Response) -> None:
        self.answered = True

    async def _answered_async(self, response: httpx.Response) -> None:
        self._answered(response)

    def _request_path(self, request_id: str, app: str | None, tail: str = "") -> str:
        return f"/{app_of(app or self.app)}/requests/{request_id}{tail}"

    def _submission(self, arguments: Arguments, endpoint: str | None, run: bool = False) -> tuple[str, dict[str, Any]]:
        """A submit's path and body. LoRA-only fields left at their defaults (`reverse_video: false`) are dropped
        from a request to the base endpoint, which would log them as unknown."""
        body = request_body(arguments)
        target = resolve_endpoint(body, self.app, endpoint)
        if not target.endswith("/lora"):
            body = {name: value for name, value in body.items() if name not in LORA_ONLY_FIELDS or value}
        return f"/{'run/' if run else ''}{target}", body


# --- the sync client ---
class WanserveClient(_Routes):
    def __init__(
        self, url: str | None = None, key: str | None = None, *, timeout: float = 60.0, app: str = DEFAULT_APP
    ) -> None:
        super().__init__(url, key, app)
        hooks = {"response": [self._answered]}
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout, event_hooks=hooks)
        self.plain = httpx.Client(timeout=timeout)  # for URLs elsewhere: no API key

    def _for(self, url: str) -> httpx.Client:
        return self.http if same_origin(self.url, url) else self.plain

    def __enter__(self) -> WanserveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()
        self.plain.close()

    def submit(
        self,
        arguments: Arguments,
        *,
        endpoint: str | None = None,
        webhook_url: str | None = None,
        priority: str | None = None,
        start_timeout: float | None = None,
    ) -> Submitted:
        """Queues a request. `start_timeout`: seconds it may wait to start, else it fails (504)."""
        path, body = self._submission(arguments, endpoint)
        response = self.http.post(path, json=body, **submit_options(webhook_url, priority, start_timeout))
        return Submitted.model_validate(check(response).json())

    def status(self, request_id: str, *, logs: bool = True, app: str | None = None) -> QueueStatus:
        response = self.http.get(self._request_path(request_id, app, "/status"), params={"logs": int(logs)})
        return QueueStatus.model_validate(check(response, request_id).json())

    def stream_status(self, request_id: str, *, logs: bool = True, app: str | None = None) -> Iterator[QueueStatus]:
        """Status updates as the server pushes them (SSE), until COMPLETED. Logs accumulate across updates."""
        url = self._request_path(request_id, app, "/status/stream")
        decoder, acc = SseDecoder(), StatusAccumulator([])
        with self.http.stream("GET", url, params={"logs": int(logs)}, timeout=stream_timeout(self.http.timeout)) as r:
            if r.status_code >= 400:
                r.read()
                raise error_from_response(r, request_id)
            for line in r.iter_lines():
                event = decoder.feed(line)
                if event is not None:
                    status = acc.add(event)
                    yield status
                    if status.status == "COMPLETED":
                        return

    def result(self, request_id: str, *, app: str | None = None) -> WanT2VResponse:
        return parse_result(self.http.get(self._request_path(request_id, app)), request_id)

    def cancel(self, request_id: str, *, app: str | None = None) -> bool:
        """True when the cancel was accepted; False when the request had already completed."""
        return cancel_accepted(self.http.put(self._request_path(request_id, app, "/cancel")), request_id)

    def subscribe(
        self,
        arguments: Arguments,
        *,
        endpoint: str | None = None,
        on_enqueue: Callable[[str], None] | None = None,
        on_queue_update: Callable[[QueueStatus], None] | None = None,
        with_logs: bool = True,
        on_outage: OnOutage | None = None,
        start_timeout: float | None = None,
    ) -> WanT2VResponse:
        """Submit, follow the status stream (polling if the stream breaks), and return the result."""
        submitted = self.submit(arguments, endpoint=endpoint, start_timeout=start_timeout)
        app = resolve_endpoint(request_body(arguments), self.app, endpoint)
        if on_enqueue is not None:
            on_enqueue(submitted.request_id)
        polls = _FailedPolls(lambda: self.answered, on_outage)
        for status in self._follow(submitted.request_id, app, with_logs, polls):
            if on_queue_update is not None:
                on_queue_update(status)
        while True:  # the result is read through an outage too, as the statuses were
            try:
                return self.result(submitted.request_id, app=app)
            except Exception as exc:
                time.sleep(polls.wait_s(exc))

    def follow(
        self, request_id: str, *, app: str | None = None, logs: bool = True, on_outage: OnOutage | None = None
    ) -> Iterator[QueueStatus]:
        """The request's statuses until it completes: the status stream, then polling if the stream breaks (a proxy
        that cuts long streams, a server restart), through RECONNECT_GRACE_S of an unreachable server once it has
        answered this client (a server that never answered it, such as a wrong URL, fails at once)."""
        return self._follow(request_id, app, logs, _FailedPolls(lambda: self.answered, on_outage))

    def _follow(self, request_id: str, app: str | None, logs: bool, polls: _FailedPolls) -> Iterator[QueueStatus]:
        try:
            for status in self.stream_status(request_id, logs=logs, app=app):
                polls.reset()
                yield status
                if status.status == "COMPLETED":
                    return
        except Exception as exc:  # the stream could not open, or broke: polling takes over (or the error is real)
            if not reconnectable(exc):
                raise
        while True:
            try:
                status = self.status(request_id, logs=logs, app=app)
            except Exception as exc:
                time.sleep(polls.wait_s(exc))
                continue
            polls.reset()
            yield status
            if status.status == "COMPLETED":
                return
            time.sleep(POLL_INTERVAL_S)

    def run(self, arguments: Arguments, *, endpoint: str | None = None, timeout: float = 3600.0) -> WanT2VResponse:
        """The sync route: one HTTP call that returns the output (hanging up cancels the request)."""
        path, body = self._submission(arguments, endpoint, run=True)
        response = self.http.post(path, json=body, timeout=run_timeout(self.http.timeout, timeout))
        return WanT2VResponse.model_validate(check(response).json())

    def upload_file(
        self, data: Path | str | bytes, *, file_name: str | None = None, content_type: str | None = None
    ) -> str:
        """Uploads to the server's storage and returns the file URL (usable as a LoRA `path`)."""
        source = UploadSource.of(data, file_name, content_type)
        asked = {"file_name": source.name, "content_type": source.content_type}
        target = UploadTarget.model_validate(check(self.http.post(UPLOAD_INITIATE, json=asked)).json())
        put = self._for(target.upload_url).put
        if isinstance(source.data, bytes):
            check(put(target.upload_url, content=source.data, headers=source.headers()))
        else:
            with source.data.open("rb") as f:
                check(put(target.upload_url, content=f, headers=source.headers()))
        return target.file_url

    def download(self, url: str, path: Path | str) -> Path:
        """Downloads a result file (written whole, then renamed into place). Redirects are followed: a server that
        keeps its files on S3 answers with one to a presigned URL (httpx drops the API key on the way there)."""
        path = Path(path)
        staging = staging_path(path)
        try:
            with self._for(url).stream("GET", url, follow_redirects=True) as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_from_response(response)
                with staging.open("xb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
            staging.replace(path)
        finally:
            staging.unlink(missing_ok=True)
        return path


# --- the async client ---
class AsyncWanserveClient(_Routes):
    def __init__(
        self, url: str | None = None, key: str | None = None, *, timeout: float = 60.0, app: str = DEFAULT_APP
    ) -> None:
        super().__init__(url, key, app)
        hooks = {"response": [self._answered_async]}
        self.http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout, event_hooks=hooks)
        self.plain = httpx.AsyncClient(timeout=timeout)  # for URLs elsewhere: no API key

    def _for(self, url: str) -> httpx.AsyncClient:
        return self.http if same_origin(self.url, url) else self.plain

    async def __aenter__(self) -> AsyncWanserveClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.plain.aclose()

    async def submit(
        self,
        arguments: Arguments,
        *,
        endpoint: str | None = None,
        webhook_url: str | None = None,
        priority: str | None = None,
        start_timeout: float | None = None,
    ) -> Submitted:
        path, body = self._submission(arguments, endpoint)
        response = await self.http.post(path, json=body, **submit_options(webhook_url, priority, start_timeout))
        return Submitted.model_validate(check(response).json())

    async def status(self, request_id: str, *, logs: bool = True, app: str | None = None) -> QueueStatus:
        response = await self.http.get(self._request_path(request_id, app, "/status"), params={"logs": int(logs)})
        return QueueStatus.model_validate(check(response, request_id).json())

    async def stream_status(
        self, request_id: str, *, logs: bool = True, app: str | None = None
    ) -> AsyncGenerator[QueueStatus, None]:
        url = self._request_path(request_id, app, "/status/stream")
        decoder, acc = SseDecoder(), StatusAccumulator([])
        async with self.http.stream(
            "GET", url, params={"logs": int(logs)}, timeout=stream_timeout(self.http.timeout)
        ) as r:
            if r.status_code >= 400:
                await r.aread()
                raise error_from_response(r, request_id)
            async for line in r.aiter_lines():
                event = decoder.feed(line)
                if event is not None:
                    status = acc.add(event)
                    yield status
                    if status.status == "COMPLETED":
                        return

    async def result(self, request_id: str, *, app: str | None = None) -> WanT2VResponse:
        return parse_result(await self.http.get(self._request_path(request_id, app)), request_id)

    async def cancel(self, request_id: str, *, app: str | None = None) -> bool:
        return cancel_accepted(await self.http.put(self._request_path(request_id, app, "/cancel")), request_id)

    async def subscribe(
        self,
        arguments: Arguments,
        *,
        endpoint: str | None = None,
        on_enqueue: Callable[[str], object] | None = None,
        on_queue_update: Callable[[QueueStatus], object] | None = None,
        with_logs: bool = True,
        on_outage: OnOutage | None = None,
        start_timeout: float | None = None,
    ) -> WanT2VResponse:
        """As WanserveClient.subscribe; either callback may be a coroutine function (what it returns is awaited only
        when it can be)."""
        submitted = await self.submit(arguments, endpoint=endpoint, start_timeout=start_timeout)
        app = resolve_endpoint(request_body(arguments), self.app, endpoint)
        if on_enqueue is not None:
            await _called_back(on_enqueue, submitted.request_id)
        polls = _FailedPolls(lambda: self.answered, on_outage)
        # Closed as soon as this ends, however (a callback that raised): its status stream is a connection.
        async with contextlib.aclosing(self._follow(submitted.request_id, app, with_logs, polls)) as statuses:
            async for status in statuses:
                if on_queue_update is not None:
                    await _called_back(on_queue_update, status)
        while True:
            try:
                return await self.result(submitted.request_id, app=app)
            except Exception as exc:
                await asyncio.sleep(polls.wait_s(exc))

    def follow(
        self, request_id: str, *, app: str | None = None, logs: bool = True, on_outage: OnOutage | None = None
    ) -> AsyncGenerator[QueueStatus, None]:
        """As WanserveClient.follow. A loop that may stop early holds a status stream open until the generator is
        closed: `async with contextlib.aclosing(client.follow(id)) as statuses: async for status in statuses: ...`."""
        return self._follow(request_id, app, logs, _FailedPolls(lambda: self.answered, on_outage))

    async def _follow(
        self, request_id: str, app: str | None, logs: bool, polls: _FailedPolls
    ) -> AsyncGenerator[QueueStatus, None]:
        try:
            async with contextlib.aclosing(self.stream_status(request_id, logs=logs, app=app)) as stream:
                async for status in stream:
                    polls.reset()
                    yield status
                    if status.status == "COMPLETED":
                        return
        except Exception as exc:  # the stream could not open, or broke: polling takes over (or the error is real)
            if not reconnectable(exc):
                raise
        while True:
            try:
                status = await self.status(request_id, logs=logs, app=app)
            except Exception as exc:
                await asyncio.sleep(polls.wait_s(exc))
                continue
            polls.reset()
            yield status
            if status.status == "COMPLETED":
                return
            await asyncio.sleep(POLL_INTERVAL_S)

    async def run(
        self, arguments: Arguments, *, endpoint: str | None = None, timeout: float = 3600.0
    ) -> WanT2VResponse:
        path, body = self._submission(arguments, endpoint, run=True)
        response = await self.http.post(path, json=body, timeout=run_timeout(self.http.timeout, timeout))
        return WanT2VResponse.model_validate(check(response).json())

    async def upload_file(
        self, data: Path | str | bytes, *, file_name: str | None = None, content_type: str | None = None
    ) -> str:
        source = UploadSource.of(data, file_name, content_type)
        asked = {"file_name": source.name, "content_type": source.content_type}
        target = UploadTarget.model_validate(check(await self.http.post(UPLOAD_INITIATE, json=asked)).json())
        content = source.data if isinstance(source.data, bytes) else source.chunks()
        check(await self._for(target.upload_url).put(target.upload_url, content=content, headers=source.headers()))
        return target.file_url

    async def download(self, url: str, path: Path | str) -> Path:
        """WanserveClient.download, asynchronously (the file is written by a thread, chunk by chunk)."""
        path = Path(path)
        staging = staging_path(path)
        try:
            async with self._for(url).stream("GET", url, follow_redirects=True) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_from_response(response)
                out = await asyncio.to_thread(staging.open, "xb")
                try:
                    async for chunk in response.aiter_bytes():
                        await asyncio.to_thread(out.write, chunk)
                finally:
                    await asyncio.to_thread(out.close)
            await asyncio.to_thread(staging.replace, path)
        finally:
            staging.unlink(missing_ok=True)
        return path
