"""NARM (Li et al., 2017): a GRU encoder with a global and an attentive local encoder.

    item_seq (B, L)
      -> item embedding, Dropout
      -> GRU (num_layers) -> hidden states h_1..h_n (B, L, G)
      -> global encoder c_g = h_n                                   (the last real position)
         local  encoder c_l = sum_j alpha_nj h_j,
                        alpha_nj = v^T sigmoid(A_1 h_n + A_2 h_j)   (over real positions only)
      -> c = Dropout([c_g; c_l]) (B, 2G)
      -> bilinear decoder: score(i) = e_i^T B c, so forward returns B c (B, H)

As in NARM's paper, the attention weights are not normalised (no softmax). The local encoder
reads the whole history, and the state that predicts item t + 1 attends with the query h_t, so
one forward pass cannot serve every position: NARM trains on prefix samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from echomamba_dist.models.base import (
    SequentialRecommender,
    check_dropout,
    check_min,
    gather_last,
    init_weights,
    padding_mask,
)


@dataclass(kw_only=True)
class NARMConfig:
    """NARM with the paper's shared settings (embedding 64, dropout 0.2)."""

    name: str = "narm"
    hidden_size: int = 64  # item embedding size H (the model's output size)
    gru_size: int = 64  # GRU hidden state size G (NARM's |H|)
    num_layers: int = 1  # stacked GRU layers
    dropout: float = 0.2  # dropout on the item embeddings
    session_dropout: float = 0.2  # dropout on [c_g; c_l] before the bilinear decoder

    def __post_init__(self) -> None:
        check_min(self, "hidden_size", "gru_size", "num_layers")
        check_dropout(self, "dropout", "session_dropout")


class NARM(SequentialRecommender):
    """NARM; `forward(item_seq, seq_len) -> (B, H)`. Trains on prefix samples."""

    sample_mode = "prefix"

    def __init__(self, n_items: int, config: NARMConfig | None = None) -> None:
        config = config or NARMConfig()
        super().__init__(n_items, config, hidden_size=config.hidden_size)
        gru = config.gru_size
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(config.hidden_size, gru, config.num_layers, bias=False, batch_first=True)
        self.a_1 = nn.Linear(gru, gru, bias=False)  # applied to the query h_n
        self.a_2 = nn.Linear(gru, gru, bias=False)  # applied to every h_j
        self.v = nn.Linear(gru, 1, bias=False)
        self.session_dropout = nn.Dropout(config.session_dropout)
        self.decoder = nn.Linear(2 * gru, config.hidden_size, bias=False)  # B: 2G -> H
        init_weights(self)

    def forward(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded items, (B,) lengths -> (B, H)."""
        mask = padding_mask(seq_len, item_seq.shape[1])[:, :, None]  # (B, L, 1)
        x = self.embedding_dropout(self.item_embedding(item_seq)) * mask  # (B, L, H)
        states, _ = self.gru(x)  # (B, L, G); right padding never reaches a real position
        states = states * mask
        global_state = gather_last(states, seq_len)  # (B, G) c_g
        scores = self.v(torch.sigmoid(self.a_1(global_state)[:, None] + self.a_2(states)))  # (B, L, 1)
        local_state = (scores * mask * states).sum(dim=1)  # (B, G) c_l
        session = self.session_dropout(torch.cat([global_state, local_state], dim=-1))  # (B, 2G)
        return self.decoder(session)  # (B, H)
