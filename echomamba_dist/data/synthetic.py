"""A seeded synthetic interaction log with real sequential signal.

Generative story (all vectorised over users, one step a position):

- the catalogue is split into `n_topics` topics of near-equal size; inside a topic, item
  popularity follows a Zipf law with exponent `popularity_skew` over a random ranking;
- every item has `N_SUCCESSORS` likely successors in its own topic (drawn by popularity);
- a user starts in a random topic at a popular item; at each next step, with probability
  `topic_stickiness` they stay in the topic and move to one of the current item's successors
  (weights `SUCCESSOR_WEIGHTS`) with probability `P_FOLLOW`, else to a popular item of the topic;
  otherwise they switch to a random topic and pick a popular item there;
- lengths are `min_length` plus a geometric number with mean `mean_length - min_length`;
- timestamps increase along each user's sequence.

So the next item is far more predictable from the last one than from popularity alone: a
first-order transition-count model beats popularity by a wide margin (tested).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from echomamba_dist.config import SyntheticConfig

N_SUCCESSORS = 3
SUCCESSOR_WEIGHTS = np.array([0.6, 0.25, 0.15])
P_FOLLOW = 0.85


def generate_synthetic(cfg: SyntheticConfig) -> pa.Table:
    """Generate the interaction log described in the module docstring.

    Args:
        cfg: sizes and shape parameters; `cfg.seed` makes the output reproducible.
    Returns:
        pyarrow.Table with columns user (string "u<k>"), item (string "i<k>"), timestamp
        (float64, increasing within a user), rating (float64, all null); rows grouped by user
        in chronological order. About n_users * mean_length rows.
    """
    rng = np.random.default_rng(cfg.seed)
    n_items, n_topics, n_users = cfg.n_items, cfg.n_topics, cfg.n_users

    # Topics: a random partition of the items; item_pos[k] = position of item k in topic order.
    perm = rng.permutation(n_items)  # items in topic order
    topic_sizes = np.full(n_topics, n_items // n_topics)
    topic_sizes[: n_items % n_topics] += 1
    topic_start = np.r_[0, np.cumsum(topic_sizes)[:-1]]  # (T,)
    topic_of_pos = np.repeat(np.arange(n_topics), topic_sizes)  # (I,)
    topic_of_item = np.empty(n_items, dtype=np.int64)
    topic_of_item[perm] = topic_of_pos

    # Zipf popularity inside each topic; one CDF per topic, shifted by the topic number so a
    # single searchsorted samples from any topic: position = searchsorted(cdf, topic + u).
    # `perm` is random, so ranking by position inside the topic is a random ranking of its items.
    rank_in_topic = np.arange(n_items) - topic_start[topic_of_pos]  # (I,)
    weights = 1.0 / (rank_in_topic + 1.0) ** cfg.popularity_skew
    sums = np.bincount(topic_of_pos, weights=weights, minlength=n_topics)
    cdf = np.empty(n_items)
    for t in range(n_topics):
        s, e = topic_start[t], topic_start[t] + topic_sizes[t]
        cdf[s:e] = t + np.cumsum(weights[s:e]) / sums[t]
        cdf[e - 1] = t + 1.0 - 1e-12

    def popular(topics: np.ndarray) -> np.ndarray:
        """One item per entry of `topics`, drawn by within-topic popularity."""
        pos = np.searchsorted(cdf, topics + rng.random(len(topics)) * (1 - 1e-9), side="right")
        return perm[np.minimum(pos, n_items - 1)]

    # Successors: N_SUCCESSORS popular items of the same topic (a random item may repeat).
    successors = popular(np.repeat(topic_of_item, N_SUCCESSORS)).reshape(n_items, N_SUCCESSORS)
    succ_cdf = np.cumsum(SUCCESSOR_WEIGHTS) / SUCCESSOR_WEIGHTS.sum()

    extra = cfg.mean_length - cfg.min_length
    if extra > 0:
        lengths = cfg.min_length + rng.geometric(1.0 / (extra + 1.0), size=n_users) - 1
    else:
        lengths = np.full(n_users, cfg.min_length)
    lengths = lengths.astype(np.int64)  # (U,)
    max_len = int(lengths.max())
    offsets = np.r_[0, np.cumsum(lengths)]
    total = int(offsets[-1])
    items = np.empty(total, dtype=np.int64)

    topic = rng.integers(n_topics, size=n_users)
    current = popular(topic)
    items[offsets[:-1]] = current
    for t in range(1, max_len):
        active = np.flatnonzero(lengths > t)  # users still generating
        cur, top = current[active], topic[active]
        r = rng.random(len(active))
        stay = r < cfg.topic_stickiness
        follow = stay & (rng.random(len(active)) < P_FOLLOW)
        switch = ~stay
        top = np.where(switch, rng.integers(n_topics, size=len(active)), top)
        nxt = popular(top)
        k = np.searchsorted(succ_cdf, rng.random(len(active)), side="right")
        nxt = np.where(follow, successors[cur, np.minimum(k, N_SUCCESSORS - 1)], nxt)
        current[active] = nxt
        topic[active] = top
        items[offsets[:-1][active] + t] = nxt

    user = np.repeat(np.arange(n_users), lengths)
    position = np.arange(total) - np.repeat(offsets[:-1], lengths)
    start_time = rng.integers(0, 10**6, size=n_users).astype(np.float64)
    timestamp = np.repeat(start_time, lengths) + position * 60.0
    return pa.table(
        {
            "user": _ids("u", user, n_users),
            "item": _ids("i", items, n_items),
            "timestamp": pa.array(timestamp),
            "rating": pa.nulls(total, pa.float64()),
        }
    )


def _ids(prefix: str, codes: np.ndarray, n: int) -> pa.Array:
    """String ids prefix + code, built once per distinct code (dictionary decode)."""
    names = pa.array([f"{prefix}{k}" for k in range(n)], pa.string())
    return names.take(pa.array(codes))


__all__ = ["generate_synthetic"]
