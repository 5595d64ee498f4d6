"""SASRec (Kang & McAuley, 2018): causal self-attention over item + position embeddings.

    item_seq (B, L)
      -> item embedding + learned position embedding, LayerNorm, Dropout
      -> num_layers x [LayerNorm(x + Dropout(CausalSelfAttention(x))), position-wise FFN]
      -> (B, L, H); scores = states @ item_embedding.T

Causal, so it trains on all positions at once (target[t] = item t + 1). With right padding and
the causal mask a real position only attends to earlier real positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from echomamba_dist.config import ConfigError
from echomamba_dist.models.base import SequentialRecommender, init_weights, padding_mask
from echomamba_dist.models.layers import PointWiseFeedForward


@dataclass(kw_only=True)
class SASRecConfig:
    """SASRec with the paper's shared settings (H = 64, dropout 0.2)."""

    name: str = "sasrec"
    hidden_size: int = 64  # embedding and model dimension H
    num_layers: int = 2  # transformer blocks
    num_heads: int = 2  # attention heads; must divide hidden_size
    inner_size: int = 256  # feed-forward inner width
    dropout: float = 0.2  # dropout on embeddings and residual branches
    attn_dropout: float = 0.2  # dropout on attention probabilities
    max_len: int = 50  # positions with a learned embedding (the longest input)

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "inner_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"num_heads: {self.num_heads} does not divide hidden_size={self.hidden_size}"
            )
        for key in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.max_len < 2:
            raise ConfigError(f"max_len: must be >= 2, got {self.max_len}")


class CausalSelfAttention(nn.Module):
    """LayerNorm(x + Dropout(out(softmax(QK^T / sqrt(d) + causal) V))); (B, L, H) -> (B, L, H)."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.attn_dropout = config.attn_dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = (
            proj(x).view(batch, length, self.num_heads, -1).transpose(1, 2)  # (B, nh, L, dh)
            for proj in (self.query, self.key, self.value)
        )
        attended = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.attn_dropout if self.training else 0.0
        )  # (B, nh, L, dh)
        attended = attended.transpose(1, 2).reshape(batch, length, hidden)  # (B, L, H)
        return self.norm(x + self.dropout(self.out(attended)))


class SASRec(SequentialRecommender):
    """SASRec; `forward_all -> (B, L, H)`, `forward -> (B, H)`. Trains on all positions."""

    sample_mode = "all_positions"

    def __init__(self, n_items: int, config: SASRecConfig | None = None) -> None:
        config = config or SASRecConfig()
        super().__init__(n_items, config, hidden_size=config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_len, config.hidden_size)
        self.embedding_norm = nn.LayerNorm(config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.attention = nn.ModuleList(
            CausalSelfAttention(config) for _ in range(config.num_layers)
        )
        self.ffn = nn.ModuleList(
            PointWiseFeedForward(config.hidden_size, config.inner_size, dropout=config.dropout)
            for _ in range(config.num_layers)
        )
        init_weights(self)

    def forward_all(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded items, (B,) lengths -> (B, L, H)."""
        length = item_seq.shape[1]
        if length > self.config.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.config.max_len}")
        mask = padding_mask(seq_len, length)[:, :, None]  # (B, L, 1)
        positions = torch.arange(length, device=item_seq.device)  # (L,)
        x = self.item_embedding(item_seq) + self.position_embedding(positions)[None]  # (B, L, H)
        x = self.embedding_dropout(self.embedding_norm(x))
        for attention, ffn in zip(self.attention, self.ffn):
            x = attention(x * mask)  # (B, L, H)
            x = ffn(x * mask)  # (B, L, H)
        return x
