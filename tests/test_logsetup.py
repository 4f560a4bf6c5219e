"""Log injection: text from a request cannot start a line of its own in the servers' logs."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
from server import Server

from wanserve.logsetup import OneLineFormatter, one_line


def test_control_characters_of_a_message_are_escaped_and_a_traceback_keeps_its_lines() -> None:
    formatter = OneLineFormatter("%(levelname)s %(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys as _sys

        record = logging.LogRecord(
            "x",
            logging.WARNING,
            __file__,
            1,
            "fetch of %s failed",
            ("http://a/\r\n2030 FORGED\x1b[2J\x85",),
            _sys.exc_info(),
        )
    lines = formatter.format(record).splitlines()
    assert lines[0] == "WARNING fetch of http://a/\\r\\n2030 FORGED\\x1b[2J\\x85 failed"
    assert lines[1] == "Traceback (most recent call last):" and lines[-1] == "ValueError: boom"
    assert one_line("un café, 狐 and a tab\t") == "un café, 狐 and a tab\\t"


def test_every_wanserve_command_logs_one_line_per_record() -> None:
    script = (
        "import logging, sys\n"
        "from wanserve.cli import main\n"
        "main(['--verbose', 'status', '--url', 'http://127.0.0.1:9', 'no-such-request'])\n"
        "logging.getLogger('wanserve.x').warning('to %s', 'http://a/\\n2030 FORGED')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "to http://a/\\n2030 FORGED" in done.stderr, done.stderr
    assert not any(line.startswith("2030 FORGED") for line in done.stderr.splitlines())


def test_verbose_logs_leave_out_the_urls_the_http_libraries_would_log() -> None:
    """`wanserve -v`: httpx logs each request's whole URL at INFO (a webhook's `?token=`, a LoRA URL's signature).
    Verbose is our DEBUG, not theirs."""
    script = (
        "import logging, threading, httpx\n"
        "from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer\n"
        "from wanserve.logsetup import configure_logging\n"
        "class Quiet(BaseHTTPRequestHandler):\n"
        "    def log_message(self, *args): pass\n"
        "server = ThreadingHTTPServer(('127.0.0.1', 0), Quiet)\n"
        "threading.Thread(target=server.serve_forever, daemon=True).start()\n"
        "configure_logging(logging.DEBUG, '%(levelname)s %(name)s: %(message)s')\n"
        "httpx.post(f'http://127.0.0.1:{server.server_address[1]}/hook?token=SECRET-TOKEN')\n"
        "logging.getLogger('wanserve.webhooks').debug('our own debug line')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "our own debug line" in done.stderr, done.stderr
    assert "SECRET-TOKEN" not in done.stderr, done.stderr


def test_a_servers_access_log_hides_query_strings_and_uvicorn_writes_in_the_one_format(
    tmp_path: Path, model_cache: Path
) -> None:
    """A signed file URL's signature is a secret for days; uvicorn's lines had a format (and no time) of their own."""
    server = Server(tmp_path / "data", model_cache, args=["--workers", "0", "--access-log"]).start(wait_ready=False)
    try:
        assert httpx.get(f"{server.url}/health", params={"sig": "SECRETSIG", "exp": "1"}).status_code == 200
        # fal-client's multipart upload URL is signed in its path (a 404 here: no such file, same log line)
        httpx.get(f"{server.url}/files/~1999999999.PATHSECRETSIG/abcdefgh12/v.mp4/multipart/u1/1")
        deadline = time.monotonic() + 10
        while "/files/~..." not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = server.log()
    finally:
        server.kill()
    assert '"GET /health?... HTTP/1.1" 200' in log and "SECRETSIG" not in log
    assert '"GET /files/~.../abcdefgh12/v.mp4/multipart/u1/1 HTTP/1.1"' in log
    assert re.search(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO uvicorn.error: Started server process", log, re.MULTILINE), log
