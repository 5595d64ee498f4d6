"""The one training loop: `train_per_worker(config)`, for every model, in one process or on Ray.

Called directly it trains in this process (world size 1, checkpoints in `run.storage_path/name`).
Ray Train runs the very same function on each worker with a `RaySession`
(`echomamba_dist.ray_train`), which is the only place the loop meets Ray: rank and world size,
the training data shard, model preparation (DDP), the metric all-reduce, and checkpoint reports.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from echomamba_dist import __version__
from echomamba_dist.config import ConfigError, ExperimentConfig, experiment_from_dict, to_dict
from echomamba_dist.data.splits import Windows, window_batch
from echomamba_dist.errors import CheckpointError, TrainingDiverged
from echomamba_dist.io import write_json_atomic
from echomamba_dist.train.checkpoint import (
    check_resume,
    latest_checkpoint,
    newest_intact,
    prune_checkpoints,
    run_checkpoints,
    write_checkpoint,
)
from echomamba_dist.train.evaluate import EvalSet, evaluate_model, popularity_metrics
from echomamba_dist.train.runlock import RunLock
from echomamba_dist.train.tracking import metric_key

METRICS_FILE = "metrics.json"
FAULT_MARKER = ".fault_injected"


# ----------------------------------------------------------------------------------------------
# Data: leave-one-out split -> training samples and evaluation sets


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
    from echomamba_dist.data.dataset import dataset_fingerprint, load_dataset
    from echomamba_dist.data.splits import build_windows, history_matrix, leave_one_out

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


# ----------------------------------------------------------------------------------------------
# Where the loop runs: one process, or a Ray Train worker


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
        import shutil

        target = self.run_dir / f"epoch_{epoch:06d}"
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:  # copy beside the target (another filesystem, maybe), then rename: atomic
            shutil.copytree(checkpoint_dir, staging, dirs_exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(checkpoint_dir.parent, ignore_errors=True)
        prune_checkpoints(self.run_dir, keep_best=self.cfg.run.keep_checkpoints)

    def batch_source(self, samples: Windows | None, **kwargs: Any) -> BatchSource:
        return BatchSource(samples, rank=self.rank, world_size=self.world_size, **kwargs)


# ----------------------------------------------------------------------------------------------
# The loop


class LossModule(nn.Module):
    """Puts `model.loss` behind `forward`, so that DDP's gradient hooks see it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.loss(batch)


@dataclass
class TrainState:
    """What early stopping and resumption need beyond the weights."""

    epoch: int = 0  # the next epoch to run
    step: int = 0  # optimizer steps taken so far
    best_metric: float = float("-inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and NumPy's legacy global generator."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def _progress(iterable, *, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _inject_fault(cfg: ExperimentConfig, session: WorkerSession, step: int) -> None:
    """Kill this worker process once, at `train.fail_at_step` (for failure-recovery tests)."""
    if cfg.train.fail_at_step is None or step != cfg.train.fail_at_step:
        return
    victim = session.world_size - 1
    marker = cfg.run.run_dir / FAULT_MARKER
    if session.rank != victim or marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"killed rank {victim} at step {step}\n")
    print(f"[fault injection] killing worker rank {victim} (pid {os.getpid()}) at step {step}", flush=True)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _diverged(cfg: ExperimentConfig, what: str, *, epoch: int, step: int) -> TrainingDiverged:
    """The one-line error for a run whose loss or scores went non-finite (no checkpoint is written)."""
    return TrainingDiverged(
        f"training diverged: {what} at epoch {epoch}, step {step} (run {cfg.run.name}); no checkpoint of this "
        f"epoch was written; try a lower train.lr (now {cfg.train.lr:g}) or set train.grad_clip, in a new run.name"
    )


def train_per_worker(config: dict[str, Any], *, session: WorkerSession | None = None) -> dict[str, Any]:
    """Train, validate every epoch, stop early, and test the best model once.

    Args:
        config: a plain dict of the experiment config (see `echomamba_dist.config`).
        session: where it runs; None trains in this process (`LocalSession`).
    Returns:
        On every rank: {"best_epoch", "epochs_run", "valid": {...}, "test": {...},
        "popularity": {...}, "train_seconds", "samples_per_second", ...}.
    """
    cfg = experiment_from_dict(config)
    if session is None:  # in this process: this trainer owns the run directory until it ends
        session = LocalSession(cfg)  # refuses train.device=cuda without a GPU before any data is read
        with RunLock(cfg.run.run_dir):
            return _train(cfg, session)
    return _train(cfg, session)  # on Ray the driver holds the run (`ray_train.fit`)


def _train(cfg: ExperimentConfig, session: WorkerSession) -> dict[str, Any]:
    """`train_per_worker` in `session`."""
    from echomamba_dist.models.registry import build_model

    device = session.device
    is_main = session.rank == 0
    seed_everything(cfg.train.seed)

    data = build_training_data(cfg, cfg.sample_mode, with_samples=session.local_samples)
    seed_everything(cfg.train.seed)  # same initial weights on every rank and every run
    model = build_model(cfg.model, n_items=data.n_items).to(device)  # data.max_len <= model.max_len: ExperimentConfig.check
    optimizer = torch.optim.Adam(model.param_groups(cfg.train.weight_decay), lr=cfg.train.lr)
    state = TrainState()
    best_model_state: dict[str, torch.Tensor] | None = None

    with session.restore_dir() as candidates:
        # the newest checkpoint that reads whole (a corrupt one is skipped with a warning), of
        # this dataset and config (`check_resume`, or the run would mix two experiments)
        ckpt = newest_intact(candidates, map_location=device, warn=is_main)
        if ckpt is not None:
            check_resume(ckpt, cfg, fingerprint=data.fingerprint, n_items=data.n_items)
            try:
                model.load_state_dict(ckpt.state["model"])
                optimizer.load_state_dict(ckpt.state["optimizer"])
                state = TrainState(**{k: ckpt.meta[k] for k in TrainState.__dataclass_fields__})
                torch.set_rng_state(ckpt.state["rng"]["torch"].cpu())
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise CheckpointError(f"{ckpt.directory}: cannot resume from it: {type(exc).__name__} {why}") from None
            best_model_state = ckpt.state.get("best_model")
            if is_main:
                print(f"resumed from {ckpt.directory} (next epoch {state.epoch}, step {state.step})", flush=True)

    loss_module: nn.Module = LossModule(model)
    if cfg.train.compile:
        loss_module = torch.compile(loss_module)
    train_module = session.prepare_model(loss_module)
    source = session.batch_source(
        data.samples,
        max_len=cfg.data.max_len,
        global_batch=cfg.train.batch_size,
        seed=cfg.train.seed,
        bucketing=cfg.data.bucketing,
        max_steps=cfg.train.max_steps_per_epoch,
    )
    autocast_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
    show_progress = is_main and cfg.train.progress and sys.stdout.isatty()
    config_dict = to_dict(cfg)

    tracker = None
    if is_main:
        from echomamba_dist.train.tracking import Tracker  # imports mlflow: rank 0 only

        tracker = Tracker(cfg.tracking, run_dir=cfg.run.run_dir, run_name=cfg.run.name)
        tracker.log_config(config_dict, tags={"dataset.fingerprint": data.fingerprint, "model": cfg.model_name})

    train_seconds = 0.0
    samples_seen = 0
    status = "FAILED"
    try:
        epochs = range(state.epoch, cfg.train.epochs)
        for epoch in _progress(epochs, total=len(epochs), desc="epochs", enabled=show_progress):
            if state.bad_epochs >= cfg.train.patience > 0:
                break
            model.train()
            # dropout depends only on (seed, epoch, rank), so a run resumed on any rank draws
            # what the uninterrupted run drew (only rank 0's RNG state is in the checkpoint)
            torch.manual_seed(int(np.random.SeedSequence([cfg.train.seed, epoch, session.rank]).generate_state(1)[0]))
            t0 = time.perf_counter()
            loss_sum, loss_count, epoch_samples = 0.0, 0, 0
            batches = source.epoch(epoch, device=device)
            for batch in _progress(batches, total=source.steps_per_epoch(), desc=f"epoch {epoch}", enabled=show_progress):
                _inject_fault(cfg, session, state.step)
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                    loss = train_module(batch)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):  # stop before the step spreads it to the weights
                    raise _diverged(cfg, f"the training loss is {loss_value}", epoch=epoch, step=state.step + 1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.train.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                state.step += 1
                loss_sum += loss_value
                loss_count += 1
                epoch_samples += int(batch["seq_len"].shape[0])
            epoch_seconds = time.perf_counter() - t0
            train_seconds += epoch_seconds

            valid = evaluate_model(
                model, data.valid, ks=cfg.train.ks, batch_size=cfg.train.eval_batch_size, device=device,
                rank=session.rank, world_size=session.world_size, all_reduce=session.all_reduce_sums,
                exclude_history=cfg.train.exclude_history, autocast_dtype=autocast_dtype, allow_nonfinite=True,
            )
            nonfinite = valid.pop("nonfinite_users")  # the same count on every rank: all stop here
            if nonfinite:
                raise _diverged(cfg, f"the validation scores of {int(nonfinite)} of {int(valid['count'])} users are "
                                     f"NaN or infinite", epoch=epoch, step=state.step)
            score = valid[cfg.train.metric]
            improved = score > state.best_metric
            if improved:
                state.best_metric, state.best_epoch, state.bad_epochs = score, epoch, 0
                best_model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                state.bad_epochs += 1
            state.epoch = epoch + 1
            global_samples = session.all_reduce_sums({"n": float(epoch_samples)})["n"]
            samples_seen += global_samples
            record = {
                "epoch": epoch,
                "loss": loss_sum / max(loss_count, 1),
                "epoch_seconds": epoch_seconds,
                "samples_per_second": global_samples / max(epoch_seconds, 1e-9),
                **{f"val_{k}": v for k, v in valid.items() if k != "count"},
            }
            state.history.append(record)
            if is_main:
                tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
                print(
                    f"epoch {epoch:3d}  loss {record['loss']:.4f}  val {cfg.train.metric} {score:.4f}"
                    f"{' *' if improved else '  '}  {epoch_seconds:6.1f}s  {record['samples_per_second']:,.0f} samples/s",
                    flush=True,
                )
            ckpt_tmp = None
            if is_main:
                ckpt_tmp = Path(tempfile.mkdtemp(prefix="echomamba-ckpt-"))
                write_checkpoint(
                    ckpt_tmp / "ckpt",
                    model_state=model.state_dict(),
                    optimizer_state=optimizer.state_dict(),
                    meta={
                        **{k: getattr(state, k) for k in TrainState.__dataclass_fields__},
                        "val_metric": score,
                        "metric": cfg.train.metric,
                        "model": cfg.model_name,
                        "n_items": data.n_items,
                        "dataset_fingerprint": data.fingerprint,
                        "version": __version__,
                    },
                    config=config_dict,
                    # the best weights so far travel with the latest ones, so that the final
                    # test (also of a resumed run) always uses the best model
                    extra_state={"best_model": best_model_state},
                )
            session.report(
                {metric_key(k): v for k, v in record.items()},
                ckpt_tmp / "ckpt" if ckpt_tmp else None,
                epoch=epoch,
            )

        if best_model_state is not None:
            model.load_state_dict(best_model_state)
        test = {"count": 0.0}
        if cfg.train.final_test:
            test = evaluate_model(
                model, data.test, ks=cfg.train.ks, batch_size=cfg.train.eval_batch_size, device=device,
                rank=session.rank, world_size=session.world_size, all_reduce=session.all_reduce_sums,
                exclude_history=cfg.train.exclude_history, autocast_dtype=autocast_dtype,
            )
        best_valid = next((h for h in state.history if h["epoch"] == state.best_epoch), None)
        result = {
            "model": cfg.model_name,
            "run": cfg.run.name,
            "best_epoch": state.best_epoch,
            "epochs_run": state.epoch,
            "steps": state.step,
            "valid": {k[4:]: v for k, v in (best_valid or {}).items() if k.startswith("val_")},
            "test": {k: v for k, v in test.items() if k != "count"},
            "test_users": int(test["count"]),
            "popularity": popularity_metrics(data.train_items, data.n_items, data.test, ks=cfg.train.ks),
            "train_seconds_this_session": train_seconds,
            "samples_per_second": samples_seen / train_seconds if train_seconds else None,
            "dataset_fingerprint": data.fingerprint,
        }
        if is_main:
            write_json_atomic(cfg.run.run_dir / METRICS_FILE, result)
            best_dir = latest_checkpoint(cfg.run.run_dir)
            tracker.log_final(
                {**{f"test_{k}": v for k, v in result["test"].items()}, "best_epoch": state.best_epoch,
                 "epochs_run": state.epoch},
                checkpoint_dir=best_dir,
                item_ids=[str(x) for x in data.item_ids],
            )
        session.report(
            {"epoch": state.epoch, "done": True, **{metric_key(f"test_{k}"): v for k, v in result["test"].items()}},
            None,
            epoch=state.epoch,
        )
        status = "FINISHED"
        return result
    finally:
        if tracker is not None:
            tracker.end(status=status)
