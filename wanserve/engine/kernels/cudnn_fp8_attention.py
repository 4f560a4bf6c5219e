"""FP8 self-attention by cuDNN's fused SDPA (`pip install 'wanserve[cudnn-fp8]'`: NVIDIA's `nvidia-cudnn-frontend`
graph API over the cuDNN library that PyTorch ships), a candidate for the `fast` preset on Hopper and data-centre
Blackwell (sm_90, sm_100).

q, k and v arrive in FP8 (e4m3) with one descale each (`fp8.quantize_fp8_attention_inputs`, which the compiled
block runs); cuDNN forms the scores in FP8 tensor-core GEMMs, keeps the online softmax in float32, rounds the
probabilities to FP8 (scaled by FP8_ATTENTION_P_SCALE) for P.V and writes the output in bf16 where the GPU's cuDNN
builds that graph, in FP8 otherwise (Hopper), dequantized here. `fp8.fp8_attention_reference` is the same
arithmetic in float32: CPUs run it, and CI checks this module's graph against it through a stand-in `cudnn`
module that computes what cuDNN documents for the graph it is given.

One graph per (shape, device, output type) is built on first use (a fraction of a second) and kept; a GPU check
(`benchmarks/lowbit_attention.py`) measures its speed and error. Not yet run on a GPU in this project.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from wanserve.engine.fp8 import FP8, FP8_ATTENTION_O_HEADROOM, FP8_ATTENTION_P_SCALE, fp8_attention_reference

log = logging.getLogger("wanserve.engine")

_SCALARS = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")


@functools.cache
def installed() -> bool:
    """Whether the cuDNN frontend's Python package imports (its library is PyTorch's cuDNN): a broken installation
    is found here, at planning, rather than by a request inside the compiled block."""
    try:
        if importlib.util.find_spec("cudnn") is None:
            return False
        _cudnn()
    except Exception as exc:  # an ImportError, or the library failing to load
        log.warning("nvidia-cudnn-frontend is installed but does not load: %s: %s", type(exc).__name__, exc)
        return False
    return True


@dataclass
class _Graph:
    graph: Any
    tensors: dict[str, Any]  # q, k, v, o, amax_s, amax_o and the scalars, by name
    workspace: torch.Tensor
    fp8_output: bool
    amax: dict[str, torch.Tensor]  # amax_s, amax_o: what the last call measured (benchmarks/lowbit_attention.py)


_HANDLES: dict[int, Any] = {}
_GRAPHS: dict[tuple[tuple[int, ...], int, bool], _Graph] = {}
_FP8_OUTPUT_ONLY: dict[int, str] = {}  # GPU index -> why cuDNN would not build a bf16 output there


def _cudnn() -> Any:
    torch.backends.cudnn.version()  # loads PyTorch's libcudnn first: the frontend then binds to that same library
    import cudnn

    return cudnn


def _index(device: torch.device) -> int:
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if device.type == "cuda" else 0


def _handle(device: torch.device) -> Any:
    """One cuDNN handle per GPU, made on that GPU, on the current PyTorch stream at each call."""
    index = _index(device)
    if index not in _HANDLES:
        with torch.cuda.device(index) if device.type == "cuda" else contextlib.nullcontext():
            _HANDLES[index] = _cudnn().create_handle()
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    _cudnn().set_stream(_HANDLES[index], stream)
    return _HANDLES[index]


def _build(shape: tuple[int, ...], device: torch.device, fp8_output: bool) -> _Graph:
    """The forward graph for (batch, tokens, heads, head_dim) operands laid out as PyTorch holds them: cuDNN reads
    them as (batch, heads, tokens, head_dim) through the strides, so nothing is transposed or copied."""
    cudnn = _cudnn()
    batch, tokens, heads, head_dim = shape
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(
        io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=_handle(device)
    )
    dims = (batch, heads, tokens, head_dim)
    strides = (tokens * heads * head_dim, head_dim, heads * head_dim, 1)
    tensors = {name: graph.tensor(name=name, dim=dims, stride=strides, data_type=e4m3) for name in ("q", "k", "v")}
    scalar = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=fp32)
    tensors.update({name: graph.tensor(name=name, **scalar) for name in _SCALARS})
    out, _stats, amax_s, amax_o = graph.sdpa_fp8(
        q=tensors["q"], k=tensors["k"], v=tensors["v"],
        **{name: tensors[name] for name in _SCALARS},
        attn_scale=1.0 / math.sqrt(head_dim), generate_stats=False, use_causal_mask=False,
    )  # fmt: skip
    out.set_output(True).set_dim(dims).set_stride(strides)
    out.set_data_type(e4m3 if fp8_output else cudnn.data_type.BFLOAT16)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
    tensors.update(o=out, amax_s=amax_s, amax_o=amax_o)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=device)
    amax = {name: torch.zeros((1, 1, 1, 1), dtype=torch.float32, device=device) for name in ("amax_s", "amax_o")}
    return _Graph(graph, tensors, workspace, fp8_output, amax)


def _graph_for(shape: tuple[int, ...], device: torch.device) -> _Graph:
    """The built graph for this shape: bf16 output where cuDNN builds it, else FP8 output (Hopper's FP8 attention
    writes FP8 only). A refusal is kept per GPU, so it costs one failed build, and logged with its reason."""
    index = _index(device)
    if index not in _FP8_OUTPUT_ONLY and (shape, index, False) not in _GRAPHS:
        try:
            _GRAPHS[(shape, index, False)] = _build(shape, device, fp8_output=False)
        except Exception as exc:  # cudnnGraphNotSupportedError, or a frontend that rejects the output type earlier
            _FP8_OUTPUT_ONLY[index] = reason = f"{type(exc).__name__}: {exc}"[:300]
            log.info("cuDNN's FP8 attention writes FP8 on GPU %d (a bf16 output was refused: %s)", index, reason)
    if index not in _FP8_OUTPUT_ONLY:
        return _GRAPHS[(shape, index, False)]
    if (shape, index, True) not in _GRAPHS:
        _GRAPHS[(shape, index, True)] = _build(shape, device, fp8_output=True)
    return _GRAPHS[(shape, index, True)]


def built_graph(shape: tuple[int, ...], device: torch.device) -> _Graph | None:
    """The graph that attention of this shape runs with, once it has run (the bench reports its output type)."""
    index = _index(device)
    return _GRAPHS.get((shape, index, index in _FP8_OUTPUT_ONLY))


def cudnn_fp8_attention(
    q8: torch.Tensor,
    k8: torch.Tensor,
    v8: torch.Tensor,
    descales: torch.Tensor,
    out_dtype: torch.dtype,
    p_scale_value: float = FP8_ATTENTION_P_SCALE,
) -> torch.Tensor:
    """Attention of FP8 (batch, tokens, heads, head_dim) operands with their descales (3,), in `out_dtype`.
    `p_scale_value`: what the probabilities are multiplied by before their FP8 cast (the bench tries others)."""
    q8, k8, v8 = (x.contiguous() for x in (q8, k8, v8))
    built = _graph_for(tuple(q8.shape), q8.device)
    descales = descales.float()
    descale_o = descales[2:3] * FP8_ATTENTION_O_HEADROOM if built.fp8_output else torch.ones_like(descales[:1])
    p_scale = torch.full_like(descales[:1], p_scale_value)
    scalars = [descales[0:1], descales[1:2], descales[2:3], 1.0 / p_scale, p_scale, 1.0 / descale_o]
    out = torch.empty(q8.shape, dtype=FP8 if built.fp8_output else torch.bfloat16, device=q8.device)
    pack = {
        built.tensors[name]: value.reshape(1, 1, 1, 1).contiguous()
        for name, value in zip(_SCALARS, scalars, strict=True)
    }
    pack.update({built.tensors[name]: tensor for name, tensor in (("q", q8), ("k", k8), ("v", v8), ("o", out))})
    pack.update({built.tensors[name]: amax for name, amax in built.amax.items()})
    built.graph.execute(pack, built.workspace, handle=_handle(q8.device))
    if built.fp8_output:
        return (out.float() * descale_o).to(out_dtype)
    return out.to(out_dtype)


@torch.library.custom_op("wanserve::fp8_attention", mutates_args=())
def fp8_attention_op(
    q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descales: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """cuDNN's FP8 attention on a GPU, its float32 reference elsewhere. A custom op: the compiled block treats the
    cuDNN graph as one opaque call."""
    if q8.is_cuda:
        return cudnn_fp8_attention(q8, k8, v8, descales, out_dtype)
    return fp8_attention_reference(q8, k8, v8, descales, out_dtype)


@fp8_attention_op.register_fake
def _(
    q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descales: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    return torch.empty(q8.shape, dtype=out_dtype, device=q8.device)
