"""The wanserve Python client (sync and async) against a real server, and its protocol pieces."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from server import CHEAP_INPUT, Server

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
from wanserve.client.client import (
    SseDecoder,
    StatusAccumulator,
    app_of,
    error_from_response,
    resolve_endpoint,
    same_origin,
)
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

            assert (await client.subscribe({**CHEAP_INPUT, "seed": 22}, on_queue_update=on_update)).seed == 22
            assert seen[-1] == "COMPLETED"
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
