"""The trained model as an MLflow user serves it: `echomamba train` registers it in the Model
Registry (signature, input example, alias `champion`), `mlflow models serve -m
models:/<name>@champion --env-manager local` serves it on 127.0.0.1, and a POST of histories
returns the top-k unseen items with the scores the library gives; bad input gets a 400 with a
message. The server is stopped afterwards."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from echomamba_dist.cli import main
from echomamba_dist.config import experiment_from_dict
from echomamba_dist.data.dataset import load_dataset
from echomamba_dist.serve.load import load_model, pad_histories, topk_items

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MAX_LEN = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes) -> tuple[int, dict]:
    """POST JSON; (status, parsed body) for successes and HTTP errors alike."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer {url} within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and the workers it started (its own process group)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


def test_train_registers_the_champion_and_mlflow_serves_it_over_rest(tmp_path, monkeypatch, capsys):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what the train run and the server both use
    config = {
        "data": {"synthetic": {"n_users": 120, "n_items": 40, "n_topics": 3, "mean_length": 8.0}, "max_len": MAX_LEN},
        "model": {"name": "echomamba4rec", "hidden_size": 16, "d_state": 8, "max_len": MAX_LEN},
        "train": {"epochs": 1, "batch_size": 128, "ray": False, "progress": False},
        "run": {"name": "rest", "storage_path": "runs"},
        "tracking": {"experiment": "serve-rest", "model_alias": "champion"},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", "train.yaml"]) == 0
    assert "registered model 'rest' version 1" in capsys.readouterr().out

    # registered under the run name, with a signature, an input example and the alias
    client = mlflow.MlflowClient(tracking_uri=uri)
    version = client.get_model_version_by_alias("rest", "champion")
    run = mlflow.search_runs(experiment_names=["serve-rest"], output_format="list")[0]
    assert int(version.version) == 1 and version.run_id == run.info.run_id
    info = mlflow.models.get_model_info("models:/rest@champion")
    assert info.signature.inputs.input_names() == ["history"]
    assert [p.name for p in info.signature.params.params] == ["k"]
    assert info.saved_input_example_info is not None

    ds = load_dataset(experiment_from_dict(config).data)
    ids = [str(x) for x in ds.item_ids]
    histories = [ds.items[ds.offsets[u] : ds.offsets[u + 1]][-MAX_LEN:] for u in range(3)]

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", "models:/rest@champion", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(proc, f"{base}/ping", log)

        body = {"dataframe_records": [{"history": [ids[i] for i in h]} for h in histories], "params": {"k": 5}}
        status, answer = post(f"{base}/invocations", json.dumps(body).encode())
        assert status == 200, answer
        predictions = answer["predictions"]
        assert len(predictions) == 3

        # the library's own top-k for the same histories (what `echomamba recommend --history` prints)
        loaded = load_model(tmp_path / "runs" / "rest")
        seq, seq_len = pad_histories(histories, MAX_LEN)
        top, scores = topk_items(loaded.model, seq, seq_len, k=5)
        for row, history in enumerate(histories):
            items, values = predictions[row]["items"], predictions[row]["scores"]
            assert len(items) == 5 and not set(items) & {ids[i] for i in history}  # unseen only
            assert values == sorted(values, reverse=True)
            assert items == [ids[i] for i in top[row]]
            np.testing.assert_allclose(values, scores[row], rtol=1e-5)

        bad = {
            "unknown item id": {"dataframe_records": [{"history": [ids[1], "no-such-item"]}]},
            "empty history": {"dataframe_records": [{"history": [ids[1]]}, {"history": []}]},
            "expected a `history` column": {"dataframe_records": [{"items": [ids[1]]}]},
            "params.k": {"dataframe_records": [{"history": [ids[1]]}], "params": {"k": 0}},
            "k": {"dataframe_records": [{"history": [ids[1]]}], "params": {"k": "five"}},
        }
        for expected, request in bad.items():
            status, answer = post(f"{base}/invocations", json.dumps(request).encode())
            assert 400 <= status < 500 and expected in answer.get("message", ""), (expected, status, answer)
        status, answer = post(f"{base}/invocations", b"{not json")
        assert 400 <= status < 500 and answer.get("message"), answer
    finally:
        stop(proc)
    assert proc.poll() is not None
