"""Memory policies (wanserve.engine.memory): the choice from free GPU memory, and resident / swap / offload on the
tiny model on a CPU. On a CPU the weights never move, so the expert handoff's bookkeeping is also checked with a
recording stand-in for the pinned host copies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.hooks.group_offloading import ModuleGroup, _is_group_offload_enabled
from engines import rel_error, small_spec, tiny_engine
from lora_files import random_factors, scaled, write_wan
from torch import nn

import wanserve.engine.pipeline as pipeline
from wanserve.engine import speed
from wanserve.engine.bench import A14B_EXPERT, random_a14b_expert
from wanserve.engine.fp8 import fp8_bytes_saved, use_fp8_linears
from wanserve.engine.loading import load_pipeline
from wanserve.engine.lora import LoraAdapters
from wanserve.engine.memory import (
    HEADROOM_BYTES,
    ExpertSwap,
    GiB,
    HandoffBlocks,
    MemoryManager,
    MemoryPlan,
    MemoryPolicy,
    PinnedWeights,
    activation_bytes,
    choose_memory_plan,
    module_bytes,
    plan_from_override,
    plan_memory,
    tiles_decode,
)
from wanserve.engine.pipeline import GenerationSpec
from wanserve.engine.sampling import Expert
from wanserve.engine.speed import DeviceInfo, cap_gpu_memory, in_transformer_blocks
from wanserve.lora.cache import file_sha256
from wanserve.lora.sources import EXPERTS, LoraFile, LoraUse, SourceKind

# Wan 2.2 T2V-A14B in bf16 (DESIGN.md section 5).
A14B = dict(expert_bytes=int(26.7 * GiB), experts=2, text_encoder_bytes=int(10.6 * GiB), model_dim=5120)
A14B_SIZES = (A14B["expert_bytes"], A14B["experts"], A14B["text_encoder_bytes"], A14B["model_dim"])


def gpu(free_gib: float) -> DeviceInfo:
    return DeviceInfo(type="cuda", name="gpu", capability=(9, 0), free_bytes=int(free_gib * GiB))


# --- choosing a policy ---


@pytest.mark.parametrize(
    ("free_gib", "policy", "text_encoder_resident"),
    [
        (139, MemoryPolicy.RESIDENT, True),  # H200: experts, text encoder and a 720p batched forward
        (79, MemoryPolicy.RESIDENT, False),  # H100: experts fit (~71.3 GiB with activations), the encoder visits
        (48, MemoryPolicy.SWAP, False),  # one expert + activations: ~44.6 GiB
        (44, MemoryPolicy.OFFLOAD, False),  # just under that
        (24, MemoryPolicy.OFFLOAD, False),
    ],
)
def test_choose_memory_plan_for_a14b(free_gib: float, policy: MemoryPolicy, text_encoder_resident: bool) -> None:
    plan = choose_memory_plan(gpu(free_gib), **A14B)
    assert plan.policy is policy
    assert plan.text_encoder_resident is text_encoder_resident
    assert f"{free_gib:.1f} GiB free" in plan.reason


@pytest.mark.parametrize(
    ("free_gib", "policy", "tiled"),
    [
        (139, MemoryPolicy.RESIDENT, False),  # 53.4 experts + 10.6 encoder + 20.0 decode + 2 = 86.0 GiB
        (79, MemoryPolicy.RESIDENT, False),  # 53.4 + 20.0 + 2 = 75.4 GiB
        (50, MemoryPolicy.SWAP, False),  # 26.7 + 20.0 + 2 = 48.7 GiB
        (48, MemoryPolicy.SWAP, True),  # the denoising fits (44.6 GiB), an untiled 720p decode would not
        (24, MemoryPolicy.OFFLOAD, True),
    ],
)
def test_the_vae_decode_is_tiled_where_it_would_not_fit(free_gib: float, policy: MemoryPolicy, tiled: bool) -> None:
    """The decode runs after the denoising loop, beside the weights that stay on the GPU: about 20 GiB at 720p."""
    plan = choose_memory_plan(gpu(free_gib), **A14B)
    assert (plan.policy, plan.tiled_decode) == (policy, tiled)
    assert ("tiled VAE decode" in plan.reason) is tiled
    # A policy forced onto a card too small for it tiles its decode the same way.
    assert plan_from_override("resident", gpu(60), A14B_SIZES).tiled_decode
    assert not plan_from_override("resident", gpu(79), A14B_SIZES).tiled_decode
    assert plan_from_override("offload", DeviceInfo(type="cpu"), A14B_SIZES).tiled_decode


def test_usable_gpu_memory_counts_the_allocators_cache_as_free_and_keeps_to_a_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mem_get_info counts what PyTorch holds cached as taken; a plan made after a big forward (the bench's baseline,
    the previous preset) would see a smaller card than there is. A cap set on the process is what it can use."""
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "mem_get_info", lambda _d=None: (59 * GiB, 80 * GiB))
    monkeypatch.setattr(cuda, "memory_reserved", lambda _d=None: 21 * GiB)
    monkeypatch.setattr(cuda, "memory_allocated", lambda _d=None: 1 * GiB)
    monkeypatch.setattr(cuda, "get_device_properties", lambda _d=None: SimpleNamespace(total_memory=80 * GiB))
    monkeypatch.setattr(cuda, "set_per_process_memory_fraction", lambda fraction, index: caps.append((fraction, index)))
    monkeypatch.setattr(cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(speed, "_MEMORY_CAPS", {})
    caps: list[tuple[float, int]] = []
    device = torch.device("cuda:0")
    assert speed.usable_gpu_bytes(device) == 79 * GiB
    cap_gpu_memory(device, 24 * GiB)
    assert caps == [(24 / 80, 0)]
    assert speed.usable_gpu_bytes(device) == 23 * GiB  # the cap less what is allocated
    # A model built on the GPU before the cap: over it, and the plan (which counts the model's bytes back) must see
    # the card as the cap's size, not clamped to nothing plus the model.
    monkeypatch.setattr(cuda, "memory_allocated", lambda _d=None: 30 * GiB)
    assert speed.usable_gpu_bytes(device) == -6 * GiB


def test_choose_memory_plan_on_cpu_keeps_everything() -> None:
    plan = choose_memory_plan(DeviceInfo(type="cpu"), **A14B)
    assert plan.policy is MemoryPolicy.RESIDENT and plan.text_encoder_resident


def test_plan_from_override_obeys_a_named_policy() -> None:
    assert plan_from_override("auto", gpu(48), A14B_SIZES).policy is MemoryPolicy.SWAP
    swap = plan_from_override("swap", gpu(139), A14B_SIZES)
    assert swap.policy is MemoryPolicy.SWAP and not swap.text_encoder_resident and "swap" in swap.reason
    offload = plan_from_override("offload", DeviceInfo(type="cpu"), A14B_SIZES)
    assert offload.policy is MemoryPolicy.OFFLOAD and not offload.text_encoder_resident
    # `resident` keeps the text encoder only where the automatic rule would.
    assert plan_from_override("resident", gpu(139), A14B_SIZES).text_encoder_resident
    forced = plan_from_override("resident", gpu(48), A14B_SIZES)
    assert forced.policy is MemoryPolicy.RESIDENT and not forced.text_encoder_resident
    with pytest.raises(ValueError):
        plan_from_override("everywhere", gpu(80), A14B_SIZES)


def test_fast_sizes_the_a14b_experts_in_fp8() -> None:
    """`fast` converts the blocks' linears to FP8 after the plan is made; the plan counts them as they will be: an
    80 GB Hopper card then keeps the text encoder beside both experts, a 40 GB one swaps instead of offloading."""
    expert = random_a14b_expert(torch.device("meta"), seed=0)
    bf16 = module_bytes(expert)
    fp8 = bf16 - fp8_bytes_saved(expert, in_transformer_blocks, on_gpu=True)
    assert 26.5 * GiB < bf16 < 26.7 * GiB and 13.3 * GiB < fp8 < 13.7 * GiB
    sizes = dict(A14B, expert_bytes=fp8)
    h100 = choose_memory_plan(gpu(79), **sizes)
    assert (h100.policy, h100.text_encoder_resident) == (MemoryPolicy.RESIDENT, True)
    assert choose_memory_plan(gpu(40), **sizes).policy is MemoryPolicy.SWAP
    assert choose_memory_plan(gpu(40), **A14B).policy is MemoryPolicy.OFFLOAD


def test_fp8_bytes_saved_is_what_the_conversion_takes_off(model_cache: Path) -> None:
    pipe = load_pipeline("tiny", model_cache, torch.bfloat16)
    expert = pipe.transformer
    before = module_bytes(expert)
    saved = fp8_bytes_saved(expert, in_transformer_blocks, on_gpu=False)
    assert use_fp8_linears(expert, in_transformer_blocks, on_gpu=False) > 0
    assert saved > 0 and module_bytes(expert) == before - saved
    assert fp8_bytes_saved(expert, in_transformer_blocks, on_gpu=False) == 0  # nothing left to convert


def test_plan_memory_sizes_fp8_experts_unless_it_comes_to_offload() -> None:
    """On a card where only the FP8 experts fit beside each other (or one beside the activations), `fast` gets the
    bigger policy; where even FP8 needs offload, the plan is the plain one (fast runs as exact there)."""
    # Two small experts of the A14B layout whose linears the FP8 GEMM takes (sizes multiples of 16), on the host.
    config = dict(A14B_EXPERT, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=32)
    experts = [WanTransformer3DModel(**config).to(torch.bfloat16) for _ in range(2)]
    encoder = nn.Linear(32, 32, dtype=torch.bfloat16)
    pipe = SimpleNamespace(transformer=experts[0], transformer_2=experts[1], text_encoder=encoder, vae=nn.Linear(4, 4))
    bf16 = module_bytes(experts[0])
    fp8 = bf16 - fp8_bytes_saved(experts[0], in_transformer_blocks, on_gpu=True)
    assert fp8 < bf16
    activations = activation_bytes(2 * 16, 2)

    def plans(free: int) -> tuple[MemoryPlan, MemoryPlan]:
        device = DeviceInfo(type="cuda", name="gpu", capability=(9, 0), free_bytes=free)
        plain = plan_memory("auto", device, pipe)  # type: ignore[arg-type]
        return plain, plan_memory("auto", device, pipe, fp8_experts=True)  # type: ignore[arg-type]

    base = activations + HEADROOM_BYTES
    plain, fast = plans(base + 2 * fp8 + module_bytes(encoder))
    assert (plain.policy, plain.text_encoder_resident) == (MemoryPolicy.SWAP, False)
    assert (fast.policy, fast.text_encoder_resident) == (MemoryPolicy.RESIDENT, True)
    assert f"FP8 experts, {fp8 / GiB:.1f} GiB each" in fast.reason and "FP8" not in plain.reason
    plain, fast = plans(base + fp8)
    assert (plain.policy, fast.policy) == (MemoryPolicy.OFFLOAD, MemoryPolicy.SWAP)
    plain, fast = plans(base + fp8 - 1)
    assert plain == fast and fast.policy is MemoryPolicy.OFFLOAD and "FP8" not in fast.reason


def test_resident_fp8_experts_are_converted_one_at_a_time_before_the_rest_moves(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan counted FP8 experts (and so maybe the text encoder beside them): each expert is converted where it
    will live before the next one arrives, and only then do the text encoder and the VAE move."""
    events: list[object] = []
    real_prepare, real_manager = pipeline.prepare_experts, pipeline.MemoryManager
    monkeypatch.setattr(pipeline, "prepare_experts", lambda e, *a: (events.append(list(e)), real_prepare(e, *a)))
    monkeypatch.setattr(pipeline, "MemoryManager", lambda *a: (events.append("manager"), real_manager(*a))[1])
    engine = tiny_engine(model_cache, preset="fast")
    assert engine.memory_plan.policy is MemoryPolicy.RESIDENT
    assert events == [[engine.experts[0]], [engine.experts[1]], "manager"]


def test_the_engine_sizes_fp8_experts_only_for_fast(model_cache: Path) -> None:
    assert "FP8 experts" in tiny_engine(model_cache, preset="fast").memory_plan.reason
    assert "FP8 experts" not in tiny_engine(model_cache, preset="exact").memory_plan.reason


# --- the policies on the tiny model ---


def spec(**overrides: object) -> GenerationSpec:
    """4 steps at shift 5: two high-noise steps, then two low-noise ones; CFG on both experts."""
    return small_spec(**{"num_inference_steps": 4, "guidance_scale": 4.0, "guidance_scale_2": 3.0, "seed": 77,
                         **overrides})  # fmt: skip


def test_swap_gives_the_resident_frames_and_hands_off_both_ways(model_cache: Path) -> None:
    resident = tiny_engine(model_cache, memory_policy="resident")
    assert resident.memory_plan.policy is MemoryPolicy.RESIDENT and resident.memory.swap is None
    want = resident.generate(spec()).frames

    swap = tiny_engine(model_cache, memory_policy="swap")
    assert swap.memory_plan.policy is MemoryPolicy.SWAP and "swap" in swap.describe()
    assert swap.memory.swap is not None
    blocks = len(swap.pipe.transformer.blocks)
    assert isinstance(swap.pipe.transformer.blocks, HandoffBlocks)
    assert isinstance(swap.pipe.transformer_2.blocks, HandoffBlocks)
    got = swap.generate(spec()).frames
    assert rel_error(got, want) <= 1e-6
    # At the last high-noise step the low-noise expert comes in; at the last step the high-noise one comes back for
    # the next request. Each time every block moved while the step ran.
    assert swap.memory.swap.handoffs == [(Expert.HIGH, Expert.LOW, blocks), (Expert.LOW, Expert.HIGH, blocks)]
    assert swap.memory.swap.on_device is Expert.HIGH
    # Without CFG on the low-noise expert the handoff sits on its single forward instead.
    swap.generate(spec(guidance_scale_2=1.0))
    assert swap.memory.swap.handoffs[2:] == [(Expert.HIGH, Expert.LOW, blocks), (Expert.LOW, Expert.HIGH, blocks)]


def test_swap_with_the_step_cache_still_hands_off(model_cache: Path) -> None:
    engine = tiny_engine(model_cache, memory_policy="swap", step_cache_threshold=0.99)
    assert engine.memory.swap is not None
    blocks = len(engine.pipe.transformer.blocks)
    first = engine.generate(spec(num_inference_steps=6)).frames
    second = engine.generate(spec(num_inference_steps=6)).frames
    assert np.array_equal(
        first, second
    )  # (finite: the engine raises NonFiniteOutput otherwise)  # the cache state is reset per request
    uncached = tiny_engine(model_cache, memory_policy="swap").generate(spec(num_inference_steps=6)).frames
    assert 0 < rel_error(first, uncached) < 0.05  # the cache did skip work (measured 0.1%)
    one_request = [(Expert.HIGH, Expert.LOW, blocks), (Expert.LOW, Expert.HIGH, blocks)]
    assert engine.memory.swap.handoffs == one_request * 2
    assert engine.memory.swap.on_device is Expert.HIGH


def test_offload_completes_close_to_resident(model_cache: Path) -> None:
    # Larger than the VAE's 256-pixel tile, so the tiled decode is used.
    big = spec(width=288, height=272, num_inference_steps=2)
    want = tiny_engine(model_cache, memory_policy="resident").generate(big).frames
    engine = tiny_engine(model_cache, memory_policy="offload")
    assert engine.memory_plan.policy is MemoryPolicy.OFFLOAD
    tiled_decodes: list[int] = []
    tiled_decode = engine.pipe.vae.tiled_decode
    engine.pipe.vae.tiled_decode = lambda *a, **k: tiled_decodes.append(1) or tiled_decode(*a, **k)
    assert _is_group_offload_enabled(engine.pipe.transformer) and _is_group_offload_enabled(engine.pipe.transformer_2)
    assert not engine.batch_cfg
    got = engine.generate(big).frames
    assert tiled_decodes == [1]
    assert got.shape == want.shape == (9, 272, 288, 3)
    assert rel_error(got, want) < 1e-2


def test_a_plan_with_tiled_decode_tiles_the_vae_under_any_policy(model_cache: Path) -> None:
    """On a CPU the plan decides (a forced plan's tiling is obeyed), and the engine's decode runs as it decided."""
    pipe = load_pipeline("tiny", model_cache, torch.float32)
    for policy in (MemoryPolicy.RESIDENT, MemoryPolicy.SWAP):
        assert not MemoryManager(pipe, MemoryPlan(policy, False, "test"), torch.device("cpu")).decode_tiled(720, 1280)
        tiled = MemoryPlan(policy, False, "test", tiled_decode=True)
        assert MemoryManager(pipe, tiled, torch.device("cpu")).decode_tiled(64, 64), policy
        assert not pipe.vae.use_tiling  # set around each decode, not left on the shared VAE


@pytest.mark.parametrize(
    ("free_gib", "lora_gib", "size", "tiled"),
    [
        (79, 0, (720, 1280), False),  # H100, both experts resident: 25.6 GiB left for a 20 GiB decode (+2)
        (79, 4, (720, 1280), True),  # a full 4 GiB LoRA cache since the start leaves 21.6 GiB
        (79, 4, (480, 832), False),  # 8.7 GiB at 480p still fits beside it
        (48, 0, (720, 1280), True),  # swap: one 26.7 GiB expert kept, as the plan forecast
        (48, 0, (480, 832), False),  # ... but a 480p decode fits untiled, which is faster
        (139, 0, (480, 832), False),
    ],
)
def test_each_decode_tiles_from_the_memory_free_at_that_decode(
    free_gib: float, lora_gib: float, size: tuple[int, int], tiled: bool
) -> None:
    """The plan is made at start, before any LoRA adapter is cached on the GPU (up to lora_memory_bytes) and for the
    largest video; each decode decides again from what is free then and its own frame size."""
    plan = choose_memory_plan(gpu(free_gib), **A14B)
    kept = A14B["expert_bytes"] * (2 if plan.policy is MemoryPolicy.RESIDENT else 1)
    kept += A14B["text_encoder_bytes"] if plan.text_encoder_resident else 0
    usable = int(free_gib * GiB) - kept - int(lora_gib * GiB)
    assert tiles_decode(plan, *size, usable_bytes=usable) is tiled
    # Small cards' policy always tiles, whatever is free; off a GPU the plan decides.
    offload = choose_memory_plan(gpu(24), **A14B)
    assert tiles_decode(offload, 480, 832, usable_bytes=100 * GiB)
    assert tiles_decode(plan, *size, usable_bytes=None) is plan.tiled_decode


def test_offload_turns_off_batched_cfg_and_compile(model_cache: Path) -> None:
    engine = tiny_engine(model_cache, preset="exact", compile=True, memory_policy="offload")
    assert not engine.speed.batch_cfg and not engine.batch_cfg
    assert not engine.speed.compile
    assert "no compile under offload" in engine.speed.notes
    assert "two forwards" in engine.describe()


# --- the handoff itself ---


def test_handoff_blocks_calls_after_block_once_per_block_in_order() -> None:
    layers = [nn.Linear(4, 4) for _ in range(3)]
    plain = nn.ModuleList(layers)
    blocks = HandoffBlocks(layers)
    assert list(blocks.state_dict()) == list(plain.state_dict())
    assert [name for name, _ in blocks.named_modules()] == [name for name, _ in plain.named_modules()]
    assert len(blocks) == 3 and blocks[1] is layers[1]

    events: list[str] = []
    blocks.after_block = lambda i: events.append(f"after {i}")
    for i, block in enumerate(blocks):
        assert block is layers[i]
        events.append(f"run {i}")
    assert events == ["run 0", "after 0", "run 1", "after 1", "run 2", "after 2"]
    blocks.after_block = None
    assert list(blocks) == layers  # no hook: a plain iteration
    assert events[-1] == "after 2"


def test_handoff_blocks_under_a_model_keeps_its_state_dict_keys() -> None:
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
    before = list(model.state_dict())
    model.blocks = HandoffBlocks(model.blocks)
    assert list(model.state_dict()) == before
    model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
    assert all(not p.detach().any() for p in model.parameters())


class RecordingWeights(PinnedWeights):
    """PinnedWeights whose 'device' is a set of tensor ids: what was uploaded and not released since."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.resident: set[int] = set()

    def adopt(self, module: nn.Module) -> None:
        pass

    def upload(self, module: nn.Module, recurse: bool = True) -> None:
        self.resident.update(id(t) for t in self.tensors(module, recurse))

    def release(self, module: nn.Module, recurse: bool = True) -> None:
        self.resident.difference_update(id(t) for t in self.tensors(module, recurse))

    def on_device(self, module: nn.Module) -> bool:
        return all(id(t) in self.resident for t in self.tensors(module))

    def off_device(self, module: nn.Module) -> bool:
        return not any(id(t) in self.resident for t in self.tensors(module))


@pytest.fixture
def experts(model_cache: Path) -> Iterator[tuple[ExpertSwap, RecordingWeights, nn.Module, nn.Module]]:
    pipe = load_pipeline("tiny", model_cache, torch.float32)
    weights = RecordingWeights()
    swap = ExpertSwap({Expert.HIGH: pipe.transformer, Expert.LOW: pipe.transformer_2}, weights)
    yield swap, weights, pipe.transformer, pipe.transformer_2


def outside_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for name, m in model.named_children() if name != "blocks"]


def test_handoff_moves_each_block_after_its_last_use(experts: tuple) -> None:
    swap, weights, high, low = experts
    swap.ensure(Expert.HIGH)
    assert weights.on_device(high) and weights.off_device(low)
    with swap.handing_off(Expert.HIGH, Expert.LOW):
        for i, block in enumerate(high.blocks):  # the expert's forward loop
            assert weights.on_device(block), f"block {i} released before it ran"
            for j in range(len(low.blocks)):
                assert weights.on_device(low.blocks[j]) is (j < i)
                assert weights.off_device(high.blocks[j]) is (j < i)
    assert all(weights.off_device(b) for b in high.blocks)
    assert all(weights.on_device(b) for b in low.blocks)
    assert all(weights.on_device(m) for m in outside_blocks(low))
    assert all(weights.off_device(m) for m in outside_blocks(high))
    assert swap.on_device is Expert.LOW
    assert swap.handoffs == [(Expert.HIGH, Expert.LOW, len(high.blocks))]
    swap.ensure(Expert.LOW)  # already there: nothing moves
    assert swap.handoffs == [(Expert.HIGH, Expert.LOW, len(high.blocks))]


def test_handoff_moves_blocks_the_forward_did_not_reach(experts: tuple) -> None:
    """A step cache may skip blocks: whatever the forward did not reach is moved when the handoff ends."""
    swap, weights, high, low = experts
    swap.ensure(Expert.HIGH)
    with swap.handing_off(Expert.HIGH, Expert.LOW):
        for _block in high.blocks:
            break
    assert all(weights.on_device(b) for b in low.blocks) and all(weights.off_device(b) for b in high.blocks)
    assert swap.handoffs == [(Expert.HIGH, Expert.LOW, 0)]
    assert high.blocks.after_block is None


def test_handoff_leaves_the_whole_next_expert_on_the_device(experts: tuple) -> None:
    """After a handoff the next expert runs with no further upload (ensure() is a no-op), so every one of its
    tensors must be on the device, and none of the previous expert's."""
    swap, weights, high, low = experts
    swap.ensure(Expert.HIGH)
    with swap.handing_off(Expert.HIGH, Expert.LOW):
        for _block in high.blocks:
            pass
    swap.ensure(Expert.LOW)
    missing = [name for name, t in [*low.named_parameters(), *low.named_buffers()] if id(t) not in weights.resident]
    left = [name for name, t in [*high.named_parameters(), *high.named_buffers()] if id(t) in weights.resident]
    assert missing == [], f"low-noise expert tensors left in host memory: {missing}"
    assert left == [], f"high-noise expert tensors left on the device: {left}"


def test_an_error_during_a_handoff_leaves_a_usable_expert(experts: tuple) -> None:
    """An exception in the last forward before a handoff (an OOM, a bad LoRA) must not leave the current expert
    half released: the next request's ensure() has to find every block of the expert it runs on the device."""
    swap, weights, high, _low = experts
    swap.ensure(Expert.HIGH)
    with pytest.raises(RuntimeError, match="boom"), swap.handing_off(Expert.HIGH, Expert.LOW):
        for i, _block in enumerate(high.blocks):
            if i == 1:
                raise RuntimeError("boom")
    assert high.blocks.after_block is None
    swap.ensure(Expert.HIGH)  # the next request starts on the high-noise expert
    assert all(weights.on_device(b) for b in high.blocks), "high-noise blocks released by the failed handoff"


# --- LoRAs under each policy ---


def lora_use(path: Path, scale: float = 1.0) -> LoraUse:
    file = LoraFile(path, file_sha256(path), path.stat().st_size, SourceKind.LOCAL, False, 0.0)
    return LoraUse(file, scale, EXPERTS["both"], path.name)


def test_a_lora_loaded_under_offload_is_known_to_the_offload_hooks(
    model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With CUDA streams, group offloading keeps a host copy of each parameter it knew when it was applied and
    looks every parameter up in it at each upload: a LoRA's factors loaded after it were a KeyError at the first
    step. A CPU has no streams, so the table is built here as a GPU builds it (without pinning)."""

    def host_copies(group: ModuleGroup) -> dict[torch.Tensor, torch.Tensor]:
        tensors = [t for m in group.modules for t in (*m.parameters(), *m.buffers())]
        return {t: t.data for t in (*tensors, *group.parameters, *group.buffers)}

    monkeypatch.setattr(ModuleGroup, "_init_cpu_param_dict", host_copies)
    path = write_wan(
        tmp_path / "style.safetensors", random_factors(load_pipeline("tiny", model_cache, torch.float32).transformer)
    )
    run = spec(num_inference_steps=2, loras=(lora_use(path, 3.0),))
    resident = tiny_engine(model_cache, memory_policy="resident")
    want, plain = resident.generate(run).frames, resident.generate(spec(num_inference_steps=2)).frames
    engine = tiny_engine(model_cache, memory_policy="offload")
    got = engine.generate(run).frames
    for expert in (engine.pipe.transformer, engine.pipe.transformer_2):
        hooks = [
            m._diffusers_hook.get_hook("group_offloading") for m in expert.modules() if hasattr(m, "_diffusers_hook")
        ]
        groups = [hook.group for hook in hooks if hook is not None]
        assert groups
        for group in groups:
            known = group.cpu_param_dict
            assert all(t in known for m in group.modules for t in m.parameters())
        assert any("lora_A" in name for name, _ in expert.named_parameters())
    assert rel_error(got, want) < rel_error(plain, want) / 10
    engine.loras.unload_all()  # the hooks are applied again without the factors
    for expert in (engine.pipe.transformer, engine.pipe.transformer_2):
        assert not any("lora_" in name for name, _ in expert.named_parameters())
    assert rel_error(engine.generate(spec(num_inference_steps=2)).frames, plain) < rel_error(plain, want) / 10


def test_lora_factors_go_where_the_engine_places_adapters_not_beside_host_weights(
    model_cache: Path, tmp_path: Path
) -> None:
    """Under swap the expert not on the GPU has its weights in host memory, and PEFT puts each factor beside its
    layer's weight; the swap uploads only the weights it adopted, so the factors must be moved to the GPU. A CPU has
    no second device to load onto: the placement after a load is checked with the meta device standing for the
    GPU, and only the adapter placed moves."""
    pipe = load_pipeline("tiny", model_cache, torch.float32)
    factors = random_factors(pipe.transformer)
    kept, moved = (write_wan(tmp_path / f"{n}.safetensors", scaled(factors, s)) for n, s in (("a", 1), ("b", 2)))
    adapters = LoraAdapters({"high": pipe.transformer, "low": pipe.transformer_2}, 2**30)
    adapters.load([lora_use(kept), lora_use(moved)])
    adapters.device = torch.device("meta")
    name = adapters._resident[lora_use(moved).file.identity].name
    for expert in (pipe.transformer, pipe.transformer_2):
        adapters._place(expert, name)
        placed = {n: t.device.type for n, t in expert.named_parameters() if "lora_" in n}
        assert {d for n, d in placed.items() if name in n} == {"meta"}
        assert {d for n, d in placed.items() if name not in n} == {"cpu"}  # the other adapter stays
        assert sum(name in n for n in placed) == len(placed) // 2
