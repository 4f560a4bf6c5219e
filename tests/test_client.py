"""The wanserve Python client (sync and async) against a real server, and its protocol pieces."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
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
)
from wanserve.client.commands import ProgressView
from wanserve.progress import StepLine
from wanserve.schema import WanT2VRequest

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
