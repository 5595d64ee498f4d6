"""GRU4Rec (Hidasi et al., 2016, in RecBole's form): a GRU over item embeddings.

    item_seq (B, L) -> item embedding, Dropout -> GRU (num_layers, no bias) -> Linear -> (B, L, H)

Causal, so it trains on all positions at once. With right padding a real position never sees
padding; no sequence packing is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from echomamba_dist.models.base import (
    SequentialRecommender,
    check_dropout,
    check_min,
    init_weights,
    padding_mask,
)


@dataclass(kw_only=True)
class GRU4RecConfig:
    """GRU4Rec with the paper's shared settings (embedding 64, dropout 0.2)."""

    name: str = "gru4rec"
    hidden_size: int = 64  # item embedding size H (the model's output size)
    gru_size: int = 64  # GRU hidden state size
    num_layers: int = 1  # stacked GRU layers
    dropout: float = 0.2  # dropout on the item embeddings

    def __post_init__(self) -> None:
        check_min(self, "hidden_size", "gru_size", "num_layers")
        check_dropout(self, "dropout")


class GRU4Rec(SequentialRecommender):
    """GRU4Rec; `forward_all -> (B, L, H)`, `forward -> (B, H)`. Trains on all positions."""

    sample_mode = "all_positions"
    supported_samples = ("all_positions", "prefix")

    def __init__(self, n_items: int, config: GRU4RecConfig | None = None) -> None:
        config = config or GRU4RecConfig()
        super().__init__(n_items, config, hidden_size=config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(
            config.hidden_size, config.gru_size, config.num_layers, bias=False, batch_first=True
        )
        self.dense = nn.Linear(config.gru_size, config.hidden_size)
        init_weights(self)

    def forward_all(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded items, (B,) lengths -> (B, L, H)."""
        mask = padding_mask(seq_len, item_seq.shape[1])[:, :, None]  # (B, L, 1)
        x = self.embedding_dropout(self.item_embedding(item_seq)) * mask  # (B, L, H)
        states, _ = self.gru(x)  # (B, L, gru_size)
        return self.dense(states)  # (B, L, H)
