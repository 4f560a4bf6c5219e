"""Input limits: each one is a setting, and going over it is a clear 4xx that leaves the job store as it was.

- JSON request bodies (`max_body_bytes`): 413, counted as the body streams in (a chunked body without a
  Content-Length is stopped too, without being read to its end); uploads are not JSON bodies and keep theirs;
- prompt and negative prompt (`max_prompt_chars`), LoRAs per request (`max_loras`) and `data:` URIs
  (`max_data_uri_bytes`): 422 whose `loc` names the field;
- uploads (`max_upload_bytes`): 413, whichever upload flow, and nothing stored;
- URL downloads (`lora_max_bytes`, `lora_download_timeout_s`): the LoRA fails with `file_download_error` on its
  field, stopped at the limit rather than after the whole file or the whole trickle.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from disk import fill, not_root_or_fail, tmpfs, use_up_inodes
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.testclient import TestClient

from wanserve.api.app import create_app
from wanserve.client.local_server import free_port
from wanserve.config import Settings
from wanserve.errors import FieldError
from wanserve.files import space
from wanserve.files.local import LocalFileStore
from wanserve.jobs.service import validation_errors
from wanserve.lora.sources import LoraResolver
from wanserve.schema import LoRAWeight, WanLoRAT2VRequest, WanT2VRequest

APP = "fal-ai/wan-22"
LORA_APP = f"{APP}/lora"
KiB = 1024
LIMITS: dict[str, Any] = {
    "max_body_bytes": 4 * KiB,
    "max_prompt_chars": 100,
    "max_loras": 2,
    "max_data_uri_bytes": 256,
    "max_upload_bytes": 64 * KiB,
}


def limited_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"data_dir": tmp_path / "data", "public_url": "http://testserver", **LIMITS, **overrides}
    return Settings(**values)


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    return create_app(limited_settings(tmp_path), workers=0)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def job_counts(client: TestClient) -> dict[str, int]:
    counts: dict[str, int] = client.app.state.context.store.counts()  # type: ignore[attr-defined]
    return counts


def stored_files(client: TestClient) -> list[Path]:
    files: LocalFileStore = client.app.state.context.files  # type: ignore[attr-defined]
    return stored_files_under(files.root)


def stored_files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def assert_refused(response: Any, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-fal-error-type"] == error_type
    body: dict[str, Any] = response.json()
    assert "Traceback" not in response.text
    return body


def assert_field_refused(response: Any, *locs: list[Any]) -> list[dict[str, Any]]:
    """422 whose `detail` entries name exactly these fields (as FastAPI and fal answer a schema violation)."""
    detail: list[dict[str, Any]] = assert_refused(response, 422, "validation_error")["detail"]
    assert [entry["loc"] for entry in detail] == list(locs)
    assert all(entry["msg"] and entry["type"] for entry in detail)
    return detail


class Chunks:
    """A request body sent in chunks with no Content-Length; remembers how many chunks the server pulled."""

    def __init__(self, chunk: bytes, count: int) -> None:
        self.chunk, self.count, self.sent = chunk, count, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            self.sent += 1
            yield self.chunk


def send_chunked(client: TestClient, method: str, path: str, chunks: Chunks, headers: dict[str, str]) -> httpx.Response:
    """Sends `chunks` to the client's app through httpx's ASGI transport, which passes the body on one chunk at a
    time as the app asks for it (the test client reads a body whole before the app sees any of it)."""

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            return await http.request(method, path, content=chunks, headers=headers)

    return asyncio.run(send())


# --- request bodies ---


def big_input(size: int) -> bytes:
    """A valid submit body of exactly `size` bytes (padded with an unknown field, which is ignored)."""
    body = json.dumps({"prompt": "a fox", "padding": ""}).encode()
    return body.replace(b'"padding": ""', b'"padding": "' + b"x" * (size - len(body)) + b'"')


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", f"/{APP}", {}),
        ("POST", f"/run/{APP}", {}),
        ("GET", f"/run/{APP}?prompt=a+fox", {}),  # the input is in the query; a body is still limited
        ("POST", "/api/fal/proxy", {"x-fal-target-url": f"https://queue.fal.run/{APP}"}),
        ("POST", "/cdn/files/upload/", {}),  # not the upload route: a submit to an app of that name
        ("POST", "/api/fal/proxy", {"x-fal-target-url": "https://v3.fal.media/files/upload/"}),
        ("POST", "/rest/storage/upload/initiate", {}),  # a body the framework parses itself
        ("PUT", f"/{APP}/requests/x/cancel", {}),  # a route that never reads its body
    ],
)
def test_a_json_body_over_the_limit_is_413_declared_or_streamed(
    client: TestClient, method: str, path: str, headers: dict[str, str]
) -> None:
    before = job_counts(client)
    headers = {"content-type": "application/json", **headers}
    declared = client.request(method, path, content=big_input(4 * KiB + 1), headers=headers)
    body = assert_refused(declared, 413, "payload_too_large")
    assert body["error_type"] == "payload_too_large" and "4096-byte limit" in body["detail"]

    chunks = Chunks(b" " * KiB, 1000)  # 1000 KiB of JSON whitespace, without a Content-Length
    streamed = send_chunked(client, method, path, chunks, headers)
    if path.endswith("/cancel"):
        assert streamed.status_code == 404  # the body is never read, so never counted: nothing to refuse
    else:
        assert_refused(streamed, 413, "payload_too_large")
        assert chunks.sent <= 6, f"read {chunks.sent} KiB of a body over a 4 KiB limit"
    assert job_counts(client) == before


def test_a_submit_route_refuses_a_body_over_the_limit_that_the_middleware_let_through(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The submit routes count their body themselves: a path the middleware took for an upload's is limited too."""
    monkeypatch.setattr("wanserve.api.limits.is_upload", lambda method, path: True)
    chunks = Chunks(b" " * KiB, 1000)
    refused = send_chunked(client, "POST", f"/{APP}", chunks, {"content-type": "application/json"})
    assert_refused(refused, 413, "payload_too_large")
    assert chunks.sent <= 6, f"read {chunks.sent} KiB of a body over a 4 KiB limit"


def test_a_body_at_the_limit_is_read(client: TestClient) -> None:
    before = job_counts(client)["IN_QUEUE"]
    response = client.post(f"/{APP}", content=big_input(4 * KiB), headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert job_counts(client)["IN_QUEUE"] == before + 1


def test_a_raised_body_limit_raises_it_for_submits_too(tmp_path: Path) -> None:
    app = create_app(limited_settings(tmp_path, max_body_bytes=2 * 1024**2), workers=0)
    with TestClient(app, raise_server_exceptions=False) as client:
        ok = client.post(f"/{APP}", content=big_input(1024**2 + 1), headers={"content-type": "application/json"})
        assert ok.status_code == 200, ok.text


@contextmanager
def live_app(tmp_path: Path) -> Iterator[tuple[int, FastAPI]]:
    """The app (limits as above) on uvicorn in a thread: (its port, the app)."""
    port = free_port()
    app = create_app(limited_settings(tmp_path, port=port, public_url=f"http://127.0.0.1:{port}"), workers=0)
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.01)
    try:
        yield port, app
    finally:
        server.should_exit = True
        thread.join(10)


def send_chunked_over_a_socket(port: int, method: str, path: str, chunks: int, until_answered: bool = True) -> bytes:
    """Sends a chunked body of `chunks` KiB (never its end; stopping once an answer comes, if `until_answered`);
    then reads until the server closes the connection, which it must do within 2 s (uvicorn's own keep-alive
    timeout is 5 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        sock.sendall(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n")
        answer = b""
        for _ in range(chunks):
            try:
                sock.sendall(b"400\r\n" + b" " * KiB + b"\r\n")
            except OSError:
                break  # the server hung up: its answer is waiting
            sock.settimeout(0.02)
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            if until_answered and b"\r\n\r\n" in answer:
                break
        sock.settimeout(2)
        while data := sock.recv(65536):
            answer += data
    return answer


@pytest.mark.parametrize(("path", "limit"), [(f"/{APP}", 4 * KiB), ("/cdn/files/upload", 64 * KiB)])
def test_a_real_server_stops_a_chunked_body_and_hangs_up(tmp_path: Path, path: str, limit: int) -> None:
    """Over a socket: the 413 comes back while the client is still sending, and the server closes the connection
    at once (rather than reading the rest of the body until its keep-alive timeout)."""
    with live_app(tmp_path) as (port, _):
        answer = send_chunked_over_a_socket(port, "POST", path, 2 * limit // KiB)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:300]
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in headers.lower()
    assert json.loads(body)["error_type"] == "payload_too_large"


def test_a_body_sent_to_an_open_stream_is_cut_off_at_the_limit(tmp_path: Path) -> None:
    """A status stream has answered already (no 413 possible) when it reads the body to watch for a hang-up:
    once the body passes the limit (4 KiB here; 8 KiB are sent), the connection is closed, as when the client
    goes. A queued request's stream stays open otherwise, and send_chunked_over_a_socket fails after 2 s."""
    with live_app(tmp_path) as (port, app):
        job = app.state.context.service.submit(APP, {"prompt": "a fox"})  # queued: its stream would stay open
        stream = f"/{APP}/requests/{job.id}/status/stream"
        answer = send_chunked_over_a_socket(port, "GET", stream, 8, until_answered=False)
    assert answer.startswith(b"HTTP/1.1 200") and b"IN_QUEUE" in answer


def test_an_upload_the_client_abandons_midway_leaves_no_file_and_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that hangs up mid-body (an upload cancelled in a browser) is nobody's error: nothing is stored,
    the temp file goes, and the log has no traceback for it."""
    with live_app(tmp_path) as (port, app):
        files: LocalFileStore = app.state.context.files
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            head = "POST /cdn/files/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
            sock.sendall(head.encode() + b"Content-Length: 50000\r\n\r\n" + b"x" * 20_000)
            time.sleep(0.3)  # the route is streaming the body to its temp file
        deadline = time.monotonic() + 5
        while list((files.root / "tmp").iterdir()):
            assert time.monotonic() < deadline, "the temp file of the abandoned upload stayed"
            time.sleep(0.02)
    assert stored_files_under(files.root) == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# --- fields: prompt, LoRAs, data URIs ---


def test_prompts_over_the_limit_are_422_on_their_field(client: TestClient) -> None:
    before = job_counts(client)
    long_text = "x" * 101
    assert_field_refused(client.post(f"/{APP}", json={"prompt": long_text}), ["body", "prompt"])
    assert_field_refused(
        client.post(f"/{APP}", json={"prompt": "a fox", "negative_prompt": long_text}), ["body", "negative_prompt"]
    )
    both = assert_field_refused(
        client.post(f"/{LORA_APP}", json={"prompt": long_text, "negative_prompt": long_text}),
        ["body", "prompt"],
        ["body", "negative_prompt"],
    )
    assert both[0]["type"] == "string_too_long" and both[0]["ctx"] == {"max_length": 100}
    # the sync routes check before they wait (there is no worker here: a wait would never end)
    assert_field_refused(client.post(f"/run/{APP}", json={"prompt": long_text}), ["body", "prompt"])
    assert_field_refused(client.get(f"/run/{APP}", params={"prompt": long_text}), ["body", "prompt"])
    assert job_counts(client) == before
    at_limit = client.post(f"/{APP}", json={"prompt": "x" * 100, "negative_prompt": "y" * 100})
    assert at_limit.status_code == 200, at_limit.text
    assert job_counts(client)["IN_QUEUE"] == before["IN_QUEUE"] + 1


def test_the_default_negative_prompt_is_not_the_callers_to_shorten(client: TestClient) -> None:
    assert len(WanT2VRequest(prompt="x").negative_prompt) > LIMITS["max_prompt_chars"]
    assert client.post(f"/{APP}", json={"prompt": "a fox"}).status_code == 200


def test_the_prompt_limit_counts_characters_not_bytes(client: TestClient) -> None:
    assert client.post(f"/{APP}", json={"prompt": "狐" * 100}).status_code == 200  # 300 bytes of UTF-8
    assert_field_refused(client.post(f"/{APP}", json={"prompt": "狐" * 101}), ["body", "prompt"])


def test_too_many_loras_is_422_on_the_list(client: TestClient) -> None:
    before = job_counts(client)
    lora = {"path": "owner/style", "scale": 0.5}
    detail = assert_field_refused(
        client.post(f"/{LORA_APP}", json={"prompt": "a fox", "loras": [lora] * 3}), ["body", "loras"]
    )
    assert detail[0]["type"] == "too_long" and detail[0]["ctx"] == {"max_length": 2}
    assert job_counts(client) == before
    assert client.post(f"/{LORA_APP}", json={"prompt": "a fox", "loras": [lora] * 2}).status_code == 200


def test_a_long_list_of_bad_loras_is_refused_by_its_length_alone(client: TestClient) -> None:
    """Counted before the entries are checked: each bad entry of a long list would cost a validation and an error."""
    response = client.post(f"/{LORA_APP}", json={"prompt": "a fox", "loras": [{"scale": "x"}] * 250})
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {
            "loc": ["body", "loras"],
            "msg": "at most 2 LoRAs per request on this server, got 250",
            "type": "too_long",
            "ctx": {"max_length": 2},
        }
    ]
    # The base endpoint has no loras field: the list is an unknown field there, ignored, as before.
    assert client.post(f"/{APP}", json={"prompt": "a fox", "loras": [{"scale": "x"}] * 3}).status_code == 200


def test_a_lora_url_of_another_scheme_is_refused_at_submit(client: TestClient) -> None:
    before = job_counts(client)
    loras = [{"path": "owner/style"}, {"path": "s3://bucket/style.safetensors"}]
    detail = assert_field_refused(
        client.post(f"/{LORA_APP}", json={"prompt": "a fox", "loras": loras}), ["body", "loras", 1, "path"]
    )
    assert "unsupported URL scheme" in detail[0]["msg"] and detail[0]["type"] == "invalid_lora"
    assert job_counts(client) == before
    # An absolute path is a local file, whatever it contains (this server allows none: the job says so).
    local = {"prompt": "a fox", "loras": [{"path": "/srv/loras/a://b.safetensors"}]}
    assert client.post(f"/{LORA_APP}", json=local).status_code == 200


def test_an_input_with_many_errors_reports_the_first_fifty() -> None:
    bad = {"path": 1, "scale": "x", "weight_name": 2}  # three errors per entry
    with pytest.raises(ValidationError) as raised:
        WanLoRAT2VRequest.model_validate({"prompt": 1, "num_frames": "many", "loras": [bad] * 40})
    assert len(raised.value.errors()) == 122
    detail = validation_errors(raised.value)
    assert len(detail) == 50
    assert detail[0]["loc"] == ["body", "prompt"] and detail[1]["loc"] == ["body", "num_frames"]
    assert detail[-1]["loc"] == ["body", "loras", 15, "scale"]


def data_uri(length: int, prefix: str = "data:application/octet-stream;base64,") -> str:
    return prefix + "A" * (length - len(prefix))


def test_data_uris_over_the_limit_are_422_on_their_field(client: TestClient) -> None:
    before = job_counts(client)
    for path in (
        data_uri(257),
        data_uri(257, "DATA:;base64,"),  # the scheme is case-insensitive, as where the LoRA is read
        data_uri(257, "data:,"),
        "data:;base64," + "@" * 3_000,  # not even base64: refused from its length, never decoded
    ):
        body = {"prompt": "a fox", "loras": [{"path": "owner/style"}, {"path": path}]}
        detail = assert_field_refused(client.post(f"/{LORA_APP}", json=body), ["body", "loras", 1, "path"])
        assert detail[0]["type"] == "data_uri_too_large" and detail[0]["ctx"] == {"max_length": 256}
        assert "upload the file" in detail[0]["msg"] and "input" not in detail[0]  # the URI is not echoed
    assert job_counts(client) == before
    at_limit = client.post(f"/{LORA_APP}", json={"prompt": "a fox", "loras": [{"path": data_uri(256)}]})
    assert at_limit.status_code == 200, at_limit.text


def test_the_limits_are_settings_with_safe_defaults() -> None:
    defaults = Settings()
    assert defaults.max_body_bytes == 1024**2 and defaults.max_prompt_chars == 10_000
    assert defaults.max_data_uri_bytes == 512 * KiB < defaults.max_body_bytes  # a data URI can reach its limit
    assert defaults.max_loras == 8 and defaults.max_upload_bytes == 2 * 1024**3


# --- uploads ---


def test_uploads_are_not_json_bodies_but_have_their_own_limit(client: TestClient) -> None:
    headers = {"content-type": "application/octet-stream"}
    # over max_body_bytes, under max_upload_bytes: an upload, not a JSON body
    ok = client.post("/cdn/files/upload", content=b"x" * (16 * KiB), headers=headers)
    assert ok.status_code == 200, ok.text
    stored = stored_files(client)
    over = 64 * KiB + 1
    body = assert_refused(
        client.post("/cdn/files/upload", content=b"x" * over, headers=headers), 413, "payload_too_large"
    )
    assert "65536" in body["detail"]
    chunks = Chunks(b"x" * KiB, 1000)
    assert_refused(send_chunked(client, "POST", "/cdn/files/upload", chunks, headers), 413, "payload_too_large")
    assert chunks.sent <= 66
    assert stored_files(client) == stored  # nothing of the refused uploads was kept


def test_a_signed_put_over_the_upload_limit(client: TestClient) -> None:
    initiated = client.post("/rest/storage/upload/initiate", json={"content_type": "image/png", "file_name": "a.png"})
    assert initiated.status_code == 200, initiated.text
    upload_url = initiated.json()["upload_url"]
    stored = stored_files(client)
    refused = client.put(upload_url, content=b"x" * (64 * KiB + 1), headers={"content-type": "image/png"})
    assert_refused(refused, 413, "payload_too_large")
    assert stored_files(client) == stored


def test_multipart_parts_and_totals_over_the_upload_limit(client: TestClient) -> None:
    created = client.post("/cdn/files/upload/multipart", headers={"content-type": "video/mp4"})
    assert created.status_code == 200, created.text
    access_url, upload_id = created.json()["access_url"], created.json()["uploadId"]
    base = access_url.split("?")[0] + f"/multipart/{upload_id}"
    assert_refused(client.put(f"{base}/1", content=b"x" * (64 * KiB + 1)), 413, "payload_too_large")

    def put(number: int, size: int) -> Any:
        return client.put(f"{base}/{number}", content=b"x" * size)

    assert put(1, 40 * KiB).status_code == 200
    # Each part fits, the parts together do not: refused when the part arrives, not at the completion (parts would
    # otherwise fill the disk past the limit until the abandoned upload is swept, a day later).
    assert_refused(put(2, 40 * KiB), 413, "payload_too_large")
    assert put(1, 40 * KiB).status_code == 200  # a part sent again replaces its bytes: counted once
    etags = [{"partNumber": n, "etag": put(n, size).json()["etag"]} for n, size in ((1, 40 * KiB), (2, 24 * KiB))]
    done = client.post(f"{base}/complete", json={"parts": etags})
    assert done.status_code == 200, done.text  # exactly at the limit
    assert len(client.get(access_url).content) == 64 * KiB


def test_multipart_completion_over_the_limit_deletes_the_file(client: TestClient) -> None:
    """Parts sent in parallel can each pass the per-part check; the completion checks the joined file again."""
    created = client.post("/cdn/files/upload/multipart", headers={"content-type": "video/mp4"})
    access_url, handed_out = created.json()["access_url"], created.json()["uploadId"]
    ctx = client.app.state.context  # type: ignore[attr-defined]
    key = access_url.split("?")[0].split("/files/", 1)[1]
    upload_id = ctx.url_signer.bound_upload(handed_out, key, "")
    for number in (1, 2):  # straight into the store, as two racing requests would both have been let through
        ctx.files.put_part(upload_id, number, b"x" * (40 * KiB))
    etags = [{"partNumber": n, "etag": ""} for n in (1, 2)]
    base = access_url.split("?")[0] + f"/multipart/{handed_out}"
    assert_refused(client.post(f"{base}/complete", json={"parts": etags}), 413, "payload_too_large")
    assert client.get(access_url).status_code == 404  # the assembled file was deleted


# --- the disk reserve: uploads never take the room results and the job database need ---


def reserving_client(tmp_path: Path, spare: int) -> TestClient:
    """A client of an app whose upload reserve leaves `spare` bytes of this disk's real free space to uploads."""
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    reserve = shutil.disk_usage(tmp_path / "data").free - spare
    return TestClient(create_app(limited_settings(tmp_path, upload_disk_reserve_bytes=reserve), workers=0),
                      raise_server_exceptions=False)  # fmt: skip


def test_an_upload_that_would_eat_into_the_disk_reserve_is_507(tmp_path: Path) -> None:
    with reserving_client(tmp_path, spare=-(2**30)) as client:  # the disk is already inside the reserve
        headers = {"content-type": "application/octet-stream"}
        stored = stored_files(client)
        body = assert_refused(
            client.post("/cdn/files/upload", content=b"x" * KiB, headers=headers), 507, "storage_full"
        )
        assert "free disk space" in body["detail"]
        assert_refused(send_chunked(client, "POST", "/cdn/files/upload", Chunks(b"x" * KiB, 4), headers),
                       507, "storage_full")  # fmt: skip
        initiated = client.post("/rest/storage/upload/initiate", json={"content_type": "image/png"})
        assert_refused(client.put(initiated.json()["upload_url"], content=b"x" * KiB), 507, "storage_full")
        created = client.post("/cdn/files/upload/multipart", headers={"content-type": "video/mp4"})
        base = created.json()["access_url"].split("?")[0] + f"/multipart/{created.json()['uploadId']}"
        assert_refused(client.put(f"{base}/1", content=b"x" * KiB), 507, "storage_full")
        # Nothing of the refused uploads was kept (the multipart upload's own record aside: the sweep takes it).
        assert [p for p in stored_files(client) if p not in stored and p.name != "upload.json"] == []


def test_a_multipart_completion_is_refused_before_copying_and_can_be_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The disk's free space held still: other processes freeing or taking a few KiB of the real disk between
    # the reading below and the completion's own would move the 10 KiB margin this test lives in.
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(space.shutil, "disk_usage", lambda _path: usage)
    with reserving_client(tmp_path, spare=2**30) as client:
        created = client.post("/cdn/files/upload/multipart", headers={"content-type": "video/mp4"})
        access_url = created.json()["access_url"]
        base = access_url.split("?")[0] + f"/multipart/{created.json()['uploadId']}"
        parts = [{"partNumber": n, "etag": client.put(f"{base}/{n}", content=b"y" * (30 * KiB)).json()["etag"]}
                 for n in (1, 2)]  # fmt: skip
        files: LocalFileStore = client.app.state.context.files  # type: ignore[attr-defined]
        free = shutil.disk_usage(files.root).free
        files.upload_reserve = free - 50 * KiB  # room for one part more, not for joining two (60 KiB)
        assert_refused(client.post(f"{base}/complete", json={"parts": parts}), 507, "storage_full")
        assert client.get(access_url).status_code == 404
        files.upload_reserve = 0  # the operator freed space: the same completion goes through
        done = client.post(f"{base}/complete", json={"parts": parts})
        assert done.status_code == 200, done.text
        assert client.get(access_url).content == b"y" * (60 * KiB)


def test_an_upload_meeting_a_full_disk_is_507_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills while an upload streams (another process wrote to it): ENOSPC becomes a clear 507."""
    with reserving_client(tmp_path, spare=2**30) as client:
        files: LocalFileStore = client.app.state.context.files  # type: ignore[attr-defined]
        real_fdopen = os.fdopen

        class FullDisk(io.FileIO):
            def write(self, data: Any) -> int:
                raise OSError(errno.ENOSPC, "No space left on device")

        def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            return FullDisk(fd, "wb") if mode == "wb" else real_fdopen(fd, mode, *args, **kwargs)

        monkeypatch.setattr("wanserve.api.storage.os.fdopen", fdopen)
        stored = stored_files(client)
        response = client.post("/cdn/files/upload", content=b"x" * KiB, headers={"content-type": "text/plain"})
        body = assert_refused(response, 507, "storage_full")
        assert "disk is full" in body["detail"] and "No space left" in body["detail"]
        assert stored_files(client) == stored and not list((files.root / "tmp").iterdir())


def test_no_inode_or_byte_left_is_507_on_every_upload_route(tmp_path: Path) -> None:
    """A disk without a free inode (bytes to spare) cannot even create the temp file an upload streams into, nor
    the folder of a multipart upload: a clear 507, as for a disk without bytes, on every route that writes."""
    with tmpfs(tmp_path / "data" / "files", "2m", inodes=400) as mounted:
        if not mounted:
            not_root_or_fail()
        settings = limited_settings(tmp_path, upload_disk_reserve_bytes=0)
        client = TestClient(create_app(settings, workers=0), raise_server_exceptions=False)
        files_root = tmp_path / "data" / "files"

        def each_route() -> list[Any]:
            signed = client.post("/rest/storage/upload/initiate", json={"content_type": "text/plain"})
            return [
                client.put(signed.json()["upload_url"], content=b"x" * KiB),
                client.post("/cdn/files/upload", content=b"x" * KiB, headers={"content-type": "text/plain"}),
                client.post("/rest/storage/upload/initiate-multipart", json={"content_type": "video/mp4"}),
                client.post("/cdn/files/upload/multipart", headers={"content-type": "video/mp4"}),
            ]

        taken = use_up_inodes(files_root)
        for response in each_route():
            assert_refused(response, 507, "storage_full")
        for path in taken:
            path.unlink()
        assert [r.status_code for r in each_route()] == [200] * 4
        uploads = list((files_root / "multipart").iterdir())
        fill(files_root)
        for response in each_route():
            assert_refused(response, 507, "storage_full")
        assert list((files_root / "multipart").iterdir()) == uploads  # no empty upload folder left behind
        client.close()


@pytest.fixture
def staged(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The temporary files the upload routes stage bodies in (`upload-*`), in order."""
    seen: list[Path] = []
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, name = real_mkstemp(*args, **kwargs)
        if Path(name).name.startswith("upload-"):
            seen.append(Path(name))
        return fd, name

    monkeypatch.setattr("wanserve.api.storage.tempfile.mkstemp", mkstemp)
    return seen


def test_uploads_are_staged_on_the_file_stores_disk(client: TestClient, staged: list[Path]) -> None:
    """So that storing them is a rename on the same disk the reserve is checked on, and a crash's leftovers are
    swept with the store's own."""
    files: LocalFileStore = client.app.state.context.files  # type: ignore[attr-defined]
    seen = staged
    ok = client.post("/cdn/files/upload", content=b"z" * KiB, headers={"content-type": "text/plain"})
    assert ok.status_code == 200, ok.text
    assert seen and seen[0].parent == files.root / "tmp"
    assert not seen[0].exists()  # renamed into place


def test_multipart_parts_are_staged_on_disk_not_held_in_memory(client: TestClient, staged: list[Path]) -> None:
    files: LocalFileStore = client.app.state.context.files  # type: ignore[attr-defined]
    created = client.post("/cdn/files/upload/multipart", headers={"content-type": "video/mp4"})
    access_url, upload_id = created.json()["access_url"], created.json()["uploadId"]
    base = access_url.split("?")[0] + f"/multipart/{upload_id}"
    part = client.put(f"{base}/1", content=b"p" * (20 * KiB))
    assert part.status_code == 200, part.text
    assert len(staged) == 1 and staged[0].parent == files.root / "tmp" and not staged[0].exists()  # moved in
    refused = client.put(f"{base}/2", content=b"x" * (64 * KiB + 1))
    assert_refused(refused, 413, "payload_too_large")
    assert len(staged) == 1 and "multipart part" in refused.json()["detail"]  # refused by its Content-Length
    done = client.post(f"{base}/complete", json={"parts": [{"partNumber": 1, "etag": part.json()["etag"]}]})
    assert done.status_code == 200, done.text
    assert client.get(access_url).content == b"p" * (20 * KiB)


def test_a_remote_stores_uploads_stage_in_a_folder_of_this_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staged: list[Path]
) -> None:
    """With S3 (no staging folder of the store's own), uploads stage in `<tmp>/wanserve-<pid>-uploads-*`: what an API
    process killed mid-upload left there is removed when the next one starts."""
    stale = Path(tempfile.gettempdir()) / "wanserve-999999999-uploads-x1y2"  # no such process
    stale.mkdir(exist_ok=True)
    (stale / "upload-half").write_bytes(b"x" * 100)
    with TestClient(create_app(limited_settings(tmp_path), workers=0), raise_server_exceptions=False) as client:
        assert not stale.exists()  # removed at start
        monkeypatch.setattr(client.app.state.context.files, "staging_dir", lambda: None)  # type: ignore[attr-defined]
        ok = client.post("/cdn/files/upload", content=b"s" * KiB, headers={"content-type": "text/plain"})
        assert ok.status_code == 200, ok.text
        folder = staged[0].parent
        assert folder.name.startswith(f"wanserve-{os.getpid()}-uploads-") and not staged[0].exists()
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and not folder.is_symlink()


# --- URL downloads (LoRA files) ---


@contextmanager
def hostile_server() -> Iterator[str]:
    """`/endless`: bytes without a Content-Length, never ending; `/trickle`: one byte every 50 ms."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(100_000):
                    if self.path == "/trickle":
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.05)
                    else:
                        self.wfile.write(b"x" * 65536)
            except OSError:
                pass  # the client hung up: what it should do

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def resolver_for(tmp_path: Path) -> Any:
    def make(**overrides: Any) -> LoraResolver:
        values = {"cache_dir": tmp_path / "cache", "data_dir": tmp_path / "data", "allow_private_urls": True}
        settings = Settings(**{**values, **overrides})
        return LoraResolver(settings, LocalFileStore(tmp_path / "files", "http://testserver"))

    return make


def assert_download_refused(resolver: LoraResolver, url: str) -> FieldError:
    with pytest.raises(FieldError) as err:
        resolver.uses([LoRAWeight(path=url)])
    assert err.value.loc == ("loras", 0, "path")
    assert err.value.error_type == "file_download_error" and err.value.http_status == 422
    assert not [p for p in resolver.cache.root.rglob("*") if p.is_file() and p.stat().st_size > 0]  # nothing kept
    return err.value


def test_a_download_over_lora_max_bytes_stops_at_the_limit(resolver_for: Any) -> None:
    with hostile_server() as base:
        started = time.monotonic()
        error = assert_download_refused(resolver_for(lora_max_bytes=256 * KiB), f"{base}/endless")
        assert "262144" in str(error)
        assert time.monotonic() - started < 5  # it stopped at the limit: the body never ends


def test_a_trickling_download_stops_at_lora_download_timeout_s(resolver_for: Any) -> None:
    with hostile_server() as base:
        started = time.monotonic()
        assert_download_refused(resolver_for(lora_download_timeout_s=0.5), f"{base}/trickle")
        assert time.monotonic() - started < 3  # each byte comes in time: only the whole-download limit stops it


def test_a_slow_dns_answer_counts_against_lora_download_timeout_s(
    resolver_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The system resolver has no timeout to pass (its retries can take tens of seconds): the lookup is part of the
    download's time, and a host whose name does not resolve in time is refused as the download is."""
    resolving = threading.Event()

    def slow_getaddrinfo(*args: Any, **kwargs: Any) -> Any:
        resolving.set()
        time.sleep(3)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", 80))]

    monkeypatch.setattr("wanserve.files.inputs.socket.getaddrinfo", slow_getaddrinfo)
    started = time.monotonic()
    error = assert_download_refused(
        resolver_for(lora_download_timeout_s=0.5, allow_private_urls=False), "http://slow-dns.example/l.safetensors"
    )
    assert resolving.is_set() and "no DNS answer" in str(error)
    assert time.monotonic() - started < 2.5  # not the 3 s the resolver took
