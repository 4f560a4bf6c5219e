"""`wanserve run|submit|status|result|cancel` as real processes against a real server: plain lines off a
terminal, a live progress line on a pseudo-terminal, `--json` that parses, errors as clear messages."""

from __future__ import annotations

import argparse
import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from server import Server

from wanserve.cli import main as cli_main
from wanserve.client.client import ConfigError, RequestCancelled, WanserveClient
from wanserve.client.commands import (
    Submitted,
    check_output_path,
    local_file,
    lora_arguments,
    parse_lora,
    report_error,
)
from wanserve.engine.video import probe_mp4

CHEAP_FLAGS = ["--resolution", "480p", "--guidance-scale", "1", "--guidance-scale-2", "1"]


def wanserve(server: Server, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANSERVE_URL": server.url}
    env.pop("WANSERVE_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "wanserve", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_parse_lora_reads_from_the_right() -> None:
    assert parse_lora("https://host:8443/a.safetensors") == {"path": "https://host:8443/a.safetensors"}
    assert parse_lora("https://host/a.safetensors:0.7") == {"path": "https://host/a.safetensors", "scale": 0.7}
    assert parse_lora("owner/name:1.5:high") == {"path": "owner/name", "scale": 1.5, "transformer": "high"}
    assert parse_lora("style.safetensors:low") == {"path": "style.safetensors", "transformer": "low"}


def test_run_with_json_and_output_off_a_terminal(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "fox.mp4"
    proc = wanserve(
        server, "run", "a red fox", *CHEAP_FLAGS, "--num-inference-steps", "2", "--seed", "5", "--json", "-o", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["seed"] == 5 and result["path"] == str(out.resolve()) and result["request_id"]
    assert probe_mp4(out).num_frames == 81
    assert "step 1/2 · high-noise expert" in proc.stderr and "step 2/2" in proc.stderr  # plain lines, no \r
    assert "\r" not in proc.stderr


def test_run_on_a_pseudo_terminal_draws_live_progress(server: Server) -> None:
    env = {**os.environ, "WANSERVE_URL": server.url, "COLUMNS": "160"}
    main, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "wanserve", "run", "a fox", *CHEAP_FLAGS, "--num-inference-steps", "3"],
        stdin=secondary, stdout=secondary, stderr=secondary, env=env, close_fds=True,
    )  # fmt: skip
    os.close(secondary)
    screen = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the process closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        elif proc.poll() is not None:
            break
    proc.wait(30)
    os.close(main)
    text = screen.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "\r\x1b[2K" in text  # redrawn in place
    assert "step 3/3" in text and "█" in text and "ETA" in text
    assert "seed " in text


def test_submit_status_result_cancel(server: Server, tmp_path: Path) -> None:
    submitted = wanserve(server, "submit", "a fox", *CHEAP_FLAGS, "--num-inference-steps", "1", "--json")
    assert submitted.returncode == 0, submitted.stderr
    request_id = json.loads(submitted.stdout)["request_id"]
    followed = wanserve(server, "status", request_id, "--follow", "--json")
    assert followed.returncode == 0, followed.stderr
    assert json.loads(followed.stdout)["status"] == "COMPLETED" and "step 1/1" in followed.stderr
    status = wanserve(server, "status", request_id, "--logs")
    assert status.stdout.startswith("COMPLETED") and "  step 1/1" in status.stdout
    out = tmp_path / "r.mp4"
    result = wanserve(server, "result", request_id, "-o", str(out))
    assert result.returncode == 0 and result.stdout.splitlines()[0] == str(out.resolve()) and out.stat().st_size > 0
    done = wanserve(server, "cancel", request_id, "--json")
    assert json.loads(done.stdout) == {"request_id": request_id, "cancelled": False}

    plain = wanserve(
        server, "submit", "a slow fox", *CHEAP_FLAGS, "--num-inference-steps", "100", "--num-frames", "121"
    )
    long_id = plain.stdout.strip()
    assert wanserve(server, "cancel", long_id).stdout.strip() == "cancel requested"
    final = wanserve(server, "status", long_id, "--follow", "--json")
    assert json.loads(final.stdout)["error_type"] == "client_cancelled"
    failed = wanserve(server, "result", long_id)
    assert failed.returncode == 1 and "499" in failed.stderr and "client_cancelled" in failed.stderr


def test_errors_are_messages_not_tracebacks(server: Server) -> None:
    bad = wanserve(server, "run", "a fox", "--num-frames", "500", "--guidance-scale", "99")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "num_frames: Input should be less than or equal to 121" in bad.stderr
    assert "guidance_scale:" in bad.stderr
    as_json = wanserve(server, "submit", "x", "--num-frames", "10", "--json")
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["status_code"] == 422
    missing = wanserve(server, "status", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 1 and "404" in missing.stderr
    unreachable = subprocess.run(
        [sys.executable, "-m", "wanserve", "status", "x", "--url", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert unreachable.returncode == 1 and "cannot reach the server" in unreachable.stderr
    # A bad server setting in this shell is no concern of a client command's.
    env = {**os.environ, "WANSERVE_PORT": "abc", "WANSERVE_STORE": "postgres://x"}
    status = subprocess.run(
        [sys.executable, "-m", "wanserve", "status", "00000000-0000-0000-0000-000000000000", "--url", server.url,
         "--json"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert status.returncode == 1 and json.loads(status.stdout)["status_code"] == 404, status.stderr


def test_which_lora_arguments_are_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "a.safetensors").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert local_file("loras/a.safetensors") == tmp_path / "loras" / "a.safetensors"
    assert local_file("./loras/a.safetensors") == tmp_path / "loras" / "a.safetensors"
    assert local_file("loras/missing.safetensors") is None
    assert local_file("https://example.com/loras/a.safetensors") is None
    assert local_file("data:application/octet-stream;base64," + "QUFB" * 5000) is None  # no OSError: too long
    assert local_file("x" * 5000) is None and local_file("a\0b") is None
    # A path that can only mean this machine, mistyped: said here, not sent to the server as a server-side path.
    with pytest.raises(ConfigError, match="no such file on this machine"):
        lora_arguments(WanserveClient("http://127.0.0.1:9"), ["./loras/missing.safetensors"], io.StringIO())


def test_a_lora_upload_url_out_of_reach_is_named_not_blamed_on_the_server(tmp_path: Path) -> None:
    """A server on 0.0.0.0 without a public URL hands out upload URLs under 127.0.0.1: the server answered, the
    upload URL is what cannot be reached, and the message says so."""
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"x")

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/rest/storage/upload/initiate"
        return httpx.Response(200, json={"upload_url": "http://127.0.0.1:9/rest/storage/upload/put/k?sig=s",
                                         "file_url": "http://127.0.0.1:9/files/k"})  # fmt: skip

    client = WanserveClient("http://gpu-box.test:8000")
    client.http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(handler))
    with client, pytest.raises(ConfigError) as refused:
        lora_arguments(client, [str(lora)], io.StringIO())
    assert "http://127.0.0.1:9" in str(refused.value) and "WANSERVE_PUBLIC_URL" in str(refused.value)


def test_output_path_problems_are_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = argparse.Namespace(output=str(tmp_path / "v.mp4"))
    check_output_path(args)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # (root, as CI runs, may write anywhere)
    with pytest.raises(ConfigError, match="is not writable"):
        check_output_path(args)
    monkeypatch.undo()

    def unsearchable(self: Path) -> bool:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "is_dir", unsearchable)
    with pytest.raises(ConfigError, match="Permission denied"):
        check_output_path(args)


def test_only_a_request_that_goes_on_gets_the_hint_to_follow_it(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(url="http://gpu-box.test:8000", json=False)
    cancelled = RequestCancelled(499, "Request was cancelled", "client_cancelled", "r1", None, True)
    assert report_error(Submitted(cancelled, "r1"), args) == 1
    assert "client_cancelled" in (err := capsys.readouterr().err) and "--follow" not in err
    assert report_error(Submitted(httpx.ConnectError("refused"), "r1"), args) == 1
    assert "wanserve status r1 --follow" in capsys.readouterr().err
    assert report_error(httpx.TooManyRedirects("loop"), argparse.Namespace(url=None, json=True)) == 1
    assert json.loads(capsys.readouterr().out)["error_type"] == "unexpected_answer"


def test_following_a_request_that_failed_exits_1_and_an_interrupt_still_prints_json(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with WanserveClient(server.url) as client:
        running = client.submit({"prompt": "a fox", "resolution": "580p", "num_inference_steps": 100})
        assert client.cancel(running.request_id)
    args = ["status", running.request_id, "--follow", "--json", "--url", server.url]
    assert cli_main(args) == 1 and json.loads(capsys.readouterr().out)["error_type"] == "client_cancelled"

    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(WanserveClient, "follow", interrupted)
    assert cli_main(args) == 130
    assert json.loads(capsys.readouterr().out) == {"request_id": running.request_id, "error_type": "interrupted"}
