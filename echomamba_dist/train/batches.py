"""Training data for the loop: the leave-one-out split of a prepared dataset, and the shuffled
batches cut from its training windows (`BatchSource`), deterministic in (seed, epoch) and split
exactly across ranks."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from echomamba_dist.config import ExperimentConfig
from echomamba_dist.data.dataset import dataset_fingerprint, load_dataset
from echomamba_dist.data.splits import (
    Windows,
    build_windows,
    history_matrix,
    leave_one_out,
    window_batch,
)
from echomamba_dist.train.evaluate import EvalSet


@dataclass(frozen=True)
class TrainingData:
    """Everything the loop needs from a prepared dataset, as NumPy arrays."""

    n_items: int
    samples: Windows | None  # the training samples as windows into train_items (None: not built)
    valid: EvalSet
    test: EvalSet
    train_items: np.ndarray  # all training-part items (for the popularity baseline)
    fingerprint: str
    item_ids: np.ndarray  # original item ids by index (index 0: padding)


def build_training_data(cfg: ExperimentConfig, sample_mode: str, *, with_samples: bool = True) -> TrainingData:
    """Load the dataset of `cfg.data`, split it leave-one-out and build the training windows for
    `sample_mode` (`with_samples=False`: `samples` is None; Ray workers get theirs from Ray Data).

    Raises:
        ValueError: an unknown `sample_mode`.
    """
    if sample_mode not in ("prefix", "all_positions"):
        raise ValueError(f"unknown sample mode {sample_mode!r}")
    ds = load_dataset(cfg.data)
    loo = leave_one_out(ds.offsets, ds.items)
    max_len = cfg.data.max_len
    windows = build_windows(loo.train_offsets, loo.train_items, sample_mode) if with_samples else None
    v_seq, v_len = history_matrix(ds.offsets, ds.items, loo.valid_users, cut=2, max_len=max_len)
    t_seq, t_len = history_matrix(ds.offsets, ds.items, loo.test_users, cut=1, max_len=max_len)
    return TrainingData(
        n_items=ds.n_items,
        samples=windows,
        valid=EvalSet(v_seq, v_len, loo.valid_target, loo.valid_users),
        test=EvalSet(t_seq, t_len, loo.test_target, loo.test_users),
        train_items=loo.train_items,
        fingerprint=dataset_fingerprint(ds),
        item_ids=ds.item_ids,
    )


class BatchSource:
    """Shuffled training batches, deterministic in (seed, epoch), split exactly across ranks.

    Each global batch of `global_batch` samples is cut into `world_size` contiguous slices, and
    rank r takes slice r: one worker on a whole batch and two on its halves see the same samples.
    With `bucketing`, each batch is trimmed to its longest sequence (models are
    padding-independent, so this changes speed, not results) and batches are formed from
    length-sorted windows of `bucket_window` batches, so that lengths inside a batch are close.
    The samples stay `Windows` into the training items; each batch's rows are cut out when it is
    built (`window_batch`), so memory follows the log, not samples x max_len.
    """

    def __init__(
        self,
        windows: Windows,
        *,
        max_len: int,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        bucketing: bool = False,
        bucket_window: int = 16,
        max_steps: int | None = None,
    ) -> None:
        self.windows = windows
        self.max_len = max_len
        self.n = len(windows)
        self.global_batch = global_batch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.bucketing = bucketing
        self.bucket_window = bucket_window
        self.max_steps = max_steps

    def lengths(self, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        """int64: the input length of samples `idx` (all by default), cut to max_len."""
        return np.minimum(self.windows.lengths(idx), self.max_len)

    def steps_per_epoch(self) -> int:
        steps = math.ceil(self.n / self.global_batch)
        return min(steps, self.max_steps) if self.max_steps else steps

    def batch_indices(self, epoch: int) -> list[np.ndarray]:
        """The global batches of `epoch` as index arrays (the same on every rank)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        if self.bucketing:
            window = self.global_batch * self.bucket_window
            for start in range(0, self.n, window):
                chunk = order[start : start + window]
                order[start : start + window] = chunk[np.argsort(self.lengths(chunk), kind="stable")]
        batches = [order[i : i + self.global_batch] for i in range(0, self.n, self.global_batch)]
        if self.bucketing:  # sorted windows would otherwise visit short batches first
            perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
            batches = [batches[i] for i in perm]
        return batches[: self.steps_per_epoch()]

    def epoch(self, epoch: int, *, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        for idx in self.batch_indices(epoch):
            if len(idx) < self.world_size:
                continue  # a last batch too small to give every rank a sample
            part = np.array_split(idx, self.world_size)[self.rank]
            yield self.to_batch(part, device=device)

    def to_batch(self, idx: np.ndarray, *, device: torch.device) -> dict[str, torch.Tensor]:
        """Samples `idx` as a batch of tensors on `device`: max_len wide, or (bucketing) as wide
        as their longest input."""
        item_seq, seq_len, target = window_batch(self.windows, idx, max_len=self.max_len, trim=self.bucketing)
        batch = {"item_seq": item_seq, "seq_len": seq_len, "target": target}
        return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


def batch_source_options(cfg: ExperimentConfig) -> dict:
    """The `BatchSource` settings of `cfg` (max_len, global batch, seed, bucketing, step cap), as
    keyword arguments for `BatchSource(samples, **...)` or a session's `batch_source`."""
    return {
        "max_len": cfg.data.max_len,
        "global_batch": cfg.train.batch_size,
        "seed": cfg.train.seed,
        "bucketing": cfg.data.bucketing,
        "max_steps": cfg.train.max_steps_per_epoch,
    }
