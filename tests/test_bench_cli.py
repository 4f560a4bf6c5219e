"""`wanserve bench` on the tiny model on a CPU, its FLOP count, and the speed/memory settings (warm-up,
presets) that the worker reads."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from engines import record_forwards, tiny_engine
from pydantic import ValidationError

from wanserve.cli import main
from wanserve.config import Settings
from wanserve.engine.bench import A14B_EXPERT, TEXT_TOKENS, Bench, VideoCase, forward_flops, video_tokens
from wanserve.engine.runner import EngineRunner, engine_options, warmup_resolutions

A14B = SimpleNamespace(**A14B_EXPERT)


# `wanserve bench` as the GPU benchmark machine runs it: that image has torch, triton and transformers, and gets
# only the wheels benchmarks/device_wheels.sh carries. None of the service's own libraries may be needed.
WITHOUT_SERVICE_LIBRARIES = """
import sys
for name in ("redis", "boto3", "botocore", "cryptography", "fastapi", "uvicorn", "prometheus_client", "peft"):
    sys.modules[name] = None  # an import of it fails
from wanserve.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_bench_cli_on_the_tiny_model(tmp_path: Path, model_cache: Path) -> None:
    out = tmp_path / "bench"
    # `fast` first on purpose: presets run from the least to the most changed model (fast's FP8 linears stay).
    args = ["--device", "cpu", "--sizes", "480p", "--frames", "9", "--videos", "480p:2:5", "--step-cache", "0.99",
            "--attention", "flash", "--presets", "fast,exact", "--lowbit-kernel", "fp8", "--out-dir", str(out),
            "--cache-dir", str(model_cache)]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_SERVICE_LIBRARIES, "bench", *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED" not in proc.stdout, proc.stdout
    # --attention reaches our presets' engines (a GPU kernel on a CPU: kept off, with the reason in the engine line)
    assert re.search(r"^engine: preset exact.*flash attention needs a GPU: default attention", proc.stdout, re.M)
    # --lowbit-kernel reaches `fast` (on a CPU the low-bit attention always runs, emulated)
    assert re.search(r"^engine: preset fast.*FP8 attention \(cuDNN\)", proc.stdout, re.M), proc.stdout

    # The markdown table: one forward row per preset, one video row per run.
    for preset in ("diffusers", "exact", "fast"):
        assert re.search(rf"^\| 480p \| {preset} \| \d+\.\d+ \| \d+\.\d+x \|", proc.stdout, re.M), proc.stdout
    assert re.search(r"^\| 480p 9f 2 steps g5 \| exact\+fbc0\.99 \|", proc.stdout, re.M), proc.stdout

    doc = json.loads((out / "bench.json").read_text())
    forwards = {row["preset"]: row for row in doc["forwards"]}
    assert list(forwards) == ["diffusers", "exact", "fast"]
    assert "presets run in the order exact, fast" in proc.stdout
    assert all(row["size"] == "480p" and row["seconds"] > 0 and row["tflops"] > 0 for row in doc["forwards"])
    assert forwards["exact"]["rel_error"] < 1e-4

    videos = {row["preset"]: row for row in doc["videos"]}
    assert list(videos) == ["diffusers", "exact", "exact+fbc0.99", "fast"]
    assert all(row["case"] == "480p 9f 2 steps g5" for row in doc["videos"])
    assert {"encode_s", "denoise_s", "decode_s", "mp4_s"} <= set(videos["exact"]["phases"])
    assert all(row["warmup_s"] > 0 for row in doc["videos"]), doc["videos"]
    note = videos["exact+fbc0.99"]["note"]
    assert re.fullmatch(r"frames differ by \d+\.\d\d% from exact without the cache", note), note
    assert note in proc.stdout
    for name in ("diffusers", "exact", "exact+fbc0.99", "fast"):
        video = out / f"{name}.mp4"
        assert video.is_file() and video.stat().st_size > 1000, name
    # The emulated FP8 path measures 2.5% on the tiny model: 10% leaves room and still catches a forward that
    # runs with something else switched on (such as a step cache left over from the previous engine).
    assert 0 < forwards["fast"]["rel_error"] < 0.10, forwards["fast"]


def test_the_diffusers_forward_is_timed_warm_as_the_presets_are(tmp_path: Path, model_cache: Path) -> None:
    """The first forward of a shape pays one-time costs (libraries, kernels, cuDNN plans, the allocator growing): the
    baseline runs one untimed forward first, as the presets do, so the ratios compare like with like."""
    engine = tiny_engine(model_cache, preset="eager")
    bench = Bench(engine.pipe, engine.device, emit=lambda _line: None, json_path=tmp_path / "bench.json")
    calls: list[int] = []
    hook = engine.pipe.transformer.register_forward_hook(lambda *_args: calls.append(len(calls)))
    try:
        bench.diffusers_forward("480p", 5)
    finally:
        hook.remove()
    assert len(calls) == 3  # untimed, then cond and uncond timed
    assert bench.forwards[0].preset == "diffusers" and bench.forwards[0].seconds > 0


def test_bench_videos_are_timed_after_a_warm_up_of_their_shapes(tmp_path: Path, model_cache: Path) -> None:
    """A worker compiles its shapes at start (EngineRunner.warm_up), so the bench times a video after an untimed
    2-step run at the same size and guidance: both experts, the same batch sizes as the timed run."""
    engine = tiny_engine(model_cache, preset="exact")
    bench = Bench(engine.pipe, engine.device, emit=lambda _line: None, json_path=tmp_path / "bench.json")
    bench.engine = engine
    case = VideoCase("480p", 3, 1.0, frames=9)  # guidance 1: one batch-1 forward per step
    with record_forwards(engine) as calls:
        bench.engine_video(case, "exact", tmp_path)
    assert len(calls) == 2 + 3
    warm, timed = calls[:2], calls[2:]
    assert {expert for expert, _t, _b in warm} == {"high", "low"}
    assert {batch for *_x, batch in calls} == {1}
    assert [t for _e, t, _b in timed] == sorted((t for _e, t, _b in timed), reverse=True)
    row = json.loads((tmp_path / "bench.json").read_text())["videos"][0]
    assert row["warmup_s"] > 0 and row["seconds"] > 0

    bench.warm_up_videos = False
    with record_forwards(engine) as calls:
        bench.engine_video(case, "exact", tmp_path)
    assert len(calls) == 3
    assert "untimed warm-up s" in bench.table() and bench.table().rstrip().endswith("| - |")


@pytest.mark.parametrize("latent", [(3, 8, 12), (5, 6, 10)])
def test_forward_flops_is_what_torch_counts_in_the_blocks(latent: tuple[int, int, int]) -> None:
    """The bench's FLOP formula (docs/performance.md) against torch's own count of every matmul of the transformer
    blocks (attention on the math backend, which torch counts as its two matmuls), on an A14B-shaped expert with
    small dimensions: self- and cross-attention projections, both attentions and the FFN, nothing left out."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.attention_dispatch import attention_backend
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    expert = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=256, ffn_dim=256, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=1024,
    ).eval()  # fmt: skip
    frames, height, width = latent
    latents = torch.randn(1, 16, frames, height, width)
    # torch's own attention on its math kernel, whatever default the process has: that is what torch counts
    with (
        torch.no_grad(),
        attention_backend("native"),
        sdpa_kernel(SDPBackend.MATH),
        FlopCounterMode(display=False) as counter,
    ):
        expert(latents, torch.tensor([500]), torch.randn(1, TEXT_TOKENS, 64), return_dict=False)
    in_blocks = sum(
        sum(per_op.values())
        for module, per_op in counter.get_flop_counts().items()
        if re.fullmatch(r"WanTransformer3DModel\.blocks\.\d+", module)
    )
    tokens = frames * (height // 2) * (width // 2)
    assert forward_flops(tokens, expert.config) == in_blocks
    assert forward_flops(tokens, expert.config, batch=2) == 2 * in_blocks


def test_video_tokens_of_720p() -> None:
    pipe = SimpleNamespace(vae_scale_factor_temporal=4, vae_scale_factor_spatial=8)
    assert video_tokens(pipe, A14B, 1280, 720, 81) == 75_600
    assert video_tokens(pipe, A14B, 832, 480, 81) == 32_760


def test_video_case_parse() -> None:
    case = VideoCase.parse("720p:4:1", 81)
    assert (case.resolution, case.steps, case.guidance, case.frames) == ("720p", 4, 1.0, 81)
    assert case.name == "720p 81f 4 steps g1"
    for bad in ("720p:4", "480p:x:1", "999p:4:1", "480p:0:1", "480p:4:nan"):
        with pytest.raises(ValueError, match="a video"):
            VideoCase.parse(bad, 81)


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        ("--videos", "480p:x:1", "error: --videos: a video is RESOLUTION:STEPS:GUIDANCE"),
        ("--presets", "exact,turbo", "error: --presets: unknown turbo (one of eager, exact, fast)"),
        ("--sizes", "999p", "error: --sizes: unknown 999p"),
    ],
)
def test_bad_bench_values_are_one_line_errors_before_anything_runs(
    flag: str, value: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--device", "cpu", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(said) and "Traceback" not in err


def test_a_failed_measurement_fails_the_bench(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its row says FAILED and the others run; the exit status says so too (it was 0: a script saw success)."""

    def broken(*_args: object) -> None:
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(Bench, "diffusers_forward", broken)
    args = ["bench", "--device", "cpu", "--sizes", "480p", "--presets", "", "--videos", "", "--cache-dir",
            str(model_cache), "--out-dir", str(tmp_path / "bench")]  # fmt: skip
    assert main(args) == 1
    out = capsys.readouterr()
    assert "FAILED 480p: RuntimeError: no such kernel" in out.out
    assert "error: 1 measurement(s) failed: 480p" in out.err


@pytest.mark.parametrize(
    ("setting", "compiling", "expected"),
    [
        (["auto"], True, ["480p", "720p"]),
        (["auto"], False, []),
        ([], True, []),
        (["720p", "480p", "720p"], False, ["720p", "480p"]),
        (["580p", "auto"], True, ["580p", "480p", "720p"]),
        (["720p", "auto"], True, ["720p", "480p"]),
        (["580p", "auto"], False, ["580p"]),
    ],
)
def test_warmup_resolutions(setting: list[str], compiling: bool, expected: list[str]) -> None:
    assert warmup_resolutions(setting, compiling) == expected


def test_warmup_setting_is_validated() -> None:
    with pytest.raises(ValidationError, match="1080p"):
        Settings(warmup=["1080p"])
    assert Settings().warmup == ["auto"]
    assert Settings(warmup=[]).warmup == []


def test_speed_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANSERVE_PRESET", "fast")
    monkeypatch.setenv("WANSERVE_WARMUP", "480p, 720p")
    monkeypatch.setenv("WANSERVE_MEMORY_POLICY", "swap")
    monkeypatch.setenv("WANSERVE_STEP_CACHE_THRESHOLD", "0.05")
    monkeypatch.setenv("WANSERVE_COMPILE", "false")
    settings = Settings(cache_dir=tmp_path)
    assert settings.preset == "fast"
    assert settings.warmup == ["480p", "720p"]
    assert settings.memory_policy == "swap"
    assert settings.compile is False
    options = engine_options(settings)
    assert (options.preset, options.memory_policy, options.compile) == ("fast", "swap", False)
    assert options.step_cache_threshold == 0.05
    assert options.compile_cache_dir == tmp_path / "compile"
    monkeypatch.setenv("WANSERVE_WARMUP", "1080p")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.setenv("WANSERVE_WARMUP", "")
    monkeypatch.setenv("WANSERVE_PRESET", "turbo")
    with pytest.raises(ValidationError):
        Settings()


def test_speed_settings_defaults(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, compile_cache_dir=tmp_path / "kernels")
    assert (settings.preset, settings.memory_policy, settings.compile) == ("auto", "auto", None)
    assert settings.step_cache_threshold == 0.0
    assert engine_options(settings).compile_cache_dir == tmp_path / "kernels"
    with pytest.raises(ValidationError):
        Settings(step_cache_threshold=1.5)


def test_warm_up_runs_both_experts_at_both_batch_sizes(model_cache: Path, tmp_path: Path) -> None:
    # A compiled engine keeps one graph per input shape; the warm-up must reach batch 2 (CFG) and batch 1 (guidance
    # 1, the distilled-LoRA shape) so that neither compiles inside a request.
    runner = EngineRunner(tiny_engine(model_cache, preset="exact"), Settings(warmup=["480p"], data_dir=tmp_path))
    with record_forwards(runner.engine) as calls:
        assert runner.warm_up() == ["480p"]
    assert calls == [("high", 999, 2), ("low", 833, 1)]
    assert EngineRunner(runner.engine, Settings(warmup=[], data_dir=tmp_path)).warm_up() == []
