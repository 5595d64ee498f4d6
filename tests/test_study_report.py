"""benchmarks/study_report.py: a study's trials read back from their checkpoints, while the study
runs (statuses from Tune's experiment state) and after it ended (results.parquet, best.yaml)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import study_report  # noqa: E402

from echomamba_dist.train.checkpoint import write_checkpoint  # noqa: E402

SEARCH = {
    "model.dropout": {"uniform": [0.1, 0.5]},
    "model.readout": {"choice": ["last", "ends"]},
    "train.lr": {"loguniform": [3.0e-4, 3.0e-3]},
}


def _trial(study: Path, trial_id: str, history: list[float], *, dropout: float, readout: str, lr: float,
           finished: bool = False) -> None:
    run_dir = study / "trials" / f"trial-{trial_id}"
    best = max(range(len(history)), key=history.__getitem__)
    meta = {"epoch": len(history), "best_epoch": best, "best_metric": history[best], "metric": "ndcg@10",
            "history": [{"epoch": e, "val_ndcg@10": v, "epoch_seconds": 10.0 + e} for e, v in enumerate(history)]}
    config = {"model": {"name": "echomamba4rec", "dropout": dropout, "readout": readout},
              "train": {"lr": lr, "metric": "ndcg@10"}}
    for epoch in range(len(history)):  # an older checkpoint first: the newest one is read
        write_checkpoint(run_dir / f"epoch_{epoch:06d}", model_state={"w": torch.zeros(1)}, optimizer_state=None,
                         meta={**meta, "history": meta["history"][: epoch + 1]}, config=config)
    if finished:
        (run_dir / "metrics.json").write_text("{}")


def _tune_state(study: Path, statuses: dict[str, str], *, started: str = "2026-12-01_00-00-00") -> None:
    tuner = study / "tuner"
    tuner.mkdir(parents=True, exist_ok=True)
    trial_data = [[json.dumps({"trial_id": t, "status": s, "stub": False}), "{}"] for t, s in statuses.items()]
    (tuner / f"experiment_state-{started}.json").write_text(json.dumps({"trial_data": trial_data}))


@pytest.fixture
def study(tmp_path):
    study = tmp_path / "tune" / "my-study"
    _trial(study, "aaaa0001", [0.01, 0.03, 0.05, 0.04], dropout=0.2, readout="last", lr=1e-3, finished=True)
    _trial(study, "bbbb0002", [0.005, 0.01, 0.012], dropout=0.45, readout="ends", lr=4e-4)
    _trial(study, "cccc0003", [0.02, 0.035], dropout=0.3, readout="ends", lr=2e-3)
    (study / "trials" / "trial-dddd0004").mkdir(parents=True)  # started, no checkpoint yet
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "echomamba4rec"}, "search": SEARCH, "tune": {"name": "my-study"}}))
    return study, config


def test_a_running_study_reads_its_trials_from_checkpoints_and_tunes_state(study, tmp_path):
    study_dir, config = study
    # two starts of the study: the state of the later one counts, whatever the files' times
    _tune_state(study_dir, {"aaaa0001": "TERMINATED", "bbbb0002": "TERMINATED", "cccc0003": "RUNNING"},
                started="2026-12-02_03-00-00")
    _tune_state(study_dir, {"aaaa0001": "RUNNING", "bbbb0002": "RUNNING"}, started="2026-12-01_23-00-00")
    out = tmp_path / "out"
    assert study_report.main(["--study-config", str(config), "--study", str(study_dir), "--out", str(out)]) == 0

    report = json.loads((out / "trials.json").read_text())
    assert report["ended"] is False and report["metric"] == "ndcg@10" and report["search"] == SEARCH
    trials = report["trials"]
    assert [t["trial_id"] for t in trials] == ["aaaa0001", "cccc0003", "bbbb0002"]  # best validation first
    assert [t["status"] for t in trials] == ["COMPLETED", "RUNNING", "STOPPED_EARLY"]
    assert [t["val_ndcg@10"] for t in trials] == [0.05, 0.035, 0.012]
    assert [t["best_epoch"] for t in trials] == [2, 1, 2] and [t["epochs"] for t in trials] == [4, 2, 3]
    assert trials[0]["params"] == {"model.dropout": 0.2, "model.readout": "last", "train.lr": 1e-3}
    assert trials[0]["valid_history"] == [0.01, 0.03, 0.05, 0.04]
    markdown = (out / "trials.md").read_text()
    assert "Study still running (3 trials with a checkpoint so far)" in markdown
    assert "| aaaa0001 | COMPLETED | 4 | 3 | 0.0500 | 0.2 | last | 0.001 |" in markdown
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "results.parquet").exists() and not (out / "best.yaml").exists()


def test_an_ended_study_takes_its_statuses_from_results_and_copies_them(study, tmp_path):
    study_dir, config = study
    run_dirs = [str(study_dir / "trials" / f"trial-{t}") for t in ("aaaa0001", "cccc0003", "bbbb0002")]
    pq.write_table(pa.table({"trial_id": ["aaaa0001", "cccc0003", "bbbb0002"],
                             "status": ["COMPLETED", "COMPLETED", "STOPPED_EARLY"], "run_dir": run_dirs}),
                   study_dir / "results.parquet")
    (study_dir / "best.yaml").write_text(
        f"# Best configuration of study my-study ({study_dir}):\n# trial aaaa0001\n"
        + yaml.safe_dump({"data": {"path": str(tmp_path / "prepared" / "beauty"), "max_len": 50},
                          "model": {"dropout": 0.2}, "run": {"name": "my-study-best", "storage_path": str(tmp_path / "runs")}},
                         sort_keys=False))
    out = tmp_path / "out"
    study_report.main(["--study-config", str(config), "--study", str(study_dir), "--out", str(out), "--no-plot"])
    report = json.loads((out / "trials.json").read_text())
    assert report["ended"] is True
    assert [t["status"] for t in report["trials"]] == ["COMPLETED", "COMPLETED", "STOPPED_EARLY"]
    # copies without the paths of the machine: shown relative (here: their last two parts)
    best = (out / "best.yaml").read_text()
    assert str(tmp_path) not in best and best.startswith("# Best configuration of study my-study (tune/my-study):\n# trial aaaa0001\n")
    assert yaml.safe_load(best) == {"data": {"path": "prepared/beauty", "max_len": 50}, "model": {"dropout": 0.2},
                                    "run": {"name": "my-study-best", "storage_path": str(Path(tmp_path.name) / "runs")}}
    results = pq.read_table(out / "results.parquet").to_pydict()
    assert results["status"] == ["COMPLETED", "COMPLETED", "STOPPED_EARLY"]
    assert results["run_dir"] == ["trials/trial-aaaa0001", "trials/trial-cccc0003", "trials/trial-bbbb0002"]
    assert str(tmp_path) not in (out / "trials.json").read_text()
    assert not (out / "search.png").exists()


def test_bad_inputs_name_the_path(study, tmp_path):
    study_dir, config = study
    not_a_study = tmp_path / "plain.yaml"
    not_a_study.write_text("model: {name: sasrec}\n")
    with pytest.raises(SystemExit, match=r"plain\.yaml: no `search` section: not a study file"):
        study_report.main(["--study-config", str(not_a_study), "--study", str(study_dir), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"elsewhere: no trials/ directory"):
        study_report.main(["--study-config", str(config), "--study", str(tmp_path / "elsewhere"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
