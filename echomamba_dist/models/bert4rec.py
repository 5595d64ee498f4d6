"""BERT4Rec (Sun et al., 2019): bidirectional self-attention trained to fill in masked items.

    sequence (B, L') with some items replaced by the mask token
      -> item embedding (the mask token has its own vector) + learned position embedding,
         LayerNorm, Dropout
      -> num_layers x [LayerNorm(x + Dropout(SelfAttention(x))), position-wise FFN]
         (attention in both directions over the real positions: a key-padding mask)
      -> output head at a position: GELU(W h + b)  (B, H)
      -> scores = head @ item_embedding.T + output_bias   (the paper's eq. for P(v))

Training (`loss`, the masked-item objective). Every row is rebuilt into one sequence and some
of its items are masked. By default the loop hands BERT4Rec all-positions rows
(`sample_mode = "all_positions"`: one row a user), used only to rebuild each user's whole training
sequence: input = train part[:-1] and target[t] = train part[t + 1], so the sequence is
`item_seq[:seq_len]` followed by `target[seq_len - 1]`. With `train.samples: prefix` every prefix
of a user's training items is a row (RecBole's augmentation: many more rows, so many more optimizer
steps an epoch), rebuilt as the prefix followed by its target. Which items are masked
(`masking`, drawn with torch's global generator, seeded by the loop, so runs repeat):

- "count" (the default): `max(1, round(mask_prob * n))` of the n items of the rebuilt sequence,
  chosen uniformly;
- "append": the last item (the target, where the appended mask sits at inference) always, and
  every other item independently with probability `mask_prob` (RecBole's training of BERT4Rec on
  prefix rows: the mask appended at the end plus random masking).

In both, with probability `mask_last_prob` a row masks only its last item instead, which matches
what inference asks for (the paper's extra "mask the last item" samples). The loss is the mean
cross-entropy of the original items at the masked positions over all real items.

Inference (`forward(item_seq, seq_len)`): the mask token is put at position seq_len, right after
the history, and the head reads that position. A history of `max_len` items therefore takes
max_len + 1 positions: the position embedding has max_len + 1 rows, and rebuilt training
sequences (up to max_len + 1 items with data.max_len = max_len) fit the same table.

The mask token's id in masked sequences is n_items + 1 (`mask_token`); its vector is the single
row of `mask_embedding`, so `item_embedding` keeps the n_items + 1 rows every model has.
Items after seq_len are never seen: attention masks them as keys, and every sublayer's input is
zeroed on padding. The Transformer block (`layers.TransformerBlock`) is also Bi-Mambaformer4Rec's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from echomamba_dist.errors import ConfigError
from echomamba_dist.models.base import (
    SequentialRecommender,
    TransformerConfig,
    gather_last,
    init_weights,
    item_cross_entropy,
    padding_mask,
)
from echomamba_dist.models.layers import TransformerBlock


MASKINGS = ("count", "append")  # which items of a rebuilt training sequence are masked


@dataclass(kw_only=True)
class BERT4RecConfig(TransformerConfig):
    """BERT4Rec: two layers of two heads (its paper), H = 64 and dropout 0.2 (the shared settings).

    Fields (base.TransformerConfig, as SASRecConfig): hidden_size, num_layers, num_heads,
    inner_size, dropout, attn_dropout, max_len; then the masking settings below.
    """

    name: str = "bert4rec"
    max_len: int = 50  # longest history; positions hold max_len + 1 (history + mask token)
    mask_prob: float = 0.2  # fraction of a training sequence's items that are masked
    mask_last_prob: float = 0.1  # probability that a training row masks only its last item
    masking: str = "count"  # "count": round(mask_prob * n) items; "append": the last + Bernoulli(mask_prob)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.masking not in MASKINGS:
            raise ConfigError(f"masking: must be one of {', '.join(MASKINGS)}, got {self.masking!r}")
        if not 0.0 < self.mask_prob <= 1.0:
            raise ConfigError(f"mask_prob: must be in (0, 1], got {self.mask_prob}")
        if not 0.0 <= self.mask_last_prob <= 1.0:
            raise ConfigError(f"mask_last_prob: must be in [0, 1], got {self.mask_last_prob}")


class BERT4Rec(SequentialRecommender):
    """BERT4Rec; `forward(item_seq, seq_len) -> (B, H)` reads a mask appended at seq_len.

    Trains with the masked-item objective in `loss` on all-positions rows, or prefix rows with
    `train.samples: prefix` (module docstring).
    """

    sample_mode = "all_positions"
    supported_samples = ("all_positions", "prefix")  # both are rebuilt into whole sequences

    def __init__(self, n_items: int, config: BERT4RecConfig | None = None) -> None:
        config = config or BERT4RecConfig()
        super().__init__(n_items, config, hidden_size=config.hidden_size)
        hidden = config.hidden_size
        self.mask_token = n_items + 1
        self.mask_embedding = nn.Embedding(1, hidden)
        self.position_embedding = nn.Embedding(config.max_len + 1, hidden)
        self.embedding_norm = nn.LayerNorm(hidden)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                hidden,
                config.num_heads,
                config.inner_size,
                dropout=config.dropout,
                attn_dropout=config.attn_dropout,
            )
            for _ in range(config.num_layers)
        )
        self.head = nn.Linear(hidden, hidden)
        self.output_bias = nn.Parameter(torch.zeros(n_items + 1))
        init_weights(self)

    # ------------------------------------------------------------------------------------------
    # Encoder

    def encode(self, tokens: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """(B, L') tokens (items, 0 = padding, `mask_token`), (B,) lengths -> (B, L', H)."""
        width = tokens.shape[1]
        if width > self.config.max_len + 1:
            raise ValueError(
                f"sequence length {width} exceeds max_len + 1 = {self.config.max_len + 1}"
            )
        key_mask = padding_mask(length, width)  # (B, L')
        is_mask = (tokens == self.mask_token)[:, :, None]  # (B, L', 1)
        items = self.item_embedding(tokens.masked_fill(tokens == self.mask_token, 0))  # (B, L', H)
        x = torch.where(is_mask, self.mask_embedding.weight[0], items)
        positions = torch.arange(width, device=tokens.device)  # (L',)
        x = x + self.position_embedding(positions)[None]
        x = self.embedding_dropout(self.embedding_norm(x))  # (B, L', H)
        for block in self.blocks:
            x = block(x, key_mask)
        return x

    def forward(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded items, (B,) lengths -> (B, H), read at a mask put at seq_len."""
        if item_seq.shape[1] > self.config.max_len:
            raise ValueError(
                f"sequence length {item_seq.shape[1]} exceeds max_len {self.config.max_len}"
            )
        tokens = append_at(item_seq, seq_len, self.mask_token)  # (B, L + 1)
        states = self.encode(tokens, seq_len + 1)  # (B, L + 1, H)
        return F.gelu(self.head(gather_last(states, seq_len + 1)))  # (B, H)

    def score_all(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """(B, L), (B,) -> (B, n_items + 1): head @ item_embedding.T + output_bias."""
        return super().score_all(item_seq, seq_len) + self.output_bias

    # ------------------------------------------------------------------------------------------
    # The masked-item objective

    def mask_items(
        self, item_seq: torch.Tensor, seq_len: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rebuild each row's whole sequence and mask some of its items (module docstring).

        Args:
            item_seq: (B, L) right-padded; seq_len (B,); target: (B, L) all-positions targets or
                (B,) prefix targets.
        Returns:
            tokens (B, L + 1) with masked positions set to `mask_token`, lengths (B,) = seq_len + 1,
            labels (B, L + 1): the original item at masked positions, 0 elsewhere.
        """
        if item_seq.shape[1] > self.config.max_len:
            raise ValueError(
                f"sequence length {item_seq.shape[1]} exceeds max_len {self.config.max_len}"
            )
        rows = torch.arange(item_seq.shape[0], device=item_seq.device)
        last = target[rows, seq_len - 1] if target.dim() == 2 else target  # (B,)
        full = append_at(item_seq, seq_len, last)  # (B, L + 1)
        length = seq_len + 1
        width = full.shape[1]
        real = padding_mask(length, width)  # (B, L + 1)

        # keys drawn at the full max_len + 1 width: the same rows draw the same masks whatever
        # the padding of their batch
        keys = torch.rand(full.shape[0], self.config.max_len + 1, device=full.device)[:, :width]
        is_last = torch.arange(width, device=full.device)[None, :] == seq_len[:, None]  # (B, L + 1)
        if self.config.masking == "append":
            masked = ((keys < self.config.mask_prob) & real) | is_last  # (B, L + 1)
        else:
            n_masked = torch.clamp(torch.round(self.config.mask_prob * length), min=1)  # (B,)
            keys = keys.masked_fill(~real, 2.0)  # (B, L + 1)
            order = keys.argsort(dim=1).argsort(dim=1)  # (B, L + 1): rank of each position's key
            masked = order < n_masked[:, None]  # the n_masked real positions with the smallest keys
        only_last = torch.rand(full.shape[0], device=full.device) < self.config.mask_last_prob
        masked = torch.where(only_last[:, None], is_last, masked)

        tokens = full.masked_fill(masked, self.mask_token)
        labels = full.masked_fill(~masked, 0)
        return tokens, length, labels

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training mode: the masked-item cross-entropy. Eval mode: the same with the masks drawn
        the same way (a validation loss); no gradient flows into the masking itself."""
        tokens, length, labels = self.mask_items(batch["item_seq"], batch["seq_len"], batch["target"])
        states = self.encode(tokens, length)  # (B, L + 1, H)
        keep = labels > 0  # (B, L + 1)
        states = F.gelu(self.head(states[keep]))  # (M, H)
        # The output bias rides along as one more dimension: [h, 1] . [e_i, b_i] = h . e_i + b_i.
        ones = states.new_ones(states.shape[0], 1)
        weight = torch.cat([self.item_embedding.weight, self.output_bias[:, None]], dim=1)
        return item_cross_entropy(torch.cat([states, ones], dim=1), weight, labels[keep])


def append_at(item_seq: torch.Tensor, seq_len: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    """(B, L), (B,) -> (B, L + 1): one more column, `value` written at position seq_len.

    `value` is a scalar or (B,). Whatever sat at seq_len (padding) is overwritten; positions after
    it keep their contents (callers mask them by length).
    """
    out = F.pad(item_seq, (0, 1))  # (B, L + 1)
    rows = torch.arange(item_seq.shape[0], device=item_seq.device)
    out[rows, seq_len] = value if torch.is_tensor(value) else torch.full_like(seq_len, value)
    return out
