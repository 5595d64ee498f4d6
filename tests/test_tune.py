"""`echomamba tune`: the study file, trial configs and results (fast, no Ray), then whole studies on
a local Ray (slow): a failing trial, MLflow's parent and child runs, best.yaml trained as it is,
and a study killed mid-way that resumes with the same command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from echomamba_dist.cli import main
from echomamba_dist.config import ExperimentConfig, experiment_from_dict, load
from echomamba_dist.errors import ConfigError
from echomamba_dist.distributed.tune.study import TRIALS_DIR, TUNER_DIR
from echomamba_dist.distributed.tune.results import format_results
from echomamba_dist.distributed.tune.results import write_results
from echomamba_dist.distributed.tune.driver import trial_concurrency
from echomamba_dist.distributed.tune.study import search_space
from echomamba_dist.distributed.tune.study import trial_config
from echomamba_dist.distributed.tune.study import with_params
from echomamba_dist.distributed.tune.study import load_study

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"
ISSUE_KEYS = {  # what the search space must be able to cover (issue #6)
    "model.filter", "model.filter_init_scale", "model.filter_lowpass", "model.expand", "model.dropout",
    "model.d_state", "model.d_conv", "model.num_layers", "model.combine", "model.readout", "train.lr",
}


def write_study(tmp_path: Path, *, search: dict | None = None, **tune) -> Path:
    """A tiny study: 3 trials of 2 epochs on a small synthetic set, 2 at a time, random search."""
    study = {
        "data": {"synthetic": {"n_users": 120, "n_items": 40, "n_topics": 4, "mean_length": 8.0}, "max_len": 10},
        "model": {"name": "echomamba4rec", "hidden_size": 8, "d_state": 4, "max_len": 10},
        "train": {"epochs": 2, "patience": 0, "batch_size": 128, "eval_batch_size": 256, "num_workers": 1,
                  "cpus_per_worker": 1},
        "run": {"name": "unused", "storage_path": str(tmp_path / "runs")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tune-tests"},
        "search": search or {
            "model.combine": {"choice": ["sum", "concat"]},
            "model.num_layers": {"choice": [1, 2]},
            "train.lr": {"loguniform": [1.0e-3, 1.0e-2]},
        },
        "tune": {"name": "study", "storage_path": str(tmp_path / "tune"), "num_samples": 3, "search_alg": "random",
                 "max_concurrent": 2, "seed": 0, **tune},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------
# The study file (no Ray)


def test_job_studies_load_and_cover_the_search_space():
    smoke = load_study(CONFIGS / "tune-smoke.yaml")
    beauty = load_study(CONFIGS / "tune-beauty.yaml")
    for study in (smoke, beauty):
        assert set(study.search) >= ISSUE_KEYS
        assert study.tune.search_alg == "optuna"
        assert set(search_space(study)) == set(study.search)
    assert smoke.tune.num_samples >= 4 and smoke.base_config.train.epochs > smoke.tune.grace_period
    assert not smoke.base_config.train.use_gpu
    cfg = beauty.base_config
    assert cfg.train.use_gpu and cfg.data.path.startswith("/mnt/shared/")
    assert beauty.tune.storage_path.startswith("/mnt/shared/") and cfg.run.storage_path.startswith("/mnt/shared/")
    assert cfg.tracking.tracking_uri is None  # the cluster's MLFLOW_TRACKING_URI is used


@pytest.mark.parametrize(
    ("search", "tune", "message"),
    [
        ({"model.dropuot": {"uniform": [0.1, 0.2]}}, {}, "dropuot"),
        ({"model.dropout": {"normal": [0.1, 0.2]}}, {}, "search.model.dropout"),
        ({"model.dropout": {"uniform": [0.1, 1.5]}}, {}, "search.model.dropout: value 1.5"),
        ({"model.dropout": {"uniform": [0.5, 0.1]}}, {}, "low must be below high"),
        ({"model.combine": {"choice": ["sum", "mean"]}}, {}, "'mean'"),
        ({"train.lr": {"loguniform": [0.0, 0.1]}}, {}, "bounds must be > 0"),
        ({"train.lr": {"uniform": [0.001, 0.01]}}, {"num_sample": 3}, "tune.num_sample"),
        ({"train.lr": {"uniform": [0.001, 0.01]}}, {"search_alg": "grid"}, "tune.search_alg"),
    ],
)
def test_load_study_names_the_wrong_key(tmp_path, search, tune, message):
    path = write_study(tmp_path, search=search, **tune)
    with pytest.raises(ConfigError, match="study.yaml") as err:
        load_study(path)
    assert message in str(err.value)


def test_load_study_needs_a_search_section(tmp_path):
    path = write_study(tmp_path)
    data = yaml.safe_load(path.read_text())
    del data["search"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="search: expected a mapping"):
        load_study(path)


def test_overrides_reach_tune_train_and_whole_search_entries(tmp_path):
    study = load_study(write_study(tmp_path), [
        "tune.num_samples=5", "train.epochs=3", "search.train.lr={loguniform: [1.0e-5, 1.0e-4]}",
        "search.model.dropout={uniform: [0.0, 0.3]}",
    ])
    assert study.tune.num_samples == 5 and study.base_config.train.epochs == 3
    assert study.search["train.lr"] == {"loguniform": [1.0e-5, 1.0e-4]}
    assert study.search["model.dropout"] == {"uniform": [0.0, 0.3]}


def test_with_params_keeps_values_exact():
    data = with_params({"train": {"epochs": 2}}, {"train.lr": 1e-05, "model.filter_lowpass": None})
    cfg = experiment_from_dict(data)  # 1e-05 written through YAML text would come back a string
    assert cfg.train.lr == 1e-05 and cfg.model.filter_lowpass is None and cfg.train.epochs == 2


def test_trial_config_runs_one_trial_in_its_own_directory(tmp_path):
    base = load_study(write_study(tmp_path)).base
    cfg = experiment_from_dict(trial_config(base, {"model.combine": "concat", "train.lr": 0.004},
                                            name="trial-abc", storage_path=str(tmp_path / "trials")))
    assert cfg.model.combine == "concat" and cfg.train.lr == 0.004
    assert cfg.run.run_dir == (tmp_path / "trials" / "trial-abc").resolve()
    assert not cfg.train.final_test and not cfg.tracking.enabled and cfg.run.resume
    assert cfg.train.fail_at_step is None
    failing = experiment_from_dict(trial_config(base, {}, name="t", storage_path=str(tmp_path), fail=True))
    assert failing.train.fail_at_step == 0 and failing.run.max_failures == 0


def test_trial_concurrency_follows_resources_and_needs():
    cfg = experiment_from_dict({"train": {"num_workers": 1, "cpus_per_worker": 1}})
    assert trial_concurrency(cfg, {"CPU": 3}) == 2  # one CPU stays with Ray Data
    assert trial_concurrency(cfg, {"CPU": 1}) == 1
    gpu = experiment_from_dict({"train": {"num_workers": 2, "use_gpu": True, "cpus_per_worker": 4}})
    assert trial_concurrency(gpu, {"CPU": 96, "GPU": 8}) == 4
    assert trial_concurrency(gpu, {"CPU": 96}) == 1


def test_results_table_keeps_mixed_parameter_types(tmp_path):
    import pyarrow.parquet as pq

    rows = [
        {"trial_id": "a", "status": "COMPLETED", "epochs": 2, "val_ndcg_at_10": 0.5, "param.x": None, "param.y": "sum"},
        {"trial_id": "b", "status": "ERROR", "epochs": 0, "val_ndcg_at_10": float("nan"), "param.x": 0.25,
         "param.y": 3},
    ]
    write_results(rows, tmp_path / "r.parquet")
    table = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert table[0]["param.x"] is None and table[1]["param.x"] == 0.25
    assert [json.loads(r["param.y"]) for r in table] == ["sum", 3]  # mixed: kept as JSON text
    text = format_results(rows, metric="val_ndcg_at_10")
    assert text.splitlines()[0].split()[:4] == ["trial", "status", "epochs", "val_ndcg_at_10"]
    assert "0.5000" in text and "ERROR" in text


def test_trial_history_skips_a_damaged_checkpoint_for_the_one_before_it(tmp_path, capsys):
    import torch

    from echomamba_dist.distributed.tune.study import trial_history
    from echomamba_dist.train.checkpoint import write_checkpoint

    run_dir = tmp_path / "trial-x"
    for epoch, best in ((3, 0.04), (4, 0.05)):
        write_checkpoint(run_dir / f"epoch_{epoch:06d}", model_state={"w": torch.zeros(1)}, optimizer_state=None,
                         meta={"epoch": epoch + 1, "best_epoch": epoch, "best_metric": best, "history": [{}] * (epoch + 1)},
                         config={})
    assert trial_history(run_dir)["best"] == 0.05
    (run_dir / "epoch_000004" / "meta.json").write_text("{not json")
    hist = trial_history(run_dir)
    assert (hist["checkpoint"].name, hist["epochs"], hist["best"]) == ("epoch_000003", 4, 0.04)
    err = capsys.readouterr().err
    assert "epoch_000004/meta.json: corrupt checkpoint metadata" in err and "checkpoint before it" in err
    (run_dir / "epoch_000003" / "meta.json").write_text("[]")
    assert trial_history(run_dir) is None
    assert trial_history(tmp_path / "never-started") is None


def test_cli_reports_a_bad_study_file(tmp_path, capsys):
    path = write_study(tmp_path, search={"model.nope": {"choice": [1]}})
    assert main(["tune", "--config", str(path)]) == 2
    assert "model.nope" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Whole studies on a local Ray


@pytest.fixture(scope="module")
def failing_study(tmp_path_factory):
    """A 3-trial study in which the trials with combine=concat fail (random search, seed 0)."""
    import ray

    from echomamba_dist.distributed.tune.driver import run_study

    tmp_path = tmp_path_factory.mktemp("tune")
    path = write_study(tmp_path)
    try:
        summary = run_study(path, fail_on={"model.combine": "concat"})
    finally:
        ray.shutdown()
    return tmp_path, load_study(path), summary


@pytest.mark.slow
def test_failed_trial_is_recorded_and_the_study_goes_on(failing_study):
    import pyarrow.parquet as pq

    tmp_path, study, summary = failing_study
    rows = pq.read_table(study.study_dir / "results.parquet").to_pylist()
    assert len(rows) == 3 and len({r["trial_id"] for r in rows}) == 3
    failed = [r for r in rows if r["param.model.combine"] == "concat"]
    ok = [r for r in rows if r["param.model.combine"] == "sum"]
    assert failed and ok, "seed 0 should sample both variants"
    assert all(r["status"] == "ERROR" and "training failed" in r["error"] for r in failed)
    assert all(r["status"] in ("COMPLETED", "STOPPED_EARLY") and r["val_ndcg_at_10"] > 0 for r in ok)

    best = load(ExperimentConfig, study.study_dir / "best.yaml")
    best_row = max(ok, key=lambda r: r["val_ndcg_at_10"])
    assert summary["best_trial"] == best_row["trial_id"]
    assert best.model.combine == "sum"
    assert best.model.num_layers == best_row["param.model.num_layers"] and best.train.lr == best_row["param.train.lr"]
    assert best.train.final_test and best.train.epochs == 2  # a full training config, not a trial's
    assert set(summary["test"]) == {"hr@10", "ndcg@10", "mrr@10", "recall@10"}


@pytest.mark.slow
def test_retry_failed_runs_the_failed_trials_of_an_ended_study_again(tmp_path):
    """A study whose trials failed for a passing reason (here: `fail_on`, then no longer) ends with
    them as ERROR; `retry_failed` runs them again, and the study's results and MLflow runs show
    them finished."""
    import pyarrow.parquet as pq
    import ray
    from mlflow.tracking import MlflowClient

    from echomamba_dist.distributed.tune.driver import run_study

    path = write_study(tmp_path)
    study = load_study(path)
    try:
        run_study(path, fail_on={"model.combine": "concat"})
    finally:
        ray.shutdown()
    rows = pq.read_table(study.study_dir / "results.parquet").to_pylist()
    failed = {r["trial_id"] for r in rows if r["status"] == "ERROR"}
    assert failed and len(failed) < 3, "seed 0 should sample both variants"

    try:
        summary = run_study(path, retry_failed=True)
    finally:
        ray.shutdown()
    rows = {r["trial_id"]: r for r in pq.read_table(study.study_dir / "results.parquet").to_pylist()}
    assert len(rows) == 3  # the same trials, none added
    for trial_id in failed:
        assert rows[trial_id]["status"] == "COMPLETED" and rows[trial_id]["epochs"] == 2
        assert rows[trial_id]["val_ndcg_at_10"] > 0 and rows[trial_id]["param.model.combine"] == "concat"
    assert summary["best_trial"] == max(rows.values(), key=lambda r: r["val_ndcg_at_10"])["trial_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tune-tests")
    children = client.search_runs([exp.experiment_id], filter_string="tags.`echomamba.trial_id` != ''")
    assert len(children) == 3  # a retried trial keeps its child run
    for run in children:
        assert run.info.status == "FINISHED" and "echomamba.error" not in run.data.tags


def test_cli_passes_retry_failed_to_the_study(tmp_path, monkeypatch):
    import echomamba_dist.distributed.tune.driver as driver

    calls = []
    monkeypatch.setattr(driver, "run_study", lambda path, overrides, **kw: calls.append((path, overrides, kw)))
    path = write_study(tmp_path)
    assert main(["tune", "--config", str(path), "--set", "tune.num_samples=4", "--retry-failed"]) == 0
    assert main(["tune", "--config", str(path)]) == 0
    assert calls == [(str(path), ["tune.num_samples=4"], {"retry_failed": True}),
                     (str(path), [], {"retry_failed": False})]


@pytest.mark.slow
def test_mlflow_holds_the_study_and_one_child_run_per_trial(failing_study):
    from mlflow.tracking import MlflowClient

    tmp_path, study, summary = failing_study
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tune-tests")
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.run_name == "study" and parent.info.status == "FINISHED"
    assert parent.data.params["tune.num_samples"] == "3" and "search.model.combine" in parent.data.params
    assert parent.data.metrics["best_val_ndcg_at_10"] > 0 and "best_test_ndcg_at_10" in parent.data.metrics
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"best.yaml", "results.parquet"}

    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3
    by_trial = {r.data.tags["echomamba.trial_id"]: r for r in children}
    for row in summary["rows"]:
        run = by_trial[row["trial_id"]]
        assert set(run.data.params) == set(study.search)
        if row["status"] == "ERROR":
            assert run.info.status == "FAILED" and run.data.tags["echomamba.error"]
        else:
            assert run.info.status == "FINISHED"
            history = client.get_metric_history(run.info.run_id, "val_ndcg_at_10")
            assert sorted(m.step for m in history) == list(range(row["epochs"]))


@pytest.mark.slow
def test_the_best_trials_model_is_the_registered_champion(failing_study):
    import mlflow
    import pandas as pd

    from echomamba_dist.data.dataset import load_dataset
    from echomamba_dist.serve.load import load_model, pad_histories, topk_items

    tmp_path, study, summary = failing_study
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("study", "champion")  # registered under the study name
    assert champion.run_id == summary["parent_run_id"]
    assert champion.tags["echomamba.trial_id"] == summary["best_trial"]
    assert summary["registered_model"] == {"name": "study", "version": int(champion.version), "alias": "champion"}

    # it scores like the best trial's best weights
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/study@champion")
    best = load_model(study.study_dir / TRIALS_DIR / f"trial-{summary['best_trial']}")
    ds = load_dataset(best.config.data)
    histories = [ds.items[ds.offsets[u] : ds.offsets[u + 1]][-10:] for u in range(4)]
    out = model.predict(pd.DataFrame({"history": [[str(ds.item_ids[i]) for i in h] for h in histories]}),
                        params={"k": 5})
    top, _ = topk_items(best.model, *pad_histories(histories, 10), k=5)
    assert [list(r) for r in out["items"]] == [[str(ds.item_ids[i]) for i in row] for row in top]


@pytest.mark.slow
def test_best_yaml_trains_as_it_is(failing_study, tmp_path, capsys):
    _, study, _ = failing_study
    rc = main(["train", "--config", str(study.study_dir / "best.yaml"), "--set", "train.epochs=1",
               "--set", "train.ray=false", "--set", f"run.storage_path={tmp_path}"])
    assert rc == 0
    assert "test" in capsys.readouterr().out and (tmp_path / "study-best" / "metrics.json").is_file()


def _trial_states(study_dir: Path) -> dict[str, str]:
    """trial id -> status, from Tune's saved experiment state (empty until the first save)."""
    states = {}
    for path in sorted((study_dir / TUNER_DIR).glob("experiment_state-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # being rewritten
            continue
        for trial_json, _ in data.get("trial_data", []):
            trial = json.loads(trial_json)
            states[trial["trial_id"]] = trial["status"]
    return states


def _ray_processes(marker: str) -> list[int]:
    """Processes whose command line names `marker` (this test's Ray temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
def test_killed_study_resumes_with_the_same_command(tmp_path):
    import pyarrow.parquet as pq

    path = write_study(tmp_path, search_alg="optuna")
    study = load_study(path)
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "echomamba_dist.cli", "tune", "--config", str(path)]
    try:
        with open(tmp_path / "first.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                deadline = time.time() + 400
                while time.time() < deadline and proc.poll() is None:
                    if "TERMINATED" in _trial_states(study.study_dir).values():
                        break
                    time.sleep(1)
                assert proc.poll() is None, "the study ended before it could be interrupted:\n" + (
                    tmp_path / "first.log").read_text()[-3000:]
                finished_before = {t for t, s in _trial_states(study.study_dir).items() if s == "TERMINATED"}
                assert finished_before, "no trial finished in time"
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)  # the driver and whatever it started
                proc.wait(timeout=60)
        for pid in _ray_processes(ray_tmp):  # a Ray process that escaped the process group
            os.kill(pid, signal.SIGKILL)
        assert not (study.study_dir / "results.parquet").exists()
        stamps = {t: (study.study_dir / TRIALS_DIR / f"trial-{t}" / "metrics.json").stat().st_mtime
                  for t in finished_before if (study.study_dir / TRIALS_DIR / f"trial-{t}" / "metrics.json").exists()}

        second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                                start_new_session=True)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert "resuming the study" in second.stdout
    finally:
        for pid in _ray_processes(ray_tmp):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    rows = pq.read_table(study.study_dir / "results.parquet").to_pylist()
    assert len(rows) == 3 and len({r["trial_id"] for r in rows}) == 3
    assert all(r["status"] in ("COMPLETED", "STOPPED_EARLY") for r in rows), rows
    assert set(_trial_states(study.study_dir)) == {r["trial_id"] for r in rows}
    for trial, stamp in stamps.items():  # a trial that had finished was not trained again
        assert (study.study_dir / TRIALS_DIR / f"trial-{trial}" / "metrics.json").stat().st_mtime == stamp
    load(ExperimentConfig, study.study_dir / "best.yaml")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tune-tests")
    parents = client.search_runs([exp.experiment_id], "tags.`echomamba.study` = 'study' and attributes.run_name = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # reopened, not duplicated
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(r.data.tags["echomamba.trial_id"] for r in children) == sorted(r["trial_id"] for r in rows)
    assert all(r.info.status == "FINISHED" for r in children)
