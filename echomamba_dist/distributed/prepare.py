"""`prepare` on Ray Data: steps 2-5 of `echomamba_dist.data.prepare` (rating filter, grouping into
sequences, k-core, id remap) as Ray Data transforms of the same pure functions.

Batches of the validated file go to the object store (which spills to disk); grouping is a hash
shuffle on the user column followed by `map_batches`; the global steps gather only vocabularies
(one row per distinct item or user) on the driver, never the log. The remapped sequences
(8 bytes an interaction) are gathered on the driver, which writes them as one file.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from echomamba_dist.data import transforms as T
from echomamba_dist.data.prepare import (
    PreparedTables,
    PrepareOptions,
    nothing_left_error,
    prepare,
)
from echomamba_dist.distributed.runtime import init_ray, quiet_data

log = logging.getLogger(__name__)


def prepare_on_ray(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    options: PrepareOptions | None = None,
    *,
    overwrite: bool = False,
    **option_overrides: Any,
) -> dict:
    """`echomamba_dist.data.prepare.prepare` with its transforms on Ray Data.

    Uses the Ray of this process when there is one; otherwise starts one (`init_ray`: the local
    Ray, or `RAY_ADDRESS`) and shuts it down afterwards. Same arguments, result and errors.
    """
    started = not ray.is_initialized()
    init_ray()
    quiet_data()
    try:
        return prepare(input_path, output_dir, options, overwrite=overwrite, transform=transform_on_ray,
                       **option_overrides)
    finally:
        if started:
            ray.shutdown()


def transform_on_ray(batches: Iterator[pa.Table], options: PrepareOptions, source: Path) -> PreparedTables:
    """Steps 2-5 on Ray Data; only vocabularies come back to the driver before the final write."""
    t0 = time.perf_counter()
    refs, n_rows = [], 0
    for batch in batches:  # streams: the driver holds one batch at a time
        refs.append(ray.put(batch))
        n_rows += batch.num_rows
    ds = ray.data.from_arrow_refs(refs)
    if options.min_rating is not None:
        ds = ds.map_batches(T.filter_min_rating, fn_kwargs={"min_rating": options.min_rating}, batch_format="pyarrow")
    n_parts = max(2, math.ceil(n_rows / 2_000_000))
    # Hash-partition on user so that every block holds all interactions of its users; a whole
    # block is one batch (batch_size=None), as in Ray's own map_groups.
    ds = ds.repartition(n_parts, keys=["user"]).map_batches(
        T.group_sequences, fn_kwargs={"dedup": options.dedup}, batch_format="pyarrow", batch_size=None
    )
    ds = ds.materialize()
    log.info("read and grouped %d interactions: %.1f s", n_rows, time.perf_counter() - t0)

    def vocab(dataset, fn) -> pa.Table:
        parts = ray.get(dataset.map_batches(fn, batch_format="pyarrow").to_arrow_refs())
        return T.merge_vocab([p for p in parts if p.num_rows])

    items = vocab(ds, T.item_vocab)
    if options.k_core > 1:
        while True:
            before = int(pc.sum(items.column("count")).as_py() or 0)
            keep = T.k_core_items(items, options.k_core)
            ds = ds.map_batches(
                T.filter_sequences,
                fn_kwargs={"keep_items": keep, "min_length": options.k_core},
                batch_format="pyarrow",
            ).materialize()
            items = vocab(ds, T.item_vocab)
            log.info("k-core pass: %d -> %d interactions, %.1f s",
                     before, int(pc.sum(items.column("count")).as_py() or 0), time.perf_counter() - t0)
            if int(pc.sum(items.column("count")).as_py() or 0) == before:
                break
    users = vocab(ds, T.user_vocab)
    if users.num_rows == 0:
        raise nothing_left_error(source, options)
    user_ids = users.column("id").combine_chunks()
    item_ids = items.column("id").combine_chunks()
    indexed = ds.map_batches(
        T.remap_sequences, fn_kwargs={"users": user_ids, "items": item_ids}, batch_format="pyarrow"
    )
    # The output is one file written by the driver, so gather and order it here (no shuffle).
    parts = [p for p in ray.get(indexed.to_arrow_refs()) if p.num_rows]
    sequences = pa.concat_tables(parts).cast(T.INDEXED_SCHEMA).sort_by("user_idx")
    log.info("remapped: %.1f s", time.perf_counter() - t0)
    if sequences.num_rows != len(user_ids):
        raise RuntimeError("internal error: a user appears in more than one block")
    return PreparedTables(sequences, user_ids, item_ids)


