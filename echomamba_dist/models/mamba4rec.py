"""Mamba4Rec (Liu et al., 2024): causal Mamba layers over item embeddings.

    item_seq (B, L)
      -> item embedding, Dropout, LayerNorm
      -> num_layers x MambaLayer:
           h = LayerNorm(Dropout(Mamba(x)) + x)   (without the residual when num_layers == 1,
                                                   as in Mamba4Rec's paper and code)
           position-wise FFN: LayerNorm(h + Dropout(W2 Dropout(GELU(W1 h))))
      -> (B, L, H); scores = states @ item_embedding.T

Causal, so all-positions training is exact for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from echomamba_dist.models.base import (
    MambaStackConfig,
    NormedEmbeddingRecommender,
    init_weights,
    padding_mask,
)
from echomamba_dist.models.layers import PointWiseFeedForward
from echomamba_dist.models.mamba import mamba_from_config


@dataclass(kw_only=True)
class Mamba4RecConfig(MambaStackConfig):
    """Mamba4Rec with its paper's settings (H = 64, N = 32, K = 4, E = 2, one layer).

    Fields (base.MambaStackConfig): hidden_size, num_layers (Mamba layers), d_state, d_conv,
    expand, dropout, ffn_inner_size, scan_backend.
    """

    name: str = "mamba4rec"


class MambaLayer(nn.Module):
    """Mamba block with dropout, (residual,) LayerNorm, then the FFN; (B, L, H) -> (B, L, H)."""

    def __init__(self, config: Mamba4RecConfig) -> None:
        super().__init__()
        self.mamba = mamba_from_config(config)
        self.residual = config.num_layers > 1
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.hidden_size)
        self.ffn = PointWiseFeedForward(
            config.hidden_size, config.ffn_inner_size, dropout=config.dropout
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H), mask (B, L, 1) -> (B, L, H)."""
        x = x * mask
        hidden = self.dropout(self.mamba(x))  # (B, L, H)
        hidden = self.norm(hidden + x if self.residual else hidden)
        return self.ffn(hidden * mask)


class Mamba4Rec(NormedEmbeddingRecommender):
    """Mamba4Rec; `forward_all -> (B, L, H)`, `forward -> (B, H)`. Trains on all positions."""

    sample_mode = "all_positions"
    supported_samples = ("all_positions", "prefix")

    def __init__(self, n_items: int, config: Mamba4RecConfig | None = None) -> None:
        config = config or Mamba4RecConfig()
        super().__init__(n_items, config)  # item_embedding, embedding_dropout, embedding_norm
        self.layers = nn.ModuleList(MambaLayer(config) for _ in range(config.num_layers))
        init_weights(self)

    def forward_all(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded items, (B,) lengths -> (B, L, H)."""
        mask = padding_mask(seq_len, item_seq.shape[1])[:, :, None]  # (B, L, 1)
        x = self.embed(item_seq)  # (B, L, H)
        for layer in self.layers:
            x = layer(x, mask)  # (B, L, H)
        return x
