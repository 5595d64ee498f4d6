"""Checkpoints: one directory per save, written atomically, loaded without unpickling objects.

Layout of a checkpoint directory:

    state.pt       {"model": state_dict, "optimizer": state_dict, "rng": {"torch": ByteTensor}}
                   loaded with torch.load(weights_only=True): tensors and plain containers only
    meta.json      epoch, step, best metric and epoch, patience counter, model name, n_items,
                   dataset fingerprint, package version, history of validation metrics
    config.yaml    the full experiment config (human-readable, and what `evaluate` rebuilds from)

A run directory (`run.storage_path/run.name`) keeps its checkpoints as `epoch_000007/` directly
inside it, the same layout whether the run was local or on Ray Train (whose checkpoint manager
names them so); `latest_checkpoint(run_dir)` finds the newest complete one, and
`newest_intact(...)` the newest one whose three files load (a truncated or garbled newer one is
skipped with a warning).

Resuming compares the checkpoint with the new run (`check_resume`): the dataset (fingerprint and
item count) and every config key that changes what the model learns. `RESUME_FREE_KEYS` lists
the keys that may change between the two (how long, where, on what hardware, how it is logged).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from echomamba_dist.config import experiment_from_dict, flatten, to_dict
from echomamba_dist.errors import CheckpointError, ConfigError
from echomamba_dist.io import atomic_dir

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
    """Write a checkpoint into `directory` atomically (`io.atomic_dir`): a crash leaves either a
    complete checkpoint or none; an existing one (an epoch run again) is replaced.
    `extra_state` adds entries (tensors or plain containers) to state.pt, e.g. "best_model".
    Returns the checkpoint directory.
    """
    target = Path(directory)
    with atomic_dir(target, overwrite=True, what="checkpoint") as tmp:  # an epoch run again replaces its own
        state = {"model": model_state, "rng": {"torch": torch.get_rng_state()}}
        if optimizer_state is not None:
            state["optimizer"] = optimizer_state
        state.update(extra_state or {})
        torch.save(state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return target


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The meta.json of a checkpoint directory. Raises CheckpointError naming the path."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: corrupt checkpoint metadata: expected a JSON object")
        return meta
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: not a checkpoint directory (no {META_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint metadata: {exc.strerror or exc}") from None


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The experiment config saved with a checkpoint, as a dict.

    Raises:
        CheckpointError: naming the file: missing, not UTF-8 YAML (a `!!python/...` tag
            included: read with `yaml.safe_load`), or not a mapping.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint directory (no {CONFIG_FILE})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: corrupt checkpoint config (expected plain YAML): {first}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: corrupt checkpoint config: expected a mapping, got {type(data).__name__}")
    return data


def read_state(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The tensors of a checkpoint, loaded with `weights_only=True` (no arbitrary unpickling)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint directory (no {STATE_FILE})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, disallowed globals
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot load checkpoint state: {first}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path}: cannot load checkpoint state: expected a dict with the model's weights")
    return state


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
    scored = [(_val_metric(p), p) for p in found]
    best = {p for _, p in sorted(scored, key=lambda t: (t[0], t[1].name), reverse=True)[:keep_best]}
    keep = best | {found[-1]}
    for p in found:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def _val_metric(directory: Path) -> float:
    """A checkpoint's validation metric for pruning; an unreadable one ranks last (pruned first)."""
    try:
        return float(read_meta(directory).get("val_metric", float("-inf")))
    except (CheckpointError, TypeError, ValueError):
        return float("-inf")


# ----------------------------------------------------------------------------------------------
# Loading with fallback: the newest checkpoint whose files all load


@dataclass
class Checkpoint:
    """A checkpoint read whole: its directory, meta.json, config.yaml (a dict) and state.pt."""

    directory: Path
    meta: dict[str, Any]
    config: dict[str, Any]
    state: dict[str, Any]


def read_checkpoint(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and check all three files of a checkpoint directory.

    Raises:
        CheckpointError: naming the first file that is missing, truncated or garbled.
    """
    d = Path(directory)
    meta = read_meta(d)
    config = read_config(d)
    state = read_state(d, map_location=map_location)
    return Checkpoint(directory=d, meta=meta, config=config, state=state)


def newest_intact(
    candidates: Iterable[str | os.PathLike], *, map_location: str | torch.device = "cpu", warn: bool = True,
) -> Checkpoint | None:
    """The first of `candidates` (newest first) that reads whole; each corrupt one before it is
    skipped with a one-line warning on stderr naming the file.

    Args:
        candidates: checkpoint directories, newest first (`run_checkpoints(run_dir)`).
        warn: print the warnings (e.g. rank 0 only).
    Returns:
        The checkpoint, or None when there are no candidates.
    Raises:
        CheckpointError: there were candidates and none of them is intact (one line: how many,
            and the newest one's reason; no warnings are printed then).
    """
    errors: list[CheckpointError] = []
    for d in candidates:
        try:
            found = read_checkpoint(d, map_location=map_location)
        except CheckpointError as exc:
            errors.append(exc)
            continue
        for exc in errors if warn else []:
            print(f"echomamba: warning: skipping corrupt checkpoint: {exc}; using {found.directory.name}",
                  file=sys.stderr, flush=True)
        return found
    if errors:
        raise CheckpointError(f"no intact checkpoint among {len(errors)}; the newest: {errors[0]}")
    return None


def run_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """A run's checkpoint directories, newest first (the candidates of `newest_intact`)."""
    return checkpoint_dirs(run_dir)[::-1]


# ----------------------------------------------------------------------------------------------
# Resuming: the same dataset and every key that changes the result

# Keys (dotted; a trailing '.' is a whole section) that may differ between a checkpoint and the
# run that resumes it, because they do not change what the model learns:
RESUME_FREE_KEYS = (
    "train.epochs",  # more epochs extend the run: the same as a longer run from the start
    "train.patience",  # the stopping rule; the state it counts is in the checkpoint
    "train.eval_batch_size",  # metric sums are exact for any batch size
    "train.num_workers", "train.cpus_per_worker", "train.use_gpu", "train.device", "train.ray",
    "train.compile",  # where and how fast it runs ("exact" sharding gives every world size the same batches)
    "train.final_test", "train.progress", "train.fail_at_step",  # reporting and fault injection
    "data.path", "data.synthetic.",  # the dataset is compared by its content (fingerprint), not its name
    "run.", "tracking.",  # where the run lives and how it is logged
)
# Everything else is compared: the model section, data.max_len and data.bucketing, and train.lr,
# weight_decay, grad_clip, batch_size, seed, samples, precision, max_steps_per_epoch, metric, ks,
# exclude_history and data_sharding. A key added later is compared too, until listed above.


def _free(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_FREE_KEYS)


def resume_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) of every compared key that differs, in key order.

    Both configs are full (`to_dict` of an ExperimentConfig), so a key missing from one side
    compares as None.
    """
    a, b = flatten(saved), flatten(current)
    out = []
    for key in sorted(set(a) | set(b), key=lambda k: (k != "model.name", k)):  # another model: say so first
        if not _free(key) and a.get(key) != b.get(key):
            out.append((key, a.get(key), b.get(key)))
    return out


def check_resume(ckpt: Checkpoint, cfg: Any, *, fingerprint: str, n_items: int) -> None:
    """Refuse to resume `ckpt` with an ExperimentConfig `cfg` on a dataset (`fingerprint`,
    `n_items`) that is not the one it was trained with.

    Raises:
        CheckpointError: naming the checkpoint, the dataset or the differing keys with their old
            and new values, and how to go on (another run.name, or the old settings).
    """
    how = (f"start a new run with another run.name (e.g. --set run.name={cfg.run.name}-2), "
           "or resume with the checkpoint's settings")
    old_fp, old_items = ckpt.meta.get("dataset_fingerprint"), ckpt.meta.get("n_items")
    if (old_fp is not None and old_fp != fingerprint) or (old_items is not None and int(old_items) != n_items):
        data = cfg.data.path or "the synthetic dataset"
        raise CheckpointError(
            f"{ckpt.directory}: cannot resume: trained on dataset fingerprint {old_fp} ({old_items} items), "
            f"but {data} has fingerprint {fingerprint} ({n_items} items); {how}"
        )
    try:
        saved = to_dict(experiment_from_dict(ckpt.config))
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt.directory / CONFIG_FILE}: cannot resume: {exc}") from None
    diffs = resume_mismatches(saved, to_dict(cfg))
    if diffs:
        shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diffs[:4])
        more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise CheckpointError(
            f"{ckpt.directory}: cannot resume: the config differs from the checkpoint's: {shown}{more}; {how}"
        )
