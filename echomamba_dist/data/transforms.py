"""Pure Arrow/NumPy transforms that turn interactions into remapped, chronological sequences.

They take tables and return tables, touch no files and no Ray, so `prepare` runs the very same
functions either in-process or inside Ray Data `map_batches` tasks. Two kinds of table flow:

- interactions (`readers.INTERACTION_SCHEMA` plus ``row``: int64, the interaction's position in
  the file): filtered per batch (`filter_min_rating`);
- user sequences (`SEQUENCE_SCHEMA`): one row per user, built by `group_sequences` from all of a
  user's interactions (a batch may hold many users, but never part of one).

Chronological order and its tie-break: a user's interactions are sorted by (timestamp, row), i.e.
equal timestamps keep file order. Sequence text gets timestamp = position in the file, so its
order is the file's. Duplicates of a (user, item) pair keep the earliest interaction in that order.

Index assignment: users and items get contiguous indices from 1 (0 is padding) in order of their
first appearance in the file among the interactions that survive filtering (min ``row``). Files
whose ids are already 1..n in order of appearance (the S3-Rec Amazon files) keep their ids.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SEQUENCE_SCHEMA = pa.schema(
    [
        ("user", pa.string()),
        ("items", pa.list_(pa.string())),  # chronological
        ("rows", pa.list_(pa.int64())),  # file position of each item (for first-appearance order)
        ("first_row", pa.int64()),  # min(rows): the user's first appearance
    ]
)
VOCAB_SCHEMA = pa.schema([("id", pa.string()), ("count", pa.int64()), ("first_row", pa.int64())])
INDEXED_SCHEMA = pa.schema([("user_idx", pa.int64()), ("items", pa.list_(pa.int64()))])


def add_row_numbers(table: pa.Table, start: int) -> pa.Table:
    """Append column ``row`` = start, start + 1, ... (int64): the file position of each row."""
    return table.append_column("row", pa.array(np.arange(start, start + table.num_rows, dtype=np.int64)))


def filter_min_rating(table: pa.Table, min_rating: float | None) -> pa.Table:
    """Keep interactions with rating >= `min_rating` (all of them when `min_rating` is None).

    Rows with a null rating are dropped when a threshold is given (the caller checks beforehand
    that the file has ratings at all).
    """
    if min_rating is None:
        return table
    keep = pc.fill_null(pc.greater_equal(table.column("rating"), float(min_rating)), False)
    return table.filter(keep)


def has_ratings(table: pa.Table) -> bool:
    """Whether any interaction in `table` carries a rating."""
    return table.column("rating").null_count < table.num_rows


def group_sequences(table: pa.Table, *, dedup: bool = True) -> pa.Table:
    """Group interactions into one chronological sequence per user.

    Args:
        table: interactions with columns user, item, timestamp, row; must hold *all* of each of
            its users' interactions.
        dedup: drop repeated (user, item) pairs, keeping the earliest by (timestamp, row).
    Returns:
        Table with `SEQUENCE_SCHEMA`, one row per user, items sorted by (timestamp, row).
        Row order is unspecified (indices are assigned later by first appearance).
    """
    if table.num_rows == 0:
        return SEQUENCE_SCHEMA.empty_table()
    user_enc = pc.dictionary_encode(table.column("user")).combine_chunks()
    u = user_enc.indices.to_numpy().astype(np.int64)  # (N,)
    ts = table.column("timestamp").to_numpy()
    row = table.column("row").to_numpy()
    items = table.column("item").combine_chunks()
    if dedup:
        i = pc.dictionary_encode(items).indices.to_numpy().astype(np.int64)
        order = np.lexsort((row, ts, i, u))  # earliest first inside each (user, item)
        su, si = u[order], i[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = (su[1:] != su[:-1]) | (si[1:] != si[:-1])
        keep = order[first]
        u, ts, row = u[keep], ts[keep], row[keep]
        items = items.take(pa.array(keep))
    order = np.lexsort((row, ts, u))  # by user, then time, then file position
    u, row = u[order], row[order]
    items = items.take(pa.array(order))
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])  # (U,)
    offsets = pa.array(np.r_[starts, len(u)].astype(np.int32))
    return pa.table(
        {
            "user": user_enc.dictionary.take(pa.array(u[starts])),
            "items": pa.ListArray.from_arrays(offsets, items),
            "rows": pa.ListArray.from_arrays(offsets, pa.array(row)),
            "first_row": pa.array(np.minimum.reduceat(row, starts)),
        },
        schema=SEQUENCE_SCHEMA,
    )


def item_vocab(sequences: pa.Table) -> pa.Table:
    """Per-item interaction count and first appearance within a batch of sequences.

    Returns:
        Table with `VOCAB_SCHEMA` (id, count, first_row), one row per distinct item; combine the
        results of many batches with `merge_vocab`.
    """
    flat = pa.table(
        {
            "id": pc.list_flatten(sequences.column("items")),
            "row": pc.list_flatten(sequences.column("rows")),
        }
    )
    agg = flat.group_by("id").aggregate([("row", "count"), ("row", "min")])
    return pa.table(
        {"id": agg.column("id"), "count": agg.column("row_count"), "first_row": agg.column("row_min")},
        schema=VOCAB_SCHEMA,
    )


def user_vocab(sequences: pa.Table) -> pa.Table:
    """Per-user sequence length and first appearance: `VOCAB_SCHEMA` (id, count, first_row)."""
    return pa.table(
        {
            "id": sequences.column("user"),
            "count": pc.cast(pc.list_value_length(sequences.column("items")), pa.int64()),
            "first_row": sequences.column("first_row"),
        },
        schema=VOCAB_SCHEMA,
    )


def merge_vocab(parts: list[pa.Table]) -> pa.Table:
    """Combine per-batch vocabularies: counts add up, first_row takes the minimum.

    Returns:
        `VOCAB_SCHEMA` table sorted by first appearance (first_row, then id) — the index order.
    """
    if not parts:
        return VOCAB_SCHEMA.empty_table()
    table = pa.concat_tables(parts)
    agg = table.group_by("id").aggregate([("count", "sum"), ("first_row", "min")])
    merged = pa.table(
        {"id": agg.column("id"), "count": agg.column("count_sum"), "first_row": agg.column("first_row_min")},
        schema=VOCAB_SCHEMA,
    )
    return merged.sort_by([("first_row", "ascending"), ("id", "ascending")])


def filter_sequences(sequences: pa.Table, *, keep_items: pa.Array, min_length: int) -> pa.Table:
    """One k-core step on user sequences: drop items not in `keep_items`, then short users.

    Args:
        sequences: `SEQUENCE_SCHEMA` table.
        keep_items: string array of the items that stay.
        min_length: users left with fewer items than this are dropped.
    Returns:
        `SEQUENCE_SCHEMA` table (first_row recomputed over the remaining items).
    """
    if sequences.num_rows == 0:
        return sequences
    items = sequences.column("items").combine_chunks()
    rows = sequences.column("rows").combine_chunks()
    flat_items = pc.list_flatten(items)
    flat_rows = pc.list_flatten(rows).to_numpy()
    parent = pc.list_parent_indices(items).to_numpy()  # (N,) row of each flattened item
    keep = pc.is_in(flat_items, value_set=keep_items).to_numpy(zero_copy_only=False)
    lengths = np.bincount(parent[keep], minlength=sequences.num_rows)  # (U,)
    keep_user = lengths >= max(min_length, 1)
    keep &= keep_user[parent]
    lengths = lengths[keep_user]
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    kept_rows = flat_rows[keep]
    first_row = np.minimum.reduceat(kept_rows, offsets[:-1]) if len(lengths) else np.zeros(0, np.int64)
    return pa.table(
        {
            "user": sequences.column("user").filter(pa.array(keep_user)),
            "items": pa.ListArray.from_arrays(pa.array(offsets), flat_items.filter(pa.array(keep))),
            "rows": pa.ListArray.from_arrays(pa.array(offsets), pa.array(kept_rows)),
            "first_row": pa.array(first_row, pa.int64()),
        },
        schema=SEQUENCE_SCHEMA,
    )


def k_core_items(vocab: pa.Table, k: int) -> pa.Array:
    """The item ids of `vocab` with at least `k` interactions (string array)."""
    return vocab.column("id").filter(pc.greater_equal(vocab.column("count"), k)).combine_chunks()


def k_core(sequences: pa.Table, k: int) -> pa.Table:
    """Iterative k-core in memory: repeat (drop items with < k users, then users with < k items)
    until nothing changes. The result is the unique maximal subset where every user and every item
    has >= k interactions. k <= 1 returns `sequences` unchanged.
    """
    if k <= 1:
        return sequences
    while True:
        vocab = item_vocab(sequences)
        before = int(pc.sum(vocab.column("count")).as_py() or 0)
        sequences = filter_sequences(sequences, keep_items=k_core_items(vocab, k), min_length=k)
        after = int(pc.sum(pc.list_value_length(sequences.column("items"))).as_py() or 0)
        if after == before:
            return sequences


def remap_sequences(sequences: pa.Table, *, users: pa.Array, items: pa.Array) -> pa.Table:
    """Replace original ids by indices: position in `users` / `items` plus 1 (0 is padding).

    Args:
        sequences: `SEQUENCE_SCHEMA` table.
        users, items: string arrays in index order (index i + 1 for element i); every id in
            `sequences` must appear in them.
    Returns:
        `INDEXED_SCHEMA` table (user_idx, items), row order as in `sequences`.
    """
    user_idx = pc.add(pc.index_in(sequences.column("user"), value_set=users), 1)
    item_lists = sequences.column("items").combine_chunks()
    flat = pc.add(pc.index_in(pc.list_flatten(item_lists), value_set=items), 1)
    offsets = pc.subtract(item_lists.offsets, item_lists.offsets[0])
    return pa.table(
        {
            "user_idx": pc.cast(user_idx, pa.int64()),
            "items": pa.ListArray.from_arrays(offsets, pc.cast(flat, pa.int64())),
        },
        schema=INDEXED_SCHEMA,
    )


__all__ = [
    "INDEXED_SCHEMA",
    "SEQUENCE_SCHEMA",
    "VOCAB_SCHEMA",
    "add_row_numbers",
    "filter_min_rating",
    "filter_sequences",
    "group_sequences",
    "has_ratings",
    "item_vocab",
    "k_core",
    "k_core_items",
    "merge_vocab",
    "remap_sequences",
    "user_vocab",
]
