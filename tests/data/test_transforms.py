"""Pure transforms on hand-made tables: rating filter, ordering, dedup, k-core, remap."""

from __future__ import annotations

import pyarrow as pa

from echomamba_dist.data import transforms as T


def _log(rows: list[tuple]) -> pa.Table:
    """Interactions from (user, item, timestamp[, rating]) tuples, numbered in list order."""
    return T.add_row_numbers(
        pa.table(
            {
                "user": [r[0] for r in rows],
                "item": [r[1] for r in rows],
                "timestamp": [float(r[2]) for r in rows],
                "rating": pa.array([r[3] if len(r) > 3 else None for r in rows], pa.float64()),
            }
        ),
        0,
    )


def _seqs(table: pa.Table) -> dict[str, list[str]]:
    return dict(zip(table.column("user").to_pylist(), table.column("items").to_pylist()))


def test_filter_min_rating_keeps_at_threshold_and_drops_nulls():
    log = _log([("u", "a", 1, 3.0), ("u", "b", 2, 4.0), ("u", "c", 3, 5.0), ("u", "d", 4)])
    assert T.filter_min_rating(log, 4).column("item").to_pylist() == ["b", "c"]
    assert T.filter_min_rating(log, None) is log
    assert T.has_ratings(log) and not T.has_ratings(_log([("u", "a", 1)]))


def test_chronological_order_ties_keep_file_order():
    log = _log([("u", "x", 5), ("v", "p", 1), ("u", "y", 3), ("u", "z", 5), ("u", "w", 3)])
    seqs = T.group_sequences(log, dedup=False)
    assert _seqs(seqs) == {"u": ["y", "w", "x", "z"], "v": ["p"]}
    assert dict(zip(seqs.column("user").to_pylist(), seqs.column("first_row").to_pylist())) == {"u": 0, "v": 1}
    assert _seqs(seqs)["u"] == [r for r in ["y", "w", "x", "z"]]
    rows = dict(zip(seqs.column("user").to_pylist(), seqs.column("rows").to_pylist()))
    assert rows["u"] == [2, 4, 0, 3]


def test_dedup_keeps_the_earliest_interaction():
    log = _log([("u", "x", 3), ("u", "y", 2), ("u", "x", 1), ("u", "y", 2), ("v", "x", 9)])
    assert _seqs(T.group_sequences(log, dedup=True)) == {"u": ["x", "y"], "v": ["x"]}
    assert _seqs(T.group_sequences(log, dedup=False)) == {"u": ["x", "y", "y", "x"], "v": ["x"]}


def test_group_sequences_does_not_depend_on_row_order_in_the_batch():
    rows = [("u", "x", 3), ("v", "y", 1), ("u", "z", 1), ("w", "x", 2), ("v", "x", 1)]
    log = _log(rows)
    shuffled = log.take(pa.array([4, 2, 0, 3, 1]))
    assert _seqs(T.group_sequences(log)) == _seqs(T.group_sequences(shuffled))


def test_k_core_cascades_to_a_fixed_point():
    # b has 1 user -> A keeps [a] and C keeps [c]: both too short -> then a and c have 2 users each.
    log = _log([("A", "a", 1), ("A", "b", 2), ("B", "a", 3), ("B", "c", 4), ("C", "c", 5),
                ("D", "a", 6), ("D", "c", 7)])
    seqs = T.group_sequences(log)
    assert _seqs(T.k_core(seqs, 2)) == {"B": ["a", "c"], "D": ["a", "c"]}
    assert _seqs(T.k_core(seqs, 1)) == _seqs(seqs)
    assert T.k_core(seqs, 3).num_rows == 0  # cascades to nothing


def test_k_core_counts_with_ge():
    log = _log([(u, i, t) for t, (u, i) in enumerate((u, i) for u in "ABC" for i in "xyz")])
    assert T.k_core(T.group_sequences(log), 3).num_rows == 3  # exactly 3 each: kept
    assert T.k_core(T.group_sequences(log), 4).num_rows == 0


def test_vocab_and_remap_by_first_appearance():
    log = _log([("v", "b", 2), ("u", "c", 1), ("u", "b", 0), ("v", "a", 3)])
    seqs = T.group_sequences(log)
    items = T.merge_vocab([T.item_vocab(seqs.slice(0, 1)), T.item_vocab(seqs.slice(1))])
    users = T.merge_vocab([T.user_vocab(seqs)])
    assert items.to_pydict() == {"id": ["b", "c", "a"], "count": [2, 1, 1], "first_row": [0, 1, 3]}
    assert users.to_pydict() == {"id": ["v", "u"], "count": [2, 2], "first_row": [0, 1]}
    indexed = T.remap_sequences(seqs, users=users.column("id").combine_chunks(), items=items.column("id").combine_chunks())
    assert dict(zip(indexed.column("user_idx").to_pylist(), indexed.column("items").to_pylist())) == {
        1: [1, 3],  # v: b (ts 2), a (ts 3)
        2: [1, 2],  # u: b (ts 0), c (ts 1)
    }


def test_filter_sequences_recomputes_first_row():
    log = _log([("u", "a", 0), ("u", "b", 1), ("v", "b", 2)])
    seqs = T.group_sequences(log)
    out = T.filter_sequences(seqs, keep_items=pa.array(["b"]), min_length=1)
    assert dict(zip(out.column("user").to_pylist(), out.column("first_row").to_pylist())) == {"u": 1, "v": 2}
    assert T.filter_sequences(seqs.slice(0, 0), keep_items=pa.array(["b"]), min_length=1).num_rows == 0
