"""A real HTTP file server on loopback for tests (serves set bytes per path and counts every request), and
`serving`, which runs any request handler on loopback; an HTTPS server with its own certificate and a CONNECT
proxy, for what goes through HTTPS_PROXY."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import socket
import socketserver
import ssl
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class FileServer:
    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    # path -> a Content-Length to claim while sending only a few bytes (a huge file, without the bytes)
    claimed_sizes: dict[str, int] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Send an ETag (the body's sha256) and answer a matching If-None-Match with 304, counted in `not_modified`.
    etags: bool = False
    not_modified: Counter[str] = field(default_factory=Counter)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


@contextmanager
def running_file_server() -> Iterator[FileServer]:
    state = FileServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with state.lock:
                state.hits[self.path] += 1
            if self.path in state.claimed_sizes:
                self.send_response(200)
                self.send_header("content-length", str(state.claimed_sizes[self.path]))
                self.end_headers()
                self.wfile.write(b"\0" * 1024)
                return
            body = state.files.get(self.path)
            etag = f'"{hashlib.sha256(body).hexdigest()}"' if body is not None and state.etags else None
            if etag is not None and self.headers.get("if-none-match") == etag:
                with state.lock:
                    state.not_modified[self.path] += 1
                self.send_response(304)
                self.send_header("etag", etag)
                self.end_headers()
                return
            self.send_response(200 if body is not None else 404)
            self.send_header("content-length", str(len(body or b"")))
            if etag is not None:
                self.send_header("etag", etag)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: Any) -> None:
            pass

    with serving(Handler) as state.base:
        yield state


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` answering on a loopback port for as long as the context lasts; yields the base URL."""
    with running(ThreadingHTTPServer(("127.0.0.1", 0), handler)) as base:
        yield base


@contextmanager
def running(server: socketserver.ThreadingTCPServer) -> Iterator[str]:
    """`server` (any threading socket server on loopback) serving on a thread for as long as the context lasts;
    yields `http://127.0.0.1:<its port>`."""
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A certificate for `name`, its own authority, and its key (PEM files in `folder`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def tls_http_server(folder: Path, name: str, handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, Path]:
    """`handler` behind HTTPS on a loopback port (not yet serving: see `running`), with a certificate for `name`
    that is its own authority; returns the server and the certificate (for SSL_CERT_FILE)."""
    cert, key = self_signed(folder, name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server, cert


@contextmanager
def tunnel_proxy(to_port: int, asked: list[str]) -> Iterator[str]:
    """An HTTP proxy that answers each CONNECT (recording its request line) by tunnelling to 127.0.0.1:`to_port`;
    yields its URL."""

    class Tunnel(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = self.request.recv(4096)
                if not chunk:
                    return
                head += chunk
            asked.append(head.split(b"\r\n", 1)[0].decode())
            upstream = socket.create_connection(("127.0.0.1", to_port))
            self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

            def pipe(src: socket.socket, dst: socket.socket) -> None:
                with contextlib.suppress(OSError):
                    while data := src.recv(65536):
                        dst.sendall(data)
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

            back = threading.Thread(target=pipe, args=(upstream, self.request), daemon=True)
            back.start()
            pipe(self.request, upstream)
            back.join(5)
            upstream.close()

    with running(socketserver.ThreadingTCPServer(("127.0.0.1", 0), Tunnel)) as base:
        yield base
