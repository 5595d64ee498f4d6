"""The one interface every sequential recommender implements, and the helpers they share.

Conventions (docs/architecture.md):
- `item_seq` (B, L) int64 is right-padded with 0; `seq_len` (B,) int64 >= 1 counts the real items.
- Item 0 is padding; real items are 1..n_items. `item_embedding` has n_items + 1 rows.
- `sample_mode` says which samples the model trains on:
    "prefix"         one next-item target per row, `target` (B,); for models whose output at a
                     position may depend on later positions (bidirectional, FFT filter).
    "all_positions"  a target per position, `target` (B, L) with 0 = ignore; exact only for
                     causal models, which implement `forward_all`.
  `supported_samples` lists what `train.samples` may pick: causal models with the standard loss
  (SASRec, GRU4Rec, Mamba4Rec) take prefix samples too, where every prefix is a row and the
  batch counts prefixes (RecBole's data augmentation, which the paper's baselines used).
- `max_len` is the longest sequence a model accepts (None: any). The training loop checks
  `data.max_len <= model.max_len`.

Weight initialisation lives in `init_weights`, which every model calls once at the end of its
constructor. Modules with `_owns_init = True` (the Mamba block, the FFT filter) initialise
themselves in their constructors, as mamba_ssm does, and are skipped.

Config dataclasses validate themselves in `__post_init__` with the `check_*` helpers at the end
of this module, so every model reports a bad value with the same message. Configs whose fields
are the same (in the same order) inherit them from `MambaStackConfig` or `TransformerConfig`
and set only their `name` default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from echomamba_dist.errors import ConfigError

# Rows of logits (rows x n_items) computed at once in the loss; beyond this the logits of each
# chunk are recomputed in the backward pass instead of being kept (activation checkpointing).
LOSS_CHUNK_ROWS = 4096


class SequentialRecommender(nn.Module):
    """Base class: embeds items, scores a (B, H) user state against every item embedding."""

    sample_mode: ClassVar[str] = "prefix"
    # the samples it can train on (`train.samples`); a causal model with the standard loss takes
    # both: all positions (its default) and prefixes, RecBole's augmentation (one target a row)
    supported_samples: ClassVar[tuple[str, ...]] = ("prefix",)

    def __init__(self, n_items: int, config: Any, *, hidden_size: int) -> None:
        """
        Args:
            n_items: number of real items; valid item indices are 1..n_items.
            config: the model's typed config dataclass (kept as `self.config`).
            hidden_size: item embedding dimension H (the size of `forward`'s output).
        Raises:
            ValueError: n_items < 1.
        """
        super().__init__()
        if n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        self.n_items = n_items
        self.config = config
        self.hidden_size = hidden_size
        self.max_len: int | None = getattr(config, "max_len", None)
        self.item_embedding = nn.Embedding(n_items + 1, hidden_size, padding_idx=0)

    def forward(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """(B, L) item indices, (B,) lengths -> (B, H) state that predicts the next item."""
        if self.sample_mode != "all_positions":
            raise NotImplementedError
        return gather_last(self.forward_all(item_seq, seq_len), seq_len)  # (B, H)

    def forward_all(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """(B, L), (B,) -> (B, L, H): position t predicts item t + 1 (all-positions models)."""
        raise NotImplementedError(f"{type(self).__name__} trains on {self.sample_mode} samples")

    def score_all(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """(B, L), (B,) -> (B, n_items + 1) scores; column 0 (padding) is meaningless."""
        return self.forward(item_seq, seq_len) @ self.item_embedding.weight.t()

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of the targets over all real items (1..n_items).

        `batch` holds `item_seq` (B, L), `seq_len` (B,) and `target`: (B,) for prefix samples,
        (B, L) with 0 = no target for all-positions samples (causal models only).
        """
        item_seq, seq_len, target = batch["item_seq"], batch["seq_len"], batch["target"]
        if target.ndim == 2:
            states = self.forward_all(item_seq, seq_len)  # (B, L, H)
            keep = target > 0  # (B, L)
            states, target = states[keep], target[keep]  # (M, H), (M,)
        else:
            states = self.forward(item_seq, seq_len)  # (B, H)
        return item_cross_entropy(states, self.item_embedding.weight, target)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; see `param_groups`."""
        return param_groups(self, weight_decay)


class NormedEmbeddingRecommender(SequentialRecommender):
    """A recommender whose layers read LayerNorm(Dropout(item embedding)), as in Mamba4Rec.

    Adds `embedding_dropout` (p = config.dropout) and `embedding_norm`, in that order, after
    `item_embedding`; `embed` applies them. Subclasses call `init_weights` themselves.
    """

    def __init__(self, n_items: int, config: Any) -> None:
        """`config` has `hidden_size` (H) and `dropout`; see `SequentialRecommender`."""
        super().__init__(n_items, config, hidden_size=config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.embedding_norm = nn.LayerNorm(config.hidden_size)

    def embed(self, item_seq: torch.Tensor) -> torch.Tensor:
        """(B, L) items -> (B, L, H) = LayerNorm(Dropout(item embedding))."""
        return self.embedding_norm(self.embedding_dropout(self.item_embedding(item_seq)))


# ----------------------------------------------------------------------------------------------
# Loss


def item_cross_entropy(
    states: torch.Tensor, item_weight: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Mean softmax cross-entropy of `target` against all real items.

    Args:
        states: (M, H) one state per target.
        item_weight: (n_items + 1, H) item embeddings; row 0 (padding) is never a candidate, so it
            receives no gradient from the loss.
        target: (M,) item indices in 1..n_items.
    Returns:
        A scalar; 0 (still attached to the graph) when M = 0.
    """
    if states.shape[0] == 0:
        return states.sum() * 0.0
    items = item_weight[1:]  # (n_items, H)
    labels = target - 1  # (M,)
    total = states.new_zeros((), dtype=torch.float32)
    for start in range(0, states.shape[0], LOSS_CHUNK_ROWS):
        rows, lab = states[start : start + LOSS_CHUNK_ROWS], labels[start : start + LOSS_CHUNK_ROWS]
        if torch.is_grad_enabled() and states.shape[0] > LOSS_CHUNK_ROWS:
            total = total + checkpoint(_chunk_ce_sum, rows, items, lab, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(rows, items, lab)
    return total / states.shape[0]


def _chunk_ce_sum(rows: torch.Tensor, items: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = rows @ items.t()  # (m, n_items)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
    return F.cross_entropy(logits, labels, reduction="sum")


# ----------------------------------------------------------------------------------------------
# Padding and direction helpers


def padding_mask(seq_len: torch.Tensor, length: int) -> torch.Tensor:
    """(B,) lengths -> (B, L) bool, True on real (non-padding) positions of right-padded rows."""
    positions = torch.arange(length, device=seq_len.device)  # (L,)
    return positions[None, :] < seq_len[:, None]  # (B, L)


def gather_last(x: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
    """(B, L, H), (B,) -> (B, H): each row at its last real position, seq_len - 1."""
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, seq_len - 1]


def dropout_at(
    dropout: nn.Dropout,
    values: torch.Tensor,
    full_shape: tuple[int, ...],
    rows: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """`dropout` applied to a (B, L, H) tensor, then read at (rows, positions); given only the
    values read, (B, H).

    The mask is `dropout` of a tensor of ones of `full_shape`: the random numbers depend on the
    shape, not the values, so a model that computes only the positions it reads draws the same
    mask as one that computes them all, and the two train alike.
    """
    if not dropout.training or dropout.p == 0:
        return values
    mask = dropout(values.new_ones(full_shape))  # (B, L, H): 0 or 1 / (1 - p)
    return values * mask[rows, positions]  # (B, H)


def reverse_by_length(x: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
    """Reverse each row's first seq_len positions; padding stays at the end.

    (B, L) or (B, L, H) -> same shape. Position t < seq_len takes position seq_len - 1 - t, so
    [a, b, c, 0, 0] becomes [c, b, a, 0, 0]. The map is its own inverse.
    """
    length = x.shape[1]
    positions = torch.arange(length, device=x.device)[None, :]  # (1, L)
    source = torch.where(
        positions < seq_len[:, None], seq_len[:, None] - 1 - positions, positions
    )  # (B, L)
    if x.dim() == 3:
        source = source[:, :, None].expand_as(x)  # (B, L, H)
    return x.gather(1, source)


# ----------------------------------------------------------------------------------------------
# Initialisation and optimizer groups


def init_weights(model: nn.Module, *, std: float = 0.02) -> None:
    """Initialise `model` in place (SASRec/RecBole conventions).

    Linear and Embedding weights ~ N(0, std), Linear biases 0, the embedding's padding row 0,
    LayerNorm weight 1 / bias 0, GRU weights Xavier-uniform and biases 0. Modules marked
    `_owns_init` (Mamba: dt_proj, A_log and D have their own init; the FFT filter) and everything
    inside them are left as they are.
    """
    owned = {
        id(sub)
        for module in model.modules()
        if getattr(module, "_owns_init", False)
        for sub in module.modules()
    }
    for module in model.modules():
        if id(module) in owned:
            continue
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.GRU):
            for name, param in module.named_parameters():
                if name.startswith("weight"):
                    nn.init.xavier_uniform_(param)
                else:
                    nn.init.zeros_(param)


def init_linears(module: nn.Module, *, std: float = 0.02) -> None:
    """Every Linear inside `module`, `_owns_init` or not: weight ~ N(0, std), bias 0.

    This is RecBole's init, which the authors' EchoMamba4Rec code also applies inside the Mamba
    blocks (`mamba_init=normal`): dt_proj's bias 0 makes dt start at softplus(0) = 0.69.
    """
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, 0.0, std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: with `weight_decay`, and without.

    No decay for parameters tagged `_no_weight_decay` (Mamba's A_log and D) and for every
    parameter with fewer than 2 dimensions (biases, LayerNorm weights). Matrices, including the
    embeddings and the FFT filter, are decayed (nanoGPT's rule). Empty groups are dropped.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if getattr(param, "_no_weight_decay", False) or param.dim() < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------------------------
# Config validation


SCAN_BACKENDS = ("auto", "reference", "cpu", "cuda")


def check_min(config: Any, *keys: str, minimum: int = 1) -> None:
    """Raise ConfigError for the first of `keys` whose value is below `minimum`."""
    for key in keys:
        if getattr(config, key) < minimum:
            raise ConfigError(f"{key}: must be >= {minimum}, got {getattr(config, key)}")


def check_dropout(config: Any, *keys: str) -> None:
    """Raise ConfigError for the first of `keys` (probabilities) outside [0, 1)."""
    for key in keys:
        if not 0.0 <= getattr(config, key) < 1.0:
            raise ConfigError(f"{key}: must be in [0, 1), got {getattr(config, key)}")


def check_num_heads(config: Any) -> None:
    """Raise ConfigError unless `num_heads` divides `hidden_size`."""
    if config.hidden_size % config.num_heads:
        raise ConfigError(
            f"num_heads: {config.num_heads} does not divide hidden_size={config.hidden_size}"
        )


def check_scan_backend(config: Any) -> None:
    """Raise ConfigError unless `scan_backend` is one of SCAN_BACKENDS."""
    if config.scan_backend not in SCAN_BACKENDS:
        raise ConfigError(
            f"scan_backend: expected auto, reference, cpu or cuda, got {config.scan_backend!r}"
        )


@dataclass(kw_only=True)
class MambaStackConfig:
    """Fields of Mamba4Rec and Bi-Mamba4Rec: Mamba layers that each end in a position-wise FFN.

    Subclasses set the `name` default (the registry key) and may add fields.
    """

    name: str
    hidden_size: int = 64  # embedding and model dimension H
    num_layers: int = 1  # Mamba layers (forward, or forward and backward)
    d_state: int = 32  # SSM state size N
    d_conv: int = 4  # causal depthwise convolution kernel K
    expand: int = 2  # Mamba inner width E * H
    dropout: float = 0.2  # dropout on embeddings and residual branches
    ffn_inner_size: int = 256  # feed-forward inner width (4 * H)
    scan_backend: Literal["auto", "reference", "cpu", "cuda"] = "auto"  # selective-scan kernels

    def __post_init__(self) -> None:
        sizes = ("hidden_size", "num_layers", "d_state", "d_conv", "expand", "ffn_inner_size")
        check_min(self, *sizes)
        check_dropout(self, "dropout")
        check_scan_backend(self)


@dataclass(kw_only=True)
class TransformerConfig:
    """Fields of SASRec and BERT4Rec: Transformer blocks over item + learned position embeddings.

    Subclasses set the `name` default (the registry key) and may add fields.
    """

    name: str
    hidden_size: int = 64  # embedding and model dimension H
    num_layers: int = 2  # transformer blocks
    num_heads: int = 2  # attention heads; must divide hidden_size
    inner_size: int = 256  # feed-forward inner width (4 * H)
    dropout: float = 0.2  # dropout on embeddings and residual branches
    attn_dropout: float = 0.2  # dropout on attention probabilities
    max_len: int = 50  # positions with a learned embedding (the longest input)

    def __post_init__(self) -> None:
        check_min(self, "hidden_size", "num_layers", "num_heads", "inner_size")
        check_num_heads(self)
        check_dropout(self, "dropout", "attn_dropout")
        check_min(self, "max_len", minimum=2)
