"""Depthwise causal conv1d followed by SiLU, channel-last, with its reference twin.

    x:       (B, L, D)   any strides (the Mamba block passes a view of in_proj's output)
    weight:  (D, K)      `Mamba.conv1d.weight` squeezed: tap k multiplies x[t - (K - 1) + k]
    bias:    (D,) or None
    returns  (B, L, D)   SiLU(bias + sum_k weight[:, k] * x[t - (K - 1) + k]), zeros before t = 0

`causal_conv1d_silu_ref` is exactly what the Mamba block computed with `nn.Conv1d` (pad K - 1 on
both sides, keep the first L outputs). `causal_conv1d_silu` runs the fused Numba kernel
(`causal_conv1d_cpu`) on CPU tensors where Numba imports, else the reference: K shifted
multiply-adds and the SiLU in one pass, and one pass back, instead of `nn.Conv1d`'s CPU backward,
which cost as much as all the matrix multiplies of a training step.
"""

from __future__ import annotations

import functools

import torch

from echomamba_dist.ops.reference import causal_conv1d_silu_ref


@functools.lru_cache(maxsize=None)
def _cpu_conv_fn():
    """The fused CPU kernel, or None when it (or Numba) is not available."""
    try:
        from echomamba_dist.ops.causal_conv1d_cpu import causal_conv1d_silu_cpu
    except Exception:
        return None
    return causal_conv1d_silu_cpu


@torch.compiler.disable  # an opaque kernel for torch.compile, as the selective scan
def causal_conv1d_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """SiLU(depthwise causal conv1d): the fused CPU kernel where it runs, else the reference.

    Same contract as `causal_conv1d_silu_ref` (see the module docstring for shapes).
    """
    fn = _cpu_conv_fn() if x.device.type == "cpu" else None
    if fn is None:
        return causal_conv1d_silu_ref(x, weight, bias)
    return fn(x, weight, bias)
