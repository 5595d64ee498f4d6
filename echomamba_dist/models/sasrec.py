"""SASRec (Kang & McAuley, 2018): causal self-attention over item + position embeddings.

    item_seq (B, L)
      -> item embedding + learned position embedding, LayerNorm, Dropout
      -> num_layers x [LayerNorm(x + Dropout(causal SelfAttention(x))), position-wise FFN]
      -> (B, L, H); scores = states @ item_embedding.T

Causal, so it trains on all positions at once (target[t] = item t + 1). With right padding and
the causal mask a real position only attends to earlier real positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from echomamba_dist.models.base import (
    SequentialRecommender,
    TransformerConfig,
    init_weights,
    padding_mask,
)
from echomamba_dist.models.layers import PointWiseFeedForward, SelfAttention


@dataclass(kw_only=True)
class SASRecConfig(TransformerConfig):
    """SASRec with the paper's shared settings (H = 64, dropout 0.2).

    Fields (base.TransformerConfig): hidden_size, num_layers, num_heads, inner_size, dropout,
    attn_dropout, max_len (positions with a learned embedding, the longest input).
    """

    name: str = "sasrec"


class SASRec(SequentialRecommender):
    """SASRec; `forward_all -> (B, L, H)`, `forward -> (B, H)`. Trains on all positions."""

    sample_mode = "all_positions"
    supported_samples = ("all_positions", "prefix")

    def __init__(self, n_items: int, config: SASRecConfig | None = None) -> None:
        config = config or SASRecConfig()
        super().__init__(n_items, config, hidden_size=config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_len, config.hidden_size)
        self.embedding_norm = nn.LayerNorm(config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.attention = nn.ModuleList(
            SelfAttention(
                config.hidden_size,
                config.num_heads,
                dropout=config.dropout,
                attn_dropout=config.attn_dropout,
                causal=True,
            )
            for _ in range(config.num_layers)
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
