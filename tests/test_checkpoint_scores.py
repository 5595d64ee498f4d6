"""benchmarks/checkpoint_scores.py on a tiny trained run: each kept checkpoint scored with its own
weights, on both splits, against what training recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from echomamba_dist.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "checkpoint_scores.py"


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=cwd)


def test_each_checkpoint_scores_its_own_epoch_on_both_splits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = {"data": {"synthetic": {"n_users": 200, "n_items": 60, "n_topics": 4, "mean_length": 9.0}, "max_len": 12},
           "model": {"name": "sasrec", "hidden_size": 16, "max_len": 12},
           "train": {"epochs": 3, "batch_size": 128, "eval_batch_size": 256, "ray": False, "progress": False},
           "run": {"name": "t", "storage_path": str(tmp_path / "runs")}, "tracking": {"enabled": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", "--config", "c.yaml"]) == 0
    run = tmp_path / "runs" / "t"
    result = json.loads((run / "metrics.json").read_text())
    history = {h["epoch"]: h for h in json.loads(sorted(run.glob("epoch_*"))[-1].joinpath("meta.json").read_text())["history"]}

    out = tmp_path / "out" / "scores.json"
    proc = _script(str(run), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (scored,) = report["runs"]
    kept = sorted(int(p.name.split("_")[1]) for p in run.glob("epoch_*"))
    assert [r["epoch"] for r in scored["checkpoints"]] == kept and scored["best_epoch"] == result["best_epoch"]
    assert len({r["valid"]["ndcg@10"] for r in scored["checkpoints"]}) == len(kept)  # each its own weights
    for row in scored["checkpoints"]:
        assert row["valid"]["ndcg@10"] == pytest.approx(history[row["epoch"]]["val_ndcg@10"], abs=1e-6)
        assert row["test_over_valid_hr"] == pytest.approx(row["test"]["hr@10"] / row["valid"]["hr@10"])
        assert row["best"] == (row["epoch"] == result["best_epoch"])
    (best,) = [r for r in scored["checkpoints"] if r["best"]]
    assert best["test"] == pytest.approx({k: result["test"][k] for k in ("hr@10", "ndcg@10", "mrr@10")}, abs=1e-6)
    markdown = out.with_suffix(".md").read_text()
    assert f"| {best['epoch'] + 1} * | {best['valid']['hr@10']:.4f} |" in markdown


def test_a_missing_or_empty_run_directory_is_named(tmp_path):
    proc = _script(str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.json"), cwd=tmp_path)
    assert proc.returncode != 0 and "nowhere: no such run directory" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = _script(str(tmp_path / "empty"), "--out", str(tmp_path / "o.json"), cwd=tmp_path)
    assert proc.returncode != 0 and "empty: no checkpoints" in proc.stderr
    assert not (tmp_path / "o.json").exists()
