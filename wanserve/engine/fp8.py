"""Low-bit numerics of the `fast` preset: FP8 (e4m3) linears and INT8-QK / FP16-PV attention.

On a CUDA GPU with FP8 tensor cores (compute capability >= 8.9) linears run `torch._scaled_mm` and
self-attention runs the Triton kernel in `kernels/int8_attention.py`. Anywhere else the same quantization is
*emulated* (quantize, dequantize, compute in float32): slow, but numerically the same function, which is what
lets CI check the error of the `fast` preset on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value
FP8_BYTES = 1
_TINY = 1e-12


def _quantize(x: torch.Tensor, dim: int, limit: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric scaling: the absolute maximum of each slice along `dim` maps to `limit`. Returns values in `dtype`
    and the float32 scales with `x ~= values * scale`. Integers round to nearest; floats round in the cast."""
    scale = x.detach().abs().amax(dim=dim, keepdim=True).float().clamp(min=_TINY) / limit
    scaled = x.float() / scale
    if not dtype.is_floating_point:
        scaled = scaled.round()
    return scaled.clamp(-limit, limit).to(dtype), scale


def quantize_rows(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 values and float32 scales such that `x ~= values * scale`, one scale per slice along `dim`
    (the slice's absolute maximum maps to the largest finite FP8 value)."""
    return _quantize(x, dim, FP8_MAX, FP8)


class Fp8Linear(nn.Linear):
    """A Linear whose weight is stored in FP8 with one scale per output row; activations are quantized per
    token on the fly. Stays an `nn.Linear` (same features, bias, device) so that PEFT can put LoRA adapters on it;
    `compute_dtype` tells PEFT (and our LoRA loader) the dtype that adapters and outputs use."""

    weight_scale: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        values, scale = quantize_rows(linear.weight.data)
        self.weight = nn.Parameter(values, requires_grad=False)
        self.register_buffer("weight_scale", scale)  # (out_features, 1)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        x8, x_scale = quantize_rows(rows)
        if rows.is_cuda:
            # Row-wise scaled FP8 GEMM: float32 scales (M, 1) and (1, N), bf16 out.
            out = torch._scaled_mm(
                x8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale.t(), out_dtype=self.compute_dtype
            )
        else:
            out = ((x8.float() * x_scale) @ (self.weight.float() * self.weight_scale).t()).to(self.compute_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


def fp8_targets(root: nn.Module, include: Callable[[str], bool], on_gpu: bool) -> list[tuple[str, nn.Linear]]:
    """The `nn.Linear` layers under `root` that `use_fp8_linears` replaces: those whose qualified name `include`
    accepts and, when they will run on a GPU (`on_gpu`), whose sizes the FP8 GEMM takes (multiples of 16)."""

    def fits(module: nn.Linear) -> bool:
        return not on_gpu or (module.in_features % 16 == 0 and module.out_features % 16 == 0)

    return [
        (name, module)
        for name, module in root.named_modules()
        if type(module) is nn.Linear and include(name) and fits(module)
    ]


def fp8_bytes_saved(root: nn.Module, include: Callable[[str], bool], on_gpu: bool) -> int:
    """How many bytes `use_fp8_linears` would take off `root`'s weights: each replaced weight goes from its dtype to
    one byte per value plus one float32 scale per output row. Lets the memory plan size a `fast` model before it
    is converted (the conversion runs after the plan, where the weights will live)."""
    saved = 0
    for _, module in fp8_targets(root, include, on_gpu):
        weight = module.weight
        saved += weight.numel() * (weight.element_size() - FP8_BYTES) - module.out_features * 4
    return saved


def use_fp8_linears(root: nn.Module, include: Callable[[str], bool], on_gpu: bool | None = None) -> int:
    """Replace every `nn.Linear` under `root` that `fp8_targets` names by an Fp8Linear, for running on a GPU or not
    (`on_gpu`; None: where the weights are now; experts set up on the host for swap or offload run on the GPU).
    Returns how many were replaced."""
    if on_gpu is None:
        on_gpu = any(p.is_cuda for p in root.parameters())
    targets = fp8_targets(root, include, on_gpu)
    count = len(targets)
    targets.reverse()
    while targets:  # each replaced layer is let go at once: a model converts with one layer's bf16 weight extra
        name, module = targets.pop()
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, Fp8Linear(module))
        del module
    return count


def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 values and float32 scales along the last dim: `x ~= values * scale` (symmetric, round to nearest)."""
    return _quantize(x, -1, 127.0, torch.int8)


def quantize_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as (batch, heads, tokens, head_dim) -> the attention kernel's operands and float32 scales.

    q and k become INT8 with one scale per token (FP8 scores lose 4-12% on Wan-like inputs, INT8 about 1%); k is
    first centred on its mean over the tokens (softmax is invariant to adding the same q.mean(k) to every score of a
    row, and Wan's keys carry a large shared offset that would otherwise eat the INT8 range). v becomes float16 in
    [-1, 1] with one scale per channel (P.V sums over tokens; bf16 values can lie beyond float16's range).
    Returns q8, q_scale (b, h, tokens), k8, k_scale (b, h, tokens), v16, v_scale (b, h, head_dim)."""
    k = k - k.float().mean(dim=2, keepdim=True).to(k.dtype)
    q8, q_scale = quantize_int8_rows(q)
    k8, k_scale = quantize_int8_rows(k)
    v16, v_scale = _quantize(v, 2, 1.0, torch.float16)
    return q8, q_scale.squeeze(-1), k8, k_scale.squeeze(-1), v16, v_scale.squeeze(-2)


def int8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The low-bit attention's numerics in float32 (q, k, v: (batch, heads, tokens, head_dim)); what the Triton
    kernel computes, and what runs where the kernel cannot: scores from INT8 q and k, probabilities rounded to
    float16, float16 v, float32 accumulation, the row sum taken of the rounded probabilities. Queries go `chunk` at
    a time to bound the score matrix's memory."""
    q8, q_scale, k8, k_scale, v16, v_scale = quantize_attention_inputs(q, k, v)
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
    k8f, v16f = k8.float().transpose(-1, -2), v16.float()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for start in range(0, q.shape[-2], chunk):
        rows = slice(start, start + chunk)
        scores = (q8[..., rows, :].float() @ k8f) * (q_scale[..., rows, None] * sm_scale) * k_scale[..., None, :]
        probs = torch.exp(scores - scores.amax(dim=-1, keepdim=True)).to(torch.float16).float()
        part = (probs @ v16f) * v_scale[..., None, :]
        out[..., rows, :] = (part / probs.sum(dim=-1, keepdim=True)).to(q.dtype)
    return out


# FP8 attention (cuDNN's fused SDPA, kernels/cudnn_fp8_attention.py). The unnormalised probabilities (at most 1,
# relative to the running row maximum) are multiplied by this before their FP8 cast: the scale the cuDNN frontend's
# FP8 forward tests derive for a maximum of 1 (128 / 1 x 0.5), far inside e4m3's range, which the kernel's lazy
# rescaling of its running maximum may need. Not yet checked on a GPU: benchmarks/lowbit_attention.py tries others.
FP8_ATTENTION_P_SCALE = 64.0
# An attention output is a convex combination of value rows, so |out| <= max|v|; where the kernel writes FP8 (on
# Hopper), its scale leaves this much room over that bound for the probabilities' rounding.
FP8_ATTENTION_O_HEADROOM = 1.25


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 values and one float32 descale (a 1-element tensor) with `x ~= values * descale`: the tensor's absolute
    maximum maps to the largest finite FP8 value. Computed on the device, without a host sync."""
    values, descale = _quantize(x, tuple(range(x.dim())), FP8_MAX, FP8)  # type: ignore[arg-type]
    return values, descale.reshape(1)


def quantize_fp8_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as (batch, tokens, heads, head_dim) -> FP8 q, k, v in the same layout and their three descales
    (float32, shape (3,)). cuDNN's FP8 attention takes one scale per tensor. k is centred on its mean over the
    tokens first (per batch, head and channel): every score of a query row moves by the same q.mean(k), which the
    softmax ignores, while FP8's relative rounding error then applies to the smaller centred values (with keys
    offset by 3 from unit noise, 1.7 times less error; tests/test_fp8_attention.py)."""
    k = k.float() - k.float().mean(dim=1, keepdim=True)
    (q8, dq), (k8, dk), (v8, dv) = (quantize_per_tensor(x) for x in (q, k, v))
    return q8, k8, v8, torch.cat([dq, dk, dv])


def fp8_attention_reference(
    q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descales: torch.Tensor, out_dtype: torch.dtype,
    fp8_output: bool = True, chunk: int = 1024,
) -> torch.Tensor:  # fmt: skip
    """cuDNN's FP8 attention (kernels/cudnn_fp8_attention.py) in float32, on the operands of
    `quantize_fp8_attention_inputs`, with the exact row maximum where the kernel keeps a running one per block of
    keys (the rounding points move, not the function): scores from the FP8 q and k times their descales and
    1/sqrt(head_dim); the probabilities, relative to the row maximum, scaled by FP8_ATTENTION_P_SCALE and rounded to
    FP8 for P.V; the row sum of the unrounded ones; the output rounded to FP8 where the kernel writes FP8
    (`fp8_output`, as on Hopper).
    Queries go `chunk` at a time to bound the score matrix's memory. Returns (batch, tokens, heads, head_dim)."""
    dq, dk, dv = descales.float()
    q, k = (x.float().transpose(1, 2) for x in (q8, k8))  # (batch, heads, tokens, head_dim)
    v = v8.float().transpose(1, 2)
    scale = dq * dk / math.sqrt(q.shape[-1])
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for start in range(0, q.shape[-2], chunk):
        rows = slice(start, start + chunk)
        scores = (q[..., rows, :] @ k.transpose(-1, -2)) * scale
        probs = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        rounded = (probs * FP8_ATTENTION_P_SCALE).to(FP8).float()
        out[..., rows, :] = (rounded @ v) * (dv / FP8_ATTENTION_P_SCALE) / probs.sum(dim=-1, keepdim=True)
    if fp8_output:
        descale_o = dv * FP8_ATTENTION_O_HEADROOM
        out = (out / descale_o).to(FP8).float() * descale_o
    return out.transpose(1, 2).to(out_dtype).contiguous()
