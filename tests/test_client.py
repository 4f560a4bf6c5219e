"""The wanserve Python client (sync and async) against a real server, and its protocol pieces."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from server import CHEAP_INPUT, Server

from wanserve.api.queue import KEEPALIVE_S
from wanserve.client import (
    AsyncWanserveClient,
    AuthError,
    InputError,
    NotFoundError,
    NotReady,
    QueueStatus,
    RequestCancelled,
    ServerError,
    WanserveClient,
)
from wanserve.client import client as client_module
from wanserve.client.client import (
    STREAM_TIMEOUT,
    ApiError,
    SseDecoder,
    StatusAccumulator,
    app_of,
    cancel_accepted,
    error_from_response,
    resolve_endpoint,
    same_origin,
    staging_path,
    stream_timeout,
)
from wanserve.client.commands import CLIENT_ERRORS, ProgressView
from wanserve.progress import StepLine
from wanserve.schema import LoRAWeight, WanT2VRequest

LONG_INPUT = {**CHEAP_INPUT, "resolution": "580p", "num_inference_steps": 100}  # runs long enough to cancel


def test_step_line_round_trip_and_last_step() -> None:
    line = StepLine(3, 30, "high", 3.864, 104)
    assert line.format() == "step 3/30 · high-noise expert · 3.86s/step · ETA 1m44s"
    assert StepLine.parse(line.format()) == StepLine(3, 30, "high", 3.86, 104)
    assert StepLine.parse("Decoding video") is None
    status = QueueStatus.model_validate(
        {"status": "IN_PROGRESS", "logs": [{"message": line.format()}, {"message": "Decoding video"}]}
    )
    assert status.last_step is not None and status.last_step.step == 3


def test_sse_decoding_accumulates_logs_and_skips_keep_alives() -> None:
    decoder, acc = SseDecoder(), StatusAccumulator([])
    lines = [": keep-alive", "", 'data: {"status": "IN_PROGRESS", "logs": [{"message": "a"}]}', "",
             'data: {"status": "COMPLETED",', 'data:  "logs": [{"message": "b"}]}', ""]  # fmt: skip
    statuses = [acc.add(event) for line in lines if (event := decoder.feed(line)) is not None]
    assert [s.status for s in statuses] == ["IN_PROGRESS", "COMPLETED"]
    assert [e.message for e in statuses[-1].logs or []] == ["a", "b"]


def test_endpoints_and_error_types() -> None:
    assert resolve_endpoint({"loras": [{"path": "x"}]}, "fal-ai/wan-22", None) == "fal-ai/wan-22/lora"
    assert resolve_endpoint({"loras": []}, "fal-ai/wan-22", None) == "fal-ai/wan-22"
    assert resolve_endpoint({"loras": [{"path": "x"}]}, "fal-ai/wan-22/lora", None) == "fal-ai/wan-22/lora"
    # reverse_video exists only on /lora: sent to the base endpoint it would be ignored
    assert resolve_endpoint({"reverse_video": True}, "fal-ai/wan-22", None) == "fal-ai/wan-22/lora"
    assert resolve_endpoint({"reverse_video": False}, "fal-ai/wan-22", None) == "fal-ai/wan-22"
    assert resolve_endpoint({"loras": [{"path": "x"}]}, "fal-ai/wan-22", "acme/custom") == "acme/custom"
    assert resolve_endpoint({}, "fal-ai/wan/v2.2-a14b/text-to-video", None) == "fal-ai/wan/v2.2-a14b/text-to-video"
    assert app_of("fal-ai/wan/v2.2-a14b/text-to-video/lora") == "fal-ai/wan"  # the server's rule
    assert same_origin("http://h:8000", "http://h:8000/files/x") and same_origin("http://h:8000", "/files/x")
    assert not same_origin("http://h:8000", "https://bucket.s3.example.com/x?sig=1")
    assert not same_origin("http://h:8000", "http://h:9000/x")
    response = httpx.Response(401, json={"detail": "Missing or invalid API key", "error_type": "unauthorized"})
    assert isinstance(error_from_response(response), AuthError)
    field = {"loc": ["body", "loras", 0, "path"], "msg": "not a valid safetensors file", "type": "invalid_lora"}
    error = error_from_response(httpx.Response(422, json={"detail": [field]}))
    assert isinstance(error, InputError) and error.error_type == "invalid_lora"
    assert "loras.0.path: not a valid safetensors file" in str(error)


def test_url_and_key_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANSERVE_URL", "http://gpu-box:9000/")
    monkeypatch.setenv("WANSERVE_KEY", "k1")
    with WanserveClient() as client:
        assert client.url == "http://gpu-box:9000" and client.http.headers["authorization"] == "Key k1"
    with WanserveClient("http://other:1", key="k2") as client:
        assert client.url == "http://other:1" and client.http.headers["authorization"] == "Key k2"


def test_sync_client_every_call(server: Server, tmp_path: Path) -> None:
    with WanserveClient(server.url) as client:
        submitted = client.submit(WanT2VRequest(**CHEAP_INPUT, seed=11))  # a typed request works as well as a dict
        first = client.status(submitted.request_id)
        assert first.request_id == submitted.request_id
        streamed = list(client.stream_status(submitted.request_id))
        assert streamed[-1].status == "COMPLETED" and streamed[-1].error is None
        assert any(s.last_step is not None and s.last_step.step == 1 for s in streamed)
        output = client.result(submitted.request_id)
        assert output.seed == 11 and output.video.content_type == "video/mp4"
        saved = client.download(output.video.url, tmp_path / "out.mp4")
        assert saved.read_bytes()[4:8] == b"ftyp" and saved.stat().st_size == output.video.file_size

        updates: list[QueueStatus] = []
        enqueued: list[str] = []
        subscribed = client.subscribe(
            {**CHEAP_INPUT, "seed": 12}, on_enqueue=enqueued.append, on_queue_update=updates.append
        )
        assert subscribed.seed == 12 and len(enqueued) == 1 and updates[-1].status == "COMPLETED"
        assert client.run({**CHEAP_INPUT, "seed": 13}).seed == 13

        url = client.upload_file(b"\x00bytes\xff", file_name="blob.bin")
        assert httpx.get(url).content == b"\x00bytes\xff"
        path = tmp_path / "notes.json"
        path.write_text(json.dumps({"a": 1}))
        uploaded = client.upload_file(path)
        response = httpx.get(uploaded)
        assert response.content == path.read_bytes() and response.headers["content-type"].startswith("application/json")

        assert client.cancel(submitted.request_id) is False  # completed: nothing to cancel

    # another app id the server serves, three segments long: status and result go under its `owner/app`
    with WanserveClient(server.url, app="fal-ai/wan/v2.2-a14b/text-to-video") as client:
        assert client.subscribe({**CHEAP_INPUT, "seed": 14}).seed == 14


def test_lora_only_fields_at_their_defaults_are_not_sent_to_the_base_endpoint() -> None:
    """The base endpoint would log `reverse_video` as an unknown field on every request (the CLI's
    --no-reverse-video, a form's unchecked box): left out there, sent where it is read."""
    sent: list[tuple[str, dict[str, object]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append((request.url.path, json.loads(request.content)))
        urls = {name: f"http://api.test/x/{name}" for name in ("status_url", "response_url", "cancel_url")}
        return httpx.Response(200, json={"request_id": "r", "status": "IN_QUEUE", **urls})

    client = WanserveClient("http://api.test")
    client.http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(handler))
    client.submit({"prompt": "a fox", "reverse_video": False, "loras": []})
    client.submit({"prompt": "a fox", "reverse_video": True})
    client.submit({"prompt": "a fox", "reverse_video": False}, endpoint="fal-ai/wan-22/lora")
    assert sent == [
        ("/fal-ai/wan-22", {"prompt": "a fox"}),
        ("/fal-ai/wan-22/lora", {"prompt": "a fox", "reverse_video": True}),
        ("/fal-ai/wan-22/lora", {"prompt": "a fox", "reverse_video": False}),
    ]


def test_the_progress_view_does_not_repeat_lines_after_a_status_without_logs() -> None:
    """A job requeued after its worker died reports IN_QUEUE without logs; the lines already shown stay shown once."""
    out = io.StringIO()
    view = ProgressView(out, live=False)
    lines = [{"message": "Started on worker w1"}, {"message": "step 1/3 · high-noise expert · 1.00s/step · ETA 2s"}]
    view.update(QueueStatus.model_validate({"status": "IN_PROGRESS", "logs": lines}))
    view.update(QueueStatus.model_validate({"status": "IN_QUEUE", "queue_position": 0}))
    retry = {"message": "Retrying after the previous worker stopped (attempt 2)"}
    view.update(QueueStatus.model_validate({"status": "IN_PROGRESS", "logs": [*lines, retry]}))
    text = out.getvalue()
    assert text.count("Started on worker w1") == 1 and text.count("Retrying after") == 1


def test_cancel_says_already_completed_only_when_the_server_does() -> None:
    assert cancel_accepted(httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"}), "r") is True
    assert cancel_accepted(httpx.Response(400, json={"status": "ALREADY_COMPLETED"}), "r") is False
    with pytest.raises(ApiError) as raised:  # another 400 (a proxy's, a malformed path) is an error, not "done"
        cancel_accepted(httpx.Response(400, json={"detail": "bad request", "error_type": "bad_request"}), "r")
    assert raised.value.status_code == 400


def test_following_rides_out_the_read_rate_limit_as_its_retry_after_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 429 while following a request is no failure of the request (it goes on): polling waits and asks again."""
    statuses = iter([
        httpx.Response(429, json={"detail": "slow down", "error_type": "rate_limited"}, headers={"retry-after": "3"}),
        httpx.Response(200, json={"status": "COMPLETED", "logs": []}),
    ])  # fmt: skip
    slept: list[float] = []
    client = WanserveClient("http://api.test")
    client.http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(lambda _r: next(statuses)))
    client.stream_status = lambda *a, **k: iter(())  # type: ignore[method-assign,assignment]  # no stream: polling
    monkeypatch.setattr(client_module.time, "sleep", slept.append)
    assert [s.status for s in client.follow("r")] == ["COMPLETED"]
    assert slept == [3.0]


RESULT = {"video": {"url": "http://api.test/files/v.mp4"}, "seed": 7}


def mocked(handler: Any, *, timeout: float = 60.0) -> WanserveClient:
    client = WanserveClient("http://api.test", key="secret", timeout=timeout)
    client.http = httpx.Client(
        base_url=client.url, headers=client.http.headers, timeout=timeout, transport=httpx.MockTransport(handler)
    )
    client.plain = httpx.Client(timeout=timeout, transport=httpx.MockTransport(handler))
    return client


def test_a_redirect_is_an_error_not_a_cancel_that_happened() -> None:
    """Plain http to a proxy that sends everything to https: the cancel was never made, so it is no success."""
    client = mocked(lambda r: httpx.Response(301, headers={"location": f"https://api.test{r.url.path}"}))
    with pytest.raises(ApiError) as raised:
        client.cancel("r1")
    assert raised.value.status_code == 301
    assert "https://api.test/fal-ai/wan-22/requests/r1/cancel" in str(raised.value)
    with pytest.raises(ApiError):
        client.upload_file(b"bytes")


def test_an_error_page_that_is_not_json_is_named_not_printed() -> None:
    page = "<html><body>" + "<p>nginx</p>" * 500 + "</body></html>"
    answer = httpx.Response(502, text=page, headers={"content-type": "text/html"})
    error = error_from_response(answer)
    assert error.status_code == 502 and "<" not in str(error) and "Bad Gateway" in str(error)
    assert "text/html" in str(error)
    long_text = error_from_response(httpx.Response(500, text="x " * 1000, headers={"content-type": "text/plain"}))
    assert len(str(long_text)) < 400


def test_subscribe_reads_its_result_through_a_proxys_outage_but_not_a_stored_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    submitted = {"request_id": "r1", "status_url": "s", "response_url": "r", "cancel_url": "c"}
    slept: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", slept.append)

    def serving(results: list[httpx.Response]) -> WanserveClient:
        answers = iter(results)

        def handler(request: httpx.Request) -> httpx.Response:
            if request.method == "POST":
                return httpx.Response(200, json=submitted)
            return next(answers)

        client = mocked(handler)
        completed = QueueStatus.model_validate({"status": "COMPLETED"})
        client.stream_status = lambda *a, **k: iter([completed])  # type: ignore[method-assign,assignment]
        client.answered = True
        return client

    proxy_down = httpx.Response(503, text="<html>upstream down</html>", headers={"content-type": "text/html"})
    client = serving([proxy_down, httpx.Response(200, json=RESULT)])
    assert client.subscribe(CHEAP_INPUT).seed == 7
    assert len(slept) == 1
    # The request's own outcome: a 503 runner_disconnected with its request id is the answer, not an outage.
    disconnected = httpx.Response(
        503,
        json={"detail": "the worker stopped", "error_type": "runner_disconnected"},
        headers={"x-fal-request-id": "r1", "x-fal-error-type": "runner_disconnected"},
    )
    client = serving([disconnected, httpx.Response(200, json=RESULT)])
    with pytest.raises(ServerError) as raised:
        client.subscribe(CHEAP_INPUT)
    assert raised.value.error_type == "runner_disconnected" and len(slept) == 1


def test_a_one_call_run_waits_long_for_its_answer_but_not_to_connect() -> None:
    timeouts: list[dict[str, float]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"])
        return httpx.Response(200, json=RESULT)

    mocked(handler, timeout=2.0).run(CHEAP_INPUT, timeout=900.0)
    assert timeouts == [{"connect": 2.0, "read": 900.0, "write": 900.0, "pool": 900.0}]


def test_uploading_a_file_streams_it_with_its_length(tmp_path: Path) -> None:
    """A LoRA file is sent as it is read, never whole in memory, with a Content-Length (a presigned S3 PUT needs
    one), by both clients."""
    import tracemalloc
    from http.server import BaseHTTPRequestHandler

    from file_server import serving

    size = 48 * 1024 * 1024
    path = tmp_path / "style.safetensors"
    with path.open("wb") as f:
        f.truncate(size)
    received: list[tuple[str | None, str | None, int]] = []

    class Storage(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # the initiate: the bytes go to a URL of this same server
            self.rfile.read(int(self.headers["content-length"]))
            base = f"http://127.0.0.1:{self.server.server_address[1]}"
            body = json.dumps({"upload_url": f"{base}/put?sig=1", "file_url": f"{base}/files/style"}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            total = 0
            while total < length and (chunk := self.rfile.read(min(1 << 16, length - total))):
                total += len(chunk)
            received.append((self.headers.get("content-length"), self.headers.get("transfer-encoding"), total))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    async def upload_async(base: str) -> str:
        async with AsyncWanserveClient(base) as aclient:
            return await aclient.upload_file(path)

    with serving(Storage) as base:
        tracemalloc.start()
        try:
            with WanserveClient(base) as client:
                assert client.upload_file(path) == f"{base}/files/style"
            assert asyncio.run(upload_async(base)) == f"{base}/files/style"
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert received == [(str(size), None, size)] * 2
    assert peak < size // 8, f"{peak / 2**20:.1f} MiB held for a {size / 2**20:.0f} MiB upload"


def test_uploading_from_a_pipe_sends_what_it_holds(tmp_path: Path) -> None:
    """A FIFO (or /dev/stdin) has no size to send ahead: it is read whole, not sent as an empty file."""
    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(b"lora bytes" * 100), daemon=True)
    writer.start()
    sent: list[tuple[str | None, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, json={"upload_url": "http://api.test/put", "file_url": "http://api.test/f"})
        sent.append((request.headers.get("content-length"), request.content))
        return httpx.Response(200)

    assert mocked(handler).upload_file(fifo) == "http://api.test/f"
    writer.join(5)
    assert sent == [("1000", b"lora bytes" * 100)]


def test_an_upload_answer_without_its_urls_is_a_clear_error() -> None:
    client = mocked(lambda r: httpx.Response(200, json={}))
    with pytest.raises(ValidationError) as raised:
        client.upload_file(b"bytes")
    assert "upload_url" in str(raised.value)
    assert issubclass(ValidationError, CLIENT_ERRORS) and issubclass(httpx.TooManyRedirects, CLIENT_ERRORS)


def test_a_mapping_request_may_hold_the_request_models() -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={"request_id": "r", "status_url": "s", "response_url": "r", "cancel_url": "c"})

    mocked(handler).submit({"prompt": "a fox", "loras": [LoRAWeight(path="https://x.test/a.safetensors", scale=0.5)]})
    (lora,) = sent[0]["loras"]
    assert lora["path"] == "https://x.test/a.safetensors" and lora["scale"] == 0.5


def test_submit_sends_the_start_timeout_as_the_fal_clients_do() -> None:
    """x-fal-request-timeout, which the server reads as the start timeout (tests/test_server_protocol.py)."""
    sent: list[httpx.Headers] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers)
        return httpx.Response(200, json={"request_id": "r", "status_url": "s", "response_url": "r", "cancel_url": "c"})

    client = mocked(handler)
    client.submit(CHEAP_INPUT, start_timeout=2.5, priority="low")
    client.submit(CHEAP_INPUT)
    assert sent[0]["x-fal-request-timeout"] == "2.5" and sent[0]["x-fal-queue-priority"] == "low"
    assert "x-fal-request-timeout" not in sent[1] and "x-fal-queue-priority" not in sent[1]


def _restore_fal_clients(clients: tuple[Any, ...], keys: list[str | None]) -> None:
    for client, key in zip(clients, keys, strict=True):
        for cached in ("_auth", "_client", "_token_manager"):
            client.__dict__.pop(cached, None)
        object.__setattr__(client, "key", key)  # SyncClient is a frozen dataclass


def test_use_wanserve_sends_the_server_key_and_no_fal_credential(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Whatever fal credentials the environment holds, the official client sends the wanserve key (or the
    placeholder), never FAL_KEY_ID/FAL_KEY_SECRET or a `fal auth login` token."""
    import fal_client

    from wanserve.client.fal import use_wanserve

    monkeypatch.setenv("FAL_KEY", "restored-after-the-test")
    monkeypatch.setenv("FAL_KEY_ID", "fal-id")
    monkeypatch.setenv("FAL_KEY_SECRET", "fal-secret")
    monkeypatch.setenv("FAL_FORCE_AUTH_BY_USER", "1")
    monkeypatch.delenv("WANSERVE_KEY", raising=False)

    async def async_header() -> str:
        return str((await fal_client.async_client._auth).header_value)

    for name in ("QUEUE_URL_FORMAT", "RUN_URL_FORMAT", "REST_URL", "CDN_URL", "REALTIME_URL_FORMAT"):
        monkeypatch.setattr(fal_client.client, name, getattr(fal_client.client, name))  # restored after the test
    clients = (fal_client.sync_client, fal_client.async_client)
    keys_before = [client.key for client in clients]
    request.addfinalizer(lambda: _restore_fal_clients(clients, keys_before))
    use_wanserve("http://api.test", key="")  # a server without keys, its key read as `os.getenv(..., "")`
    assert fal_client.sync_client._auth.header_value == "Key wanserve"
    assert asyncio.run(async_header()) == "Key wanserve"
    monkeypatch.setenv("WANSERVE_KEY", "server-key")
    monkeypatch.setenv("FAL_FORCE_AUTH_BY_USER", "1")
    use_wanserve("http://api.test")
    assert fal_client.sync_client._auth.header_value == "Key server-key"
    assert asyncio.run(async_header()) == "Key server-key"
    assert fal_client.SyncClient()._auth.header_value == "Key server-key"  # a client made later, from FAL_KEY


def test_the_key_never_leaves_for_another_host(tmp_path: Path) -> None:
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization")))
        return httpx.Response(200, content=b"video")

    client = WanserveClient("http://api.test", key="secret")
    transport = httpx.MockTransport(handler)
    client.http = httpx.Client(base_url=client.url, headers=client.http.headers, transport=transport)
    client.plain = httpx.Client(transport=transport)
    client.download("http://api.test/files/a.mp4", tmp_path / "a.mp4")
    client.download("https://bucket.s3.example.com/b.mp4?X-Amz-Signature=x", tmp_path / "b.mp4")
    assert (tmp_path / "b.mp4").read_bytes() == b"video" and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.mp4",
        "b.mp4",
    ]
    assert seen == [
        ("http://api.test/files/a.mp4", "Key secret"),
        ("https://bucket.s3.example.com/b.mp4?X-Amz-Signature=x", None),
    ]


S3_URL = "https://bucket.s3.example.com/c.mp4?X-Amz-Signature=x"


def s3_redirecting(seen: list[tuple[str, str | None]]) -> httpx.MockTransport:
    """A server whose files live on S3: /files/ answers 307 to a presigned URL, which serves the bytes."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization")))
        if request.url.host == "api.test":
            return httpx.Response(307, headers={"location": S3_URL})
        return httpx.Response(200, content=b"video from s3")

    return httpx.MockTransport(handler)


def test_download_follows_the_redirect_to_s3_without_the_key(tmp_path: Path) -> None:
    seen: list[tuple[str, str | None]] = []
    client = WanserveClient("http://api.test", key="secret")
    client.http = httpx.Client(base_url=client.url, headers=client.http.headers, transport=s3_redirecting(seen))
    assert client.download("http://api.test/files/c.mp4", tmp_path / "c.mp4").read_bytes() == b"video from s3"
    assert seen == [("http://api.test/files/c.mp4", "Key secret"), (S3_URL, None)]

    async def download_async() -> bytes:
        aclient = AsyncWanserveClient("http://api.test", key="secret")
        transport = httpx.MockTransport(s3_redirecting(seen).handler)  # type: ignore[arg-type]
        aclient.http = httpx.AsyncClient(base_url=aclient.url, headers=aclient.http.headers, transport=transport)
        path = await aclient.download("http://api.test/files/c.mp4", tmp_path / "d.mp4")
        await aclient.aclose()
        return path.read_bytes()

    seen.clear()
    assert asyncio.run(download_async()) == b"video from s3"
    assert seen == [("http://api.test/files/c.mp4", "Key secret"), (S3_URL, None)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.mp4", "d.mp4"]  # no partial files left


def test_a_status_stream_that_goes_silent_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server sends a keep-alive every KEEPALIVE_S; a stream silent for much longer is a dead connection, which
    must raise (subscribe then polls) rather than block for ever."""
    assert STREAM_TIMEOUT.read is not None and KEEPALIVE_S < STREAM_TIMEOUT.read <= 4 * KEEPALIVE_S
    monkeypatch.setattr(client_module, "STREAM_TIMEOUT", httpx.Timeout(5.0, read=0.3))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def silent_stream() -> None:
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            time.sleep(3)
            conn.close()

        thread = threading.Thread(target=silent_stream, daemon=True)
        thread.start()
        with WanserveClient(f"http://127.0.0.1:{port}") as client, pytest.raises(httpx.ReadTimeout):
            list(client.stream_status("00000000-0000-0000-0000-000000000000"))


def test_sync_client_errors_and_cancel(server: Server) -> None:
    with WanserveClient(server.url) as client:
        with pytest.raises(InputError) as bad:
            client.submit({**CHEAP_INPUT, "num_frames": 500})
        assert bad.value.status_code == 422 and bad.value.field_errors[0]["loc"] == ["body", "num_frames"]
        with pytest.raises(NotFoundError):
            client.status("00000000-0000-0000-0000-000000000000")
        running = client.submit(LONG_INPUT)
        with pytest.raises(NotReady):
            client.result(running.request_id)
        assert client.cancel(running.request_id) is True
        final = list(client.stream_status(running.request_id))[-1]
        assert final.error_type == "client_cancelled"
        with pytest.raises(RequestCancelled) as cancelled:
            client.result(running.request_id)
        assert cancelled.value.status_code == 499 and cancelled.value.request_id == running.request_id


def test_async_client_every_call(server: Server) -> None:
    async def scenario() -> None:
        async with AsyncWanserveClient(server.url) as client:
            submitted = await client.submit({**CHEAP_INPUT, "seed": 21})
            assert (await client.status(submitted.request_id)).request_id == submitted.request_id
            statuses = [s async for s in client.stream_status(submitted.request_id)]
            assert statuses[-1].status == "COMPLETED"
            assert (await client.result(submitted.request_id)).seed == 21

            seen: list[str] = []

            async def on_update(status: QueueStatus) -> None:
                seen.append(status.status)

            async def on_enqueue(request_id: str) -> None:  # a coroutine function is awaited, like on_update
                seen.append(f"enqueued {request_id}")

            done = await client.subscribe({**CHEAP_INPUT, "seed": 22}, on_enqueue=on_enqueue, on_queue_update=on_update)
            assert done.seed == 22
            assert seen[0].startswith("enqueued ") and seen[-1] == "COMPLETED"
            assert (await client.run({**CHEAP_INPUT, "seed": 23})).seed == 23
            url = await client.upload_file(b"async bytes")
            assert httpx.get(url).content == b"async bytes"
            long = await client.submit(LONG_INPUT)
            assert await client.cancel(long.request_id) is True
            [_ async for _ in client.stream_status(long.request_id)]
            with pytest.raises(RequestCancelled):
                await client.result(long.request_id)
            with pytest.raises(InputError):
                await client.run({**CHEAP_INPUT, "resolution": "4k"})

    asyncio.run(scenario())


def test_async_subscribe_takes_plain_callbacks_and_closes_its_stream_when_one_raises(server: Server) -> None:
    """A plain function's return value is not awaited (`lambda s: seen.append(s) or s.status` returns a str), and a
    callback that raises leaves no status stream open behind it (a connection per request in a long-lived service)."""

    def open_connections(client: AsyncWanserveClient) -> int:
        pool = client.http._transport._pool  # type: ignore[attr-defined]
        return sum(not connection.is_idle() for connection in pool.connections)

    async def scenario() -> None:
        async with AsyncWanserveClient(server.url) as client:
            seen: list[QueueStatus] = []
            done = await client.subscribe(
                {**CHEAP_INPUT, "seed": 31},
                on_enqueue=lambda request_id: request_id,
                on_queue_update=lambda s: seen.append(s) or s.status,  # type: ignore[func-returns-value]
            )
            assert done.seed == 31 and seen[-1].status == "COMPLETED"

            def stop(status: QueueStatus) -> None:
                raise LookupError("the caller's own error")

            with pytest.raises(LookupError):
                await client.subscribe(LONG_INPUT, on_queue_update=stop)
            assert open_connections(client) == 0
            running = await client.submit(LONG_INPUT)
            async with contextlib.aclosing(client.follow(running.request_id)) as statuses:
                async for _ in statuses:
                    break  # a caller that stops early, as the follow() docstring says to
            assert open_connections(client) == 0
            assert await client.cancel(running.request_id) is True

    asyncio.run(scenario())


def test_a_status_stream_connects_within_the_clients_own_timeout() -> None:
    timeout = stream_timeout(httpx.Timeout(3.0))
    assert timeout.connect == 3.0 and timeout.read == STREAM_TIMEOUT.read and timeout.pool == STREAM_TIMEOUT.pool


def test_downloads_to_one_path_stage_in_files_of_their_own(tmp_path: Path) -> None:
    """Two `wanserve result ... -o v.mp4` at once must not write into one staging file: the one finishing first
    would rename the other's half-written bytes into place."""
    target = tmp_path / "v.mp4"
    assert staging_path(target) != staging_path(target) and staging_path(target).parent == tmp_path
    other = target.with_name(".v.mp4.part")  # another download's staging file, as named before
    other.write_bytes(b"another download")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"video")

    with WanserveClient("http://api.test") as client:
        client.http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(handler))
        client.download("http://api.test/files/k/v.mp4", target)
    assert target.read_bytes() == b"video" and other.read_bytes() == b"another download"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".v.mp4.part", "v.mp4"]
