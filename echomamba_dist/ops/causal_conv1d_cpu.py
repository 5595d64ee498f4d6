"""Fused depthwise causal conv1d + SiLU for CPU: Numba kernels behind a `torch.autograd.Function`.

Same contract as `causal_conv1d_silu_ref` (`echomamba_dist.ops.causal_conv1d`), channel-last:
each output row t is bias + K shifted multiply-adds of input rows t - K + 1 .. t, then SiLU, with
the loops over D innermost, so that they vectorise. The forward keeps only its inputs; the
backward recomputes the pre-activation (K multiply-adds a row) rather than storing it.

Work is split over the batch, on as many threads as `torch.get_num_threads()`, with the pool and
the compile options of the selective-scan kernel (`selective_scan_cpu`). Compute is fp32 for
fp32/bf16/fp16 inputs and fp64 for fp64 inputs (so that gradcheck can check the backward).
"""

from __future__ import annotations

import numpy as np
import torch

from echomamba_dist.ops.reference import causal_conv1d_silu_ref
from echomamba_dist.ops.selective_scan_cpu import (
    _ITEMS_PER_THREAD,
    _KERNEL_FASTMATH,
    _exp,
    _jit,
    _np,
    _run_items,
)

# Division in Numba's default error model checks for zero and raises, and that branch alone kept
# the SiLU loops from vectorising (10x slower); "numpy" lets x / 0 be inf, as torch does.
_OPTIONS = {"fastmath": _KERNEL_FASTMATH, "nogil": True, "error_model": "numpy"}


# x comes flat: row r = b * L + t of the (B, L, D) input starts at x[r * row_stride]. The Mamba
# block's input is a column slice of in_proj's output (row stride 2 * D); indexed as a strided
# 3-D array, Numba's loops over D ran 3x slower than on this flat view of the same memory.
@_jit(**_OPTIONS)
def _conv_fwd(x, row_stride, wt, bias, b0, b1, out):
    """out[b] (L, D) for b0 <= b < b1; wt (K, D) is the weight transposed, bias (D,)."""
    length, d_inner = out.shape[1], out.shape[2]
    kernel = wt.shape[0]
    one = np.ones(1, dtype=wt.dtype)[0]  # a bare 1 would promote fp32 arithmetic to fp64
    for b in range(b0, b1):
        for t in range(length):
            o = out[b, t]
            for d in range(d_inner):
                o[d] = bias[d]
            for k in range(kernel):
                s = t - (kernel - 1) + k
                if s >= 0:
                    start = (b * length + s) * row_stride
                    w_k = wt[k]
                    for d in range(d_inner):
                        o[d] += w_k[d] * x[start + d]
            for d in range(d_inner):
                a = o[d]
                o[d] = a / (one + _exp(-a))  # SiLU


@_jit(**_OPTIONS)
def _conv_bwd(x, row_stride, wt, bias, gout, b0, b1, dx, dwt_acc, dbias_acc, gpre):
    """dx[b] for b0 <= b < b1; adds to dwt_acc (K, D) and dbias_acc (D,).

    Scratch gpre (L, D): dL/d(pre-activation) of one sequence.
    """
    length, d_inner = dx.shape[1], dx.shape[2]
    kernel = wt.shape[0]
    one = np.ones(1, dtype=wt.dtype)[0]
    for b in range(b0, b1):
        # Recompute the pre-activation a into gpre[t], then turn it into dL/da in place.
        for t in range(length):
            g = gpre[t]
            for d in range(d_inner):
                g[d] = bias[d]
            for k in range(kernel):
                s = t - (kernel - 1) + k
                if s >= 0:
                    start = (b * length + s) * row_stride
                    w_k = wt[k]
                    for d in range(d_inner):
                        g[d] += w_k[d] * x[start + d]
            go = gout[b, t]
            for d in range(d_inner):
                a = g[d]
                sig = one / (one + _exp(-a))
                g[d] = go[d] * sig * (one + a * (one - sig))  # SiLU'(a)
        for t in range(length):
            g = gpre[t]
            for d in range(d_inner):
                dbias_acc[d] += g[d]
            for k in range(kernel):
                s = t - (kernel - 1) + k
                if s >= 0:
                    start = (b * length + s) * row_stride
                    dw_k = dwt_acc[k]
                    for d in range(d_inner):
                        dw_k[d] += g[d] * x[start + d]
        # Input row s feeds output rows s .. s + K - 1, through taps K - 1 .. 0.
        for s in range(length):
            row = dx[b, s]
            for d in range(d_inner):
                row[d] = 0
            for k in range(kernel):
                t = s + (kernel - 1) - k
                if t < length:
                    g = gpre[t]
                    w_k = wt[k]
                    for d in range(d_inner):
                        row[d] += w_k[d] * g[d]


def _flat_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, L, D) -> (a 1-D view of its memory from x[0, 0, 0], the row stride), copying only
    when its rows are not evenly strided with unit-stride columns."""
    batch, length, d_inner = x.shape
    if x.stride(2) != 1 or x.stride(0) != length * x.stride(1) or x.stride(1) < d_inner:
        x = x.contiguous()
    row_stride = x.stride(1)
    size = (batch * length - 1) * row_stride + d_inner  # ends at the last element of x
    return x.as_strided((size,), (1,)), row_stride


def _batch_items(batch: int, threads: int) -> list[tuple[int, int]]:
    """(b0, b1) ranges: one for a single thread, else up to threads * _ITEMS_PER_THREAD."""
    n = 1 if threads <= 1 else max(1, min(batch, threads * _ITEMS_PER_THREAD))
    return [(i * batch // n, (i + 1) * batch // n) for i in range(n)]


class _CausalConv1dSiluCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        batch, length, d_inner = x.shape
        x_c = x.detach().to(compute)  # a view of in_proj's output stays a view
        x_flat, row_stride = _flat_rows(x_c)
        wt = weight.detach().to(compute).t().contiguous()  # (K, D)
        bias_c = (
            torch.zeros(d_inner, dtype=compute) if bias is None else bias.detach().to(compute).contiguous()
        )
        out = torch.empty(batch, length, d_inner, dtype=compute)
        threads = torch.get_num_threads()
        arrays = (_np(x_flat), row_stride, _np(wt), _np(bias_c))
        items = [(*arrays, b0, b1, _np(out)) for b0, b1 in _batch_items(batch, threads)]
        _run_items(_conv_fwd, items, threads)
        ctx.save_for_backward(x_flat, wt, bias_c)
        ctx.shape, ctx.row_stride = (batch, length, d_inner), row_stride
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, gout):
        x_flat, wt, bias_c = ctx.saved_tensors
        batch, length, d_inner = ctx.shape
        kernel = wt.shape[0]
        gout = gout.to(wt.dtype).contiguous()
        threads = torch.get_num_threads()
        ranges = _batch_items(batch, threads)
        dx = torch.empty(batch, length, d_inner, dtype=wt.dtype)
        dwt_part = torch.zeros(len(ranges), kernel, d_inner, dtype=wt.dtype)
        dbias_part = torch.zeros(len(ranges), d_inner, dtype=wt.dtype)
        arrays = (_np(x_flat), ctx.row_stride, _np(wt), _np(bias_c), _np(gout))
        items = [
            (*arrays, b0, b1, _np(dx), _np(dwt_part[i]), _np(dbias_part[i]),
             np.empty((length, d_inner), dtype=arrays[0].dtype))  # scratch: gpre
            for i, (b0, b1) in enumerate(ranges)
        ]  # fmt: skip
        _run_items(_conv_bwd, items, threads)
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        needs_x, needs_w, needs_b = ctx.needs_input_grad
        return (
            dx.to(x_dtype) if needs_x else None,
            dwt_part.sum(0).t().to(w_dtype) if needs_w else None,  # back to (D, K)
            dbias_part.sum(0).to(b_dtype) if needs_b and b_dtype is not None else None,
        )


def causal_conv1d_silu_cpu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Fused SiLU(depthwise causal conv1d) on CPU tensors; same contract as the reference.

    Takes x (B, L, D) with any strides, weight (D, K), bias (D,) or None, any float dtypes.
    Returns (B, L, D) in x's dtype, differentiable in all three.

    Raises:
        ValueError: a tensor is not on the CPU, or the shapes do not fit together (the kernels
            index without bounds checks).
    """
    if x.dim() != 3 or weight.dim() != 2:
        raise ValueError(f"causal_conv1d_silu_cpu: x must be (B, L, D) and weight (D, K); got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")  # fmt: skip
    d_inner = x.shape[2]
    if weight.shape[0] != d_inner or (bias is not None and tuple(bias.shape) != (d_inner,)):
        raise ValueError(
            f"causal_conv1d_silu_cpu: x {tuple(x.shape)} needs weight ({d_inner}, K) and bias "
            f"({d_inner},); got {tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}"
        )
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"causal_conv1d_silu_cpu needs CPU tensors; {name} is on {t.device}")
    if x.numel() == 0:
        return causal_conv1d_silu_ref(x, weight, bias)
    return _CausalConv1dSiluCPU.apply(x, weight, bias)
