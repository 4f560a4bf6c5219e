"""The wire protocol over plain HTTP, against a real server: the parts the official clients do not cover."""

from __future__ import annotations

import json
import re
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from file_checks import assert_conditional_requests, assert_served_with_its_own_type, object_files
from server import CHEAP_INPUT, Server, wait_completed

from wanserve.store.sqlite import SQLiteJobStore

APP = "fal-ai/wan-22"


def _submit(server: Server, body: dict[str, object], **headers: str) -> dict[str, object]:
    response = httpx.post(f"{server.url}/{APP}", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_bad_input_gets_a_clear_error_never_a_trace(server: Server) -> None:
    cases = [
        (httpx.post(f"{server.url}/{APP}", content=b"{not json", headers={"content-type": "application/json"}), 400),
        (httpx.post(f"{server.url}/{APP}", json=[1, 2]), 422),
        (httpx.post(f"{server.url}/{APP}", json={"prompt": ""}), 422),
        (httpx.post(f"{server.url}/{APP}", json={"prompt": "x", "resolution": "4k"}), 422),
        (httpx.post(f"{server.url}/fal-ai/unknown-app", json={"prompt": "x"}), 404),
        (httpx.get(f"{server.url}/{APP}/requests/nope/status"), 404),
        (httpx.get(f"{server.url}/{APP}/requests/nope"), 404),
        (httpx.post(f"{server.url}/{APP}", json=CHEAP_INPUT, headers={"x-fal-request-timeout": "0.5"}), 400),
        (httpx.post(f"{server.url}/{APP}", json=CHEAP_INPUT, params={"fal_webhook": "ftp://x"}), 400),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert "detail" in body and "Traceback" not in response.text
        if status != 422:
            assert body["error_type"] and response.headers["x-fal-error-type"] == body["error_type"]
    enum_error = cases[3][0].json()["detail"][0]
    assert enum_error["loc"] == ["body", "resolution"] and "480p" in enum_error["msg"]
    cancel = httpx.put(f"{server.url}/{APP}/requests/nope/cancel")
    assert cancel.status_code == 404 and cancel.json()["status"] == "NOT_FOUND"  # fal's field, plus the reason:
    assert cancel.json()["error_type"] == cancel.headers["x-fal-error-type"] == "not_found" and cancel.json()["detail"]


def test_proxy_route_dispatches_by_target_url(server: Server) -> None:
    proxy = f"{server.url}/api/fal/proxy"
    missing = httpx.post(proxy, json=CHEAP_INPUT)
    assert missing.status_code == 400 and "x-fal-target-url" in missing.json()["detail"]
    foreign = httpx.post(proxy, json=CHEAP_INPUT, headers={"x-fal-target-url": "https://example.com/fal-ai/wan-22"})
    assert foreign.status_code == 400
    invalid = httpx.post(proxy, json={"prompt": ""}, headers={"x-fal-target-url": f"https://queue.fal.run/{APP}"})
    assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"] == ["body", "prompt"]
    submitted = httpx.post(
        proxy, json={**CHEAP_INPUT, "seed": 3}, headers={"x-fal-target-url": f"https://queue.fal.run/{APP}"}
    ).json()
    request_id = submitted["request_id"]
    target = f"https://queue.fal.run/{APP}/requests/{request_id}/status?logs=1"
    status = httpx.get(proxy, headers={"x-fal-target-url": target})
    assert status.status_code in (200, 202) and status.json()["request_id"] == request_id
    assert status.headers["x-fal-request-id"] == request_id
    cancel = httpx.put(proxy, headers={"x-fal-target-url": f"https://queue.fal.run/{APP}/requests/{request_id}/cancel"})
    assert cancel.status_code in (202, 400)
    wait_completed(server, APP, request_id)


def test_start_timeout_expires_a_request_that_waits_too_long(server: Server) -> None:
    # Busy for well over the 1.5 s start timeout (the cheap model decodes and encodes a 480p video in about 1.5 s).
    blocker = _submit(server, {**CHEAP_INPUT, "num_inference_steps": 12})
    late = {"x-fal-request-timeout": "1.5", "x-fal-queue-priority": "low"}
    waiting = _submit(server, CHEAP_INPUT, **late)
    # The sync run keeps the 504 too (its other retried statuses become 500): the JS client's isUserTimeout.
    run = httpx.post(f"{server.url}/run/{APP}", json=CHEAP_INPUT, headers=late, timeout=60)
    assert run.status_code == 504 and run.headers["x-fal-request-timeout-type"] == "user"
    assert run.json()["error_type"] == "request_timeout"
    status = wait_completed(server, APP, str(waiting["request_id"]), timeout_s=30)
    assert status["error_type"] == "request_timeout"
    result = httpx.get(str(waiting["response_url"]))
    assert result.status_code == 504 and result.headers["x-fal-request-timeout-type"] == "user"
    httpx.put(str(blocker["cancel_url"]))


def test_sync_run_stream_sends_progress_then_the_output(server: Server) -> None:
    events = []
    with httpx.stream("POST", f"{server.url}/run/{APP}/stream", json={**CHEAP_INPUT, "seed": 9}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["seed"] == 9
    statuses = [e["status"] for e in events[:-1]]
    assert statuses[-1] == "COMPLETED" and "IN_PROGRESS" in statuses
    messages = [log["message"] for e in events[:-1] for log in e.get("logs") or []]
    assert len(messages) == len(set(messages))  # each event carries only new lines


def test_what_the_server_and_its_worker_write_is_private_to_their_user(server: Server) -> None:
    """The job database holds every prompt, and result URLs are secrets: so are the files behind them."""
    result = httpx.post(f"{server.url}/run/{APP}", json={**CHEAP_INPUT, "seed": 11}, timeout=120).json()
    assert result["video"]["url"]
    written = [server.data_dir, *server.data_dir.rglob("*")]
    assert any(path.suffix == ".mp4" for path in written) and any(path.name == "jobs.sqlite3" for path in written)
    shared = [f"{path} {stat.S_IMODE(path.stat().st_mode):o}" for path in written if path.stat().st_mode & 0o077]
    assert shared == []


def test_the_server_log_has_a_line_for_each_jobs_start_and_end(server: Server) -> None:
    job = _submit(server, {**CHEAP_INPUT, "seed": 12})["request_id"]
    assert httpx.get(f"{server.url}/{APP}/requests/{job}", params={"wait": 1}).status_code in (200, 400)
    deadline = time.monotonic() + 60
    while f"job {job} completed in" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = server.log()
    assert re.search(rf"INFO wanserve.worker: job {job} started \(attempt 1\): \d+ frames at \d+x\d+", log), log
    assert re.search(rf"INFO wanserve.worker: job {job} completed in [\d.]+s", log), log


def test_files_support_range_requests_and_expire(server: Server) -> None:
    body = _submit(
        server,
        {**CHEAP_INPUT, "seed": 4},
        **{"x-fal-object-lifecycle-preference": '{"expiration_duration_seconds": 30}'},
    )
    wait_completed(server, APP, str(body["request_id"]))
    output = httpx.get(str(body["response_url"])).json()
    url = output["video"]["url"]
    full = httpx.get(url)
    assert full.headers["content-length"] == str(output["video"]["file_size"])
    # The video lives as long as the request's lifecycle asked (30 s from its completion), and no cache keeps it longer
    scope, _, max_age = full.headers["cache-control"].partition(", max-age=")
    assert scope == "public" and 20 <= int(max_age) <= 30, full.headers["cache-control"]
    part = httpx.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == full.content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(full.content)}"
    head = httpx.head(url)
    assert head.status_code == 200 and head.headers["content-type"] == "video/mp4"
    missing = httpx.get(url.rsplit("/", 1)[0] + "/other.mp4")
    assert missing.status_code == 404 and missing.json()["error_type"] == "file_not_found"
    assert httpx.get(f"{server.url}/files/..%2F..%2Fjobs.sqlite3").status_code in (400, 404)


def test_a_kept_alive_connection_outlasts_the_clients_own_keep_alive(server: Server) -> None:
    """httpx (under both fal clients) keeps an idle connection 5 s: the server keeps it longer, so a poll sent after
    a pause of about that long never lands on a connection the server is closing (uvicorn's own limit was 5 s, and
    such a poll failed: "Server disconnected without sending a response")."""
    port = int(server.url.rsplit(":", 1)[1])
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for pause in (0.0, 6.0):
            time.sleep(pause)
            sock.sendall(request)
            answer = _one_response(sock)
            assert answer.startswith(b"HTTP/1.1 200"), (pause, answer[:100])


def _one_response(sock: socket.socket) -> bytes:
    """One whole HTTP response (its head, then Content-Length bytes of body): a recv() may return part of it, and
    the rest would be read as the start of the next answer. b"" when the server closed the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_health_ready_metrics_openapi_jwks(server: Server) -> None:
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    ready = httpx.get(f"{server.url}/ready").json()
    assert ready["ready"] is True and len(ready["workers"]) == 1
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'wanserve_jobs{state="COMPLETED"}' in metrics and "wanserve_workers_ready 1.0" in metrics
    assert "wanserve_http_requests_total" in metrics
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert "/{app}/requests/{request_id}/status" in paths
    keys = httpx.get(f"{server.url}/.well-known/jwks.json").json()["keys"]
    assert keys[0]["kty"] == "OKP" and keys[0]["crv"] == "Ed25519"


@pytest.mark.parametrize("priority", ["normal", "low"])
def test_queue_position_is_reported_while_queued(server: Server, priority: str) -> None:
    """Positions count the queued requests ahead; a normal request submitted later goes ahead of a low one."""
    blocker = _submit(server, {**CHEAP_INPUT, "num_inference_steps": 12})
    deadline = time.monotonic() + 60
    while httpx.get(str(blocker["status_url"])).json()["status"] == "IN_QUEUE":  # the worker is busy with it
        assert time.monotonic() < deadline
        time.sleep(0.05)
    queued = _submit(server, CHEAP_INPUT, **{"x-fal-queue-priority": priority})
    later = _submit(server, CHEAP_INPUT)
    positions = []
    for request in (queued, later):
        status = httpx.get(str(request["status_url"]))
        assert status.status_code == 202 and status.json()["status"] == "IN_QUEUE"
        positions.append(status.json()["queue_position"])
    assert positions == ([0, 1] if priority == "normal" else [1, 0])
    for request in (queued, later, blocker):
        httpx.put(str(request["cancel_url"]))
    wait_completed(server, APP, str(blocker["request_id"]))


def test_js_style_multipart_upload(server: Server) -> None:
    """@fal-ai/client's multipart flow (used above 90 MB): initiate, PUT numbered parts, POST complete."""
    init = httpx.post(
        f"{server.url}/rest/storage/upload/initiate-multipart",
        params={"storage_type": "fal-cdn-v3"},
        json={"content_type": "application/octet-stream", "file_name": "weights.safetensors"},
    ).json()
    upload = httpx.URL(init["upload_url"])
    base = f"{upload.scheme}://{upload.netloc.decode()}{upload.path}"
    chunks = [bytes([n]) * 1000 for n in range(1, 4)]
    parts = []
    for number, chunk in reversed(list(enumerate(chunks, start=1))):  # order of arrival does not matter
        response = httpx.put(f"{base}/{number}", params=upload.params, content=chunk)
        assert response.status_code == 200 and response.json()["partNumber"] == number
        parts.append(response.json())
    forged = httpx.put(f"{base}/1", params={**dict(upload.params), "sig": "0" * 64}, content=b"x")
    assert forged.status_code == 401
    done = httpx.post(f"{base}/complete", params=upload.params, json={"parts": parts})
    assert done.status_code == 200, done.text
    stored = httpx.get(init["file_url"])
    assert stored.content == b"".join(chunks)
    assert init["file_url"].endswith("/weights.safetensors")


def test_rest_upload_url_is_signed(server: Server) -> None:
    init = httpx.post(
        f"{server.url}/rest/storage/upload/initiate", json={"content_type": "image/png", "file_name": "a.png"}
    ).json()
    url = httpx.URL(init["upload_url"])
    tampered = url.copy_merge_params({"content_type": "text/html"})
    assert httpx.put(tampered, content=b"<script>").status_code == 401
    assert httpx.put(url, content=b"png-bytes").status_code == 200
    response = httpx.get(init["file_url"])
    assert response.content == b"png-bytes" and response.headers["content-type"] == "image/png"


def test_a_sub_second_lifetime_is_rounded_up_not_down_to_expired(server: Server) -> None:
    init = httpx.post(
        f"{server.url}/rest/storage/upload/initiate",
        json={"file_name": "brief.bin"},
        headers={"X-Fal-Object-Lifecycle": '{"expiration_duration_seconds": 0.5}'},
    ).json()
    assert "life=1" in init["upload_url"]


@contextmanager
def one_more_cancellation(server: Server) -> Iterator[None]:
    """Asserts that the block leads the server to cancel one more request (within a minute)."""
    store = SQLiteJobStore(server.data_dir / "jobs.sqlite3")
    before = store.counts().get("outcome:client_cancelled", 0)
    yield
    deadline = time.monotonic() + 60
    while store.counts().get("outcome:client_cancelled", 0) == before:
        assert time.monotonic() < deadline, store.counts()
        time.sleep(0.2)
    store.close()


def test_a_sync_run_whose_caller_hangs_up_is_cancelled(server: Server) -> None:
    # 40 steps: far longer than the caller waits (4 steps of the test model can finish inside its 2.5 s)
    with one_more_cancellation(server), pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/run/{APP}", json={**CHEAP_INPUT, "num_inference_steps": 40}, timeout=2.5)


def test_hostile_inputs_get_4xx_never_500(server: Server) -> None:
    nested = b"[" * 100_000
    response = httpx.post(f"{server.url}/{APP}", content=nested, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error_type"] == "bad_request"
    huge = httpx.post(f"{server.url}/{APP}", json={"prompt": "x" * (2 * 1024 * 1024)})
    assert huge.status_code == 413
    init = httpx.post(f"{server.url}/rest/storage/upload/initiate", json={"file_name": "a.bin"}).json()
    bad_sig = httpx.put(init["upload_url"].split("sig=")[0] + "sig=%C3%A9", content=b"x")
    assert bad_sig.status_code == 401


def test_uploaded_files_never_run_as_pages(server: Server) -> None:
    init = httpx.post(
        f"{server.url}/rest/storage/upload/initiate", json={"content_type": "text/html", "file_name": "x.html"}
    ).json()
    assert httpx.put(init["upload_url"], content=b"<script>alert(1)</script>").status_code == 200
    page = httpx.get(init["file_url"])
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["content-disposition"].startswith("attachment")
    assert "sandbox" in page.headers["content-security-policy"]


def test_a_stream_whose_caller_hangs_up_is_cancelled(server: Server) -> None:
    body = {**CHEAP_INPUT, "num_inference_steps": 4}
    with (
        one_more_cancellation(server),
        httpx.stream("POST", f"{server.url}/run/{APP}/stream", json=body, timeout=60) as response,
    ):
        for line in response.iter_lines():
            if "step 1/4" in line:
                break  # leave after the first step: closing the connection hangs up


def test_expired_uploads_are_swept_from_disk(server: Server) -> None:
    init = httpx.post(
        f"{server.url}/rest/storage/upload/initiate",
        json={"content_type": "text/plain", "file_name": "short-lived.txt"},
        headers={"X-Fal-Object-Lifecycle": '{"expiration_duration_seconds": 1}'},
    ).json()
    assert httpx.put(init["upload_url"], content=b"gone soon").status_code == 200
    assert httpx.get(init["file_url"]).text == "gone soon"
    key = init["file_url"].split("/files/", 1)[1]
    (on_disk,) = object_files(server.data_dir / "files", key)
    deadline = time.monotonic() + 15
    while on_disk.exists():
        assert time.monotonic() < deadline, "the sweep never deleted the expired file"
        time.sleep(0.2)
    assert httpx.get(init["file_url"]).status_code == 404


def test_sync_run_with_get_takes_the_input_from_the_query(server: Server) -> None:
    """The JS client's `fal.run(id, {method: "get", input})` sends the input as query parameters."""
    query = {key: str(value) for key, value in {**CHEAP_INPUT, "seed": 12, "enable_safety_checker": "false"}.items()}
    response = httpx.get(f"{server.url}/run/{APP}", params=query, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["seed"] == 12
    invalid = httpx.get(f"{server.url}/run/{APP}", params={**query, "num_frames": "many"})
    assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"] == ["body", "num_frames"]


def test_fuzzed_requests_get_json_4xx_never_500(server: Server) -> None:
    """Inputs found by fuzzing that once crashed a handler or its error reply."""

    def post(body: bytes, **headers: str) -> httpx.Response:
        return httpx.post(f"{server.url}/{APP}", content=body, headers={"content-type": "application/json", **headers})

    for body in (b'{"prompt":"x","seed":NaN}', b'{"prompt":"x","num_frames":Infinity}', b'{"prompt":"x","seed":1e400}',
                 b'{"prompt":"x","resolution":"\\ud800"}', b'{"prompt":"\\ud800","num_frames":5}'):  # fmt: skip
        response = post(body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["detail"][0]["loc"][0] == "body"
    deep = "[" * 3000 + "]" * 3000
    assert post(b'{"prompt":"x"}', **{"x-fal-object-lifecycle-preference": deep}).status_code == 400
    proxy = f"{server.url}/api/fal/proxy"
    for target in ("http://[::1", "http://[zz]/"):
        assert httpx.post(proxy, json={}, headers={"x-fal-target-url": target}).status_code == 400
    initiate = f"{server.url}/rest/storage/upload/initiate"
    for content_type in ("é☃/x", "a\r\nX-Evil: 1", "nonsense"):
        response = httpx.post(initiate, json={"content_type": content_type})
        assert response.status_code in (400, 422) and response.headers["content-type"] == "application/json"


def test_range_errors_are_json(server: Server) -> None:
    init = httpx.post(
        f"{server.url}/rest/storage/upload/initiate",
        json={"content_type": "application/octet-stream", "file_name": "ten.bin"},
    ).json()
    assert httpx.put(init["upload_url"], content=b"0123456789").status_code == 200
    url = init["file_url"]
    expected = {"bytes=999999999-": 416, "bytes=-0": 416, "bytes=5-2": 400, "bytes=x": 400}
    for header, status in expected.items():
        response = httpx.get(url, headers={"Range": header})
        assert response.status_code == status, header
        assert response.headers["content-type"] == "application/json" and response.json()["error_type"]
    # A range unit other than bytes is ignored (RFC 9110 14.2): the whole file.
    whole = httpx.get(url, headers={"Range": "items=0-1"})
    assert whole.status_code == 200 and whole.content == b"0123456789"
    assert httpx.get(url, headers={"Range": "bytes=999999999-"}).headers["content-range"] == "bytes */10"
    assert httpx.get(url, headers={"Range": "bytes=-3"}).content == b"789"
    # One satisfiable range in the set is enough: the others are ignored (RFC 9110 14.1.1), not a 416.
    one_left = httpx.get(url, headers={"Range": "bytes=2-4, 50-60"})
    assert one_left.status_code == 206 and one_left.content == b"234"
    assert one_left.headers["content-range"] == "bytes 2-4/10"
    assert httpx.get(url, headers={"Range": "bytes=0-" + "9" * 5000}).status_code == 400  # not a 500
    etag = httpx.head(url).headers["etag"]
    assert httpx.get(url, headers={"Range": "bytes=2-4", "If-Range": etag}).content == b"234"
    changed = httpx.get(url, headers={"Range": "bytes=2-4", "If-Range": '"another-version"'})
    assert changed.status_code == 200 and changed.content == b"0123456789"  # the Range is ignored
    stale = httpx.get(url, headers={"Range": "bytes=50-", "If-Range": '"another-version"'})
    assert stale.status_code == 200  # not a 416 for a Range that is ignored
    two_left = httpx.get(url, headers={"Range": "bytes=0-1,99-,8-"})
    assert two_left.status_code == 206 and two_left.headers["content-type"].startswith("multipart/byteranges")
    assert b"01" in two_left.content and b"89" in two_left.content
    empty = httpx.post(
        f"{server.url}/rest/storage/upload/initiate",
        json={"content_type": "application/octet-stream", "file_name": "empty.bin"},
    ).json()
    assert httpx.put(empty["upload_url"], content=b"").status_code == 200
    for header in ("bytes=-5", "bytes=0-"):  # no byte of an empty file exists
        response = httpx.get(empty["file_url"], headers={"Range": header})
        assert response.status_code == 416 and response.json()["error_type"], header
    assert_conditional_requests(url, b"0123456789")
    assert_served_with_its_own_type(server.url)
