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


# ----------------------------------------------------------------------------------------------
# Corrupt checkpoints: skipped with a warning, newest intact one used (issue 14)

from echomamba_dist.config import experiment_from_dict, to_dict  # noqa: E402
from echomamba_dist.train.checkpoint import (  # noqa: E402
    check_resume,
    newest_intact,
    resume_mismatches,
    run_checkpoints,
)


def _truncate(path, keep=40):
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("garble", [
    lambda d: _truncate(d / "state.pt"),
    lambda d: (d / "state.pt").write_bytes(b"\x00" * 64),
    lambda d: _truncate(d / "meta.json", keep=5),
    lambda d: (d / "meta.json").write_text("[1, 2]"),
    lambda d: (d / "config.yaml").write_text("train: {seed: [1\n"),
    lambda d: (d / "config.yaml").write_text("!!python/object/apply:os.system ['echo owned']\n"),
    lambda d: (d / "config.yaml").write_bytes(b"\xff\xfe garbage"),
], ids=["state-truncated", "state-zeros", "meta-truncated", "meta-not-object", "config-bad-yaml",
        "config-yaml-tag", "config-not-utf8"])
def test_corrupt_latest_is_skipped_with_a_warning(tmp_path, capsys, garble):
    for epoch in range(3):
        _write(tmp_path, epoch, 0.1)
    garble(tmp_path / "epoch_000002")
    found = newest_intact(run_checkpoints(tmp_path))
    assert found.directory.name == "epoch_000001"
    assert torch.equal(found.state["model"]["w"], torch.full((2,), 1.0))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipping corrupt checkpoint" in err[0] and "epoch_000002" in err[0]


def test_none_intact_is_one_clear_error_and_none_is_none(tmp_path, capsys):
    assert newest_intact(run_checkpoints(tmp_path)) is None
    for epoch in range(2):
        _truncate(_write(tmp_path, epoch, 0.1) / "state.pt")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint among 2; the newest: .*epoch_000001/state\.pt"):
        newest_intact(run_checkpoints(tmp_path))
    assert capsys.readouterr().err == ""  # the error says it all, on one line


def test_yaml_tag_in_config_is_refused_naming_the_file(tmp_path, capsys):
    d = _write(tmp_path, 0, 0.1)
    (d / "config.yaml").write_text("!!python/object/apply:os.system ['echo executed']\n")
    with pytest.raises(CheckpointError, match=r"epoch_000000/config\.yaml: corrupt checkpoint config"):
        read_config(d)
    assert "executed" not in capsys.readouterr().out


def test_prune_ranks_an_unreadable_checkpoint_last(tmp_path):
    for epoch, metric in [(0, 0.9), (1, 0.1), (2, 0.2), (3, 0.3)]:
        _write(tmp_path, epoch, metric)
    (tmp_path / "epoch_000000" / "meta.json").write_text("{")  # was the best
    prune_checkpoints(tmp_path, keep_best=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["epoch_000002", "epoch_000003"]


# ----------------------------------------------------------------------------------------------
# Resume checks


def _tiny(**train):
    return experiment_from_dict({"model": {"hidden_size": 8, "max_len": 10}, "data": {"max_len": 10},
                                 "train": {"epochs": 2, **train}, "run": {"name": "r"}})


def test_resume_mismatches_ignore_free_keys_and_name_the_rest():
    saved = to_dict(_tiny())
    free = _tiny(epochs=9, patience=3, eval_batch_size=7, num_workers=2, batch_size=2048, progress=False)
    free.run.storage_path, free.tracking.enabled, free.data.path = "/elsewhere", False, "/moved/data"
    assert resume_mismatches(saved, to_dict(free)) == []
    changed = _tiny(lr=0.01, seed=7, grad_clip=1.0)
    changed.model.hidden_size, changed.data.bucketing = 16, False
    assert resume_mismatches(saved, to_dict(changed)) == [
        ("data.bucketing", True, False), ("model.hidden_size", 8, 16),
        ("train.grad_clip", None, 1.0), ("train.lr", 0.001, 0.01), ("train.seed", 42, 7),
    ]
    other = to_dict(experiment_from_dict({"model": {"name": "gru4rec"}, "data": {"max_len": 10}}))
    assert resume_mismatches(saved, other)[0][:3] == ("model.name", "echomamba4rec", "gru4rec")


def test_check_resume_refuses_another_dataset_or_config(tmp_path):
    d = write_checkpoint(tmp_path / "epoch_000000", model_state={"w": torch.zeros(1)}, optimizer_state=None,
                         meta={"n_items": 12, "dataset_fingerprint": "aaaa"}, config=to_dict(_tiny()))
    ckpt = newest_intact([d])
    check_resume(ckpt, _tiny(epochs=5), fingerprint="aaaa", n_items=12)  # only a free key changed
    with pytest.raises(CheckpointError, match=r"fingerprint aaaa \(12 items\), but the synthetic dataset has "
                                              r"fingerprint bbbb \(12 items\); start a new run with another run\.name"):
        check_resume(ckpt, _tiny(), fingerprint="bbbb", n_items=12)
    with pytest.raises(CheckpointError, match=r"\(12 items\), but .* \(15 items\)"):
        check_resume(ckpt, _tiny(), fingerprint="aaaa", n_items=15)
    with pytest.raises(CheckpointError, match=r"config differs from the checkpoint's: train\.lr: 0\.001 -> 0\.002; "
                                              r"start a new run .*or resume with the checkpoint's settings"):
        check_resume(ckpt, _tiny(lr=0.002), fingerprint="aaaa", n_items=12)
