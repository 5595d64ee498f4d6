"""Full-ranking evaluation by the leave-one-out protocol, exact across shards of users.

Every rank scores the users `users[rank::world_size]`, so each user is scored exactly once over
all workers (no padding duplicates, no dropped users); the metric *sums* and the count are then
summed across workers, which makes 1 and N workers give identical metrics for the same model.

No metric is reported from non-finite scores without saying so: users whose scores hold NaN or
infinity are counted (across workers too), and by default `evaluate_model` then raises
`NonFiniteScores` on every rank alike; with `allow_nonfinite` it ranks their targets last
(`metrics.target_ranks`) and returns the count as "nonfinite_users".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from echomamba_dist.errors import NonFiniteScores
from echomamba_dist.train.metrics import finalize_metrics, metric_sums, target_ranks


@dataclass(frozen=True)
class EvalSet:
    """Inputs and targets of one evaluation split (validation or test)."""

    item_seq: np.ndarray  # (n, max_len) int64, right-padded with 0
    seq_len: np.ndarray  # (n,) int64, >= 1
    target: np.ndarray  # (n,) int64
    users: np.ndarray  # (n,) int64 user positions (0-based) in the prepared dataset

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def shard(self, rank: int, world_size: int) -> "EvalSet":
        """This rank's users: every `world_size`-th one starting at `rank` (exact partition)."""
        sl = slice(rank, None, world_size)
        return EvalSet(self.item_seq[sl], self.seq_len[sl], self.target[sl], self.users[sl])


AllReduce = Callable[[dict[str, float]], dict[str, float]]


def _identity(sums: dict[str, float]) -> dict[str, float]:
    return sums


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    data: EvalSet,
    *,
    ks: list[int],
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    all_reduce: AllReduce = _identity,
    exclude_history: bool = False,
    autocast_dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, float]:
    """Score this rank's shard of `data` against all items; return metrics averaged over all users.

    Args:
        model: a SequentialRecommender (not DDP-wrapped), evaluated in eval mode.
        data: the whole split; this function takes its own shard.
        ks: cut-offs for HR/NDCG/MRR/Recall.
        batch_size: users scored at once on this rank.
        all_reduce: sums metric sums across ranks (identity in one process).
        exclude_history: set the history items' scores to -inf before ranking.
        allow_nonfinite: rank the targets of users with NaN or infinite scores last instead of
            raising; the result then also holds "nonfinite_users".
    Returns:
        {"hr@10": ..., "ndcg@10": ..., "mrr@10": ..., "recall@10": ..., "count": users}.
    Raises:
        NonFiniteScores: some user's scores hold NaN or infinity (not `allow_nonfinite`).
    """
    was_training = model.training
    model.eval()
    shard = data.shard(rank, world_size)
    # score users in order of history length so that each batch is trimmed to little padding
    order = np.argsort(shard.seq_len, kind="stable")
    shard = EvalSet(shard.item_seq[order], shard.seq_len[order], shard.target[order], shard.users[order])
    sums: dict[str, float] = {f"{m}@{k}": 0.0 for m in ("hr", "ndcg", "mrr", "recall") for k in ks}
    sums["count"] = 0.0
    sums["nonfinite"] = 0.0  # users with a NaN or infinite score for some item
    for start in range(0, len(shard), batch_size):
        stop = start + batch_size
        seq_len = torch.from_numpy(shard.seq_len[start:stop]).to(device)
        width = int(seq_len.max())  # models are padding-independent: trim to the longest
        item_seq = torch.from_numpy(shard.item_seq[start:stop, :width]).to(device)
        target = torch.from_numpy(shard.target[start:stop]).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            scores = model.score_all(item_seq, seq_len)
        ranks = target_ranks(scores.float(), target, exclude=item_seq if exclude_history else None)
        sums["nonfinite"] += float((~torch.isfinite(scores[:, 1:])).any(dim=1).sum())
        for key, value in metric_sums(ranks, ks).items():
            sums[key] += float(value)
    sums = all_reduce(sums)
    model.train(was_training)
    nonfinite = sums.pop("nonfinite")
    if nonfinite and not allow_nonfinite:
        raise NonFiniteScores(
            f"the model scores {int(nonfinite)} of {int(sums['count'])} users with NaN or infinity "
            f"(diverged weights); no metric is computed from such scores"
        )
    extra = {"nonfinite_users": nonfinite} if allow_nonfinite else {}
    return {**finalize_metrics(sums), "count": sums["count"], **extra}


def popularity_metrics(
    train_items: np.ndarray, n_items: int, data: EvalSet, *, ks: list[int]
) -> dict[str, float]:
    """Metrics of ranking every user's items by training popularity (the baseline to beat)."""
    counts = np.bincount(train_items, minlength=n_items + 1)[1:]  # padding never ranks
    target_counts = counts[data.target - 1]
    ordered = np.sort(counts)
    higher = len(ordered) - np.searchsorted(ordered, target_counts, side="right")
    ranks = torch.from_numpy((1 + higher).astype(np.int64))  # same rule as target_ranks
    return finalize_metrics(metric_sums(ranks, ks))
