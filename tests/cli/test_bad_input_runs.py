"""The CLI's bad-input table for runs, checkpoints and configs (issue 14): run ownership, resume
checks, corrupt checkpoints, config values and readers. Each row is a command, its exit status and
a phrase of its stderr; `run_case` also checks that files that existed before are byte-identical
and that nothing is left behind. Focused tests below the table drive real second processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_harness import TINY_TRAIN, Case, run_case, write_log

from echomamba_dist import cli
from echomamba_dist.data.dataset import dataset_fingerprint, load_prepared
from echomamba_dist.train.checkpoint import checkpoint_dirs, latest_checkpoint, read_checkpoint, read_meta
from echomamba_dist.train.runlock import LOCK_FILE, RunLock

GOOD = ("--set", "data.path={ws}/prepared", "--set", "run.name=good")  # resumes runs/good as it was trained
HELD: list[RunLock] = []  # locks a row's setup holds for the command; released after the test


@pytest.fixture(autouse=True)
def _release_held_locks():
    yield
    while HELD:
        HELD.pop().release()


def hold_good(ws: Path) -> None:
    """Another trainer owns runs/good (a second open file of this process: flock still refuses)."""
    HELD.append(RunLock(ws / "runs" / "good").acquire())


def other_dataset(n_items: int = 12):
    """setup: prepared2/, a dataset of `n_items` items with other sequences than prepared/."""

    def setup(ws: Path) -> None:
        write_log(ws / "log2.csv", n_users=31, n_items=n_items)
        assert cli.main(["prepare", "--input", str(ws / "log2.csv"), "--output", str(ws / "prepared2"), "--no-ray"]) == 0

    return setup


def garble(*names: str, how: str = "truncate"):
    """setup: damage files of runs/good, e.g. 'epoch_000001/state.pt'."""

    def setup(ws: Path) -> None:
        for name in names:
            path = ws / "runs" / "good" / name
            if how == "truncate":
                path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])
            elif how == "yaml-tag":
                path.write_text("!!python/object/apply:os.system ['echo owned']\n")
            else:
                path.write_bytes(b"\x00garbled\xff" * 8)

    return setup


def parquet_with(column: str, values):
    """setup: log.parquet whose `column` holds `values` (e.g. a list column)."""

    def setup(ws: Path) -> None:
        data = {"user": pa.array(["u1", "u2"]), "item": pa.array(["i1", "i2"]), "timestamp": pa.array([1.0, 2.0])}
        data[column] = values
        pq.write_table(pa.table(data), ws / "log.parquet")

    return setup


def bom_log(ws: Path) -> None:
    (ws / "bom.csv").write_bytes(b"\xef\xbb\xbf" + (ws / "log.csv").read_bytes())


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
EVAL = ("evaluate", "--checkpoint", "{ws}/runs/good")
REC = ("recommend", "--checkpoint", "{ws}/runs/good", "--history", "i1 i2 i3", "-k", "3")

CASES = [
    # one owner per run
    Case("train-run-in-use", ("train", *TINY_TRAIN, *GOOD), 2,
         rf"runs/good: run is in use by pid {os.getpid()} on .*another run\.name", setup=hold_good),
    Case("train-ray-run-in-use", ("train", *TINY_TRAIN, *GOOD, "--set", "train.ray=true"), 2,
         rf"runs/good: run is in use by pid {os.getpid()} ", setup=hold_good),
    # resume: the same dataset and every key that changes the result
    Case("resume-other-dataset-same-items", ("train", *TINY_TRAIN, *GOOD, "--set", "data.path={ws}/prepared2"), 2,
         r"epoch_000001: cannot resume: trained on dataset fingerprint \w+ \(12 items\), but .*prepared2 has "
         r"fingerprint \w+ \(12 items\); start a new run with another run\.name", setup=other_dataset()),
    Case("resume-other-item-count", ("train", *TINY_TRAIN, *GOOD, "--set", "data.path={ws}/prepared2"), 2,
         r"cannot resume: .*\(12 items\), but .*prepared2 has fingerprint \w+ \(15 items\)", setup=other_dataset(15)),
    Case("resume-other-lr", ("train", *TINY_TRAIN, *GOOD, "--set", "train.lr=1e-2"), 2,
         r"cannot resume: the config differs from the checkpoint's: train\.lr: 0\.001 -> 0\.01; start a new run"),
    Case("resume-other-seed-and-batch", ("train", *TINY_TRAIN, *GOOD, "--set", "train.seed=7", "--set", "train.batch_size=32"), 2,
         r"train\.batch_size: 64 -> 32, train\.seed: 42 -> 7"),
    Case("resume-other-model", ("train", *TINY_TRAIN, *GOOD, "--set", "model.hidden_size=16"), 2,
         r"model\.hidden_size: 8 -> 16"),
    Case("resume-other-model-depth", ("train", *TINY_TRAIN, *GOOD, "--set", "model.num_layers=2"), 2,
         r"differs from the checkpoint's: model\.num_layers: 1 -> 2"),  # another model name: tests/train
    Case("resume-other-lr-on-ray", ("train", *TINY_TRAIN, *GOOD, "--set", "train.ray=true", "--set", "train.lr=0.01"), 2,
         r"train\.lr: 0\.001 -> 0\.01"),  # refused by the driver before Ray starts
    Case("resume-all-checkpoints-corrupt", ("train", *TINY_TRAIN, *GOOD, "--set", "train.epochs=3"), 2,
         r"no intact checkpoint among 2; the newest: .*epoch_000001/state\.pt: cannot load checkpoint state",
         setup=garble("epoch_000000/state.pt", "epoch_000001/state.pt")),
    # evaluate and recommend check the dataset too
    Case("evaluate-other-dataset", (*EVAL, "--data", "{ws}/prepared2"), 2,
         r"trained on dataset fingerprint \w+, but .*prepared2 has \w+ \(the same 12 items, other sequences\); "
         r"pass --ignore-fingerprint", setup=other_dataset()),
    Case("evaluate-other-dataset-ignored", (*EVAL, "--data", "{ws}/prepared2", "--ignore-fingerprint"), 0, r"^$",
         setup=other_dataset()),
    Case("evaluate-other-item-count", (*EVAL, "--data", "{ws}/prepared2", "--ignore-fingerprint"), 2,
         r"trained on 12 items, but .*prepared2 has 15", setup=other_dataset(15)),
    Case("recommend-other-dataset", (*REC, "--data", "{ws}/prepared2"), 2,
         r"pass --ignore-fingerprint", setup=other_dataset()),
    Case("recommend-other-dataset-ignored", (*REC, "--data", "{ws}/prepared2", "--ignore-fingerprint"), 0, r"^$",
         setup=other_dataset()),
    # corrupt checkpoints: the newest intact one, or one clear error
    Case("evaluate-latest-state-truncated", EVAL, 0,
         r"^echomamba: warning: skipping corrupt checkpoint: .*epoch_000001/state\.pt: .*; using epoch_000000\n$",
         setup=garble("epoch_000001/state.pt")),
    Case("evaluate-latest-meta-garbled", EVAL, 0, r"epoch_000001/meta\.json: corrupt checkpoint metadata.*using epoch_000000",
         setup=garble("epoch_000001/meta.json", how="garble")),
    Case("recommend-latest-config-yaml-tag", REC, 0, r"epoch_000001/config\.yaml: corrupt checkpoint config",
         setup=garble("epoch_000001/config.yaml", how="yaml-tag")),
    Case("evaluate-named-checkpoint-yaml-tag", ("evaluate", "--checkpoint", "{ws}/runs/good/epoch_000001"), 2,
         r"epoch_000001/config\.yaml: corrupt checkpoint config \(expected plain YAML\)",
         setup=garble("epoch_000001/config.yaml", how="yaml-tag")),
    Case("evaluate-every-checkpoint-corrupt", EVAL, 2,
         r"no intact checkpoint among 2; the newest: .*runs/good/epoch_000001/meta\.json: corrupt checkpoint metadata",
         setup=garble("epoch_000000/meta.json", "epoch_000001/meta.json", how="garble")),
    # config values: as meant, or refused before any data is read
    Case("train-lr-exponent-is-a-number", ("train", *TINY_TRAIN, "--set", "train.lr=1e-3", "--print-config"), 0, r"^$"),
    Case("train-lr-nan-text", ("train", *TINY_TRAIN, "--set", "train.lr=nan"), 2, r"train\.lr: expected a finite number"),
    Case("train-grad-clip-negative", ("train", *TINY_TRAIN, "--set", "train.grad_clip=-1"), 2,
         r"train\.grad_clip: must be > 0 \(or null: no clipping\), got -1"),
    Case("train-model-max-len-differs-from-data", ("train", *TINY_TRAIN, "--set", "model.max_len=20",
                                                   "--set", "data.path={ws}/absent"), 2,
         r"model\.max_len: max_len is set once, as data\.max_len \(now 10\)"),  # refused before the (missing) data is read
    Case("train-device-cuda-without-gpu", ("train", *TINY_TRAIN, "--set", "train.device=cuda",
                                           "--set", "data.path={ws}/absent", "--set", "run.name=new"), 2,
         r"train\.device: cuda, but no CUDA device is available here"),
    # readers
    Case("prepare-csv-with-bom", ("prepare", "--input", "{ws}/bom.csv", "--output", "{ws}/out", "--no-ray"), 0, r"^$",
         setup=bom_log, changes=("out/",)),
    Case("prepare-parquet-list-column", ("prepare", "--input", "{ws}/log.parquet", "--output", "{ws}/out", "--no-ray"), 2,
         r"log\.parquet: column 'item': expected an id \(integer or string\) in every row, got the nested type list",
         setup=parquet_with("item", pa.array([["i1", "i2"], ["i3"]]))),
    Case("prepare-parquet-struct-column", ("prepare", "--input", "{ws}/log.parquet", "--output", "{ws}/out", "--no-ray"), 2,
         r"column 'timestamp': expected a number or a time in every row, got the nested type struct",
         setup=parquet_with("timestamp", pa.array([{"s": 1}, {"s": 2}]))),
]


def _param(case: Case):
    marks = [NO_GPU] if "cuda" in case.id else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case, workspace, tmp_path, capsys):
    run_case(case, workspace, tmp_path, capsys)


# ----------------------------------------------------------------------------------------------
# Focused tests


def _train_argv(ws: Path, *extra: str) -> list[str]:
    return ["train", *[a.replace("{ws}", str(ws)) for a in TINY_TRAIN], "--set", f"data.path={ws / 'prepared'}", *extra]


def test_two_trainers_on_one_run_and_a_killed_holder(workspace, tmp_path, capsys):
    """A real trainer in another process owns the run; a second one exits 2 naming it; once the
    first is SIGKILL'd, the next trainer takes the run over and finishes it."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "prepared").symlink_to(workspace / "prepared")
    argv = _train_argv(ws, "--set", "run.name=dup", "--set", "train.patience=0")
    first = subprocess.Popen(
        [sys.executable, "-m", "echomamba_dist.cli", *argv, "--set", "train.epochs=100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lock = ws / "runs" / "dup" / LOCK_FILE
    try:
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip() and any((ws / "runs" / "dup").glob("epoch_*"))):
            assert first.poll() is None and time.monotonic() < deadline, "the first trainer did not start"
            time.sleep(0.2)
        assert json.loads(lock.read_text())["pid"] == first.pid
        capsys.readouterr()
        assert cli.main([*argv, "--set", "train.epochs=2"]) == 2
        err = capsys.readouterr().err
        assert f"runs/dup: run is in use by pid {first.pid} on " in err and err.count("\n") == 1
        assert first.poll() is None  # the refused trainer did not disturb the first one
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    assert lock.is_file()  # left by the killed holder, but nobody holds it now
    next_epoch = read_meta(latest_checkpoint(ws / "runs" / "dup"))["epoch"]
    assert cli.main([*argv, "--set", f"train.epochs={next_epoch + 1}"]) == 0  # one more epoch
    assert f"(next epoch {next_epoch}," in capsys.readouterr().out
    assert not lock.exists()  # released and removed at the end of the run
    assert json.loads((ws / "runs" / "dup" / "metrics.json").read_text())["epochs_run"] == next_epoch + 1


def test_resume_refused_on_a_changed_dataset_names_both(workspace, tmp_path, capsys):
    ws = tmp_path / "ws"
    import shutil

    shutil.copytree(workspace, ws, symlinks=True)
    other_dataset()(ws)
    fingerprints = [dataset_fingerprint(load_prepared(ws / d)) for d in ("prepared", "prepared2")]
    assert fingerprints[0] != fingerprints[1]
    capsys.readouterr()
    argv = _train_argv(ws, "--set", "run.name=good", "--set", f"data.path={ws / 'prepared2'}", "--set", "train.epochs=3")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"fingerprint {fingerprints[0]} (12 items), but {ws / 'prepared2'} has fingerprint {fingerprints[1]}" in err
    assert "--set run.name=good-2" in err
    # the suggested new run trains on the new dataset
    assert cli.main([*argv, "--set", "run.name=good-2", "--set", "train.epochs=1"]) == 0
    assert json.loads((ws / "runs" / "good-2" / "metrics.json").read_text())["dataset_fingerprint"] == fingerprints[1]


def test_a_corrupt_latest_checkpoint_is_skipped_and_the_run_finishes(workspace, tmp_path, capsys):
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws, symlinks=True)
    state = ws / "runs" / "good" / "epoch_000001" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # a crash of the disk, not of our atomic write
    capsys.readouterr()
    assert cli.main(_train_argv(ws, "--set", "run.name=good", "--set", "train.epochs=3")) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "skipping corrupt checkpoint" in line]
    assert len(warnings) == 1 and "epoch_000001/state.pt" in warnings[0]
    assert f"resumed from {ws / 'runs' / 'good' / 'epoch_000000'} (next epoch 1" in captured.out
    metrics = json.loads((ws / "runs" / "good" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 3
    for d in checkpoint_dirs(ws / "runs" / "good"):  # what is kept now all reads whole
        assert read_checkpoint(d).meta["epoch"] == int(d.name[6:]) + 1


def test_exponent_without_a_dot_trains_as_that_learning_rate(workspace, tmp_path, capsys):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "prepared").symlink_to(workspace / "prepared")
    assert cli.main(_train_argv(ws, "--set", "train.lr=1e-3", "--print-config")) == 0
    assert "  lr: 0.001\n" in capsys.readouterr().out


def test_a_csv_with_a_byte_order_mark_prepares_the_same_dataset(workspace, tmp_path, capsys):
    (tmp_path / "log.csv").write_bytes((workspace / "log.csv").read_bytes())
    bom_log(tmp_path)
    assert cli.main(["prepare", "--input", str(tmp_path / "bom.csv"), "--output", str(tmp_path / "out"), "--no-ray"]) == 0
    with_bom, plain = load_prepared(tmp_path / "out"), load_prepared(workspace / "prepared")
    assert dataset_fingerprint(with_bom) == dataset_fingerprint(plain)
    assert list(with_bom.user_ids) == list(plain.user_ids) and list(with_bom.item_ids) == list(plain.item_ids)
