"""Hyperparameter search on Ray Tune: one TorchTrainer per trial, ASHA, Optuna, MLflow.

Ray 2.60 (Train V2) pattern: the Tuner runs `trial_driver`, a plain function that builds and fits
a `TorchTrainer` around the one training loop, so that each trial can itself use several workers
or GPUs. The trainer's `TuneReportCallback` forwards every epoch's validation metrics to Tune,
where ASHA stops weak trials early. Selection uses validation only; the best trial's test
metrics are computed once, at the end, from its best checkpoint.

A study file is a training config (data, model, train, run, tracking) plus two sections:

    search:                       # dotted config key -> distribution
      model.dropout: {uniform: [0.1, 0.5]}
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.combine: {choice: [sum, concat]}
    tune:
      num_samples: 8
      search_alg: optuna          # or random
      ...                         # see TuneConfig

Outputs in `tune.storage_path/tune.name/`: `best.yaml` (a full training config that
`echomamba train --config best.yaml` takes as it is), `results.parquet`, and Tune's state (an
interrupted study resumes with the same command). MLflow gets one parent run for the study and
one child run per trial.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from echomamba_dist.config import (
    ConfigError,
    apply_overrides,
    experiment_from_dict,
    from_dict,
    save_config,
    to_dict,
)
from echomamba_dist.train.tracking import metric_key

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "quniform")


@dataclass(kw_only=True)
class TuneConfig:
    """How the study runs."""

    name: str = "echomamba-study"  # study name: its directory and MLflow parent run
    storage_path: str = "runs/tune"  # where trials, checkpoints and results live
    num_samples: int = 8  # trials
    search_alg: Literal["optuna", "random"] = "optuna"  # Optuna's TPE, or random search
    max_concurrent: int | None = None  # None: as many as the cluster's CPUs/GPUs allow
    grace_period: int = 1  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 2  # ASHA: keep the best 1/reduction_factor at each rung
    max_epochs: int | None = None  # ASHA's max_t; None: train.epochs
    experiment: str | None = None  # MLflow experiment; None: tracking.experiment
    seed: int = 0  # seed of the search algorithm

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"tune.num_samples: must be >= 1, got {self.num_samples}")
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError("tune.grace_period must be >= 1 and tune.reduction_factor >= 2")


@dataclass
class Study:
    """A parsed study file."""

    base: dict[str, Any]  # the training config (validated)
    search: dict[str, dict[str, list]]  # dotted key -> {distribution: args}
    tune: TuneConfig = field(default_factory=TuneConfig)

    @property
    def study_dir(self) -> Path:
        return Path(self.tune.storage_path).expanduser().resolve() / self.tune.name


def load_study(path: str | os.PathLike, overrides: list[str] | None = None) -> Study:
    """Read and validate a study file; every sampled key must be a valid training-config key.

    Raises:
        ConfigError: naming the file and the key that is wrong.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: study file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        search = data.pop("search", None) or {}
        tune_cfg = from_dict(TuneConfig, data.pop("tune", None) or {}, prefix="tune")
        if not isinstance(search, dict) or not search:
            raise ConfigError("search: expected a mapping of config keys to distributions")
        for key, spec in search.items():
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ConfigError(f"search.{key}: expected one of {{{', '.join(DISTRIBUTIONS)}: [...]}}")
            kind, args = next(iter(spec.items()))
            if not isinstance(args, list) or not args:
                raise ConfigError(f"search.{key}.{kind}: expected a list of values or [low, high]")
            # every value the distribution can produce must make a valid config
            for value in (args if kind == "choice" else args[:2]):
                experiment_from_dict(apply_overrides(data, [f"{key}={json.dumps(value)}"]))
        experiment_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return Study(base=data, search=search, tune=tune_cfg)


def search_space(study: Study) -> dict[str, Any]:
    """The Ray Tune search space (flat dotted keys -> tune distributions)."""
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


def trial_config(base: dict[str, Any], params: dict[str, Any], *, name: str, storage_path: str) -> dict[str, Any]:
    """A full training config for one trial: base + sampled params, its own run, no test."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in params.items()]
    data = apply_overrides(base, overrides)
    data = apply_overrides(
        data,
        [f"run.name={name}", f"run.storage_path={storage_path}", "train.final_test=false", "tracking.enabled=false",
         "train.progress=false"],
    )
    return to_dict(experiment_from_dict(data))


def trial_driver(config: dict[str, Any]) -> None:
    """One trial: build and fit a TorchTrainer; Tune sees each epoch through TuneReportCallback."""
    import ray.train
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from echomamba_dist.models.registry import build_model
    from echomamba_dist.ray_train import TRAIN_DATASET, build_train_dataset, ray_train_entry

    params = {k: v for k, v in config.items() if not k.startswith("_")}
    trial_name = f"trial-{ray.tune.get_context().get_trial_id()}"
    cfg_dict = trial_config(config["_base"], params, name=trial_name, storage_path=config["_trials_dir"])
    cfg = experiment_from_dict(cfg_dict)
    if config.get("_fail_on") and all(params.get(k) == v for k, v in config["_fail_on"].items()):
        raise RuntimeError(f"injected trial failure for {params}")  # tests: a failing trial
    sample_mode = build_model(cfg.model, n_items=1).sample_mode
    trainer = TorchTrainer(
        ray_train_entry,
        train_loop_config=cfg_dict,
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker or 1, **({"GPU": 1} if cfg.train.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=trial_name,
            storage_path=config["_trials_dir"],
            failure_config=FailureConfig(max_failures=0),
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=metric_key(f"val_{cfg.train.metric}"),
                checkpoint_score_order="max",
            ),
            callbacks=[TuneReportCallback()],
        ),
        datasets={TRAIN_DATASET: build_train_dataset(cfg, sample_mode)},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    trainer.fit()


def run_study(path: str | os.PathLike, overrides: list[str] | None = None, *, fail_on: dict | None = None) -> dict[str, Any]:
    """Run (or resume) a study; write best.yaml and results.parquet; return a summary.

    Args:
        path: the study file.
        overrides: `key=value` overrides applied to the study file.
        fail_on: tests only: trials whose sampled params match this dict raise.
    """
    import mlflow
    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    from echomamba_dist.ray_train import init_ray

    study = load_study(path, overrides)
    base_cfg = experiment_from_dict(study.base)
    metric = metric_key(f"val_{base_cfg.train.metric}")
    study_dir = study.study_dir
    study_dir.mkdir(parents=True, exist_ok=True)
    trials_dir = str(study_dir / "trials")
    init_ray()

    # MLflow: a parent run for the study (resumed by id), one child run per trial
    uri = base_cfg.tracking.resolved_uri()
    experiment = study.tune.experiment or base_cfg.tracking.experiment
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment(experiment)
    parent_file = study_dir / "mlflow_parent_run_id"
    parent_id = parent_file.read_text().strip() if parent_file.is_file() else None
    if parent_id is None:
        parent = mlflow.start_run(run_name=study.tune.name, experiment_id=exp.experiment_id)
        parent_id = parent.info.run_id
        mlflow.log_params({f"search.{k}": json.dumps(v) for k, v in study.search.items()})
        mlflow.log_params({f"tune.{k}": str(v) for k, v in to_dict(study.tune).items()})
        mlflow.end_run()
        parent_file.write_text(parent_id)

    max_epochs = study.tune.max_epochs or base_cfg.train.epochs
    per_trial_cpus = base_cfg.train.num_workers * (base_cfg.train.cpus_per_worker or 1)
    concurrency = study.tune.max_concurrent or max(1, int(ray.cluster_resources().get("CPU", 1) // max(per_trial_cpus, 1)))
    if base_cfg.train.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0)
        concurrency = min(concurrency, max(1, int(gpus // base_cfg.train.num_workers)))

    trainable = tune.with_resources(trial_driver, {"CPU": 0})  # the driver only waits on its trainer
    param_space = {
        **search_space(study),
        "_base": study.base,
        "_trials_dir": trials_dir,
        "_fail_on": fail_on or {},
    }
    callbacks = [MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment, tags={"mlflow.parentRunId": parent_id})]
    tuner_path = study_dir / "tuner"
    if tune.Tuner.can_restore(str(tuner_path)):
        tuner = tune.Tuner.restore(str(tuner_path), trainable=trainable, param_space=param_space, resume_errored=False,
                                   restart_errored=False)
    else:
        if study.tune.search_alg == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(seed=study.tune.seed)
        else:
            search_alg = tune.search.BasicVariantGenerator(random_state=study.tune.seed)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric,
                mode="max",
                num_samples=study.tune.num_samples,
                search_alg=tune.search.ConcurrencyLimiter(search_alg, max_concurrent=concurrency)
                if study.tune.search_alg == "optuna" else search_alg,
                max_concurrent_trials=concurrency,
                scheduler=ASHAScheduler(
                    time_attr="epoch", max_t=max_epochs, grace_period=study.tune.grace_period,
                    reduction_factor=study.tune.reduction_factor,
                ),
            ),
            run_config=tune.RunConfig(name="tuner", storage_path=str(study_dir), callbacks=callbacks),
        )
    results = tuner.fit()
    return summarize(study, results, metric=metric, parent_id=parent_id, tracking_uri=uri)


def summarize(study: Study, results, *, metric: str, parent_id: str, tracking_uri: str) -> dict[str, Any]:
    """Write results.parquet and best.yaml; test the best trial once; print the table."""
    import mlflow
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for r in results:
        params = {k: v for k, v in (r.config or {}).items() if not k.startswith("_")}
        history = r.metrics_dataframe
        best = float(history[metric].max()) if history is not None and metric in history else float("nan")
        epochs = int(history["epoch"].max()) + 1 if history is not None and "epoch" in history else 0
        rows.append({
            "trial_id": (r.metrics or {}).get("trial_id") or Path(r.path).name,
            "status": "ERROR" if r.error else ("STOPPED_EARLY" if epochs < (study.tune.max_epochs or experiment_from_dict(study.base).train.epochs) and not (r.metrics or {}).get("done") else "TERMINATED"),
            "best_" + metric: best,
            "epochs": epochs,
            "params": json.dumps(params, sort_keys=True),
            "error": str(r.error).splitlines()[0][:300] if r.error else "",
        })
    table = pa.Table.from_pylist(rows)
    out = study.study_dir / "results.parquet"
    tmp = out.with_name(".results.parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)

    ok = [row for row in rows if not row["error"] and row["best_" + metric] == row["best_" + metric]]
    if not ok:
        raise RuntimeError(f"every trial failed; see {study.study_dir}")
    best_row = max(ok, key=lambda row: row["best_" + metric])
    best_params = json.loads(best_row["params"])
    best = experiment_from_dict(apply_overrides(study.base, [f"{k}={json.dumps(v)}" for k, v in best_params.items()]))
    best.run.name = f"{study.tune.name}-best"
    best_path = study.study_dir / "best.yaml"
    save_config(best, best_path)

    test = best_trial_test_metrics(study, best_row)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=parent_id):
        mlflow.log_metric(f"best_{metric}", best_row["best_" + metric])
        for k, v in (test or {}).items():
            mlflow.log_metric(metric_key(f"best_test_{k}"), v)
        mlflow.log_artifact(str(best_path))
        mlflow.log_artifact(str(out))

    print(f"{'trial':<18}{'status':<15}{'epochs':>7}{'best ' + metric:>22}  params")
    for row in sorted(rows, key=lambda r: -(r["best_" + metric] if r["best_" + metric] == r["best_" + metric] else -1)):
        print(f"{row['trial_id']:<18}{row['status']:<15}{row['epochs']:>7}{row['best_' + metric]:>22.4f}  {row['params']}")
    print(f"\nbest: {best_row['trial_id']}  {metric} {best_row['best_' + metric]:.4f}  test {json.dumps(test)}")
    print(f"best config: {best_path}\nresults: {out}")
    return {"best_trial": best_row["trial_id"], "best_config": str(best_path), "results": str(out), "test": test, "rows": rows}


def best_trial_test_metrics(study: Study, best_row: dict[str, Any]) -> dict[str, float] | None:
    """Score the best trial's best checkpoint on the test split (the only test of the study)."""
    import torch

    from echomamba_dist.inference import load_model
    from echomamba_dist.train.evaluate import evaluate_model
    from echomamba_dist.train.loop import build_training_data

    trial_root = study.study_dir / "trials" / f"trial-{best_row['trial_id']}"
    ckpts = sorted(trial_root.glob("epoch_*"), key=lambda p: p.name) if trial_root.is_dir() else []
    if not ckpts:
        return None
    loaded = load_model(ckpts[-1])  # its best weights travel with the latest checkpoint
    data = build_training_data(loaded.config, loaded.model.sample_mode)
    metrics = evaluate_model(loaded.model, data.test, ks=loaded.config.train.ks,
                             batch_size=loaded.config.train.eval_batch_size, device=torch.device("cpu"))
    return {k: v for k, v in metrics.items() if k != "count"}
