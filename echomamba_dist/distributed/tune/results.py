"""A study's results: one row per trial from its checkpoints, results.parquet, best.yaml, the
best trial's test metrics (the only use of the test split in a study), and the summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from echomamba_dist.config import (
    ExperimentConfig,
    TrackingConfig,
    experiment_from_dict,
    to_dict,
)
from echomamba_dist.distributed.tune.mlflow_runs import (
    complete_child_histories,
    end_parent,
    error_summary,
    now_ms,
    register_best_model,
)
from echomamba_dist.distributed.tune.study import (
    BEST_FILE,
    RESULTS_FILE,
    STUDY_TAG,
    TRIAL_ID_TAG,
    TRIALS_DIR,
    Study,
    sampled_params,
    trial_history,
    trial_run_name,
    with_params,
)
from echomamba_dist.io import atomic_file, write_text_atomic
from echomamba_dist.serve.load import load_model
from echomamba_dist.train.batches import build_training_data
from echomamba_dist.train.evaluate import evaluate_model
from echomamba_dist.train.loop import METRICS_FILE
from echomamba_dist.train.tracking import metric_key


def results_rows(study: Study, results, *, metric: str) -> list[dict[str, Any]]:
    """One row per trial of a Tune ResultGrid (see `summarize`), best first."""
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
            "error": error_summary(str(r.error)) if r.error else "",
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
    columns = {}
    for name in dict.fromkeys(k for row in rows for k in row):
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = pa.array([json.dumps(v) for v in values])
    with atomic_file(path, what="study results") as tmp:
        pq.write_table(pa.table(columns), tmp)


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
    study_dir = study.study_dir
    rows = results_rows(study, results, metric=metric)
    results_path = study_dir / RESULTS_FILE
    write_results(rows, results_path)
    print(format_results(rows, metric=metric))

    ok = [row for row in rows if row["status"] != "ERROR" and row[metric] == row[metric]]
    if not ok:
        end_parent(tracking, parent_id, "FAILED")
        raise RuntimeError(f"study {study.tune.name}: no trial produced a validation metric; see {results_path}")
    best_row = ok[0]
    params = {k[len("param."):]: v for k, v in best_row.items() if k.startswith("param.")}
    best = experiment_from_dict(with_params(study.base, params))
    best.run.name = f"{study.tune.name}-best"
    best_path = study_dir / BEST_FILE
    _write_best(best, best_path, study=study, row=best_row, metric=metric)

    test = best_trial_test_metrics(Path(best_row["run_dir"]))
    client = MlflowClient(tracking_uri=tracking.resolved_uri())
    complete_child_histories(client, parent_id, rows, metric=metric)
    now = now_ms()
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


def _write_best(cfg: ExperimentConfig, path: Path, *, study: Study, row: dict[str, Any], metric: str) -> None:
    """best.yaml: the full training config, with a header saying where it comes from."""
    header = (
        f"# Best configuration of study {study.tune.name} ({study.study_dir}):\n"
        f"# trial {row['trial_id']}, {metric} {row[metric]:.4f} at epoch {row['best_epoch']}.\n"
        f"# Train it in full: echomamba train --config {path.name}\n"
    )
    write_text_atomic(path, header + yaml.safe_dump(to_dict(cfg), sort_keys=False), what="best config")


def best_trial_test_metrics(run_dir: Path) -> dict[str, float]:
    """Score a trial's best weights on the test split: the only use of the test split in a study.

    Raises:
        CheckpointError: the trial has no checkpoint.
    """
    loaded = load_model(run_dir)  # the latest checkpoint carries the best weights so far
    cfg = loaded.config
    data = build_training_data(cfg, cfg.sample_mode, with_samples=False)  # the test split only
    metrics = evaluate_model(loaded.model, data.test, ks=cfg.train.ks, batch_size=cfg.train.eval_batch_size,
                             device=torch.device("cpu"), exclude_history=cfg.train.exclude_history)
    return {k: float(v) for k, v in metrics.items() if k != "count"}
