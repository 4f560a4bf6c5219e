"""`wanserve bench`: our presets against plain diffusers, in one process, on the same weights and inputs.

For each video size it times one expert forward with classifier-free guidance (cond + uncond: two batch-1
forwards for diffusers, as `WanPipeline` runs them; whatever the preset does for ours), the peak GPU memory and
the relative error of the preset's predictions against the eager bf16 ones; then whole videos end to end (text
encoder, both experts, VAE decode, mp4 encode). On a GPU the model is the full-size A14B architecture with random
bf16 weights made on the device (random weights time exactly like real ones); `--model tiny` runs the same code
on the built-in tiny model, which is how CI runs it on a CPU.

FLOPs of one expert forward (multiply-add = 2), per layer, with L video tokens, C = 512 text tokens, model width
d, FFN width f: self-attention projections 8Ld^2, scores and P.V 4L^2d, cross-attention projections 4Ld^2 + 4Cd^2,
its scores and P.V 4LCd, FFN 4Ldf; times layers and batch. Patch embedding, time embedding and the output head
(under 0.1%) are left out. This is the count DESIGN.md section 5's 582 TFLOP/s figure uses.
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

from wanserve.engine.attention import rel_error
from wanserve.engine.loading import load_pipeline
from wanserve.engine.pipeline import EngineOptions, GenerationSpec, PromptEmbeds, WanEngine
from wanserve.engine.sampling import Expert, StepPlan
from wanserve.engine.speed import Preset, cap_gpu_memory
from wanserve.engine.video import Mp4Writer, encode_mp4
from wanserve.schema import Resolution, frame_size, frames_to_generate

TEXT_TOKENS = 512
GiB = 1024**3

# Wan 2.2 T2V-A14B, one expert (DESIGN.md section 4).
A14B_EXPERT = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
UMT5_XXL = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "tie_word_embeddings": False,
}


def forward_flops(tokens: int, config: Any, batch: int = 1, text_tokens: int = TEXT_TOKENS) -> float:
    d = config.num_attention_heads * config.attention_head_dim
    f, n, L, C = config.ffn_dim, config.num_layers, tokens, text_tokens
    per_layer = 8 * L * d * d + 4 * L * L * d + 4 * L * d * d + 4 * C * d * d + 4 * L * C * d + 4 * L * d * f
    return float(per_layer * n * batch)


def video_tokens(pipe: WanPipeline, config: Any, width: int, height: int, frames: int) -> int:
    temporal, spatial = int(pipe.vae_scale_factor_temporal), int(pipe.vae_scale_factor_spatial)
    return _tokens(config, width, height, frames, temporal, spatial)


def _tokens(config: Any, width: int, height: int, frames: int, temporal: int, spatial: int) -> int:
    latent_frames = (frames - 1) // temporal + 1
    pt, ph, pw = config.patch_size
    return (latent_frames // pt) * (height // spatial // ph) * (width // spatial // pw)


def forward_inputs(
    config: Any, resolution: str, frames: int, temporal: int, spatial: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One expert forward's inputs for a 16:9 video (seeded): latents, timestep, cond and uncond text embeddings,
    and the video's token count. `temporal` and `spatial` are the VAE's compression factors."""
    width, height = frame_size(resolution, "16:9")
    gen = torch.Generator(device="cpu").manual_seed(0)
    generated = frames_to_generate(frames, temporal)
    latent_frames = (generated - 1) // temporal + 1
    shape = (1, config.in_channels, latent_frames, height // spatial, width // spatial)
    latents = torch.randn(shape, generator=gen).to(device, dtype)
    cond = torch.randn((1, TEXT_TOKENS, config.text_dim), generator=gen).to(device, dtype)
    uncond = torch.randn((1, TEXT_TOKENS, config.text_dim), generator=gen).to(device, dtype)
    tokens = _tokens(config, width, height, generated, temporal, spatial)
    return latents, torch.tensor([999], device=device), cond, uncond, tokens


def _on_device(make: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """Construct straight on `device` in `dtype` with the modules' own random initialisation (a 14B expert never
    exists in float32 or in host memory), buffers such as the rotary tables computed as usual."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = make()
    finally:
        torch.set_default_dtype(previous)
    return module.eval()


def random_a14b_expert(device: torch.device, seed: int) -> WanTransformer3DModel:
    """One full-size Wan 2.2 A14B expert with random bf16 weights, made on `device`."""
    return _on_device(lambda: WanTransformer3DModel(**A14B_EXPERT), device, torch.bfloat16, seed)


def random_a14b_pipeline(device: torch.device, cache_dir: Path) -> WanPipeline:
    """The full-size architecture (two 14B experts, UMT5-XXL, the Wan 2.1 VAE) with random weights (bf16; the VAE
    float32), made on `device`; the tokenizer is the tiny model's (token ids only feed the random embedding)."""
    from transformers import UMT5Config, UMT5EncoderModel

    tiny = load_pipeline("tiny", cache_dir, torch.float32)
    experts = [random_a14b_expert(device, seed) for seed in (1, 2)]
    text_encoder = _on_device(lambda: UMT5EncoderModel(UMT5Config(**UMT5_XXL)), device, torch.bfloat16, 3)
    vae = _on_device(AutoencoderKLWan, device, torch.float32, 4)  # the Wan 2.1 VAE's architecture is the default
    return WanPipeline(
        tokenizer=tiny.tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0),
        transformer=experts[0],
        transformer_2=experts[1],
        boundary_ratio=0.875,
    )


@dataclass
class ForwardRow:
    size: str
    preset: str
    seconds: float  # cond + uncond
    ratio: float  # diffusers seconds / ours (>1: faster)
    tflops: float
    rel_error: float  # vs the eager predictions on the same inputs
    peak_gib: float


@dataclass
class VideoRow:
    case: str
    preset: str
    seconds: float
    ratio: float
    peak_gib: float
    phases: dict[str, float] = field(default_factory=dict)
    note: str = ""
    warmup_s: float = float("nan")  # the untimed 2-step run before it (compiles its shapes); nan: none


@dataclass
class VideoCase:
    resolution: str
    steps: int
    guidance: float  # both experts
    frames: int = 81

    @classmethod
    def parse(cls, text: str, frames: int) -> VideoCase:
        """`480p:30:5` = 480p, 30 steps, guidance 5 on both experts (guidance <= 1: no CFG). ValueError says
        what is wrong with a bad one."""
        try:
            resolution, steps, guidance = text.split(":")
            case = cls(Resolution(resolution).value, int(steps), float(guidance), frames)
        except ValueError:
            raise ValueError(f"a video is RESOLUTION:STEPS:GUIDANCE, e.g. 480p:30:5, got {text!r}") from None
        if case.steps < 1 or not math.isfinite(case.guidance) or case.guidance < 0:
            raise ValueError(f"a video needs at least 1 step and a guidance of 0 or more, got {text!r}")
        return case

    @property
    def name(self) -> str:
        return f"{self.resolution} {self.frames}f {self.steps} steps g{self.guidance:g}"

    def spec(self) -> GenerationSpec:
        """The one request every contender renders for this case (16:9, seed 0)."""
        width, height = frame_size(self.resolution, "16:9")
        return GenerationSpec(
            prompt="a red fox running through snow",
            negative_prompt="blurry",
            width=width,
            height=height,
            num_frames=self.frames,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            guidance_scale_2=self.guidance,
            shift=5.0,
            seed=0,
        )


class Bench:
    def __init__(
        self,
        pipe: WanPipeline,
        device: torch.device,
        emit: Callable[[str], None] = print,
        json_path: Path | None = None,
        deadline_s: float = float("inf"),
    ) -> None:
        self.pipe, self.device, self.emit = pipe, device, emit
        self.dtype = pipe.transformer.dtype  # before any preset turns layers FP8
        self.frame_step = int(pipe.vae_scale_factor_temporal)
        self.keep_frames = False  # keep each video's frames (to measure the step cache's error against them)
        self.json_path = json_path
        self.start = time.perf_counter()
        self.deadline_s = deadline_s
        self.failed: list[str] = []  # the measurements that raised (the others still ran)
        self.forwards: list[ForwardRow] = []
        self.videos: list[VideoRow] = []
        self.reference: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # size -> eager (cond, uncond)
        self.baseline_s: dict[str, float] = {}
        self.frames: dict[tuple[str, str], np.ndarray] = {}  # (case, preset) -> frames, for the step cache's error
        self.engine: WanEngine | None = None

    # --- plumbing ---
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def _measured(self) -> Iterator[dict[str, float]]:
        out: dict[str, float] = {}
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        t0 = time.perf_counter()
        yield out
        self._sync()
        out["seconds"] = time.perf_counter() - t0
        out["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / GiB if self.device.type == "cuda" else 0.0

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.start > self.deadline_s

    def _save(self) -> None:
        if self.json_path is not None:
            doc = {"forwards": [asdict(r) for r in self.forwards], "videos": [asdict(r) for r in self.videos]}
            self.json_path.write_text(json.dumps(doc, indent=1))

    def _inputs(
        self, resolution: str, frames: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        return forward_inputs(
            self.pipe.transformer.config, resolution, frames, self.frame_step, int(self.pipe.vae_scale_factor_spatial),
            self.device, self.dtype,
        )  # fmt: skip

    # --- forwards ---
    def diffusers_forward(self, resolution: str, frames: int) -> None:
        """Plain diffusers: the expert as loaded, default attention, eager, cond then uncond."""
        model = self.pipe.transformer
        latents, t, cond, uncond, tokens = self._inputs(resolution, frames)
        run = lambda text: model(hidden_states=latents, timestep=t, encoder_hidden_states=text, return_dict=False)[0]  # noqa: E731
        with torch.no_grad():
            # Untimed first, as our presets are: the first forward of a shape pays one-time costs (library and
            # kernel loading, cuDNN's plan for the shape, the allocator growing) that no later request pays.
            run(cond)
            with self._measured() as m:
                out = (run(cond), run(uncond))
        self.reference[resolution] = (out[0].float(), out[1].float())
        self.baseline_s[resolution] = m["seconds"]
        self._forward_row(resolution, "diffusers", m, tokens, 0.0)

    def preset_forward(self, resolution: str, frames: int, label: str) -> None:
        """Our engine's step path (`WanEngine.predict_noise`) for the high-noise expert with CFG: warm-up (compiles
        this shape), then timed."""
        assert self.engine is not None
        latents, t, cond, uncond, tokens = self._inputs(resolution, frames)
        both = torch.cat([cond, uncond]) if self.engine.batch_cfg else None
        embeds = PromptEmbeds(cond, uncond, both)
        step = StepPlan(index=0, timestep=999, expert=Expert.HIGH, guidance_scale=5.0)
        with torch.no_grad():
            self.engine.predict_noise(step, latents, t, embeds, Expert.HIGH)
            with self._measured() as m:
                got_cond, got_uncond = self.engine.predict_noise(step, latents, t, embeds, Expert.HIGH)
        assert got_uncond is not None
        ref = self.reference.get(resolution)
        error = float("nan")
        if ref is not None:
            error = rel_error(torch.cat([got_cond, got_uncond]), torch.cat(ref))
        self._forward_row(resolution, label, m, tokens, error)

    def _forward_row(self, size: str, preset: str, m: dict[str, float], tokens: int, error: float) -> None:
        flops = forward_flops(tokens, self.pipe.transformer.config, batch=2)
        base = self.baseline_s.get(size, float("nan"))
        row = ForwardRow(size, preset, m["seconds"], base / m["seconds"], flops / m["seconds"] / 1e12, error,
                         m["peak_gib"])  # fmt: skip
        self.forwards.append(row)
        self.emit(
            f"forward {size:>5} {preset:<10} {row.seconds:8.3f} s  x{row.ratio:5.2f}  {row.tflops:7.1f} TFLOP/s  "
            f"err {row.rel_error:.2e}  peak {row.peak_gib:6.1f} GiB"
        )
        self._save()

    # --- whole videos ---
    # Each contender renders a case once untimed, in 2 steps (one per expert) at the case's size and guidance, then
    # timed: a worker does the same at start (EngineRunner.warm_up), so the timed run is what a request sees, not
    # torch.compile's first trace of a new shape. `warm_up_videos = False` times the first run instead.
    warm_up_videos = True

    def _warm_up(self, render: Callable[[GenerationSpec], object], case: VideoCase) -> float:
        if not self.warm_up_videos:
            return float("nan")
        with self._measured() as m:
            render(replace(case.spec(), num_inference_steps=2))
        return m["seconds"]

    def _diffusers_render(self, spec: GenerationSpec) -> np.ndarray:
        gen = torch.Generator(device="cpu").manual_seed(spec.seed)
        with torch.no_grad():
            out = self.pipe(
                prompt=spec.prompt,
                negative_prompt=spec.negative_prompt,
                height=spec.height,
                width=spec.width,
                num_frames=frames_to_generate(spec.num_frames, self.frame_step),
                num_inference_steps=spec.num_inference_steps,
                guidance_scale=spec.guidance_scale,
                guidance_scale_2=spec.guidance_scale_2,
                generator=gen,
                output_type="np",
            )
        return np.asarray(out.frames[0])[: spec.num_frames]

    def diffusers_video(self, case: VideoCase, out_dir: Path) -> None:
        warmup_s = self._warm_up(self._diffusers_render, case)
        with self._measured() as m:
            frames = self._diffusers_render(case.spec())
            encode_mp4(frames, out_dir / "diffusers.mp4", fps=16)
        self.baseline_s[case.name] = m["seconds"]
        self._video_row(case, "diffusers", m, {}, warmup_s)

    def engine_video(self, case: VideoCase, label: str, out_dir: Path) -> np.ndarray:
        engine = self.engine
        assert engine is not None
        warmup_s = self._warm_up(engine.generate, case)
        with self._measured() as m, Mp4Writer(out_dir / f"{label}.mp4", fps=16) as writer:
            # As the worker makes a video: the mp4 is encoded while the VAE decodes; "mp4" is what remains after.
            result = engine.generate(case.spec(), sink=writer)
            t0 = time.perf_counter()
            writer.close()
            phases = {**result.timings, "mp4_s": time.perf_counter() - t0}
        self._video_row(case, label, m, phases, warmup_s)
        if self.keep_frames:
            self.frames[(case.name, label)] = result.frames
        return result.frames

    def _video_row(
        self, case: VideoCase, preset: str, m: dict[str, float], phases: dict[str, float], warmup_s: float
    ) -> None:
        base = self.baseline_s.get(case.name, float("nan"))
        row = VideoRow(case.name, preset, m["seconds"], base / m["seconds"], m["peak_gib"], phases, warmup_s=warmup_s)
        self.videos.append(row)
        detail = " ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in phases.items() if k != "total_s")
        warm = "" if math.isnan(warmup_s) else f"  (after an untimed warm-up of {warmup_s:.1f} s)"
        self.emit(
            f"video   {case.name:<28} {preset:<10} {row.seconds:8.2f} s  x{row.ratio:5.2f}  "
            f"peak {row.peak_gib:6.1f} GiB  {detail}{warm}"
        )
        self._save()

    def use_engine(self, options: EngineOptions) -> WanEngine:
        """Apply a preset to the (shared) pipeline; presets only add to what the previous one did (run_bench runs
        them in PRESET_ORDER)."""
        self.engine = None
        gc.collect()  # the previous engine's and rows' tensors, so that the memory plan sees them free
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.engine = WanEngine(self.pipe, self.device, options)
        self.emit(f"engine: {self.engine.describe()}")
        return self.engine

    def table(self) -> str:
        lines = ["", "| size | preset | cond+uncond s | vs diffusers | TFLOP/s | rel. error | peak GiB |",
                 "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in self.forwards:
            err = "-" if r.preset == "diffusers" else f"{r.rel_error:.2%}"
            lines.append(f"| {r.size} | {r.preset} | {r.seconds:.3f} | {r.ratio:.2f}x | {r.tflops:.0f} | {err} | "
                         f"{r.peak_gib:.1f} |")  # fmt: skip
        if self.videos:
            lines += [
                "",
                "| video | preset | seconds | vs diffusers | peak GiB | phases (s) | untimed warm-up s |",
                "|---|---|---|---|---|---|---|",
            ]
            for v in self.videos:
                phases = ", ".join(f"{k.removesuffix('_s')} {s:.1f}" for k, s in v.phases.items() if k != "total_s")
                ratio = "-" if math.isnan(v.ratio) else f"{v.ratio:.2f}x"
                warm = "-" if math.isnan(v.warmup_s) else f"{v.warmup_s:.1f}"
                lines.append(f"| {v.case} | {v.preset} | {v.seconds:.2f} | {ratio} | {v.peak_gib:.1f} | {phases} | "
                             f"{warm} |")  # fmt: skip
        return "\n".join(lines)


# Presets only add to the shared model what the one before needed (FP8 linears are not turned back, an attention
# backend stays set), so they run from the least changed to the most: none then measures another's changes.
PRESET_ORDER = [preset.value for preset in Preset]


@dataclass
class BenchConfig:
    model: str = "tiny"  # tiny | a14b (full size, random weights, made on the device)
    device: str = "auto"
    sizes: tuple[str, ...] = ("480p", "580p", "720p")
    frames: int = 81
    presets: tuple[str, ...] = ("exact", "fast")
    videos: tuple[str, ...] = ("480p:30:5", "720p:4:1")  # VideoCase.parse
    baseline_videos: bool = True  # also run each video through plain diffusers
    warm_up_videos: bool = True  # an untimed 2-step run of each video's shapes first (Bench.warm_up_videos)
    step_cache: float = 0.0  # > 0: the first preset's videos again with First Block Cache at this threshold
    memory_policy: str = "auto"
    memory_cap_gib: float = 0.0  # > 0: cap this process's GPU memory (to prove a small-card policy)
    lowbit_attention: bool | None = None  # `fast`'s low-bit attention forced on or off; None: the device's rule
    lowbit_kernel: str = "auto"  # which low-bit attention: auto | int8 | fp8 (speed.LowbitKernel)
    attention: str = "auto"  # the exact attention kernel of our presets (attention.py; auto: measured)
    deadline_s: float = float("inf")
    out_dir: Path = Path("bench-out")
    cache_dir: Path = Path.home() / ".cache" / "wanserve"


def run_bench(config: BenchConfig, emit: Callable[[str], None] = print) -> Bench:
    from wanserve.engine.loading import resolve_device

    device = resolve_device(config.device)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if config.model == "a14b":
        pipe = random_a14b_pipeline(device, config.cache_dir)
    else:
        pipe = load_pipeline(config.model, config.cache_dir, torch.bfloat16 if device.type == "cuda" else torch.float32)
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    emit(f"model {config.model} on {_device_name(device)}: built in {time.perf_counter() - t0:.1f} s; "
         f"torch {torch.__version__}, diffusers {diffusers.__version__}")  # fmt: skip
    bench = Bench(pipe, device, emit, config.out_dir / "bench.json", config.deadline_s)
    bench.keep_frames = config.step_cache > 0
    bench.warm_up_videos = config.warm_up_videos
    cases = [VideoCase.parse(text, config.frames) for text in config.videos]

    def each(items: Any, run: Callable[[Any], Any]) -> None:
        for item in items:
            if bench.out_of_time():
                emit(f"skipped (deadline): {item}")
                continue
            try:
                run(item)
            except Exception as exc:  # one failed measurement must not lose the others
                emit(f"FAILED {item}: {type(exc).__name__}: {str(exc)[:400]}")
                bench.failed.append(str(item))
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    each(config.sizes, lambda size: bench.diffusers_forward(size, config.frames))
    if config.baseline_videos:
        each(cases, lambda case: bench.diffusers_video(case, config.out_dir))
    if config.memory_cap_gib > 0 and device.type == "cuda":
        # Before the first engine: its memory policy is chosen (and its weights placed) for the capped card.
        cap_gpu_memory(device, int(config.memory_cap_gib * GiB))
        emit(f"GPU memory capped at {config.memory_cap_gib:g} GiB")
    presets = sorted(config.presets, key=lambda p: PRESET_ORDER.index(p) if p in PRESET_ORDER else len(PRESET_ORDER))
    if list(presets) != list(config.presets):
        emit(f"presets run in the order {', '.join(presets)}: each changes the shared model for those after it")
    for preset in presets:
        options = EngineOptions(
            preset=preset,
            memory_policy=config.memory_policy,
            compile_cache_dir=config.cache_dir / "compile",
            unvalidated_fast_gpu=True,  # the bench is where `fast` gets validated
            lowbit_attention=config.lowbit_attention,
            lowbit_kernel=config.lowbit_kernel,
            attention=config.attention,
        )
        each([preset], partial(_use_engine, bench, options))
        if bench.engine is None:
            continue
        each(config.sizes, partial(_preset_forward, bench, config.frames, preset))
        each(cases, partial(_engine_video, bench, preset, config.out_dir))
        if config.step_cache > 0 and preset == presets[0]:
            cached = EngineOptions(**{**options.__dict__, "step_cache_threshold": config.step_cache})
            each(["step cache"], partial(_use_engine, bench, cached))
            label = f"{preset}+fbc{config.step_cache:g}"
            each(cases, partial(_cache_video, bench, label, preset, config.out_dir))
    emit(bench.table())
    return bench


def _use_engine(bench: Bench, options: EngineOptions, _preset: str) -> None:
    bench.use_engine(options)


def _preset_forward(bench: Bench, frames: int, preset: str, size: str) -> None:
    bench.preset_forward(size, frames, preset)


def _engine_video(bench: Bench, preset: str, out_dir: Path, case: VideoCase) -> None:
    bench.engine_video(case, preset, out_dir)


def _cache_video(bench: Bench, label: str, preset: str, out: Path, case: VideoCase) -> None:
    frames = bench.engine_video(case, label, out)
    reference = bench.frames.get((case.name, preset))
    if reference is not None:
        ours, theirs = frames.astype(np.float32), reference.astype(np.float32)
        error = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
        bench.videos[-1].note = f"frames differ by {error:.2%} from {preset} without the cache"
        bench.emit(f"        {bench.videos[-1].note}")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
