"""Ray Train around the one training loop (`echomamba_dist.train.loop.train_per_worker`).

The loop is not duplicated here: `RaySession` gives it rank, world size, a device, DDP, the metric
all-reduce, checkpoint restore/report and its training batches; `fit` builds the TorchTrainer.

Data on Ray: the prepared dataset's training parts become samples on Ray Data (a `map_batches` of
the pure sample functions over blocks of users, prefix or all-positions as the model needs), each
row tagged with its `sample_id`, its position in the single-process sample order. The dataset is
handed to the trainer as "train" and read in one of two ways (`train.data_sharding`):

- "exact" (default): the dataset is materialised once; every worker reads all of it through
  `get_dataset_shard`, puts it in sample-id order, and takes its exact slice of every globally
  shuffled batch (`BatchSource`, seeded by (seed, epoch)). One worker on a whole batch and two on
  its halves see the same samples, and a run restarted from a checkpoint replays exactly the
  batches of an uninterrupted run.
- "ray": Ray splits the dataset across the workers (`streaming_split(equal=True)`), and each
  reads its shard with `iter_torch_batches(batch_size=global // world)` and a local shuffle seeded
  by (seed, epoch). Memory per worker no longer grows with the sample count, but which samples a
  worker gets is decided at run time, so the order is not reproducible.

Resources on a small machine: a local Ray gets one more logical CPU than the training workers
take, so Ray Data always has a CPU of its own (see docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from echomamba_dist.config import ExperimentConfig, experiment_from_dict, to_dict
from echomamba_dist.errors import WorkerError
from echomamba_dist.train.loop import METRICS_FILE, BatchSource, train_per_worker
from echomamba_dist.train.tracking import metric_key

TRAIN_DATASET = "train"
SAMPLE_COLUMNS = ("item_seq", "seq_len", "target")



# ----------------------------------------------------------------------------------------------
# Worker side


class RaySession:
    """The loop's view of a Ray Train worker.

    Args:
        cfg: the experiment config.
        train_samples: the number of rows of the "train" dataset (needed by "ray" sharding to
            know how many batches each worker gets; None in "exact" mode).
    """

    local_samples = False  # the training samples come from Ray Data, not from the loop

    def __init__(self, cfg: ExperimentConfig, *, train_samples: int | None = None) -> None:
        import ray
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.cfg = cfg
        self.train_samples = train_samples
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
        threads = max(1, int(cfg.train.cpus_per_worker or 1))
        torch.set_num_threads(threads)
        node = ray.get_runtime_context().get_node_id()
        print(
            f"worker {self.rank}/{self.world_size} on node {node} ({socket.gethostname()}), "
            f"device {self.device}, {threads} threads",
            flush=True,
        )

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module, move_to_device=self.device)

    def all_reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return sums
        import torch.distributed as dist

        keys = sorted(sums)  # the same order on every rank, whatever order the dict was built in
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        reduced = dict(zip(keys, t.tolist()))
        return {k: reduced[k] for k in sums}

    @contextlib.contextmanager
    def restore_dir(self):
        # `fit` hides earlier checkpoints from Ray when run.resume is false, so whatever Ray
        # offers here belongs to this run (a restart after a worker failure included)
        import ray.train

        ckpt = ray.train.get_checkpoint()
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

    def batch_source(self, samples: dict[str, np.ndarray], **kwargs: Any):
        """This worker's training batches: an exact slice of each global batch, or a Ray shard."""
        import ray.train

        shard = ray.train.get_dataset_shard(TRAIN_DATASET)
        if shard is None:
            raise RuntimeError(f"the trainer was given no {TRAIN_DATASET!r} dataset (see build_train_dataset)")
        if self.cfg.train.data_sharding == "ray":
            if self.train_samples is None:
                raise RuntimeError("data_sharding=ray needs the number of training samples")
            return RayShardSource(
                shard, n_samples=self.train_samples, rank=self.rank, world_size=self.world_size, **kwargs
            )
        return BatchSource(read_all_samples(shard), rank=self.rank, world_size=self.world_size, **kwargs)


def read_all_samples(shard) -> dict[str, np.ndarray]:
    """Read a whole (unsplit) samples dataset into arrays in sample-id order.

    Raises:
        RuntimeError: the dataset is empty or its sample ids are not exactly 0..S-1.
    """
    parts: dict[str, list[np.ndarray]] = {}
    for batch in shard.iter_batches(batch_size=65536, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        raise RuntimeError("the training dataset handed to this worker is empty")
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    ids = cols.pop("sample_id")
    order = np.argsort(ids, kind="stable")
    if not np.array_equal(ids[order], np.arange(len(ids))):
        raise RuntimeError("the training dataset's sample ids are not 0..S-1: samples were lost or repeated")
    return {k: np.ascontiguousarray(cols[k][order]) for k in SAMPLE_COLUMNS}


class RayShardSource:
    """Training batches from this worker's part of a dataset that Ray splits across workers.

    `streaming_split(equal=True)` gives every worker `n_samples // world_size` rows (dropping at
    most world_size - 1 per epoch), so all ranks take the same number of steps, as DDP needs.
    Each epoch reads the shard in batches of `global_batch // world_size` with a local shuffle
    seeded by (seed, epoch). With `bucketing`, each batch is trimmed to its longest sequence.
    Same interface as `BatchSource` (`steps_per_epoch`, `epoch`).
    """

    def __init__(
        self,
        shard,
        *,
        n_samples: int,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        bucketing: bool = False,
        max_steps: int | None = None,
        shuffle_buffer: int | None = None,
    ) -> None:
        self.shard = shard
        self.rank = rank
        self.world_size = world_size
        self.batch_size = global_batch // world_size
        self.rows = n_samples // world_size
        self.seed = seed
        self.bucketing = bucketing
        self.max_steps = max_steps
        self.shuffle_buffer = shuffle_buffer or max(4 * self.batch_size, 10_000)

    def steps_per_epoch(self) -> int:
        steps = math.ceil(self.rows / self.batch_size)
        return min(steps, self.max_steps) if self.max_steps else steps

    def epoch(self, epoch: int, *, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        shuffle_seed = int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0])
        batches = self.shard.iter_torch_batches(
            batch_size=self.batch_size,
            dtypes=torch.int64,
            device=device,
            local_shuffle_buffer_size=self.shuffle_buffer,
            local_shuffle_seed=shuffle_seed,
        )
        steps = self.steps_per_epoch()
        for step, batch in enumerate(batches):
            if step >= steps:
                break
            batch = {k: batch[k] for k in SAMPLE_COLUMNS}
            if self.bucketing:  # models are padding-independent: trim to the longest sequence
                width = int(batch["seq_len"].max())
                batch["item_seq"] = batch["item_seq"][:, :width]
                if batch["target"].ndim == 2:
                    batch["target"] = batch["target"][:, :width]
            yield batch


def ray_train_entry(config: dict[str, Any], *, train_samples: int | None = None) -> None:
    """What each Ray Train worker runs: the plain loop with a RaySession."""
    cfg = experiment_from_dict(config)
    train_per_worker(config, session=RaySession(cfg, train_samples=train_samples))


# ----------------------------------------------------------------------------------------------
# Training samples on Ray Data


def samples_per_user(lengths: np.ndarray, mode: str) -> np.ndarray:
    """How many samples each training part of `lengths` items yields (see data.splits)."""
    if mode == "prefix":
        return np.maximum(lengths - 1, 0)
    if mode == "all_positions":
        return (lengths >= 2).astype(np.int64)
    raise ValueError(f"unknown sample mode {mode!r}")


def samples_batch(batch, *, mode: str, max_len: int) -> dict[str, np.ndarray]:
    """Ray Data map: a block of users' training parts -> their training samples.

    Args:
        batch: a pyarrow Table with columns `items` (list<int64>, a user's training part) and
            `first_sample` (int64, the user's first row in the single-process sample order).
    Returns:
        numpy columns sample_id (S,), item_seq (S, max_len), seq_len (S,), target (S,) or
        (S, max_len); `sample_id` is the row's index in `prefix_samples`/`all_position_samples`
        of the whole dataset (users in order, each user's samples in order).
    """
    from echomamba_dist.data.splits import all_position_samples, prefix_samples

    items = batch.column("items").combine_chunks()
    offsets = np.asarray(items.offsets, dtype=np.int64)
    offsets = offsets - offsets[0]
    values = np.asarray(items.flatten(), dtype=np.int64)
    build = prefix_samples if mode == "prefix" else all_position_samples
    seq, seq_len, target = build(offsets, values, max_len)
    per_user = samples_per_user(np.diff(offsets), mode)  # (n,)
    first_here = np.cumsum(per_user) - per_user  # each user's first row in this block
    first = np.asarray(batch.column("first_sample"), dtype=np.int64)
    sample_id = np.repeat(first - first_here, per_user) + np.arange(len(seq_len), dtype=np.int64)
    return {"sample_id": sample_id, "item_seq": seq, "seq_len": seq_len, "target": target}


def build_train_dataset(cfg: ExperimentConfig, sample_mode: str, *, materialize: bool = True):
    """The training samples as a Ray Dataset (columns sample_id, item_seq, seq_len, target).

    Users are cut into blocks on the driver; the samples are built by Ray Data tasks. With
    `materialize` (the "exact" mode) they are computed once and kept in the object store;
    otherwise each epoch streams them anew. The row count is in `dataset.count()`, or
    `count_train_samples`.
    """
    import pyarrow as pa
    import ray.data

    from echomamba_dist.data.dataset import load_dataset
    from echomamba_dist.data.splits import leave_one_out

    ds = load_dataset(cfg.data)
    loo = leave_one_out(ds.offsets, ds.items)
    per_user = samples_per_user(np.diff(loo.train_offsets), sample_mode)
    users = pa.table({
        "first_sample": pa.array(np.cumsum(per_user) - per_user),
        "items": pa.ListArray.from_arrays(pa.array(loo.train_offsets), pa.array(loo.train_items)),
    })
    # ~16 blocks: enough to spread the work and the splits, few enough to keep task overhead low;
    # blocks of the samples hold at most 4096 users' samples each
    rows_per_block = max(1, math.ceil(users.num_rows / 16))
    blocks = [users.slice(i, rows_per_block) for i in range(0, users.num_rows, rows_per_block)]
    samples = ray.data.from_arrow(blocks).map_batches(
        samples_batch, fn_kwargs={"mode": sample_mode, "max_len": cfg.data.max_len},
        batch_format="pyarrow", batch_size=4096, zero_copy_batch=True,  # 4096 users per call
    )
    return samples.materialize() if materialize else samples


def count_train_samples(cfg: ExperimentConfig, sample_mode: str) -> int:
    """The number of training samples of `cfg.data` in `sample_mode` (computed on the driver)."""
    from echomamba_dist.data.dataset import load_dataset
    from echomamba_dist.data.splits import leave_one_out

    ds = load_dataset(cfg.data)
    loo = leave_one_out(ds.offsets, ds.items)
    return int(samples_per_user(np.diff(loo.train_offsets), sample_mode).sum())


# ----------------------------------------------------------------------------------------------
# Driver side


def init_ray(*, address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` or `RAY_ADDRESS` (a cluster), else start a local Ray in this process.

    Args:
        num_cpus: logical CPUs of a local Ray (default: cores + 1, one spare for Ray Data).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=num_cpus or (os.cpu_count() or 1) + 1,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
        )


def resolve_for_workers(cfg: ExperimentConfig, *, local: bool) -> ExperimentConfig:
    """A copy of `cfg` that means the same on every worker: paths absolute (workers run in other
    directories), the driver's tracking URI passed on (its MLFLOW_TRACKING_URI, or locally the
    default store in the driver's directory; on a cluster without either, the workers' own
    MLFLOW_TRACKING_URI applies), and `cpus_per_worker` set (None: cores // workers locally, 1 on
    a cluster)."""
    cfg = copy.deepcopy(cfg)
    cfg.run.storage_path = str(cfg.run.run_dir.parent)
    if cfg.data.path is not None:
        cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())
    if cfg.tracking.enabled and (local or os.environ.get("MLFLOW_TRACKING_URI")):
        cfg.tracking.tracking_uri = cfg.tracking.resolved_uri()
    if cfg.train.cpus_per_worker is None:
        cfg.train.cpus_per_worker = max(1.0, float((os.cpu_count() or 1) // cfg.train.num_workers)) if local else 1.0
    return cfg


def build_trainer(cfg: ExperimentConfig, *, placement_strategy: str = "PACK"):
    """The TorchTrainer for `cfg` (already passed through `resolve_for_workers`)."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    sample_mode = cfg.sample_mode
    exact = cfg.train.data_sharding == "exact"
    train_ds = build_train_dataset(cfg, sample_mode, materialize=exact)
    entry = ray_train_entry if exact else functools.partial(
        ray_train_entry, train_samples=count_train_samples(cfg, sample_mode)
    )
    resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})}
    return TorchTrainer(
        entry,
        train_loop_config=to_dict(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=resources,
            placement_strategy=placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints,
                checkpoint_score_attribute=metric_key(f"val_{cfg.train.metric}"),
                checkpoint_score_order="max",
            ),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={TRAIN_DATASET: train_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=[] if exact else [TRAIN_DATASET]),
    )


def fit(cfg: ExperimentConfig, *, placement_strategy: str = "PACK") -> dict[str, Any]:
    """Train `cfg` on Ray Train (local Ray, or `RAY_ADDRESS`) and return the run's results.

    A run of the same name and storage path resumes from its latest checkpoint (unless
    run.resume is false). SIGTERM is turned into KeyboardInterrupt, like SIGINT, so that the
    driver stops its Ray cleanly and the same command resumes.

    Args:
        placement_strategy: of the workers' placement group (PACK, SPREAD, STRICT_SPREAD, ...).
    Returns:
        The run's metrics.json (see `train_per_worker`).
    Raises:
        WorkerError: with the failing worker's exception, message and traceback.
        KeyboardInterrupt: on SIGINT or SIGTERM.
    """
    import ray.data

    local = not os.environ.get("RAY_ADDRESS")
    cfg = resolve_for_workers(cfg, local=local)
    if local:
        needed = math.ceil(cfg.train.num_workers * cfg.train.cpus_per_worker)
        init_ray(num_cpus=max(needed, os.cpu_count() or 1) + 1)  # + 1: Ray Data's own CPU
    else:
        init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False  # workers inherit it
    # Train V2 replaces `print` in the workers with one that logs the line and, whenever
    # sys.stdout is wrapped (MLflow does), prints it too: every epoch line twice in the driver's
    # output. Unpatched, a worker's print goes to its stdout once, which Ray shows here. The driver
    # passes this variable on to the controller and the workers; a value set by the user wins.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    run_dir = cfg.run.run_dir
    if not cfg.run.resume:
        _forget_checkpoints(run_dir)
    with _sigterm_as_interrupt():
        trainer = build_trainer(cfg, placement_strategy=placement_strategy)
        try:
            trainer.fit()
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            raise WorkerError(worker_error_message(exc)) from None
    return json.loads((run_dir / METRICS_FILE).read_text())


def _forget_checkpoints(run_dir: Path) -> None:
    """Make Ray start this run afresh: it restores from the snapshot of reported checkpoints."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if snapshot.is_file():
        snapshot.unlink()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread (as SIGINT does)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def worker_error_message(exc: BaseException) -> str:
    """The failing worker's exception, message and traceback, without Ray's wrapping layers.

    Ray Train raises a `WorkerGroupError` whose `worker_failures` maps rank -> the worker's own
    exception and whose message holds each failing rank's traceback text; other errors (the
    controller's, or a chain of causes) are unwrapped to their innermost exception.
    """
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank, first = min(failures.items())
        details = getattr(exc, "_error_message", None) or str(exc)
        return (
            f"training failed on worker rank {rank}: {type(first).__name__}: {first}\n\n"
            f"worker traceback(s):\n{details}"
        )
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or getattr(cur, "controller_failure", None) or getattr(cur, "cause", None)
    innermost = chain[-1]
    details = "\n".join(str(e) for e in chain if str(e))
    return f"training failed: {type(innermost).__name__}: {innermost}\n\n{details}"
