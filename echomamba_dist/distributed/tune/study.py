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
    tune:                         # StudySettings
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

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from ray import tune

from echomamba_dist.config import (
    ExperimentConfig,
    apply_overrides,
    experiment_from_dict,
    from_dict,
    load,
    set_dotted,
    to_dict,
)
from echomamba_dist.errors import CheckpointError, ConfigError
from echomamba_dist.train.checkpoint import checkpoint_dirs, read_meta

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
class StudySettings:
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
    """A parsed study file: the base training config, the search space and how to run.

    Loaded like every config (`echomamba_dist.config.load(Study, path, overrides)`): an override
    `search.train.lr={loguniform: [1.0e-4, 1.0e-3]}` replaces that one search entry.
    """

    base: dict[str, Any]  # the training config as a nested dict (validated)
    search: dict[str, dict[str, list]]  # dotted key -> {distribution: args}
    tune: StudySettings = field(default_factory=StudySettings)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Study:
        """Validate a study: every value a distribution can give must make a valid config.

        Raises:
            ConfigError: naming the key that is wrong.
        """
        data = dict(data)
        search = data.pop("search", None)
        tune_cfg = from_dict(StudySettings, data.pop("tune", None) or {}, prefix="tune")
        if not isinstance(search, dict) or not search:
            raise ConfigError("search: expected a mapping of dotted config keys to distributions")
        search = _flat_search(search)
        experiment_from_dict(data)
        for key, spec in search.items():
            kind, args = _parse_distribution(key, spec)
            for value in _probe_values(kind, args):
                try:
                    experiment_from_dict(with_params(data, {key: value}))
                except ConfigError as exc:
                    raise ConfigError(f"search.{key}: value {value!r} gives an invalid config: {exc}") from None
        return cls(base=data, search=search, tune=tune_cfg)

    @property
    def study_dir(self) -> Path:
        return Path(self.tune.storage_path).expanduser().resolve() / self.tune.name

    @property
    def base_config(self) -> ExperimentConfig:
        return experiment_from_dict(self.base)


def load_study(path: str | os.PathLike, overrides: list[str] | None = None) -> Study:
    """`load(Study, path, overrides)`: a study file read and validated (see `Study.from_dict`).

    Raises:
        ConfigError: naming the file and the key that is wrong.
    """
    return load(Study, path, overrides)


def _flat_search(search: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Search entries by dotted key, whether written `train.lr: {...}` or nested as sections
    (`train: {lr: {...}}`, which a `--set search.train.lr=...` override makes); a later entry
    of the same key wins."""
    out: dict[str, Any] = {}
    for key, spec in search.items():
        name = f"{prefix}{key}"
        is_section = isinstance(spec, dict) and spec and all(isinstance(v, dict) for v in spec.values()) \
            and not (len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS)
        if is_section:
            out.update(_flat_search(spec, f"{name}."))
        else:
            out.pop(name, None)
            out[name] = spec
    return out


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
        set_dotted(out, key, _plain(value), where=f"search.{key}")
    return out


def _plain(value: Any) -> Any:
    """NumPy scalars (which samplers may return) -> Python scalars."""
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


def trial_run_name(trial_id: str) -> str:
    """The Ray Train run (directory) name of a trial."""
    return f"trial-{trial_id}"


def trial_history(run_dir: Path) -> dict[str, Any] | None:
    """What a trial's latest checkpoint knows: epochs run, best epoch and metric, history.

    The checkpoint (not Tune's result log) is the record, so that a trial restarted by a resumed
    study is summarised over all of its epochs. A checkpoint whose metadata cannot be read is
    skipped for the one before it, with a warning naming it, so that one damaged file does not
    stop a study's summary. None when the trial has no readable checkpoint.
    """
    meta = ckpt = None
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        try:
            meta = read_meta(ckpt)
            break
        except CheckpointError as exc:
            print(f"echomamba tune: warning: {exc}; reading the trial's checkpoint before it", file=sys.stderr, flush=True)
    if meta is None:
        return None
    return {"checkpoint": ckpt, "epochs": int(meta["epoch"]), "best_epoch": int(meta["best_epoch"]),
            "best": float(meta["best_metric"]), "history": meta.get("history", [])}
