"""Batch recommendation on Ray Data: top-K items for every user of a prepared dataset, scored by a
pool of actors that each hold the model (`serve.batch.BatchScorer`, one GPU each when asked), and
written as the same Parquet layout as `serve.batch.write_recommendations`, in a directory."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray.data

from echomamba_dist.distributed.runtime import init_ray
from echomamba_dist.distributed.trainer import worker_exception
from echomamba_dist.errors import NonFiniteScores
from echomamba_dist.io import atomic_dir, check_output_dir
from echomamba_dist.serve.batch import BatchScorer, is_recommendations_dir


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
    overwrite: bool = False,
) -> int:
    """Top-k for every user of `ds` on Ray Data, the model held by a pool of `num_actors` actors
    (one GPU each with `use_gpu`); Parquet files written to `output_dir` atomically.

    Returns the number of users scored.
    Raises:
        OutputError: `output_dir` is a file, or a non-empty directory without `overwrite`, or with
            `overwrite` one that holds other files than recommendations; it cannot be written.
        NonFiniteScores: the model scores some user with NaN or infinity.
    """
    owned = is_recommendations_dir
    check_output_dir(output_dir, overwrite=overwrite, owned=owned, what="recommendations directory")  # before Ray
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
        BatchScorer,
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
    with atomic_dir(Path(output_dir).resolve(), overwrite=overwrite, owned=owned, what="recommendations directory") as staging:
        try:
            recs.write_parquet(str(staging))
        except Exception as exc:  # an actor's NonFiniteScores arrives wrapped by Ray, maybe as text only
            found = worker_exception(exc, NonFiniteScores)
            text = re.search(r"NonFiniteScores: ([^\n]+)", str(exc))
            if found is None and text is None:
                raise
            raise NonFiniteScores(str(found).splitlines()[0] if found is not None else text.group(1).strip()) from None
    return int(table.num_rows)
