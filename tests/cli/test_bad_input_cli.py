"""The CLI's bad-input table (issue 14): each row is a command a careless user might type, the
exit status it must end with, and a phrase of its one-line message; `run_case` also checks that
files that existed before are byte-identical afterwards and that nothing partial is left.

This file covers wrong results (divergence, non-finite scores, -k beyond the unseen items) and
outputs (prepare --overwrite, --output onto existing files and directories, unwritable places);
tests/cli/test_bad_input_runs.py covers runs, checkpoints and configs."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_harness import TINY_TRAIN, Case, run_case

from echomamba_dist import cli
from echomamba_dist.train.checkpoint import read_config, read_meta, read_state, write_checkpoint

DATA = ("--data", "{ws}/prepared")
GOOD = ("--checkpoint", "{ws}/runs/good", *DATA)
NAN = ("--checkpoint", "{ws}/runs/nan", *DATA)
TRAIN = ("train", *TINY_TRAIN, "--set", "data.path={ws}/prepared")


# ---- setups: change the copied workspace before the snapshot


def nan_checkpoint(ws: Path) -> None:
    """runs/nan/epoch_000000: runs/good's last checkpoint with every weight NaN (a diverged model
    written by an older version)."""
    src = ws / "runs" / "good" / "epoch_000001"
    state = read_state(src)
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state["model"].items()}
    write_checkpoint(ws / "runs" / "nan" / "epoch_000000", model_state=nan, optimizer_state=None,
                     meta=read_meta(src), config=read_config(src), extra_state={"best_model": nan})


def files(**contents: str):
    """setup: write text files (workspace-relative name -> text); '/' in a name makes directories."""

    def setup(ws: Path) -> None:
        for name, text in contents.items():
            path = ws / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    return setup


def victim(ws: Path) -> None:
    """victim/: the input log next to an unrelated file."""
    (ws / "victim").mkdir()
    (ws / "victim" / "log.csv").write_bytes((ws / "log.csv").read_bytes())
    (ws / "victim" / "notes.txt").write_text("my notes\n")


def command(*argv: str):
    """setup: run an echomamba command (e.g. to make an output this project wrote)."""

    def setup(ws: Path) -> None:
        assert cli.main([a.replace("{ws}", str(ws)) for a in argv]) == 0

    return setup


def parquet(name: str, table: pa.Table):
    def setup(ws: Path) -> None:
        pq.write_table(table, ws / name)

    return setup


CASES = [
    # -- prepare: inputs
    Case("prepare-missing-input", ("prepare", "--input", "{ws}/absent.csv", "--output", "{ws}/out", "--no-ray"),
         2, r"absent\.csv: no such file"),
    Case("prepare-csv-bad-number", ("prepare", "--input", "{ws}/bad.csv", "--output", "{ws}/out", "--no-ray"),
         2, r"bad\.csv: line 3: column 'timestamp': expected a number, got 'abc'",
         setup=files(**{"bad.csv": "user,item,timestamp\nu1,i1,10\nu1,i2,abc\n"})),
    Case("prepare-csv-empty", ("prepare", "--input", "{ws}/empty.csv", "--output", "{ws}/out", "--no-ray"),
         2, r"empty\.csv: file is empty", setup=files(**{"empty.csv": ""})),
    Case("prepare-parquet-missing-column", ("prepare", "--input", "{ws}/m.parquet", "--output", "{ws}/out", "--no-ray"),
         2, r"m\.parquet: column 'item': missing required column",
         setup=parquet("m.parquet", pa.table({"user": ["a"], "itemz": ["b"], "timestamp": [1.0]}))),
    Case("prepare-parquet-garbage", ("prepare", "--input", "{ws}/g.parquet", "--output", "{ws}/out", "--no-ray"),
         2, r"g\.parquet: expected a Parquet file", setup=files(**{"g.parquet": "not parquet\n"})),
    # -- prepare: outputs
    Case("prepare-existing-output", ("prepare", "--input", "{ws}/log.csv", "--output", "{ws}/prepared", "--no-ray"),
         2, r"prepared: output directory exists"),
    Case("prepare-overwrite-input-dir",  # issue 14: deleted victim/ with the input and notes.txt
         ("prepare", "--input", "{ws}/victim/log.csv", "--output", "{ws}/victim", "--overwrite", "--no-ray"),
         2, r"victim: holds the input .*victim/log\.csv; choose an output directory outside it", setup=victim),
    Case("prepare-overwrite-workspace", ("prepare", "--input", "{ws}/log.csv", "--output", "{ws}", "--overwrite", "--no-ray"),
         2, r"holds the input"),
    Case("prepare-overwrite-foreign-dir", ("prepare", "--input", "{ws}/log.csv", "--output", "{ws}/other", "--overwrite", "--no-ray"),
         2, r"other: not a prepared dataset this project wrote", setup=files(other__notes="keep\n")),
    Case("prepare-overwrite-dataset-with-extra-file",
         ("prepare", "--input", "{ws}/log.csv", "--output", "{ws}/prepared", "--overwrite", "--no-ray"),
         2, r"prepared: not a prepared dataset this project wrote", setup=files(prepared__README="mine\n")),
    Case("prepare-overwrite-own-dataset",  # allowed: a prepared dataset is replaced whole
         ("prepare", "--input", "{ws}/log.csv", "--output", "{ws}/prepared", "--overwrite", "--no-ray", "--k-core", "0"),
         0, r"^$", changes=("prepared/meta.json", "prepared/sequences.parquet", "prepared/items.parquet",
                             "prepared/users.parquet")),
    Case("prepare-output-is-a-file", ("prepare", "--input", "{ws}/log.csv", "--output", "{ws}/log.csv", "--overwrite", "--no-ray"),
         2, r"log\.csv: is a file; expected a directory"),
    Case("prepare-output-under-a-file", ("prepare", "--input", "{ws}/log.csv", "--output", "{ws}/log.csv/out", "--no-ray"),
         2, r"log\.csv: is a file, not a directory"),
    Case("prepare-new-nested-output", ("prepare", "--input", "{ws}/log.csv", "--output", "{ws}/a/b/out", "--no-ray"),
         0, r"^$", changes=("a",)),
    # -- train: divergence and the learning rate
    Case("train-diverges",  # issue 14: scored HR@10 = 1.0 and kept the NaN model as best
         (*TRAIN, "--set", "run.name=div", "--set", "train.lr=1000000.0", "--set", "train.epochs=3"),
         2, r"training diverged: the training loss is nan at epoch 0, step \d+ \(run div\); no checkpoint .* lower train\.lr"),
    Case("train-lr-inf", (*TRAIN, "--set", "train.lr=.inf"), 2, r"train\.lr: must be a finite number > 0, got inf"),
    Case("train-lr-nan", (*TRAIN, "--set", "train.lr=.nan"), 2, r"train\.lr: must be a finite number > 0, got nan"),
    Case("train-lr-zero", (*TRAIN, "--set", "train.lr=0"), 2, r"train\.lr: must be a finite number > 0"),
    Case("train-unknown-key", ("train", *TINY_TRAIN, "--set", "train.nope=1"), 2, r"train\.nope"),
    # -- evaluate: a diverged checkpoint, outputs
    Case("evaluate-nan-model", ("evaluate", *NAN), 2,
         r"runs/nan/epoch_000000: the model scores 30 of 30 users with NaN or infinity", setup=nan_checkpoint),
    Case("evaluate-nan-model-output", ("evaluate", *NAN, "--output", "{ws}/ev.json"), 2,
         r"NaN or infinity .* no metric", setup=nan_checkpoint),
    Case("evaluate-output-exists", ("evaluate", *GOOD, "--output", "{ws}/ev.json"), 2,
         r"ev\.json: exists \(use --overwrite to replace it\)", setup=files(**{"ev.json": "{}\n"})),
    Case("evaluate-overwrite-foreign-file", ("evaluate", *GOOD, "--output", "{ws}/runs/good/metrics.json", "--overwrite"),
         2, r"metrics\.json: exists and is not a metrics report this project wrote"),
    Case("evaluate-output-is-a-dir", ("evaluate", *GOOD, "--output", "{ws}/runs"), 2,
         r"runs: is a directory; expected a file path"),
    Case("evaluate-output-under-a-file", ("evaluate", *GOOD, "--output", "{ws}/log.csv/ev.json"), 2,
         r"log\.csv: is a file, not a directory"),
    Case("evaluate-overwrite-own-report", ("evaluate", *GOOD, "--output", "{ws}/ev.json", "--overwrite", "--split", "valid"),
         0, r"^$", setup=command("evaluate", *GOOD, "--output", "{ws}/ev.json"), changes=("ev.json",)),
    Case("evaluate-new-nested-output", ("evaluate", *GOOD, "--output", "{ws}/reports/a/ev.json"), 0, r"^$",
         changes=("reports",)),
    # -- recommend: a diverged checkpoint, -k beyond the unseen items, outputs
    Case("recommend-nan-model-history", ("recommend", *NAN, "--history", "i1 i2"), 2,
         r"runs/nan/epoch_000000: the model scores 1 of 1 histories with NaN or infinity", setup=nan_checkpoint),
    Case("recommend-nan-model-output", ("recommend", *NAN, "--output", "{ws}/recs.parquet"), 2,
         r"NaN or infinity .* no recommendation", setup=nan_checkpoint),
    Case("recommend-k-above-unseen-history",  # issue 14: filled up with the history at score -inf
         ("recommend", *GOOD, "--history", "i5 i1 i3", "-k", "1000"), 0,
         r"note: returned 9 of 1000 items: the dataset has 12 items, less the 3 in the history"),
    Case("recommend-k-above-items-with-history", ("recommend", *GOOD, "--history", "i5", "-k", "20", "--include-history"),
         0, r"note: returned 12 of 20 items: the dataset has 12 items$"),
    Case("recommend-k-above-unseen-output", ("recommend", *GOOD, "--output", "{ws}/recs.parquet", "-k", "1000"), 0,
         r"note: 30 of 30 users got fewer than 1000 items", changes=("recs.parquet",)),
    Case("recommend-output-precious",  # issue 14: silently replaced
         ("recommend", *GOOD, "--output", "{ws}/precious.csv"), 2, r"precious\.csv: exists \(use --overwrite",
         setup=files(**{"precious.csv": "a,b\n1,2\n"})),
    Case("recommend-overwrite-precious", ("recommend", *GOOD, "--output", "{ws}/precious.csv", "--overwrite"), 2,
         r"precious\.csv: exists and is not a recommendations file this project wrote",
         setup=files(**{"precious.csv": "a,b\n1,2\n"})),
    Case("recommend-overwrite-foreign-parquet", ("recommend", *GOOD, "--output", "{ws}/t.parquet", "--overwrite"), 2,
         r"t\.parquet: exists and is not a recommendations file",
         setup=parquet("t.parquet", pa.table({"user": ["a"], "item": ["b"]}))),
    Case("recommend-output-exists-own", ("recommend", *GOOD, "--output", "{ws}/recs.parquet"), 2,
         r"recs\.parquet: exists \(use --overwrite", setup=command("recommend", *GOOD, "--output", "{ws}/recs.parquet")),
    Case("recommend-overwrite-own", ("recommend", *GOOD, "--output", "{ws}/recs.parquet", "--overwrite", "-k", "3"), 0,
         r"^$", setup=command("recommend", *GOOD, "--output", "{ws}/recs.parquet"), changes=("recs.parquet",)),
    Case("recommend-output-is-a-dir",  # issue 14: left a .tmp behind
         ("recommend", *GOOD, "--output", "{ws}/prepared"), 2, r"prepared: is a directory; expected a file path"),
    Case("recommend-output-under-a-file", ("recommend", *GOOD, "--output", "{ws}/log.csv/r.parquet"), 2,
         r"log\.csv: is a file, not a directory"),
    Case("recommend-ray-output-exists",  # refused before Ray starts
         ("recommend", *GOOD, "--ray", "--output", "{ws}/prepared"), 2, r"prepared: output directory exists and is not empty"),
    Case("recommend-ray-overwrite-foreign-dir", ("recommend", *GOOD, "--ray", "--output", "{ws}/prepared", "--overwrite"),
         2, r"prepared: not a recommendations directory this project wrote"),
    Case("recommend-ray-output-is-a-file", ("recommend", *GOOD, "--ray", "--output", "{ws}/log.csv"), 2,
         r"log\.csv: is a file; expected a directory"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, workspace, tmp_path, capsys):
    run_case(case, workspace, tmp_path, capsys)


def _unwritable_dir(ws: Path) -> Path:
    """A directory this process cannot write: chmod 555 where that stops us (not as root), else
    /sys (read-only to root too on Linux)."""
    if os.geteuid() != 0:
        d = ws / "locked"
        d.mkdir()
        d.chmod(0o555)
        return d
    d = Path("/sys")
    try:
        (d / ".echomamba-probe").touch()
    except OSError:
        return d
    pytest.skip("running as root and /sys is writable: no unwritable directory to test with")


@pytest.mark.parametrize("what", ["prepare", "evaluate", "recommend"])
def test_unwritable_output_directory_is_one_line(what, workspace, tmp_path, capsys):
    """issue 14: an output directory that is not writable gave a traceback."""
    probe = tmp_path / "probe"
    probe.mkdir()
    locked = _unwritable_dir(probe)
    argv = {
        "prepare": ("prepare", "--input", "{ws}/log.csv", "--output", f"{locked}/out", "--no-ray"),
        "evaluate": ("evaluate", *GOOD, "--output", f"{locked}/ev.json"),
        "recommend": ("recommend", *GOOD, "--output", f"{locked}/recs.parquet"),
    }[what]
    try:
        run_case(Case(f"{what}-unwritable", argv, 2, rf"{locked}: cannot write the .* here \("), workspace, tmp_path, capsys)
    finally:
        if locked.is_relative_to(tmp_path):
            locked.chmod(0o755)
            assert list(locked.iterdir()) == []  # no temporary left


def test_recommend_k_above_unseen_returns_only_unseen_items(workspace, tmp_path, capsys):
    """-k beyond the catalogue: each user gets exactly the items not in the history the model
    reads, with finite scores, ranked 1..n (issue 14: seen items at the bottom with -inf)."""
    from echomamba_dist.data.dataset import load_prepared

    out = tmp_path / "recs.parquet"
    assert cli.main(["recommend", "--checkpoint", str(workspace / "runs" / "good"), "--data",
                     str(workspace / "prepared"), "--output", str(out), "-k", "1000"]) == 0
    capsys.readouterr()
    recs = pq.read_table(out).to_pandas()
    ds = load_prepared(workspace / "prepared")
    item_ids = [str(x) for x in ds.item_ids]
    assert recs["score"].notna().all() and (recs["score"].abs() < float("inf")).all()
    for u, user_id in enumerate(ds.user_ids):
        rows = recs[recs["user_id"] == str(user_id)]
        history = {item_ids[i] for i in ds.items[ds.offsets[u]: ds.offsets[u + 1]][-10:]}  # model.max_len 10
        assert set(rows["item_id"]) == set(item_ids[1:]) - history
        assert rows["rank"].tolist() == list(range(1, len(rows) + 1))
        assert rows["score"].is_monotonic_decreasing
