"""Leave-one-out, history matrices and the two training-sample modes (windows), on hand-made sequences."""

from __future__ import annotations

import numpy as np
import pytest

from echomamba_dist.data.splits import (
    all_position_windows,
    build_windows,
    history_matrix,
    leave_one_out,
    pad_right,
    prefix_windows,
    window_batch,
)

# user 0: 1..5, user 1: [7] (1 item), user 2: [8, 9] (2 items), user 3: [4, 3, 2]
OFFSETS = np.array([0, 5, 6, 8, 11])
ITEMS = np.array([1, 2, 3, 4, 5, 7, 8, 9, 4, 3, 2])


def test_leave_one_out_and_short_user_policy():
    s = leave_one_out(OFFSETS, ITEMS)
    # users with < 3 items are not evaluated and keep all their items for training
    assert s.valid_users.tolist() == [0, 3] and s.test_users.tolist() == [0, 3]
    assert s.valid_target.tolist() == [4, 3] and s.test_target.tolist() == [5, 2]
    assert s.train_offsets.tolist() == [0, 3, 4, 6, 7]
    assert s.train_items.tolist() == [1, 2, 3, 7, 8, 9, 4]


def test_history_matrix_cut_truncation_and_padding():
    seq, seq_len = history_matrix(OFFSETS, ITEMS, np.array([0, 3, 1]), cut=1, max_len=3)
    assert seq.tolist() == [[2, 3, 4], [4, 3, 0], [0, 0, 0]]  # most recent kept; right padding
    assert seq_len.tolist() == [3, 2, 0]
    seq, seq_len = history_matrix(OFFSETS, ITEMS, np.array([0]), cut=2, max_len=5)
    assert seq.tolist() == [[1, 2, 3, 0, 0]] and seq_len.tolist() == [3]
    assert seq.dtype == np.int64 and seq_len.dtype == np.int64


def rows(windows, max_len):
    """Every sample of `windows` as padded rows."""
    return window_batch(windows, np.arange(len(windows)), max_len=max_len)


def test_prefix_samples():
    s = leave_one_out(OFFSETS, ITEMS)
    windows = prefix_windows(s.train_offsets, s.train_items)
    assert windows.end.tolist() == [1, 2, 5] and windows.lengths().tolist() == [1, 2, 1]
    assert windows.end.dtype == np.int32  # 4 bytes a sample
    assert windows.items is s.train_items and windows.offsets is s.train_offsets  # shared, not copied
    seq, seq_len, target = rows(windows, max_len=2)
    # user 0 train [1, 2, 3]: [1]->2, [1, 2]->3; user 2 train [8, 9]: [8]->9; users 1 and 3: none
    assert seq.tolist() == [[1, 0], [1, 2], [8, 0]]
    assert seq_len.tolist() == [1, 2, 1]
    assert target.tolist() == [2, 3, 9]
    seq, seq_len, target = rows(prefix_windows(np.array([0, 4]), np.array([5, 6, 7, 8])), max_len=2)
    assert seq.tolist() == [[5, 0], [5, 6], [6, 7]] and target.tolist() == [6, 7, 8]
    assert all(a.dtype == np.int64 for a in (seq, seq_len, target))


def test_prefix_inputs_never_contain_their_target_position():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 12, size=50)
    offsets = np.r_[0, np.cumsum(lengths)]
    items = np.arange(1, offsets[-1] + 1)  # unique items: position is identifiable
    seq, seq_len, target = rows(prefix_windows(offsets, items), max_len=4)
    assert len(target) == np.maximum(lengths - 1, 0).sum()
    for row, n, t in zip(seq, seq_len, target):
        assert n >= 1 and (row[:n] < t).all() and (row[n:] == 0).all()
        assert row[n - 1] == t - 1  # the item right before the target


def test_all_position_samples():
    windows = all_position_windows(np.array([0, 4, 5, 7]), np.array([5, 6, 7, 8, 9, 1, 2]))
    assert windows.end.tolist() == [3, 6] and windows.lengths().tolist() == [3, 1]  # one window a user
    seq, seq_len, target = rows(windows, max_len=5)
    assert seq.tolist() == [[5, 6, 7, 0, 0], [1, 0, 0, 0, 0]]
    assert target.tolist() == [[6, 7, 8, 0, 0], [2, 0, 0, 0, 0]]
    assert seq_len.tolist() == [3, 1]
    seq, seq_len, target = rows(all_position_windows(np.array([0, 4]), np.array([5, 6, 7, 8])), max_len=2)
    assert seq.tolist() == [[6, 7]] and target.tolist() == [[7, 8]] and seq_len.tolist() == [2]


def test_window_batch_of_some_samples_trimmed_and_of_none():
    windows = prefix_windows(np.array([0, 4, 7]), np.array([5, 6, 7, 8, 1, 2, 3]))
    seq, seq_len, target = window_batch(windows, np.array([4, 0, 2]), max_len=3)
    # sample 4 is [1, 2] -> 3; sample 0 is [5] -> 6; sample 2 is [5, 6, 7] -> 8
    assert seq.tolist() == [[1, 2, 0], [5, 0, 0], [5, 6, 7]] and seq_len.tolist() == [2, 1, 3]
    assert target.tolist() == [3, 6, 8]
    seq, seq_len, target = window_batch(windows, np.array([4, 0]), max_len=3, trim=True)
    assert seq.tolist() == [[1, 2], [5, 0]] and target.tolist() == [3, 6]  # as wide as the longest
    seq, seq_len, target = window_batch(all_position_windows(np.array([0, 4, 7]), np.array([5, 6, 7, 8, 1, 2, 3])),
                                        np.array([1]), max_len=5, trim=True)  # fmt: skip
    assert seq.tolist() == [[1, 2]] and target.tolist() == [[2, 3]]
    seq, seq_len, target = window_batch(windows, np.zeros(0, dtype=np.int64), max_len=3)
    assert seq.shape == (0, 3) and seq_len.shape == target.shape == (0,)
    assert len(build_windows(np.array([0, 0, 1]), np.array([4]), "prefix")) == 0  # no user has 2 items
    with pytest.raises(ValueError, match="unknown sample mode 'next'"):
        build_windows(np.array([0, 4]), np.array([5, 6, 7, 8]), "next")


def test_pad_helpers():
    seq, n = pad_right([[1, 2, 3], [4]], 2)
    assert seq.tolist() == [[2, 3], [4, 0]] and n.tolist() == [2, 1]
    seq, n = pad_right([[1, 2, 3], [4], []], 3)
    assert seq.tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]] and n.tolist() == [3, 1, 0]


def test_a_random_log_matches_a_per_user_loop():
    """The vectorised split and windows against plain per-user Python, on a random log with empty,
    1-, 2- and 3-item users and sequences longer than max_len."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 15, size=300)
    offsets = np.r_[0, np.cumsum(lengths)]
    items = rng.integers(1, 60, size=offsets[-1])
    users = [items[offsets[u] : offsets[u + 1]].tolist() for u in range(len(lengths))]
    max_len = 6
    s = leave_one_out(offsets, items)
    evaluated = [u for u, seq in enumerate(users) if len(seq) >= 3]
    train = [seq[:-2] if len(seq) >= 3 else seq for seq in users]
    assert s.valid_users.tolist() == s.test_users.tolist() == evaluated
    assert s.valid_target.tolist() == [users[u][-2] for u in evaluated]
    assert s.test_target.tolist() == [users[u][-1] for u in evaluated]
    assert s.train_items.tolist() == [i for seq in train for i in seq]

    def padded(seq):
        seq = seq[-max_len:]
        return seq + [0] * (max_len - len(seq))

    seq, seq_len, target = rows(prefix_windows(s.train_offsets, s.train_items), max_len)
    expected = [(padded(t[:k]), min(k, max_len), t[k]) for t in train for k in range(1, len(t))]
    assert list(zip(seq.tolist(), seq_len.tolist(), target.tolist())) == expected
    seq, seq_len, target = rows(all_position_windows(s.train_offsets, s.train_items), max_len)
    expected = [(padded(t[:-1]), min(len(t) - 1, max_len), padded(t[1:])) for t in train if len(t) >= 2]
    assert list(zip(seq.tolist(), seq_len.tolist(), target.tolist())) == expected
    seq, seq_len = history_matrix(offsets, items, s.test_users, cut=1, max_len=max_len)
    assert seq.tolist() == [padded(users[u][:-1]) for u in evaluated]
    assert seq_len.tolist() == [min(len(users[u]) - 1, max_len) for u in evaluated]
