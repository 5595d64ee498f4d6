"""Checkpoints are atomic, weights-only, pruned to the best k plus the newest."""

from __future__ import annotations

import pickle

import pytest
import torch

from echomamba_dist.errors import CheckpointError
from echomamba_dist.train.checkpoint import (
    checkpoint_dirs,
    latest_checkpoint,
    prune_checkpoints,
    read_config,
    read_meta,
    read_state,
    write_checkpoint,
)


def _write(run_dir, epoch, metric):
    return write_checkpoint(
        run_dir / f"epoch_{epoch:06d}",
        model_state={"w": torch.full((2,), float(epoch))},
        optimizer_state={"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        meta={"epoch": epoch, "val_metric": metric},
        config={"train": {"seed": 1}},
        extra_state={"best_model": {"w": torch.zeros(2)}},
    )


def test_write_and_read(tmp_path):
    d = _write(tmp_path, 3, 0.5)
    assert read_meta(d)["epoch"] == 3
    assert read_config(d) == {"train": {"seed": 1}}
    state = read_state(d)
    assert torch.equal(state["model"]["w"], torch.full((2,), 3.0))
    assert torch.equal(state["best_model"]["w"], torch.zeros(2))
    assert state["rng"]["torch"].dtype == torch.uint8
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".epoch")]  # no temporary leftovers


def test_latest_and_prune(tmp_path):
    for epoch, metric in [(0, 0.1), (1, 0.4), (2, 0.2), (3, 0.3), (4, 0.05)]:
        _write(tmp_path, epoch, metric)
    assert latest_checkpoint(tmp_path).name == "epoch_000004"
    prune_checkpoints(tmp_path, keep_best=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["epoch_000001", "epoch_000003", "epoch_000004"]


def test_incomplete_checkpoints_are_ignored(tmp_path):
    _write(tmp_path, 0, 0.1)
    (tmp_path / "epoch_000001").mkdir()  # a crash before meta.json was written
    assert latest_checkpoint(tmp_path).name == "epoch_000000"
    assert latest_checkpoint(tmp_path / "nothing") is None


class _Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_arbitrary_objects_are_not_unpickled(tmp_path):
    d = _write(tmp_path, 0, 0.1)
    with open(d / "state.pt", "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(CheckpointError, match="cannot load checkpoint state"):
        read_state(d)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no meta.json"):
        read_meta(tmp_path)
    with pytest.raises(CheckpointError, match="no state.pt"):
        read_state(tmp_path)
