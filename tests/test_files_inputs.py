"""URL inputs (wanserve.files.inputs): data URIs, our own stored files read locally, and downloads with a size
cap, a time limit, a redirect limit and no access to private or local addresses, against a real HTTP server."""

from __future__ import annotations

import base64
import contextlib
import gzip
import socket
import threading
import time
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from file_server import running, serving, tls_http_server, tunnel_proxy

import wanserve.files.inputs as inputs
from wanserve.errors import FileNotFound, InputFetchError
from wanserve.files.base import new_key
from wanserve.files.inputs import (
    MAX_REDIRECTS,
    FetchPolicy,
    check_public_host,
    decode_data_uri,
    fetch_input,
)
from wanserve.files.local import LocalFileStore

SMALL = b"hello wanserve \x00\xff"
BOMB = gzip.compress(bytes(64 << 20))  # 64 MiB of zeros in about 64 KB
LARGE = bytes(range(256)) * (3 * 4096)  # 3 MiB
TRICKLE_S = 3.0
OPEN = FetchPolicy(allow_private=True, timeout_s=5.0)  # the test server is on loopback


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.0 (the default): a response without Content-Length is delimited by closing the connection."""

    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, length: bool = True) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            self.server.hits[path] += 1
            self.server.accept_encoding = self.headers.get("Accept-Encoding", "")
        # the client may give up (size cap, time limit): that is the point of those tests
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._route(path)

    def _route(self, path: str) -> None:
        if path == "/small":
            self._send(200, SMALL)
        elif path == "/large":
            self._send(200, LARGE)
        elif path == "/large-nolen":
            self._send(200, LARGE, length=False)
        elif path == "/slow":
            self.send_response(200)
            self.end_headers()
            for _ in range(int(TRICKLE_S / 0.1)):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        elif path == "/stall":
            time.sleep(TRICKLE_S)
            self._send(200, SMALL)
        elif path == "/gzip":  # sent compressed although the client asked for it as it is
            self._send(200, gzip.compress(LARGE), {"Content-Encoding": "gzip"})
        elif path == "/deflate":
            self._send(200, zlib.compress(LARGE), {"Content-Encoding": "deflate"})
        elif path == "/bomb":
            self._send(200, BOMB, {"Content-Encoding": "gzip"})
        elif path == "/double-gzip":
            self._send(200, gzip.compress(BOMB), {"Content-Encoding": "gzip, gzip"})
        elif path == "/brotli":
            self._send(200, SMALL, {"Content-Encoding": "br"})
        elif path == "/bad-gzip":
            self._send(200, b"not gzip at all", {"Content-Encoding": "gzip"})
        elif path == "/redirect":
            self._send(302, headers={"Location": "/small"})
        elif path.startswith("/chain/"):  # /chain/N: N more redirects, then /small
            left = int(path.rsplit("/", 1)[1])
            self._send(302, headers={"Location": f"/chain/{left - 1}" if left > 1 else "/small"})
        elif path == "/to-file":
            self._send(302, headers={"Location": "file:///etc/passwd"})
        elif path == "/to-bad-ipv6":  # a Location httpx passes on and urllib cannot parse
            self._send(302, headers={"Location": "http://a[b/x.safetensors"})
        elif path == "/to-bad-bracket":
            self._send(302, headers={"Location": "http://evil]/"})
        elif path == "/trickle-headers":  # a status line, then one header byte at a time: the body never starts
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(int(TRICKLE_S / 0.1)):
                self.wfile.write(b"X")
                self.wfile.flush()
                time.sleep(0.1)
        elif path == "/to-localhost":
            self._send(302, headers={"Location": f"http://localhost:{self.server.server_port}/small"})
        elif path == "/liar-big":  # claims a terabyte, sends a few bytes
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            self.wfile.write(SMALL)
        elif path == "/liar-short":  # claims 1000 bytes, sends 16 and closes
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(SMALL)
        else:
            self._send(404, b"not here")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.accept_encoding = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def total_hits(self) -> int:
        with self.lock:
            return sum(self.hits.values())


@pytest.fixture(scope="module")
def http() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture
def fs(tmp_path: Path) -> LocalFileStore:
    # Nothing listens on port 1: reading one of our own files must never touch the network.
    return LocalFileStore(tmp_path / "files", "http://127.0.0.1:1")


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "input.bin"


# --- data URIs ---


def test_base64_data_uri_decodes_exactly(fs: LocalFileStore, dest: Path) -> None:
    data = bytes(range(256)) * 3
    uri = "data:application/octet-stream;base64," + base64.b64encode(data).decode()
    assert fetch_input(uri, dest, fs, FetchPolicy()) == dest
    assert dest.read_bytes() == data


def test_the_data_scheme_and_base64_marker_are_case_insensitive(fs: LocalFileStore, dest: Path) -> None:
    data = bytes(range(256))
    fetch_input("DATA:application/octet-stream;BASE64," + base64.b64encode(data).decode(), dest, fs, FetchPolicy())
    assert dest.read_bytes() == data


def test_percent_encoded_data_uri_decodes_exactly(fs: LocalFileStore, dest: Path) -> None:
    fetch_input("data:text/plain,hello%20world%00%FF/ok", dest, fs, FetchPolicy())
    assert dest.read_bytes() == b"hello world\x00\xff/ok"
    assert decode_data_uri("data:,", 10) == b""


@pytest.mark.parametrize(
    "uri",
    [
        "data:text/plain;base64",  # no comma
        "data-text/plain,abc",  # not data:
        "text/plain,abc",
        "data:;base64,@@@@",  # not base64
        "data:;base64,abc",  # bad padding
        "data:;base64,aGVs bG8=",  # whitespace is not accepted
    ],
)
def test_malformed_data_uris_are_refused(uri: str) -> None:
    with pytest.raises(InputFetchError):
        decode_data_uri(uri, 1000)


def test_malformed_data_uri_through_fetch_input_writes_nothing(fs: LocalFileStore, dest: Path) -> None:
    with pytest.raises(InputFetchError, match="data URI"):
        fetch_input("data:;base64,%%%%", dest, fs, FetchPolicy())
    assert not dest.exists()


def test_base64_data_uri_size_cap() -> None:
    limit = 100
    exact = "data:;base64," + base64.b64encode(b"a" * limit).decode()
    assert decode_data_uri(exact, limit) == b"a" * limit
    over = "data:;base64," + base64.b64encode(b"a" * (limit + 1)).decode()
    with pytest.raises(InputFetchError, match="100-byte input limit"):
        decode_data_uri(over, limit)
    huge = "data:;base64," + "A" * 10_000  # refused from its length, before decoding
    with pytest.raises(InputFetchError, match="input limit"):
        decode_data_uri(huge, limit)


def test_percent_encoded_data_uri_size_cap() -> None:
    limit = 100
    # every byte percent-encoded takes three characters: a URI of exactly `limit` bytes is still accepted
    assert decode_data_uri("data:," + "%00" * limit, limit) == b"\x00" * limit
    assert decode_data_uri("data:," + "a" * limit, limit) == b"a" * limit
    with pytest.raises(InputFetchError, match="input limit"):
        decode_data_uri("data:," + "a" * (limit + 1), limit)
    with pytest.raises(InputFetchError, match="input limit"):
        decode_data_uri("data:," + "%00" * (limit + 1), limit)


def test_data_uri_over_cap_through_fetch_input_writes_nothing(fs: LocalFileStore, dest: Path) -> None:
    uri = "data:;base64," + base64.b64encode(b"z" * 64).decode()
    with pytest.raises(InputFetchError, match="input limit"):
        fetch_input(uri, dest, fs, FetchPolicy(max_bytes=63))
    assert not dest.exists()


# --- our own stored files ---


def test_own_file_is_read_locally_without_network(http: _Server, fs: LocalFileStore, dest: Path) -> None:
    data = LARGE[:1_500_000]  # more than one 1 MiB copy chunk
    key = new_key("lora.safetensors")
    fs.put(key, data, "application/octet-stream", None, time.time())
    before = http.total_hits()
    policy = FetchPolicy(allow_private=False, timeout_s=1.0)  # 127.0.0.1:1 would be refused if it were fetched
    assert fetch_input(fs.url(key), dest, fs, policy) == dest
    assert dest.read_bytes() == data
    dest.unlink()
    fetch_input(fs.url(key) + "?download=1", dest, fs, policy)  # a query string does not hide the key
    assert dest.read_bytes() == data
    assert http.total_hits() == before


def test_own_file_respects_max_bytes(fs: LocalFileStore, dest: Path) -> None:
    key = new_key("big.bin")
    fs.put(key, b"q" * 1000, "application/octet-stream", None, time.time())
    fetch_input(fs.url(key), dest, fs, FetchPolicy(max_bytes=1000))
    assert dest.read_bytes() == b"q" * 1000
    dest.unlink()
    with pytest.raises(InputFetchError, match="999-byte input limit"):
        fetch_input(fs.url(key), dest, fs, FetchPolicy(max_bytes=999))
    assert not dest.exists()


def test_expired_own_file_is_not_found(fs: LocalFileStore, dest: Path) -> None:
    key = new_key("old.png")
    now = time.time()
    fs.put(key, b"png", "image/png", now - 1, now - 10)
    with pytest.raises(FileNotFound, match="expired"):
        fetch_input(fs.url(key), dest, fs, FetchPolicy())
    assert not dest.exists()


def test_unknown_own_file_is_not_found(fs: LocalFileStore, dest: Path) -> None:
    with pytest.raises(FileNotFound, match="no such file"):
        fetch_input(fs.url(new_key("never.bin")), dest, fs, FetchPolicy())
    assert not dest.exists()


def test_own_prefix_with_bad_key_is_not_read_from_disk(fs: LocalFileStore, dest: Path) -> None:
    # Not a key shape we hand out, so it is treated as a remote URL, and 127.0.0.1 is then refused.
    with pytest.raises(InputFetchError, match="private or local"):
        fetch_input(fs.public_url + "/files/../../etc/passwd", dest, fs, FetchPolicy(timeout_s=1.0))
    assert not dest.exists()


# --- the private-address guard ---


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{port}/small",
        "http://localhost:{port}/small",
        "http://[::1]:{port}/small",
        "http://[::ffff:127.0.0.1]:{port}/small",
        "http://10.0.0.1/small",
        "http://169.254.169.254/latest/meta-data",
        "http://0.0.0.0:{port}/small",
        "https://127.0.0.1:{port}/small",
        "http://[64:ff9b::7f00:1]:{port}/small",  # NAT64 of 127.0.0.1
        "http://[2002:a9fe:a9fe::]/latest/meta-data",  # 6to4 of 169.254.169.254
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/x",  # Teredo: its client address is not public
    ],
)
def test_private_and_local_hosts_are_refused_without_a_request(
    http: _Server, fs: LocalFileStore, dest: Path, template: str
) -> None:
    before = http.total_hits()
    with pytest.raises(InputFetchError, match="private or local"):
        fetch_input(template.format(port=http.server_port), dest, fs, FetchPolicy(timeout_s=1.0))
    assert http.total_hits() == before
    assert not dest.exists()


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x.bin", "/etc/passwd", "example.com/x"])
def test_other_schemes_and_bare_paths_are_refused(fs: LocalFileStore, dest: Path, url: str) -> None:
    for policy in (FetchPolicy(timeout_s=1.0), FetchPolicy(timeout_s=1.0, allow_private=True)):
        with pytest.raises(InputFetchError, match="only http"):
            fetch_input(url, dest, fs, policy)
    assert not dest.exists()


def _fake_getaddrinfo(table: dict[str, list[str]]) -> Callable[..., list[tuple]]:
    def fake(host: str, port: int, *args: object, **kwargs: object) -> list[tuple]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in table[host]
        ]

    return fake


def test_check_public_host_uses_every_resolved_address(monkeypatch: pytest.MonkeyPatch) -> None:
    table = {
        "cdn.example.test": ["93.184.216.34"],
        "cdn6.example.test": ["2606:2800:220:1:248:1893:25c8:1946"],
        "rebind.example.test": ["10.1.2.3"],
        "mixed.example.test": ["93.184.216.34", "192.168.1.5"],  # one private answer is enough to refuse
        "mapped.example.test": ["::ffff:169.254.169.254"],
        "cgnat.example.test": ["100.64.0.1"],
    }
    monkeypatch.setattr(inputs.socket, "getaddrinfo", _fake_getaddrinfo(table))
    check_public_host("cdn.example.test", 443)
    check_public_host("cdn6.example.test", 443)
    for host in ("rebind.example.test", "mixed.example.test", "mapped.example.test", "cgnat.example.test"):
        with pytest.raises(InputFetchError, match="private or local"):
            check_public_host(host, 80)
    with pytest.raises(InputFetchError, match=r"cannot resolve nowhere\.example\.test"):
        check_public_host("nowhere.example.test", 80)


def test_every_redirect_hop_is_checked(
    http: _Server, fs: LocalFileStore, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Let the first hop (127.0.0.1, standing in for a public host) through; it redirects to localhost,
    # which the real check must refuse before any request reaches /small.
    real = inputs.check_public_host
    seen: list[str] = []

    def first_hop_is_public(host: str, port: int, resolve_timeout_s: float | None = None) -> list[str]:
        seen.append(host)
        return ["127.0.0.1"] if host == "127.0.0.1" else real(host, port, resolve_timeout_s)

    monkeypatch.setattr(inputs, "check_public_host", first_hop_is_public)
    with pytest.raises(InputFetchError, match="private or local"):
        fetch_input(f"{http.base}/to-localhost", dest, fs, FetchPolicy(timeout_s=2.0))
    assert seen == ["127.0.0.1", "localhost"]
    assert http.hits["/small"] == 0
    assert not dest.exists()


# --- downloads (allow_private=True to reach the loopback server) ---


def test_small_download_is_exact(http: _Server, fs: LocalFileStore, dest: Path) -> None:
    assert fetch_input(f"{http.base}/small?x=1", dest, fs, OPEN) == dest
    assert dest.read_bytes() == SMALL


def test_large_download_is_exact(http: _Server, fs: LocalFileStore, dest: Path) -> None:
    fetch_input(f"{http.base}/large", dest, fs, FetchPolicy(allow_private=True, max_bytes=len(LARGE)))
    assert dest.read_bytes() == LARGE
    fetch_input(f"{http.base}/large-nolen", dest, fs, FetchPolicy(allow_private=True, max_bytes=len(LARGE)))
    assert dest.read_bytes() == LARGE


def test_redirect_is_followed(http: _Server, fs: LocalFileStore, dest: Path) -> None:
    fetch_input(f"{http.base}/redirect", dest, fs, OPEN)
    assert dest.read_bytes() == SMALL


def test_redirect_limit(http: _Server, fs: LocalFileStore, dest: Path) -> None:
    fetch_input(f"{http.base}/chain/{MAX_REDIRECTS}", dest, fs, OPEN)  # exactly the limit is fine
    assert dest.read_bytes() == SMALL
    dest.unlink()
    http.hits.clear()
    with pytest.raises(InputFetchError, match=f"more than {MAX_REDIRECTS} redirects"):
        fetch_input(f"{http.base}/chain/{MAX_REDIRECTS + 1}", dest, fs, OPEN)
    assert http.hits["/small"] == 0
    assert sum(http.hits.values()) == MAX_REDIRECTS + 1
    assert not dest.exists()


def test_redirect_to_another_scheme_is_refused(http: _Server, fs: LocalFileStore, dest: Path) -> None:
    with pytest.raises(InputFetchError, match="only http"):
        fetch_input(f"{http.base}/to-file", dest, fs, OPEN)
    assert not dest.exists()


def test_headers_sent_a_byte_at_a_time_stop_at_the_time_limit(http: _Server, fs: LocalFileStore, dest: Path) -> None:
    """httpx bounds each read; the download's limit bounds them all, headers included (a worker held by such a
    server for the stall watchdog's 15 minutes would be retried, and held again)."""
    policy = FetchPolicy(allow_private=True, timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(InputFetchError, match="took longer than 1 s"):
        fetch_input(f"{http.base}/trickle-headers", dest, fs, policy)
    assert time.monotonic() - t0 < 1.0 + 0.5
    assert not dest.exists()


@pytest.mark.parametrize("route", ["/to-bad-ipv6", "/to-bad-bracket"])
def test_a_malformed_redirect_location_is_a_fetch_error(
    http: _Server, fs: LocalFileStore, dest: Path, route: str
) -> None:
    with pytest.raises(InputFetchError):  # a 422 on the field, not a crash of the job (500)
        fetch_input(f"{http.base}{route}", dest, fs, OPEN)
    assert not dest.exists()


@pytest.mark.parametrize("url", ["http://[::1]x/a.safetensors", "http://a\x00b/a.safetensors", "http://a b/c"])
def test_a_malformed_url_is_a_fetch_error_with_private_addresses_allowed_too(
    fs: LocalFileStore, dest: Path, url: str
) -> None:
    for policy in (OPEN, FetchPolicy()):
        with pytest.raises(InputFetchError):
            fetch_input(url, dest, fs, policy)
    assert not dest.exists()


def test_http_error_status_is_reported(http: _Server, fs: LocalFileStore, dest: Path) -> None:
    with pytest.raises(InputFetchError, match="HTTP 404"):
        fetch_input(f"{http.base}/missing", dest, fs, OPEN)
    assert not dest.exists()


def test_a_fetch_error_names_the_file_but_not_the_urls_secrets(http: _Server, fs: LocalFileStore, dest: Path) -> None:
    """The message reaches the server log, the job log and the request's webhook receiver: a presigned URL's query
    or a token in its path is a credential there."""
    base = http.base.replace("http://", "http://user:pw-SECRET@")
    for url, says in (
        (f"{base}/token-SECRET/missing.safetensors?X-Amz-Signature=SECRET", "answered HTTP 404"),
        ("http://127.0.0.1:9/token-SECRET/style.safetensors?sig=SECRET", "cannot download"),  # nothing listens on 9
    ):
        with pytest.raises(InputFetchError) as caught:
            fetch_input(url, dest, fs, OPEN)
        message = str(caught.value)
        assert says in message and ".../" in message and "SECRET" not in message, message
        assert url.split("?")[0].rsplit("/", 1)[1] in message  # the file's name, to know which input failed


def test_size_cap_from_content_length(http: _Server, fs: LocalFileStore, dest: Path) -> None:
    http.hits.clear()
    with pytest.raises(InputFetchError, match="input limit"):
        fetch_input(f"{http.base}/large", dest, fs, FetchPolicy(allow_private=True, max_bytes=len(LARGE) - 1))
    assert not dest.exists()
    with pytest.raises(InputFetchError, match="input limit"):  # the declared size alone is enough
        fetch_input(f"{http.base}/liar-big", dest, fs, OPEN)
    assert not dest.exists()


def test_size_cap_while_streaming(http: _Server, fs: LocalFileStore, dest: Path) -> None:
    with pytest.raises(InputFetchError, match="1000000-byte input limit"):
        fetch_input(f"{http.base}/large-nolen", dest, fs, FetchPolicy(allow_private=True, max_bytes=1_000_000))
    assert not dest.exists()


def test_a_compressed_body_is_inflated_within_the_size_limit(http: _Server, fs: LocalFileStore, dest: Path) -> None:
    """The client asks for the file as it is; a server that gzips it anyway is read, one layer inflated a step at a
    time: 64 KB of gzip cannot become 64 MiB in memory before the 1 MB limit looks (httpx would inflate it whole)."""
    fetch_input(f"{http.base}/gzip", dest, fs, OPEN)
    assert dest.read_bytes() == LARGE and http.accept_encoding == "identity"
    fetch_input(f"{http.base}/deflate", dest, fs, OPEN)
    assert dest.read_bytes() == LARGE
    dest.unlink()
    tracemalloc.start()
    try:
        with pytest.raises(InputFetchError, match="1000000-byte input limit"):
            fetch_input(f"{http.base}/bomb", dest, fs, FetchPolicy(allow_private=True, max_bytes=1_000_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20 and not dest.exists()
    for path, why in (("/double-gzip", "'gzip, gzip'"), ("/brotli", "'br'"), ("/bad-gzip", "not valid gzip")):
        with pytest.raises(InputFetchError, match=why):
            fetch_input(f"{http.base}{path}", dest, fs, OPEN)
        assert not dest.exists()


def test_truncated_body_leaves_no_partial_file(http: _Server, fs: LocalFileStore, dest: Path) -> None:
    with pytest.raises(InputFetchError, match="cannot download"):
        fetch_input(f"{http.base}/liar-short", dest, fs, OPEN)
    assert not dest.exists()


def test_time_limit_for_a_trickling_body(http: _Server, fs: LocalFileStore, dest: Path) -> None:
    start = time.monotonic()
    with pytest.raises(InputFetchError, match=r"took longer than 0\.5 s|Timeout"):
        fetch_input(f"{http.base}/slow", dest, fs, FetchPolicy(allow_private=True, timeout_s=0.5))
    elapsed = time.monotonic() - start
    assert elapsed < TRICKLE_S / 2, f"gave up after {elapsed:.2f} s, not near the 0.5 s limit"
    assert not dest.exists()


def test_time_limit_for_a_server_that_never_answers(http: _Server, fs: LocalFileStore, dest: Path) -> None:
    start = time.monotonic()
    with pytest.raises(InputFetchError, match=r"took longer than 0\.5 s"):
        fetch_input(f"{http.base}/stall", dest, fs, FetchPolicy(allow_private=True, timeout_s=0.5))
    assert time.monotonic() - start < TRICKLE_S / 2
    assert not dest.exists()


def answering(body: bytes, record: Callable[[BaseHTTPRequestHandler], object]) -> type[BaseHTTPRequestHandler]:
    """A handler that shows each GET to `record`, then answers it 200 with `body`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            record(self)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def test_a_checked_host_is_pinned_so_a_second_dns_answer_cannot_redirect_the_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name resolves once (checked as public), then would resolve elsewhere (or not at all).
    The download must connect to the checked address and send the name only as the Host header."""
    hits: list[str] = []
    http = ThreadingHTTPServer(
        ("127.0.0.1", 0), answering(b"pinned body", lambda req: hits.append(req.headers["Host"]))
    )
    threading.Thread(target=http.serve_forever, daemon=True).start()
    port = http.server_address[1]
    real_getaddrinfo = socket.getaddrinfo
    answers = iter([[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]])

    def rebinding_dns(host: str, *args: object, **kwargs: object) -> object:
        if host == "rebind.test":
            return next(answers)  # one answer only: a second lookup raises StopIteration
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(inputs.socket, "getaddrinfo", rebinding_dns)
    monkeypatch.setattr(inputs, "_is_public", lambda address: address == "127.0.0.1")  # the test's "public" IP
    store = LocalFileStore(tmp_path / "files", "http://127.0.0.1:1")
    dest = tmp_path / "out.bin"
    try:
        fetch_input(f"http://rebind.test:{port}/lora.safetensors", dest, store, FetchPolicy(allow_private=False))
    finally:
        http.shutdown()
    assert dest.read_bytes() == b"pinned body"
    assert hits == [f"rebind.test:{port}"]


def test_downloads_go_through_the_environments_proxy_as_httpx_would(
    fs: LocalFileStore, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deployments whose outbound traffic must pass a proxy: HTTP_PROXY is honoured (and NO_PROXY), although the
    download brings its own transports, which httpx would otherwise leave without the environment's proxies."""
    asked: list[str] = []  # absolute form: the proxy is told the whole URL
    with serving(answering(SMALL, lambda req: asked.append(req.path))) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        fetch_input("http://files.example.invalid/lora.safetensors", dest, fs, OPEN)
        assert dest.read_bytes() == SMALL and asked == ["http://files.example.invalid/lora.safetensors"]
        dest.unlink()
        monkeypatch.setenv("NO_PROXY", "files.example.invalid")  # direct: the name does not resolve
        with pytest.raises(InputFetchError):
            fetch_input("http://files.example.invalid/lora.safetensors", dest, fs, OPEN)
        assert len(asked) == 1


def test_https_downloads_go_through_the_environments_proxy_verified_for_their_host(
    fs: LocalFileStore, dest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTPS_PROXY: the proxy is asked to connect to the address this server checked (pinned), and TLS is verified
    for the URL's host name: httpcore's tunnel would verify the certificate against that address, and every HTTPS
    download through a proxy failed."""
    served: list[str] = []
    handler = answering(SMALL, lambda req: served.append(req.path))
    tls_server, cert = tls_http_server(tmp_path, "files.example.test", handler)
    port = tls_server.server_address[1]
    real = socket.getaddrinfo
    public = _fake_getaddrinfo({"files.example.test": ["93.184.216.34"]})

    def resolving(host: str, *args: Any, **kwargs: Any) -> list[tuple]:
        return (public if host.endswith(".test") else real)(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolving)
    asked: list[str] = []
    with running(tls_server), tunnel_proxy(port, asked) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        fetch_input(f"https://files.example.test:{port}/lora.safetensors", dest, fs, FetchPolicy(timeout_s=5.0))
    assert dest.read_bytes() == SMALL and served == ["/lora.safetensors"]
    assert asked == [f"CONNECT 93.184.216.34:{port} HTTP/1.1"]
