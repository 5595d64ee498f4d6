"""Ray Train around the one training loop (`echomamba_dist.train.loop.train_per_worker`).

The loop is not duplicated here: `RaySession` gives it rank, world size, a device, DDP, the metric
all-reduce, checkpoint restore/report and its training batches; `fit` builds the TorchTrainer.

Data on Ray: Ray Data ships the training parts as CSR shards, one row a user (`user`, its 0-based
index, and `items`, its training part): the CSR arrays, 8 bytes an interaction; never (samples,
max_len) matrices. Each worker reads them back as CSR arrays (`read_csr`; without a copy in exact
mode), turns them into `Windows` (`data.splits`) and cuts every batch's rows out when it builds
the batch. The dataset is handed to the trainer as "train" and read in one of two ways
(`train.data_sharding`):

- "exact" (default): every worker reads all users through `get_dataset_shard`, puts them in user
  order, and takes its exact slice of every globally shuffled batch (`BatchSource`, seeded by
  (seed, epoch)): the batches of a run in one process. One worker on a whole batch and two on its
  halves see the same samples, and a run restarted from a checkpoint replays exactly the batches
  of an uninterrupted run.
- "ray": Ray splits the users across the workers (`streaming_split(equal=True)`); each epoch a
  worker reads its users, builds their windows and shuffles them by (seed, epoch, rank) into
  batches of global // world. Memory per worker follows its share of the log, but which users a
  worker gets is decided at run time, so the order is not reproducible; ranks agree on the
  smallest batch count of the epoch (DDP needs equal steps) and drop the rest.

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
import pickle
import shutil
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from echomamba_dist.config import ExperimentConfig, experiment_from_dict, to_dict
from echomamba_dist.data.dataset import dataset_fingerprint, load_dataset
from echomamba_dist.data.splits import Windows, build_windows, leave_one_out
from echomamba_dist.distributed import ray_compat
from echomamba_dist.distributed.runtime import init_ray
from echomamba_dist.errors import TrainingDiverged, WorkerError
from echomamba_dist.io import write_text_atomic
from echomamba_dist.train.batches import BatchSource
from echomamba_dist.train.checkpoint import check_resume, newest_intact, run_checkpoints
from echomamba_dist.train.loop import METRICS_FILE, train_per_worker
from echomamba_dist.train.runlock import RunLock
from echomamba_dist.train.session import RUN_LOG, log_line
from echomamba_dist.train.tracking import metric_key

TRAIN_DATASET = "train"
DIVERGED_MARKER = ".diverged"  # in the run directory while one fit's workers found it diverged


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
        ctx = ray.train.get_context()
        self.cfg = cfg
        self.train_samples = train_samples
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
        threads = max(1, int(cfg.train.cpus_per_worker or 1))
        torch.set_num_threads(threads)
        node = ray.get_runtime_context().get_node_id()
        self.log(f"worker {self.rank}/{self.world_size} on node {node} ({socket.gethostname()}), "
                 f"device {self.device}, {threads} threads")

    def log(self, line: str) -> None:
        """The driver shows the run log's lines (`follow_run_log`); worker output stays in Ray's logs."""
        log_line(self.cfg.run.run_dir, line)

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(module, move_to_device=self.device)

    def all_reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return sums
        keys = sorted(sums)  # the same order on every rank, whatever order the dict was built in
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        reduced = dict(zip(keys, t.tolist()))
        return {k: reduced[k] for k in sums}

    @contextlib.contextmanager
    def restore_dir(self):
        # `fit` hides earlier checkpoints from Ray when run.resume is false, so whatever Ray
        # offers here belongs to this run (a restart after a worker failure included)
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield []
            return
        # the older checkpoints on disk are the fallbacks when the offered one is corrupt
        older = [p for p in run_checkpoints(self.cfg.run.run_dir) if p.name < Path(ckpt.path).name]
        with ckpt.as_directory() as d:
            yield [Path(d), *older]

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, *, epoch: int) -> None:
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

    def batch_source(self, samples: Windows | None, **kwargs: Any):
        """This worker's training batches: an exact slice of each global batch, or a Ray shard.

        `samples` is None (`local_samples` is False): the users come from the "train" dataset.
        """

        shard = ray.train.get_dataset_shard(TRAIN_DATASET)
        if shard is None:
            raise RuntimeError(f"the trainer was given no {TRAIN_DATASET!r} dataset (see build_train_dataset)")
        mode = self.cfg.sample_mode
        if self.cfg.train.data_sharding == "ray":
            if self.train_samples is None:
                raise RuntimeError("data_sharding=ray needs the number of training samples")
            return RayShardSource(
                shard, mode=mode, n_samples=self.train_samples, rank=self.rank, world_size=self.world_size, **kwargs
            )
        offsets, items = read_csr(shard, complete=True)
        return BatchSource(build_windows(offsets, items, mode), rank=self.rank, world_size=self.world_size, **kwargs)


def read_csr(shard, *, complete: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read users' training parts (rows `user`, `items`) into CSR arrays in user order.

    Ray Data's blocks are read as they are (no re-batching) and viewed without copies. One block
    (exact mode) is used as it is: the items stay in the object store's buffer (read-only),
    shared by the workers of a node. Several blocks are copied once into the preallocated
    output; rows in runs of increasing users need nothing more (Ray Data keeps a block's rows in
    order; blocks may come in any order), any other order is sorted at the cost of a second copy.

    Args:
        shard: a Ray Dataset, DataIterator or anything with that `iter_batches`.
        complete: the rows must be exactly the users 0..U-1 (the whole dataset).
    Returns:
        offsets int64 (n + 1,), items int64 (offsets[-1],); row i is the i-th smallest user.
    Raises:
        RuntimeError: `complete` and the rows are empty, or not exactly the users 0..U-1.
    """
    pieces = []  # (user, bounds, values) of each record batch: views of Ray Data's buffers
    for table in shard.iter_batches(batch_size=None, batch_format="pyarrow"):
        for batch in table.to_batches():
            if batch.num_rows:
                lists = batch.column("items")  # bounds: (rows + 1,) into values, of this slice
                pieces.append((batch.column("user").to_numpy(), lists.offsets.to_numpy(), lists.values.to_numpy()))
    if not pieces:
        if complete:
            raise RuntimeError("the training dataset handed to this worker is empty")
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    pieces.sort(key=lambda piece: int(piece[0][0]))
    if not _runs_in_user_order(pieces):
        return _csr_by_sorting(pieces, complete=complete)
    n = sum(len(user) for user, _, _ in pieces)
    if complete and (pieces[0][0][0] != 0 or pieces[-1][0][-1] != n - 1):  # n increasing users in 0..n-1
        raise RuntimeError("the training dataset's users are not 0..U-1: users were lost or repeated")
    if len(pieces) == 1:
        _, bounds, values = pieces[0]
        offsets = (bounds - bounds[0]).astype(np.int64)
        return offsets, values[bounds[0] : bounds[-1]].astype(np.int64, copy=False)
    offsets = np.zeros(n + 1, dtype=np.int64)
    items = np.empty(sum(int(bounds[-1] - bounds[0]) for _, bounds, _ in pieces), dtype=np.int64)
    row = pos = 0
    for user, bounds, values in pieces:
        size = int(bounds[-1] - bounds[0])
        offsets[row + 1 : row + 1 + len(user)] = bounds[1:] - bounds[0] + pos
        items[pos : pos + size] = values[bounds[0] : bounds[-1]]  # the one copy
        row, pos = row + len(user), pos + size
    return offsets, items


def _runs_in_user_order(pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> bool:
    """Whether the pieces (sorted by first user) hold strictly increasing users end to end."""
    last = -1
    for user, _, _ in pieces:
        if user[0] <= last or (len(user) > 1 and not (np.diff(user) > 0).all()):
            return False
        last = int(user[-1])
    return True


def _csr_by_sorting(pieces, *, complete: bool) -> tuple[np.ndarray, np.ndarray]:
    """`read_csr` for rows in any order: concatenate, then gather the items in user order."""
    user = np.concatenate([p[0] for p in pieces], dtype=np.int64)
    length = np.concatenate([np.diff(p[1]) for p in pieces], dtype=np.int64)
    flat = np.concatenate([values[bounds[0] : bounds[-1]] for _, bounds, values in pieces], dtype=np.int64)
    order = np.argsort(user, kind="stable")
    if complete and not np.array_equal(user[order], np.arange(len(user))):
        raise RuntimeError("the training dataset's users are not 0..U-1: users were lost or repeated")
    offsets = np.r_[0, np.cumsum(length[order])].astype(np.int64)
    starts = np.cumsum(length) - length  # where each row's items begin in `flat`
    gather = np.repeat(starts[order] - offsets[:-1], length[order]) + np.arange(offsets[-1])
    return offsets, flat[gather]


class RayShardSource:
    """Training batches from the users that Ray's streaming split gives this worker.

    Each epoch reads this worker's users (CSR), builds their windows and batches them with a
    `BatchSource` of `global_batch // world_size` rows seeded by (seed, rank). Equal user counts
    need not mean equal sample counts, so the ranks agree on the smallest batch count (one
    all-reduce an epoch) and each drops what it holds beyond it: DDP needs equal steps.
    Same interface as `BatchSource` (`steps_per_epoch`, `epoch`).
    """

    def __init__(self, shard, *, mode: str, n_samples: int, global_batch: int, seed: int, rank: int = 0,
                 world_size: int = 1, max_steps: int | None = None, **options: Any) -> None:
        """`options`: the other `BatchSource` settings (max_len, bucketing, bucket_window)."""
        self.shard = shard
        self.mode = mode
        self.rank = rank
        self.world_size = world_size
        self.batch_size = global_batch // world_size
        self.rows = n_samples // world_size
        self.seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])  # another shuffle per rank
        self.max_steps = max_steps
        self.options = options

    def steps_per_epoch(self) -> int:
        """The expected steps (a rank's even share of the samples); an epoch may take fewer."""
        steps = math.ceil(self.rows / self.batch_size)
        return min(steps, self.max_steps) if self.max_steps else steps

    def epoch(self, epoch: int, *, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        offsets, items = read_csr(self.shard, complete=False)
        source = BatchSource(build_windows(offsets, items, self.mode), global_batch=self.batch_size, seed=self.seed,
                             max_steps=self.max_steps, **self.options)
        steps = self._fewest(source.steps_per_epoch(), device)
        for step, batch in enumerate(source.epoch(epoch, device=device)):
            if step >= steps:
                break
            yield batch

    def _fewest(self, steps: int, device: torch.device) -> int:
        """The smallest `steps` over all ranks."""
        if self.world_size == 1 or not dist.is_initialized():
            return steps
        t = torch.tensor([steps], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


def ray_train_entry(config: dict[str, Any], *, train_samples: int | None = None) -> None:
    """What each Ray Train worker runs: the plain loop with a RaySession."""
    cfg = experiment_from_dict(config)
    marker = cfg.run.run_dir / DIVERGED_MARKER
    if marker.is_file():  # Ray retries a failed group; a diverged run would only diverge again
        raise TrainingDiverged(marker.read_text(encoding="utf-8").strip())
    try:
        train_per_worker(config, session=RaySession(cfg, train_samples=train_samples))
    except TrainingDiverged as exc:
        write_text_atomic(marker, f"{exc}\n")
        raise
    except Exception as exc:
        if _survives_pickling(exc):
            raise
        # Ray sends the exception to the driver pickled; one that cannot be rebuilt there (e.g.
        # MLflow's UnsupportedModelRegistryStoreURIException) would arrive as Ray's own
        # deserialization error, without its message or this worker's traceback
        raise WorkerError(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}\n\n{traceback.format_exc()}") from None


def _survives_pickling(exc: BaseException) -> bool:
    """Whether `exc` comes back from pickle (what Ray does with a worker's exception)."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Training data on Ray Data: users' training parts as CSR shards


def users_table(train_offsets: np.ndarray, train_items: np.ndarray):
    """The training parts as a pyarrow Table, one row a user: `user` (int64, 0-based) and `items`
    (large_list<int64>). Its buffers are the CSR arrays themselves (zero-copy here), so that a
    worker reading the table whole uses them as they are (`read_csr`)."""

    train_offsets = np.asarray(train_offsets, dtype=np.int64)
    return pa.table({
        "user": pa.array(np.arange(len(train_offsets) - 1, dtype=np.int64)),
        "items": pa.LargeListArray.from_arrays(pa.array(train_offsets), pa.array(np.asarray(train_items, dtype=np.int64))),
    })


def build_train_dataset(cfg: ExperimentConfig):
    """The training parts of `cfg.data` as a Ray Dataset of CSR shards (see `users_table`), put
    in the object store once by the driver; the workers build the samples of either mode from
    them (`read_csr`, `build_windows`).

    "exact" sharding: one block, which every worker reads whole and uses without a copy (one copy
    of the items per node, in shared memory). "ray": about 16 blocks, for the streaming split to
    spread (each worker copies its share once).
    """

    ds = load_dataset(cfg.data)
    loo = leave_one_out(ds.offsets, ds.items)
    users = users_table(loo.train_offsets, loo.train_items)
    if cfg.train.data_sharding == "exact":
        return ray.data.from_arrow(users)
    # ~16 blocks: enough to spread the splits, few enough to keep overhead low
    rows_per_block = max(1, math.ceil(users.num_rows / 16))
    return ray.data.from_arrow([users.slice(i, rows_per_block) for i in range(0, users.num_rows, rows_per_block)])


def count_train_samples(cfg: ExperimentConfig, sample_mode: str) -> int:
    """The number of training samples of `cfg.data` in `sample_mode` (computed on the driver)."""

    ds = load_dataset(cfg.data)
    loo = leave_one_out(ds.offsets, ds.items)
    return len(build_windows(loo.train_offsets, loo.train_items, sample_mode))


# ----------------------------------------------------------------------------------------------
# Driver side


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

    sample_mode = cfg.sample_mode
    exact = cfg.train.data_sharding == "exact"
    train_ds = build_train_dataset(cfg)
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
        run_config=ray.train.RunConfig(
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
        CheckpointError: another trainer holds the run (`RunLockedError`), or its checkpoint
            belongs to another dataset or config (`check_resume`), or none is intact.
        KeyboardInterrupt: on SIGINT or SIGTERM.
    """
    local = not os.environ.get("RAY_ADDRESS")
    cfg = resolve_for_workers(cfg, local=local)
    with RunLock(cfg.run.run_dir):  # the driver owns the run until it ends; the workers never lock
        if cfg.run.resume:
            _check_resume_on_driver(cfg)  # before Ray starts, so that a refusal costs nothing
        return _fit_owned(cfg, local=local, placement_strategy=placement_strategy)


def _check_resume_on_driver(cfg: ExperimentConfig) -> None:
    """The checks of a resume (`check_resume`) against the run's newest intact checkpoint."""

    ckpt = newest_intact(run_checkpoints(cfg.run.run_dir))
    if ckpt is not None:
        ds = load_dataset(cfg.data)
        check_resume(ckpt, cfg, fingerprint=dataset_fingerprint(ds), n_items=ds.n_items)


def _fit_owned(cfg: ExperimentConfig, *, local: bool, placement_strategy: str) -> dict[str, Any]:
    """`fit` once the driver holds the run directory."""

    if local:
        needed = math.ceil(cfg.train.num_workers * cfg.train.cpus_per_worker)
        init_ray(num_cpus=max(needed, os.cpu_count() or 1) + 1)  # + 1: Ray Data's own CPU
    else:
        init_ray()
    run_dir = cfg.run.run_dir
    if not cfg.run.resume:
        ray_compat.forget_checkpoints(run_dir)
    (run_dir / DIVERGED_MARKER).unlink(missing_ok=True)  # one of an earlier fit: try again
    with _sigterm_as_interrupt(), follow_run_log(run_dir / RUN_LOG):
        trainer = build_trainer(cfg, placement_strategy=placement_strategy)
        try:
            trainer.fit()
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            diverged = worker_exception(exc, TrainingDiverged)
            (run_dir / DIVERGED_MARKER).unlink(missing_ok=True)
            if diverged is not None:  # the user's to fix: the same one line as without Ray
                raise TrainingDiverged(str(diverged).splitlines()[0]) from None
            raise WorkerError(worker_error_message(exc)) from None
    return json.loads((run_dir / METRICS_FILE).read_text())


@contextlib.contextmanager
def follow_run_log(path: Path, *, interval: float = 0.5):
    """Within the block, print the lines that the run's workers add to its log at `path` (what
    `tail -f` would show from the block's start); the last ones are printed when the block ends."""
    offset = path.stat().st_size if path.is_file() else 0
    stop = threading.Event()

    def drain() -> None:
        nonlocal offset
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read()
        except FileNotFoundError:
            return
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for its newline
        if complete:
            offset += len(complete)
            sys.stdout.write(complete.decode("utf-8", errors="replace"))
            sys.stdout.flush()

    def follow() -> None:
        while not stop.wait(interval):
            drain()

    thread = threading.Thread(target=follow, name="follow-run-log", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        drain()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread (as SIGINT does)."""
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


def worker_exception(exc: BaseException, cls: type[BaseException]) -> BaseException | None:
    """The first worker exception of type `cls` (lowest rank first) behind Ray Train's error
    `exc`, looking through `worker_failures`, Ray's `cause` wrappers and the chain of causes."""
    failures = getattr(exc, "worker_failures", None) or {}
    todo = [failures[rank] for rank in sorted(failures)] + [exc]
    seen: list[BaseException] = []
    while todo:
        cur = todo.pop(0)
        if not isinstance(cur, BaseException) or any(cur is s for s in seen):
            continue
        seen.append(cur)
        inner = getattr(cur, "cause", None)  # a RayTaskError is also an instance of its cause's class
        if isinstance(cur, cls) and not isinstance(inner, cls):
            return cur
        todo += [inner, cur.__cause__, cur.__context__, getattr(cur, "controller_failure", None)]
    return None


def worker_error_message(exc: BaseException) -> str:
    """The failing worker's exception, message and traceback, without Ray's wrapping layers.

    Ray Train raises a `WorkerGroupError` whose `worker_failures` maps rank -> the worker's own
    exception and whose message holds each failing rank's traceback text; other errors (the
    controller's, or a chain of causes) are unwrapped to their innermost exception.
    """
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank, first = min(failures.items())
        details = ray_compat.worker_tracebacks(exc)
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
