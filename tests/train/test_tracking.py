"""The Model Registry settings of a run (`tracking.*`) and what the Tracker makes of them."""

from __future__ import annotations

import pytest

from echomamba_dist.config import ConfigError, experiment_from_dict
from echomamba_dist.train.tracking import Tracker


@pytest.mark.parametrize(
    "tracking, needle",
    [
        ({"registered_model": "a/b"}, "tracking.registered_model: expected a name without '/' or ':'"),
        ({"registered_model": " "}, "tracking.registered_model"),
        ({"model_alias": "latest"}, "tracking.model_alias"),  # MLflow reserves it
        ({"model_alias": "v3"}, "tracking.model_alias"),  # a version number
        ({"model_alias": "my alias"}, "tracking.model_alias"),
    ],
)
def test_bad_registry_names_are_config_errors(tracking, needle):
    with pytest.raises(ConfigError, match=needle):
        experiment_from_dict({"tracking": tracking})


def test_good_registry_names_are_kept():
    cfg = experiment_from_dict({"tracking": {"registered_model": "beauty recs", "model_alias": "champion-2"}})
    assert (cfg.tracking.registered_model, cfg.tracking.model_alias) == ("beauty recs", "champion-2")


def test_the_registered_name_is_the_run_name_unless_set(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def registered_as(run: str, **tracking):
        cfg = experiment_from_dict({"tracking": {"tracking_uri": uri, **tracking}})
        tracker = Tracker(cfg.tracking, run_dir=tmp_path / run, run_name="beauty-sasrec")
        tracker.end()
        return tracker.registered_model

    assert registered_as("a") == "beauty-sasrec"
    assert registered_as("b", registered_model="recs") == "recs"
    assert registered_as("c", register=False) is None
    import mlflow

    runs = mlflow.MlflowClient(tracking_uri=uri).search_runs(["0", "1"])
    off = Tracker(experiment_from_dict({"tracking": {"enabled": False}}).tracking, run_dir=tmp_path, run_name="x")
    off.log_final({"best_epoch": 0}, checkpoint_dir=tmp_path, item_ids=["", "a"])  # tracking off: nothing happens
    assert off.run_id is None and off.registered is None
    assert len(runs) == 3 and len(mlflow.MlflowClient(tracking_uri=uri).search_runs(["0", "1"])) == 3
    assert not mlflow.MlflowClient(tracking_uri=uri).search_registered_models()


def test_trainers_opening_a_new_store_at_once_all_get_it(tmp_path):
    """Two trainers started together on a fresh SQLite store both create its tables; the one that
    loses the race waits for the other instead of failing with "table ... already exists"."""
    import subprocess
    import sys
    import time

    script = (
        "import sys, time, pathlib\n"
        "from echomamba_dist.config import experiment_from_dict\n"
        "from echomamba_dist.train.tracking import use_experiment\n"
        "import mlflow  # the slow import before the start line\n"
        "d = pathlib.Path(sys.argv[1]); (d / f'ready{sys.argv[2]}').touch()\n"
        "while not (d / 'go').exists(): time.sleep(0.005)\n"
        "cfg = experiment_from_dict({'tracking': {'tracking_uri': f'sqlite:///{d}/mlflow.db', 'experiment': 'x'}})\n"
        "print(use_experiment(cfg.tracking).name)\n"
    )
    n = 4
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    deadline = time.time() + 120
    while sum((tmp_path / f"ready{i}").exists() for i in range(n)) < n and time.time() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert out.strip() == "x"
