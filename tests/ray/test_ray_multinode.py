"""Two Ray nodes on 127.0.0.1 (`ray start` twice, one CPU each): `echomamba train` with
RAY_ADDRESS places its two workers on different nodes and trains to completion, with the run's
storage path shared by both nodes.

The nodes are started with `ray start --block` and stopped by signalling those processes, never
with `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ray_test_helpers import (
    free_port,
    kill_all,
    processes_mentioning,
    short_tmpdir,
    tiny_config,
    wait_until_gone,
    write_config,
)

pytestmark = pytest.mark.slow

# a loopback-only test cluster: no token to distribute between the nodes and the driver
CLUSTER_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5"}


def ray_start(args: list[str], *, env: dict[str, str], log) -> subprocess.Popen:
    # ports that would otherwise be fixed defaults, shared with any other Ray on the machine
    ports = ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())]
    if "--head" in args:
        ports += ["--ray-client-server-port", str(free_port()), "--dashboard-port", str(free_port()),
                  "--include-dashboard=false"]
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats", *args, *ports],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )


def wait_for_nodes(address: str, count: int, *, env: dict[str, str], timeout: float = 120) -> list[str]:
    """The ids of the cluster's alive nodes, once there are `count` of them."""
    code = (
        "import ray, time\n"
        f"ray.init(address={address!r}, log_to_driver=False)\n"
        f"deadline = time.monotonic() + {timeout}\n"
        "while True:\n"
        "    alive = [n['NodeID'] for n in ray.nodes() if n['Alive']]\n"
        f"    if len(alive) >= {count} or time.monotonic() > deadline: break\n"
        "    time.sleep(1)\n"
        "print('NODES', ' '.join(alive))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout + 60)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("NODES")), "NODES")
    return line.split()[1:]


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A head and a worker node, one CPU each; yields (address, node ids, env)."""
    temp_dir = short_tmpdir("rc")
    logs = tmp_path_factory.mktemp("cluster")
    runner_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    runner_env.update(CLUSTER_ENV, PYTHONUNBUFFERED="1")
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs = []
    try:
        with open(logs / "head.log", "w") as head_log, open(logs / "node.log", "w") as node_log:
            procs.append(ray_start(
                ["--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1", f"--temp-dir={temp_dir}"],
                env=runner_env, log=head_log,
            ))
            procs.append(ray_start(  # it retries until the head's GCS is up
                [f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1"],
                env=runner_env, log=node_log,
            ))
            nodes = wait_for_nodes(address, 2, env=runner_env)
            assert len(nodes) == 2, (logs / "head.log").read_text()[-2000:] + (logs / "node.log").read_text()[-2000:]
            yield address, nodes, {**runner_env, "RAY_ADDRESS": address}
    finally:
        for proc in reversed(procs):  # the worker node first (its drain talks to the head), then the head
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        kill_all(wait_until_gone(str(temp_dir), timeout=30))
        assert processes_mentioning(str(temp_dir)) == []


def test_two_workers_on_two_nodes_train_to_completion(two_node_cluster, tmp_path):
    address, nodes, env = two_node_cluster
    storage = tmp_path / "shared"  # both nodes see it: they share this machine's disk
    cfg = tiny_config(tmp_path, run={"name": "multinode", "storage_path": str(storage)})
    config_file = write_config(tmp_path / "c.yaml", cfg)
    done = subprocess.run(
        [sys.executable, "-m", "echomamba_dist.cli", "train", "--config", str(config_file),
         "--set", "train.num_workers=2", "--set", "train.cpus_per_worker=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=480,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    placed = dict(re.findall(r"worker (\d)/2 on node ([0-9a-f]+)", done.stdout))
    assert set(placed) == {"0", "1"}
    assert placed["0"] != placed["1"] and set(placed.values()) == set(nodes)
    metrics = json.loads((storage / "multinode" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["test_users"] == 200
    assert (storage / "multinode" / "epoch_000001" / "state.pt").is_file()
