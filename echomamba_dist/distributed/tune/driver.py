"""Running a study on Ray Tune: one trial is a plain function that builds and fits a
TorchTrainer (Train V2); ASHA stops weak trials; an interrupted study resumes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from echomamba_dist.config import ExperimentConfig, TrackingConfig, experiment_from_dict
from echomamba_dist.distributed import ray_compat
from echomamba_dist.distributed.runtime import init_ray
from echomamba_dist.distributed.trainer import (
    build_trainer,
    resolve_for_workers,
    worker_error_message,
)
from echomamba_dist.distributed.tune.mlflow_runs import (
    StudyMLflowCallback,
    end_parent,
    parent_run,
)
from echomamba_dist.distributed.tune.results import summarize
from echomamba_dist.distributed.tune.study import (
    CHAMPION_ALIAS,
    DRIVER_CPU,
    TIME_ATTR,
    TRIALS_DIR,
    TUNER_DIR,
    Study,
    load_study,
    sampled_params,
    search_space,
    trial_config,
    trial_run_name,
    with_params,
)
from echomamba_dist.errors import WorkerError
from echomamba_dist.train.tracking import metric_key


class EpochReportCallback(TuneReportCallback):
    """A `TuneReportCallback` that adds `epochs_done` (what ASHA counts) and skips the loop's
    closing report, which carries no validation."""

    def after_report(self, run_context, metrics, checkpoint):
        first = dict(metrics[0])
        if first.get("done") or "epoch" not in first:
            return
        first[TIME_ATTR] = int(first["epoch"]) + 1
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


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
    params = sampled_params(config)
    fail_on = fail_on or {}
    cfg_dict = trial_config(
        base, params, name=trial_run_name(tune.get_context().get_trial_id()), storage_path=trials_dir,
        fail=bool(fail_on) and all(params.get(k) == v for k, v in fail_on.items()),
    )
    cfg = resolve_for_workers(experiment_from_dict(cfg_dict), local=not os.environ.get("RAY_ADDRESS"))
    trainer = build_trainer(cfg)
    report = EpochReportCallback()
    # Ray Train reads its callbacks when it fits: every epoch's report goes on to Tune
    trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), report]
    try:
        trainer.fit()
    except Exception as exc:
        raise WorkerError(worker_error_message(exc)) from exc
    ray_compat.wait_until_reports_forwarded(report)


def _trial_dirname(trial) -> str:
    """Tune's own directory for a trial (short, unlike the default that lists the parameters)."""
    return trial_run_name(trial.trial_id)


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
    path: str | os.PathLike, overrides: list[str] | None = None, *, retry_failed: bool = False,
    fail_on: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run a study, or resume it when its directory holds an interrupted one; then summarise.

    Args:
        path: the study file.
        overrides: `key=value` overrides applied to the study file.
        retry_failed: when resuming, run the trials that failed again (Tune's `resume_errored`);
            each continues from its own last checkpoint, as an interrupted trial does. Without
            it a failed trial stays failed.
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
    parent_id = parent_run(study, tracking)

    init_ray()
    return _run_tuner(study, fail_on=fail_on, parent_id=parent_id, tracking=tracking, metric=metric,
                      retry_failed=retry_failed)


def _run_tuner(study: Study, *, fail_on: dict[str, Any] | None, parent_id: str, tracking: TrackingConfig,
               metric: str, retry_failed: bool) -> dict[str, Any]:
    """Build (or restore) the Tuner, fit it, and summarise the study."""
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
        print(f"resuming the study in {study_dir}" + (", failed trials again" if retry_failed else ""), flush=True)
        tuner = tune.Tuner.restore(str(tuner_path), trainable=trainable, param_space=param_space,
                                   resume_errored=retry_failed)
    else:
        if study.tune.search_alg == "optuna":
            search_alg = OptunaSearch(seed=study.tune.seed)
        else:
            search_alg = BasicVariantGenerator(random_state=study.tune.seed)
        callback = StudyMLflowCallback(
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
        end_parent(tracking, parent_id, "KILLED")
        raise
    return summarize(study, results, metric=metric, parent_id=parent_id, tracking=tracking)
