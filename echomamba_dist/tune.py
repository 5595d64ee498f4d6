"""Hyperparameter search on Ray Tune: one TorchTrainer per trial, ASHA, Optuna, MLflow.

Ray 2.60 (Train V2) pattern: the Tuner runs `trial_driver`, a plain function that builds and fits
a `TorchTrainer` around the one training loop, so that each trial can itself use several workers
or GPUs. The driver reserves no CPU (it only waits on its trainer); the trainer's workers hold
the trial's resources, and the number of trials run side by side follows from the cluster's
resources and one trial's needs. Every epoch's validation metrics reach Tune through
`EpochReportCallback`, and ASHA stops weak trials early. Selection uses validation only; the best
trial's test metrics are computed once, at the end, from its best weights.

A study file is a training config (data, model, train, run, tracking) plus two sections:

    search:                       # dotted config key -> one distribution
      model.dropout: {uniform: [0.1, 0.5]}
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.combine: {choice: [sum, concat]}
    tune:                         # TuneConfig
      name: my-study
      num_samples: 16
      search_alg: optuna          # or random

Layout of `tune.storage_path/tune.name/` (the study directory):

    tuner/              Tune's experiment state: an interrupted study resumes from it
    trials/trial-<id>/  each trial's Ray Train run: `epoch_NNNNNN` checkpoints (meta.json holds
                        the per-epoch validation history, state.pt the best weights so far)
    results.parquet     one row per trial: status, epochs, best validation metric, parameters
    best.yaml           the best trial's full training config (`echomamba train --config` it)
    mlflow_parent_run_id

MLflow: one parent run for the study (its configuration, the best validation metric, the best
trial's test metrics, best.yaml and results.parquet as artifacts) and one child run per trial
(`mlflow.parentRunId` tag, its sampled parameters, per-epoch metrics with step = epoch, status
FINISHED or FAILED). The best trial's model is logged to the parent run and registered as a new
version of `tracking.registered_model` (default: the study name) with the alias `champion`
(`tracking.model_alias`), so that `models:/<study name>@champion` always names the winner.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from echomamba_dist.config import (
    ConfigError,
    ExperimentConfig,
    TrackingConfig,
    apply_overrides,
    experiment_from_dict,
    flatten,
    from_dict,
    read_yaml_mapping,
    to_dict,
)
from echomamba_dist.train.tracking import metric_key

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "quniform")
TIME_ATTR = "epochs_done"  # what ASHA counts: epochs finished (the loop's `epoch` + 1)
TUNER_DIR = "tuner"
TRIALS_DIR = "trials"
RESULTS_FILE = "results.parquet"
BEST_FILE = "best.yaml"
PARENT_RUN_FILE = "mlflow_parent_run_id"
TRIAL_ID_TAG = "echomamba.trial_id"
STUDY_TAG = "echomamba.study"
DRIVER_CPU = 0.001  # what a trial's driver function reserves
CHAMPION_ALIAS = "champion"  # the registry alias of the study's best model


@dataclass(kw_only=True)
class TuneConfig:
    """How the study runs (the `tune` section of a study file)."""

    name: str = "echomamba-study"  # study name: its directory and its MLflow parent run
    storage_path: str = "runs/tune"  # parent of the study directory (shared storage on a cluster)
    num_samples: int = 8  # trials in the study
    search_alg: Literal["optuna", "random"] = "optuna"  # Optuna's TPE, or random search
    max_concurrent: int | None = None  # trials side by side; None: what the cluster's CPUs/GPUs fit
    grace_period: int = 1  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 2  # ASHA: keep the best 1/reduction_factor of trials at each rung
    experiment: str | None = None  # MLflow experiment; None: tracking.experiment
    seed: int = 0  # seed of the search algorithm

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"name: expected a plain directory name, got {self.name!r}")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples: must be >= 1, got {self.num_samples}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"max_concurrent: must be >= 1 or null, got {self.max_concurrent}")
        if self.grace_period < 1:
            raise ConfigError(f"grace_period: must be >= 1, got {self.grace_period}")
        if self.reduction_factor < 2:
            raise ConfigError(f"reduction_factor: must be >= 2, got {self.reduction_factor}")


@dataclass
class Study:
    """A parsed study file: the base training config, the search space and how to run."""

    base: dict[str, Any]  # the training config as a nested dict (validated)
    search: dict[str, dict[str, list]]  # dotted key -> {distribution: args}
    tune: TuneConfig = field(default_factory=TuneConfig)

    @property
    def study_dir(self) -> Path:
        return Path(self.tune.storage_path).expanduser().resolve() / self.tune.name

    @property
    def base_config(self) -> ExperimentConfig:
        return experiment_from_dict(self.base)


# ----------------------------------------------------------------------------------------------
# The study file


def load_study(path: str | os.PathLike, overrides: list[str] | None = None) -> Study:
    """Read and validate a study file; every value a distribution can give must make a valid config.

    Args:
        path: the YAML study file.
        overrides: `key=value` strings applied to the file first (`tune.num_samples=4`,
            `train.epochs=3`, `search.train.lr={loguniform: [1.0e-4, 1.0e-3]}` ...).
    Returns:
        The Study.
    Raises:
        ConfigError: naming the file and the key that is wrong.
    """
    p = Path(path)
    data = read_yaml_mapping(p, what="study file")
    try:
        data = _apply_search_overrides(data, overrides or [])
        search = data.pop("search", None)
        tune_cfg = from_dict(TuneConfig, data.pop("tune", None) or {}, prefix="tune")
        if not isinstance(search, dict) or not search:
            raise ConfigError("search: expected a mapping of dotted config keys to distributions")
        experiment_from_dict(data)
        for key, spec in search.items():
            kind, args = _parse_distribution(key, spec)
            for value in _probe_values(kind, args):
                try:
                    experiment_from_dict(with_params(data, {key: value}))
                except ConfigError as exc:
                    raise ConfigError(f"search.{key}: value {value!r} gives an invalid config: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return Study(base=data, search=search, tune=tune_cfg)


def _apply_search_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`apply_overrides`, except that `search.<dotted key>=...` replaces one search entry whole
    (its key contains dots that are not sections)."""
    search_items, rest = [], []
    for item in overrides:
        (search_items if item.startswith("search.") else rest).append(item)
    data = apply_overrides(data, rest)
    for item in search_items:
        key, _, raw = item.partition("=")
        if not raw.strip():
            raise ConfigError(f"override {item!r}: expected search.KEY={{distribution: [...]}}")
        data.setdefault("search", {})
        if not isinstance(data["search"], dict):
            raise ConfigError("search: expected a mapping")
        data["search"][key[len("search."):].strip()] = yaml.safe_load(raw)
    return data


def _parse_distribution(key: str, spec: Any) -> tuple[str, list]:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"search.{key}: expected one of {{{', '.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"search.{key}.{kind}: expected a list, got {args!r}")
    if kind != "choice":
        want = 3 if kind == "quniform" else 2
        if len(args) != want or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            shape = "[low, high, q]" if kind == "quniform" else "[low, high]"
            raise ConfigError(f"search.{key}.{kind}: expected {shape} numbers, got {args!r}")
        if not args[0] < args[1]:
            raise ConfigError(f"search.{key}.{kind}: low must be below high, got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"search.{key}.loguniform: bounds must be > 0, got {args!r}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"search.{key}.randint: expected integer [low, high), got {args!r}")
    return kind, args


def _probe_values(kind: str, args: list) -> list:
    """The values checked against the config: every choice, or both ends of a range."""
    if kind == "choice":
        return args
    if kind == "randint":
        return [args[0], args[1] - 1]  # the upper bound is exclusive
    return [args[0], args[1]]


def search_space(study: Study) -> dict[str, Any]:
    """The Ray Tune search space: flat dotted keys -> Tune distributions."""
    from ray import tune

    space = {}
    for key, spec in study.search.items():
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            space[key] = tune.choice(args)
        elif kind == "uniform":
            space[key] = tune.uniform(*args)
        elif kind == "loguniform":
            space[key] = tune.loguniform(*args)
        elif kind == "randint":
            space[key] = tune.randint(*args)
        else:
            space[key] = tune.quniform(*args)
    return space


def with_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the nested config `base` with dotted `params` set (values kept as they are, so
    that e.g. 1e-05 stays a float instead of passing through a YAML string)."""
    out = apply_overrides(base, [])  # a deep copy
    for key, value in params.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"search.{key}: {part} is not a section")
            node = child
        node[parts[-1]] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    """NumPy scalars (which samplers may return) -> Python scalars."""
    import numpy as np

    return value.item() if isinstance(value, np.generic) else value


def sampled_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled parameters (its Tune config) as plain Python values."""
    return {k: _plain(v) for k, v in config.items()}


def trial_config(
    base: dict[str, Any], params: dict[str, Any], *, name: str, storage_path: str, fail: bool = False
) -> dict[str, Any]:
    """A full training config for one trial: base + sampled params, run in its own directory,
    validation only (no test split, no MLflow run of its own: the Tuner's callback logs it).

    `fail` (tests only) makes the trial's worker kill itself at its first step, with no retry.
    """
    data = with_params(base, params)
    fixed: dict[str, Any] = {
        "run.name": name, "run.storage_path": storage_path, "run.resume": True,
        "run.keep_checkpoints": 1,  # the best; Ray also keeps the latest, to resume from
        "train.final_test": False, "train.progress": False, "tracking.enabled": False,
    }
    if fail:
        fixed.update({"train.fail_at_step": 0, "run.max_failures": 0})
    cfg = experiment_from_dict(with_params(data, fixed))
    if cfg.train.cpus_per_worker is None:
        cfg.train.cpus_per_worker = 1.0
    return to_dict(cfg)


# ----------------------------------------------------------------------------------------------
# One trial (runs in a Tune trial actor)


def _epoch_report_callback():
    """A `TuneReportCallback` that adds `epochs_done` and skips the loop's closing report."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0])
            if first.get("done") or "epoch" not in first:
                return  # the loop's closing report (after its last epoch) carries no validation
            first[TIME_ATTR] = int(first["epoch"]) + 1
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EpochReportCallback()


def trial_driver(
    config: dict[str, Any], *, base: dict[str, Any], trials_dir: str, fail_on: dict[str, Any] | None = None
) -> None:
    """One trial: build and fit a TorchTrainer on base + the trial's sampled parameters.

    Args:
        config: the sampled parameters (dotted keys), from Tune.
        base: the study's base training config; trials_dir: where trials' runs live
            (both bound with `tune.with_parameters`).
        fail_on: tests only: a trial whose parameters match this dict fails.

    A trial restarted after an interruption resumes its trainer from its latest checkpoint
    (same run name and storage path).

    Raises:
        WorkerError: with the failing worker's error when training fails.
    """
    import ray.data
    import ray.tune

    from echomamba_dist.errors import WorkerError
    from echomamba_dist.ray_train import build_trainer, resolve_for_workers, worker_error_message

    ray.data.DataContext.get_current().enable_progress_bars = False
    params = sampled_params(config)
    fail_on = fail_on or {}
    cfg_dict = trial_config(
        base, params, name=trial_run_name(ray.tune.get_context().get_trial_id()), storage_path=trials_dir,
        fail=bool(fail_on) and all(params.get(k) == v for k, v in fail_on.items()),
    )
    cfg = resolve_for_workers(experiment_from_dict(cfg_dict), local=not os.environ.get("RAY_ADDRESS"))
    trainer = build_trainer(cfg)
    report = _epoch_report_callback()
    # Ray Train reads its callbacks when it fits: every epoch's report goes on to Tune
    trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), report]
    try:
        trainer.fit()
    except Exception as exc:
        raise WorkerError(worker_error_message(exc)) from exc
    _wait_until_forwarded(report)


def _wait_until_forwarded(report, *, timeout: float = 120.0) -> None:
    """Return once Tune has taken the last epoch's report from the callback's queue.

    Ray 2.60 passes Train's reports to Tune through a one-slot queue that Tune reads only while
    this function runs: a report still queued when it returns is lost (the trial would end
    without its last epoch, in ASHA, Optuna and MLflow alike).
    """
    import time

    queue = getattr(report, "_training_actor_item_queue", None)
    if queue is None:
        return
    deadline = time.monotonic() + timeout
    while not queue.empty() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # Tune files the report it just took before it sees this function end


def trial_run_name(trial_id: str) -> str:
    """The Ray Train run (directory) name of a trial."""
    return f"trial-{trial_id}"


def _trial_dirname(trial) -> str:
    """Tune's own directory for a trial (short, unlike the default that lists the parameters)."""
    return trial_run_name(trial.trial_id)


# ----------------------------------------------------------------------------------------------
# MLflow


@functools.cache
def _mlflow_callback_class():
    """The Tuner's MLflow callback class (defined on first use: Ray and MLflow import slowly)."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.result import AUTO_RESULT_KEYS

    skip = set(AUTO_RESULT_KEYS) | {TIME_ATTR, "epoch", "done", "trial_id", "checkpoint_path",
                                    "experiment_tag", "checkpoint_dir_name", "should_checkpoint"}

    class StudyMLflowCallback(MLflowLoggerCallback):
        """MLflowLoggerCallback for a study: child runs under the parent, one per trial.

        Logs only what matters (the sampled parameters; the loop's metrics with step = epoch),
        and finds a trial's child run again after the study is resumed instead of opening a
        second one.
        """

        def __init__(self, *, tracking_uri: str, experiment_name: str, parent_run_id: str, study: str):
            super().__init__(
                tracking_uri=tracking_uri, experiment_name=experiment_name,
                tags={"mlflow.parentRunId": parent_run_id, STUDY_TAG: study},
            )
            self.parent_run_id = parent_run_id

        def log_trial_start(self, trial) -> None:
            from mlflow.tracking import MlflowClient

            if trial in self._trial_runs:
                return
            client = MlflowClient(tracking_uri=self.tracking_uri)
            found = client.search_runs(
                [self._experiment_id(client)],
                filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' "
                f"and tags.`{TRIAL_ID_TAG}` = '{trial.trial_id}'",
                max_results=1,
            )
            if found:
                run_id = found[0].info.run_id
                client.update_run(run_id, status="RUNNING")
            else:
                run = client.create_run(
                    self._experiment_id(client), run_name=trial_run_name(trial.trial_id),
                    tags={**self.tags, TRIAL_ID_TAG: trial.trial_id},
                )
                run_id = run.info.run_id
                from mlflow.entities import Param

                params = sampled_params(trial.config)
                client.log_batch(run_id, params=[Param(k, _param_text(v)) for k, v in sorted(params.items())])
            self._trial_runs[trial] = run_id

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            if trial not in self._trial_runs:
                self.log_trial_start(trial)
            step = int(result.get("epoch", iteration))
            now = int(result.get("timestamp", 0) * 1000)
            metrics = [
                Metric(k, float(v), now, step) for k, v in result.items()
                if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ]
            MlflowClient(tracking_uri=self.tracking_uri).log_batch(self._trial_runs[trial], metrics=metrics)

        def log_trial_end(self, trial, failed: bool = False) -> None:
            from mlflow.tracking import MlflowClient

            if trial not in self._trial_runs:
                self.log_trial_start(trial)
            run_id = self._trial_runs.pop(trial)
            client = MlflowClient(tracking_uri=self.tracking_uri)
            if failed:
                client.set_tag(run_id, "echomamba.error", _error_summary(_read_text(trial.error_file)))
            client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

        def _experiment_id(self, client) -> str:
            return client.get_experiment_by_name(self.experiment_name).experiment_id

    return StudyMLflowCallback


def _param_text(value: Any) -> str:
    """An MLflow parameter value: strings as they are, everything else as JSON (null, true, 0.5)."""
    return value if isinstance(value, str) else json.dumps(value)


def _read_text(path: str | None) -> str:
    try:
        return Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return ""


def _error_summary(text: str) -> str:
    """The line of a trial's error that says what failed (`worker_error_message`'s first line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = next((ln for ln in lines if "training failed" in ln), lines[-1] if lines else "the trial failed")
    return line[:500]


def _parent_run(study: Study, tracking: TrackingConfig) -> str:
    """Create the study's MLflow parent run, or reopen it when the study resumes; return its id."""
    from mlflow.entities import Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from echomamba_dist.train.tracking import git_commit, use_experiment

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
        **{f"tune.{k}": _param_text(v) for k, v in to_dict(study.tune).items()},
        **{k: _param_text(v) for k, v in flatten(to_dict(study.base_config)).items()},
    }
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in sorted(params.items())],
                     tags=[RunTag("mlflow.note.content", f"Ray Tune study {study.tune.name}: {study.study_dir}")])
    tmp = id_file.with_name(f".{PARENT_RUN_FILE}.tmp")
    tmp.write_text(run.info.run_id)
    os.replace(tmp, id_file)
    return run.info.run_id


# ----------------------------------------------------------------------------------------------
# The study (runs on the driver)


def trial_concurrency(cfg: ExperimentConfig, resources: dict[str, float]) -> int:
    """How many trials fit side by side in `resources` (e.g. `ray.cluster_resources()`), leaving
    one CPU to the Ray Data tasks that build each trial's training set."""
    workers = cfg.train.num_workers
    cpus = workers * (cfg.train.cpus_per_worker or 1.0)
    fit = int((resources.get("CPU", 0) - 1) // cpus)
    if cfg.train.use_gpu:
        fit = min(fit, int(resources.get("GPU", 0) // workers))
    return max(1, fit)


def run_study(
    path: str | os.PathLike, overrides: list[str] | None = None, *, fail_on: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run a study, or resume it when its directory holds an interrupted one; then summarise.

    Args:
        path: the study file.
        overrides: `key=value` overrides applied to the study file.
        fail_on: tests only: trials whose sampled parameters match this dict fail.
    Returns:
        The summary from `summarize`.
    Raises:
        ConfigError: the study file is invalid.
        RuntimeError: every trial failed.
        KeyboardInterrupt: the study was interrupted (Ctrl-C); the same command resumes it.
    """
    study = load_study(path, overrides)
    base_cfg = study.base_config
    if base_cfg.data.path:  # trials run in their own working directories
        study.base = with_params(study.base, {"data.path": str(Path(base_cfg.data.path).expanduser().resolve())})
    metric = metric_key(f"val_{base_cfg.train.metric}")
    study_dir = study.study_dir
    study_dir.mkdir(parents=True, exist_ok=True)
    tracking = TrackingConfig(
        enabled=True, tracking_uri=base_cfg.tracking.resolved_uri(),
        experiment=study.tune.experiment or base_cfg.tracking.experiment,
        log_model=base_cfg.tracking.log_model, register=base_cfg.tracking.register,
        registered_model=base_cfg.tracking.registered_model or study.tune.name,
        model_alias=base_cfg.tracking.model_alias or CHAMPION_ALIAS,
    )
    parent_id = _parent_run(study, tracking)

    previous_tmpdir = os.environ.get("RAY_TMPDIR")
    try:
        _init_ray()
        return _run_tuner(study, fail_on=fail_on, parent_id=parent_id, tracking=tracking, metric=metric)
    finally:  # Ray's processes keep the temp dir they were started with
        if previous_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous_tmpdir


def _run_tuner(study: Study, *, fail_on: dict[str, Any] | None, parent_id: str, tracking: TrackingConfig,
               metric: str) -> dict[str, Any]:
    """Build (or restore) the Tuner, fit it, and summarise the study."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    base_cfg = study.base_config
    study_dir = study.study_dir
    concurrency = study.tune.max_concurrent or trial_concurrency(base_cfg, ray.cluster_resources())
    # The driver only waits on its trainer, whose workers hold the trial's resources; Ray wants
    # some resource in a trial's request, so it asks for a token CPU share.
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, base=study.base, trials_dir=str(study_dir / TRIALS_DIR), fail_on=fail_on),
        {"CPU": DRIVER_CPU},
    )
    param_space = search_space(study)
    tuner_path = study_dir / TUNER_DIR
    if tune.Tuner.can_restore(str(tuner_path)):
        print(f"resuming the study in {study_dir}", flush=True)
        tuner = tune.Tuner.restore(str(tuner_path), trainable=trainable, param_space=param_space)
    else:
        if study.tune.search_alg == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(seed=study.tune.seed)
        else:
            from ray.tune.search import BasicVariantGenerator

            search_alg = BasicVariantGenerator(random_state=study.tune.seed)
        callback = _mlflow_callback_class()(
            tracking_uri=tracking.resolved_uri(), experiment_name=tracking.experiment,
            parent_run_id=parent_id, study=study.tune.name,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric,
                mode="max",
                num_samples=study.tune.num_samples,
                search_alg=search_alg,
                max_concurrent_trials=concurrency,
                scheduler=ASHAScheduler(
                    time_attr=TIME_ATTR, max_t=base_cfg.train.epochs, grace_period=study.tune.grace_period,
                    reduction_factor=study.tune.reduction_factor,
                ),
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(name=TUNER_DIR, storage_path=str(study_dir), callbacks=[callback]),
        )
    print(f"study {study.tune.name}: {study.tune.num_samples} trials, {concurrency} at a time, "
          f"{study.tune.search_alg} search, ASHA on {metric}; MLflow parent run {parent_id}", flush=True)
    try:
        results = tuner.fit()
        if results.num_terminated + results.num_errors < study.tune.num_samples:
            # Tune stops on Ctrl-C after saving its state, and returns what it has
            raise KeyboardInterrupt(f"study {study.tune.name} interrupted")
    except BaseException:
        _end_parent(tracking, parent_id, "KILLED")
        raise
    return summarize(study, results, metric=metric, parent_id=parent_id, tracking=tracking)


def _init_ray() -> None:
    """Connect to `RAY_ADDRESS`, or start a local Ray that Ray Train can clean up after.

    When ASHA stops a trial, the trial's Train controller dies with it, and Ray Train's
    placement-group cleaner releases the trial's workers (their CPUs) only once Ray's State API
    says the controller is dead. That API needs the dashboard, and it finds the cluster by its
    temp dir's `ray_current_cluster` file, else by looking for a single Ray on the machine. So a
    local Ray gets its dashboard (on a free port) and a temp dir of its own that names it; without
    them, trials stopped early would keep their CPUs and later trials would wait forever.
    """
    import socket
    import tempfile

    import ray

    from echomamba_dist.ray_train import init_ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        init_ray()
        return
    with socket.socket() as sock:  # other local Rays may hold the default port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # short: Ray's socket paths are length-limited; inherited by every Ray process started here
    temp_root = tempfile.mkdtemp(prefix="ray-tune-", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
    os.environ["RAY_TMPDIR"] = temp_root
    ray.init(
        num_cpus=(os.cpu_count() or 1) + 1,  # one spare logical CPU for Ray Data
        include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
        log_to_driver=True, configure_logging=False,
    )
    address_file = Path(temp_root) / "ray" / "ray_current_cluster"
    address_file.parent.mkdir(parents=True, exist_ok=True)
    address_file.write_text(ray.get_runtime_context().gcs_address)


def _end_parent(tracking: TrackingConfig, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=tracking.resolved_uri()).set_terminated(run_id, status=status)
    except Exception:  # never hide the error that got us here
        pass


# ----------------------------------------------------------------------------------------------
# Results


def trial_history(run_dir: Path) -> dict[str, Any] | None:
    """What a trial's latest checkpoint knows: epochs run, best epoch and metric, history.

    The checkpoint (not Tune's result log) is the record, so that a trial restarted by a resumed
    study is summarised over all of its epochs. None when the trial wrote no checkpoint.
    """
    from echomamba_dist.train.checkpoint import latest_checkpoint, read_meta

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    meta = read_meta(ckpt)
    return {"checkpoint": ckpt, "epochs": int(meta["epoch"]), "best_epoch": int(meta["best_epoch"]),
            "best": float(meta["best_metric"]), "history": meta.get("history", [])}


def results_rows(study: Study, results, *, metric: str) -> list[dict[str, Any]]:
    """One row per trial of a Tune ResultGrid (see `summarize`), best first."""
    from echomamba_dist.train.loop import METRICS_FILE

    epochs_max = study.base_config.train.epochs
    rows = []
    for r in results:
        trial_id = Path(r.path).name.removeprefix("trial-")
        run_dir = study.study_dir / TRIALS_DIR / trial_run_name(trial_id)
        hist = trial_history(run_dir)
        finished = (run_dir / METRICS_FILE).is_file()  # the loop ran to its end (or its patience)
        if r.error:
            status = "ERROR"
        elif hist is None:
            status = "NO_RESULT"
        elif finished or hist["epochs"] >= epochs_max:
            status = "COMPLETED"
        else:
            status = "STOPPED_EARLY"  # by ASHA
        rows.append({
            "trial_id": trial_id,
            "status": status,
            "epochs": hist["epochs"] if hist else 0,
            "best_epoch": hist["best_epoch"] if hist else -1,
            metric: hist["best"] if hist else float("nan"),
            **{f"param.{k}": v for k, v in _trial_params(r).items()},
            "error": _error_summary(str(r.error)) if r.error else "",
            "run_dir": str(run_dir),
        })
    rows.sort(key=lambda row: (-row[metric] if row[metric] == row[metric] else math.inf, row["trial_id"]))
    return rows


def _trial_params(result) -> dict[str, Any]:
    """A trial's sampled parameters; from its params.json when Tune restored it without them
    (a trial that had failed before the study was resumed)."""
    if result.config:
        return sampled_params(result.config)
    path = Path(result.path) / "params.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_results(rows: list[dict[str, Any]], path: Path) -> None:
    """The rows as a Parquet file, written atomically; a parameter column whose values mix types
    is stored as JSON text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {}
    for name in dict.fromkeys(k for row in rows for k in row):
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = pa.array([json.dumps(v) for v in values])
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, path)


def format_results(rows: list[dict[str, Any]], *, metric: str) -> str:
    """The results table as text, best trial first."""
    params = [k for k in dict.fromkeys(k for row in rows for k in row) if k.startswith("param.")]
    head = ["trial", "status", "epochs", metric] + [p.rsplit(".", 1)[-1] for p in params]
    body = []
    for row in rows:
        cells = [row["trial_id"], row["status"], str(row["epochs"]), f"{row[metric]:.4f}"]
        for p in params:
            v = row.get(p)
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [head, *body]]
    return "\n".join(lines)


def summarize(study: Study, results, *, metric: str, parent_id: str, tracking: TrackingConfig) -> dict[str, Any]:
    """Write results.parquet and best.yaml, test the best trial once, log them to the parent run.

    The best trial is the one with the highest validation metric at any of its epochs; best.yaml
    is the base config with its parameters, to be trained in full by `echomamba train`.

    Returns:
        {"best_trial", "best_config", "results", "test", "rows", "parent_run_id"}.
    Raises:
        RuntimeError: no trial produced a validation metric.
    """
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    study_dir = study.study_dir
    rows = results_rows(study, results, metric=metric)
    results_path = study_dir / RESULTS_FILE
    write_results(rows, results_path)
    print(format_results(rows, metric=metric))

    ok = [row for row in rows if row["status"] != "ERROR" and row[metric] == row[metric]]
    if not ok:
        _end_parent(tracking, parent_id, "FAILED")
        raise RuntimeError(f"study {study.tune.name}: no trial produced a validation metric; see {results_path}")
    best_row = ok[0]
    params = {k[len("param."):]: v for k, v in best_row.items() if k.startswith("param.")}
    best = experiment_from_dict(with_params(study.base, params))
    best.run.name = f"{study.tune.name}-best"
    best_path = study_dir / BEST_FILE
    _write_best(best, best_path, study=study, row=best_row, metric=metric)

    test = best_trial_test_metrics(Path(best_row["run_dir"]))
    client = MlflowClient(tracking_uri=tracking.resolved_uri())
    _complete_child_histories(client, parent_id, rows, metric=metric)
    now = _now_ms()
    client.log_batch(
        parent_id,
        metrics=[Metric(f"best_{metric}", best_row[metric], now, 0)]
        + [Metric(metric_key(f"best_test_{k}"), float(v), now, 0) for k, v in test.items()],
        tags=[RunTag("echomamba.best_trial", best_row["trial_id"]),
              RunTag("echomamba.trials", json.dumps({s: sum(r["status"] == s for r in rows) for s in
                                                      ("COMPLETED", "STOPPED_EARLY", "ERROR", "NO_RESULT")}))],
    )
    client.log_artifact(parent_id, str(best_path))
    client.log_artifact(parent_id, str(results_path))
    registered = register_best_model(Path(best_row["run_dir"]), tracking=tracking, parent_id=parent_id,
                                     tags={STUDY_TAG: study.tune.name, TRIAL_ID_TAG: best_row["trial_id"]})
    client.set_terminated(parent_id, status="FINISHED")

    counts = {s: sum(r["status"] == s for r in rows) for s in ("COMPLETED", "STOPPED_EARLY", "ERROR")}
    print(f"\n{len(rows)} trials: {counts['COMPLETED']} completed, {counts['STOPPED_EARLY']} stopped early by ASHA, "
          f"{counts['ERROR']} failed")
    print(f"best trial {best_row['trial_id']}: {metric} {best_row[metric]:.4f} (epoch {best_row['best_epoch']}); "
          f"its test metrics: " + "  ".join(f"{k} {v:.4f}" for k, v in test.items()))
    print(f"best config: {best_path}  (echomamba train --config {best_path})\nresults: {results_path}")
    if registered is not None:
        print(f"best model: {registered.uri} (version {registered.version}); serve it with "
              f"mlflow models serve -m {registered.uri} --env-manager local")
    return {"best_trial": best_row["trial_id"], "best_config": str(best_path), "results": str(results_path),
            "test": test, "rows": rows, "parent_run_id": parent_id,
            "registered_model": None if registered is None else {"name": registered.name, "version": registered.version,
                                                                 "alias": registered.alias}}


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
    import mlflow

    from echomamba_dist.data.dataset import load_dataset
    from echomamba_dist.inference import load_model
    from echomamba_dist.mlflow_model import log_model, register

    loaded = load_model(run_dir)  # the latest checkpoint carries the best weights so far
    item_ids = [str(x) for x in load_dataset(loaded.config.data).item_ids]
    mlflow.set_tracking_uri(tracking.resolved_uri())
    with mlflow.start_run(run_id=parent_id):
        info = log_model(loaded.checkpoint_dir, item_ids)
    return register(info.model_uri, tracking.registered_model, alias=tracking.model_alias, tags=tags)


def _complete_child_histories(client, parent_id: str, rows: list[dict[str, Any]], *, metric: str) -> None:
    """Log to each trial's child run the epochs that its checkpoint holds but Tune never saw.

    A trial that ASHA stops has usually trained on while Tune decided, and a trial restarted by
    a resumed study may have trained epochs whose reports were lost with the old driver.
    """
    from mlflow.entities import Metric

    runs = {}
    for run in client.search_runs(
        [client.get_run(parent_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"
    ):
        runs.setdefault(run.data.tags.get(TRIAL_ID_TAG), run.info.run_id)
    now = _now_ms()
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


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _write_best(cfg: ExperimentConfig, path: Path, *, study: Study, row: dict[str, Any], metric: str) -> None:
    """best.yaml: the full training config, with a header saying where it comes from."""
    header = (
        f"# Best configuration of study {study.tune.name} ({study.study_dir}):\n"
        f"# trial {row['trial_id']}, {metric} {row[metric]:.4f} at epoch {row['best_epoch']}.\n"
        f"# Train it in full: echomamba train --config {path.name}\n"
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def best_trial_test_metrics(run_dir: Path) -> dict[str, float]:
    """Score a trial's best weights on the test split: the only use of the test split in a study.

    Raises:
        CheckpointError: the trial has no checkpoint.
    """
    import torch

    from echomamba_dist.inference import load_model
    from echomamba_dist.train.evaluate import evaluate_model
    from echomamba_dist.train.loop import build_training_data

    loaded = load_model(run_dir)  # the latest checkpoint carries the best weights so far
    cfg = loaded.config
    data = build_training_data(cfg, cfg.sample_mode, with_samples=False)  # the test split only
    metrics = evaluate_model(loaded.model, data.test, ks=cfg.train.ks, batch_size=cfg.train.eval_batch_size,
                             device=torch.device("cpu"), exclude_history=cfg.train.exclude_history)
    return {k: float(v) for k, v in metrics.items() if k != "count"}
