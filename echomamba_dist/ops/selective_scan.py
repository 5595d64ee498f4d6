"""The selective scan of Mamba (S6), behind one function with several backends.

Shapes follow `mamba_ssm.ops.selective_scan_interface.selective_scan_fn`, so that the CUDA kernel
is a drop-in for the reference:

    u:          (B, D, L)   input after the causal conv and SiLU
    delta:      (B, D, L)   step sizes before `delta_bias` / softplus
    A:          (D, N)      state matrix (negative reals: -exp(A_log))
    B, C:       (B, N, L)   input-dependent ("selective") projections
    D:          (D,)        skip connection
    z:          (B, D, L)   gate; the output is multiplied by SiLU(z)
    delta_bias: (D,)
    returns     (B, D, L)

Math (zero-order hold for A, Euler for B, as in the Mamba paper):
    dt_t   = softplus(delta_t + delta_bias)            if delta_softplus
    h_t    = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t   (state (B, D, N))
    y_t    = <h_t, C_t> + D * u_t
    out_t  = y_t * SiLU(z_t)

Backends:
    reference  plain PyTorch, a loop over L that keeps only the (B, D, N) state, fp32, autograd.
    cpu        a fused Numba kernel (`echomamba_dist.ops.selective_scan_cpu`), when available.
    cuda       mamba-ssm's fused kernel (CUDA tensors, mamba-ssm installed).
    auto       cuda for CUDA tensors when mamba-ssm imports; cpu for CPU tensors when the fused
               CPU kernel is available; else reference.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from echomamba_dist.ops.reference import selective_scan_ref

Backend = Literal["auto", "reference", "cpu", "cuda"]




@functools.lru_cache(maxsize=None)
def _cuda_scan_fn():
    """mamba-ssm's fused selective scan, or None when mamba-ssm is not importable."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or an OSError/RuntimeError from a broken CUDA build
        return None
    return selective_scan_fn


@functools.lru_cache(maxsize=None)
def _cpu_scan_fn():
    """The fused CPU kernel, or None when it (or Numba) is not available."""
    try:
        from echomamba_dist.ops.selective_scan_cpu import selective_scan_cpu
    except Exception:
        return None
    return selective_scan_cpu


def cuda_available() -> bool:
    """True when mamba-ssm's CUDA selective scan can be used."""
    return torch.cuda.is_available() and _cuda_scan_fn() is not None


def resolve_backend(backend: Backend, device: torch.device) -> str:
    """The concrete backend `auto` (or an explicit request) means for tensors on `device`.

    Raises:
        RuntimeError: an explicitly requested backend cannot run on this device/installation.
    """
    if backend == "auto":
        if device.type == "cuda" and _cuda_scan_fn() is not None:
            return "cuda"
        if device.type == "cpu" and _cpu_scan_fn() is not None:
            return "cpu"
        return "reference"
    if backend == "cuda":
        if device.type != "cuda" or _cuda_scan_fn() is None:
            raise RuntimeError(
                "scan_backend=cuda needs CUDA tensors and mamba-ssm (pip install "
                "--no-build-isolation 'echomamba-dist[cuda]'); use auto or reference"
            )
        return "cuda"
    if backend == "cpu":
        if device.type != "cpu" or _cpu_scan_fn() is None:
            raise RuntimeError("scan_backend=cpu needs CPU tensors and numba; use auto or reference")
        return "cpu"
    if backend == "reference":
        return "reference"
    raise ValueError(f"unknown scan backend {backend!r}; expected auto, reference, cpu or cuda")


@torch.compiler.disable  # an opaque kernel for torch.compile: tracing into Numba only breaks graphs
def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Selective scan with the chosen backend; see the module docstring for shapes and math."""
    kind = resolve_backend(backend, u.device)
    if kind == "cuda":
        fn = _cuda_scan_fn()
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if kind == "cpu":
        fn = _cpu_scan_fn()
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
