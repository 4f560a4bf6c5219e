"""The official Python client (PyPI fal-client, pinned) drives a real server, pointed at it in one line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import fal_client
import fal_client.client as fal_module
import httpx
import pytest
from server import CHEAP_INPUT, Server

from wanserve.client.fal import use_wanserve

APP = "fal-ai/wan-22"


@pytest.fixture(scope="module", autouse=True)
def pointed(server: Server) -> None:
    use_wanserve(server.url)


def _check_video(output: dict[str, Any], seed: int) -> bytes:
    assert output["seed"] == seed
    assert output["prompt"] == CHEAP_INPUT["prompt"]
    video = output["video"]
    assert video["content_type"] == "video/mp4" and video["file_name"].endswith(".mp4")
    response = httpx.get(video["url"])
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    assert len(response.content) == video["file_size"] and response.content[4:8] == b"ftyp"
    return response.content


def test_subscribe_reports_queue_updates_with_step_logs() -> None:
    updates: list[Any] = []
    enqueued: list[str] = []
    output = fal_client.subscribe(
        APP,
        arguments={**CHEAP_INPUT, "seed": 11},
        with_logs=True,
        on_enqueue=enqueued.append,
        on_queue_update=updates.append,
    )
    _check_video(output, 11)
    assert len(enqueued) == 1
    kinds = {type(u).__name__ for u in updates}
    assert "Completed" in kinds
    in_progress_logs = [log["message"] for u in updates if isinstance(u, fal_client.InProgress) for log in u.logs or []]
    assert any(m.startswith("step 1/1") for m in in_progress_logs), in_progress_logs
    final = updates[-1]
    assert isinstance(final, fal_client.Completed) and final.error is None
    assert final.metrics["inference_time"] > 0
    messages = [log["message"] for log in final.logs or []]
    assert messages.index("Decoding video") > messages.index(next(m for m in messages if m.startswith("step 1/1")))


def test_submit_status_result() -> None:
    handle = fal_client.submit(APP, arguments={**CHEAP_INPUT, "seed": 11})
    assert handle.status_url.startswith("http://127.0.0.1")
    first = handle.status()
    assert isinstance(first, fal_client.Queued | fal_client.InProgress | fal_client.Completed)
    output = handle.get()
    again = fal_client.result(APP, handle.request_id)
    assert again == output
    status = fal_client.status(APP, handle.request_id, with_logs=True)
    assert isinstance(status, fal_client.Completed) and status.logs and status.error is None
    assert status.metrics["inference_time"] > 0


def test_run_returns_the_output_directly() -> None:
    output = fal_client.run(APP, arguments={**CHEAP_INPUT, "seed": 5})
    _check_video(output, 5)


def test_stream_ends_with_the_output() -> None:
    events = list(fal_client.stream(APP, arguments={**CHEAP_INPUT, "seed": 6}))
    assert events[-1]["seed"] == 6 and events[-1]["video"]["content_type"] == "video/mp4"
    progress = [log["message"] for e in events[:-1] for log in e.get("logs") or []]
    assert any(m.startswith("step 1/1") for m in progress)


def test_cancel_a_queued_request() -> None:
    blocker = fal_client.submit(APP, arguments={**CHEAP_INPUT, "num_inference_steps": 3})
    victim = fal_client.submit(APP, arguments=CHEAP_INPUT, priority="low")
    fal_client.cancel(APP, victim.request_id)
    status = victim.status()
    assert isinstance(status, fal_client.Completed)
    assert status.error_type == "client_cancelled"
    with pytest.raises(fal_client.FalClientHTTPError) as err:
        victim.get()
    assert err.value.status_code == 499 and err.value.error_type == "client_cancelled"
    # Cancelling again: the request already completed.
    with pytest.raises(fal_client.FalClientHTTPError) as again:
        victim.cancel()
    assert again.value.status_code == 400
    blocker.cancel()  # running: stops at its next step
    deadline = time.monotonic() + 60
    while not isinstance(status := blocker.status(with_logs=True), fal_client.Completed):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status.error_type == "client_cancelled"
    assert not any(log["message"].startswith("step 3/3") for log in status.logs or [])


def test_validation_error_names_the_field() -> None:
    with pytest.raises(fal_client.FalClientHTTPError) as err:
        fal_client.subscribe(APP, arguments={**CHEAP_INPUT, "num_frames": 500})
    assert err.value.status_code == 422
    detail = err.value.message
    assert isinstance(detail, list) and detail[0]["loc"] == ["body", "num_frames"]
    assert "121" in detail[0]["msg"]


def test_upload_file_through_the_cdn_flow(tmp_path: Path) -> None:
    path = tmp_path / "still.png"
    data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
    path.write_bytes(data)
    url = fal_client.upload_file(path)
    response = httpx.get(url)
    assert response.content == data and response.headers["content-type"] == "image/png"
    assert url.endswith("/still.png")


def test_upload_through_the_rest_flow_with_lifecycle() -> None:
    url = fal_client.upload(
        b"hello", "text/plain", "hello.txt", repository="fal", lifecycle=fal_client.StorageSettings(expires_in=60)
    )
    response = httpx.get(url)
    assert response.text == "hello" and response.headers["content-type"].startswith("text/plain")


def test_multipart_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    # The client switches to multipart above 100 MB; lower its threshold so the real code path runs small.
    monkeypatch.setattr(fal_module, "MULTIPART_THRESHOLD", 1000)
    monkeypatch.setattr(fal_module, "MULTIPART_CHUNK_SIZE", 700)
    data = bytes(range(256)) * 10  # 2560 bytes: 4 parts, uploaded in parallel
    url = fal_client.upload(data, "application/octet-stream", "blob.bin")
    assert httpx.get(url).content == data
