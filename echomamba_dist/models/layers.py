"""Position-wise and sequence sublayers shared by the models: FFT filter, GLU, feed-forward."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FrequencyFilter(nn.Module):
    """Learnable global filter in the frequency domain (EchoMamba4Rec §3.5, eqs. 6-9).

    y = LayerNorm(x + Dropout(irfft(K * rfft(x)))), the FFT taken along the sequence over a fixed
    `max_len` points: the (B, L, H) input is zero-extended to max_len, so a sequence's output does
    not depend on how much padding its batch has (the caller zeroes padded positions first).
    Positions mix in both directions: models using this train on prefix samples.

    Parameters: `weight` (max_len // 2 + 1, H, 2), the complex filter K as (real, imag),
    initialised ~ N(0, init_scale) here (`_owns_init`); `norm` (LayerNorm).
    `lowpass` in (0, 1] keeps only the lowest ceil(lowpass * n_freq) frequencies (None: all).
    """

    _owns_init = True

    def __init__(
        self,
        hidden_size: int,
        max_len: int,
        *,
        dropout: float,
        init_scale: float = 0.02,
        lowpass: float | None = None,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        n_freq = max_len // 2 + 1
        self.weight = nn.Parameter(torch.randn(n_freq, hidden_size, 2) * init_scale)
        keep = n_freq if lowpass is None else max(1, math.ceil(lowpass * n_freq))
        band = (torch.arange(n_freq) < keep).float()[:, None]  # (F, 1)
        self.register_buffer("band", band, persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, H) with L <= max_len -> (B, L, H)."""
        length = x.shape[1]
        if length > self.max_len:
            raise ValueError(
                f"sequence length {length} exceeds the filter's max_len {self.max_len}"
            )
        compute = torch.promote_types(x.dtype, torch.float32)  # no FFT in bf16
        spectrum = torch.fft.rfft(x.to(compute), n=self.max_len, dim=1, norm="ortho")  # (B, F, H)
        kernel = torch.view_as_complex(self.weight.to(compute).contiguous()) * self.band  # (F, H)
        filtered = torch.fft.irfft(spectrum * kernel, n=self.max_len, dim=1, norm="ortho")
        filtered = filtered[:, :length].to(x.dtype)  # (B, L, H)
        return self.norm(x + self.dropout(filtered))


class GatedLinearUnit(nn.Module):
    """GLU(x) = (x W1 + b1) * sigmoid(x W2 + b2) (EchoMamba4Rec eqs. 10 and 19); H -> H.

    W1 and W2 are the two halves of one Linear `proj` (H -> 2H).
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 2 * hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., H)."""
        return F.glu(self.proj(x), dim=-1)


class PointWiseFeedForward(nn.Module):
    """LayerNorm(x + Dropout(W2 Dropout(GELU(W1 x)))), as in SASRec and Mamba4Rec; H -> H."""

    def __init__(self, hidden_size: int, inner_size: int, *, dropout: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(hidden_size, inner_size)
        self.w_2 = nn.Linear(inner_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., H)."""
        hidden = self.dropout(F.gelu(self.w_1(x)))  # (..., inner)
        return self.norm(x + self.dropout(self.w_2(hidden)))
