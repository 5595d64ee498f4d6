"""The main job (`echomamba train`, no config: Ray Train on a local Ray, MLflow to a local store)
prints our own lines only: the workers' and epochs' lines, the registered model, the metrics
table. No WARNING or ERROR line of Ray or MLflow, none of Ray's internal report lines, and no
Ray process is left behind. Two epochs instead of the job's eight keep it short."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

OURS = [
    r"worker \d+/\d+ on node \S+ \(.*\), device cpu, \d+ threads",
    r"epoch +\d+  loss \d+\.\d+  val ndcg@10 \d\.\d{4}( \*|  ) +\d+\.\ds +[\d,]+ samples/s",
    r"MLflow: registered model 'echomamba4rec-synthetic' version \d+ \(models:/echomamba4rec-synthetic/\d+\)",
    r"model echomamba4rec  run echomamba4rec-synthetic  best epoch \d+  epochs \d+  test users \d+",
    r" +(hr|ndcg|mrr|recall)@10( +(hr|ndcg|mrr|recall)@10)*",
    r"(valid|test|popularity) +( +\d\.\d{4})+",
    r"checkpoints and metrics\.json in .*runs/echomamba4rec-synthetic",
    r"",
]
FOREIGN = ("WARNING", "ERROR", "Reporting training result", "PlacementGroupCleaner", "TrainController", "pid=",
           "Traceback", "INFO", "Deprecat")


def our_processes(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_the_main_job_prints_our_own_lines_only(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="mj", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update({"RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"})
    done = subprocess.run([sys.executable, "-m", "echomamba_dist.cli", "train", "--set", "train.epochs=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    lines = output.splitlines()
    foreign = [line for line in lines if any(word in line for word in FOREIGN)]
    assert foreign == [], "\n".join(foreign[:20])
    unknown = [line for line in lines if not any(re.fullmatch(p, line) for p in OURS)]
    assert unknown == [], "\n".join(unknown[:20])
    assert sum(bool(re.match(r"epoch +\d+  loss", line)) for line in lines) == 2  # each epoch shown once
    assert sum(line.startswith("worker 0/1") for line in lines) == 1
    assert (tmp_path / "runs" / "echomamba4rec-synthetic" / "train.log").is_file()  # what was shown, kept
    deadline = time.monotonic() + 60
    while our_processes(ray_tmp) and time.monotonic() < deadline:
        time.sleep(1)
    assert our_processes(ray_tmp) == []
