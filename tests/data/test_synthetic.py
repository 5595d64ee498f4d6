"""The synthetic generator: seeded, sized by its config, with real sequential signal."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from echomamba_dist.config import SyntheticConfig
from echomamba_dist.data.dataset import build_synthetic
from echomamba_dist.data.splits import leave_one_out
from echomamba_dist.data.synthetic import generate_synthetic
from echomamba_dist.train.metrics import finalize_metrics, metric_sums, target_ranks


def test_seeded_and_sized():
    cfg = SyntheticConfig(n_users=300, n_items=80, n_topics=4, mean_length=9.0, min_length=4, seed=3)
    a, b = generate_synthetic(cfg), generate_synthetic(cfg)
    assert a.equals(b)
    assert not a.equals(generate_synthetic(dataclasses.replace(cfg, seed=4)))
    users, counts = np.unique(a.column("user").to_numpy(zero_copy_only=False), return_counts=True)
    assert len(users) == 300 and counts.min() >= 4
    assert 8.0 < counts.mean() < 10.0
    assert len(set(a.column("item").to_pylist())) <= 80
    ts = a.column("timestamp").to_numpy()
    same_user = a.column("user").to_numpy(zero_copy_only=False)
    assert (np.diff(ts)[same_user[1:] == same_user[:-1]] > 0).all()


def test_transition_model_beats_popularity_by_a_wide_margin():
    """A first-order transition-count model vs popularity, HR@10 on the leave-one-out test."""
    ds = build_synthetic(SyntheticConfig())
    assert ds.n_users == 2000 and ds.n_items <= 500 and ds.n_interactions > 20000
    s = leave_one_out(ds.offsets, ds.items)
    n = ds.n_items + 1
    tr = s.train_items
    owner = np.repeat(np.arange(len(s.train_offsets) - 1), np.diff(s.train_offsets))
    pairs = owner[1:] == owner[:-1]
    trans = np.zeros((n, n))
    np.add.at(trans, (tr[:-1][pairs], tr[1:][pairs]), 1.0)
    popularity = np.bincount(tr, minlength=n).astype(float)

    last = s.valid_target  # the test input ends with the validation item
    targets = torch.as_tensor(s.test_target)
    pop_scores = torch.as_tensor(np.tile(popularity, (len(last), 1)))
    markov_scores = torch.as_tensor(trans[last] + 1e-6 * popularity)
    pop = finalize_metrics(metric_sums(target_ranks(pop_scores, targets), [10]))["hr@10"]
    markov = finalize_metrics(metric_sums(target_ranks(markov_scores, targets), [10]))["hr@10"]
    assert markov > 2 * pop, (markov, pop)


def test_generation_is_vectorised():
    import time

    start = time.perf_counter()
    table = generate_synthetic(SyntheticConfig(n_users=100_000, n_items=5000, n_topics=50, mean_length=10.0))
    assert 900_000 < table.num_rows < 1_100_000
    assert time.perf_counter() - start < 10.0
