"""DNS rebinding: a server without API keys answers only requests for its own host names."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.testclient import TestClient

from wanserve.api.app import create_app
from wanserve.api.hosts import AllowedHosts, host_name
from wanserve.config import Settings


def client_for(tmp_path: Path, **settings: Any) -> TestClient:
    return TestClient(create_app(Settings(data_dir=tmp_path, **settings), workers=0))


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("127.0.0.1:8000", "127.0.0.1"),
        ("LOCALHOST", "localhost"),
        ("[::1]:8000", "::1"),
        ("[0:0:0:0:0:0:0:1]", "::1"),
        ("localhost.:80", "localhost"),
        ("evil.example", "evil.example"),
        ("evil.example:x", ""),  # not a port
        ("[::1", ""),
        ("[::1]evil.example", ""),
        ("::1", ""),  # an IPv6 address goes in brackets
        ("[evil.example]", ""),
        ("127.1:8000", "127.0.0.1"),  # what `curl http://127.1:8000` sends
        ("0x7f.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("127.0.0.1.5", "127.0.0.1.5"),  # five parts: no address
        ("1.2.3.4.example", "1.2.3.4.example"),
    ],
)
def test_host_name_of_a_header(header: str, name: str) -> None:
    assert host_name(header) == name


def test_allowed_hosts() -> None:
    allowed = AllowedHosts(
        ["gpu-box.lan", "https://user:pw@wan.example.com:8443/base", "", "fd00::5", "bücher.example"]
    )
    answered = ["127.0.0.1:8000", "127.9.9.9", "localhost:1", "[::1]:8000", "app.localhost:8000", "gpu-box.lan:8000",
                "wan.example.com", "WAN.example.com:443", "[fd00::5]:8000", "[fd00:0::5]",
                "xn--bcher-kva.example"]  # fmt: skip
    for ok in answered:
        assert allowed.allows(ok), ok
    assert allowed.allows("127.1:8000") and not allowed.allows("10.1:8000")
    for refused in ["evil.example", "127.0.0.1.evil.example", "localhost.evil.example", "gpu-box.lan.evil", "", None,
                    "[::2]:80", "10.0.0.5", "[::1]evil.example", "user:pw@wan.example.com", "4294967296"]:  # fmt: skip
        assert not allowed.allows(refused), refused
    assert allowed.allows("[::ffff:127.0.0.1]:8000")  # the IPv4 loopback, mapped
    assert AllowedHosts(["*"]).allows("anything.example")
    for unusable in ["*.example.com", '["a.example"', "a b.example", "http://"]:  # no Host could ever match
        with pytest.raises(ValueError, match="WANSERVE_ALLOWED_HOSTS"):
            AllowedHosts([unusable])


def test_a_keyless_server_refuses_a_foreign_host_on_every_route(tmp_path: Path) -> None:
    with client_for(tmp_path, public_url="http://127.0.0.1:8000") as client:
        for method, path in [("GET", "/health"), ("GET", "/ready"), ("GET", "/fal-ai/wan-22/requests/x/status"),
                             ("POST", "/fal-ai/wan-22"), ("GET", "/")]:  # fmt: skip
            response = client.request(method, path, headers={"host": "rebound.attacker.example:8000"}, json={})
            assert response.status_code == 403, (path, response.text)
            assert response.json()["error_type"] == "forbidden"
            assert response.headers["x-fal-error-type"] == "forbidden"
            assert "WANSERVE_ALLOWED_HOSTS" in response.json()["detail"]
        for host in ["127.0.0.1:8000", "localhost:8000", "[::1]:8000"]:
            assert client.get("/health", headers={"host": host}).status_code == 200, host
        queued = client.post("/fal-ai/wan-22", headers={"host": "localhost:8000"}, json={"prompt": "a fox"})
        assert queued.status_code == 200, queued.text


def test_the_public_url_and_allowed_hosts_are_answered(tmp_path: Path) -> None:
    settings = {"public_url": "https://wan.example.com", "allowed_hosts": ["gpu-box.lan"]}
    with client_for(tmp_path, **settings) as client:
        assert client.get("/health", headers={"host": "wan.example.com"}).status_code == 200
        assert client.get("/health", headers={"host": "gpu-box.lan:8000"}).status_code == 200
        assert client.get("/health", headers={"host": "other.example"}).status_code == 403
    with client_for(tmp_path / "any", allowed_hosts="*") as client:  # as the environment gives it
        assert client.get("/health", headers={"host": "other.example"}).status_code == 200


def test_with_api_keys_the_host_decides_nothing(tmp_path: Path) -> None:
    with client_for(tmp_path, public_url="http://127.0.0.1:8000", api_keys=["k"]) as client:
        answer = client.get("/fal-ai/wan-22/requests/x/status", headers={"host": "evil.example"})
        assert answer.status_code == 401  # the key is what is missing
        with_key = {"host": "evil.example", "authorization": "Key k"}
        assert client.get("/fal-ai/wan-22/requests/x/status", headers=with_key).status_code == 404


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(data_dir=tmp_path, port=port, public_url=f"http://127.0.0.1:{port}")
    server = uvicorn.Server(uvicorn.Config(create_app(settings, workers=0), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(10)


def raw_get(port: int, head: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_over_the_wire(live_server: int) -> None:
    """What a rebound page's browser sends (its own domain in Host) against a local tool's HTTP/1.0 without Host."""
    rebound = raw_get(live_server, "GET /ready HTTP/1.1\r\nHost: attacker.example\r\n\r\n")  # kept alive
    assert rebound.startswith(b"HTTP/1.1 403") and b'"forbidden"' in rebound
    assert b"connection: close" in rebound.lower()  # raw_get reads until the server hangs up
    assert b"workers" not in rebound
    # A body that never ends does not keep the refused connection open either.
    endless = "POST /fal-ai/wan-22 HTTP/1.1\r\nHost: attacker.example\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n"
    assert raw_get(live_server, endless + " " * 1024).startswith(b"HTTP/1.1 403")
    plain = raw_get(live_server, "GET /health HTTP/1.0\r\n\r\n")
    assert plain.startswith(b"HTTP/1.1 200"), plain[:200]
