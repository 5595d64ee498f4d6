"""Loading a trained model from a checkpoint, and top-K recommendation.

Shared by `echomamba evaluate`, `echomamba recommend`, the Ray batch-recommendation job and the
MLflow model flavour, so that all of them score users the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from echomamba_dist.config import ExperimentConfig, experiment_from_dict
from echomamba_dist.data.splits import pad_right
from echomamba_dist.errors import CheckpointError, ConfigError, NonFiniteScores
from echomamba_dist.models.registry import build_model
from echomamba_dist.train.checkpoint import (
    CONFIG_FILE,
    META_FILE,
    Checkpoint,
    newest_intact,
    read_checkpoint,
    run_checkpoints,
)


@dataclass
class LoadedModel:
    """A model in eval mode with the config and metadata it was trained with."""

    model: torch.nn.Module
    config: ExperimentConfig
    meta: dict[str, Any]
    checkpoint_dir: Path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, given either one or a run directory (its newest intact checkpoint:
    a corrupt newer one is skipped with a warning).

    Raises:
        CheckpointError: no such path, no checkpoint there, or none of them intact.
    """
    return _read(path).directory


def _read(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run directory")
    if (p / META_FILE).is_file():  # a checkpoint named explicitly: that one, or an error
        return read_checkpoint(p, map_location=map_location)
    found = newest_intact(run_checkpoints(p), map_location=map_location)
    if found is None:
        raise CheckpointError(f"{p}: neither a checkpoint nor a run directory with checkpoints")
    return found


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", best: bool = True) -> LoadedModel:
    """Rebuild the model of a checkpoint (its best weights by default) without unpickling objects.

    Raises:
        CheckpointError: the path holds no readable checkpoint.
    """
    found = _read(path, map_location=device)
    ckpt, meta, state = found.directory, found.meta, found.state
    try:
        cfg = experiment_from_dict(found.config)
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: {exc}") from None
    weights = state.get("best_model") if best and state.get("best_model") is not None else state["model"]
    n_items = meta.get("n_items")
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 1:
        raise CheckpointError(f"{ckpt / META_FILE}: n_items: expected a positive item count, got {n_items!r}")
    model = build_model(cfg.model, n_items=n_items)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{ckpt}: weights do not fit model {cfg.model_name}: {first}") from None
    model.to(device).eval()
    return LoadedModel(model=model, config=cfg, meta=meta, checkpoint_dir=ckpt)


def pad_histories(histories: list[np.ndarray] | list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad item-index histories to (n, max_len), keeping the most recent max_len items
    (`data.splits.pad_right`)."""
    return pad_right(histories, max_len)


@torch.no_grad()
def topk_items(
    model: torch.nn.Module,
    item_seq: np.ndarray,
    seq_len: np.ndarray,
    *,
    k: int,
    exclude_history: bool = True,
    batch_size: int = 4096,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k item indices and their scores for right-padded histories.

    The padding item is never recommended; with `exclude_history`, items already in the history
    are not recommended again. A row with fewer than k such items is filled up with item 0 and
    score -inf (the arrays are k' = min(k, n_items) wide); callers drop those places.

    Returns:
        (n, k') int64 item indices, best first, and (n, k') float32 scores.
    Raises:
        NonFiniteScores: the model scores some history with NaN or infinity (diverged weights).
    """
    device = torch.device(device)
    out_items, out_scores = [], []
    for start in range(0, len(seq_len), batch_size):
        lens = torch.from_numpy(seq_len[start : start + batch_size]).to(device)
        width = max(int(lens.max()), 1)
        seq = torch.from_numpy(item_seq[start : start + batch_size, :width]).to(device)
        scores = model.score_all(seq, lens).float()  # (B, n_items + 1)
        bad = int((~torch.isfinite(scores[:, 1:])).any(dim=1).sum())
        if bad:
            raise NonFiniteScores(
                f"the model scores {bad} of {len(lens)} histories with NaN or infinity (diverged weights); "
                f"no recommendation is made from such scores"
            )
        scores[:, 0] = float("-inf")
        if exclude_history:
            scores.scatter_(1, seq, float("-inf"))
            scores[:, 0] = float("-inf")
        top = torch.topk(scores, k=min(k, scores.shape[1] - 1), dim=1)
        # every real score is finite: -inf marks places past the row's candidates
        indices = top.indices.masked_fill(top.values == float("-inf"), 0)
        out_items.append(indices.cpu().numpy())
        out_scores.append(top.values.cpu().numpy())
    return np.concatenate(out_items), np.concatenate(out_scores)
