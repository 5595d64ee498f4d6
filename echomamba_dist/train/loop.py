"""The one training loop: `train_per_worker(config)`, for every model, in one process or on Ray.

Called directly it trains in this process (world size 1, checkpoints in `run.storage_path/name`).
Ray Train runs the very same function on each worker with a `RaySession`
(`echomamba_dist.distributed.trainer`), which is the only place the loop meets Ray: rank and world size,
the training data shard, model preparation (DDP), the metric all-reduce, and checkpoint reports.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from echomamba_dist import __version__
from echomamba_dist.config import ExperimentConfig, experiment_from_dict, to_dict
from echomamba_dist.errors import CheckpointError, TrainingDiverged
from echomamba_dist.io import write_json_atomic
from echomamba_dist.models.registry import build_model
from echomamba_dist.train.batches import (
    TrainingData,
    batch_source_options,
    build_training_data,
)
from echomamba_dist.train.checkpoint import (
    check_resume,
    newest_intact,
    write_checkpoint,
)
from echomamba_dist.train.evaluate import evaluate_model, popularity_metrics
from echomamba_dist.train.runlock import RunLock
from echomamba_dist.train.session import LocalSession, WorkerSession
from echomamba_dist.train.tracking import Tracker, metric_key

METRICS_FILE = "metrics.json"
FAULT_MARKER = ".fault_injected"


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
    session.log(f"[fault injection] killing worker rank {victim} (pid {os.getpid()}) at step {step}")
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
    return _train(cfg, session)  # on Ray the driver holds the run (`distributed.trainer.fit`)


def _train(cfg: ExperimentConfig, session: WorkerSession) -> dict[str, Any]:
    """`train_per_worker` in `session`: set up, run the epochs, test the best weights."""
    device, is_main = session.device, session.rank == 0
    seed_everything(cfg.train.seed)
    data = build_training_data(cfg, cfg.sample_mode, with_samples=session.local_samples)
    seed_everything(cfg.train.seed)  # same initial weights on every rank and every run
    model = build_model(cfg.model, n_items=data.n_items).to(device)
    optimizer = torch.optim.Adam(model.param_groups(cfg.train.weight_decay), lr=cfg.train.lr)
    state, best_weights = _restore(cfg, session, model, optimizer, data)

    loss_module: nn.Module = LossModule(model)
    if cfg.train.compile:
        loss_module = torch.compile(loss_module)
    train_module = session.prepare_model(loss_module)
    source = session.batch_source(data.samples, **batch_source_options(cfg))
    autocast = torch.bfloat16 if cfg.train.precision == "bf16" else None
    show_progress = is_main and cfg.train.progress and sys.stdout.isatty()
    tracker = Tracker(cfg.tracking, run_dir=cfg.run.run_dir, run_name=cfg.run.name, enabled=is_main)
    tracker.log_config(to_dict(cfg), tags={"dataset.fingerprint": data.fingerprint, "model": cfg.model_name})

    status, train_seconds, samples_seen = "FAILED", 0.0, 0.0
    try:
        epochs = range(state.epoch, cfg.train.epochs)
        for epoch in _progress(epochs, total=len(epochs), desc="epochs", enabled=show_progress):
            if state.bad_epochs >= cfg.train.patience > 0:
                break
            seed_epoch(cfg.train.seed, epoch, session.rank)
            batches = _progress(source.epoch(epoch, device=device), total=source.steps_per_epoch(),
                                desc=f"epoch {epoch}", enabled=show_progress)
            loss, samples, seconds = train_epoch(cfg, session, train_module, model, optimizer, batches, state,
                                                  epoch=epoch, autocast=autocast)
            train_seconds += seconds
            valid = _validate(cfg, session, model, data, epoch=epoch, step=state.step, autocast=autocast)
            score = valid[cfg.train.metric]
            improved = score > state.best_metric
            if improved:
                state.best_metric, state.best_epoch, state.bad_epochs = score, epoch, 0
                best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                state.bad_epochs += 1
            state.epoch = epoch + 1
            global_samples = session.all_reduce_sums({"n": float(samples)})["n"]
            samples_seen += global_samples
            record = {"epoch": epoch, "loss": loss, "epoch_seconds": seconds,
                      "samples_per_second": global_samples / max(seconds, 1e-9),
                      **{f"val_{k}": v for k, v in valid.items() if k != "count"}}
            state.history.append(record)
            if is_main:
                tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
                session.log(f"epoch {epoch:3d}  loss {loss:.4f}  val {cfg.train.metric} {score:.4f}"
                            f"{' *' if improved else '  '}  {seconds:6.1f}s  {record['samples_per_second']:,.0f} samples/s")
            ckpt = _write_epoch_checkpoint(cfg, model, optimizer, state, data, best_weights, score) if is_main else None
            session.report({metric_key(k): v for k, v in record.items()}, ckpt, epoch=epoch)

        result = _finish(cfg, session, model, data, state, best_weights, autocast=autocast,
                         train_seconds=train_seconds, samples_seen=samples_seen)
        if is_main:
            write_json_atomic(cfg.run.run_dir / METRICS_FILE, result)
            tracker.log_final({**{f"test_{k}": v for k, v in result["test"].items()},
                               "best_epoch": state.best_epoch, "epochs_run": state.epoch})
        session.report({"epoch": state.epoch, "done": True,
                        **{metric_key(f"test_{k}"): v for k, v in result["test"].items()}}, None, epoch=state.epoch)
        status = "FINISHED"
        return result
    finally:
        tracker.end(status=status)


def _restore(cfg: ExperimentConfig, session: WorkerSession, model: nn.Module, optimizer, data: TrainingData):
    """Resume from the newest checkpoint that reads whole (a corrupt one is skipped with a
    warning), of this dataset and config (`check_resume`: a run never mixes two experiments).

    Returns:
        (TrainState, best weights so far or None); a fresh state when there is nothing to resume.
    """
    is_main = session.rank == 0
    with session.restore_dir() as candidates:
        ckpt = newest_intact(candidates, map_location=session.device, warn=is_main)
        if ckpt is None:
            return TrainState(), None
        check_resume(ckpt, cfg, fingerprint=data.fingerprint, n_items=data.n_items)
        try:
            model.load_state_dict(ckpt.state["model"])
            optimizer.load_state_dict(ckpt.state["optimizer"])
            state = TrainState(**{k: ckpt.meta[k] for k in TrainState.__dataclass_fields__})
            torch.set_rng_state(ckpt.state["rng"]["torch"].cpu())
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CheckpointError(f"{ckpt.directory}: cannot resume from it: {type(exc).__name__} {why}") from None
        if is_main:
            session.log(f"resumed from {ckpt.directory} (next epoch {state.epoch}, step {state.step})")
        return state, ckpt.state.get("best_model")


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed torch for one epoch of one rank: dropout depends only on (seed, epoch, rank), so a run
    resumed on any rank draws what the uninterrupted run drew (only rank 0's RNG state is in the
    checkpoint)."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))


def train_step(train_module: nn.Module, model: nn.Module, optimizer, batch: dict[str, torch.Tensor], *,
               grad_clip: float | None = None, autocast: torch.dtype | None = None) -> float:
    """One optimizer step on `batch` (autocast, zero_grad, backward, clip, step); returns the loss.

    A non-finite loss takes no step: the caller sees it and stops before it reaches the weights.
    """
    device_type = batch["item_seq"].device.type
    with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
        loss = train_module(batch)
    value = float(loss.detach())
    if not math.isfinite(value):
        return value
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return value


def train_epoch(cfg: ExperimentConfig, session: WorkerSession, train_module: nn.Module, model: nn.Module, optimizer,
                batches, state: TrainState, *, epoch: int, autocast: torch.dtype | None) -> tuple[float, int, float]:
    """One epoch of optimizer steps over `batches`. Returns (mean loss, samples on this rank, seconds).

    Raises:
        TrainingDiverged: a non-finite loss, before its step reaches the weights.
    """
    model.train()
    t0 = time.perf_counter()
    loss_sum, steps, samples = 0.0, 0, 0
    for batch in batches:
        _inject_fault(cfg, session, state.step)
        value = train_step(train_module, model, optimizer, batch, grad_clip=cfg.train.grad_clip, autocast=autocast)
        if not math.isfinite(value):
            raise _diverged(cfg, f"the training loss is {value}", epoch=epoch, step=state.step + 1)
        state.step += 1
        loss_sum, steps, samples = loss_sum + value, steps + 1, samples + int(batch["seq_len"].shape[0])
    return loss_sum / max(steps, 1), samples, time.perf_counter() - t0


def _validate(cfg, session, model, data: TrainingData, *, epoch: int, step: int, autocast) -> dict[str, float]:
    """Validation metrics of every user (summed over ranks).

    Raises:
        TrainingDiverged: some user's scores are NaN or infinite (the same count on every rank).
    """
    valid = evaluate_model(
        model, data.valid, ks=cfg.train.ks, batch_size=cfg.train.eval_batch_size, device=session.device,
        rank=session.rank, world_size=session.world_size, all_reduce=session.all_reduce_sums,
        exclude_history=cfg.train.exclude_history, autocast_dtype=autocast, allow_nonfinite=True,
    )
    nonfinite = valid.pop("nonfinite_users")
    if nonfinite:
        raise _diverged(cfg, f"the validation scores of {int(nonfinite)} of {int(valid['count'])} users are "
                             f"NaN or infinite", epoch=epoch, step=step)
    return valid


def _write_epoch_checkpoint(cfg, model, optimizer, state: TrainState, data: TrainingData, best_weights,
                            score: float) -> Path:
    """This epoch's checkpoint in a temporary directory, for the session to file (rank 0).

    The best weights so far travel with the latest ones, so that the final test (also of a
    resumed run) always uses the best model.
    """
    directory = Path(tempfile.mkdtemp(prefix="echomamba-ckpt-")) / "ckpt"
    write_checkpoint(
        directory,
        model_state=model.state_dict(),
        optimizer_state=optimizer.state_dict(),
        meta={
            **{k: getattr(state, k) for k in TrainState.__dataclass_fields__},
            "val_metric": score, "metric": cfg.train.metric, "model": cfg.model_name, "n_items": data.n_items,
            "dataset_fingerprint": data.fingerprint, "version": __version__,
        },
        config=to_dict(cfg),
        extra_state={"best_model": best_weights},
    )
    return directory


def _finish(cfg, session, model, data: TrainingData, state: TrainState, best_weights, *, autocast,
            train_seconds: float, samples_seen: float) -> dict[str, Any]:
    """Test the best weights once (`train.final_test`) and gather the run's result."""
    if best_weights is not None:
        model.load_state_dict(best_weights)
    test = {"count": 0.0}
    if cfg.train.final_test:
        test = evaluate_model(
            model, data.test, ks=cfg.train.ks, batch_size=cfg.train.eval_batch_size, device=session.device,
            rank=session.rank, world_size=session.world_size, all_reduce=session.all_reduce_sums,
            exclude_history=cfg.train.exclude_history, autocast_dtype=autocast,
        )
    best_valid = next((h for h in state.history if h["epoch"] == state.best_epoch), None)
    return {
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
