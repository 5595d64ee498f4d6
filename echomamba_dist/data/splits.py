"""Leave-one-out splits and training samples: pure, vectorised NumPy over (offsets, items).

Sequences are stored CSR-style: user u (0-based, u = user_idx - 1) has the chronological items
``items[offsets[u]:offsets[u + 1]]``. Every matrix produced here is right-padded with 0 (the
padding item) and keeps the *most recent* `max_len` items when a sequence is longer.

Training samples are `Windows` into the training part's CSR arrays (4 bytes a sample), not
(samples, max_len) matrices: `window_batch` cuts a batch's rows out when the batch is built.
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
    # drop each evaluated user's last two items; a 1-byte mask keeps the peak near the output's size
    keep = np.ones(len(items), dtype=bool)
    keep[offsets[users + 1] - 1] = False
    keep[offsets[users + 1] - 2] = False
    train_items = items[keep]
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


@dataclass(frozen=True, eq=False)
class Windows:
    """Training samples as windows into CSR sequences, cut into batches by `window_batch`.

    Sample s reads its input from ``items[end[s] - L : end[s]]`` with L = min(lengths[s], max_len)
    (the most recent items), where lengths[s] counts the items before end[s] in the same sequence;
    its target is the item after each input position: in "prefix" mode one target,
    ``items[end[s]]``; in "all_positions" mode one per position, ``items[end[s] - L + 1 : end[s] + 1]``.
    Memory: the CSR arrays (shared, not copied) plus 4 bytes a sample, whatever max_len is.
    """

    offsets: np.ndarray  # int64 (U + 1,): the CSR offsets of `items`
    items: np.ndarray  # int64 (T,): the CSR items the windows point into
    end: np.ndarray  # int32 (int64 past 2**31 items) (S,): one past the input's last item, non-decreasing
    mode: str  # "prefix" or "all_positions"

    def __len__(self) -> int:
        return len(self.end)

    def lengths(self, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        """int64: how many items precede `end` in its sequence, for samples `idx` (default all)."""
        end = self.end[idx].astype(np.int64)
        user = np.searchsorted(self.offsets, end, side="right") - 1  # the sequence holding end - 1
        return end - self.offsets[user]


def _position_dtype(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


def prefix_windows(train_offsets: np.ndarray, train_items: np.ndarray) -> Windows:
    """Every prefix of length >= 1 of each training part predicts the item after it.

    A training part of m items gives m - 1 samples; the input never contains its target or
    anything after it, as bidirectional and FFT models require. Samples are ordered by user, then
    by prefix length.

    Args:
        train_offsets: int64 (U + 1,) CSR offsets; train_items: int (T,).
    Returns:
        `Windows` in "prefix" mode: end = the target's position.
    """
    train_offsets = np.asarray(train_offsets, dtype=np.int64)
    train_items = np.asarray(train_items, dtype=np.int64)
    n = np.maximum(np.diff(train_offsets) - 1, 0)  # (U,) samples per user
    has = n > 0
    # every position but a user's first is a target: steps of 1 inside a user and a jump to the
    # next user's second position, summed in place (no O(samples) temporaries)
    end = np.ones(int(n.sum()), dtype=_position_dtype(len(train_items) + 1))  # (S,)
    if len(end):
        first_end = train_offsets[:-1][has] + 1  # (K,) each user's first target position
        last_end = first_end + n[has] - 1
        end[(np.cumsum(n) - n)[has]] = np.r_[first_end[0], first_end[1:] - last_end[:-1]]
        np.cumsum(end, dtype=end.dtype, out=end)
    return Windows(offsets=train_offsets, items=train_items, end=end, mode="prefix")


def all_position_windows(train_offsets: np.ndarray, train_items: np.ndarray) -> Windows:
    """One sample per user with >= 2 training items, a target at every position (causal models).

    Input = training part without its last item, target[t] = training part[t + 1]; when the input
    is longer than max_len only the most recent max_len positions are kept (older positions are
    not trained on in this mode).

    Returns:
        `Windows` in "all_positions" mode: end = the training part's last position.
    """
    train_offsets = np.asarray(train_offsets, dtype=np.int64)
    train_items = np.asarray(train_items, dtype=np.int64)
    users = np.flatnonzero(np.diff(train_offsets) >= 2)
    end = (train_offsets[users + 1] - 1).astype(_position_dtype(len(train_items) + 1))  # (S,)
    return Windows(offsets=train_offsets, items=train_items, end=end, mode="all_positions")


def build_windows(train_offsets: np.ndarray, train_items: np.ndarray, mode: str) -> Windows:
    """`prefix_windows` or `all_position_windows`, by `mode`.

    Raises:
        ValueError: an unknown mode.
    """
    if mode == "prefix":
        return prefix_windows(train_offsets, train_items)
    if mode == "all_positions":
        return all_position_windows(train_offsets, train_items)
    raise ValueError(f"unknown sample mode {mode!r}")


def window_batch(
    windows: Windows, idx: np.ndarray, *, max_len: int, trim: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The samples `idx` of `windows` as padded rows.

    Args:
        idx: int (B,) sample indices.
        max_len: inputs keep their most recent max_len items.
        trim: the rows are as wide as the longest input, not max_len (length bucketing).
    Returns:
        item_seq: int64 (B, W) right-padded with 0; seq_len: int64 (B,); target: int64 (B,) in
        "prefix" mode, (B, W) with 0 on padding in "all_positions" mode. W = max_len, or the
        longest seq_len with `trim`.
    """
    seq_len = np.minimum(windows.lengths(idx), max_len)  # (B,)
    width = int(seq_len.max(initial=0)) if trim else max_len
    end = windows.end[idx].astype(np.int64)  # (B,)
    item_seq, _ = _window(windows.items, seq_len, end, width)
    if windows.mode == "prefix":
        target = windows.items[end]
    else:  # the same window shifted by one: the next item at every position
        target, _ = _window(windows.items, seq_len, end + 1, width)
    return item_seq, seq_len, target


def pad_right(sequences: list[np.ndarray] | list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack sequences into (n, max_len) int64 right-padded with 0, keeping the last max_len items.

    Returns:
        seq: int64 (n, max_len); seq_len: int64 (n,).
    """
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    items = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if len(sequences) else np.zeros(0, np.int64)
    end = np.cumsum(lengths)
    return _window(items, lengths, end, max_len)


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
    "Windows",
    "all_position_windows",
    "build_windows",
    "history_matrix",
    "leave_one_out",
    "pad_right",
    "prefix_windows",
    "window_batch",
]
