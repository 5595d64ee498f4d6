"""Checkpoints: one directory per save, written atomically, loaded without unpickling objects.

Layout of a checkpoint directory:

    state.pt       {"model": state_dict, "optimizer": state_dict, "rng": {"torch": ByteTensor}}
                   loaded with torch.load(weights_only=True): tensors and plain containers only
    meta.json      epoch, step, best metric and epoch, patience counter, model name, n_items,
                   dataset fingerprint, package version, history of validation metrics
    config.yaml    the full experiment config (human-readable, and what `evaluate` rebuilds from)

A run directory (`run.storage_path/run.name`) keeps its checkpoints as `epoch_000007/` directly
inside it, the same layout whether the run was local or on Ray Train (whose checkpoint manager
names them so); `latest_checkpoint(run_dir)` finds the newest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from echomamba_dist.errors import CheckpointError

STATE_FILE = "state.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"


def write_checkpoint(
    directory: str | os.PathLike,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    meta: dict[str, Any],
    config: dict[str, Any],
    extra_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint into `directory` (which must not exist) atomically.

    The files are written to a temporary sibling directory that is renamed into place, so a
    crash leaves either a complete checkpoint or none.
    `extra_state` adds entries (tensors or plain containers) to state.pt, e.g. "best_model".
    Returns the checkpoint directory.
    """
    import yaml

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        state = {"model": model_state, "rng": {"torch": torch.get_rng_state()}}
        if optimizer_state is not None:
            state["optimizer"] = optimizer_state
        state.update(extra_state or {})
        torch.save(state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The meta.json of a checkpoint directory. Raises CheckpointError naming the path."""
    path = Path(directory) / META_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: not a checkpoint directory (no {META_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata: {exc}") from None


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The experiment config saved with a checkpoint, as a dict."""
    import yaml

    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint directory (no {CONFIG_FILE})")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def read_state(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The tensors of a checkpoint, loaded with `weights_only=True` (no arbitrary unpickling)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint directory (no {STATE_FILE})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, disallowed globals
        raise CheckpointError(f"{path}: cannot load checkpoint state: {exc}") from None


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (by epoch in the name)."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("epoch_") and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike, *, keep_best: int) -> None:
    """Delete checkpoints except the newest and the `keep_best` with the highest validation metric."""
    found = checkpoint_dirs(run_dir)
    if len(found) <= keep_best + 1:
        return
    scored = [(read_meta(p).get("val_metric", float("-inf")), p) for p in found]
    best = {p for _, p in sorted(scored, key=lambda t: (t[0], t[1].name), reverse=True)[:keep_best]}
    keep = best | {found[-1]}
    for p in found:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
