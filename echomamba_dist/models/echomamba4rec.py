"""EchoMamba4Rec (paper §3): FFT filter + bidirectional Mamba + GLU over item embeddings.

    item_seq (B, L)
      -> item embedding, Dropout, LayerNorm                         (§3.3, eq. 5)
      -> num_layers x EchoMambaLayer:
           FFT filter: LayerNorm(x + Dropout(irfft(K * rfft(x))))    (§3.5, eqs. 6-9; `filter`)
           forward  Mamba: f = LayerNorm_f(x + Dropout(Mamba_f(x)))
           backward Mamba: b = LayerNorm_b(x + Dropout(rev(Mamba_b(rev(x)))))   (`bidirectional`)
           combine: f + b (`sum`) or Linear([f; b]) (`concat`, eq. 18)
           GLU (eq. 19; `glu`), or as the authors' code has it:
             LayerNorm(h + Dropout(W3 GLU(h)))                        (`glu_form=released`)
           position-wise FFN (`ffn`)
      -> readout (B, H); scores = readout @ item_embedding.T          (§3.8, eq. 20)

`rev` reverses each sequence within its own length, so the backward Mamba scans
v_n, ..., v_1 and then the padding, never the padding first. Padded positions are zeroed before
every sequence-mixing sublayer, and the filter transforms over a fixed `max_len`, so a sequence's
output does not depend on the padding of its batch.

Readout (`readout`):
    last  both directions at the last real position (the released code);
    ends  the forward direction at the last position, the backward direction at position 0, where
          its scan ends after seeing the whole history from newest to oldest (§3.4.1).
With `ends`, the last layer combines the two gathered vectors; combine, GLU and FFN are
position-wise, so `last` gathers the same way without loss of generality.

The filter and the backward direction look at later positions, so the model trains on prefix
samples: its input never contains the target.

Only what the readout reads is computed (`fast_path`, on by default): the last layer's forward
Mamba runs its scan over every position but projects out only at the last real one, and with
`last` its backward direction there has seen exactly one item (the newest, first after the
reversal), so it is the backward Mamba applied to a length-1 sequence: no scan over L. Norms,
combine, GLU and FFN run at the gathered positions; earlier layers still need every position.
Dropout masks are drawn at full size (`base.dropout_at`), so training draws the same numbers as
the full computation (`fast_path=False`), which is kept as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from echomamba_dist.errors import ConfigError
from echomamba_dist.models.base import (
    NormedEmbeddingRecommender,
    check_dropout,
    check_min,
    check_scan_backend,
    dropout_at,
    gather_last,
    init_linears,
    init_weights,
    padding_mask,
    reverse_by_length,
)
from echomamba_dist.models.layers import (
    FrequencyFilter,
    GatedLinearUnit,
    PointWiseFeedForward,
    ResidualGLU,
)
from echomamba_dist.models.mamba import mamba_from_config


@dataclass(kw_only=True)
class EchoMamba4RecConfig:
    """EchoMamba4Rec; defaults are the paper's settings (§4.1)."""

    name: str = "echomamba4rec"
    hidden_size: int = 64  # embedding and model dimension H
    num_layers: int = 1  # EchoMamba layers; each has one forward and one backward Mamba
    d_state: int = 32  # SSM state size N
    d_conv: int = 4  # causal depthwise convolution kernel K
    expand: int = 2  # Mamba inner width E * H
    dropout: float = 0.2  # dropout on the embeddings and every residual branch
    max_len: int = 50  # longest input; the FFT filter spans this many positions
    filter: bool = True  # the FFT filter layer at the start of each layer (§3.5)
    filter_init_scale: float = 0.02  # std of the complex filter's real and imaginary parts
    filter_lowpass: float | None = None  # keep only this lowest fraction of frequencies (None: all)
    bidirectional: bool = True  # add the backward (reverse-by-length) Mamba
    combine: Literal["sum", "concat"] = "sum"  # sum of both directions, or Linear of [fwd; bwd]
    readout: Literal["last", "ends"] = "last"  # where each direction is read (module docstring)
    glu: bool = True  # gated linear unit after combining (eq. 19)
    # "paper": GLU(h) alone (eqs. 10, 19); "released": the authors' code, LayerNorm(h + Dropout(W3 GLU(h)))
    glu_form: Literal["paper", "released"] = "paper"
    # "mamba": mamba_ssm's own init of the Mamba blocks; "normal": the authors' code (RecBole's
    # init on every Linear inside them too: weights N(0, 0.02), biases 0, so dt starts at softplus(0))
    mamba_init: Literal["mamba", "normal"] = "mamba"
    ffn: bool = False  # position-wise feed-forward after the GLU (not in eqs. 11-20)
    ffn_inner_size: int = 256  # FFN inner width (4 * H)
    scan_backend: Literal["auto", "reference", "cpu", "cuda"] = "auto"  # selective-scan kernels
    # compute only what the readout reads, channel-last Mamba with the fused conv; the same
    # results (module docstring). False: the unoptimised path (reference, benchmarks).
    fast_path: bool = True

    def __post_init__(self) -> None:
        sizes = ("hidden_size", "num_layers", "d_state", "d_conv", "expand", "ffn_inner_size")
        check_min(self, *sizes)
        check_dropout(self, "dropout")
        check_min(self, "max_len", minimum=2)
        if self.filter_init_scale <= 0:
            raise ConfigError(f"filter_init_scale: must be > 0, got {self.filter_init_scale}")
        if self.filter_lowpass is not None and not 0.0 < self.filter_lowpass <= 1.0:
            raise ConfigError(
                f"filter_lowpass: must be in (0, 1] or null, got {self.filter_lowpass}"
            )
        if self.combine not in ("sum", "concat"):
            raise ConfigError(f"combine: expected sum or concat, got {self.combine!r}")
        if self.readout not in ("last", "ends"):
            raise ConfigError(f"readout: expected last or ends, got {self.readout!r}")
        check_scan_backend(self)
        if not self.bidirectional and (self.combine != "sum" or self.readout != "last"):
            raise ConfigError(
                "bidirectional: combine=concat and readout=ends need the backward direction "
                "(bidirectional=true)"
            )


class EchoMambaLayer(nn.Module):
    """Filter, forward and backward Mamba, combine, GLU, FFN; see the module docstring."""

    def __init__(self, config: EchoMamba4RecConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.filter = (
            FrequencyFilter(
                hidden,
                config.max_len,
                dropout=config.dropout,
                init_scale=config.filter_init_scale,
                lowpass=config.filter_lowpass,
                fast_path=config.fast_path,
            )
            if config.filter
            else None
        )
        self.forward_mamba = mamba_from_config(config)
        self.forward_norm = nn.LayerNorm(hidden)
        self.backward_mamba = mamba_from_config(config) if config.bidirectional else None
        self.backward_norm = nn.LayerNorm(hidden) if config.bidirectional else None
        self.dropout = nn.Dropout(config.dropout)
        self.concat = nn.Linear(2 * hidden, hidden) if config.combine == "concat" else None
        if not config.glu:
            self.glu = None
        elif config.glu_form == "released":
            self.glu = ResidualGLU(hidden, dropout=config.dropout)
        else:
            self.glu = GatedLinearUnit(hidden)
        self.ffn = (
            PointWiseFeedForward(hidden, config.ffn_inner_size, dropout=config.dropout)
            if config.ffn
            else None
        )

    def forward(self, x: torch.Tensor, seq_len: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H), (B,) lengths, mask (B, L, 1) -> (B, L, H): `merge` of `directions`."""
        return self.merge(*self.directions(x, seq_len, mask))

    def directions(
        self, x: torch.Tensor, seq_len: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, H) -> forward (B, L, H), backward (B, L, H) or None; `mask` (B, L, 1)."""
        x = x * mask
        if self.filter is not None:
            x = self.filter(x) * mask  # (B, L, H)
        fwd = self.forward_norm(x + self.dropout(self.forward_mamba(x)))  # (B, L, H)
        if self.backward_mamba is None:
            return fwd, None
        reversed_x = reverse_by_length(x, seq_len)  # (B, L, H), padding still at the end
        bwd = reverse_by_length(self.backward_mamba(reversed_x), seq_len)  # (B, L, H)
        bwd = self.backward_norm(x + self.dropout(bwd))
        return fwd, bwd

    def read(
        self,
        x: torch.Tensor,
        seq_len: torch.Tensor,
        mask: torch.Tensor,
        *,
        readout: Literal["last", "ends"],
    ) -> torch.Tensor:
        """The layer read out (module docstring): (B, L, H) -> (B, H), computing only that.

        Equals `merge` of `directions` gathered at the readout's positions, with the same
        dropout draws.
        """
        x = x * mask
        if self.filter is not None:
            x = self.filter(x) * mask  # (B, L, H): every position feeds the forward scan
        rows = torch.arange(x.shape[0], device=x.device)
        last = seq_len - 1  # (B,)
        x_last = x[rows, last]  # (B, H)
        fwd = self.forward_mamba(x, positions=last)  # (B, H)
        fwd = self.forward_norm(x_last + dropout_at(self.dropout, fwd, x.shape, rows, last))
        if self.backward_mamba is None:
            return self.merge(fwd, None)
        if readout == "last":
            # reversed, the last real item comes first: the causal block there sees it alone
            bwd = self.backward_mamba(x_last[:, None])[:, 0]  # (B, H)
            at, x_at = last, x_last
        else:  # "ends": position 0, where the reversed scan ends, at reversed position seq_len - 1
            bwd = self.backward_mamba(reverse_by_length(x, seq_len), positions=last)  # (B, H)
            at, x_at = torch.zeros_like(last), x[:, 0]
        bwd = self.backward_norm(x_at + dropout_at(self.dropout, bwd, x.shape, rows, at))
        return self.merge(fwd, bwd)  # (B, H)

    def merge(self, fwd: torch.Tensor, bwd: torch.Tensor | None) -> torch.Tensor:
        """Position-wise: combine the directions, then GLU and FFN; (..., H) -> (..., H)."""
        if bwd is None:
            hidden = fwd
        elif self.concat is not None:
            hidden = self.concat(torch.cat([fwd, bwd], dim=-1))  # eq. 18
        else:
            hidden = fwd + bwd
        if self.glu is not None:
            hidden = self.glu(hidden)
        if self.ffn is not None:
            hidden = self.ffn(hidden)
        return hidden


def read_out(
    layers: nn.ModuleList,
    x: torch.Tensor,
    seq_len: torch.Tensor,
    mask: torch.Tensor,
    *,
    readout: Literal["last", "ends"],
    fast_path: bool = False,
) -> torch.Tensor:
    """Run EchoMambaLayers over (B, L, H) embeddings and read the last layer out -> (B, H).

    `mask` (B, L, 1) marks the real positions. The last layer's `merge` is position-wise, so its
    two directions are gathered first (`readout`, module docstring) and merged as (B, H).
    `fast_path`: the last layer computes only what is read (`EchoMambaLayer.read`), same result.
    """
    for layer in layers[:-1]:
        x = layer(x, seq_len, mask)  # (B, L, H)

    last = layers[-1]
    if fast_path:
        return last.read(x, seq_len, mask, readout=readout)  # (B, H)
    fwd, bwd = last.directions(x, seq_len, mask)  # (B, L, H) each
    fwd = gather_last(fwd, seq_len)  # (B, H)
    if bwd is not None:
        bwd = bwd[:, 0] if readout == "ends" else gather_last(bwd, seq_len)
    return last.merge(fwd, bwd)  # (B, H)


class EchoMamba4Rec(NormedEmbeddingRecommender):
    """EchoMamba4Rec; `forward(item_seq, seq_len) -> (B, H)`. Trains on prefix samples."""

    sample_mode = "prefix"

    def __init__(self, n_items: int, config: EchoMamba4RecConfig | None = None) -> None:
        config = config or EchoMamba4RecConfig()
        super().__init__(n_items, config)  # item_embedding, embedding_dropout, embedding_norm
        self.layers = nn.ModuleList(EchoMambaLayer(config) for _ in range(config.num_layers))
        init_weights(self)
        if config.mamba_init == "normal":
            for layer in self.layers:
                for block in (layer.forward_mamba, layer.backward_mamba):
                    if block is not None:
                        init_linears(block)

    def forward(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded items, (B,) lengths -> (B, H)."""
        mask = padding_mask(seq_len, item_seq.shape[1])[:, :, None]  # (B, L, 1)
        x = self.embed(item_seq)  # (B, L, H)
        return read_out(
            self.layers, x, seq_len, mask, readout=self.config.readout, fast_path=self.config.fast_path
        )  # (B, H)
