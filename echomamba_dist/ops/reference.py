"""The reference twins of the fast kernels: plain PyTorch, autograd, readable.

`selective_scan_ref` is the math of `selective_scan` (see `echomamba_dist.ops.selective_scan` for
the shapes), `causal_conv1d_silu_ref` that of `causal_conv1d_silu`. Every kernel (the Numba CPU
kernels, mamba-ssm's CUDA ones) is tested against them, and the kernels fall back to them where
they do not apply. This module imports nothing of the package, so kernels and dispatchers both
build on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Reference selective scan: a per-step loop in fp32, differentiable by autograd.

    Memory is O(B*D*N) for the state plus what autograd keeps per step; no (B, D, L, N) tensor is
    ever built. Returns a tensor of `u`'s dtype and shape (B, D, L).
    """
    dtype_in = u.dtype
    # At least fp32 (bf16/fp16 inputs are upcast); float64 stays float64 so gradcheck can run.
    compute = torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, d_inner, length = u.shape
    state = u.new_zeros(batch, d_inner, A.shape[1])  # (B, D, N)
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]  # (B, D, 1)
        decay = torch.exp(dt * A)  # (B, D, N)
        drive = dt * B[:, None, :, t] * u[:, :, t, None]  # (B, D, N)
        state = decay * state + drive
        ys.append(torch.einsum("bdn,bn->bd", state, C[:, :, t]))  # (B, D)
    y = torch.stack(ys, dim=-1)  # (B, D, L)
    if D is not None:
        y = y + u * D.to(compute)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(dtype_in)


def causal_conv1d_silu_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference: `F.conv1d` (groups = D, padding K - 1, first L outputs), then SiLU.

    Takes x (B, L, D), weight (D, K), bias (D,) or None; returns (B, L, D), differentiable by
    autograd in all three.
    """
    length, d_inner = x.shape[1], x.shape[2]
    kernel = weight.shape[1]
    y = F.conv1d(x.transpose(1, 2), weight[:, None, :], bias, padding=kernel - 1, groups=d_inner)
    return F.silu(y[..., :length]).transpose(1, 2)  # (B, L, D)
