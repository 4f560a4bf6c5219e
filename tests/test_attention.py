"""The exact attention kernel: candidates per GPU, the measurement (real PyTorch kernels on the CPU), its on-disk
cache, the speed plan it feeds, and FlashAttention 4's wiring (a stand-in `flash_attn.cute` module: the real one
needs a Hopper or Blackwell GPU)."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
import typing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engines import tiny_engine
from pydantic import ValidationError

import wanserve.engine.attention as attention
from wanserve.config import Settings
from wanserve.engine.attention import AttentionKernel, Timing, choose, fastest, measure, resolve
from wanserve.engine.loading import load_pipeline
from wanserve.engine.parallel import ParallelContext, ParallelPlan
from wanserve.engine.speed import DeviceInfo, Preset, SelfAttnKernelProcessor, plan_speed, use_self_attention_kernel

CPU = DeviceInfo(type="cpu", name="cpu")
H100 = DeviceInfo(type="cuda", name="NVIDIA H100 80GB HBM3", capability=(9, 0))
CPU_DEVICE = torch.device("cpu")
SHAPE = (1, 96, 2, 16)  # (batch, tokens, heads, head_dim)


def exact(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2)


@pytest.fixture
def fake_flash4(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """A stand-in `flash_attn.cute` with FlashAttention 4's call signature and (out, lse) return, computing exact
    attention; records the shapes it was called with."""
    calls: list[tuple[int, ...]] = []

    def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Like the real JIT kernel, nothing dynamo can trace: a fullgraph compile passes only if the op is opaque.
        torch._dynamo.graph_break()
        calls.append(tuple(q.shape))
        return exact(q, k, v).contiguous(), torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    package = types.ModuleType("flash_attn")
    package.__path__ = []
    cute = types.ModuleType("flash_attn.cute")
    cute.__spec__ = importlib.machinery.ModuleSpec("flash_attn.cute", None)
    cute.flash_attn_func = flash_attn_func  # type: ignore[attr-defined]
    package.cute = cute  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    return calls


# --- candidates ---


def test_candidates_per_gpu(fake_flash4: list) -> None:
    assert attention.flash4_installed()
    assert AttentionKernel.FLASH4 in attention.candidates((9, 0))  # Hopper
    assert AttentionKernel.FLASH4 in attention.candidates((10, 0))  # Blackwell
    assert attention.candidates((8, 0)) == [AttentionKernel.CUDNN, AttentionKernel.FLASH, AttentionKernel.EFFICIENT]
    assert attention.candidates((7, 5)) == [AttentionKernel.EFFICIENT]
    assert AttentionKernel.FLASH4 not in attention.candidates((9, 0), flash4=False)


def test_flash4_is_not_a_candidate_without_the_package() -> None:
    assert not attention.flash4_installed()  # not a dependency: CI never installs it
    assert AttentionKernel.FLASH4 not in attention.candidates((9, 0))


def test_a_broken_flash_attn_install_is_no_flash4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FlashAttention 2 build whose extension does not match torch raises ImportError on import; diffusers
    carries on without it, and so must the engine."""
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text("raise ImportError('undefined symbol: _ZN3c10...')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    assert not attention.flash4_installed()
    assert AttentionKernel.FLASH4 not in attention.candidates((9, 0))


# --- the measurement, with PyTorch's real kernels on the CPU ---


def ticking_clock(step_s: dict[str, float], current: list[str]) -> object:
    """A clock that advances by the running candidate's `step_s` per read, so each timed call (two reads around
    it) takes exactly that long."""
    now = [0.0]

    def clock() -> float:
        now[0] += step_s[current[0]]
        return now[0]

    return clock


def test_measure_times_what_runs_and_rejects_what_is_not_exact() -> None:
    current = [""]

    def named(name: str, fn: attention.AttentionFn) -> attention.AttentionFn:
        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            current[0] = name
            return fn(q, k, v)

        return run

    functions = {
        "flash": named("flash", attention.kernel_function(AttentionKernel.FLASH)),  # PyTorch's CPU flash kernel
        "default": named("default", attention.sdpa([torch.nn.attention.SDPBackend.MATH])),
        "cudnn": named("cudnn", attention.kernel_function(AttentionKernel.CUDNN)),  # no CPU implementation
        "garbage": named("garbage", lambda q, k, v: exact(q, k, v) + 0.1),
        "nan": named("nan", lambda q, k, v: exact(q, k, v) * float("nan")),
    }
    clock = ticking_clock({"flash": 0.004, "default": 0.002, "cudnn": 1, "garbage": 0.001, "nan": 0.001}, current)
    timings = {t.kernel: t for t in measure(functions, SHAPE, CPU_DEVICE, torch.float32, clock=clock)}  # type: ignore[arg-type]
    assert list(timings) == list(functions)
    assert timings["flash"].usable and timings["flash"].ms == pytest.approx(4.0)
    assert timings["default"].usable and timings["default"].ms == pytest.approx(2.0)
    assert timings["flash"].rel_error < 1e-5 and timings["default"].rel_error < 1e-5
    assert not timings["cudnn"].usable and "RuntimeError" in timings["cudnn"].error
    assert not timings["garbage"].usable and timings["garbage"].error.startswith("not exact:")
    assert timings["garbage"].rel_error > attention.EXACT_TOLERANCE
    assert not timings["nan"].usable and "not exact" in timings["nan"].error
    # The fastest usable one wins; the faster but wrong ones never do.
    assert fastest(list(timings.values()), AttentionKernel.CUDNN) is AttentionKernel.DEFAULT


def test_fastest_falls_back_when_nothing_ran() -> None:
    failed = [Timing("flash4", error="ImportError: no"), Timing("cudnn", error="not exact: 9%")]
    assert fastest(failed, AttentionKernel.CUDNN) is AttentionKernel.CUDNN


def test_choose_stores_the_answer_and_a_restart_reads_it(tmp_path: Path) -> None:
    cache = tmp_path / "compile" / "attention.json"
    ran: list[str] = []

    def counted(name: str) -> attention.AttentionFn:
        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            ran.append(name)
            return exact(q, k, v)

        return run

    functions = {"flash": counted("flash"), "efficient": counted("efficient")}
    first = choose(functions, SHAPE, CPU_DEVICE, torch.float32, cache, AttentionKernel.CUDNN)
    assert first.how == "measured" and first.kernel in (AttentionKernel.FLASH, AttentionKernel.EFFICIENT)
    assert ran.count("flash") == 4 and ran.count("efficient") == 4  # one check + three timed each
    doc = json.loads(cache.read_text())
    (key, entry), *_ = doc.items()
    assert "x".join(map(str, SHAPE)) in key and f"torch {torch.__version__}" in key
    assert entry["kernel"] == first.kernel.value and len(entry["timings"]) == 2

    ran.clear()
    again = choose(functions, SHAPE, CPU_DEVICE, torch.float32, cache, AttentionKernel.CUDNN)
    assert (again.kernel, again.how, ran) == (first.kernel, "measured earlier", [])
    assert again.timings == first.timings
    assert "measured earlier: " in again.describe() and " ms" in again.describe()

    # Another shape (or another candidate list) is another measurement, kept beside the first.
    other = choose(functions, (1, 64, 2, 16), CPU_DEVICE, torch.float32, cache, AttentionKernel.CUDNN)
    assert other.how == "measured" and ran
    assert len(json.loads(cache.read_text())) == 2


def test_a_damaged_cache_is_measured_again_and_rewritten(tmp_path: Path) -> None:
    cache = tmp_path / "attention.json"
    cache.write_text("{not json")
    functions = {"flash": exact}
    assert choose(functions, SHAPE, CPU_DEVICE, torch.float32, cache, AttentionKernel.CUDNN).how == "measured"
    key = next(iter(json.loads(cache.read_text())))
    cache.write_text(json.dumps({key: {"kernel": "no-such-kernel", "timings": []}}))
    assert choose(functions, SHAPE, CPU_DEVICE, torch.float32, cache, AttentionKernel.CUDNN).how == "measured"
    assert json.loads(cache.read_text())[key]["kernel"] == "flash"
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed into place


def test_a_kernel_that_raised_is_tried_again_at_the_next_start(tmp_path: Path) -> None:
    """Its failure may have passed (memory another process held, a first-use compile): not stored."""
    cache = tmp_path / "attention.json"
    fail = [True]

    def flaky(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if fail[0]:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return exact(q, k, v)

    functions = {"flash": exact, "flash4": flaky}
    first = choose(functions, SHAPE, CPU_DEVICE, torch.float32, cache, AttentionKernel.CUDNN)
    assert first.kernel is AttentionKernel.FLASH and not cache.exists()
    fail[0] = False
    again = choose(functions, SHAPE, CPU_DEVICE, torch.float32, cache, AttentionKernel.CUDNN)
    assert again.how == "measured" and {t.kernel for t in again.timings if t.usable} == {"flash", "flash4"}
    assert cache.exists()  # everything ran: stored
    # A kernel found not exact is stored with the rest: its numerics are what they are.
    wrong = {"flash": exact, "flash4": lambda q, k, v: exact(q, k, v) * 2}
    choose(wrong, (1, 64, 2, 16), CPU_DEVICE, torch.float32, cache, AttentionKernel.CUDNN)
    assert len(json.loads(cache.read_text())) == 2


def test_a_failed_measurement_runs_on_the_usual_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*args: object, **kwargs: object) -> list[Timing]:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(attention, "measure", no_memory)
    got = choose({"flash": exact}, SHAPE, CPU_DEVICE, torch.float32, None, AttentionKernel.CUDNN)
    assert (got.kernel, got.how) == (AttentionKernel.CUDNN, "not measured: OutOfMemoryError")


def test_the_reference_is_computed_a_few_heads_at_a_time() -> None:
    """The float32 reference at 720p for all 40 heads at once needs ~5 GiB; in slices of heads it gives the same."""
    shape = (1, 80, attention.REFERENCE_HEADS * 2 + 3, 16)  # a last slice of 3 heads
    timings = measure({"flash": exact}, shape, CPU_DEVICE, torch.float32)
    assert timings[0].usable and timings[0].rel_error < 1e-6


def test_nothing_usable_is_not_stored(tmp_path: Path) -> None:
    cache = tmp_path / "attention.json"

    def broken(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no kernel for this GPU")

    got = choose({"flash": broken}, SHAPE, CPU_DEVICE, torch.float32, cache, AttentionKernel.CUDNN)
    assert got.kernel is AttentionKernel.CUDNN and not cache.exists()


def test_resolve_the_setting() -> None:
    assert resolve("flash", CPU_DEVICE, (0, 0), SHAPE, torch.float32, None).kernel is AttentionKernel.FLASH
    auto = resolve("auto", CPU_DEVICE, (0, 0), SHAPE, torch.float32, None)
    assert auto.kernel is AttentionKernel.DEFAULT and auto.how.startswith("not measured")
    with pytest.raises(ValueError):
        resolve("sage", CPU_DEVICE, (0, 0), SHAPE, torch.float32, None)


GPU = torch.device("cuda")  # only a name: nothing here runs on it


@pytest.mark.parametrize(
    ("setting", "capability", "dtype", "message"),
    [
        ("flash4", (9, 0), torch.bfloat16, "FlashAttention 4 is not installed (pip install 'wanserve[flash4]')"),
        ("flash4", (8, 0), torch.bfloat16, "not for this GPU (sm_80); use auto, or one of cudnn, flash, efficient"),
        ("cudnn", (7, 5), torch.float16, "not for this GPU (sm_75); use auto, or one of efficient"),
        ("cudnn", (9, 0), torch.float32, "the model runs in torch.float32, and the fused kernels take float16"),
    ],
)
def test_a_kernel_set_that_cannot_run_stops_the_start_with_the_reason(
    setting: str, capability: tuple[int, int], dtype: torch.dtype, message: str
) -> None:
    with pytest.raises(attention.AttentionUnavailable) as refused:
        resolve(setting, GPU, capability, SHAPE, dtype, None)
    assert message in str(refused.value) and str(refused.value).startswith(f"attention={setting} cannot run here")


def test_what_a_gpu_runs_without_measuring() -> None:
    assert resolve("cudnn", GPU, (9, 0), SHAPE, torch.bfloat16, None).kernel is AttentionKernel.CUDNN
    assert resolve("default", GPU, (7, 5), SHAPE, torch.float32, None).kernel is AttentionKernel.DEFAULT
    # float32 on a GPU: no fused kernel takes it, so PyTorch's default, not cuDNN (which would fail at the forward)
    in_float32 = resolve("auto", GPU, (9, 0), SHAPE, torch.float32, None)
    assert (in_float32.kernel, in_float32.how) == (AttentionKernel.DEFAULT, "not measured: float32")


def test_the_attention_setting() -> None:
    # config.py names the kernels without importing torch: the names must stay the engine's
    assert set(typing.get_args(Settings.model_fields["attention"].annotation)) == {"auto", *AttentionKernel}
    assert Settings(attention="flash4").attention == "flash4"
    assert Settings().attention == "auto"
    with pytest.raises(ValidationError):
        Settings(attention="sage")


# --- the speed plan ---


def test_plan_with_each_kernel() -> None:
    flash4 = plan_speed("exact", H100, attention=AttentionKernel.FLASH4)
    assert flash4.flash4_self_attention and flash4.attention_backend == "_native_cudnn"  # cross-attention
    assert "FlashAttention 4" in flash4.describe()
    assert plan_speed("exact", H100, attention=AttentionKernel.FLASH).attention_backend == "_native_flash"
    assert plan_speed("exact", H100, attention=AttentionKernel.DEFAULT).attention_backend is None
    assert not plan_speed("exact", H100).flash4_self_attention
    # `fast` with its INT8 kernel on: that kernel takes the self-attention.
    fast = plan_speed("fast", H100, unvalidated_fast_gpu=True, lowbit_attention=True, attention=AttentionKernel.FLASH4)
    assert fast.lowbit_attention and not fast.flash4_self_attention
    fast = plan_speed("fast", H100, unvalidated_fast_gpu=True, attention=AttentionKernel.FLASH4)
    assert fast.fp8_linears and fast.flash4_self_attention and not fast.lowbit_attention


def test_a_gpu_kernel_set_on_a_cpu_falls_back_with_a_note() -> None:
    plan = plan_speed("exact", DeviceInfo(type="cpu"), attention=AttentionKernel.CUDNN)
    assert plan.attention_backend is None and not plan.flash4_self_attention
    assert any("cudnn attention needs a GPU" in note for note in plan.notes)


def ulysses_context() -> ParallelContext:
    context = object.__new__(ParallelContext)  # its constructor joins a process group; only the plan matters here
    context._plan, context.device = ParallelPlan(world_size=2, ulysses_degree=2), torch.device("cuda")
    return context


def test_sequence_parallelism_turns_flash4_off() -> None:
    plan = ulysses_context().adjust_speed(plan_speed(Preset.EXACT, H100, attention=AttentionKernel.FLASH4))
    assert not plan.flash4_self_attention and plan.attention_backend == "_native_cudnn"
    assert any("FlashAttention 4 off" in note for note in plan.notes)


def test_sequence_parallelism_leaves_the_memory_efficient_kernel() -> None:
    """diffusers refuses context parallelism on `_native_efficient` (the engine would not start)."""
    plan = ulysses_context().adjust_speed(plan_speed(Preset.EXACT, H100, attention=AttentionKernel.EFFICIENT))
    assert plan.attention_backend is None
    assert any("has no sequence parallelism" in note for note in plan.notes)
    kept = ulysses_context().adjust_speed(plan_speed(Preset.EXACT, H100, attention=AttentionKernel.FLASH))
    assert kept.attention_backend == "_native_flash"


def test_the_engine_on_a_cpu_keeps_the_default_and_says_why(model_cache: Path, tmp_path: Path) -> None:
    engine = tiny_engine(model_cache, preset="exact", compile=False, compile_cache_dir=tmp_path)
    assert engine.speed.attention_backend is None
    assert "attention choice default (not measured: no GPU)" in engine.describe()
    assert not (tmp_path / "attention.json").exists()
    assert "attention choice" not in tiny_engine(model_cache, preset="eager").describe()  # eager is plain diffusers


# --- FlashAttention 4's wiring ---


def test_flash4_op_in_a_block_is_the_default_processor(model_cache: Path, fake_flash4: list) -> None:
    expert = load_pipeline("tiny", model_cache, torch.float32).transformer
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 16, 3, 4, 6, generator=gen)
    text = torch.randn(1, 512, expert.config.text_dim, generator=gen)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return expert(hidden, torch.tensor([500]), text, return_dict=False)[0]

    want = run()
    for block in expert.blocks:
        use_self_attention_kernel(block, attention.flash4_attention, None)
        assert isinstance(block.attn1.processor, SelfAttnKernelProcessor)
        assert not isinstance(block.attn2.processor, SelfAttnKernelProcessor)  # cross-attention untouched
    got = run()
    assert float((got - want).norm() / want.norm()) < 1e-5
    heads, head_dim = expert.config.num_attention_heads, expert.config.attention_head_dim
    tokens = hidden.shape[2:].numel() // torch.Size(expert.config.patch_size).numel()
    assert fake_flash4 == [(1, tokens, heads, head_dim)] * len(expert.blocks)  # (batch, tokens, heads, dim)


def test_flash4_op_compiles_as_one_opaque_call(fake_flash4: list) -> None:
    """fullgraph compile (what the regional compile of the blocks uses) must not trace into the JIT kernel (the
    stand-in breaks the graph if it is traced), and the op's fake output must match the kernel's: a new contiguous
    tensor, even for a query that is not (Inductor checks the strides)."""
    # Inductor's on-disk graph cache does not key on the fake's code: a graph compiled against an older one is reused.
    # (Inductor's config.patch, not monkeypatch, whose undo deletes the setting from torch's config module.)
    no_graph_cache = torch._inductor.config.patch(fx_graph_cache=False)
    q = torch.randn(SHAPE[0], SHAPE[2], SHAPE[1], SHAPE[3]).transpose(1, 2)  # (b, s, h, d) view of (b, h, s, d)
    k, v = (torch.randn(SHAPE) for _ in range(2))
    # .flatten(2, 3) as the processor does: a view whose strides Inductor takes from the op's fake output
    compiled = torch.compile(lambda q, k, v: attention.flash4_attention(q, k, v).flatten(2, 3) * 2, fullgraph=True)
    with no_graph_cache:
        got = compiled(q, k, v)
    assert torch.allclose(got, exact(q, k, v).flatten(2, 3) * 2, atol=1e-6)
    assert fake_flash4 == [SHAPE]


def test_flash4_in_the_regionally_compiled_blocks(model_cache: Path, fake_flash4: list) -> None:
    """The blocks as `exact` compiles them (compile_repeated_blocks, fullgraph) with the FlashAttention 4 op."""
    expert = load_pipeline("tiny", model_cache, torch.float32).transformer
    hidden = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    text = torch.randn(1, 512, expert.config.text_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = expert(hidden, torch.tensor([500]), text, return_dict=False)[0]
        for block in expert.blocks:
            use_self_attention_kernel(block, attention.flash4_attention, None)
        expert.compile_repeated_blocks(fullgraph=True, dynamic=False, backend="aot_eager")
        got = expert(hidden, torch.tensor([500]), text, return_dict=False)[0]
    assert float((got - want).norm() / want.norm()) < 1e-5
    assert len(fake_flash4) == len(expert.blocks)


def test_flash4_is_measured_beside_the_others(fake_flash4: list, tmp_path: Path) -> None:
    functions = {k.value: attention.kernel_function(k) for k in (AttentionKernel.FLASH, AttentionKernel.FLASH4)}
    got = choose(functions, SHAPE, CPU_DEVICE, torch.float32, tmp_path / "a.json", AttentionKernel.CUDNN)
    assert {t.kernel for t in got.timings if t.usable} == {"flash", "flash4"}
    assert len(fake_flash4) == 4


def test_a_later_plan_without_flash4_puts_the_default_processor_back(model_cache: Path, fake_flash4: list) -> None:
    """The bench makes one engine after another on the same experts: a plan must not inherit an earlier one's
    self-attention kernel."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from wanserve.engine.speed import prepare_experts

    expert = load_pipeline("tiny", model_cache, torch.float32).transformer
    prepare_experts([expert], plan_speed("exact", H100, compile=False, attention=AttentionKernel.FLASH4))
    assert all(isinstance(block.attn1.processor, SelfAttnKernelProcessor) for block in expert.blocks)
    default = _AttentionBackendRegistry._active_backend
    prepare_experts([expert], plan_speed("exact", H100, compile=False, attention=AttentionKernel.FLASH))
    for block in expert.blocks:
        assert type(block.attn1.processor) is WanAttnProcessor
        assert block.attn1.processor._attention_backend == "_native_flash"
    # Only this expert's: diffusers' set_attention_backend also made it every other model's default (the bench's
    # diffusers baseline, made after an exact engine, ran on the exact engine's attention).
    assert _AttentionBackendRegistry._active_backend == default
    prepare_experts([expert], plan_speed("exact", CPU, compile=False))  # no backend: diffusers' default again
    assert {block.attn2.processor._attention_backend for block in expert.blocks} == {None}
