"""Start `wanserve serve` as a child process on a free loopback port and wait until it is usable.

One implementation for everything that needs a throwaway local server: the demo, the benchmarks and the
service tests.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import httpx


class ServerNotReady(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    data_dir: Path,
    port: int,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    output: IO[bytes] | int | None = None,
) -> subprocess.Popen[bytes]:
    """`wanserve serve --port PORT --data-dir DATA_DIR ARGS...` with this interpreter, not yet waited for."""
    command = [sys.executable, "-m", "wanserve", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    return subprocess.Popen([*command, *args], env=dict(env) if env is not None else None, stdout=output,
                            stderr=subprocess.STDOUT if output is not None else None)  # fmt: skip


def wait_until(process: subprocess.Popen[bytes], url: str, *, ready: bool = True, timeout_s: float = 600.0) -> None:
    """Polls `/ready` (a worker has the model loaded) or `/health` (the API answers) until it says 200.
    Raises ServerNotReady if the process exits or the time runs out."""
    path = "/ready" if ready else "/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerNotReady(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ServerNotReady(f"the server did not answer 200 on {path} within {timeout_s:.0f} s")
