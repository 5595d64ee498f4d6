"""The synthetic generator: seeded, sized by its config, with real sequential signal."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import torch

from echomamba_dist.config import SyntheticConfig
from echomamba_dist.data.dataset import build_synthetic
from echomamba_dist.data.splits import leave_one_out
from echomamba_dist.data.synthetic import generate_synthetic
from echomamba_dist.train.metrics import finalize_metrics, metric_sums, target_ranks


def test_seeded_and_sized():
    cfg = SyntheticConfig(n_users=300, n_items=80, n_topics=4, mean_length=9.0, min_length=4, seed=3)
    # cfg.seed alone decides: NumPy's global generator is neither read (it moves between the
    # two calls) nor touched
    a = generate_synthetic(cfg)
    np.random.random(3)
    before = pickle.dumps(np.random.get_state())
    assert a.equals(generate_synthetic(cfg))
    assert pickle.dumps(np.random.get_state()) == before
    assert not a.equals(generate_synthetic(dataclasses.replace(cfg, seed=4)))
    users, counts = np.unique(a.column("user").to_numpy(zero_copy_only=False), return_counts=True)
    assert len(users) == 300 and counts.min() >= 4
    assert 8.0 < counts.mean() < 10.0
    assert set(a.column("item").to_pylist()) <= {f"i{k}" for k in range(80)}
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


def _item_groups(table) -> list[int]:
    """Sizes of the groups of items linked by appearing in one user's sequence."""
    parent: dict[str, str] = {}

    def root(item: str) -> str:
        while parent.setdefault(item, item) != item:
            item = parent[item]
        return item

    users = table.column("user").to_pylist()
    items = table.column("item").to_pylist()
    for k in range(1, len(items)):
        if users[k] == users[k - 1]:
            parent[root(items[k])] = root(items[k - 1])
    roots = [root(item) for item in parent]
    return sorted(roots.count(r) for r in set(roots))


def test_users_stay_in_one_topic_only_when_stickiness_is_one():
    """Topics split the catalogue into near-equal parts: with stickiness 1 a user never leaves
    the first topic, so the items fall into n_topics groups of at most n_items / n_topics; with
    stickiness 0.5 users switch, and one group links the whole catalogue."""
    cfg = SyntheticConfig(n_users=200, n_items=60, n_topics=6, mean_length=8.0, min_length=4, topic_stickiness=1.0)
    groups = _item_groups(generate_synthetic(cfg))
    assert len(groups) == 6 and max(groups) <= 10
    mixed = _item_groups(generate_synthetic(dataclasses.replace(cfg, topic_stickiness=0.5)))
    assert len(mixed) == 1 and mixed[0] > 50


def test_mean_length_equal_to_min_length_gives_every_user_that_length():
    table = generate_synthetic(SyntheticConfig(n_users=50, n_items=30, n_topics=3, mean_length=6.0, min_length=6))
    _, counts = np.unique(table.column("user").to_numpy(zero_copy_only=False), return_counts=True)
    assert len(counts) == 50 and (counts == 6).all()
