"""benchmarks/seeds.py --deadline, without training: a run expected to end after the deadline (by
its config's finished runs) is not started, and the report says why; the time parsed as documented."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import seeds  # noqa: E402

NOW = datetime(2026, 12, 2, 15, 30, 12, tzinfo=timezone.utc)
TINY = {
    "data": {"synthetic": {"n_users": 200, "n_items": 60, "n_topics": 4, "mean_length": 8.0}, "max_len": 12},
    "model": {"name": "sasrec", "hidden_size": 16},
    "train": {"epochs": 2, "patience": 1, "batch_size": 128, "eval_batch_size": 256},
    "run": {"name": "unused"},
}


def test_parse_deadline_forms():
    assert seeds.parse_deadline("17:05", NOW) == datetime(2026, 12, 2, 17, 5, tzinfo=timezone.utc)
    assert seeds.parse_deadline("2026-12-03T01:00", NOW) == datetime(2026, 12, 3, 1, 0, tzinfo=timezone.utc)
    # a zone given is kept: 18:00 at +01:00 is 17:00 UTC
    assert seeds.parse_deadline("2026-12-02T18:00+01:00", NOW) == datetime(2026, 12, 2, 17, 0, tzinfo=timezone.utc)
    for bad in ("soon", "25:00", "17h"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"ISO 8601.*got {bad!r}"):
            seeds.parse_deadline(bad, NOW)


def test_too_late_by_the_expected_time():
    deadline = NOW + timedelta(minutes=40)
    assert seeds.too_late(None, 10_000.0, NOW) is None  # no deadline: anything starts
    assert seeds.too_late(deadline, 39 * 60.0, NOW) is None
    assert seeds.too_late(deadline, None, NOW) is None  # no estimate yet: it starts
    why = seeds.too_late(deadline, 41 * 60.0, NOW)
    assert why == "expected to take 41 min, 40 min left before the deadline 2026-12-02T16:10Z"
    assert seeds.too_late(NOW - timedelta(seconds=1), None, NOW) == "the deadline 2026-12-02T15:30Z has passed"
    assert seeds.expected_seconds([{"train_seconds": 100.0}, {"train_seconds": 300.0}, {}]) == 300.0
    assert seeds.expected_seconds([]) is None


def _archive_seed(tmp_path: Path, config: Path, archive: Path, seed: int, train_seconds: float) -> None:
    """An archived record of `config`'s run with this seed, as a finished run leaves it."""
    args = seeds.parse_args(["--config", f"sas={config}", "--runs", str(tmp_path / "runs"), "--out", "x.json"])
    (label, _, base), = seeds.run_configs(args)
    cfg = seeds.seed_config(base, label, seed, tmp_path / "runs")
    metrics = {"hr@10": 0.07, "ndcg@10": 0.04, "mrr@10": 0.03}
    record = {"model": "sasrec", "seed": seed, "samples": "all_positions", "test": metrics, "valid": metrics,
              "epochs_run": 20, "best_epoch": 9, "stopped_early": True, "seconds_per_epoch": train_seconds / 20,
              "train_seconds": train_seconds, "dataset_fingerprint": "f00d", "valid_history": [],
              "protocols": {"paper": metrics, "exclude_history": metrics}, "run_name": cfg["run"]["name"]}
    seeds.archive_record(archive, cfg, record)


def test_a_run_that_would_end_after_the_deadline_is_not_started(tmp_path, capsys):
    config, archive, out, runs = tmp_path / "sas.yaml", tmp_path / "archive", tmp_path / "seeds.json", tmp_path / "runs"
    config.write_text(yaml.safe_dump(TINY))
    _archive_seed(tmp_path, config, archive, 1, train_seconds=3600.0)  # seed 1 took an hour
    soon = (datetime.now(timezone.utc) + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M")
    argv = ["--config", f"sas={config}", "--seeds", "1", "2", "--runs", str(runs), "--archive", str(archive),
            "--out", str(out), "--deadline", soon]
    assert seeds.main(argv) == 0
    report = json.loads(out.read_text())
    assert [r["seed"] for r in report["runs"]] == [1] and report["runs"][0]["archived"]
    (pending,) = report["pending"]
    assert pending.startswith("sas-seed2 (not started: expected to take 60 min, ")
    assert f"before the deadline {soon}Z)" in pending and not report["complete"]
    assert not (runs / "sas-seed2").exists()  # nothing trained, no run directory begun
    assert "=== sas seed 2" not in capsys.readouterr().out
    assert "Not finished yet: sas-seed2 (not started: expected to take 60 min" in out.with_suffix(".md").read_text()

    # a deadline that has passed starts nothing, not even a config's first run (no estimate)
    _archive_seed(tmp_path, config, archive, 1, train_seconds=60.0)
    assert seeds.main([*argv[:-1], "2020-01-01T00:00"]) == 0
    assert json.loads(out.read_text())["pending"] == ["sas-seed2 (not started: the deadline 2020-01-01T00:00Z has passed)"]


def test_a_bad_deadline_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        seeds.parse_args(["--config", "a.yaml", "--runs", str(tmp_path), "--out", "x.json", "--deadline", "tonight"])
    assert exc.value.code == 2
    assert "--deadline: expected an ISO 8601 time (e.g. 2026-12-02T17:00) or HH:MM in UTC, got 'tonight'" in capsys.readouterr().err
