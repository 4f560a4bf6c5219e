"""A real HTTP file server on loopback for tests (serves set bytes per path and counts every request), and
`serving`, which runs any request handler on loopback."""

from __future__ import annotations

import hashlib
import socketserver
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
