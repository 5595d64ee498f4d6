"""Batch recommendation: top-K items (original ids) for users of a prepared dataset.

`recommend_users` runs in one process; `echomamba_dist.distributed.recommend.recommend_on_ray`
runs the same scoring (`BatchScorer`) on Ray Data with the model held by a pool of actors (GPU
actors when asked), for catalogues of users too large for one machine. Both write the same Parquet layout: user_id, rank, item_id, score.

A user gets fewer than K rows when fewer than K items are left to recommend (the catalogue minus
the history the model reads, with `exclude_history`); `available_items` counts them beforehand.
Outputs are written atomically, refuse an existing path unless `overwrite`, and then replace only
recommendations this project wrote (`is_recommendations_file`, `is_recommendations_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from echomamba_dist.io import atomic_file
from echomamba_dist.serve.load import LoadedModel, load_model, pad_histories, topk_items

SCHEMA = pa.schema([("user_id", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()), ("score", pa.float32())])


def user_histories(ds, users: list[int] | np.ndarray) -> list[np.ndarray]:
    """Each user's whole history (item indices, oldest first): the input for the next item."""
    return [ds.items[ds.offsets[u] : ds.offsets[u + 1]] for u in users]


def recommendations_table(
    user_ids: list[str], top: np.ndarray, scores: np.ndarray, item_ids: list[str]
) -> pa.Table:
    """Long format: one row per (user, rank); the places `topk_items` filled with item 0 are left out."""
    n, k = top.shape
    real = top.reshape(-1) > 0
    return pa.table(
        {
            "user_id": pa.array(np.repeat(np.asarray(user_ids, dtype=object), k)[real], pa.string()),
            "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), n)[real]),
            "item_id": pa.array(np.asarray(item_ids, dtype=object)[top.reshape(-1)[real]], pa.string()),
            "score": pa.array(scores.reshape(-1)[real].astype(np.float32)),
        },
        schema=SCHEMA,
    )


def available_items(ds, users: list[int] | np.ndarray, *, max_len: int, exclude_history: bool = True) -> np.ndarray:
    """How many items each user can be recommended: all `ds.n_items`, less (with
    `exclude_history`) the distinct items of the last `max_len` of the history, which the model
    reads and `topk_items` leaves out. Returns (len(users),) int64."""
    users = np.asarray(users, dtype=np.int64)
    if not exclude_history or len(users) == 0:
        return np.full(len(users), ds.n_items, dtype=np.int64)
    ends = ds.offsets[users + 1]
    starts = np.maximum(ds.offsets[users], ends - max_len)
    lengths = ends - starts
    owner = np.repeat(np.arange(len(users)), lengths)  # (total,) the user of each history item
    position = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    items = ds.items[np.repeat(starts, lengths) + position]
    pairs = np.unique(owner * (ds.n_items + 1) + items)  # distinct (user, item)
    seen = np.bincount(pairs // (ds.n_items + 1), minlength=len(users))
    return ds.n_items - seen


def is_recommendations_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a Parquet file with the columns `write_recommendations` writes."""
    try:
        return pq.read_schema(path).names == SCHEMA.names
    except Exception:  # not Parquet, unreadable: not ours
        return False


def is_recommendations_dir(path: str | os.PathLike) -> bool:
    """Whether directory `path` holds only Parquet files of recommendations (`distributed.recommend.recommend_on_ray`)."""
    try:
        entries = list(Path(path).iterdir())
    except OSError:
        return False
    return all(e.is_file() and e.suffix == ".parquet" and is_recommendations_file(e) for e in entries)


def recommend_users(loaded: LoadedModel, ds, users: list[int], *, k: int, exclude_history: bool = True) -> pa.Table:
    """Top-k recommendations for `users` (0-based positions in `ds`) as a table of original ids."""
    seq, seq_len = pad_histories(user_histories(ds, users), loaded.config.data.max_len)
    top, scores = topk_items(loaded.model, seq, seq_len, k=k, exclude_history=exclude_history)
    item_ids = [str(x) for x in ds.item_ids]
    return recommendations_table([str(ds.user_ids[u]) for u in users], top, scores, item_ids)


def write_recommendations(table: pa.Table, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write a recommendations table to Parquet atomically (temporary file, then rename).

    Raises:
        OutputError: `path` exists and not `overwrite`, or is not a recommendations file; it is a
            directory; it cannot be written (see `echomamba_dist.io.atomic_file`).
    """
    with atomic_file(path, overwrite=overwrite, owned=is_recommendations_file, what="recommendations file") as tmp:
        pq.write_table(table, tmp)


class BatchScorer:
    """A Ray Data actor: loads the model once, scores batches of histories."""

    def __init__(self, checkpoint: str, item_ids: list[str], k: int, exclude_history: bool, use_gpu: bool) -> None:
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.loaded = load_model(checkpoint, device=self.device)
        self.item_ids = item_ids
        self.k = k
        self.exclude_history = exclude_history

    def __call__(self, batch: pa.Table) -> pa.Table:
        histories = batch.column("history").to_pylist()
        seq, seq_len = pad_histories(histories, self.loaded.config.data.max_len)
        top, scores = topk_items(
            self.loaded.model, seq, seq_len, k=self.k, exclude_history=self.exclude_history, device=self.device
        )
        return recommendations_table(batch.column("user_id").to_pylist(), top, scores, self.item_ids)
