"""A stand-in Hugging Face Hub on loopback: the two routes huggingface_hub uses to pick and download a file of a
model repo (`/api/models/{repo}[/revision/{rev}]` for its file list, `/{repo}/resolve/{rev}/{path}` for the file,
HEAD for its metadata then GET), answered as the Hub answers them (X-Repo-Commit, ETag, X-Error-Code)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote, urlsplit

from file_server import serving

_INFO = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?")
_RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")


@dataclass
class StandInHub:
    endpoint: str = ""
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    # what was asked: ("info", repo) and ("HEAD" or "GET", repo, path)
    requests: Counter[tuple[str, ...]] = field(default_factory=Counter)
    down: int | None = None  # every request answers this status (503: an outage; 429: its rate limit)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def commit(files: dict[str, bytes]) -> str:
        digest = hashlib.sha1()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        return digest.hexdigest()


@contextmanager
def running_hub() -> Iterator[StandInHub]:
    hub = StandInHub()

    class Handler(BaseHTTPRequestHandler):
        def _error(self, status: int, code: str) -> None:
            body = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _answer(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            if hub.down is not None:
                self._error(hub.down, "Unavailable")
            elif (info := _INFO.fullmatch(path)) and not head:
                self._info(info["repo"])
            elif resolve := _RESOLVE.fullmatch(path):
                self._resolve(resolve["repo"], resolve["path"], head)
            else:
                self._error(404, "EntryNotFound")

        def _info(self, repo: str) -> None:
            with hub.lock:
                hub.requests["info", repo] += 1
            files = hub.repos.get(repo)
            if files is None:
                self._error(401, "RepoNotFound")  # the Hub's answer to a repo that is absent or private
                return
            siblings = [
                {"rfilename": n, "size": len(b), "blobId": hashlib.sha1(b).hexdigest()} for n, b in files.items()
            ]
            body = json.dumps({"id": repo, "modelId": repo, "sha": hub.commit(files), "siblings": siblings}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _resolve(self, repo: str, name: str, head: bool) -> None:
            with hub.lock:
                hub.requests["HEAD" if head else "GET", repo, name] += 1
            files = hub.repos.get(repo)
            if files is None:
                self._error(401, "RepoNotFound")
                return
            if name not in files:
                self._error(404, "EntryNotFound")
                return
            body = files[name]
            self.send_response(200)
            self.send_header("X-Repo-Commit", hub.commit(files))
            self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer(head=False)

        def do_HEAD(self) -> None:
            self._answer(head=True)

        def log_message(self, *args: Any) -> None:
            pass

    with serving(Handler) as hub.endpoint:
        yield hub
