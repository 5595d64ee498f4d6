"""Full-ranking metrics on hand-computed cases, and their invariants."""

from __future__ import annotations

import math

import pytest
import torch

from echomamba_dist.metrics import combine_sums, finalize_metrics, metric_sums, target_ranks

#                      pad   1    2    3    4
SCORES = torch.tensor([[100.0, 1.0, 3.0, 2.0, 3.0]])


@pytest.mark.parametrize(
    "target, exclude, rank",
    [
        (3, None, 3),  # items 2 and 4 score higher; padding (100) never ranks
        (2, None, 1),  # item 4 ties: strictly-higher counting favours the target
        (1, None, 4),
        (3, [[2, 0]], 2),  # history item 2 excluded; 0 entries ignored
        (3, [[3, 4]], 2),  # the target itself is never excluded
    ],
)
def test_target_ranks_hand_computed(target, exclude, rank):
    ex = None if exclude is None else torch.tensor(exclude)
    assert target_ranks(SCORES, torch.tensor([target]), exclude=ex).tolist() == [rank]


def test_excluded_items_go_to_minus_infinity_not_zero():
    scores = torch.tensor([[0.0, -1.0, -2.0, -3.0]])  # all negative: a 0 would outrank the target
    assert target_ranks(scores, torch.tensor([3]), exclude=torch.tensor([[1]])).tolist() == [2]


def test_scores_are_not_modified():
    scores = SCORES.clone()
    target_ranks(scores, torch.tensor([3]), exclude=torch.tensor([[2]]))
    assert torch.equal(scores, SCORES)


def test_metric_sums_hand_computed():
    sums = metric_sums(torch.tensor([1, 3, 11]), [10, 20])
    assert sums["count"] == 3
    assert sums["hr@10"] == 2 and sums["recall@10"] == 2 and sums["hr@20"] == 3
    assert sums["ndcg@10"] == pytest.approx(1 + 1 / math.log2(4))
    assert sums["mrr@10"] == pytest.approx(1 + 1 / 3)
    assert sums["ndcg@20"] == pytest.approx(1 + 0.5 + 1 / math.log2(12))
    assert sums["mrr@20"] == pytest.approx(1 + 1 / 3 + 1 / 11)
    final = finalize_metrics(sums)
    assert final["hr@10"] == pytest.approx(2 / 3) and "count" not in final


def test_shards_combine_exactly():
    ranks = torch.randint(1, 60, (1000,))
    whole = metric_sums(ranks, [5, 10, 50])
    parts = combine_sums(metric_sums(chunk, [5, 10, 50]) for chunk in ranks.split(137))
    assert parts["count"] == whole["count"] == 1000
    for key in whole:
        assert parts[key] == pytest.approx(whole[key], rel=1e-12)
    assert finalize_metrics(parts) == pytest.approx(finalize_metrics(whole))


def test_invariants_hr_ge_ndcg_ge_mrr():
    torch.manual_seed(0)
    scores = torch.randn(200, 101)
    targets = torch.randint(1, 101, (200,))
    ranks = target_ranks(scores, targets)
    assert ranks.min() >= 1 and ranks.max() <= 100
    for r in ranks:  # per target
        s = metric_sums(r[None], [1, 10])
        for k in (1, 10):
            assert s[f"hr@{k}"] >= s[f"ndcg@{k}"] >= s[f"mrr@{k}"]
    m = finalize_metrics(metric_sums(ranks, [1, 5, 10, 100]))
    for k in (1, 5, 10, 100):
        assert m[f"hr@{k}"] >= m[f"ndcg@{k}"] >= m[f"mrr@{k}"] and m[f"recall@{k}"] == m[f"hr@{k}"]
    assert m["hr@1"] == pytest.approx(m["ndcg@1"]) and m["ndcg@1"] == pytest.approx(m["mrr@1"])
    assert m["hr@100"] == 1.0


def test_finalize_rejects_empty_and_combine_rejects_mismatch():
    with pytest.raises(ValueError, match="count is 0"):
        finalize_metrics({"hr@10": 0.0, "count": 0})
    with pytest.raises(ValueError, match="different keys"):
        combine_sums([metric_sums(torch.tensor([1]), [10]), metric_sums(torch.tensor([1]), [5])])
