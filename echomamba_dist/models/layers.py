"""Position-wise and sequence sublayers shared by the models: FFT filter, GLU, feed-forward,
multi-head self-attention and the Transformer block (attention + feed-forward)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The longest input FrequencyFilter filters as a matrix product (fast_path): on one CPU thread,
# at batch 2048 and H = 64, forward + backward cost the same as the FFTs at about L = 36.
CIRCULANT_MAX_LEN = 32


class FrequencyFilter(nn.Module):
    """Learnable global filter in the frequency domain (EchoMamba4Rec §3.5, eqs. 6-9).

    y = LayerNorm(x + Dropout(irfft(K * rfft(x)))), the FFT taken along the sequence over a fixed
    `max_len` points: the (B, L, H) input is zero-extended to max_len, so a sequence's output does
    not depend on how much padding its batch has (the caller zeroes padded positions first).
    Positions mix in both directions: models using this train on prefix samples.

    Parameters: `weight` (max_len // 2 + 1, H, 2), the complex filter K as (real, imag),
    initialised ~ N(0, init_scale) here (`_owns_init`); `norm` (LayerNorm).
    `lowpass` in (0, 1] keeps only the lowest ceil(lowpass * n_freq) frequencies (None: all).

    The filter is a circular convolution over max_len points with the real kernel
    k = irfft(K): y_t = sum_s k[(t - s) mod max_len] x_s. With `fast_path` (default), inputs up
    to CIRCULANT_MAX_LEN positions are filtered as that (L, L) matrix product, whose cost
    follows L^2, instead of the FFTs over max_len points, whose cost does not shrink with L
    (most training batches are a few positions wide); the same result either way.
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
        fast_path: bool = True,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.fast_path = fast_path
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
        kernel = torch.view_as_complex(self.weight.to(compute).contiguous()) * self.band  # (F, H)
        if self.fast_path and length <= CIRCULANT_MAX_LEN:
            # irfft's own (1/n) normalisation is the two "ortho" factors of the FFT path together
            k = torch.fft.irfft(kernel, n=self.max_len, dim=0)  # (max_len, H)
            t = torch.arange(length, device=x.device)
            circulant = k[(t[:, None] - t[None, :]) % self.max_len]  # (L, L, H): [t, s]
            filtered = torch.einsum("tsh,bsh->bth", circulant, x.to(compute))  # (B, L, H)
            # Dropout draws its mask in the memory order of its input. irfft along dim 1 returns
            # (B, H, L)-ordered memory, so the same layout here draws the FFT path's mask
            # (tests/models/test_models.py trains both paths and compares the losses).
            filtered = filtered.transpose(1, 2).contiguous().transpose(1, 2)
        else:
            spectrum = torch.fft.rfft(x.to(compute), n=self.max_len, dim=1, norm="ortho")  # (B, F, H)
            filtered = torch.fft.irfft(spectrum * kernel, n=self.max_len, dim=1, norm="ortho")
            filtered = filtered[:, :length]  # (B, L, H)
        return self.norm(x + self.dropout(filtered.to(x.dtype)))


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


class ResidualGLU(nn.Module):
    """LayerNorm(x + Dropout(W3 GLU(x))), the GLU block of the authors' released code (the paper's
    eq. 19 has GLU(x) alone); H -> H. LayerNorm eps 1e-12, as there."""

    def __init__(self, hidden_size: int, *, dropout: float) -> None:
        super().__init__()
        self.glu = GatedLinearUnit(hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., H)."""
        return self.norm(x + self.dropout(self.out(self.glu(x))))


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


class SelfAttention(nn.Module):
    """LayerNorm(x + Dropout(out(softmax(QK^T / sqrt(d) + mask) V))); (B, L, H) -> (B, L, H).

    `causal=True` (SASRec): position t attends to positions <= t; with right padding a real
    position never sees padding, and `key_mask` is not used. `causal=False` (BERT4Rec, the
    Transformer block): both directions over the keys that `key_mask` (B, L) bool marks real;
    padding keys get exactly zero weight, so a real position's output does not depend on the
    padding.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        dropout: float,
        attn_dropout: float,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.causal = causal
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, H), key mask (B, L) bool (True = real; None when causal) -> (B, L, H)."""
        if self.causal != (key_mask is None):
            raise ValueError("SelfAttention: pass key_mask exactly when causal=False")
        batch, length, hidden = x.shape
        q, k, v = (
            proj(x).view(batch, length, self.num_heads, -1).transpose(1, 2)  # (B, nh, L, dh)
            for proj in (self.query, self.key, self.value)
        )
        attended = F.scaled_dot_product_attention(
            q,
            k,
            v,
            # (B, 1, 1, L): every query sees the real keys
            attn_mask=None if key_mask is None else key_mask[:, None, None, :],
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=self.causal,
        )  # (B, nh, L, dh)
        attended = attended.transpose(1, 2).reshape(batch, length, hidden)  # (B, L, H)
        return self.norm(x + self.dropout(self.out(attended)))


class TransformerBlock(nn.Module):
    """Bidirectional self-attention, then the position-wise FFN; padding zeroed before each.

    BERT4Rec's block, also Bi-Mambaformer4Rec's. (B, L, H), key mask (B, L) bool -> (B, L, H).
    """

    def __init__(
        self, hidden_size: int, num_heads: int, inner_size: int, *, dropout: float, attn_dropout: float
    ) -> None:
        super().__init__()
        self.attention = SelfAttention(
            hidden_size, num_heads, dropout=dropout, attn_dropout=attn_dropout
        )
        self.ffn = PointWiseFeedForward(hidden_size, inner_size, dropout=dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H), (B, L) bool -> (B, L, H)."""
        mask = key_mask[:, :, None].to(x.dtype)  # (B, L, 1)
        x = self.attention(x * mask, key_mask)
        return self.ffn(x * mask)
