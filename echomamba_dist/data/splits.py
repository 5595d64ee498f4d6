"""Leave-one-out splits and training samples: pure, vectorised NumPy over (offsets, items).

Sequences are stored CSR-style: user u (0-based, u = user_idx - 1) has the chronological items
``items[offsets[u]:offsets[u + 1]]``. Every matrix produced here is right-padded with 0 (the
padding item) and keeps the *most recent* `max_len` items when a sequence is longer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class LeaveOneOut:
    """The paper's split. User indices are 0-based rows of the original `offsets`."""

    train_offsets: np.ndarray  # int64 (U + 1,)
    train_items: np.ndarray  # int64 (T,): each user's items without the last two (see policy)
    valid_users: np.ndarray  # int64 (V,)
    valid_target: np.ndarray  # int64 (V,): the second-to-last item; input = train part
    test_users: np.ndarray  # int64 (V,)
    test_target: np.ndarray  # int64 (V,): the last item; input = train part + validation item


def leave_one_out(offsets: np.ndarray, items: np.ndarray) -> LeaveOneOut:
    """Split every sequence: last item test, second-to-last validation, the rest training.

    Policy for short users: a user is evaluated only with >= 3 items, so that the validation and
    the test input are both non-empty and the two user sets are the same. A user with 1 or 2
    items is in neither `valid_users` nor `test_users`, and all of their items are their training
    part (a 2-item user yields one training sample; a 1-item user none). After the default 5-core
    filter no such user exists.

    Args:
        offsets: int64 (U + 1,), non-decreasing, offsets[0] == 0.
        items: int64 (offsets[-1],).
    Returns:
        `LeaveOneOut`.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    lengths = np.diff(offsets)  # (U,)
    evaluated = lengths >= 3
    users = np.flatnonzero(evaluated).astype(np.int64)
    train_len = np.where(evaluated, lengths - 2, lengths)
    train_offsets = np.r_[0, np.cumsum(train_len)].astype(np.int64)
    # Keep position p of user u when p - offsets[u] < train_len[u].
    owner = np.repeat(np.arange(len(lengths)), lengths)
    pos_in_user = np.arange(len(items)) - offsets[:-1][owner]
    train_items = items[pos_in_user < train_len[owner]]
    return LeaveOneOut(
        train_offsets=train_offsets,
        train_items=train_items,
        valid_users=users,
        valid_target=items[offsets[users + 1] - 2],
        test_users=users.copy(),
        test_target=items[offsets[users + 1] - 1],
    )


def history_matrix(
    offsets: np.ndarray, items: np.ndarray, users: np.ndarray, *, cut: int, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """The input sequences of `users`: their items without the last `cut`, most recent `max_len`.

    Validation input is `cut=2` and test input `cut=1` on the full (offsets, items).

    Args:
        offsets, items: the CSR sequences.
        users: int64 (n,) 0-based user rows.
        cut: items dropped from the end of each sequence (>= 0).
        max_len: columns of the output.
    Returns:
        seq: int64 (n, max_len), right-padded with 0; seq_len: int64 (n,), the number of real
        items in each row (0 when a user has no more than `cut` items).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    users = np.asarray(users, dtype=np.int64)
    end = np.maximum(offsets[users + 1] - cut, offsets[users])  # (n,)
    return _window(np.asarray(items, dtype=np.int64), end - offsets[users], end, max_len)


def prefix_samples(
    train_offsets: np.ndarray, train_items: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every prefix of length >= 1 of each training part predicts the item after it.

    A training part of m items gives m - 1 samples; the input never contains its target or
    anything after it, as bidirectional and FFT models require. Samples are ordered by user, then
    by prefix length.

    Returns:
        item_seq: int64 (S, max_len) right-padded, the most recent max_len items of the prefix;
        seq_len: int64 (S,); target: int64 (S,).
    """
    train_offsets = np.asarray(train_offsets, dtype=np.int64)
    train_items = np.asarray(train_items, dtype=np.int64)
    lengths = np.diff(train_offsets)
    n_samples = np.maximum(lengths - 1, 0)  # (U,)
    owner = np.repeat(np.arange(len(lengths)), n_samples)  # (S,)
    first = np.repeat(train_offsets[:-1] + 1 - np.r_[0, np.cumsum(n_samples)[:-1]], n_samples)
    target_pos = first + np.arange(len(owner))  # (S,) absolute position of each target
    prefix_len = target_pos - train_offsets[:-1][owner]
    seq, seq_len = _window(train_items, prefix_len, target_pos, max_len)
    return seq, seq_len, train_items[target_pos]


def all_position_samples(
    train_offsets: np.ndarray, train_items: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample per user with >= 2 training items, a target at every position (causal models).

    Input = training part without its last item, target[t] = training part[t + 1]; when the input
    is longer than `max_len` only the most recent `max_len` positions are kept (older positions
    are not trained on in this mode).

    Returns:
        item_seq: int64 (S, max_len); seq_len: int64 (S,); target: int64 (S, max_len), 0 on padding.
    """
    train_offsets = np.asarray(train_offsets, dtype=np.int64)
    train_items = np.asarray(train_items, dtype=np.int64)
    lengths = np.diff(train_offsets)
    users = np.flatnonzero(lengths >= 2)
    end = train_offsets[users + 1]  # (S,)
    seq, seq_len = _window(train_items, lengths[users] - 1, end - 1, max_len)
    target, _ = _window(train_items, lengths[users] - 1, end, max_len)
    return seq, seq_len, target


def pad_right(sequences: list[np.ndarray] | list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack sequences into (n, max_len) int64 right-padded with 0, keeping the last max_len items.

    Returns:
        seq: int64 (n, max_len); seq_len: int64 (n,).
    """
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    items = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if len(sequences) else np.zeros(0, np.int64)
    end = np.cumsum(lengths)
    return _window(items, lengths, end, max_len)


def pad_left(sequences: list[np.ndarray] | list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Like `pad_right`, but the padding comes first and the most recent item is in the last column."""
    seq, seq_len = pad_right(sequences, max_len)
    n = len(seq_len)
    shift = (max_len - seq_len)[:, None]  # (n, 1)
    cols = (np.arange(max_len)[None, :] - shift) % max_len  # source column of each output column
    out = seq[np.arange(n)[:, None], cols]
    out[np.arange(max_len)[None, :] < shift] = 0
    return out, seq_len


def _window(items: np.ndarray, available: np.ndarray, end: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of items[end - L : end] with L = min(available, max_len), right-padded to max_len."""
    seq_len = np.minimum(np.asarray(available, dtype=np.int64), max_len)  # (n,)
    start = np.asarray(end, dtype=np.int64) - seq_len
    col = np.arange(max_len, dtype=np.int64)[None, :]  # (1, L)
    valid = col < seq_len[:, None]  # (n, L)
    idx = np.where(valid, start[:, None] + col, 0)
    seq = np.where(valid, items[idx] if len(items) else 0, 0).astype(np.int64)
    return seq, seq_len


__all__ = [
    "LeaveOneOut",
    "all_position_samples",
    "history_matrix",
    "leave_one_out",
    "pad_left",
    "pad_right",
    "prefix_samples",
]
