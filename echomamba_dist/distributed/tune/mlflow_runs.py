"""MLflow for a study: the parent run, one child run per trial (the Tuner's callback), the
epochs a trial's checkpoint holds but Tune never saw, and the winner's registration as `champion`."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS

from echomamba_dist.config import TrackingConfig, flatten, to_dict
from echomamba_dist.data.dataset import load_dataset
from echomamba_dist.distributed.tune.study import (
    PARENT_RUN_FILE,
    STUDY_TAG,
    TIME_ATTR,
    TRIAL_ID_TAG,
    Study,
    sampled_params,
    trial_history,
    trial_run_name,
)
from echomamba_dist.io import write_text_atomic
from echomamba_dist.serve.load import load_model
from echomamba_dist.serve.pyfunc import log_model, register
from echomamba_dist.train.tracking import git_commit, metric_key, use_experiment

# Tune's bookkeeping keys: not metrics of the model
SKIP_RESULT_KEYS = set(AUTO_RESULT_KEYS) | {TIME_ATTR, "epoch", "done", "trial_id", "checkpoint_path", "experiment_tag",
                                          "checkpoint_dir_name", "should_checkpoint"}


ERROR_TAG = "echomamba.error"  # a failed trial's child run: the first line of its error


class StudyMLflowCallback(MLflowLoggerCallback):
    """The Tuner's MLflow callback: child runs under the study's parent run, one per trial.

    Logs only what matters (the sampled parameters; the loop's metrics with step = epoch), and
    finds a trial's child run again after the study is resumed instead of opening a second one.
    It keeps its own map of trials to runs; of its base class it uses the experiment setup only.
    """

    def __init__(self, *, tracking_uri: str, experiment_name: str, parent_run_id: str, study: str):
        super().__init__(
            tracking_uri=tracking_uri, experiment_name=experiment_name,
            tags={"mlflow.parentRunId": parent_run_id, STUDY_TAG: study},
        )
        self.parent_run_id = parent_run_id
        self.trial_runs: dict[Any, str] = {}

    def log_trial_start(self, trial) -> None:
        if trial in self.trial_runs:
            return
        client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment_id = client.get_experiment_by_name(self.experiment_name).experiment_id
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and tags.`{TRIAL_ID_TAG}` = '{trial.trial_id}'",
            max_results=1,
        )
        if found:  # a trial resumed with its study, or a failed trial run again (`--retry-failed`)
            run_id = found[0].info.run_id
            if ERROR_TAG in found[0].data.tags:
                client.delete_tag(run_id, ERROR_TAG)
            client.update_run(run_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, run_name=trial_run_name(trial.trial_id),
                                    tags={**self.tags, TRIAL_ID_TAG: trial.trial_id})
            run_id = run.info.run_id
            params = sampled_params(trial.config)
            client.log_batch(run_id, params=[Param(k, param_text(v)) for k, v in sorted(params.items())])
        self.trial_runs[trial] = run_id

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if trial not in self.trial_runs:
            self.log_trial_start(trial)
        step = int(result.get("epoch", iteration))
        now = int(result.get("timestamp", 0) * 1000)
        metrics = [
            Metric(k, float(v), now, step) for k, v in result.items()
            if k not in SKIP_RESULT_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        MlflowClient(tracking_uri=self.tracking_uri).log_batch(self.trial_runs[trial], metrics=metrics)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        if trial not in self.trial_runs:
            self.log_trial_start(trial)
        run_id = self.trial_runs.pop(trial)
        client = MlflowClient(tracking_uri=self.tracking_uri)
        if failed:
            client.set_tag(run_id, ERROR_TAG, error_summary(read_text_or_empty(trial.error_file)))
        client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def param_text(value: Any) -> str:
    """An MLflow parameter value: strings as they are, everything else as JSON (null, true, 0.5)."""
    return value if isinstance(value, str) else json.dumps(value)


def read_text_or_empty(path: str | None) -> str:
    """A file's text; '' when there is no path or it cannot be read."""
    try:
        return Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return ""


def error_summary(text: str) -> str:
    """The line of a trial's error that says what failed (`worker_error_message`'s first line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = next((ln for ln in lines if "training failed" in ln), lines[-1] if lines else "the trial failed")
    return line[:500]


def parent_run(study: Study, tracking: TrackingConfig) -> str:
    """Create the study's MLflow parent run, or reopen it when the study resumes; return its id."""
    experiment = use_experiment(tracking)
    client = MlflowClient(tracking_uri=tracking.resolved_uri())
    id_file = study.study_dir / PARENT_RUN_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        try:
            client.update_run(run_id, status="RUNNING")
            return run_id
        except MlflowException:
            pass  # deleted, or another store: start a new parent
    run = client.create_run(experiment.experiment_id, run_name=study.tune.name,
                            tags={STUDY_TAG: study.tune.name, "git.commit": git_commit()})
    params = {
        **{f"search.{k}": json.dumps(v) for k, v in study.search.items()},
        **{f"tune.{k}": param_text(v) for k, v in to_dict(study.tune).items()},
        **{k: param_text(v) for k, v in flatten(to_dict(study.base_config)).items()},
    }
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in sorted(params.items())],
                     tags=[RunTag("mlflow.note.content", f"Ray Tune study {study.tune.name}: {study.study_dir}")])
    write_text_atomic(id_file, run.info.run_id)
    return run.info.run_id


def end_parent(tracking: TrackingConfig, run_id: str, status: str) -> None:
    try:
        MlflowClient(tracking_uri=tracking.resolved_uri()).set_terminated(run_id, status=status)
    except Exception:  # never hide the error that got us here
        pass


def complete_child_histories(client, parent_id: str, rows: list[dict[str, Any]], *, metric: str) -> None:
    """Log to each trial's child run the epochs that its checkpoint holds but Tune never saw.

    A trial that ASHA stops has usually trained on while Tune decided, and a trial restarted by
    a resumed study may have trained epochs whose reports were lost with the old driver.
    """
    runs = {}
    for run in client.search_runs(
        [client.get_run(parent_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"
    ):
        runs.setdefault(run.data.tags.get(TRIAL_ID_TAG), run.info.run_id)
    now = now_ms()
    for row in rows:
        run_id = runs.get(row["trial_id"])
        hist = trial_history(Path(row["run_dir"]))
        if run_id is None or hist is None:
            continue
        seen = {m.step for m in client.get_metric_history(run_id, metric)}
        missing = [
            Metric(metric_key(k), float(v), now, int(record["epoch"]))
            for record in hist["history"] if int(record["epoch"]) not in seen
            for k, v in record.items() if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v)
        ]
        for start in range(0, len(missing), 1000):  # MLflow takes at most 1000 metrics a batch
            client.log_batch(run_id, metrics=missing[start:start + 1000])


def now_ms() -> int:
    return int(time.time() * 1000)


def register_best_model(run_dir: Path, *, tracking: TrackingConfig, parent_id: str, tags: dict[str, str]):
    """Log the best trial's best weights as a pyfunc model into the study's parent run, register
    them as a new version of `tracking.registered_model` and move `tracking.model_alias` to it.

    Returns:
        The RegisteredVersion, or None when `tracking.log_model` or `tracking.register` is off.
    Raises:
        MlflowException: the store has no Model Registry (a study needs one to name its winner).
    """
    if not (tracking.log_model and tracking.register):
        return None
    loaded = load_model(run_dir)  # the latest checkpoint carries the best weights so far
    item_ids = [str(x) for x in load_dataset(loaded.config.data).item_ids]
    mlflow.set_tracking_uri(tracking.resolved_uri())
    with mlflow.start_run(run_id=parent_id):
        info = log_model(loaded.checkpoint_dir, item_ids)
    return register(info.model_uri, tracking.registered_model, alias=tracking.model_alias, tags=tags)
