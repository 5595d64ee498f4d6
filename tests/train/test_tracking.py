"""The Model Registry settings of a run (`tracking.*`) and what the Tracker makes of them."""

from __future__ import annotations

import pytest

from echomamba_dist.config import experiment_from_dict
from echomamba_dist.errors import ConfigError


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


def test_publish_registers_under_the_run_name_unless_set(tmp_path):
    """After training, `publish_run` logs the best model into the run's MLflow run and registers
    it: under the run name, or `tracking.registered_model`; not at all with register=false or
    tracking off. Training itself registers nothing."""
    import mlflow

    from echomamba_dist.config import to_dict
    from echomamba_dist.serve.pyfunc import publish_run
    from echomamba_dist.train.loop import train_per_worker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = {
        "data": {"synthetic": {"n_users": 60, "n_items": 30, "n_topics": 3, "mean_length": 6.0}, "max_len": 8},
        "model": {"name": "sasrec", "hidden_size": 8, "num_layers": 1, "num_heads": 1, "inner_size": 16},
        "train": {"epochs": 1, "batch_size": 64, "ray": False, "progress": False},
        "run": {"name": "beauty-sasrec", "storage_path": str(tmp_path / "runs")},
        "tracking": {"tracking_uri": uri, "experiment": "publish"},
    }
    cfg = experiment_from_dict(base)
    train_per_worker(to_dict(cfg))
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert not client.search_registered_models()  # the loop logs metrics; publishing is separate

    def publish(**tracking):
        return publish_run(experiment_from_dict({**base, "tracking": {**base["tracking"], **tracking}}))

    assert publish(enabled=False) is None and publish(log_model=False) is None
    assert not client.search_registered_models()
    first = publish()
    assert (first.name, first.version) == ("beauty-sasrec", 1)
    assert publish(registered_model="recs").name == "recs"
    assert publish(register=False) is None
    assert sorted(m.name for m in client.search_registered_models()) == ["beauty-sasrec", "recs"]
    [run] = client.search_runs([client.get_experiment_by_name("publish").experiment_id])
    assert {v.run_id for v in client.search_model_versions("name = 'recs'")} == {run.info.run_id}


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
