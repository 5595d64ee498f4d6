"""`prepare`: an interaction log file -> a prepared dataset directory (see docs/architecture.md).

Pipeline (the same pure functions from `transforms` in both execution paths):

1. read and validate the file in one streaming pass (`readers.iter_interactions`), numbering rows
   by file position;
2. rating filter, per batch;
3. group each user's interactions into one chronological sequence (sort by timestamp, ties in file
   order), dropping repeated (user, item) pairs when `dedup`;
4. iterative k-core on users and items, until nothing changes;
5. ids -> contiguous indices from 1 in order of first appearance (0 is padding);
6. write sequences, the id mappings and meta.json to a temporary directory beside the target,
   then rename it into place.

On Ray (`echomamba_dist.distributed.prepare.prepare_on_ray`, which hands `prepare` its own
`transform`) steps 2-5 run on Ray Data: batches go to the object store (which spills to
disk), step 3 is a hash shuffle on the user column followed by `map_batches`, and the global
steps only gather vocabularies (one row per distinct item or user) on the driver, never the log.
The text reader itself is a single sequential pass on the driver (it must be, to name lines in
its errors); a log bigger than the driver's memory streams through it batch by batch. The final
remapped sequences (8 bytes an interaction) are gathered on the driver to be written as one file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from echomamba_dist.data import readers
from echomamba_dist.data import transforms as T
from echomamba_dist.errors import DataError, OutputError
from echomamba_dist.io import atomic_dir, check_output_dir

FORMAT_VERSION = 1
DATASET_FILES = ("sequences.parquet", "items.parquet", "users.parquet", "meta.json")
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PrepareOptions:
    """How `prepare` filters and orders a log. Recorded verbatim in meta.json["options"]."""

    fmt: str | None = None  # input format (readers.FORMATS); None: detected from the file
    min_rating: float | None = None  # keep interactions with rating >= this; None: keep all
    dedup: bool = True  # keep only the earliest interaction of each (user, item) pair
    k_core: int = 5  # iterative k-core on users and items (>= k each); 0 or 1: no filtering

    def __post_init__(self) -> None:
        if self.fmt is not None and self.fmt not in readers.FORMATS:
            raise DataError(f"--format: expected one of {', '.join(readers.FORMATS)}, got {self.fmt!r}")
        if self.k_core < 0:
            raise DataError(f"--k-core: expected a non-negative integer, got {self.k_core}")
        if self.min_rating is not None and not math.isfinite(self.min_rating):
            raise DataError(f"--min-rating: expected a finite number, got {self.min_rating}")


@dataclass(frozen=True, eq=False)
class PreparedTables:
    """The in-memory result of preparation, before it is written."""

    sequences: pa.Table  # transforms.INDEXED_SCHEMA, sorted by user_idx = 1..U
    user_ids: pa.Array  # string (U,): original id of user_idx i + 1 at position i
    item_ids: pa.Array  # string (I,): original id of item_idx i + 1 at position i

    @property
    def n_interactions(self) -> int:
        return int(pc.sum(pc.list_value_length(self.sequences.column("items"))).as_py() or 0)


def prepare(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    options: PrepareOptions | None = None,
    *,
    overwrite: bool = False,
    transform: Callable[[Iterator[pa.Table], PrepareOptions, Path], PreparedTables] | None = None,
    **option_overrides: Any,
) -> dict:
    """Prepare `input_path` into `output_dir` atomically and return its meta dict.

    Args:
        input_path: the interaction log (see `readers` for formats).
        output_dir: the directory to create; it must not exist or be empty unless `overwrite`.
        options: `PrepareOptions`; keyword overrides (fmt=, min_rating=, dedup=, k_core=) replace
            its fields.
        transform: steps 2-5, from the validated batches of the file to the prepared tables;
            None: `prepare_table` in this process (Ray Data's is `distributed.prepare`'s).
        overwrite: replace an existing non-empty output directory, only if it is a prepared
            dataset (`is_prepared_dataset`) that does not hold the input.
    Returns:
        The meta dict written to meta.json (format_version, n_users, n_items, n_interactions,
        avg_length, options, source).
    Raises:
        DataError: bad input (named file and line/column), a filter that leaves no interaction, or
            an output path that cannot be used (`OutputError`: see `check_prepare_output`). No
            output or temporary directory is left behind on any error.
    """
    options = dataclasses.replace(options or PrepareOptions(), **option_overrides)
    src = Path(input_path)
    fmt = options.fmt or readers.detect_format(src)
    out = Path(output_dir)
    check_prepare_output(out, src, overwrite=overwrite)  # before any work

    batches = _read_batches(src, fmt, options)
    if transform is not None:
        tables = transform(batches, options, src)
    else:
        tables = prepare_table(pa.concat_tables(list(batches)), options, source=src, numbered=True)

    n_users, n_items = len(tables.user_ids), len(tables.item_ids)
    n_inter = tables.n_interactions
    meta = {
        "format_version": FORMAT_VERSION,
        "n_users": n_users,
        "n_items": n_items,
        "n_interactions": n_inter,
        "avg_length": round(n_inter / n_users, 4),
        "options": {**dataclasses.asdict(options), "fmt": fmt},
        "source": {"path": str(src.resolve()), "sha256": file_sha256(src), "format": fmt},
    }
    write_prepared(out, tables, meta, overwrite=overwrite)
    return meta


def prepare_table(
    interactions: pa.Table, options: PrepareOptions, *, source: str | os.PathLike = "<memory>", numbered: bool = False
) -> PreparedTables:
    """Run steps 2-5 in this process on a whole interaction table.

    Args:
        interactions: `readers.INTERACTION_SCHEMA` columns (plus ``row`` when `numbered`).
        options: the filters; `options.fmt` is ignored.
        source: the name used in error messages.
        numbered: the table already has its ``row`` column (else rows are numbered 0, 1, ...).
    Returns:
        `PreparedTables`.
    Raises:
        DataError: a filter left no interaction, or min_rating without ratings.
    """
    table = interactions if numbered else T.add_row_numbers(interactions, 0)
    if options.min_rating is not None and not T.has_ratings(table):
        raise no_ratings_error(source, options)
    table = T.filter_min_rating(table, options.min_rating)
    sequences = T.k_core(T.group_sequences(table, dedup=options.dedup), options.k_core)
    if sequences.num_rows == 0:
        raise nothing_left_error(source, options)
    items = T.merge_vocab([T.item_vocab(sequences)]).column("id").combine_chunks()
    users = T.merge_vocab([T.user_vocab(sequences)]).column("id").combine_chunks()
    indexed = T.remap_sequences(sequences, users=users, items=items).sort_by("user_idx")
    return PreparedTables(indexed, users, items)


def format_stats(meta: dict) -> str:
    """The statistics block `echomamba prepare` prints (several lines, no trailing newline)."""
    opts = meta.get("options", {})
    src = meta.get("source", {})
    lines = [
        f"source:        {src.get('path', '?')} ({src.get('format', '?')}, sha256 {str(src.get('sha256', '?'))[:12]})",
        f"options:       min_rating={opts.get('min_rating')} dedup={opts.get('dedup')} k_core={opts.get('k_core')}",
        f"users:         {meta['n_users']:,}",
        f"items:         {meta['n_items']:,}",
        f"interactions:  {meta['n_interactions']:,}",
        f"avg length:    {meta['avg_length']:.2f}",
    ]
    return "\n".join(lines)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_prepared_dataset(path: str | os.PathLike) -> bool:
    """Whether directory `path` is a prepared dataset as `prepare` writes it: a meta.json with a
    format_version, and no file or directory besides the dataset's own files."""
    p = Path(path)
    try:
        names = {c.name for c in p.iterdir()}
        meta = json.loads((p / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format_version" in meta and names <= set(DATASET_FILES)


def check_prepare_output(out: str | os.PathLike, source: str | os.PathLike | None, *, overwrite: bool) -> None:
    """Refuse an output directory that `prepare` must not write or replace.

    Raises:
        OutputError: `out` is a file; a non-empty directory without `overwrite`; with `overwrite`,
            a directory that is not a prepared dataset, or one that holds `source` (the input).
    """
    out = Path(out)
    if source is not None and out.is_dir():
        src, root = Path(source).resolve(), out.resolve()
        if src == root or root in src.parents:
            raise OutputError(f"{out}: holds the input {source}; choose an output directory outside it")
    check_output_dir(out, overwrite=overwrite, owned=is_prepared_dataset, what="prepared dataset")


def write_prepared(out: str | os.PathLike, tables: PreparedTables, meta: dict, *, overwrite: bool = False) -> None:
    """Write a prepared dataset to `out` atomically: a temporary sibling directory, then rename.

    Raises:
        OutputError: as `check_prepare_output` (the input is `meta["source"]["path"]`), or the
            directory cannot be written. Nothing is left behind and `out` is untouched.
    """
    check_prepare_output(out, meta.get("source", {}).get("path"), overwrite=overwrite)
    with atomic_dir(out, overwrite=overwrite, owned=is_prepared_dataset, what="prepared dataset") as tmp:
        pq.write_table(tables.sequences, tmp / "sequences.parquet")
        n_items, n_users = len(tables.item_ids), len(tables.user_ids)
        pq.write_table(
            pa.table({"item_idx": pa.array(range(1, n_items + 1), pa.int64()), "item_id": tables.item_ids}),
            tmp / "items.parquet",
        )
        pq.write_table(
            pa.table({"user_idx": pa.array(range(1, n_users + 1), pa.int64()), "user_id": tables.user_ids}),
            tmp / "users.parquet",
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Internals


def _read_batches(src: Path, fmt: str, options: PrepareOptions):
    """Numbered interaction batches; raises DataError at the end if min_rating has no ratings."""
    start = 0
    seen_rating = False
    for batch in readers.iter_interactions(src, fmt):
        seen_rating = seen_rating or T.has_ratings(batch)
        yield T.add_row_numbers(batch, start)
        start += batch.num_rows
    if options.min_rating is not None and not seen_rating:
        raise no_ratings_error(src, options)


def no_ratings_error(source, options: PrepareOptions) -> DataError:
    return DataError(
        f"{source}: column 'rating': --min-rating {options.min_rating} needs ratings, the file has none"
    )


def nothing_left_error(source, options: PrepareOptions) -> DataError:
    return DataError(
        f"{source}: no interactions left after filtering (min_rating={options.min_rating}, "
        f"dedup={options.dedup}, k_core={options.k_core}); expected at least one user to remain"
    )


__all__ = [
    "FORMAT_VERSION", "PrepareOptions", "PreparedTables", "check_prepare_output", "format_stats", "is_prepared_dataset",
    "prepare", "prepare_table", "write_prepared",
]
