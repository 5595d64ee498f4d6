"""Shared helpers: masks, gathers, reversal by length, initialisation, optimizer groups, loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from echomamba_dist.models import base
from echomamba_dist.models.base import (
    gather_last,
    init_weights,
    item_cross_entropy,
    padding_mask,
    param_groups,
    reverse_by_length,
)
from echomamba_dist.models.mamba import Mamba


def test_padding_mask_and_gather_last():
    seq_len = torch.tensor([1, 3, 4])
    assert padding_mask(seq_len, 4).tolist() == [
        [True, False, False, False],
        [True, True, True, False],
        [True, True, True, True],
    ]
    x = torch.arange(3 * 4 * 2).view(3, 4, 2)
    assert gather_last(x, seq_len).tolist() == [x[0, 0].tolist(), x[1, 2].tolist(), x[2, 3].tolist()]


def test_reverse_by_length_exact_and_involution():
    seq = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8], [9, 0, 0, 0, 0]])
    seq_len = torch.tensor([3, 5, 1])
    assert reverse_by_length(seq, seq_len).tolist() == [
        [3, 2, 1, 0, 0],
        [8, 7, 6, 5, 4],
        [9, 0, 0, 0, 0],
    ]
    x = torch.randn(3, 5, 4)
    rev = reverse_by_length(x, seq_len)
    assert torch.equal(rev[0, :3], x[0, :3].flip(0)) and torch.equal(rev[0, 3:], x[0, 3:])
    assert torch.equal(reverse_by_length(rev, seq_len), x)


def test_init_weights_leaves_mamba_alone():
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "emb": nn.Embedding(10, 8, padding_idx=0),
            "lin": nn.Linear(8, 8),
            "norm": nn.LayerNorm(8),
            "mamba": Mamba(8),
        }
    )
    with torch.no_grad():
        model["norm"].weight.fill_(3.0)
    before = {k: v.clone() for k, v in model["mamba"].state_dict().items()}
    init_weights(model)
    for k, v in model["mamba"].state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(model["emb"].weight[0], torch.zeros(8))
    assert abs(model["lin"].weight.std().item() - 0.02) < 0.01
    assert torch.equal(model["lin"].bias, torch.zeros(8))
    assert torch.equal(model["norm"].weight, torch.ones(8))


def test_param_groups_exclude_A_log_D_biases_norms():
    model = nn.ModuleDict({"mamba": Mamba(8), "norm": nn.LayerNorm(8), "emb": nn.Embedding(5, 8)})
    groups = param_groups(model, 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    mamba = model["mamba"]
    for p in (mamba.A_log, mamba.D, mamba.dt_proj.bias, mamba.conv1d.bias, model["norm"].weight):
        assert id(p) in no_decay
    for p in (mamba.in_proj.weight, mamba.x_proj.weight, mamba.conv1d.weight, model["emb"].weight):
        assert id(p) in decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_item_cross_entropy_matches_plain_and_chunked(monkeypatch):
    torch.manual_seed(0)
    states = torch.randn(10, 4, requires_grad=True)
    weight = torch.randn(8, 4, requires_grad=True)  # 7 items + padding row
    target = torch.randint(1, 8, (10,))
    expected = F.cross_entropy(states @ weight[1:].t(), target - 1)
    loss = item_cross_entropy(states, weight, target)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, (states, weight))
    assert torch.equal(grads[1][0], torch.zeros(4))  # the padding row is never a candidate
    monkeypatch.setattr(base, "LOSS_CHUNK_ROWS", 3)
    chunked = item_cross_entropy(states, weight, target)
    torch.testing.assert_close(chunked, expected)
    for g, g_chunked in zip(grads, torch.autograd.grad(chunked, (states, weight))):
        torch.testing.assert_close(g_chunked, g)


def test_item_cross_entropy_without_targets_is_zero():
    states = torch.randn(0, 4, requires_grad=True)
    loss = item_cross_entropy(states, torch.randn(8, 4), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()


def test_n_items_must_be_positive():
    from echomamba_dist.models.gru4rec import GRU4Rec

    with pytest.raises(ValueError):
        GRU4Rec(0)
