"""The Mamba (v1) block, parameter for parameter the same as `mamba_ssm.Mamba`.

Same constructor keywords, defaults, parameter names, shapes, initialisation and math, so a
`state_dict` saved by one loads into the other with `strict=True` and gives the same outputs:

    in_proj.weight   (2 * d_inner, d_model)        [+ in_proj.bias when bias=True]
    conv1d.weight    (d_inner, 1, d_conv)          depthwise, causal
    conv1d.bias      (d_inner,)                    when conv_bias=True (default)
    x_proj.weight    (dt_rank + 2 * d_state, d_inner)
    dt_proj.weight   (d_inner, dt_rank)
    dt_proj.bias     (d_inner,)                    inverse-softplus of dt in [dt_min, dt_max]
    A_log            (d_inner, d_state)            S4D-real: log(1..d_state) on every row
    D                (d_inner,)                    ones
    out_proj.weight  (d_model, d_inner)            [+ out_proj.bias when bias=True]

with d_inner = expand * d_model and dt_rank = ceil(d_model / 16) when "auto".

The selective scan runs through `echomamba_dist.ops.selective_scan` (backends reference, cpu,
cuda); the depthwise causal convolution uses causal-conv1d's kernel on the `cuda` backend when
that package imports, else `nn.Conv1d`. Neither mamba-ssm nor causal-conv1d is imported before a
CUDA forward asks for them.

`use_fast_path` (True by default, as in mamba_ssm) picks, off the `cuda` backend, the
channel-last path: the (B, L, .) tensors from `in_proj` to `out_proj` are never transposed into
copies, and the convolution + SiLU is `ops.causal_conv1d.causal_conv1d_silu` (a fused CPU
kernel: `nn.Conv1d`'s CPU backward cost as much as all the matrix multiplies of a step). Same
math, same parameters; False keeps the channel-first path with `nn.Conv1d`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from echomamba_dist.ops.causal_conv1d import causal_conv1d_silu
from echomamba_dist.ops.selective_scan import Backend, resolve_backend, selective_scan


class Mamba(nn.Module):
    """One Mamba block: (B, L, d_model) -> (B, L, d_model), causal along L.

    Args mirror `mamba_ssm.Mamba` (`layer_idx`, `device`, `dtype` are accepted for signature
    compatibility; `layer_idx` has no effect here). `use_fast_path`: the channel-last path with
    the fused conv off the `cuda` backend (module docstring); the same outputs either way.
    `scan_backend` (keyword-only) picks the selective-scan backend: auto, reference, cpu or cuda.

    Initialisation happens here, as in mamba_ssm; `models.base.init_weights` leaves this
    module alone (`_owns_init`). `A_log` and `D` carry `_no_weight_decay = True`.
    """

    _owns_init = True

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
        *,
        scan_backend: Backend = "auto",
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=d_conv,
            groups=self.d_inner,  # depthwise
            padding=d_conv - 1,  # pad both sides, keep the first L outputs: causal
            bias=conv_bias,
            **factory,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)

        # dt_proj.weight: keeps the variance of dt at initialisation independent of dt_rank.
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise NotImplementedError(f"dt_init must be 'constant' or 'random', got {dt_init!r}")

        # dt_proj.bias: softplus(bias) = dt, with dt log-uniform in [dt_min, dt_max].
        dt = torch.exp(
            torch.rand(self.d_inner, **factory) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        inv_softplus_dt = dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt)
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_softplus_dt)
        self.dt_proj.bias._no_reinit = True

        # S4D-real: A = -(1, 2, ..., d_state) on every channel, stored as log(-A).
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device)
        A = A.repeat(self.d_inner, 1).contiguous()  # (d_inner, d_state)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(
        self, hidden_states: torch.Tensor, *, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L, d_model) -> (B, L, d_model); the output at t depends on inputs 0..t only.

        `positions` (B,) long: only the output at positions[b] of each row, (B, d_model); the
        scan still runs over all L, but `out_proj` sees B rows instead of B * L.
        """
        backend = resolve_backend(self.scan_backend, hidden_states.device)
        if self.use_fast_path and backend != "cuda":
            y = self._mix_channel_last(hidden_states, backend)  # (B, L, d_inner)
        else:
            y = self._mix(hidden_states, backend).transpose(1, 2)  # (B, L, d_inner)
        if positions is not None:
            y = y[torch.arange(y.shape[0], device=y.device), positions]  # (B, d_inner)
        return self.out_proj(y)  # (B, L, d_model) or (B, d_model)

    def _scan_args(self) -> dict[str, Any]:
        # dt_proj's bias is not added to dt: the scan adds it before the softplus (delta_bias).
        return {
            "A": -torch.exp(self.A_log.float()),  # (d_inner, d_state)
            "D": self.D.float(),
            "delta_bias": self.dt_proj.bias.float(),
            "delta_softplus": True,
        }

    def _mix(self, hidden_states: torch.Tensor, backend: str) -> torch.Tensor:
        """Channel-first: (B, L, d_model) -> scan output (B, d_inner, L)."""
        length = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2 * d_inner, L)
        x, z = xz.chunk(2, dim=1)  # (B, d_inner, L) each
        x = self._causal_conv_silu(x, length, backend)  # (B, d_inner, L)

        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2 * d_state)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, d_inner, L)
        B = B.transpose(1, 2).contiguous()  # (B, d_state, L)
        C = C.transpose(1, 2).contiguous()  # (B, d_state, L)
        return selective_scan(x, dt, B=B, C=C, z=z, backend=backend, **self._scan_args())

    def _mix_channel_last(self, hidden_states: torch.Tensor, backend: str) -> torch.Tensor:
        """Channel-last, no copies: (B, L, d_model) -> scan output (B, L, d_inner).

        The scan takes (B, D, L)-shaped arguments; they are transposed views of (B, L, .)
        memory here, which the CPU kernel reads in place, and its output comes back the same way.
        """
        xz = self.in_proj(hidden_states)  # (B, L, 2 * d_inner)
        x, z = xz.chunk(2, dim=-1)  # (B, L, d_inner) views
        weight = self.conv1d.weight[:, 0]  # (d_inner, d_conv)
        x = causal_conv1d_silu(x, weight, self.conv1d.bias)  # (B, L, d_inner)

        x_dbl = self.x_proj(x)  # (B, L, dt_rank + 2 * d_state)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt @ self.dt_proj.weight.t()  # (B, L, d_inner)
        y = selective_scan(
            x.transpose(1, 2),
            dt.transpose(1, 2),
            B=B.transpose(1, 2),  # (B, d_state, L) views of (B, L, d_state)
            C=C.transpose(1, 2),
            z=z.transpose(1, 2),
            backend=backend,
            **self._scan_args(),
        )  # (B, d_inner, L)
        return y.transpose(1, 2)  # (B, L, d_inner)

    def _causal_conv_silu(self, x: torch.Tensor, length: int, backend: str) -> torch.Tensor:
        """SiLU(depthwise causal conv1d(x)): (B, d_inner, L) -> (B, d_inner, L)."""
        conv_fn = _causal_conv1d_fn() if backend == "cuda" else None
        if conv_fn is not None:
            weight = self.conv1d.weight.squeeze(1)  # (d_inner, d_conv)
            return conv_fn(x.contiguous(), weight, self.conv1d.bias, activation="silu")
        return F.silu(self.conv1d(x)[..., :length])


@functools.lru_cache(maxsize=None)
def _causal_conv1d_fn():
    """causal-conv1d's fused kernel, or None when the package does not import."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # ImportError, or a broken CUDA build
        return None
    return causal_conv1d_fn


def load_cuda_mamba() -> type | None:
    """`mamba_ssm.Mamba` when mamba-ssm imports (for equivalence tests), else None."""
    try:
        from mamba_ssm import Mamba as CudaMamba
    except Exception:
        return None
    return CudaMamba


def set_scan_backend(module: nn.Module, backend: Backend) -> None:
    """Set the selective-scan backend of every Mamba block inside `module`."""
    for m in module.modules():
        if isinstance(m, Mamba):
            m.scan_backend = backend


def mamba_from_config(config: Any) -> Mamba:
    """A Mamba block of width `config.hidden_size` with the config's d_state, d_conv, expand,
    scan_backend and `fast_path` (as use_fast_path; True where the config has none), the other
    arguments at mamba_ssm's defaults."""
    return Mamba(
        d_model=config.hidden_size,
        d_state=config.d_state,
        d_conv=config.d_conv,
        expand=config.expand,
        use_fast_path=getattr(config, "fast_path", True),
        scan_backend=config.scan_backend,
    )
