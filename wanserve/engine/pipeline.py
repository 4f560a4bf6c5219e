"""Request -> frames, on diffusers' `WanPipeline` components, sampled like the Wan 2.2 reference code.

The denoising loop is ours rather than `WanPipeline.__call__` for three reasons, each a difference
from the reference sampler (DESIGN.md section 4):
- the timesteps come from the reference sigma grid (see `sampling.py`), through a fresh UniPC
  scheduler per request carrying the request's shift;
- classifier-free guidance is decided per expert: diffusers skips the unconditional forward for
  *both* experts when `guidance_scale <= 1`, whatever `guidance_scale_2` says;
- a step callback reports progress and can cancel between steps without decoding.
Everything else (prompt encoding padded to 512 tokens, latent init, guidance formula, scheduler step,
decode) is the diffusers code path itself, so for the same inputs the output equals `WanPipeline`'s
bit for bit once its scheduler is handed the reference sigmas.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

from wanserve.engine.attention import AttentionChoice
from wanserve.engine.attention import resolve as resolve_attention
from wanserve.engine.lora import LoraAdapters
from wanserve.engine.memory import LARGEST_VIDEO_TOKENS, GiB, MemoryManager, MemoryPlan, MemoryPolicy, plan_memory
from wanserve.engine.parallel import tokens_of
from wanserve.engine.sampling import Expert, StepPlan, plan_steps, reference_sigmas
from wanserve.engine.speed import DeviceInfo, Preset, SpeedPlan, compile_experts, plan_speed, prepare_experts
from wanserve.engine.vae import decode_video
from wanserve.engine.video import FrameSink
from wanserve.errors import FieldError, GenerationCancelled, InvalidGenerationInput, LoraError, NonFiniteOutput
from wanserve.lora.sources import LoraUse
from wanserve.schema import MAX_SEED, WanLoRAT2VRequest, WanT2VRequest, frames_to_generate

if TYPE_CHECKING:
    from wanserve.engine.parallel import ParallelContext

log = logging.getLogger("wanserve.engine")

TEXT_CONTEXT_TOKENS = 512  # the reference pads the text context to 512 rows


@dataclass(frozen=True)
class GenerationSpec:
    """Everything that determines a video, in model terms (pixels, frames, steps)."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    guidance_scale_2: float
    shift: float
    seed: int
    frames_per_second: int = 16
    reverse_video: bool = False
    loras: tuple[LoraUse, ...] = ()

    @classmethod
    def from_request(
        cls, request: WanT2VRequest, seed: int | None = None, loras: tuple[LoraUse, ...] = ()
    ) -> GenerationSpec:
        """Map a wire request to a spec; the seed is the request's, else `seed`, else drawn. `loras` are the
        request's LoRAs, resolved to files (wanserve.lora.sources)."""
        width, height = request.frame_size
        chosen = request.seed if request.seed is not None else seed
        return cls(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=width,
            height=height,
            num_frames=request.num_frames,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            guidance_scale_2=request.guidance_scale_2,
            shift=request.shift,
            seed=draw_seed() if chosen is None else chosen,
            frames_per_second=request.frames_per_second,
            reverse_video=isinstance(request, WanLoRAT2VRequest) and request.reverse_video,
            loras=loras,
        )


def draw_seed() -> int:
    # Below 2**31 so that the seed survives every JSON client (JS numbers) and is easy to retype.
    return random.SystemRandom().randrange(0, 2**31)


@dataclass(frozen=True)
class StepProgress:
    """Reported after each denoising step."""

    step: int  # 1-based
    total: int
    expert: Expert
    timestep: int
    forwards: int  # 1, or 2 with classifier-free guidance
    seconds: float  # this step
    elapsed: float  # since the first step started

    @property
    def eta_seconds(self) -> float:
        return self.elapsed / self.step * (self.total - self.step)


StepCallback = Callable[[StepProgress], None]
CancelCheck = Callable[[], bool]


@dataclass
class GenerationResult:
    frames: np.ndarray  # (num_frames, height, width, 3) uint8 RGB, in playback order
    seed: int
    steps: list[StepPlan]
    frames_generated: int  # the 4k+1 count the model produced before cutting to num_frames
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs the model (the settings' speed and memory section); defaults suit any device."""

    preset: str = "auto"  # auto | eager | exact | fast (speed.py)
    memory_policy: str = "auto"  # auto | resident | swap | offload (memory.py)
    compile: bool | None = None  # None: the preset decides
    compile_cache_dir: Path = Path.home() / ".cache" / "wanserve" / "compile"
    step_cache_threshold: float = 0.0  # > 0: diffusers' First Block Cache with this threshold
    unvalidated_fast_gpu: bool = False  # the bench's way to run `fast` on a GPU (speed.FAST_FASTER_THAN_EXACT)
    lowbit_attention: bool | None = None  # `fast`'s low-bit attention; None: where it is faster (speed.py)
    lowbit_kernel: str = "auto"  # which low-bit attention: auto | int8 | fp8 (speed.LowbitKernel)
    attention: str = "auto"  # the exact attention kernel: auto (measured on a GPU) or an AttentionKernel value
    lora_memory_bytes: int = 4 * GiB


@dataclass(frozen=True)
class PromptEmbeds:
    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    both: torch.Tensor | None = None  # cat([cond, uncond]) for batched CFG


class _StepClock:
    """Reports step progress without stalling the GPU: on CUDA a step is reported once the *next* step has been
    queued (waiting on the earlier step's event leaves the GPU busy with the later one). On a CPU, at once."""

    def __init__(self, total: int, start: float, on_step: StepCallback | None, device: torch.device) -> None:
        self.total, self.start, self.on_step = total, start, on_step
        self.cuda = device.type == "cuda"
        self.pending: deque[tuple[StepPlan, Any]] = deque()
        self.last = start

    def issued(self, step: StepPlan) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append((step, event))
        while len(self.pending) > (1 if self.cuda else 0):
            self._report()

    def finish(self) -> None:
        while self.pending:
            self._report()

    def _report(self) -> None:
        step, event = self.pending.popleft()
        if event is not None:
            event.synchronize()
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        if self.on_step is not None:
            self.on_step(
                StepProgress(
                    step=step.index + 1,
                    total=self.total,
                    expert=step.expert,
                    timestep=step.timestep,
                    forwards=step.forwards,
                    seconds=seconds,
                    elapsed=now - self.start,
                )
            )


class WanEngine:
    """Turns a GenerationSpec into frames with a loaded Wan 2.2 pipeline."""

    def __init__(
        self,
        pipe: WanPipeline,
        device: torch.device,
        options: EngineOptions | None = None,
        device_info: DeviceInfo | None = None,
        parallel: ParallelContext | None = None,
    ) -> None:
        """`parallel`: this process's share of a multi-GPU generation (parallel.py); every rank makes the same
        calls on its own engine."""
        if pipe.transformer is None and pipe.transformer_2 is None:
            raise InvalidGenerationInput("the pipeline has no transformer")
        options = options or EngineOptions()
        # Experts as distinct modules (a single-expert model serves both roles).
        self.experts = [m for m in (pipe.transformer, pipe.transformer_2) if m is not None]
        self.parallel = parallel
        if parallel is not None:
            options = parallel.bind(self.experts, options)
        self.pipe = pipe
        self.device = device
        if device.type == "cuda" and device.index is not None:
            # The current device is what events, streams (ours and diffusers' group offloading) and Triton launches
            # use when they are given none: on `cuda:1` they would otherwise land on GPU 0.
            torch.cuda.set_device(device)
        self.options = options
        info = device_info or DeviceInfo.probe(device)
        self.dtype = self.experts[0].dtype  # the compute dtype (read before any layer turns FP8)
        speed_plan = partial(
            plan_speed,
            options.preset,
            info,
            options.compile,
            options.unvalidated_fast_gpu,
            lowbit_attention=options.lowbit_attention,
            lowbit_kernel=None if options.lowbit_kernel == "auto" else options.lowbit_kernel,
            step_cached=options.step_cache_threshold > 0,
        )
        # `fast`'s FP8 linears halve the experts: the plan sizes them so unless it comes to offload, where `fast`
        # runs as `exact` (no compile).
        fp8_experts = speed_plan().fp8_linears
        self.memory_plan: MemoryPlan = plan_memory(options.memory_policy, info, pipe, fp8_experts)
        planned = partial(speed_plan, offloaded=self.memory_plan.policy is MemoryPolicy.OFFLOAD)
        self.speed: SpeedPlan = planned()
        if self.speed.preset is not Preset.EAGER:  # eager is plain diffusers: its default attention
            choice = self._choose_attention(options, info)
            self.speed = replace(planned(attention=choice.kernel), attention_note=choice.describe())
        if parallel is not None:
            self.speed = parallel.adjust_speed(self.speed)
        # FP8 conversion is fastest where the weights are: on the GPU when they will live there, else before they
        # move to host memory. On the GPU one expert at a time, before the text encoder: the plan sized the experts
        # in FP8, and two bf16 experts beside the encoder need not fit where two FP8 ones do.
        if self.memory_plan.policy is MemoryPolicy.RESIDENT:
            for expert in self.experts:
                expert.to(device)
                prepare_experts([expert], self.speed, device)
            self.memory = MemoryManager(pipe, self.memory_plan, device)
        else:
            prepare_experts(self.experts, self.speed, device)
            self.memory = MemoryManager(pipe, self.memory_plan, device)
        if parallel is not None:  # after the attention backend is set, before compiling
            parallel.enable(self.experts)
        for model in self.experts:
            if model.is_cache_enabled:  # an engine made again on the same pipeline (the bench) starts clean
                model.disable_cache()
            if options.step_cache_threshold > 0:
                from diffusers.hooks import FirstBlockCacheConfig

                model.enable_cache(FirstBlockCacheConfig(threshold=options.step_cache_threshold))
        compile_experts(self.experts, self.speed, options.compile_cache_dir)
        self.loras = LoraAdapters(
            {"high": self._expert(Expert.HIGH), "low": self._expert(Expert.LOW)},
            options.lora_memory_bytes,
            device=device if self.memory_plan.policy is not MemoryPolicy.RESIDENT else None,
        )

    def _choose_attention(self, options: EngineOptions, info: DeviceInfo) -> AttentionChoice:
        """The exact attention kernel, timed (attention.py) on one 720p 81-frame self-attention of this model."""
        config = self.experts[0].config
        tokens = tokens_of(81, 720, 1280, self.frame_step, self.size_multiple)
        shape = (1, tokens, config.num_attention_heads, config.attention_head_dim)
        cache_file = options.compile_cache_dir / "attention.json"
        return resolve_attention(options.attention, self.device, info.capability, shape, self.dtype, cache_file)

    @property
    def batch_cfg(self) -> bool:
        return self.speed.batch_cfg

    def describe(self) -> str:
        """One line on how the model runs (for the worker's start-up log and the bench)."""
        batch = "cond+uncond batched" if self.batch_cfg else "cond and uncond as two forwards"
        split = f"; {self.parallel.describe()}" if self.parallel is not None else ""
        return (
            f"preset {self.speed.describe()}; memory {self.memory_plan.policy.value} ({self.memory_plan.reason}); "
            + batch
            + split
        )

    @property
    def frame_step(self) -> int:
        return int(self.pipe.vae_scale_factor_temporal)

    @property
    def size_multiple(self) -> int:
        expert = self._expert(Expert.HIGH)
        return int(self.pipe.vae_scale_factor_spatial * expert.config.patch_size[1])

    def _expert(self, expert: Expert) -> WanTransformer3DModel:
        high, low = self.pipe.transformer, self.pipe.transformer_2
        model = (high or low) if expert is Expert.HIGH else (low or high)
        assert model is not None
        return model

    def make_scheduler(self, shift: float) -> UniPCMultistepScheduler:
        # A fresh scheduler per request: the shift is per request and schedulers carry step state.
        return UniPCMultistepScheduler.from_config(
            self.pipe.scheduler.config,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
        )

    def validate(self, spec: GenerationSpec) -> None:
        m = self.size_multiple
        if spec.width % m or spec.height % m:
            raise InvalidGenerationInput(f"width and height must be multiples of {m} for this model")
        if not 0 <= spec.seed <= MAX_SEED:
            raise InvalidGenerationInput("seed out of range")
        if self.parallel is not None:
            generated = frames_to_generate(spec.num_frames, self.frame_step)
            self.parallel.check_tokens(tokens_of(generated, spec.height, spec.width, self.frame_step, m))

    @torch.no_grad()
    def generate(
        self,
        spec: GenerationSpec,
        on_step: StepCallback | None = None,
        is_cancelled: CancelCheck | None = None,
        decode: bool = True,
        sink: FrameSink | None = None,
    ) -> GenerationResult:
        """The video of `spec`. `sink` (an mp4 writer) is given the frames in playback order as they are decoded,
        so that it encodes while the rest decodes. `decode=False` stops after denoising with no frames (a GPU
        group's ranks > 0: rank 0 decodes the latents that every rank holds)."""
        self.validate(spec)
        self.loras.load(spec.loras)  # a no-op when the caller loaded them already (to report on it)
        with self.loras.active(spec.loras):
            return self._generate(spec, on_step, is_cancelled, decode, sink)

    def _generate(
        self,
        spec: GenerationSpec,
        on_step: StepCallback | None,
        is_cancelled: CancelCheck | None,
        decode: bool,
        sink: FrameSink | None,
    ) -> GenerationResult:
        pipe, device = self.pipe, self.device
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        generated = frames_to_generate(spec.num_frames, self.frame_step)

        scheduler = self.make_scheduler(spec.shift)
        scheduler.set_timesteps(sigmas=reference_sigmas(spec.num_inference_steps), device=device)
        boundary = pipe.config.boundary_ratio
        plan = plan_steps(
            [int(t) for t in scheduler.timesteps.tolist()],
            spec.guidance_scale,
            spec.guidance_scale_2,
            # One expert (no boundary, Wan 2.1-style): every step is its, with `guidance_scale`, as diffusers runs it.
            boundary_ratio=0.0 if boundary is None else boundary,
        )
        any_cfg = any(p.uses_cfg for p in plan)

        with self.memory.text_encoder():
            prompt_embeds, negative_embeds = pipe.encode_prompt(
                prompt=spec.prompt,
                negative_prompt=spec.negative_prompt,
                do_classifier_free_guidance=any_cfg,
                max_sequence_length=TEXT_CONTEXT_TOKENS,
                device=device,
            )
        transformer_dtype = self.dtype
        prompt_embeds = prompt_embeds.to(transformer_dtype)
        if negative_embeds is not None:
            negative_embeds = negative_embeds.to(transformer_dtype)
        # Cond and uncond in one batch-2 forward, up to the video the memory plan holds that way (720p, 81 frames);
        # a longer one (up to 121 frames) runs them as two forwards, which needs two thirds of the memory.
        tokens = tokens_of(generated, spec.height, spec.width, self.frame_step, self.size_multiple)
        batched = self.batch_cfg and negative_embeds is not None and tokens <= LARGEST_VIDEO_TOKENS
        both_embeds = torch.cat([prompt_embeds, negative_embeds]) if batched else None
        timings["encode_s"] = time.perf_counter() - t0

        # Noise is drawn on the CPU so that a seed gives the same video on any device.
        generator = torch.Generator(device="cpu").manual_seed(spec.seed)
        latents = pipe.prepare_latents(
            1,
            self._expert(Expert.HIGH).config.in_channels,
            spec.height,
            spec.width,
            generated,
            torch.float32,
            device,
            generator,
        )
        scheduler.set_begin_index(0)
        if self.options.step_cache_threshold > 0:
            for model in self.experts:
                model._reset_stateful_cache()

        t_loop = time.perf_counter()
        clock = _StepClock(len(plan), t_loop, on_step, device)
        embeds = PromptEmbeds(prompt_embeds, negative_embeds, both_embeds)
        for step, t in zip(plan, scheduler.timesteps, strict=True):
            if is_cancelled is not None and is_cancelled():
                raise GenerationCancelled(f"cancelled before step {step.index + 1}/{len(plan)}")
            following = plan[step.index + 1].expert if step.index + 1 < len(plan) else None
            context = {"step_index": step.index, "sigma": float(scheduler.sigmas[step.index]),
                       "num_inference_steps": len(plan)}  # fmt: skip
            cond, uncond = self.predict_noise(step, latents.to(transformer_dtype), t, embeds, following, context)
            noise_pred = cond if uncond is None else uncond + step.guidance_scale * (cond - uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            clock.issued(step)
        clock.finish()
        timings["denoise_s"] = time.perf_counter() - t_loop
        if is_cancelled is not None and is_cancelled():
            raise GenerationCancelled("cancelled before decoding")

        if not bool(latents.isfinite().all()):  # one reduction; the decode syncs anyway
            loras = ", ".join(use.label for use in spec.loras) or "none"
            log.error("non-finite latents after denoising: %s; LoRAs: %s", self.describe(), loras)
            if spec.loras:
                # The likeliest cause is then the request's own: a scale far from 1 or a file with extreme weights.
                raise FieldError(
                    ("loras",),
                    LoraError(
                        f"with these LoRAs ({loras}) the denoised video holds NaN or infinite values: use a scale "
                        "nearer 1, or another LoRA file"
                    ),
                )
            raise NonFiniteOutput(
                "the denoised video holds NaN or infinite values: the model's numbers broke down, not the request; "
                "a LoRA with extreme weights or scale, or another speed preset, may avoid it"
            )
        if not decode:
            timings["total_s"] = time.perf_counter() - t0
            no_frames = np.empty((0, spec.height, spec.width, 3), dtype=np.uint8)
            return GenerationResult(no_frames, spec.seed, plan, generated, timings)
        t_decode = time.perf_counter()
        # A reversed video's first frame is decoded last: its sink gets the frames once they are all there.
        frames = self.decode(latents, spec.num_frames, None if spec.reverse_video or sink is None else sink.write)
        timings["decode_s"] = time.perf_counter() - t_decode
        if spec.reverse_video:
            frames = np.ascontiguousarray(frames[::-1])
            if sink is not None:
                sink.write(frames)
        timings["total_s"] = time.perf_counter() - t0
        return GenerationResult(frames=frames, seed=spec.seed, steps=plan, frames_generated=generated, timings=timings)

    def predict_noise(
        self,
        step: StepPlan,
        latent_input: torch.Tensor,
        t: torch.Tensor,
        embeds: PromptEmbeds,
        following: Expert | None = None,
        cache_context: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The expert's conditional and (with CFG) unconditional predictions for one step: one batch-2 forward when
        batching, else two. The step's last forward runs inside the memory policy's handoff to `following`."""
        model = self._expert(step.expert)
        self.memory.before_forward(step.expert)
        context = cache_context or {}

        def forward(name: str, hidden: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            with model.cache_context(name, **context):
                return model(
                    hidden_states=hidden,
                    timestep=t.expand(hidden.shape[0]),
                    encoder_hidden_states=text,
                    return_dict=False,
                )[0]

        if not step.uses_cfg:
            with self.memory.handing_off(step.expert, following):
                return forward("cond", latent_input, embeds.cond), None
        if self.parallel is not None and self.parallel.splits_cfg:  # cond on one half of the ranks, uncond on the other
            return self.parallel.cfg_parallel(
                forward, latent_input, embeds, lambda: self.memory.handing_off(step.expert, following)
            )
        if embeds.both is not None:
            with self.memory.handing_off(step.expert, following):
                cond, uncond = forward("cond_uncond", torch.cat([latent_input] * 2), embeds.both).chunk(2)
            return cond, uncond
        assert embeds.uncond is not None
        cond = forward("cond", latent_input, embeds.cond)
        with self.memory.handing_off(step.expert, following):
            return cond, forward("uncond", latent_input, embeds.uncond)

    def decode(
        self, latents: torch.Tensor, num_frames: int, on_frames: Callable[[np.ndarray], None] | None = None
    ) -> np.ndarray:
        """The first `num_frames` frames of `latents` as uint8 RGB; `on_frames` sees each piece as it is decoded."""
        vae = self.pipe.vae
        latents = latents.to(vae.device, dtype=vae.dtype)
        z_dim = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        height, width = (side * self.pipe.vae_scale_factor_spatial for side in latents.shape[-2:])
        tiled = self.memory.decode_tiled(height, width)
        if tiled is not self.memory_plan.tiled_decode:
            log.debug("VAE decode %s at %dx%d (the start-up plan expected the opposite)",
                     "tiled" if tiled else "untiled", width, height)  # fmt: skip
        return decode_video(vae, latents / inv_std + mean, num_frames, on_frames, tiled=tiled)
