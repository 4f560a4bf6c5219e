"""Slow clients (wanserve.api.timeouts): a connection that sends its headers or its body too slowly is ended, so a few
hundred of them, none with an API key, cannot hold every file descriptor of a real server."""

from __future__ import annotations

import json
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server import Server

APP = "fal-ai/wan-22"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > 1024, "the open files limit test needs a hard limit over 1024"
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # the usual default, which the server inherits
    try:
        srv = started_server(tmp_path_factory, model_cache)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    yield srv
    srv.kill()


def started_server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Server:
    return Server(
        tmp_path_factory.mktemp("slow") / "data",
        model_cache,
        args=["--workers", "0"],
        env={
            "WANSERVE_REQUEST_HEADER_TIMEOUT_S": "1",
            "WANSERVE_REQUEST_BODY_IDLE_TIMEOUT_S": "1",
            "WANSERVE_REQUEST_BODY_MIN_RATE": "1000",
        },
    ).start(wait_ready=False)


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed the connection (reading what it sent first), failing after `seconds`."""
    started = time.monotonic()
    sock.settimeout(seconds)
    while sock.recv(65536):
        pass
    return time.monotonic() - started


def answer(sock: socket.socket, seconds: float = 10) -> tuple[int, dict[str, object]]:
    sock.settimeout(seconds)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_connection_that_never_finishes_its_headers_is_closed(server: Server) -> None:
    sock = connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: the headers never end
    assert closed_within(sock, 5) < 4
    sock.close()
    assert httpx.get(f"{server.url}/health").status_code == 200  # the server goes on


def test_a_kept_alive_connection_is_held_to_the_limit_for_its_next_request_too(server: Server) -> None:
    sock = connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1":  # 0.25 s a byte: never done in time
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.25)
    assert closed_within(sock, 5) < 1
    sock.close()


def test_a_pipelined_request_answered_slowly_is_not_cut_off(server: Server) -> None:
    """The second of two pipelined requests is under way as the first answer completes: its own headers are in."""
    sock = connect(server)
    body = json.dumps({"prompt": "a fox"}).encode()
    sock.sendall(
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        + f"POST /run/{APP} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n".encode()
        + f"X-Fal-Request-Timeout: 3\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    started = time.monotonic()
    sock.settimeout(15)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    assert data.startswith(b"HTTP/1.1 200")
    # No worker: the run waits out its 3 s start timeout (past the 1 s header limit), then answers 504.
    assert b"HTTP/1.1 504" in data, data[-300:]
    assert time.monotonic() - started > 2.5


def test_an_upload_that_stops_sending_is_a_408_and_leaves_no_file(server: Server) -> None:
    sock = connect(server)
    sock.sendall(
        b"POST /cdn/files/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: 100000\r\n\r\n" + b"x" * 100
    )
    started = time.monotonic()
    status, body = answer(sock)
    assert (status, body["error_type"]) == (408, "request_timeout"), body
    assert "no part of the request body arrived for 1 s" in str(body["detail"])
    assert time.monotonic() - started < 4
    sock.close()
    assert list(server.data_dir.rglob("upload-*")) == []


def test_a_body_trickling_in_under_the_minimum_rate_is_a_408(server: Server) -> None:
    sock = connect(server)
    sock.sendall(
        f"POST /{APP} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 300\r\n\r\n"
        .encode()
    )  # fmt: skip
    started = time.monotonic()
    sent = 0
    try:
        while sent < 300 and time.monotonic() - started < 8:
            sock.sendall(b" ")  # a byte every 0.3 s: each wait within the 1 s limit, the rate far under 1000/s
            sent += 1
            time.sleep(0.3)
    except OSError:
        pass
    status, body = answer(sock)
    assert (status, body["error_type"]) == (408, "request_timeout"), body
    assert "bytes/s" in str(body["detail"])
    assert time.monotonic() - started < 4
    sock.close()


def test_a_status_stream_outlasts_the_body_time_limit(server: Server) -> None:
    """After its (empty) body, a request's wait for the client to hang up is not a slow body."""
    request_id = httpx.post(f"{server.url}/{APP}", json={"prompt": "a fox"}).json()["request_id"]  # never runs
    url = f"{server.url}/{APP}/requests/{request_id}/status/stream"
    with httpx.stream("GET", url, timeout=10) as response:
        assert response.status_code == 200
        events = (json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line.startswith("data:"))
        assert next(events)["status"] == "IN_QUEUE"
        time.sleep(3)
        httpx.put(f"{server.url}/{APP}/requests/{request_id}/cancel")
        assert next(events)["status"] == "COMPLETED"  # the stream was still open to say so


def test_the_server_raises_its_open_files_limit_to_the_hard_limit(server: Server) -> None:
    assert server.process is not None
    limits = Path(f"/proc/{server.process.pid}/limits").read_text()
    (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
    soft, hard = line.split()[3:5]
    assert soft == hard, line
