"""Batch recommendation: top-K items (original ids) for users of a prepared dataset.

`recommend_users` runs in one process; `recommend_on_ray` runs the same scoring on Ray Data with
the model held by a pool of actors (GPU actors when asked), for catalogues of users too large for
one machine. Both write the same Parquet layout: user_id, rank, item_id, score.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from echomamba_dist.inference import LoadedModel, pad_histories, topk_items

SCHEMA = pa.schema([("user_id", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()), ("score", pa.float32())])


def user_histories(ds, users: list[int] | np.ndarray) -> list[np.ndarray]:
    """Each user's whole history (item indices, oldest first): the input for the next item."""
    return [ds.items[ds.offsets[u] : ds.offsets[u + 1]] for u in users]


def recommendations_table(
    user_ids: list[str], top: np.ndarray, scores: np.ndarray, item_ids: list[str]
) -> pa.Table:
    """Long format: one row per (user, rank)."""
    n, k = top.shape
    return pa.table(
        {
            "user_id": pa.array(np.repeat(np.asarray(user_ids, dtype=object), k), pa.string()),
            "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), n)),
            "item_id": pa.array(np.asarray(item_ids, dtype=object)[top.reshape(-1)], pa.string()),
            "score": pa.array(scores.reshape(-1).astype(np.float32)),
        },
        schema=SCHEMA,
    )


def recommend_users(loaded: LoadedModel, ds, users: list[int], *, k: int, exclude_history: bool = True) -> pa.Table:
    """Top-k recommendations for `users` (0-based positions in `ds`) as a table of original ids."""
    seq, seq_len = pad_histories(user_histories(ds, users), loaded.config.data.max_len)
    top, scores = topk_items(loaded.model, seq, seq_len, k=k, exclude_history=exclude_history)
    item_ids = [str(x) for x in ds.item_ids]
    return recommendations_table([str(ds.user_ids[u]) for u in users], top, scores, item_ids)


def write_recommendations(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a recommendations table to Parquet atomically (temporary file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, p)
