"""The trained model as an MLflow pyfunc model: logged, registered, loaded back and served.

Logged when a tracked training run has ended (`publish_run`, artifact path `model`) and
registered in the MLflow Model Registry: the best checkpoint, the item-id vocabulary and this package's source
travel with it, so that

    model = mlflow.pyfunc.load_model("models:/<name>@champion")   # or runs:/<run id>/model
    model.predict(pd.DataFrame({"history": [["i3", "i17"], ["i5"]]}), params={"k": 5})

returns, for each row, the top-k original item ids that are not in the history, with their
scores (best first). `mlflow models serve -m models:/<name>@champion --env-manager local` serves
the same over REST (README, "Serving a trained model"). Bad input raises an MlflowException
with error code INVALID_PARAMETER_VALUE, which MLflow's scoring server answers with HTTP 400
and the message.

Weights are read with `weights_only=True`, and the wrapper is logged as code (`pyfunc_model.py`,
MLflow's models from code), not pickled; loading a model still runs the code it carries (this
package), so load models only from a store you trust (docs/model_card.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import DataType
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

from echomamba_dist import __version__
from echomamba_dist.data.dataset import load_dataset
from echomamba_dist.serve.load import load_model, pad_histories, topk_items
from echomamba_dist.train.checkpoint import latest_checkpoint
from echomamba_dist.train.tracking import RUN_ID_FILE, use_experiment

ARTIFACT_PATH = "model"
MODEL_CODE = Path(__file__).resolve().with_name("pyfunc_model.py")  # what MLflow runs to load the model
DEFAULT_K = 10


@dataclass(frozen=True)
class RegisteredVersion:
    """A model version in the MLflow Model Registry."""

    name: str
    version: int
    alias: str | None = None

    @property
    def uri(self) -> str:
        """`models:/<name>@<alias>`, else `models:/<name>/<version>`."""
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def _bad_input(message: str):
    """The error MLflow's scoring server turns into HTTP 400 with `message`."""
    return MlflowException.invalid_parameter_value(message)


def parse_histories(model_input: Any, index: dict[str, int]) -> list[list[int]]:
    """Item-index histories from a pyfunc input: a DataFrame (or a mapping / list of records)
    with a `history` column holding lists of original item ids, oldest first.

    Raises:
        MlflowException (INVALID_PARAMETER_VALUE): no `history` column, or a row whose history
            is not a list of ids, is empty, or holds ids the model does not know (named).
    """
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if "history" not in frame.columns:
        raise _bad_input(f"expected a `history` column (lists of item ids, oldest first), got columns {list(frame.columns)}")
    histories = []
    for row, history in enumerate(frame["history"]):
        if isinstance(history, str) or not isinstance(history, (list, tuple, np.ndarray)):
            raise _bad_input(f"row {row}: history must be a list of item ids, got {type(history).__name__}")
        tokens = [str(x) for x in history]
        unknown = [t for t in tokens if t not in index]
        if unknown:
            raise _bad_input(f"row {row}: unknown item id(s) {unknown[:5]} (expected ids the model was trained on)")
        if not tokens:
            raise _bad_input(f"row {row}: empty history")
        histories.append([index[t] for t in tokens])
    return histories


def recommend_unseen(loaded, histories: list[list[int]], *, k: int) -> list[tuple[list[int], list[float]]]:
    """Top-k unseen item indices and scores for each history (best first).

    The model reads the last `max_len` items; every item of the whole history is excluded, also
    those older than `max_len`. A row has fewer than k items only when the catalogue runs out.
    """
    max_len = loaded.config.data.max_len
    seq, seq_len = pad_histories(histories, max_len)
    # topk_items excludes what the model sees; ask for enough extra to drop the older items too
    older = max((len(h) - max_len for h in histories), default=0)
    top, scores = topk_items(loaded.model, seq, seq_len, k=k + max(older, 0), exclude_history=True)
    out = []
    for history, items, values in zip(histories, top, scores):
        seen = set(history)
        keep = [(int(i), float(s)) for i, s in zip(items, values) if int(i) not in seen and np.isfinite(s)][:k]
        out.append(([i for i, _ in keep], [s for _, s in keep]))
    return out


class EchoMambaRecommender(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with a `history` column (lists of original item ids, oldest first);
    param `k` (default 10). Output: a DataFrame with `items` (top-k unseen ids) and `scores`.

    Logged as code (`pyfunc_model.py`, MLflow's "models from code"), not pickled. The DataFrame
    type hint tells MLflow not to validate input by type hints: the signature says what it takes,
    and `parse_histories` refuses the rest (400s naming the row)."""

    def load_context(self, context) -> None:
        self.loaded = load_model(context.artifacts["checkpoint"])
        self.item_ids = json.loads(Path(context.artifacts["item_ids"]).read_text())
        self.index = {item: i for i, item in enumerate(self.item_ids) if i > 0}

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        k = (params or {}).get("k", DEFAULT_K)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise _bad_input(f"params.k: expected an integer >= 1, got {k!r}")
        histories = parse_histories(model_input, self.index)
        recs = recommend_unseen(self.loaded, histories, k=int(k))
        return pd.DataFrame({
            "items": [[self.item_ids[i] for i in items] for items, _ in recs],
            "scores": [scores for _, scores in recs],
        })


def model_signature():
    """Inputs: `history`, a list of item ids (optional in the schema, so that a request without it
    reaches `predict` and gets a 400 naming the column; MLflow answers a missing required column
    with a 500). Outputs: `items` and `scores`. Param: `k`."""
    return ModelSignature(
        inputs=Schema([ColSpec(Array(DataType.string), "history", required=False)]),
        outputs=Schema([ColSpec(Array(DataType.string), "items"), ColSpec(Array(DataType.double), "scores")]),
        params=ParamSchema([ParamSpec("k", DataType.long, DEFAULT_K)]),
    )


def input_example(item_ids: list[str]):
    """Two short histories of real item ids (the first items of the vocabulary)."""
    ids = [str(x) for x in item_ids[1:4]]
    return pd.DataFrame({"history": [ids[:2], ids[2:3] or ids[:1]]})


def log_model(checkpoint_dir: Path, item_ids: list[str]):
    """Log the checkpoint as a pyfunc model, with its signature and an input example, into the
    active MLflow run (artifact path `model`).

    Args:
        checkpoint_dir: the checkpoint whose best weights are served.
        item_ids: original item ids by item index (index 0, the padding, is ignored).
    Returns:
        MLflow's ModelInfo (its `model_uri` registers the model).
    """
    package_dir = Path(__file__).resolve().parents[1]  # echomamba_dist/, shipped with the model
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = Path(tmp) / "item_ids.json"
        ids_path.write_text(json.dumps([None, *map(str, item_ids[1:])]))
        return mlflow.pyfunc.log_model(
            name=ARTIFACT_PATH,
            python_model=str(MODEL_CODE),
            artifacts={"checkpoint": str(checkpoint_dir), "item_ids": str(ids_path)},
            code_paths=[str(package_dir)],
            pip_requirements=["torch", "numpy", "pyarrow", "pyyaml", "pandas"],
            signature=model_signature(),
            input_example=(input_example(item_ids), {"k": DEFAULT_K}),
        )


def register(model_uri: str, name: str, *, alias: str | None = None, tags: dict[str, str] | None = None) -> RegisteredVersion:
    """Register a logged model as a new version of `name` (created if missing), tagged with
    `tags`, and point `alias` (if any) at it.

    Raises:
        MlflowException: the store has no Model Registry, or the name or alias is invalid.
    """
    with contextlib.redirect_stderr(io.StringIO()):  # its "Successfully registered ..." lines: callers say it once
        version = mlflow.register_model(model_uri, name, tags=tags)
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
    return RegisteredVersion(name=name, version=int(version.version), alias=alias)


def publish_run(cfg) -> RegisteredVersion | None:
    """Log a finished training run's best model as a pyfunc model into the run's MLflow run, and
    register it as a new version of `tracking.registered_model` (default: the run name), with
    `tracking.model_alias` moved to it.

    Called by whoever ran the training (the `train` command, in process or on Ray), once it has
    ended: the run directory's latest checkpoint carries the best weights, and its
    `mlflow_run_id` names the MLflow run. When the store refuses the registration (a server
    without a Model Registry, no permission), the logged model stays in the run
    (`runs:/<run id>/model` loads it) and one line says why; the finished run does not fail.

    Args:
        cfg: the run's ExperimentConfig.
    Returns:
        The RegisteredVersion, or None: tracking or `tracking.log_model` off, no checkpoint, or
        not registered.
    """
    tracking, run_dir = cfg.tracking, cfg.run.run_dir
    id_file = run_dir / RUN_ID_FILE
    checkpoint_dir = latest_checkpoint(run_dir)
    if not (tracking.enabled and tracking.log_model) or checkpoint_dir is None or not id_file.is_file():
        return None
    run_id = id_file.read_text().strip()
    item_ids = [str(x) for x in load_dataset(cfg.data).item_ids]
    use_experiment(tracking)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(str(checkpoint_dir), artifact_path="best_checkpoint")
        info = log_model(checkpoint_dir, item_ids)
    if not tracking.register:
        return None
    name = tracking.registered_model or cfg.run.name
    try:
        registered = register(info.model_uri, name, alias=tracking.model_alias,
                              tags={"echomamba.run": cfg.run.name, "echomamba.version": __version__})
    except MlflowException as exc:  # the run's model is logged: say why, do not fail the run
        print(f"MLflow: the model was logged (runs:/{run_id}/model) but not registered as {name!r}: "
              f"{exc.message.splitlines()[0]}", file=sys.stderr, flush=True)
        return None
    print(f"MLflow: registered model {registered.name!r} version {registered.version} "
          f"(models:/{registered.name}/{registered.version}{f', {registered.uri}' if registered.alias else ''})",
          flush=True)
    return registered
