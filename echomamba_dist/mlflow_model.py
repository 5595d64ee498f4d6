"""The trained model as an MLflow pyfunc model: load it back from MLflow and score histories.

Logged at the end of every tracked training run (artifact path `model`): the best checkpoint,
the item-id vocabulary and this package's source travel with it, so that

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    model.predict(pd.DataFrame({"history": [["i3", "i17"], ["i5"]]}))

returns, for each row, the top-k original item ids and their scores. Weights are read with
`weights_only=True`; nothing is unpickled but the pyfunc wrapper itself, which MLflow requires.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ARTIFACT_PATH = "model"


def _python_model_class():
    import mlflow.pyfunc

    class EchoMambaRecommender(mlflow.pyfunc.PythonModel):
        """Input: a DataFrame with a `history` column (lists of original item ids, oldest first)
        and optionally `k`. Output: a DataFrame with `items` (top-k ids) and `scores`."""

        def load_context(self, context) -> None:
            from echomamba_dist.inference import load_model

            self.loaded = load_model(context.artifacts["checkpoint"])
            self.item_ids = json.loads(Path(context.artifacts["item_ids"]).read_text())
            self.index = {item: i for i, item in enumerate(self.item_ids) if i > 0}

        def predict(self, context, model_input, params: dict[str, Any] | None = None):
            import pandas as pd

            from echomamba_dist.inference import pad_histories, topk_items

            k = int((params or {}).get("k", 10))
            histories = []
            for row, history in enumerate(model_input["history"]):
                ids = [self.index[str(x)] for x in history if str(x) in self.index]
                if not ids:
                    raise ValueError(f"row {row}: no known item id in history {list(history)[:5]}")
                histories.append(ids)
            seq, seq_len = pad_histories(histories, self.loaded.config.data.max_len)
            top, scores = topk_items(self.loaded.model, seq, seq_len, k=k, exclude_history=True)
            names = np.asarray(self.item_ids, dtype=object)
            return pd.DataFrame({"items": [list(names[t]) for t in top], "scores": [list(map(float, s)) for s in scores]})

    return EchoMambaRecommender


def log_model(checkpoint_dir: Path, item_ids: list[str]) -> None:
    """Log the checkpoint as a pyfunc model into the active MLflow run."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    # inputs are free-form (a `history` column of id lists); `k` is a declared inference param
    signature = ModelSignature(inputs=None, outputs=None, params=ParamSchema([ParamSpec("k", "long", 10)]))
    package_dir = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = Path(tmp) / "item_ids.json"
        ids_path.write_text(json.dumps([None, *map(str, item_ids[1:])]))
        mlflow.pyfunc.log_model(
            name=ARTIFACT_PATH,
            python_model=_python_model_class()(),
            artifacts={"checkpoint": str(checkpoint_dir), "item_ids": str(ids_path)},
            code_paths=[str(package_dir)],
            pip_requirements=["torch", "numpy", "pyarrow", "pyyaml", "pandas"],
            signature=signature,
        )


def load_recommender(model_uri: str):
    """`mlflow.pyfunc.load_model` of a logged recommender (e.g. `runs:/<id>/model`)."""
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(model_uri)
