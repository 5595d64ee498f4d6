"""The system as a cluster user meets it: a local Ray head with its job server and an MLflow
server, both on 127.0.0.1; `ray job submit` of the training and the batch-recommendation jobs;
the run's params, metrics, checkpoint and model read back from the MLflow server. Nothing is
left running afterwards."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
# Ray's token authentication on, as in cluster/: every request needs this session's token.
TOKEN = secrets.token_hex(32)
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "RAY_USAGE_STATS_ENABLED": "0"}
RAY_ENV.pop("RAY_ADDRESS", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_processes(markers: list[str]) -> set[int]:
    """Pids of the processes whose command line names one of `markers`, and their descendants.

    Our head's daemons (GCS, raylet, dashboard, monitors) name its temp dir or its GCS port; its
    workers (`ray::...`) are the raylet's children. Other Ray instances on the machine match neither.
    """
    procs: dict[int, tuple[int, str]] = {}  # pid -> (parent pid, command line), from /proc (never truncated)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        procs[int(entry.name)] = (ppid, args)
    ours = {pid for pid, (_, args) in procs.items() if any(m in args for m in markers)}
    while True:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in ours} - ours
        if not children:
            break
        ours |= children
    return ours - {os.getpid()}


def stop_head(markers: list[str], grace: float = 20.0) -> set[int]:
    """SIGTERM our head's processes, SIGKILL what is left after `grace` s; returns the pids seen.

    Unlike `ray stop --force`, this leaves any other Ray on the machine running.
    """
    seen: set[int] = set()
    deadline = time.time() + grace
    sig = signal.SIGTERM
    while True:
        pids = head_processes(markers)
        if not pids:
            return seen
        seen |= pids
        if time.time() > deadline:
            sig = signal.SIGKILL
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(1)


def process_state(pid: int) -> str | None:
    """The state letter of process `pid` (R, S, Z, ...), or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1]
    except (OSError, IndexError):
        return None


HEAD_PIDS: set[int] = set()  # every process of the e2e head, checked by test_nothing_left_running


def wait_http(url: str, timeout: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2)
            return
        except Exception:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow-server.db'}",
         "--artifacts-destination", str(tmp_path / "mlflow-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def ray_head(tmp_path):
    port, dash = free_port(), free_port()
    # every port of this head chosen free: another Ray on the machine may hold the defaults
    extra_ports = {flag: free_port() for flag in (
        "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
        "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port", "--ray-client-server-port",
    )}
    temp_dir = Path("/tmp") / f"ray-e2e-{os.getpid()}"  # short: Ray's socket paths are length-limited
    env = RAY_ENV
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=3", "--include-dashboard=true",
         f"--temp-dir={temp_dir}", "--disable-usage-stats", *(f"{k}={v}" for k, v in extra_ports.items())],
        check=True, env=env, capture_output=True, timeout=180,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        # without the token the job server refuses; with it, it answers
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{address}/api/version", timeout=10)
        assert refused.value.code == 401
        wait_http(f"{address}/api/version", 120, headers={"Authorization": f"Bearer {TOKEN}"})
        yield address, f"127.0.0.1:{port}"
    finally:
        HEAD_PIDS.update(stop_head([str(temp_dir), f":{port} "]))


def submit(address: str, args: list[str], *, env_vars: dict[str, str], timeout: int = 900) -> str:
    import yaml

    # jobs/runtime_env.yaml plus this submission's environment (e.g. MLFLOW_TRACKING_URI)
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    runtime_env.pop("working_dir")
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env_vars}
    deadline = time.time() + 180
    while True:  # the head's job agent may still be starting on a loaded machine
        out = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
             "--runtime-env-json", json.dumps(runtime_env), "--", *args],
            cwd=REPO, capture_output=True, text=True, timeout=timeout, env=RAY_ENV,
        )
        if "No available agent" not in out.stderr or time.time() > deadline:
            break
        time.sleep(5)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    log = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout)
    job_id = re.search(r"Job '(\S+)' submitted successfully", log).group(1)
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, job_id],
                            capture_output=True, text=True, timeout=120, env=RAY_ENV, cwd=REPO)
    assert f"Job '{job_id}' succeeded" in re.sub(r"\x1b\[[0-9;]*m", "", status.stdout), status.stdout + status.stderr
    return log


def test_submit_train_and_recommend_jobs_tracked_on_mlflow_server(tmp_path, mlflow_server, ray_head):
    address, _ = ray_head
    storage = tmp_path / "runs"
    log = submit(address, ["python", "jobs/train.py", "--config", "jobs/configs/smoke.yaml",
                           "--set", f"run.storage_path={storage}", "--set", "tracking.experiment=e2e"],
                 env_vars={"MLFLOW_TRACKING_URI": mlflow_server})
    assert "popularity" in log and "ndcg@10" in log
    metrics = json.loads((storage / "smoke" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2

    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["e2e"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "echomamba4rec" and run.data.params["run.name"] == "smoke"
    assert run.data.metrics["test_ndcg_at_10"] == pytest.approx(metrics["test"]["ndcg@10"])
    client = mlflow.tracking.MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "val_ndcg_at_10")) == 2
    ckpt = Path(client.download_artifacts(run.info.run_id, "best_checkpoint", str(tmp_path / "dl")))
    assert {"state.pt", "meta.json", "config.yaml"} <= {p.name for p in ckpt.iterdir()}

    # the logged model loads back from the server and scores a user
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    from echomamba_dist.config import ExperimentConfig, load
    from echomamba_dist.data.dataset import load_dataset

    ds = load_dataset(load(ExperimentConfig, REPO / "jobs/configs/smoke.yaml").data)
    history = [str(ds.item_ids[i]) for i in ds.items[ds.offsets[0] : ds.offsets[1]]]
    out = model.predict(pd.DataFrame({"history": [history]}), params={"k": 5})
    assert len(out["items"][0]) == 5 and not set(out["items"][0]) & set(history)

    # the evaluation job, from its config: the best checkpoint scores the test split as training did
    report = tmp_path / "evaluate.json"
    submit(address, ["python", "jobs/evaluate.py", "--config", "jobs/configs/evaluate-smoke.yaml",
                     "--set", f"checkpoint={storage / 'smoke'}", "--set", f"output={report}"], env_vars={})
    evaluated = json.loads(report.read_text())
    assert evaluated["split"] == "test" and evaluated["count"] == len(ds.user_ids)
    assert evaluated["ndcg@10"] == pytest.approx(metrics["test"]["ndcg@10"], abs=1e-6)

    # batch recommendation for every user on Ray Data, from its config, as a submitted job
    recs = tmp_path / "recs"
    submit(address, ["python", "jobs/recommend.py", "--config", "jobs/configs/recommend-smoke.yaml",
                     "--set", f"checkpoint={storage / 'smoke'}", "--set", f"output={recs}"], env_vars={})
    import pyarrow.parquet as pq

    table = pq.read_table(recs)
    assert table.num_rows == 5 * len(ds.user_ids)  # top_k: 5 in the config
    assert set(table.column("rank").to_pylist()) == {1, 2, 3, 4, 5}
    assert set(table.column("user_id").to_pylist()) == {str(u) for u in ds.user_ids}


def test_nothing_left_running():
    """Runs after the test above (file order): no Ray or MLflow server process of ours survives."""
    assert len(HEAD_PIDS) >= 5, HEAD_PIDS  # GCS, raylet, dashboard, monitors, workers were seen and stopped
    alive = [pid for pid in HEAD_PIDS if process_state(pid) not in (None, "Z")]  # a zombie has exited
    assert not alive, alive
    assert not head_processes([f"ray-e2e-{os.getpid()}", "mlflow-server.db"])
