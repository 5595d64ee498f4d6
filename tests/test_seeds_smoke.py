"""benchmarks/seeds.py at smoke size: configs x seeds, both protocols, resumption and --report-only
(marked slow: it trains four tiny runs)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "seeds.py"
pytestmark = pytest.mark.slow

TINY = {
    "data": {"synthetic": {"n_users": 200, "n_items": 60, "n_topics": 4, "mean_length": 8.0}, "max_len": 12},
    "train": {"epochs": 2, "patience": 1, "batch_size": 128, "eval_batch_size": 256},
    "run": {"name": "unused"},
}


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _evaluate(run_dir: Path, *, exclude_history: bool) -> dict:
    from echomamba_dist.serve.load import load_model
    from echomamba_dist.train.batches import build_training_data
    from echomamba_dist.train.evaluate import evaluate_model

    loaded = load_model(run_dir)
    data = build_training_data(loaded.config, loaded.config.sample_mode, with_samples=False)
    return evaluate_model(loaded.model, data.test, ks=[10], batch_size=256, device=torch.device("cpu"),
                          exclude_history=exclude_history)


def test_seeds_trains_each_config_and_seed_and_reports_both_protocols(tmp_path):
    echo, sasrec = tmp_path / "echo.yaml", tmp_path / "sasrec.yaml"
    echo.write_text(yaml.safe_dump({**TINY, "model": {"name": "echomamba4rec", "hidden_size": 16}}))
    sasrec.write_text(yaml.safe_dump({**TINY, "model": {"name": "sasrec", "hidden_size": 16}}))
    runs, out = tmp_path / "runs", tmp_path / "out" / "seeds.json"
    args = ["--config", f"echo={echo}", "--config", f"sas={sasrec}", "--seeds", "1", "2",
            "--set", "train.lr=0.005", "--runs", str(runs), "--out", str(out)]
    _run(*args)

    report = json.loads(out.read_text())
    assert report["complete"] and report["pending"] == []
    assert sorted(d.name for d in runs.iterdir()) == ["echo-seed1", "echo-seed2", "sas-seed1", "sas-seed2"]
    assert [(r["label"], r["seed"]) for r in report["runs"]] == [("echo", 1), ("echo", 2), ("sas", 1), ("sas", 2)]
    for r in report["runs"]:
        run_dir = runs / r["run_name"]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert r["protocols"]["paper"] == pytest.approx(metrics["test"], rel=1e-6)  # what training reported
        fresh = _evaluate(run_dir, exclude_history=True)
        assert r["protocols"]["exclude_history"] == pytest.approx({k: v for k, v in fresh.items() if k != "count"})
        kept = json.loads((run_dir / "protocols.json").read_text())  # kept, so a report evaluates once
        assert kept["protocols"] == r["protocols"] and kept["checkpoint"].startswith("epoch_")
        saved = yaml.safe_load(next(iter(sorted(run_dir.glob("epoch_*")))).joinpath("config.yaml").read_text())
        assert saved["train"]["seed"] == r["seed"] and saved["train"]["lr"] == 0.005  # the seed and --set
    # the two seeds are different runs, and the summary is their mean and sample std per protocol
    echo_runs = [r for r in report["runs"] if r["label"] == "echo"]
    assert echo_runs[0]["valid"] != echo_runs[1]["valid"]
    for protocol in ("paper", "exclude_history"):
        values = [r["protocols"][protocol]["hr@10"] for r in echo_runs]
        stat = report["summary"]["echo"]["test"][protocol]["hr@10"]
        assert math.isclose(stat["mean"], statistics.fmean(values)) and math.isclose(stat["std"], statistics.stdev(values))
    assert report["summary"]["sas"]["model"] == "sasrec" and report["summary"]["echo"]["settings"]["train.lr"] == 0.005
    assert {(c["entry"], c["against"], c["protocol"]) for c in report["comparisons"]} == {
        ("echo", "sas", "paper"), ("echo", "sas", "exclude_history")}
    markdown = out.with_suffix(".md").read_text()
    assert "## Protocol 1, the paper's" in markdown and "## Protocol 2" in markdown
    assert f"| echo | EchoMamba4Rec | {report['summary']['echo']['test']['paper']['hr@10']['mean']:.4f} ± " in markdown

    # again: the finished runs are reused (no training: their records and checkpoints untouched), the same numbers
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    _run(*args)
    again = json.loads(out.read_text())
    assert again["summary"] == report["summary"]
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == stamps
    # --report-only with a seed not trained yet: tabulates what finished, names what did not
    _run(*args[:-4], "--seeds", "1", "3", "--runs", str(runs), "--out", str(out), "--report-only")
    partial = json.loads(out.read_text())
    assert not partial["complete"] and partial["pending"] == ["echo-seed3", "sas-seed3"]
    assert [r["seed"] for r in partial["runs"]] == [1, 1]
    assert not (runs / "echo-seed3").exists()

    # a run whose best weights score NaN: no metric from it, an error naming its checkpoint
    newest = sorted((runs / "sas-seed1").glob("epoch_*"))[-1]
    state = torch.load(newest / "state.pt", weights_only=True)
    state["best_model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                           for k, v in state["best_model"].items()}
    torch.save(state, newest / "state.pt")
    (runs / "sas-seed1" / "protocols.json").unlink()
    before = out.read_text()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), *args[:-4], "--seeds", "1", "--runs", str(runs), "--out", str(out),
                           "--report-only"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0 and f"{newest.name}: the model scores" in proc.stderr and "NaN" in proc.stderr
    assert "Traceback" not in proc.stderr and not (runs / "sas-seed1" / "protocols.json").exists()
    assert out.read_text() == before  # the report before it stays as it was


def test_seeds_skips_a_run_another_process_trains_and_takes_it_once_free(tmp_path):
    """Two processes with the same command share its runs: a run whose directory another process
    holds (its run lock) is skipped and listed as not finished; the same command trains it once it
    is free."""
    from echomamba_dist.train.runlock import RunLock

    echo = tmp_path / "echo.yaml"
    echo.write_text(yaml.safe_dump({**TINY, "model": {"name": "echomamba4rec", "hidden_size": 16}}))
    runs, out = tmp_path / "runs", tmp_path / "seeds.json"
    args = ["--config", f"echo={echo}", "--seeds", "1", "2", "--runs", str(runs), "--out", str(out)]
    with RunLock(runs / "echo-seed1"):  # as a process training echo-seed1 holds it
        proc = _run(*args)
        assert f"skipped: {runs / 'echo-seed1'}: run is in use by pid {os.getpid()}" in proc.stdout
        report = json.loads(out.read_text())
        assert not report["complete"] and report["pending"] == ["echo-seed1 (training in another process)"]
        assert [r["run_name"] for r in report["runs"]] == ["echo-seed2"]
        assert not list((runs / "echo-seed1").glob("epoch_*")) and (runs / "echo-seed2" / "table2-run.json").is_file()
        assert "Not finished yet: echo-seed1 (training in another process)." in out.with_suffix(".md").read_text()
    # the holder has ended (its lock with it): the same command trains seed 1 and reuses seed 2
    stamp = (runs / "echo-seed2" / "table2-run.json").stat().st_mtime_ns
    _run(*args)
    report = json.loads(out.read_text())
    assert report["complete"] and [r["run_name"] for r in report["runs"]] == ["echo-seed1", "echo-seed2"]
    assert (runs / "echo-seed2" / "table2-run.json").stat().st_mtime_ns == stamp
    with RunLock(runs / "echo-seed1"):  # and the command let go of it when it ended
        pass


def test_seeds_refuses_a_bad_config_by_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"name": "echomamba4rec", "hiden_size": 3}}))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(bad), "--runs", str(tmp_path / "r"),
                           "--out", str(tmp_path / "o.json")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and "bad.yaml" in proc.stderr and "hiden_size" in proc.stderr
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "r").exists()


def test_seeds_archive_keeps_finished_runs_for_another_machine(tmp_path):
    """--archive keeps each finished run's record (no weights, no machine path); the same command
    on a machine without the run directories trains nothing it archived and reports the same numbers."""
    echo = tmp_path / "echo.yaml"
    echo.write_text(yaml.safe_dump({**TINY, "model": {"name": "echomamba4rec", "hidden_size": 16}}))
    archive, out = tmp_path / "repo" / "archive", tmp_path / "seeds.json"
    base = ["--config", f"echo={echo}", "--archive", str(archive), "--out", str(out)]
    _run(*base, "--seeds", "1", "--runs", str(tmp_path / "machine1"))
    first = json.loads(out.read_text())
    kept = json.loads((archive / "echo-seed1.json").read_text())
    assert sorted(p.name for p in archive.iterdir()) == ["echo-seed1.json"]
    assert "storage_path" not in kept["config"]["run"] and kept["config"]["train"]["seed"] == 1
    assert str(tmp_path / "machine1") not in json.dumps(kept)  # nothing of the machine it ran on
    assert kept["protocols"] == first["runs"][0]["protocols"] and len(kept["valid_history"]) == kept["epochs_run"]

    # another machine, seeds 1 and 2: seed 1 comes from the archive (not trained, not scored), seed 2 trains
    # (a deadline an hour away: seed 1's training time says seed 2 ends before it)
    machine2 = tmp_path / "machine2"
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    proc = _run(*base, "--seeds", "1", "2", "--runs", str(machine2), "--deadline", later)
    assert "=== echo seed 1" not in proc.stdout and "=== echo seed 2" in proc.stdout
    assert sorted(d.name for d in machine2.iterdir()) == ["echo-seed2"]
    report = json.loads(out.read_text())
    assert report["complete"] and [r["seed"] for r in report["runs"]] == [1, 2]
    assert report["runs"][0]["archived"] and report["runs"][0]["protocols"] == kept["protocols"]
    assert sorted(p.name for p in archive.iterdir()) == ["echo-seed1.json", "echo-seed2.json"]
    # a third machine reports both from the archive alone
    _run(*base, "--seeds", "1", "2", "--runs", str(tmp_path / "machine3"), "--report-only")
    assert json.loads(out.read_text())["summary"] == report["summary"]
    assert not (tmp_path / "machine3").exists()
    assert "records (config, validation history, test metrics): `repo/archive/<run>.json`" in out.with_suffix(".md").read_text()

    # a record of another config is not this run's: reported as not finished
    _run(*base, "--seeds", "1", "--set", "train.lr=0.004", "--runs", str(tmp_path / "machine4"), "--report-only")
    assert json.loads(out.read_text())["pending"] == ["echo-seed1"]
    # a damaged record: an error naming it, no report written over the one before
    (archive / "echo-seed2.json").write_text("{\"config\": ")
    before = out.read_text()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), *base, "--seeds", "2", "--runs", str(tmp_path / "machine5"),
                           "--report-only"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and "echo-seed2.json: not a run record (invalid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr and out.read_text() == before
