"""MLflow tracking for a training run (rank 0 only).

Embedded default: a SQLite store `./mlflow.db` with artifacts in `./mlartifacts` (`mlflow ui`
started there shows it); `MLFLOW_TRACKING_URI` (or `tracking.tracking_uri`) points it at a
server. A resumed run continues the same MLflow run: its id is kept in the run directory
(`RUN_ID_FILE`). This is the only module of the core (ops, models, data, train) that imports
MLflow, and only when tracking is on. Logging and registering the best model as a pyfunc model is
the serving layer's (`echomamba_dist.serve.pyfunc.publish_run`), once training has ended.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from echomamba_dist import __version__
from echomamba_dist.config import TrackingConfig, flatten
from echomamba_dist.io import write_text_atomic

RUN_ID_FILE = "mlflow_run_id"


def metric_key(name: str) -> str:
    """A metric name that MLflow and Ray accept: `val_ndcg@10` -> `val_ndcg_at_10`."""
    return name.replace("@", "_at_")


def git_commit() -> str:
    """The git commit of the source tree this package runs from, or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def _store_creation_lock(uri: str):
    """Serialise opening a local SQLite store between processes.

    Two trainers that open a new store at once both create its tables and run its migrations,
    and the loser fails ("table ... already exists"). An flock on the database file itself
    (SQLite's own locks are POSIX record locks, which flock does not touch) lets one create it
    while the others wait; an empty file is a valid new SQLite database.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def use_experiment(cfg: TrackingConfig):
    """Point MLflow at the configured store and experiment (created if missing); return it."""
    import mlflow

    mlflow.set_tracking_uri(cfg.resolved_uri())
    with _store_creation_lock(cfg.resolved_uri()):
        experiment = mlflow.get_experiment_by_name(cfg.experiment)  # opens (creates) the store
    if experiment is None:
        try:
            mlflow.create_experiment(cfg.experiment, artifact_location=cfg.artifact_location())
        except Exception:  # created concurrently by another process
            pass
    return mlflow.set_experiment(cfg.experiment)


class Tracker:
    """A thin MLflow wrapper; every method is a no-op when tracking is disabled."""

    def __init__(self, cfg: TrackingConfig, *, run_dir: Path, run_name: str, enabled: bool = True) -> None:
        self.enabled = cfg.enabled and enabled
        self.run_id: str | None = None
        self._mlflow = None
        if not self.enabled:
            return
        import mlflow

        self._mlflow = mlflow
        experiment = use_experiment(cfg)
        id_file = run_dir / RUN_ID_FILE
        previous = id_file.read_text().strip() if id_file.is_file() else None
        if previous:
            try:
                mlflow.start_run(run_id=previous)
            except Exception:  # the run was deleted, or the store moved: start afresh
                previous = None
        if not previous:
            mlflow.start_run(run_name=run_name, experiment_id=experiment.experiment_id)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(id_file, mlflow.active_run().info.run_id)
        self.run_id = mlflow.active_run().info.run_id

    def log_config(self, config: dict[str, Any], *, tags: dict[str, str]) -> None:
        if not self.enabled:
            return
        mlflow = self._mlflow
        params = {k: str(v)[:500] for k, v in flatten(config).items()}
        existing = mlflow.get_run(self.run_id).data.params
        new = {k: v for k, v in params.items() if k not in existing}
        if new:
            mlflow.log_params(new)
        mlflow.set_tags({"echomamba.version": __version__, "git.commit": git_commit(), **tags})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            mlflow.log_artifact(str(path))

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        if self.enabled:
            clean = {metric_key(k): float(v) for k, v in metrics.items()}
            self._mlflow.log_metrics(clean, step=step)

    def log_final(self, metrics: dict[str, Any]) -> None:
        """The final metrics (step = the best epoch) and metrics.json as an artifact.

        The best model is logged and registered afterwards by whoever ran the training
        (`echomamba_dist.serve.pyfunc.publish_run`), from the run's best checkpoint.
        """
        if not self.enabled:
            return
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.log_metrics(numeric, step=int(metrics.get("best_epoch", 0)))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "metrics.json"
            path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
            self._mlflow.log_artifact(str(path))

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)
