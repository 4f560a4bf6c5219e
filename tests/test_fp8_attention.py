"""`fast`'s FP8 attention (cuDNN's fused SDPA, wanserve/engine/kernels/cudnn_fp8_attention.py): its numerics in
float32 (what CPUs run), the cuDNN graph it builds, executed by a stand-in `cudnn` module that computes what cuDNN
documents for the graph it is given (the real library needs a GPU), and its wiring into the `fast` preset."""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from engines import rel_error, small_spec, tiny_engine

from wanserve.engine import speed
from wanserve.engine.fp8 import FP8, fp8_attention_reference, quantize_fp8_attention_inputs
from wanserve.engine.kernels import cudnn_fp8_attention as kernel
from wanserve.engine.speed import DeviceInfo, LowbitKernel, Preset, plan_speed

H100 = DeviceInfo(type="cuda", name="NVIDIA H100", capability=(9, 0), free_bytes=80 * 1024**3)
L40S = DeviceInfo(type="cuda", name="NVIDIA L40S", capability=(8, 9), free_bytes=48 * 1024**3)


def attention_inputs(batch: int = 2, tokens: int = 200, heads: int = 3, dim: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, tokens, heads, dim, generator=gen) for _ in range(3))
    return q, k + 3.0, v  # keys share a large offset, as in real models: the quantization centres them


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(*(x.transpose(1, 2).double() for x in (q, k, v))).transpose(1, 2)


def test_the_reference_is_fp8_attention() -> None:
    """Per-tensor FP8 scores, probabilities and output: a few percent from exact attention on random inputs (FP8
    keeps 3 mantissa bits), not 0 (it does quantize) and not more (the key offset is centred away)."""
    q, k, v = attention_inputs()
    operands = quantize_fp8_attention_inputs(q, k, v)
    assert all(x.dtype == FP8 and x.shape == q.shape for x in operands[:3]) and operands[3].shape == (3,)
    fp8_out = fp8_attention_reference(*operands, torch.float32)
    bf16_out = fp8_attention_reference(*operands, torch.float32, fp8_output=False)
    assert fp8_out.shape == q.shape and fp8_out.is_contiguous()
    assert 0.01 < rel_error(bf16_out, exact(q, k, v)) < rel_error(fp8_out, exact(q, k, v)) < 0.09
    # Without the centring, FP8's relative rounding applies to keys three times larger: 1.7 times the error here.
    uncentred = fp8_attention_reference(*_quantize_without_centring(q, k, v), torch.float32)
    assert rel_error(uncentred, exact(q, k, v)) > 1.4 * rel_error(fp8_out, exact(q, k, v))


def _quantize_without_centring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    from wanserve.engine.fp8 import quantize_per_tensor

    (q8, dq), (k8, dk), (v8, dv) = (quantize_per_tensor(x) for x in (q, k, v))
    return q8, k8, v8, torch.cat([dq, dk, dv])


# --- a stand-in for the cuDNN frontend's graph API ---


class _Tensor:
    def __init__(self, name: str, dim: tuple[int, ...] = (), stride: tuple[int, ...] = (), data_type: Any = None):
        self.name, self.dim, self.stride, self.data_type, self.output = (
            name,
            tuple(dim),
            tuple(stride),
            data_type,
            False,
        )

    def set_output(self, output: bool) -> _Tensor:
        self.output = output
        return self

    def set_dim(self, dim: tuple[int, ...]) -> _Tensor:
        self.dim = tuple(dim)
        return self

    def set_stride(self, stride: tuple[int, ...]) -> _Tensor:
        self.stride = tuple(stride)
        return self

    def set_data_type(self, data_type: Any) -> _Tensor:
        self.data_type = data_type
        return self


class _GraphNotSupported(RuntimeError):
    pass


class _FakeCudnn(types.ModuleType):
    """What the module uses of `cudnn`: a graph with one sdpa_fp8 node, whose execute computes cuDNN's documented
    arithmetic in float64 from the buffers it is given, read through the dims and strides the graph declared."""

    def __init__(self, bf16_output: bool) -> None:
        super().__init__("cudnn")
        self.bf16_output = bf16_output
        self.builds: list[Any] = []
        self.checked: list[Any] = []
        self.streams: list[int] = []
        self.data_type = types.SimpleNamespace(FP8_E4M3="fp8_e4m3", FLOAT="float", BFLOAT16="bfloat16")
        self.heur_mode = types.SimpleNamespace(A="a", FALLBACK="fallback")
        self.cudnnGraphNotSupportedError = _GraphNotSupported
        fake = self

        class Graph:
            def __init__(self, io_data_type: Any, intermediate_data_type: Any, compute_data_type: Any, handle: Any):
                assert (io_data_type, intermediate_data_type, compute_data_type) == ("fp8_e4m3", "float", "float")
                self.node: dict[str, Any] = {}

            def tensor(self, name: str, dim: tuple[int, ...], stride: tuple[int, ...], data_type: Any) -> _Tensor:
                return _Tensor(name, dim, stride, data_type)

            def sdpa_fp8(self, **node: Any) -> tuple[_Tensor, None, _Tensor, _Tensor]:
                assert node["generate_stats"] is False and node["use_causal_mask"] is False
                self.node = dict(node, o=_Tensor("o"), amax_s=_Tensor("amax_s"), amax_o=_Tensor("amax_o"))
                return self.node["o"], None, self.node["amax_s"], self.node["amax_o"]

            def validate(self) -> None:
                assert all(self.node[name].output for name in ("o", "amax_s", "amax_o"))

            def build_operation_graph(self) -> None: ...

            def create_execution_plans(self, modes: list[Any]) -> None: ...

            def check_support(self) -> None:
                fake.checked.append(self.node["o"].data_type)
                if self.node["o"].data_type == "bfloat16" and not fake.bf16_output:
                    raise _GraphNotSupported("FP8 attention writes FP8 on this GPU")

            def build_plans(self) -> None:
                fake.builds.append(self.node["o"].data_type)

            def get_workspace_size(self) -> int:
                return 16

            def execute(self, pack: dict[_Tensor, torch.Tensor], workspace: torch.Tensor, handle: Any) -> None:
                n = self.node

                def read(t: _Tensor) -> torch.Tensor:
                    return torch.as_strided(pack[t], t.dim, t.stride).double()

                def scalar(name: str) -> torch.Tensor:
                    assert pack[n[name]].shape == (1, 1, 1, 1)
                    return pack[n[name]].double().reshape(())

                q, k, v = read(n["q"]) * scalar("descale_q"), read(n["k"]) * scalar("descale_k"), read(n["v"])
                scores = q @ k.transpose(-1, -2) * n["attn_scale"]
                probs = torch.exp(scores - scores.amax(-1, keepdim=True))
                rounded = (probs * scalar("scale_s")).to(FP8).double() * scalar("descale_s")
                out = rounded @ (v * scalar("descale_v")) / probs.sum(-1, keepdim=True)
                o = n["o"]
                torch.as_strided(pack[o], o.dim, o.stride).copy_(out * scalar("scale_o"))
                pack[n["amax_o"]].fill_(float(out.abs().max()))
                pack[n["amax_s"]].fill_(float(probs.abs().max()))

        self.pygraph = Graph

    def create_handle(self) -> object:
        return object()

    def set_stream(self, handle: object, stream: int) -> None:
        self.streams.append(stream)


@pytest.fixture
def fake_cudnn(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[_FakeCudnn]:
    fake = _FakeCudnn(bf16_output=getattr(request, "param", True))
    monkeypatch.setitem(sys.modules, "cudnn", fake)
    monkeypatch.setattr(kernel, "_HANDLES", {})
    monkeypatch.setattr(kernel, "_GRAPHS", {})
    monkeypatch.setattr(kernel, "_FP8_OUTPUT_ONLY", {})
    yield fake


@pytest.mark.parametrize("fake_cudnn", [True, False], indirect=True, ids=["bf16-output", "fp8-output"])
def test_the_cudnn_graph_computes_the_reference(fake_cudnn: _FakeCudnn) -> None:
    """The graph reads the (batch, tokens, heads, dim) operands in place through its strides, passes the descales
    and the probability and output scales as cuDNN defines them, and dequantizes an FP8 output: what it returns is
    the reference's arithmetic. A graph cuDNN refuses with a bf16 output (Hopper) is built once with an FP8 one."""
    q, k, v = attention_inputs(tokens=96)
    operands = quantize_fp8_attention_inputs(q, k, v)
    got = kernel.cudnn_fp8_attention(*operands, torch.bfloat16)
    fp8_output = not fake_cudnn.bf16_output
    want = fp8_attention_reference(*operands, torch.bfloat16, fp8_output=fp8_output)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    assert rel_error(got.float(), want.float()) < 0.01  # float64 against float32: a rare FP8 rounding flip
    assert 0.01 < rel_error(got.float(), exact(q, k, v)) < 0.09
    assert fake_cudnn.builds == (["fp8_e4m3"] if fp8_output else ["bfloat16"])
    built = kernel.built_graph(tuple(q.shape), q.device)
    assert built is not None and built.fp8_output is fp8_output
    assert float(built.amax["amax_o"]) > 0  # cuDNN's measured output maximum stays readable (the bench prints it)
    kernel.cudnn_fp8_attention(*operands, torch.bfloat16)  # the same shape again: the graph is reused
    other = quantize_fp8_attention_inputs(*attention_inputs(tokens=64))
    kernel.cudnn_fp8_attention(*other, torch.bfloat16)
    assert len(fake_cudnn.builds) == 2 and fake_cudnn.streams
    # A GPU that refused a bf16 output is asked once, not once per shape.
    assert fake_cudnn.checked == (["bfloat16", "fp8_e4m3", "fp8_e4m3"] if fp8_output else ["bfloat16"] * 2)


def test_the_op_runs_the_reference_off_the_gpu_and_compiles_whole() -> None:
    q, k, v = attention_inputs(tokens=64)
    eager = speed.fp8_attention(q, k, v)
    assert torch.equal(eager, fp8_attention_reference(*quantize_fp8_attention_inputs(q, k, v), torch.float32))
    compiled = torch.compile(speed.fp8_attention, fullgraph=True, backend="aot_eager")(q, k, v)
    assert rel_error(compiled, eager) < 1e-6


# --- choosing it ---


def test_fast_takes_the_fp8_attention_only_where_it_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "installed", lambda: True)
    # Naming the kernel asks for it (the bench's --lowbit-kernel fp8 alone).
    asked = plan_speed("fast", H100, unvalidated_fast_gpu=True, lowbit_kernel="fp8")
    assert asked.lowbit_attention and asked.lowbit_kernel is LowbitKernel.FP8
    assert "FP8 attention (cuDNN)" in asked.describe()
    assert not plan_speed(
        "fast", H100, unvalidated_fast_gpu=True, lowbit_attention=False, lowbit_kernel="fp8"
    ).lowbit_attention
    # Asked for, but not runnable: our INT8 kernel instead, and the plan says why.
    ada = plan_speed("fast", L40S, unvalidated_fast_gpu=True, lowbit_kernel="fp8")
    assert ada.lowbit_attention and ada.lowbit_kernel is LowbitKernel.INT8
    assert any("not sm_89: INT8 attention" in n for n in ada.notes)
    monkeypatch.setattr(kernel, "installed", lambda: False)
    missing = plan_speed("fast", H100, unvalidated_fast_gpu=True, lowbit_kernel="fp8")
    assert missing.lowbit_kernel is LowbitKernel.INT8 and any("nvidia-cudnn-frontend" in n for n in missing.notes)
    # Nothing measured: `fast` keeps the exact attention on a GPU; a measurement names the kernel it found faster.
    assert not plan_speed("fast", H100, unvalidated_fast_gpu=True).lowbit_attention
    monkeypatch.setattr(speed, "LOWBIT_ATTENTION_FASTER", {(9, 0): LowbitKernel.FP8})
    # ... which, measured but not installed here, leaves the exact attention (INT8's was slower than it).
    fallback = plan_speed("fast", H100, unvalidated_fast_gpu=True)
    assert not fallback.lowbit_attention and any("exact attention" in n for n in fallback.notes)
    monkeypatch.setattr(kernel, "installed", lambda: True)
    measured = plan_speed("fast", H100, unvalidated_fast_gpu=True)
    assert measured.lowbit_attention and measured.lowbit_kernel is LowbitKernel.FP8
    assert plan_speed("fast", H100, unvalidated_fast_gpu=True, lowbit_kernel="int8").lowbit_kernel is LowbitKernel.INT8
    assert plan_speed("fast", H100, unvalidated_fast_gpu=True, lowbit_kernel="auto").lowbit_kernel is LowbitKernel.FP8
    assert not plan_speed("exact", H100, lowbit_attention=True, lowbit_kernel="fp8").lowbit_attention


def test_fast_with_the_fp8_attention_generates_close_to_eager(model_cache: Path) -> None:
    """On the tiny model on a CPU (the reference numerics): every block's self-attention is the FP8 one, and the
    video stays close to the eager one, and is not the INT8 attention's."""
    spec = small_spec(num_inference_steps=3)
    eager = tiny_engine(model_cache, preset="eager").generate(spec).frames
    fp8 = tiny_engine(model_cache, preset="fast", lowbit_kernel="fp8")
    assert fp8.speed.preset is Preset.FAST and fp8.speed.lowbit_kernel is LowbitKernel.FP8
    for expert in fp8.experts:
        assert all(block.attn1.processor.kernel is speed.fp8_attention for block in expert.blocks)
    frames = fp8.generate(spec).frames
    int8 = tiny_engine(model_cache, preset="fast").generate(spec).frames
    assert math.isfinite(float(frames.astype("float64").sum()))
    assert 0 < rel_error(frames, eager) < 0.1
    assert rel_error(frames, int8) > 0
