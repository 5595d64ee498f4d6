"""Full-ranking metrics on hand-computed cases, and their invariants."""

from __future__ import annotations

import math

import pytest
import torch

from echomamba_dist.train.metrics import finalize_metrics, metric_sums, target_ranks

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
    parts: dict[str, float] = {}
    for chunk in ranks.split(137):  # what the all-reduce of shards' sums does
        for key, value in metric_sums(chunk, [5, 10, 50]).items():
            parts[key] = parts.get(key, 0.0) + value
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


def test_finalize_rejects_empty():
    with pytest.raises(ValueError, match="count is 0"):
        finalize_metrics({"hr@10": 0.0, "count": 0})


# ---- non-finite scores rank as the worst, never as a hit (issue 14)

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "row, target, exclude, rank",
    [
        #  pad   1    2    3    4
        ([0.0, 1.0, NAN, 2.0, 3.0], 3, None, 2),  # a NaN item never counts above a finite target
        ([0.0, 1.0, INF, 2.0, 3.0], 3, None, 2),  # nor does +inf (only a broken model makes it)
        ([0.0, 1.0, -INF, 2.0, 3.0], 1, None, 3),  # -inf: below every finite score, as before
        ([0.0, 1.0, 2.0, NAN, 3.0], 3, None, 4),  # a NaN target: last of the 4 candidates
        ([0.0, 1.0, 2.0, INF, 3.0], 3, None, 4),  # +inf is no hit either
        ([0.0, 1.0, 2.0, -INF, 3.0], 3, None, 4),
        ([0.0, NAN, NAN, NAN, NAN], 3, None, 4),  # all NaN: nothing ties in the target's favour
        ([0.0, 1.0, 2.0, NAN, 3.0], 3, [[2, 0]], 3),  # excluded items are no candidates
        ([0.0, 1.0, 2.0, NAN, 3.0], 3, [[3, 4]], 3),  # the target is never excluded
        ([NAN, 1.0, 2.0, 3.0, 4.0], 4, None, 1),  # the padding column never ranks, NaN or not
    ],
)
def test_non_finite_scores_rank_last(row, target, exclude, rank):
    ex = None if exclude is None else torch.tensor(exclude)
    assert target_ranks(torch.tensor([row]), torch.tensor([target]), exclude=ex).tolist() == [rank]


def test_a_model_that_outputs_nan_scores_zero_not_one():
    n_users, n_items = 50, 40
    targets = torch.randint(1, n_items + 1, (n_users,))
    scores = torch.full((n_users, n_items + 1), NAN)
    m = finalize_metrics(metric_sums(target_ranks(scores, targets), [10]))
    assert m == {"hr@10": 0.0, "ndcg@10": 0.0, "mrr@10": 0.0, "recall@10": 0.0}
    assert target_ranks(scores, targets).tolist() == [n_items] * n_users  # last place, every one


class _NanModel(torch.nn.Module):
    """A recommender whose weights diverged: every score is NaN (or, with `rows`, those users')."""

    def __init__(self, n_items: int, rows: slice = slice(None)) -> None:
        super().__init__()
        self.n_items, self.rows = n_items, rows

    def score_all(self, item_seq, seq_len):
        scores = torch.arange(self.n_items + 1, dtype=torch.float32).repeat(len(seq_len), 1)  # (B, I + 1)
        scores[self.rows] = float("nan")
        return scores


def _eval_set(n_users: int = 30, n_items: int = 20):
    import numpy as np

    from echomamba_dist.train.evaluate import EvalSet

    rng = np.random.default_rng(0)
    seq = rng.integers(1, n_items + 1, (n_users, 5))
    return EvalSet(seq, np.full(n_users, 5), rng.integers(1, n_items + 1, n_users), np.arange(n_users))


def test_evaluate_model_refuses_or_scores_zero_for_a_nan_model():
    from echomamba_dist.errors import NonFiniteScores
    from echomamba_dist.train.evaluate import evaluate_model

    data = _eval_set()
    kwargs = {"ks": [10], "batch_size": 8, "device": torch.device("cpu")}
    with pytest.raises(NonFiniteScores, match="scores 30 of 30 users with NaN or infinity"):
        evaluate_model(_NanModel(20), data, **kwargs)
    m = evaluate_model(_NanModel(20), data, allow_nonfinite=True, **kwargs)
    assert m["hr@10"] == 0.0 and m["ndcg@10"] == 0.0 and m["nonfinite_users"] == 30 and m["count"] == 30
    # the first 4 users of each batch of 8 (8, 8, 8, 6): counted over all batches
    with pytest.raises(NonFiniteScores, match="scores 16 of 30 users"):
        evaluate_model(_NanModel(20, rows=slice(0, 4)), data, **kwargs)
    finite = evaluate_model(_NanModel(20, rows=slice(0, 0)), data, **kwargs)
    assert "nonfinite_users" not in finite and finite["count"] == 30
