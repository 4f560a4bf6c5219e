"""How the client and CLI behave when things go wrong around them: a server that restarts mid-wait, one that is not
a wanserve server, a bad `-o` path or API key, Ctrl-C. A stand-in server plays each part (the real server's own
behaviour is tested elsewhere); the CLI runs in process through `wanserve.cli.main`."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from file_server import serving

from wanserve.cli import main
from wanserve.client import client as client_module
from wanserve.client import commands
from wanserve.client.client import ConfigError, WanserveClient

APP = "fal-ai/wan-22"
RID = "req-1"


class Stand:
    """What the stand-in server answers; `seen` records (method, path, authorization)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []
        self.status_failures = 0  # status polls answered 503 before the real answer (a restarting server)
        self.status_body: dict[str, Any] = {"status": "COMPLETED", "request_id": RID, "logs": []}
        self.not_json = False
        self.stream_status_code = 0  # > 0: the status stream is answered so (a proxy during a restart), not cut
        self.status_hangs_up = False  # status polls are cut too (the server went away after the submit)
        self.result_body: dict[str, Any] | None = None  # the result; None: 404


@pytest.fixture
def stand() -> Iterator[tuple[Stand, str]]:
    state = Stand()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, body: Any) -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/html" if isinstance(body, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> str:
            state.seen.append((self.command, self.path, self.headers.get("Authorization", "")))
            return self.path.split("?")[0]

        def do_GET(self) -> None:
            path = self._record()
            if state.not_json:
                self._answer(200, "<html>a web server, not wanserve</html>")
            elif path.endswith("/status/stream") and state.stream_status_code:
                self._answer(state.stream_status_code, {"detail": "upstream restarting"})
            elif path.endswith("/status/stream"):
                self.connection.close()  # a stream cut by a proxy or a restart: the client falls back to polling
            elif path.endswith("/status") and state.status_hangs_up:
                self.connection.close()
            elif path.endswith(f"/requests/{RID}") and state.result_body is not None:
                self._answer(200, state.result_body)
            elif path.endswith("/status"):
                if state.status_failures > 0:
                    state.status_failures -= 1
                    self._answer(503, {"detail": "restarting"})
                else:
                    with_logs = "logs=1" in self.path or "logs=true" in self.path
                    self._answer(200, {**state.status_body, **({} if with_logs else {"logs": None})})
            else:
                self._answer(404, {"detail": "not found"})

        def do_POST(self) -> None:
            self._record()
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            base = f"http://127.0.0.1:{self.server.server_address[1]}/{APP}/requests/{RID}"
            self._answer(
                200,
                {"request_id": RID, "status_url": f"{base}/status", "response_url": base,
                 "cancel_url": f"{base}/cancel", "queue_position": 0},
            )  # fmt: skip

        def do_PUT(self) -> None:
            self._record()
            self._answer(202, {"status": "CANCELLATION_REQUESTED"})

        def log_message(self, *args: object) -> None:
            pass

    with serving(Handler) as url:
        yield state, url


def test_following_a_request_rides_out_a_restarting_server(
    stand: tuple[Stand, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state, url = stand
    monkeypatch.setattr(client_module, "POLL_INTERVAL_S", 0.01)
    state.status_failures = 3  # 503s after the stream broke: the client keeps polling instead of giving up
    with WanserveClient(url) as client:
        statuses = [s.status for s in client.follow(RID)]
    assert statuses == ["COMPLETED"] and state.status_failures == 0
    monkeypatch.setattr(client_module, "RECONNECT_GRACE_S", 0.0)  # past the grace period it does give up
    state.status_failures = 3
    with WanserveClient(url) as client, pytest.raises(client_module.ServerError):
        list(client.follow(RID))


@pytest.mark.parametrize("code", [502, 503, 504])
def test_a_status_stream_refused_by_a_restarting_proxy_falls_back_to_polling(
    stand: tuple[Stand, str], monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    state, url = stand
    monkeypatch.setattr(client_module, "POLL_INTERVAL_S", 0.01)
    state.stream_status_code = code
    with WanserveClient(url) as client:
        assert [s.status for s in client.follow(RID)] == ["COMPLETED"]
    state.stream_status_code = 404  # not a restart: the caller's error, at once
    with WanserveClient(url) as client, pytest.raises(client_module.ApiError):
        list(client.follow(RID))


def test_an_api_key_is_stripped_and_never_echoed(stand: tuple[Stand, str], capsys: pytest.CaptureFixture[str]) -> None:
    state, url = stand
    with WanserveClient(url, "secret-key\n") as client:  # read from a file, line break and all
        client.status(RID)
    assert state.seen[-1][2] == "Key secret-key"
    with pytest.raises(ConfigError) as err:
        WanserveClient(url, "clé-secrète")
    assert "secrète" not in str(err.value)
    assert main(["status", RID, "--url", url, "--key", "secret\r\nX-Evil: 1"]) == 1
    err_text = capsys.readouterr().err
    assert "cannot carry" in err_text and "secret" not in err_text.replace("--key", "")


def test_a_bad_output_path_is_refused_before_anything_is_submitted(
    stand: tuple[Stand, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, url = stand
    for bad in (str(tmp_path / "missing" / "fox.mp4"), str(tmp_path)):
        assert main(["run", "a fox", "--url", url, "-o", bad]) == 1
        assert "-o" in capsys.readouterr().err
    assert state.seen == []  # no request: nothing generated for nothing


def test_a_server_that_is_not_wanserve_is_a_clear_error(
    stand: tuple[Stand, str], capsys: pytest.CaptureFixture[str]
) -> None:
    state, url = stand
    state.not_json = True
    assert main(["status", RID, "--url", url, "--json"]) == 1
    captured = capsys.readouterr()
    assert "is --url right?" in captured.err and "Traceback" not in captured.err
    assert json.loads(captured.out)["error_type"] == "unexpected_answer"
    assert main(["status", RID, "--url", "http://[::1"]) == 1
    assert "not a valid server URL" in capsys.readouterr().err


def test_plain_status_shows_the_step_without_logs_flag(
    stand: tuple[Stand, str], capsys: pytest.CaptureFixture[str]
) -> None:
    state, url = stand
    line = "step 3/6 · high-noise expert · 1.50s/step · ETA 4s"
    state.status_body = {"status": "IN_PROGRESS", "request_id": RID, "logs": [{"message": line, "level": "INFO"}]}
    assert main(["status", RID, "--url", url]) == 0
    out = capsys.readouterr().out
    assert "IN_PROGRESS · step 3/6" in out and line not in out  # the log lines themselves only with --logs


def test_ctrl_c_while_running_cancels_the_request(
    stand: tuple[Stand, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state, url = stand
    state.status_body = {"status": "IN_PROGRESS", "request_id": RID, "logs": []}
    monkeypatch.setattr(client_module, "POLL_INTERVAL_S", 0.01)

    def interrupted(self: Any, status: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands.ProgressView, "update", interrupted)
    assert main(["run", "a fox", "--url", url]) == 130
    assert ("PUT", f"/{APP}/requests/{RID}/cancel", "") in state.seen
    assert f"cancelling request {RID}" in capsys.readouterr().err
    # --json: stdout still carries one JSON document, which says what became of the request
    assert main(["run", "a fox", "--url", url, "--json"]) == 130
    assert json.loads(capsys.readouterr().out) == {"request_id": RID, "error_type": "interrupted", "cancelled": True}


def test_following_a_server_that_cannot_be_reached_fails_at_once(
    stand: tuple[Stand, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong --url is an error at once, not five silent minutes of waiting for a restart that never comes."""

    def no_waiting(seconds: float) -> None:
        raise AssertionError(f"waited {seconds} s for a server that never answered")

    monkeypatch.setattr(client_module, "time", SimpleNamespace(monotonic=time.monotonic, sleep=no_waiting))
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{unused.getsockname()[1]}"  # bound, not listening: connections are refused
        assert main(["status", RID, "--follow", "--url", nobody]) == 1
    assert f"cannot reach the server at {nobody}" in capsys.readouterr().err


def test_following_rides_out_an_outage_only_on_a_server_that_answered_this_client(
    stand: tuple[Stand, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state, url = stand
    state.status_hangs_up = True  # every status call is cut: the server went away
    monkeypatch.setattr(client_module, "POLL_INTERVAL_S", 0.01)
    monkeypatch.setattr(client_module, "RECONNECT_GRACE_S", 0.3)
    outages: list[tuple[str, float]] = []
    with WanserveClient(url) as client:  # never answered: a wrong URL, as far as it can tell
        with pytest.raises(httpx.TransportError):
            list(client.follow(RID, on_outage=lambda exc, grace: outages.append((type(exc).__name__, grace))))
        assert outages == []
        client.submit({"prompt": "a fox"})  # answered: from now on an outage is waited out
        started = time.monotonic()
        with pytest.raises(httpx.TransportError):
            list(client.follow(RID, on_outage=lambda exc, grace: outages.append((type(exc).__name__, grace))))
        assert time.monotonic() - started >= 0.3 and len(outages) == 1 and outages[0][1] == 0.3


def test_a_run_that_loses_its_server_after_the_submit_names_the_request(
    stand: tuple[Stand, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state, url = stand
    state.status_hangs_up = True
    monkeypatch.setattr(client_module, "POLL_INTERVAL_S", 0.01)
    monkeypatch.setattr(client_module, "RECONNECT_GRACE_S", 0.05)
    assert main(["run", "a fox", "--url", url, "--json"]) == 1
    captured = capsys.readouterr()
    error = json.loads(captured.out)
    assert error["request_id"] == RID and error["error_type"] == "unreachable"
    assert "server unreachable" in captured.err and "trying again for up to" in captured.err  # said while waiting
    assert f"wanserve status {RID} --follow" in captured.err


def test_a_video_that_cannot_be_downloaded_is_reported_with_where_it_is(
    stand: tuple[Stand, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A public URL this machine cannot reach (NAT, a proxy): the video is made; the error must say where."""
    state, url = stand
    video = "http://127.0.0.1:1/files/abc/fox.mp4"
    state.result_body = {"video": {"url": video, "content_type": "video/mp4"}, "seed": 7, "prompt": "a fox"}
    assert main(["run", "a fox", "--url", url, "--json", "-o", str(tmp_path / "fox.mp4")]) == 1
    captured = capsys.readouterr()
    error = json.loads(captured.out)
    assert error["request_id"] == RID and error["error_type"] == "not_saved" and error["video_url"] == video
    assert "cannot reach 127.0.0.1" in error["message"] and f"cannot reach the server at {url}" not in captured.err
    assert not (tmp_path / "fox.mp4").exists() and list(tmp_path.iterdir()) == []


def test_an_unreadable_local_lora_file_is_a_message(
    stand: tuple[Stand, str], capsys: pytest.CaptureFixture[str]
) -> None:
    state, url = stand
    unreadable = Path(f"/proc/{os.getpid()}/mem")  # a file whose read fails (EIO), even for root
    assert main(["submit", "a fox", "--url", url, "--lora", str(unreadable)]) == 1
    err = capsys.readouterr().err
    assert f"LoRA {unreadable}: cannot read it" in err and "Traceback" not in err
    assert not any(method == "POST" and path.startswith(f"/{APP}") for method, path, _ in state.seen)


def test_a_server_that_cannot_start_says_why_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before any process starts: a taken port, a data folder that cannot be made, a broken key hashes file."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--port", port, "--data-dir", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["serve", "--port", "0", "--no-worker", "--data-dir", str(blocker / "data")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(blocker) in err and "Traceback" not in err

    hashes = tmp_path / "hashes.txt"
    hashes.write_text("not-a-hash\n")
    args = ["serve", "--port", "0", "--no-worker", "--data-dir", str(tmp_path / "d")]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANSERVE_API_KEY_HASHES_FILE", str(hashes))
        assert main(args) == 2
    assert "the API key hashes:" in capsys.readouterr().err


def test_a_model_folder_that_is_not_there_stops_the_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Its workers would fail to load it and restart for ever while requests queue (only /ready would tell)."""
    missing = tmp_path / "Wan2.2-T2V-A14B"
    for command in (["serve", "--port", "0"], ["worker"]):
        assert main([*command, "--data-dir", str(tmp_path / "d"), "--model", str(missing)]) == 1
        err = capsys.readouterr().err
        assert f"model path {missing} is not a directory" in err and "Traceback" not in err, command
    missing.mkdir()  # there, but not a model
    assert main(["worker", "--data-dir", str(tmp_path / "d"), "--model", str(missing)]) == 1
    assert "has neither model_index.json" in capsys.readouterr().err
    # The API process checks it without loading torch (seconds and hundreds of MB it never needs).
    (missing / "model_index.json").write_text("{}")
    check = (
        "import sys; from wanserve.cli import _check_model; from wanserve.config import Settings; "
        f"_check_model(Settings(model={str(missing)!r}, data_dir={str(tmp_path / 'd')!r})); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_short_api_key_is_warned_about_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Keys are kept as fast SHA-256 digests, which only a random key of about 128 bits makes safe to leak."""
    long_key = "k" * 22
    with socket.socket() as taken:  # the start stops at the port, after the key check
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        args = ["serve", "--port", port, "--data-dir", str(tmp_path / "d"), "--no-worker"]
        with caplog.at_level("WARNING", logger="wanserve"), pytest.MonkeyPatch.context() as env:
            env.setenv("WANSERVE_API_KEYS", f"abc,{long_key}")
            assert main(args) == 1
    warnings = [r.getMessage() for r in caplog.records if "characters: use a random key" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("API key 1 of 2 is only 3 characters")
    assert "abc" not in caplog.text  # the key itself is never logged


def test_the_outage_notice_says_what_the_wait_is_for() -> None:
    out = io.StringIO()
    notice = commands._outage_notice(commands.ProgressView(out, live=False))
    notice(client_module.ApiError(429, "read rate limit exceeded", "rate_limited", retry_after_s=1.0), 300)
    notice(client_module.ApiError(503, "restarting", "runner_disconnected"), 300)
    notice(httpx.ConnectError("Connection refused"), 300)
    assert out.getvalue().splitlines() == [
        "status reads rate-limited for this key (HTTP 429); trying again for up to 300 s",
        "server unavailable (HTTP 503); trying again for up to 300 s",
        "server unreachable (Connection refused); trying again for up to 300 s",
    ]
