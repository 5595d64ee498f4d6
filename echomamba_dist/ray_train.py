"""Ray Train around the one training loop (`echomamba_dist.train.loop.train_per_worker`).

The loop is not duplicated here: `RaySession` gives it rank, world size, a device, DDP, the metric
all-reduce, checkpoint restore/report and its training data; `fit` builds the TorchTrainer.

Data on Ray: the prepared dataset's training parts become samples on Ray Data (one
`map_batches` of a pure function per block of users, prefix or all-positions as the model needs),
materialised once and handed to the trainer as the dataset "train". Every worker reads it through
`get_dataset_shard("train")` and then takes its exact slice of every globally shuffled batch
(`BatchSource`): the shuffle is seeded by (seed, epoch), one worker on a whole batch and two on its
halves see the same samples, and a run restarted from a checkpoint replays exactly the batches of
an uninterrupted run. (Ray's streaming split hands blocks to whichever worker asks first, which is
not reproducible; see docs/distributed.md.)

Resources on a small machine: a local Ray is started with one more logical CPU than the machine
has cores, and the dataset is materialised before training, so Ray Data's tasks never wait for the
CPUs that the training workers hold.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from echomamba_dist.config import ExperimentConfig, to_dict
from echomamba_dist.train.loop import METRICS_FILE, BatchSource, train_per_worker
from echomamba_dist.train.tracking import metric_key

TRAIN_DATASET = "train"


class RaySession:
    """The loop's view of a Ray Train worker."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.cfg = cfg
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
        threads = max(1, int(cfg.train.cpus_per_worker or 1))
        torch.set_num_threads(threads)

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module, move_to_device=self.device)

    def all_reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return sums
        import torch.distributed as dist

        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    @contextlib.contextmanager
    def restore_dir(self):
        import ray.train

        ckpt = ray.train.get_checkpoint() if self.cfg.run.resume else None
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, *, epoch: int) -> None:
        import shutil

        import ray.train

        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool, str))}
        if checkpoint_dir is not None:
            ray.train.report(
                clean,
                checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
                checkpoint_dir_name=f"epoch_{epoch:06d}",
            )
            shutil.rmtree(checkpoint_dir.parent, ignore_errors=True)
        else:
            ray.train.report(clean)

    def batch_source(self, samples: dict[str, np.ndarray], **kwargs: Any) -> BatchSource:
        shard_samples = read_train_shard() or samples
        return BatchSource(shard_samples, rank=self.rank, world_size=self.world_size, **kwargs)


def read_train_shard() -> dict[str, np.ndarray] | None:
    """Collect the "train" dataset given to this worker, in canonical (sample id) order."""
    import ray.train

    shard = ray.train.get_dataset_shard(TRAIN_DATASET)
    if shard is None:
        return None
    parts: dict[str, list[np.ndarray]] = {}
    for batch in shard.iter_batches(batch_size=65536, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        raise RuntimeError("the training dataset handed to this worker is empty")
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(cols.pop("sample_id"), kind="stable")
    return {k: np.ascontiguousarray(v[order]) for k, v in cols.items()}


def ray_train_entry(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the plain loop with a RaySession."""
    from echomamba_dist.config import experiment_from_dict

    cfg = experiment_from_dict(config)
    train_per_worker(config, session=RaySession(cfg))


# ----------------------------------------------------------------------------------------------
# Driver side


def init_ray(*, address: str | None = None) -> None:
    """Connect to `RAY_ADDRESS` (a cluster) or start a local Ray in this process."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=(os.cpu_count() or 1) + 1,  # one spare logical CPU for Ray Data
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
        )


def _samples_batch(batch: dict[str, np.ndarray], *, mode: str, max_len: int) -> dict[str, np.ndarray]:
    """Ray Data map: a block of users' training parts -> their training samples."""
    from echomamba_dist.data.splits import all_position_samples, prefix_samples

    lengths = np.array([len(x) for x in batch["items"]], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = np.concatenate(list(batch["items"])) if len(lengths) else np.zeros(0, np.int64)
    build = prefix_samples if mode == "prefix" else all_position_samples
    seq, seq_len, target = build(offsets, items.astype(np.int64), max_len)
    # a stable sample id: (user position, position in the user's samples)
    per_user = np.bincount(np.repeat(np.arange(len(lengths)), _samples_per_user(lengths, mode)), minlength=len(lengths))
    first = np.repeat(batch["user"], per_user)
    local = np.arange(len(seq_len)) - np.repeat(np.concatenate([[0], np.cumsum(per_user)[:-1]]), per_user)
    return {"sample_id": first * 100_000 + local, "item_seq": seq, "seq_len": seq_len, "target": target}


def _samples_per_user(lengths: np.ndarray, mode: str) -> np.ndarray:
    if mode == "prefix":
        return np.maximum(lengths - 1, 0)
    return (lengths >= 2).astype(np.int64)


def build_train_dataset(cfg: ExperimentConfig, sample_mode: str):
    """The training samples as a materialised Ray Dataset (columns sample_id, item_seq, seq_len, target)."""
    import ray.data

    from echomamba_dist.data.dataset import load_dataset
    from echomamba_dist.data.splits import leave_one_out

    ds = load_dataset(cfg.data)
    loo = leave_one_out(ds.offsets, ds.items)
    parts = np.split(loo.train_items, loo.train_offsets[1:-1])
    users = ray.data.from_items([{"user": i, "items": p} for i, p in enumerate(parts)], override_num_blocks=8)
    samples = users.map_batches(
        _samples_batch, fn_kwargs={"mode": sample_mode, "max_len": cfg.data.max_len}, batch_format="numpy",
        batch_size=4096,
    )
    return samples.materialize()


def fit(cfg: ExperimentConfig) -> dict[str, Any]:
    """Train `cfg` on Ray Train (local Ray, or `RAY_ADDRESS`) and return the run's results.

    Raises:
        RuntimeError: with the failing worker's own error message and traceback.
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from echomamba_dist.models.registry import build_model

    init_ray()
    local = not os.environ.get("RAY_ADDRESS")
    if cfg.train.cpus_per_worker is None:
        cfg.train.cpus_per_worker = max(1.0, float((os.cpu_count() or 1) // cfg.train.num_workers)) if local else 1.0
    sample_mode = build_model(cfg.model, n_items=1).sample_mode
    train_ds = build_train_dataset(cfg, sample_mode)
    run_dir = cfg.run.run_dir
    trainer = TorchTrainer(
        ray_train_entry,
        train_loop_config=to_dict(cfg),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints,
                checkpoint_score_attribute=metric_key(f"val_{cfg.train.metric}"),
                checkpoint_score_order="max",
            ),
        ),
        datasets={TRAIN_DATASET: train_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    try:
        trainer.fit()
    except Exception as exc:
        raise RuntimeError(worker_error_message(exc)) from exc
    import json

    return json.loads((run_dir / METRICS_FILE).read_text())


def worker_error_message(exc: BaseException) -> str:
    """The failing worker's exception and traceback, without Ray's wrapping layers."""
    seen = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or getattr(cur, "cause", None)
    texts = [str(e) for e in seen]
    innermost = seen[-1]
    text = "\n".join(t for t in texts if t)
    return f"training failed on a worker: {type(innermost).__name__}: {innermost}\n{text}" if text else repr(exc)
