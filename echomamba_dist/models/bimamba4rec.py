"""Bi-Mamba4Rec (EchoMamba4Rec's paper, Fig. 3, after Bi-Mamba4TS): forward and backward Mamba.

    item_seq (B, L)
      -> item embedding, Dropout, LayerNorm
      -> num_layers x layer:
           forward  Mamba: f = LayerNorm_f(x + Dropout(Mamba_f(x)))
           backward Mamba: b = LayerNorm_b(x + Dropout(rev(Mamba_b(rev(x)))))
           h = f + b, then the position-wise FFN: LayerNorm(h + Dropout(W2 Dropout(GELU(W1 h))))
      -> the last real position (B, H); scores = state @ item_embedding.T

This is EchoMamba4Rec's layer without the FFT filter and without the GLU, with the FFN on: the
layer is `EchoMambaLayer` itself, built from that configuration, so the two models differ in
exactly those two parts. `rev` reverses each sequence within its length (`reverse_by_length`).
The backward direction looks at later positions, so the model trains on prefix samples.
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
from echomamba_dist.models.echomamba4rec import (
    EchoMamba4RecConfig,
    EchoMambaLayer,
    read_out,
)


@dataclass(kw_only=True)
class BiMamba4RecConfig(MambaStackConfig):
    """Bi-Mamba4Rec with the shared settings (H = 64, dropout 0.2) and Mamba4Rec's SSM sizes.

    Fields (base.MambaStackConfig, as Mamba4RecConfig): hidden_size, num_layers (bidirectional
    layers), d_state, d_conv, expand, dropout, ffn_inner_size, scan_backend.
    """

    name: str = "bimamba4rec"


def bidirectional_layer_config(config, *, ffn_inner_size: int | None) -> EchoMamba4RecConfig:
    """The EchoMamba4Rec layer settings of a plain bidirectional Mamba layer: no filter, no GLU.

    Args:
        config: any config with hidden_size, d_state, d_conv, expand, dropout and scan_backend.
        ffn_inner_size: the layer ends in a position-wise FFN of this inner width; None: no FFN.
    """
    return EchoMamba4RecConfig(
        hidden_size=config.hidden_size,
        d_state=config.d_state,
        d_conv=config.d_conv,
        expand=config.expand,
        dropout=config.dropout,
        scan_backend=config.scan_backend,
        filter=False,
        glu=False,
        bidirectional=True,
        combine="sum",
        ffn=ffn_inner_size is not None,
        ffn_inner_size=ffn_inner_size or 1,  # unused without the FFN
    )


class BiMamba4Rec(NormedEmbeddingRecommender):
    """Bi-Mamba4Rec; `forward(item_seq, seq_len) -> (B, H)`. Trains on prefix samples."""

    sample_mode = "prefix"

    def __init__(self, n_items: int, config: BiMamba4RecConfig | None = None) -> None:
        config = config or BiMamba4RecConfig()
        super().__init__(n_items, config)  # item_embedding, embedding_dropout, embedding_norm
        layer_config = bidirectional_layer_config(config, ffn_inner_size=config.ffn_inner_size)
        self.layers = nn.ModuleList(EchoMambaLayer(layer_config) for _ in range(config.num_layers))
        init_weights(self)

    def forward(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded items, (B,) lengths -> (B, H)."""
        mask = padding_mask(seq_len, item_seq.shape[1])[:, :, None]  # (B, L, 1)
        x = self.embed(item_seq)  # (B, L, H)
        return read_out(self.layers, x, seq_len, mask, readout="last")  # (B, H)
