"""Full-ranking metrics as shard-exact sums: HR, NDCG, MRR and Recall at a list of cut-offs.

Rank of a target = 1 + the number of items whose score is *strictly* higher, over all items
1..n_items (column 0, the padding item, never ranks). Ties are thus resolved in the target's
favour. For one target with rank r and cut-off K:

    HR@K = Recall@K = 1[r <= K]      NDCG@K = 1[r <= K] / log2(r + 1)      MRR@K = 1[r <= K] / r

so HR@K >= NDCG@K >= MRR@K for every target (and for their means). With one held-out item per
user, Recall@K equals HR@K. Workers return `metric_sums` over their shard of users; adding the
dicts key by key (an all-reduce) and calling `finalize_metrics` gives the metrics of all users.

Non-finite scores (NaN, +inf, -inf) rank as the worst there is, never as a hit. An item with a
non-finite score is below every finite score: it never counts above a finite target (also +inf,
which only a broken model produces). A target with a non-finite score ranks last: every other
candidate item (all items but the padding item and the excluded ones) counts above it, so a model
that outputs NaN gets rank n_items, HR@10 = 0 (whenever more than 10 items can rank). Callers
that must not report such metrics at all check the scores themselves (`evaluate_model`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

METRICS = ("hr", "ndcg", "mrr", "recall")


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, *, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Rank of each target among all items (1 = best).

    Args:
        scores: (B, I + 1) float scores; column 0 is the padding item and never ranks.
        targets: (B,) int64 item indices in 1..I.
        exclude: optional (B, L) int64 item indices (e.g. the user's history) left out of the
            ranking (they never count above the target); 0 entries are ignored and the target
            itself is never excluded.
    Returns:
        (B,) int64 ranks, 1 + the number of items scoring strictly higher than the target; a
        target with a non-finite score: 1 + the number of other candidate items (last place).
    """
    targets = targets.to(device=scores.device, dtype=torch.long)
    target_score = scores.gather(1, targets[:, None])  # (B, 1)
    # non-finite -> -inf: below every finite score. NaN then marks the items that are no
    # candidates (padding, excluded, the target itself): it compares False with everything.
    masked = scores.masked_fill(~torch.isfinite(scores), float("-inf"))  # (B, I + 1), a copy
    masked[:, 0] = float("nan")
    if exclude is not None:
        masked.scatter_(1, exclude.to(device=scores.device, dtype=torch.long), float("nan"))
    masked.scatter_(1, targets[:, None], float("nan"))
    higher = (masked > target_score).sum(dim=1)  # (B,); a NaN target: 0, replaced below
    others = (~torch.isnan(masked)).sum(dim=1)  # (B,) every other candidate
    ranks = torch.where(torch.isfinite(target_score[:, 0]), higher, others)
    return ranks.to(torch.long) + 1


def metric_sums(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Per-metric sums over a batch of ranks, plus the count.

    Args:
        ranks: (B,) int64 ranks from `target_ranks`.
        ks: cut-offs, e.g. [10, 20].
    Returns:
        {"hr@K": sum, "ndcg@K": sum, "mrr@K": sum, "recall@K": sum for each K, "count": B}.
    """
    r = ranks.detach().to(torch.float64).cpu()
    out: dict[str, float] = {}
    for k in ks:
        hit = (r <= k).to(torch.float64)
        out[f"hr@{k}"] = float(hit.sum())
        out[f"ndcg@{k}"] = float((hit / torch.log2(r + 1.0)).sum())
        out[f"mrr@{k}"] = float((hit / r).sum())
        out[f"recall@{k}"] = float(hit.sum())
    out["count"] = int(r.numel())
    return out


def finalize_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Means from sums: every key except "count" divided by "count".

    Raises:
        ValueError: "count" is missing or zero.
    """
    count = sums.get("count", 0)
    if not count:
        raise ValueError("finalize_metrics: no evaluated users (count is 0)")
    return {key: value / count for key, value in sums.items() if key != "count"}


__all__ = ["METRICS", "finalize_metrics", "metric_sums", "target_ranks"]
