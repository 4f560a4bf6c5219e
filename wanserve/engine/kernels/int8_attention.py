"""Low-bit flash attention (forward, non-causal) in Triton, for the `fast` preset's self-attention.

Scores come from INT8 q and k with per-token scales (k centred first); the probabilities, in float16, multiply
float16 v (per-channel scales), accumulating in float32 with an online softmax. The numerics are
`wanserve.engine.fp8.int8_attention_reference`; tests run this kernel in Triton's interpreter on the CPU
(`TRITON_INTERPRET=1`) against it. v is passed transposed (tokens last): the P.V operand is then K-major.

P.V was FP8 at first. On an H200 (Triton 3.6, torch 2.11) that version left NaN in its output in every tile
configuration tried, with and without software pipelining: about the first wave of programs (8,448 query rows of
one head at 720p), or far more. The float16 P.V was finite in all three configurations below and is 4x more
accurate (0.99% from exact attention instead of 3.9%). `benchmarks/lowbit_attention.py` checks each configuration
on a GPU this way (output filled with NaN first).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from wanserve.engine.fp8 import quantize_attention_inputs

LOG2E = 1.4426950408889634

_CONFIGS = [  # the three checked on an H200 (benchmarks/lowbit_attention.py)
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
]


@triton.jit
def _int8_attention_kernel(
    Q, QS, K, KS, VT, VS, OUT,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vd,
    stride_ob, stride_oh, stride_om,
    heads, q_len, qk_scale,
    k_len: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    cols0 = tl.arange(0, BLOCK_N)
    row_ok = rows < q_len

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :], mask=row_ok[:, None], other=0.0
    )
    # k_len is a compile-time constant: one specialization per video size (a handful), and the loop bound
    # is then known to the compiler. exp2 instead of exp: fold log2(e) and the softmax scale into the per-row q scale.
    q_scale = tl.load(QS + pid_bh * q_len + rows, mask=row_ok, other=0.0) * qk_scale
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = VT + b * stride_vb + h * stride_vh
    for start in range(0, k_len, BLOCK_N):
        cols = start + cols0
        col_ok = cols < k_len
        k = tl.load(k_base + cols[None, :] * stride_kn + dims[:, None], mask=col_ok[None, :], other=0.0)  # (D, N)
        k_scale = tl.load(KS + pid_bh * k_len + cols, mask=col_ok, other=0.0)
        s = tl.dot(q, k).to(tl.float32) * q_scale[:, None] * k_scale[None, :]
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(v_base + dims[None, :] * stride_vd + cols[:, None], mask=col_ok[:, None], other=0.0)  # (N, D)
        p = tl.exp2(s - m_new[:, None]).to(v.dtype)
        # The row sum is taken of the rounded probabilities: the output is then an exact weighted mean of v.
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
        acc = tl.dot(p, v, acc * alpha[:, None])
        m_i = m_new
    v_scale = tl.load(VS + pid_bh * HEAD_DIM + dims)
    out = acc * v_scale[None, :] / l_i[:, None]
    o_ptrs = OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])


_autotuned = triton.autotune(configs=_CONFIGS, key=["q_len", "k_len", "HEAD_DIM"])(_int8_attention_kernel)


def int8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q, k, v given as (batch, tokens, heads, head_dim) (diffusers' layout); returns the same layout
    in q's dtype, written into `out` if given. `config` fixes the tile configuration instead of autotuning (the
    interpreter tests, the GPU check of each configuration)."""
    batch, q_len, heads, head_dim = q.shape
    q8, q_scale, k8, k_scale, v16, v_scale = quantize_attention_inputs(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    )
    q8, k8 = q8.contiguous(), k8.contiguous()
    vt16 = v16.transpose(-1, -2).contiguous()  # (b, h, head_dim, tokens)
    if out is None:
        out = torch.empty_like(q)  # (b, tokens, h, d): the kernel writes straight into diffusers' layout
    args = (
        q8, q_scale.contiguous(), k8, k_scale.contiguous(), vt16, v_scale.contiguous(), out,
        q8.stride(0), q8.stride(1), q8.stride(2),
        k8.stride(0), k8.stride(1), k8.stride(2),
        vt16.stride(0), vt16.stride(1), vt16.stride(2),
        out.stride(0), out.stride(2), out.stride(1),
        heads, q_len, LOG2E / math.sqrt(head_dim),
    )  # fmt: skip
    if config is None:
        grid = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _autotuned[grid](*args, k_len=k.shape[1], HEAD_DIM=head_dim)
    else:
        _int8_attention_kernel[(triton.cdiv(q_len, config.kwargs["BLOCK_M"]), batch * heads)](
            *args, k_len=k.shape[1], HEAD_DIM=head_dim, **config.kwargs,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
    return out


# An opaque op for torch.compile: the compiled transformer block calls it like any aten op.
@torch.library.custom_op("wanserve::lowbit_attention", mutates_args=())
def lowbit_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return int8_attention(query, key, value)


@lowbit_attention_op.register_fake
def _lowbit_attention_shape(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(query)
