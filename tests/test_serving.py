"""Serving a trained model: the MLflow pyfunc model, and batch recommendation on Ray Data,
both agree with in-process top-k scoring."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from echomamba_dist.config import experiment_from_dict
from echomamba_dist.data.dataset import load_dataset
from echomamba_dist.inference import load_model, pad_histories, topk_items
from echomamba_dist.serving import recommend_users
from echomamba_dist.train.loop import train_per_worker


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = {
        "data": {"synthetic": {"n_users": 150, "n_items": 50, "n_topics": 3, "mean_length": 8.0}, "max_len": 10},
        "model": {"name": "echomamba4rec", "hidden_size": 16, "d_state": 8, "max_len": 10},
        "train": {"epochs": 1, "batch_size": 128, "ray": False, "progress": False},
        "run": {"name": "serve", "storage_path": str(root / "runs")},
        "tracking": {"tracking_uri": uri, "experiment": "serving"},
    }
    train_per_worker(cfg)
    return root, uri, cfg


def test_mlflow_pyfunc_model_scores_like_the_checkpoint(trained):
    import mlflow

    root, uri, cfg = trained
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["serving"], output_format="list")[0]
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    ds = load_dataset(experiment_from_dict(cfg).data)
    histories = [ds.items[ds.offsets[u] : ds.offsets[u + 1]] for u in range(5)]
    frame = pd.DataFrame({"history": [[str(ds.item_ids[i]) for i in h] for h in histories]})
    out = model.predict(frame, params={"k": 4})
    assert list(out.columns) == ["items", "scores"] and len(out) == 5

    loaded = load_model(root / "runs" / "serve")
    seq, seq_len = pad_histories(histories, cfg["data"]["max_len"])
    top, scores = topk_items(loaded.model, seq, seq_len, k=4)
    assert [list(r) for r in out["items"]] == [[str(ds.item_ids[i]) for i in row] for row in top]
    np.testing.assert_allclose(np.array(out["scores"].tolist()), scores, rtol=1e-6)
    with pytest.raises(Exception, match="unknown item id"):
        model.predict(pd.DataFrame({"history": [["not-an-item"]]}))


def test_the_run_registers_its_model_with_a_signature_and_an_input_example(trained):
    import mlflow

    from echomamba_dist.mlflow_model import load_recommender

    root, uri, cfg = trained
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = mlflow.search_runs(experiment_names=["serving"], output_format="list")[0]
    [version] = client.search_model_versions("name = 'serve'")  # the run name
    assert int(version.version) == 1 and version.run_id == run.info.run_id
    assert version.tags["echomamba.run"] == "serve"
    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info("models:/serve/1")
    assert info.signature.inputs.input_names() == ["history"]
    assert info.signature.outputs.input_names() == ["items", "scores"]
    assert info.signature.params.params[0].name == "k" and info.signature.params.params[0].default == 10
    local = mlflow.artifacts.download_artifacts("models:/serve/1", dst_path=str(root / "downloaded"))
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert example.columns.tolist() == ["history"] and all(len(h) >= 1 for h in example["history"])
    out = load_recommender(local).predict(example)
    assert len(out) == len(example) and all(len(items) == 10 for items in out["items"])


def test_served_items_are_unseen_also_beyond_max_len(trained):
    import mlflow

    root, uri, cfg = trained
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/serve/1")
    ds = load_dataset(experiment_from_dict(cfg).data)
    ids = [str(x) for x in ds.item_ids]
    history = ids[1:31]  # 30 items; the model reads the last 10
    out = model.predict(pd.DataFrame({"history": [history]}), params={"k": 15})
    items, scores = out["items"][0], out["scores"][0]
    assert len(items) == 15 and not set(items) & set(history)
    assert scores == sorted(scores, reverse=True)
    # the catalogue runs out: 50 items, 30 seen -> 20 left, never a seen one
    out = model.predict(pd.DataFrame({"history": [history]}), params={"k": 40})
    assert sorted(out["items"][0]) == sorted(set(ids[1:]) - set(history))


@pytest.mark.parametrize(
    "frame, params, message",
    [
        ({"history": [["not-an-item"]]}, None, r"row 0: unknown item id\(s\) \['not-an-item'\]"),
        ({"history": [[], []]}, None, "row 0: empty history"),
        ({"items": [["x"]]}, None, "expected a `history` column"),
        (None, {"k": 0}, "params.k: expected an integer >= 1, got 0"),
    ],
)
def test_bad_input_is_an_invalid_parameter_error_naming_the_row(trained, frame, params, message):
    import mlflow
    from mlflow.exceptions import MlflowException

    root, uri, cfg = trained
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/serve/1")
    first = model.unwrap_python_model().item_ids[1]
    with pytest.raises(MlflowException, match=message) as err:
        model.predict(pd.DataFrame(frame or {"history": [[first]]}), params=params)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"  # the scoring server answers 400


@pytest.mark.slow
def test_batch_recommendation_on_ray_matches_in_process(trained, tmp_path):
    import ray

    from echomamba_dist.serving import recommend_on_ray

    root, _, cfg = trained
    ds = load_dataset(experiment_from_dict(cfg).data)
    try:
        n = recommend_on_ray(root / "runs" / "serve", ds, tmp_path / "recs", k=3, num_actors=2)
    finally:
        ray.shutdown()
    assert n == 150
    on_ray = pq.read_table(tmp_path / "recs").to_pandas().sort_values(["user_id", "rank"]).reset_index(drop=True)
    local = recommend_users(load_model(root / "runs" / "serve"), ds, list(range(150)), k=3).to_pandas()
    local = local.sort_values(["user_id", "rank"]).reset_index(drop=True)
    assert len(on_ray) == 450
    assert on_ray["item_id"].tolist() == local["item_id"].tolist()
    np.testing.assert_allclose(on_ray["score"].to_numpy(), local["score"].to_numpy(), rtol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".recs")]  # no staging leftovers
