"""benchmarks/gpu_bench.sh, the script a GPU session runs, on this machine with stand-ins for the GPU tools: a run
cut short still brings its rows back, a failed bench is a failed script, and a machine without the carried wheels
is told so at once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# python3 as the GPU machine would answer: imports work unless NO_WHEELS is set; `-m wanserve bench` records its
# arguments, writes a bench.json row into its --out-dir, then sleeps SLEEP s and exits with BENCH_EXIT.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = -c ]; then
  [ -z "${NO_WHEELS:-}" ] || { echo "No module named 'diffusers'" >&2; exit 1; }; echo ok; exit 0
fi
if [ "$1" = -m ] && [ "$2" = wanserve ]; then
  echo "$@" >> "$CALLS"
  while [ $# -gt 0 ]; do [ "$1" = --out-dir ] && out=$2; shift; done
  mkdir -p "$out" && echo '{"forwards": [{"preset": "exact"}], "videos": []}' > "$out/bench.json"
  sleep "${SLEEP:-0}"; exit "${BENCH_EXIT:-0}"
fi
case "$1" in *.py) echo "$@" >> "$CALLS"; exit "${BENCH_EXIT:-0}" ;; esac
exit 0
"""


def run_script(tmp_path: Path, mode: str, **env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (
        ("python3", FAKE_PYTHON),
        ("nvidia-smi", "#!/usr/bin/env bash\necho 'NVIDIA H100, 81559 MiB'\n"),
    ):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "out"
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), "TMPDIR": str(tmp_path),
                "CALLS": str(tmp_path / "calls.txt"), **env}  # fmt: skip
    command = ["bash", str(ROOT / "benchmarks" / "gpu_bench.sh"), mode]
    if "KILL_AFTER" not in env:
        return subprocess.run(command, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=60), out
    with subprocess.Popen(command, cwd=tmp_path, env=full_env, start_new_session=True, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as running:  # fmt: skip
        time.sleep(float(env["KILL_AFTER"]))
        os.killpg(running.pid, signal.SIGKILL)  # the script and everything it started, as at a time limit
        stdout, stderr = running.communicate(timeout=10)
    return subprocess.CompletedProcess(command, running.returncode, stdout, stderr), out


def test_main_runs_the_forward_bench_and_brings_its_rows_back(tmp_path: Path) -> None:
    proc, out = run_script(tmp_path, "main")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "bench-main.json").read_text())["forwards"][0]["preset"] == "exact"
    (call,) = (tmp_path / "calls.txt").read_text().splitlines()
    assert "--sizes 720p --presets exact,fast" in call and "--device cuda" in call and "--videos  " in call + " "
    assert (out / "device-main.txt").read_text().startswith("NVIDIA H100")
    assert "--lowbit-attention auto --lowbit-kernel auto" in call
    proc, _ = run_script(tmp_path, "main", LOWBIT="on", LOWBIT_KERNEL="fp8")
    assert "--lowbit-attention on --lowbit-kernel fp8" in (tmp_path / "calls.txt").read_text().splitlines()[-1]


def test_a_bench_cut_off_by_its_time_limit_fails_the_script_and_returns_its_rows(tmp_path: Path) -> None:
    proc, out = run_script(tmp_path, "video", SLEEP="30", BENCH_TIMEOUT="2")
    assert proc.returncode == 124, proc.stderr  # timeout's status: the caller sees the run did not finish
    assert json.loads((out / "bench-video.json").read_text())["forwards"]
    assert "--videos 720p:4:1" in (tmp_path / "calls.txt").read_text()


def test_rows_come_back_even_when_the_whole_script_is_killed(tmp_path: Path) -> None:
    """The device tool kills a command at its own limit: rows are copied out while the bench runs."""
    proc, out = run_script(tmp_path, "main", SLEEP="30", KILL_AFTER="7")
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((out / "bench-main.json").read_text())["forwards"]


@pytest.mark.parametrize("mode", ["main", "cap24", "cap80"])
def test_a_failed_bench_fails_the_script(tmp_path: Path, mode: str) -> None:
    proc, _ = run_script(tmp_path, mode, BENCH_EXIT="1")
    assert proc.returncode == 1


def test_without_the_carried_wheels_it_stops_at_once(tmp_path: Path) -> None:
    proc, _ = run_script(tmp_path, "main", NO_WHEELS="1")
    assert proc.returncode == 3 and "carry .whl" in proc.stderr
    assert not (tmp_path / "calls.txt").exists()


def test_lora_runs_the_lora_check_and_fails_with_it(tmp_path: Path) -> None:
    proc, out = run_script(tmp_path, "lora")
    assert proc.returncode == 0, proc.stderr
    (call,) = (tmp_path / "calls.txt").read_text().splitlines()
    assert call == f"benchmarks/lora_gpu.py --device cuda --preset exact --json {out}/lora.json"
    proc, _ = run_script(tmp_path, "lora", PRESET="fast")
    assert proc.returncode == 0 and "--preset fast" in (tmp_path / "calls.txt").read_text().splitlines()[-1]
    proc, _ = run_script(tmp_path, "lora", BENCH_EXIT="1")
    assert proc.returncode == 1


@pytest.mark.parametrize("preset", ["exact", "fast"])
def test_the_lora_check_itself_on_the_tiny_model(tmp_path: Path, model_cache: Path, preset: str) -> None:
    """What `gpu_bench.sh lora` runs, on a CPU and uncompiled (tests/test_speed.py counts the compiled graphs): every
    policy's videos, LoRA at four scales, equal to the resident policy's; with `fast`, the adapters on FP8 layers
    (emulated here)."""
    result = tmp_path / "lora.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "lora_gpu.py"), "--device", "cpu", "--no-compile",
               "--cache-dir", str(model_cache), "--json", str(result), "--preset", preset]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(result.read_text())["rows"]
    assert [row["policy"] for row in rows] == ["resident", "swap", "offload"]
    assert all(("FP8 linears" in row["speed"]) is (preset == "fast") for row in rows), rows
    for row in rows:
        assert row["finite"] and row["scale_changes_video"] and row["same_scale_same_video"], row
        assert max(row["error_vs_resident"].values()) < 1e-2, row


def _split_site(tmp_path: Path) -> None:
    """.fa4a/ and .fa4b/ as device_wheels.sh packs them: one tar.xz of a site folder, split in two."""
    site = tmp_path / "site" / "flash_attn" / "cute"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("# stand-in\n")
    packed = subprocess.run(["tar", "-C", str(tmp_path / "site"), "-cJf", "-", "."], capture_output=True,
                            check=True).stdout  # fmt: skip
    half = len(packed) // 2
    for name, part in ((".fa4a", packed[:half]), (".fa4b", packed[half:])):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"fa4site.tar.xz.{name[-1]}").write_bytes(part)


def test_flash4_travels_in_two_calls_through_a_stash_outside_the_checkout(tmp_path: Path) -> None:
    """Call 1 stashes .fa4a/ outside the checkout (the device tool copies the checkout afresh for each call, and a
    folder kept in it was gone by the next one); call 2 unpacks the stash and .fa4b/ into one site."""
    _split_site(tmp_path)
    stash = tmp_path / "stash"
    proc, _ = run_script(tmp_path, "stash", FA4_STASH=str(stash))
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(tmp_path / ".fa4a")  # call 2 carries only .fa4b (and the wheels)
    proc, out = run_script(tmp_path, "main", FA4_STASH=str(stash))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "fa4site" / "flash_attn" / "cute" / "__init__.py").read_text() == "# stand-in\n"
    assert (out / "flash4-import.txt").read_text().strip() == "ok"  # the stand-in python3's answer to the import


def test_flash4_second_part_without_the_stash_is_reported(tmp_path: Path) -> None:
    _split_site(tmp_path)
    proc, out = run_script(tmp_path, "main", FA4_STASH=str(tmp_path / "never-stashed"))
    assert proc.returncode == 0, proc.stderr  # the bench still runs, without FlashAttention 4
    assert "FlashAttention 4 not unpacked" in proc.stderr
    assert "is empty" in (out / "flash4-import.txt").read_text()
    assert not (tmp_path / "fa4site").exists()


def test_the_float_noise_floor_on_the_tiny_model(tmp_path: Path, model_cache: Path) -> None:
    """benchmarks/float_noise.py on a CPU: the reference repeats to the bit, cond+uncond batched moves the float32
    output only by rounding, and a kernel this machine cannot run is a row with its error, not a crash."""
    result = tmp_path / "noise.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "float_noise.py"), "--model", "tiny", "--device", "cpu",
               "--size", "480p", "--frames", "9", "--variants", "repeat,batched,cudnn",
               "--cache-dir", str(model_cache), "--json", str(result)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {row["variant"]: row for row in json.loads(result.read_text())}
    assert list(rows) == ["reference", "repeat", "batched", "cudnn"]
    assert rows["reference"]["tokens"] > 0 and rows["reference"]["seconds"] > 0
    assert rows["repeat"]["rel_error"] == 0.0
    assert 0.0 <= rows["batched"]["rel_error"] < 1e-5
    assert "RuntimeError" in rows["cudnn"]["error"]  # no cuDNN attention on a CPU
    bad = subprocess.run([*command[:2], "--variants", "repeat,sideways"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown variants: sideways" in bad.stderr


def test_cap80_sizes_the_process_as_an_80_gb_card(tmp_path: Path) -> None:
    proc, out = run_script(tmp_path, "cap80")
    assert proc.returncode == 0, proc.stderr
    (call,) = (tmp_path / "calls.txt").read_text().splitlines()
    assert "--memory-cap-gib 79" in call and "--memory-policy auto" in call and "--videos 720p:4:5" in call
    assert "--sizes  " in call  # no forward rows: diffusers' baseline would run before the cap, uncapped
    assert json.loads((out / "bench-cap80.json").read_text())["forwards"]
