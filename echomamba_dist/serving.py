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


class _Scorer:
    """A Ray Data actor: loads the model once, scores batches of histories."""

    def __init__(self, checkpoint: str, item_ids: list[str], k: int, exclude_history: bool, use_gpu: bool) -> None:
        import torch

        from echomamba_dist.inference import load_model

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


def recommend_on_ray(
    checkpoint: str | os.PathLike,
    ds,
    output_dir: str | os.PathLike,
    *,
    k: int,
    exclude_history: bool = True,
    num_actors: int = 2,
    use_gpu: bool = False,
    batch_size: int = 4096,
) -> int:
    """Top-k for every user of `ds` on Ray Data, the model held by a pool of `num_actors` actors
    (one GPU each with `use_gpu`); Parquet files written to `output_dir` atomically.

    Returns the number of users scored.
    """
    import shutil
    import tempfile

    import ray.data

    from echomamba_dist.ray_train import init_ray

    init_ray()
    lengths = np.diff(ds.offsets)
    table = pa.table(
        {
            "user_id": pa.array([str(u) for u in ds.user_ids], pa.string()),
            "history": pa.ListArray.from_arrays(pa.array(ds.offsets.astype(np.int32)), pa.array(ds.items)),
        }
    )
    table = table.filter(pa.array(lengths > 0))
    # enough blocks that every actor gets work, none larger than one batch
    chunk = max(1, min(batch_size, -(-table.num_rows // max(num_actors, 1))))
    users = ray.data.from_arrow([table.slice(i, chunk) for i in range(0, table.num_rows, chunk)] or [table])
    recs = users.map_batches(
        _Scorer,
        fn_constructor_kwargs={
            "checkpoint": str(Path(checkpoint).resolve()),
            "item_ids": [str(x) for x in ds.item_ids],
            "k": k,
            "exclude_history": exclude_history,
            "use_gpu": use_gpu,
        },
        batch_format="pyarrow",
        batch_size=batch_size,
        concurrency=num_actors,
        num_gpus=1 if use_gpu else None,
    )
    out = Path(output_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        recs.write_parquet(str(staging))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return int(table.num_rows)
