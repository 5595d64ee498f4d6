"""Where the loop runs: the `WorkerSession` protocol, and `LocalSession` (one process).

The loop asks its session for rank and world size, a device, model preparation (DDP), the metric
all-reduce, the checkpoints to resume from, its training batches, and where each epoch's
checkpoint goes. `echomamba_dist.distributed.trainer.RaySession` is the same protocol on a Ray
Train worker.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from echomamba_dist.config import ExperimentConfig
from echomamba_dist.data.splits import Windows
from echomamba_dist.errors import ConfigError
from echomamba_dist.io import atomic_dir
from echomamba_dist.train.batches import BatchSource
from echomamba_dist.train.checkpoint import prune_checkpoints, run_checkpoints


class WorkerSession(Protocol):
    """What the loop needs from its surroundings. `LocalSession` here, `RaySession` on Ray."""

    rank: int
    world_size: int
    device: torch.device
    local_samples: bool  # the loop builds the training samples (False: batch_source brings its own)

    def prepare_model(self, module: nn.Module) -> nn.Module: ...

    def all_reduce_sums(self, sums: dict[str, float]) -> dict[str, float]: ...

    def restore_dir(self) -> Any: ...  # a context manager yielding checkpoint dirs, newest first ([]: afresh)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, *, epoch: int) -> None: ...

    def batch_source(self, samples: Windows | None, **kwargs: Any) -> BatchSource: ...

    def log(self, line: str) -> None: ...  # a line for the user: printed, and kept in the run log


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu.

    Raises:
        ConfigError: `cuda` on a machine without a CUDA device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda, but no CUDA device is available here; use train.device=auto or cpu")
    return torch.device(name)


RUN_LOG = "train.log"  # in the run directory: every line the run showed its user, all ranks


def log_line(run_dir: Path, line: str) -> None:
    """Print a line for the user and append it to the run's log (one write in append mode: lines
    of several ranks never interleave; on a cluster the run directory is shared storage, as for
    checkpoints). What every session's `log` does."""
    print(line, flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / RUN_LOG, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")


class LocalSession:
    """One process, world size 1; checkpoints live in `run_dir/epoch_*`."""

    rank = 0
    world_size = 1
    local_samples = True

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.run_dir = cfg.run.run_dir

    def prepare_model(self, module: nn.Module) -> nn.Module:
        return module

    def all_reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        return sums

    def restore_dir(self):
        return nullcontext(run_checkpoints(self.run_dir) if self.cfg.run.resume else [])

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, *, epoch: int) -> None:
        if checkpoint_dir is None:
            return
        target = self.run_dir / f"epoch_{epoch:06d}"
        try:  # copied beside the target (another filesystem, maybe), then renamed: atomic
            with atomic_dir(target, overwrite=True, what="checkpoint") as staging:
                shutil.copytree(checkpoint_dir, staging, dirs_exist_ok=True)
        finally:
            shutil.rmtree(checkpoint_dir.parent, ignore_errors=True)
        prune_checkpoints(self.run_dir, keep_best=self.cfg.run.keep_checkpoints)

    def batch_source(self, samples: Windows | None, **kwargs: Any) -> BatchSource:
        return BatchSource(samples, rank=self.rank, world_size=self.world_size, **kwargs)

    def log(self, line: str) -> None:
        log_line(self.run_dir, line)
