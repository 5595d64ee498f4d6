"""NARM, BERT4Rec, Bi-Mamba4Rec, Bi-Mambaformer4Rec: what is particular to each.

The shared interface tests (padding independence, items after seq_len, loss and gradients,
overfitting, bf16) run for every registered model in test_models.py; the padding and
look-ahead checks are repeated here for these four in the form the training data takes.
"""

from __future__ import annotations

import math

import pytest
import torch

from echomamba_dist.errors import ConfigError
from echomamba_dist.models.base import reverse_by_length
from echomamba_dist.models.bert4rec import append_at
from echomamba_dist.models.echomamba4rec import EchoMamba4Rec, EchoMamba4RecConfig
from echomamba_dist.models.layers import SelfAttention
from echomamba_dist.models.registry import MODELS, build_model, count_parameters

N_ITEMS = 40
NAMES = ["narm", "bert4rec", "bimamba4rec", "bimambaformer4rec"]
BIDIRECTIONAL = ["bert4rec", "bimamba4rec", "bimambaformer4rec"]


def _build(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cls = MODELS[name][1]
    if "scan_backend" in cls.__dataclass_fields__:
        overrides.setdefault("scan_backend", "reference")
    return build_model(cls(**overrides), N_ITEMS)


def _batch(lengths, pad_to, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.zeros(len(lengths), pad_to, dtype=torch.long)
    for i, n in enumerate(lengths):
        seq[i, :n] = torch.randint(1, N_ITEMS + 1, (n,), generator=g)
    return seq, torch.tensor(lengths)


LENGTHS = [1, 4, 10, 7, 2]


# ----------------------------------------------------------------------------------------------
# Registry and configs


# Defaults (the paper's shared settings and Mamba4Rec's SSM sizes), for counting by hand
H, N_STATE, D_CONV, EXPAND, INNER, MAX_LEN = 64, 32, 4, 2, 256, 50


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _hand_counts(n_items: int) -> dict[str, int]:
    """Parameter counts from the shapes the model docstrings draw (mamba.py lists the block's)."""
    embedding, norm = (n_items + 1) * H, 2 * H
    d_inner, dt_rank = EXPAND * H, math.ceil(H / 16)
    mamba = (
        _linear(H, 2 * d_inner, bias=False)  # in_proj
        + d_inner * D_CONV + d_inner  # depthwise conv1d and its bias
        + _linear(d_inner, dt_rank + 2 * N_STATE, bias=False)  # x_proj
        + _linear(dt_rank, d_inner)  # dt_proj
        + d_inner * N_STATE + d_inner  # A_log, D
        + _linear(d_inner, H, bias=False)  # out_proj
    )
    ffn = _linear(H, INNER) + _linear(INNER, H) + norm
    attention = 4 * _linear(H, H) + norm  # query, key, value, out
    bidirectional = 2 * (mamba + norm)  # each direction: Mamba, then LayerNorm
    return {
        # GRU (no biases, 3 gates), A_1, A_2, v, bilinear decoder 2G -> H; G = H
        "narm": embedding + 3 * H * (H + H) + 2 * H * H + H + 2 * H * H,
        # + output bias per item, mask vector, max_len + 1 positions, 2 blocks, head
        "bert4rec": embedding + (n_items + 1) + H + (MAX_LEN + 1) * H + norm + 2 * (attention + ffn) + _linear(H, H),
        "bimamba4rec": embedding + norm + bidirectional + ffn,
        "bimambaformer4rec": embedding + norm + bidirectional + attention + ffn,
    }


def test_parameter_counts_at_defaults_are_the_documented_shapes():
    """At Amazon-Beauty's 12,101 items (docs/benchmarks.md quotes these counts)."""
    counts = {name: count_parameters(build_model(name, 12101)) for name in NAMES}
    assert counts == _hand_counts(12101)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("narm", {"gru_size": 0}),
        ("narm", {"session_dropout": 1.0}),
        ("bert4rec", {"num_heads": 3}),
        ("bert4rec", {"mask_prob": 0.0}),
        ("bert4rec", {"mask_prob": 1.5}),
        ("bert4rec", {"mask_last_prob": -0.1}),
        ("bert4rec", {"max_len": 1}),
        ("bimamba4rec", {"d_state": 0}),
        ("bimamba4rec", {"scan_backend": "gpu"}),
        ("bimambaformer4rec", {"num_heads": 5}),
        ("bimambaformer4rec", {"attn_dropout": 1.0}),
    ],
)
def test_config_checks(name, bad):
    with pytest.raises(ConfigError):
        MODELS[name][1](**bad)


# ----------------------------------------------------------------------------------------------
# Padding and look-ahead, as the loop feeds them


@pytest.mark.parametrize("name", NAMES)
def test_padding_independence_float64(name):
    model = _build(name).double().eval()
    short, seq_len = _batch(LENGTHS, 10)
    long, _ = _batch(LENGTHS, 50)
    with torch.no_grad():
        torch.testing.assert_close(
            model.score_all(short, seq_len), model.score_all(long, seq_len), rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("name", BIDIRECTIONAL + ["narm"])
def test_never_sees_the_target_after_seq_len(name):
    """A prefix sample's target, had it been left at position seq_len, changes nothing."""
    model = _build(name).double().eval()
    seq, seq_len = _batch(LENGTHS, 11)
    with_target = append_at(seq, seq_len, torch.randint(1, N_ITEMS + 1, (len(LENGTHS),)))
    with torch.no_grad():
        torch.testing.assert_close(model(seq, seq_len), model(with_target, seq_len), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", BIDIRECTIONAL)
def test_bidirectional_models_use_the_whole_history(name):
    """Changing the first item changes every position's state (not only the later ones)."""
    model = _build(name).double().eval()
    seq, seq_len = _batch([6, 6], 6)
    changed = seq.clone()
    changed[:, 0] = seq[:, 0] % N_ITEMS + 1
    with torch.no_grad():
        assert not torch.allclose(model(seq, seq_len), model(changed, seq_len))


# ----------------------------------------------------------------------------------------------
# NARM


def test_narm_matches_its_equations_on_one_sequence():
    model = _build("narm").double().eval()
    seq, seq_len = _batch(LENGTHS, 12)
    with torch.no_grad():
        batched = model(seq, seq_len)
        for i, n in enumerate(LENGTHS):
            h, _ = model.gru(model.item_embedding(seq[i : i + 1, :n]))  # (1, n, G)
            h = h[0]
            c_g = h[-1]
            alpha = model.v(torch.sigmoid(model.a_1(c_g)[None] + model.a_2(h)))  # (n, 1), no softmax
            c_l = (alpha * h).sum(0)
            expected = model.decoder(torch.cat([c_g, c_l]))
            torch.testing.assert_close(batched[i], expected, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Bi-Mamba4Rec and Bi-Mambaformer4Rec


def test_bimamba_is_echomamba_without_filter_and_glu():
    bimamba = _build("bimamba4rec").double().eval()
    echo = EchoMamba4Rec(
        N_ITEMS,
        EchoMamba4RecConfig(filter=False, glu=False, ffn=True, scan_backend="reference"),
    ).double().eval()
    echo.load_state_dict(bimamba.state_dict(), strict=True)
    layer = bimamba.layers[0]
    assert layer.filter is None and layer.glu is None and layer.concat is None
    assert layer.backward_mamba is not None and layer.ffn is not None
    seq, seq_len = _batch(LENGTHS, 10)
    with torch.no_grad():
        torch.testing.assert_close(bimamba(seq, seq_len), echo(seq, seq_len), rtol=0, atol=1e-12)


def test_bimamba_backward_direction_scans_reversed_sequences():
    model = _build("bimamba4rec").eval()
    layer = model.layers[0]
    seen = {}
    layer.forward_mamba.register_forward_hook(lambda m, a, o: seen.__setitem__("fwd", a[0]))
    layer.backward_mamba.register_forward_hook(lambda m, a, o: seen.__setitem__("bwd", a[0]))
    seq, seq_len = _batch(LENGTHS, 12)
    with torch.no_grad():
        model(seq, seq_len)
    assert torch.equal(seen["bwd"], reverse_by_length(seen["fwd"], seq_len))


def test_bimambaformer_structure():
    model = _build("bimambaformer4rec", num_layers=2)
    assert len(model.mamba_layers) == len(model.transformer_blocks) == 2
    for layer in model.mamba_layers:
        assert layer.filter is None and layer.glu is None and layer.ffn is None
        assert layer.backward_mamba is not None
    assert not hasattr(model, "position_embedding")  # Mamba carries the order


def test_self_attention_is_bidirectional_and_ignores_padding_keys():
    block = _build("bimambaformer4rec").transformer_blocks[0].attention.double().eval()
    x = torch.randn(1, 6, 64, dtype=torch.float64)
    key_mask = torch.tensor([[True, True, True, True, False, False]])
    later, padding = x.clone(), x.clone()
    later[0, 3] += 1.0
    padding[0, 4:] += 5.0
    with torch.no_grad():
        out = block(x, key_mask)
        assert not torch.allclose(out[0, 0], block(later, key_mask)[0, 0])  # sees position 3
        torch.testing.assert_close(out[0, :4], block(padding, key_mask)[0, :4], rtol=0, atol=1e-12)


def test_sasrec_attention_is_the_shared_self_attention_made_causal():
    sasrec, bert = _build("sasrec"), _build("bert4rec")
    attention = sasrec.attention[0].double().eval()
    assert type(attention) is type(bert.blocks[0].attention) is SelfAttention
    assert attention.causal and not bert.blocks[0].attention.causal
    x = torch.randn(1, 6, 64, dtype=torch.float64)
    later = x.clone()
    later[0, 3:] += 1.0
    with torch.no_grad():
        out = attention(x)
        torch.testing.assert_close(out[0, :3], attention(later)[0, :3], rtol=0, atol=0)
        assert not torch.allclose(out[0, 3], attention(later)[0, 3])
    with pytest.raises(ValueError, match="key_mask"):
        attention(x, torch.ones(1, 6, dtype=torch.bool))  # causal takes no key mask
    with pytest.raises(ValueError, match="key_mask"):
        bert.blocks[0].attention(x.float())  # bidirectional needs one


# ----------------------------------------------------------------------------------------------
# BERT4Rec: the masked-item objective and the appended mask


def _all_position_rows(lengths, pad_to, *, seed=0):
    """All-positions rows of whole sequences of len n + 1: input = [:-1], target[t] = item t + 1."""
    whole, whole_len = _batch([n + 1 for n in lengths], pad_to + 1, seed=seed)
    seq_len = whole_len - 1
    seq = whole[:, :-1].clone()
    seq[torch.arange(pad_to)[None, :] >= seq_len[:, None]] = 0
    target = whole[:, 1:].clone()
    target[torch.arange(pad_to)[None, :] >= seq_len[:, None]] = 0
    return whole, seq, seq_len, target


def test_bert4rec_masks_round_p_n_items_of_the_rebuilt_sequence():
    model = _build("bert4rec", mask_prob=0.3, mask_last_prob=0.0).train()
    lengths = [1, 2, 4, 9, 15, 30]
    whole, seq, seq_len, target = _all_position_rows(lengths, 30)
    torch.manual_seed(5)
    tokens, length, labels = model.mask_items(seq, seq_len, target)
    assert tokens.shape == (6, 31) and torch.equal(length, seq_len + 1)
    masked = tokens == model.mask_token
    for i, n in enumerate(length.tolist()):
        assert int(masked[i].sum()) == max(1, round(0.3 * n))
        assert not masked[i, n:].any()  # never a padding position
    # labels: the original item where masked, 0 elsewhere; unmasked tokens are the originals
    assert torch.equal(labels[masked], whole[masked])
    assert (labels[~masked] == 0).all()
    assert torch.equal(tokens[~masked], whole[~masked])


def test_bert4rec_mask_ratio_and_seed():
    model = _build("bert4rec", mask_prob=0.2, mask_last_prob=0.0).train()
    _, seq, seq_len, target = _all_position_rows([20] * 400, 20)
    torch.manual_seed(1)
    tokens, _, _ = model.mask_items(seq, seq_len, target)
    masked = tokens == model.mask_token
    assert int(masked.sum()) == 400 * round(0.2 * 21)
    # every position is masked about equally often (uniform choice)
    per_position = masked.float().mean(0)
    assert per_position.min() > 0.12 and per_position.max() < 0.30
    # torch's global generator draws them, so the loop's seed decides: another seed, other masks
    torch.manual_seed(2)
    other, _, _ = model.mask_items(seq, seq_len, target)
    assert not torch.equal(other, tokens)
    assert torch.equal((other == model.mask_token).sum(1), masked.sum(1))
    # the same rows padded wider draw the same masks
    torch.manual_seed(1)
    wide, _, _ = model.mask_items(torch.nn.functional.pad(seq, (0, 9)), seq_len, torch.nn.functional.pad(target, (0, 9)))
    assert torch.equal(wide[:, :21], tokens) and (wide[:, 21:] == 0).all()


def test_bert4rec_mask_last_rows_mask_only_the_last_item():
    model = _build("bert4rec", mask_last_prob=1.0).train()
    whole, seq, seq_len, target = _all_position_rows([3, 7, 1], 8)
    tokens, _, labels = model.mask_items(seq, seq_len, target)
    rows = torch.arange(3)
    assert (tokens[rows, seq_len] == model.mask_token).all()
    assert int((tokens == model.mask_token).sum()) == 3
    assert torch.equal(labels[rows, seq_len], whole[rows, seq_len])
    # a prefix row (target (B,)) is rebuilt as the prefix followed by its target
    prefix_target = torch.tensor([5, 6, 7])
    _, _, prefix_labels = model.mask_items(seq, seq_len, prefix_target)
    assert torch.equal(prefix_labels[rows, seq_len], prefix_target)


def test_bert4rec_append_masking_masks_the_target_and_each_history_item_with_mask_prob():
    """masking="append" (RecBole on prefix rows): the appended target is always masked, every
    history item independently with probability mask_prob; padding never."""
    model = _build("bert4rec", mask_prob=0.3, mask_last_prob=0.0, masking="append").train()
    lengths = [1, 4, 12, 30] * 250
    seq, seq_len = _batch(lengths, 30, seed=3)
    target = torch.arange(1, 1001) % N_ITEMS + 1  # (B,) prefix targets
    torch.manual_seed(7)
    tokens, length, labels = model.mask_items(seq, seq_len, target)
    rows = torch.arange(1000)
    masked = tokens == model.mask_token
    assert torch.equal(length, seq_len + 1)
    assert masked[rows, seq_len].all() and torch.equal(labels[rows, seq_len], target)
    history = torch.arange(31)[None, :] < seq_len[:, None]  # (B, 31): the prefix's own items
    assert not masked[~history & ~(torch.arange(31)[None, :] == seq_len[:, None])].any()  # padding
    rate = masked[history].float().mean().item()
    assert abs(rate - 0.3) < 0.02, rate  # 12,000+ Bernoulli draws: 3 sigma is 0.013
    # a one-item prefix often keeps its item unmasked (count masking would mask round(0.3 * 2) = 1)
    assert 0.6 < (~masked[seq_len == 1, 0]).float().mean().item() < 0.8
    whole = append_at(seq, seq_len, target)
    assert torch.equal(labels[masked], whole[masked]) and torch.equal(tokens[~masked], whole[~masked])
    # torch's global generator: the same seed, the same masks
    torch.manual_seed(7)
    assert torch.equal(model.mask_items(seq, seq_len, target)[0], tokens)


def test_bert4rec_masking_is_checked():
    with pytest.raises(ConfigError, match="masking: must be one of count, append"):
        _build("bert4rec", masking="random")


def test_bert4rec_inference_reads_a_mask_appended_at_seq_len():
    model = _build("bert4rec").double().eval()
    seq, seq_len = _batch(LENGTHS, 10)
    seen = {}
    original_encode = model.encode

    def spy(tokens, length):
        seen["tokens"], seen["length"] = tokens, length
        return original_encode(tokens, length)

    model.encode = spy
    with torch.no_grad():
        out = model(seq, seq_len)
    rows = torch.arange(len(LENGTHS))
    expected_tokens = torch.nn.functional.pad(seq, (0, 1))  # (B, 11)
    expected_tokens[rows, seq_len] = model.mask_token
    assert torch.equal(seen["tokens"], expected_tokens)
    assert torch.equal(seen["length"], seq_len + 1)
    with torch.no_grad():
        states = original_encode(seen["tokens"], seq_len + 1)
        expected = torch.nn.functional.gelu(model.head(states[rows, seq_len]))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    scores = model.score_all(seq, seq_len)
    torch.testing.assert_close(scores, out @ model.item_embedding.weight.t() + model.output_bias)


def test_bert4rec_positions_hold_max_len_plus_one():
    model = _build("bert4rec", max_len=8).eval()
    assert model.position_embedding.num_embeddings == 9
    seq, seq_len = _batch([8, 3], 8)
    with torch.no_grad():
        assert model(seq, seq_len).shape == (2, 64)
    too_long, too_long_len = _batch([9], 9)
    with pytest.raises(ValueError, match="max_len"):
        model(too_long, too_long_len)


def test_bert4rec_masked_loss_is_padding_independent():
    model = _build("bert4rec").double().eval()
    _, seq, seq_len, target = _all_position_rows(LENGTHS, 10)
    wide = {"item_seq": torch.nn.functional.pad(seq, (0, 20)), "seq_len": seq_len,
            "target": torch.nn.functional.pad(target, (0, 20))}
    torch.manual_seed(3)
    narrow_loss = model.loss({"item_seq": seq, "seq_len": seq_len, "target": target})
    torch.manual_seed(3)
    torch.testing.assert_close(narrow_loss, model.loss(wide), rtol=0, atol=1e-10)


def test_bert4rec_masked_objective_learns_a_fixed_batch():
    """Fresh masks every step: the loss still falls well below log(n_items) on a fixed batch."""
    model = _build("bert4rec", seed=2, hidden_size=32, inner_size=64, dropout=0.0, attn_dropout=0.0).train()
    _, seq, seq_len, target = _all_position_rows([8, 5, 7, 3, 8, 6, 2, 8], 8, seed=4)
    batch = {"item_seq": seq, "seq_len": seq_len, "target": target}
    optimizer = torch.optim.Adam(model.param_groups(0.0), lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 0.9 * math.log(N_ITEMS) and last < 0.6 * first, losses
    assert model.mask_embedding.weight.grad is not None


def test_bert4rec_trains_through_the_loop(tmp_path):
    """The unchanged loop feeds BERT4Rec all-positions rows, bucketed to their longest row."""
    from echomamba_dist.train.loop import train_per_worker

    result = train_per_worker({
        "data": {"synthetic": {"n_users": 150, "n_items": 50, "n_topics": 4, "mean_length": 9.0}, "max_len": 12},
        "model": {"name": "bert4rec", "hidden_size": 16},
        "train": {"epochs": 2, "batch_size": 64, "eval_batch_size": 256, "ray": False, "progress": False},
        "run": {"name": "b", "storage_path": str(tmp_path)},
        "tracking": {"enabled": False},
    })
    assert result["epochs_run"] == 2 and result["test_users"] == 150
    assert all(math.isfinite(v) for v in result["test"].values())
