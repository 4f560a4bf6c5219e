from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from wanserve.cli import _check_cache_dir, main
from wanserve.config import Settings
from wanserve.engine.video import probe_mp4

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANSERVE_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "wanserve", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_readme_opens_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert first_block is not None and readme.index("```sh") < readme.index("## ")
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    # `make -n` shows what the demo command runs: the demo script, i.e. a request through the service.
    dry = subprocess.run(["make", "-n", "demo"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "scripts/demo.py" in dry
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make demo" in ci


@pytest.mark.slow
def test_generate_command_writes_a_playable_mp4(tmp_path: Path, model_cache: Path, coarse_model: Path) -> None:
    proc = run_cli(
        [
            "generate",
            "a red fox walks through snow",
            "--model", str(coarse_model),
            "--resolution", "480p",
            "--aspect-ratio", "1:1",
            "--num-frames", "83",
            "--frames-per-second", "12",
            "--num-inference-steps", "2",
            "--guidance-scale", "1",
            "--guidance-scale-2", "1",
            "--seed", "9",
            "--reverse-video",
            "-o", "out/fox.mp4",
            "--json",
        ],
        model_cache,
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["seed"] == 9 and summary["path"] == str(tmp_path / "out" / "fox.mp4")
    info = probe_mp4(tmp_path / "out" / "fox.mp4")
    assert (info.num_frames, info.width, info.height, info.fps) == (83, 640, 640, 12.0)
    # Not a terminal: one plain progress line per denoising step.
    assert "step 1/2 (high expert, t=999)" in proc.stderr and "step 2/2 (low expert" in proc.stderr


def test_invalid_flags_name_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "p", "--num-frames", "200", "--shift", "0.5", "-o", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "num_frames: Input should be less than or equal to 121" in err
    assert "shift: Input should be greater than or equal to 1" in err
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize(("flag", "kind"), [("--seed", "int"), ("--num-frames", "int"), ("--guidance-scale", "float")])
def test_a_flag_that_is_not_a_number_says_which_kind(flag: str, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "p", flag, "abc"])
    assert f"argument {flag}: invalid {kind} value: 'abc'" in capsys.readouterr().err


def test_bad_model_path_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "p", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "x.mp4")]) == 1
    err = capsys.readouterr().err
    assert "is not a directory" in err and "Traceback" not in err


def test_a_lora_file_that_is_not_there_is_named_as_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Not "local LoRA paths are disabled on this server": a local generation reads any file named on its command
    line; this one is not there. Said before the model loads."""
    nowhere = str(tmp_path / "no-model")
    for lora in ("style.safetensors:0.8", "./loras/style.safetensors"):
        assert main(["generate", "a fox", "--lora", lora, "--model", nowhere, "-o", str(tmp_path / "x.mp4")]) == 1
        err = capsys.readouterr().err
        path = lora.removesuffix(":0.8")
        assert f"LoRA {path}: no such file" in err and "is not a directory" not in err and "Traceback" not in err


def test_generate_applies_the_safety_checker_and_prompt_expansion_as_a_worker_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both are request fields (flags here): a local generation honours them before the model is even loaded."""
    terms = tmp_path / "terms.txt"
    terms.write_text("forbidden\n")
    monkeypatch.setenv("WANSERVE_SAFETY_TERMS_FILE", str(terms))
    nowhere = str(tmp_path / "no-model")
    assert main(["generate", "a forbidden fox", "--model", nowhere, "-o", str(tmp_path / "x.mp4")]) == 1
    err = capsys.readouterr().err
    assert "content_policy_violation" in err and "Safety checker: checking the prompt" in err
    assert "Traceback" not in err and not (tmp_path / "x.mp4").exists()
    # Not flagged; expansion asked for with no expansion model configured: said so, then the (missing) model.
    expand = ["--enable-prompt-expansion", "--model", nowhere, "-o", str(tmp_path / "x.mp4")]
    assert main(["generate", "a fox", *expand]) == 1
    err = capsys.readouterr().err
    assert "Prompt expansion skipped: no expansion model or API is configured" in err and "is not a directory" in err


def test_generate_refuses_a_folder_as_its_output_before_generating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "a fox", "--model", str(tmp_path / "no-model"), "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_demo_script_runs_a_request_through_the_service(tmp_path: Path, model_cache: Path, coarse_model: Path) -> None:
    out = tmp_path / "demo.mp4"
    env = {**os.environ, "WANSERVE_CACHE_DIR": str(model_cache), "WANSERVE_MODEL": str(coarse_model)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--data-dir", str(tmp_path / "data"), "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step 4/4" in proc.stdout and "seed 42" in proc.stdout
    info = probe_mp4(out)
    assert (info.num_frames, info.width, info.height) == (81, 832, 480)
    # The request and its file are in the embedded stores under the data directory.
    assert (tmp_path / "data" / "jobs.sqlite3").is_file()
    assert any((tmp_path / "data" / "files" / "objects").rglob("*.mp4"))


def test_generate_with_a_local_lora_file_and_a_bad_one(tmp_path: Path, model_cache: Path, coarse_model: Path) -> None:
    from lora_files import random_factors, write_wan

    from wanserve.engine.tiny import TinyConfig, build_expert

    (tmp_path / "loras").mkdir()
    write_wan(tmp_path / "loras" / "style.safetensors", random_factors(build_expert(TinyConfig()), seed=3), alpha=4)
    common = ["generate", "a fox", "--model", str(coarse_model), "--resolution", "480p",
              "--num-inference-steps", "1", "--seed", "1", "--json"]  # fmt: skip
    # A path relative to the working directory, in a subfolder.
    ok = run_cli([*common, "--lora", "loras/style.safetensors:0.5:high", "-o", "a.mp4"], model_cache, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"LoRA 1/1 \(\S*/loras/style\.safetensors\): loaded into the high-noise expert", ok.stderr)
    assert "scale 0.5" in ok.stderr
    # A data URI longer than a file name may be (the file system refuses to even look it up).
    junk = "data:application/octet-stream;base64," + base64.b64encode(b"junk" * 2000).decode()
    bad = run_cli([*common, "--lora", junk, "-o", "b.mp4"], model_cache, tmp_path)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "error (invalid_lora): loras.0.path: not a valid safetensors file" in bad.stderr


def test_a_cache_folder_that_cannot_be_made_stops_the_start(tmp_path: Path) -> None:
    """Before, the server started and its workers failed and restarted for ever with a bare errno line (here: the
    command would not end, and its time limit fails the test)."""
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    args = ["--data-dir", str(tmp_path / "data"), "--cache-dir", str(blocked / "cache"), "--port", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "wanserve", "serve", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stderr
    assert f"the cache folder {blocked / 'cache'} (--cache-dir, WANSERVE_CACHE_DIR) cannot be used" in done.stderr
    assert "Traceback" not in done.stderr


def test_only_the_cache_folders_in_use_are_required(tmp_path: Path) -> None:
    """A model folder needs no built-model cache; the compile and LoRA caches are written whatever the model."""
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    usable = {"compile_cache_dir": tmp_path / "compile", "lora_cache_dir": tmp_path / "loras"}
    _check_cache_dir(Settings(model=str(tmp_path), cache_dir=blocked / "cache", **usable))
    with pytest.raises(OSError, match="WANSERVE_LORA_CACHE_DIR"):
        _check_cache_dir(Settings(model=str(tmp_path), **{**usable, "lora_cache_dir": blocked / "loras"}))


def test_a_worker_without_a_public_url_says_its_video_urls_reach_nobody(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class NoRun:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def run(self, **kwargs: object) -> None:
            pass

        drain = stop = run

    monkeypatch.setattr("wanserve.worker.loop.Worker", NoRun)
    monkeypatch.setattr("wanserve.worker.signals.handle_signals_at_once", lambda handlers: None)
    monkeypatch.delenv("WANSERVE_PUBLIC_URL", raising=False)
    base = ["worker", "--data-dir", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache")]
    assert main(base) == 0
    assert "no public URL: this worker takes http://127.0.0.1:8000 for the API's" in caplog.text
    caplog.clear()
    assert main([*base, "--public-url", "https://video.example.com"]) == 0
    assert "no public URL" not in caplog.text


def test_hash_key_needs_no_server_settings(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WANSERVE_PORT", "not a port")
    monkeypatch.setattr(sys, "stdin", io.StringIO("a-key-long-enough-to-be-random-0123456789\n"))
    assert main(["hash-key"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("sha256:") and "short key" not in out.err


@pytest.mark.parametrize("source", ["blank key", "empty hashes file", "blank variable", "separators only"])
def test_a_key_source_with_no_usable_key_stops_the_start_instead_of_opening_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], source: str
) -> None:
    """`--api-key "$KEY"` with KEY unset, or a hashes file with comments only, on 0.0.0.0: the blank key was dropped
    and no key generated (a key *was* configured), so the server answered anyone."""
    for name in ("WANSERVE_API_KEYS", "WANSERVE_API_KEY_HASHES", "WANSERVE_API_KEY_HASHES_FILE"):
        monkeypatch.delenv(name, raising=False)
    args = ["serve", "--host", "0.0.0.0", "--port", "0", "--no-worker", "--data-dir", str(tmp_path / "data")]
    if source == "blank key":
        args += ["--api-key", ""]
    elif source == "blank variable":
        monkeypatch.setenv("WANSERVE_API_KEYS", "")
    elif source == "separators only":  # `${KEY1},${KEY2}` with both unset
        monkeypatch.setenv("WANSERVE_API_KEYS", " , ")
    else:
        hashes = tmp_path / "key-hashes"
        hashes.write_text("# one sha256:<hex> per line, filled in later\n\n")
        monkeypatch.setenv("WANSERVE_API_KEY_HASHES_FILE", str(hashes))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "API keys are configured" in err and "none is usable" in err
    assert not (tmp_path / "data" / "api-key").exists()  # nor was a key generated in its place
