"""`echomamba train` through Ray Train with 2 workers, as a user runs it: the metrics table, a
worker killed mid-run, the driver stopped by SIGTERM and started again, and a worker that raises.

Every run here uses the same seed and config as the uninterrupted reference run, so "no lost
work" is checked as equality of the final metrics and step counts.
"""

from __future__ import annotations

import json
import math
import re
import signal
import time
from pathlib import Path

import pytest

from ray_test_helpers import tiny_config, write_config

pytestmark = pytest.mark.slow

# a little more data and epochs than the tiniest config, so that a run lasts long enough to be
# interrupted after its first checkpoint
DATA = {"synthetic": {"n_users": 600, "n_items": 60, "n_topics": 4, "mean_length": 9.0}, "max_len": 12}
EPOCHS = 5


@pytest.fixture(scope="module")
def config_file(cli):
    cfg = tiny_config(cli.cwd, data=DATA, train={"epochs": EPOCHS, "num_workers": 1})
    return write_config(cli.cwd / "c.yaml", cfg)


@pytest.fixture(scope="module")
def reference(cli, config_file):
    """The uninterrupted run: `echomamba train --set train.num_workers=2`, tracked in MLflow."""
    done = cli.run([
        "train", "--config", str(config_file), "--set", "train.num_workers=2", "--set", "run.name=ref",
        "--set", "tracking.enabled=true", "--set", f"tracking.tracking_uri=sqlite:///{cli.cwd / 'mlflow.db'}",
    ])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((cli.cwd / "runs" / "ref" / "metrics.json").read_text())
    return done, metrics


def steps_per_epoch(metrics: dict) -> int:
    return metrics["steps"] // metrics["epochs_run"]


def registered_checkpoints(run_dir: Path) -> list[str]:
    """The checkpoints Ray's controller has registered (and would restore from)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        text = snapshot.read_text()
    except OSError:
        return []
    return sorted(set(re.findall(r"epoch_\d{6}", text)))


def test_two_workers_train_and_print_the_metrics_table(cli, reference):
    done, metrics = reference
    assert "worker 0/2" in done.stdout and "worker 1/2" in done.stdout
    assert "popularity" in done.stdout and "ndcg@10" in done.stdout and "test users 600" in done.stdout
    assert metrics["epochs_run"] == EPOCHS and metrics["test_users"] == 600
    for epoch in range(EPOCHS):  # rank 0 prints each epoch's line, and it is shown once
        assert len(re.findall(rf"epoch +{epoch}  loss", done.stdout + done.stderr)) == 1, epoch
    # the global batch is kept: 2 workers take the steps of one
    from echomamba_dist.config import ExperimentConfig, load
    from echomamba_dist.distributed.trainer import count_train_samples

    cfg = load(ExperimentConfig, cli.cwd / "c.yaml")
    assert metrics["steps"] == EPOCHS * math.ceil(count_train_samples(cfg, "prefix") / 128)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{cli.cwd / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["echomamba"], output_format="list")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_ndcg_at_10"] == pytest.approx(metrics["test"]["ndcg@10"])
    assert cli.leftover() == []


def test_a_killed_worker_is_restarted_from_the_last_checkpoint_with_the_same_result(cli, config_file, reference):
    _, ref = reference
    # in the last epoch: Ray's controller registers a reported checkpoint when it next polls the
    # workers (every 2 s), and reporting epoch 1 waits until epoch 0's report was taken, so at
    # least epoch 0's checkpoint is known to Ray when the worker dies
    step = 2 * steps_per_epoch(ref) + 2
    done = cli.run([
        "train", "--config", str(config_file), "--set", "train.num_workers=2", "--set", "run.name=fault",
        "--set", f"train.fail_at_step={step}",
    ])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "killing worker rank 1" in out and "resumed from" in out
    run_dir = cli.cwd / "runs" / "fault"
    assert (run_dir / ".fault_injected").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == ref["steps"] and metrics["epochs_run"] == ref["epochs_run"]
    assert metrics["test"] == pytest.approx(ref["test"], abs=1e-6)
    assert metrics["valid"] == pytest.approx(ref["valid"], abs=1e-6)


@pytest.mark.parametrize("signum", [signal.SIGTERM], ids=["SIGTERM"])
def test_a_stopped_driver_resumes_from_its_latest_checkpoint(cli, config_file, reference, signum):
    _, ref = reference
    args = ["train", "--config", str(config_file), "--set", "train.num_workers=2", "--set", "run.name=stopped"]
    run_dir = cli.cwd / "runs" / "stopped"
    proc = cli.popen(args)
    try:
        deadline = time.monotonic() + 300
        while not registered_checkpoints(run_dir):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "run the same command again to resume" in err
    assert not (run_dir / "metrics.json").exists(), "the run finished before it was stopped"
    assert cli.leftover() == [], "processes of the stopped run are still alive"

    again = cli.run(args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from" in again.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == ref["steps"] and metrics["epochs_run"] == ref["epochs_run"]
    assert metrics["test"] == pytest.approx(ref["test"], abs=1e-6)


def test_a_worker_that_raises_shows_its_exception_and_traceback(cli, config_file):
    # a tracking store only rank 0 opens (data.max_len above model.max_len, used here before, is
    # now refused with the config, before Ray starts: tests/cli/test_bad_input_runs.py)
    done = cli.run([
        "train", "--config", str(config_file), "--set", "train.num_workers=2", "--set", "run.name=raises",
        "--set", "tracking.enabled=true", "--set", "tracking.tracking_uri=nosuchscheme://nowhere",
        "--set", "run.max_failures=0",
    ])
    assert done.returncode == 1  # the worker's error, printed by the CLI, not a driver traceback
    err = done.stderr
    assert "unsupported URI 'nosuchscheme://nowhere'" in err
    assert "training failed on worker rank" in err
    assert "Traceback" in err and "loop.py" in err and "train_per_worker" in err  # the worker's own frames
