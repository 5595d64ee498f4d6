"""Bi-Mambaformer4Rec (EchoMamba4Rec's paper, Fig. 4, after Bi-Mamba4TS and Mambaformer).

    item_seq (B, L)
      -> item embedding, Dropout, LayerNorm
      -> num_layers x:
           bidirectional Mamba: LayerNorm_f(x + Dropout(Mamba_f(x)))
                              + LayerNorm_b(x + Dropout(rev(Mamba_b(rev(x)))))
           Transformer block:  LayerNorm(x + Dropout(SelfAttention(x))), position-wise FFN
                               (attention in both directions over the real positions)
      -> the last real position (B, H); scores = state @ item_embedding.T

As in Mambaformer, the Mamba layer carries the order of the sequence, so there is no position
embedding. The bidirectional Mamba is `EchoMambaLayer` without filter, GLU and FFN (the FFN
comes in the Transformer block); the Transformer block is BERT4Rec's, `layers.TransformerBlock`.
Both look at later positions, so the model trains on prefix samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from echomamba_dist.models.base import (
    NormedEmbeddingRecommender,
    check_dropout,
    check_min,
    check_num_heads,
    check_scan_backend,
    gather_last,
    init_weights,
    padding_mask,
)
from echomamba_dist.models.bimamba4rec import bidirectional_layer_config
from echomamba_dist.models.echomamba4rec import EchoMambaLayer
from echomamba_dist.models.layers import TransformerBlock


@dataclass(kw_only=True)
class BiMambaformer4RecConfig:
    """Bi-Mambaformer4Rec with the shared settings (H = 64, dropout 0.2)."""

    name: str = "bimambaformer4rec"
    hidden_size: int = 64  # embedding and model dimension H
    num_layers: int = 1  # (bidirectional Mamba, Transformer block) pairs
    d_state: int = 32  # SSM state size N
    d_conv: int = 4  # causal depthwise convolution kernel K
    expand: int = 2  # Mamba inner width E * H
    num_heads: int = 2  # attention heads; must divide hidden_size
    inner_size: int = 256  # Transformer feed-forward inner width (4 * H)
    dropout: float = 0.2  # dropout on embeddings and residual branches
    attn_dropout: float = 0.2  # dropout on attention probabilities
    scan_backend: Literal["auto", "reference", "cpu", "cuda"] = "auto"  # selective-scan kernels

    def __post_init__(self) -> None:
        sizes = ("hidden_size", "num_layers", "d_state", "d_conv", "expand", "num_heads", "inner_size")
        check_min(self, *sizes)
        check_num_heads(self)
        check_dropout(self, "dropout", "attn_dropout")
        check_scan_backend(self)


class BiMambaformer4Rec(NormedEmbeddingRecommender):
    """Bi-Mambaformer4Rec; `forward(item_seq, seq_len) -> (B, H)`. Trains on prefix samples."""

    sample_mode = "prefix"

    def __init__(self, n_items: int, config: BiMambaformer4RecConfig | None = None) -> None:
        config = config or BiMambaformer4RecConfig()
        super().__init__(n_items, config)  # item_embedding, embedding_dropout, embedding_norm
        mamba_config = bidirectional_layer_config(config, ffn_inner_size=None)
        self.mamba_layers = nn.ModuleList(
            EchoMambaLayer(mamba_config) for _ in range(config.num_layers)
        )
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(
                config.hidden_size,
                config.num_heads,
                config.inner_size,
                dropout=config.dropout,
                attn_dropout=config.attn_dropout,
            )
            for _ in range(config.num_layers)
        )
        init_weights(self)

    def forward(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded items, (B,) lengths -> (B, H)."""
        key_mask = padding_mask(seq_len, item_seq.shape[1])  # (B, L)
        mask = key_mask[:, :, None]  # (B, L, 1)
        x = self.embed(item_seq)  # (B, L, H)
        for mamba, block in zip(self.mamba_layers, self.transformer_blocks):
            x = mamba(x, seq_len, mask)  # (B, L, H)
            x = block(x, key_mask)  # (B, L, H); zeroes the padding before each sublayer
        return gather_last(x, seq_len)  # (B, H)

