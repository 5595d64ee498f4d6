"""The benchmark scripts at smoke size, so that none of them rots (CI; marked slow).

Each runs as its users run it, a subprocess from the repository root, on tiny synthetic data;
the tests check the JSON each writes (and the plot). About 90 s together on an idle 2-core
machine, far longer on a loaded one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _common_fields(report: dict) -> None:
    assert report["command"].startswith("python benchmarks/")
    assert len(report["load_average_start"]) == 3 and len(report["load_average_end"]) == 3
    assert report["hardware"]["cpu_cores"] >= 1 and report["hardware"]["torch"]


def test_table3_smoke(tmp_path):
    out = tmp_path / "table3.json"
    proc = _run("benchmarks/table3.py", "--smoke", "--models", "sasrec", "echomamba4rec", "--out", str(out))
    report = json.loads(out.read_text())
    _common_fields(report)
    for name in ("sasrec", "echomamba4rec"):
        r = report["results"][name]
        assert r["train"]["steps_timed"] == 1 and r["train"]["epoch_seconds"] > 0
        assert r["inference"]["users"] == 100 and r["inference"]["seconds"] > 0
        assert r["train_peak_mib"] is not None
    assert "| EchoMamba4Rec |" in proc.stdout and "70.2" in proc.stdout  # beside the paper's row


def test_seq_len_scaling_smoke(tmp_path):
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    _run("benchmarks/seq_len_scaling.py", "--smoke", "--out", str(out), "--plot", str(png))
    report = json.loads(out.read_text())
    _common_fields(report)
    for name in ("echomamba4rec", "sasrec"):
        assert set(report["results"][name]) == {"8", "16"}
        assert all(r["step_seconds"] > 0 for r in report["results"][name].values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seq_len_scaling_records_a_point_over_budget_as_skipped(tmp_path):
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    _run("benchmarks/seq_len_scaling.py", "--smoke", "--models", "sasrec", "--time-budget", "0.0001",
         "--out", str(out), "--plot", str(png))  # fmt: skip
    results = json.loads(out.read_text())["results"]["sasrec"]
    assert "time budget" in results["8"]["skipped"]
    assert "already over budget" in results["16"]["skipped"]  # longer lengths are not tried
    assert png.is_file()


def test_bucketing_smoke(tmp_path):
    out = tmp_path / "bucketing.json"
    _run("benchmarks/bucketing.py", "--smoke", "--models", "echomamba4rec", "--out", str(out))
    report = json.loads(out.read_text())
    _common_fields(report)
    r = report["results"]["echomamba4rec"]
    assert r["off"]["padding"]["mean_width"] == 20  # max_len: every batch fully padded
    assert r["on"]["padding"]["padding_fraction"] < r["off"]["padding"]["padding_fraction"]
    assert r["on"]["padding"]["real_tokens"] == r["off"]["padding"]["real_tokens"]
    assert "time_saved_fraction" in r


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run("benchmarks/gpu_check.py", "--cpu-smoke", "--out", str(out))
    report = json.loads(out.read_text())
    _common_fields(report)
    assert report["mode"].startswith("cpu smoke")
    assert report["scan"]["backend"] == "cpu" and report["scan"]["ok"]
    assert "skipped" in report["block"] and "skipped" in proc.stdout
    assert set(report["timing"]) == {f"{m}/{p}" for m in ("sasrec", "mamba4rec", "echomamba4rec") for p in ("fp32", "bf16")}
    assert report["modules_loaded"] == {"ray": False, "mlflow": False}


def test_scan_backends_smoke_at_a_shape_too_small_to_measure_memory(tmp_path):
    out = tmp_path / "scan.json"
    proc = _run("benchmarks/scan_backends.py", "--batch", "2", "--length", "4", "--d-inner", "4", "--d-state", "2",
                "--reps", "1", "--no-block", "--out", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    assert report["ratios"]["cpu_speedup_vs_reference"] > 0
    # a peak below the RSS mark's resolution is reported as "nothing to compare", not a crash
    mem = report["ratios"]["cpu_peak_memory_vs_reference"]
    assert mem is None or mem > 0
    assert "cpu vs reference" in proc.stdout
