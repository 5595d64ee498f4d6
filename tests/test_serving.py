"""Serving a trained model: the MLflow pyfunc model, and batch recommendation on Ray Data,
both agree with in-process top-k scoring."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from echomamba_dist.config import experiment_from_dict
from echomamba_dist.data.dataset import load_dataset
from echomamba_dist.serve.load import load_model, pad_histories, topk_items
from echomamba_dist.serve.batch import recommend_users
from echomamba_dist.serve.pyfunc import publish_run
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
    publish_run(experiment_from_dict(cfg))  # what `echomamba train` does after training
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
    out = mlflow.pyfunc.load_model(local).predict(example)
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

    from echomamba_dist.distributed.recommend import recommend_on_ray

    from echomamba_dist.errors import NonFiniteScores, OutputError

    root, _, cfg = trained
    ds = load_dataset(experiment_from_dict(cfg).data)
    nan_ckpt = _nan_checkpoint(root / "runs" / "serve", tmp_path / "nan")
    try:
        n = recommend_on_ray(root / "runs" / "serve", ds, tmp_path / "recs", k=3, num_actors=2)
        first = {p.name: p.read_bytes() for p in (tmp_path / "recs").iterdir()}
        with pytest.raises(OutputError, match="recs: output directory exists and is not empty"):
            recommend_on_ray(root / "runs" / "serve", ds, tmp_path / "recs", k=3)
        # issue 14: a diverged model's NaN scores are refused in the actors, nothing is written
        with pytest.raises(NonFiniteScores, match="with NaN or infinity"):
            recommend_on_ray(nan_ckpt, ds, tmp_path / "recs", k=3, num_actors=1, overwrite=True)
        assert {p.name: p.read_bytes() for p in (tmp_path / "recs").iterdir()} == first
        assert recommend_on_ray(root / "runs" / "serve", ds, tmp_path / "recs", k=3, num_actors=1, overwrite=True) == 150
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


def _nan_checkpoint(run_dir, target):
    """A copy of the run's newest checkpoint with every weight NaN (a diverged model)."""
    import torch

    from echomamba_dist.serve.load import resolve_checkpoint
    from echomamba_dist.train.checkpoint import read_config, read_meta, read_state, write_checkpoint

    src = resolve_checkpoint(run_dir)
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in read_state(src)["model"].items()}
    return write_checkpoint(target, model_state=nan, optimizer_state=None, meta=read_meta(src),
                            config=read_config(src), extra_state={"best_model": nan})


def test_topk_returns_only_unseen_items_and_refuses_nan_scores(trained, tmp_path):
    """issue 14: -k beyond the unseen items padded the list with seen items at -inf, and a NaN
    model's scores were served as they were."""
    from echomamba_dist.errors import NonFiniteScores
    from echomamba_dist.serve.batch import available_items

    root, _, cfg = trained
    ds = load_dataset(experiment_from_dict(cfg).data)
    loaded = load_model(root / "runs" / "serve")
    users = list(range(20))
    seq, seq_len = pad_histories([ds.items[ds.offsets[u] : ds.offsets[u + 1]] for u in users], 10)
    top, scores = topk_items(loaded.model, seq, seq_len, k=1000)
    assert top.shape == (20, ds.n_items)  # at most the catalogue
    available = available_items(ds, users, max_len=10)
    for row, items, values, n in zip(seq, top, scores, available):
        real = items > 0
        assert real.sum() == n == ds.n_items - len(set(row[row > 0].tolist()))  # the unseen items, each once
        assert not set(items[real].tolist()) & set(row.tolist())
        assert np.isfinite(values[real]).all() and real[: n].all()  # best first, padding last
    table = recommend_users(loaded, ds, users, k=1000).to_pandas()
    assert table.groupby("user_id").size().sort_index().tolist() == [
        int(n) for _, n in sorted(zip([str(ds.user_ids[u]) for u in users], available))]
    assert np.isfinite(table["score"]).all()
    assert (available_items(ds, users, max_len=10, exclude_history=False) == ds.n_items).all()

    nan = load_model(_nan_checkpoint(root / "runs" / "serve", tmp_path / "nan"))
    with pytest.raises(NonFiniteScores, match="scores 20 of 20 histories with NaN or infinity"):
        topk_items(nan.model, seq, seq_len, k=5)


def test_write_recommendations_refuses_what_it_did_not_write(trained, tmp_path):
    from echomamba_dist.errors import OutputError
    from echomamba_dist.serve.batch import write_recommendations

    root, _, cfg = trained
    ds = load_dataset(experiment_from_dict(cfg).data)
    table = recommend_users(load_model(root / "runs" / "serve"), ds, [0, 1], k=3)
    out = tmp_path / "recs.parquet"
    write_recommendations(table, out)
    with pytest.raises(OutputError, match="recs.parquet: exists \\(use --overwrite"):
        write_recommendations(table.slice(0, 3), out)
    write_recommendations(table.slice(0, 3), out, overwrite=True)  # its own file: replaced
    assert pq.read_table(out).num_rows == 3
    (tmp_path / "notes.parquet").write_text("mine")
    with pytest.raises(OutputError, match="not a recommendations file this project wrote"):
        write_recommendations(table, tmp_path / "notes.parquet", overwrite=True)
    assert (tmp_path / "notes.parquet").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.parquet", "recs.parquet"]  # no temporary
