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


def test_plot_validation_draws_each_runs_history(tmp_path):
    def run(name, model, history, best_epoch, variant=None):
        return {"run_name": name, "model": model, "samples": "prefix", "seed": 1, "variant": variant,
                "valid_history": history, "best_epoch": best_epoch}

    report = {"dataset": {"name": "tiny"}, "settings": {"metric": "ndcg@10"}, "runs": [
        run("r-sasrec", "sasrec", [0.01, 0.03, 0.02], 1),
        run("r-echo", "echomamba4rec", [0.02, 0.04, 0.05], 2, "sum-last"),
        run("r-echo-concat", "echomamba4rec", [0.01, 0.015], 1, "concat-last"),
    ]}  # fmt: skip
    path, png = tmp_path / "t2.json", tmp_path / "plots" / "validation.png"
    path.write_text(json.dumps(report))
    proc = _run("benchmarks/plot_validation.py", "--report", str(path), "--out", str(png))
    lines = proc.stdout.splitlines()
    assert "SASRec" in lines[0] and "3 epochs  best 0.0300 at epoch 2" in lines[0]
    assert "EchoMamba4Rec (concat-last)" in lines[2] and "best 0.0150 at epoch 2" in lines[2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(png.parent.glob(".*"))


def test_sample_memory_smoke(tmp_path):
    out = tmp_path / "sample_memory.json"
    proc = _run("benchmarks/sample_memory.py", "--smoke", "--work", str(tmp_path / "work"), "--out", str(out))
    report = json.loads(out.read_text())
    _common_fields(report)
    res = report["results"]
    # train-1 only (it measures the source too); tests/ray/test_ray_train.py covers the Ray path
    assert set(res) == {"train-1:windows", "train-1:dense"}
    assert res["train-1:windows"]["samples"] == res["train-1:dense"]["samples"] > 0  # the same samples
    for kind in ("windows", "dense"):
        one = res[f"train-1:{kind}"]
        assert one["dataset_mib"] > 0 and one["source_peak_added_mib"] is not None
        assert one["steps"] == 3 and one["steps_per_second"] > 0
    # a windows source holds far less than the dense matrices of the same samples
    assert res["train-1:windows"]["source_peak_added_mib"] < res["train-1:dense"]["source_peak_added_mib"]
    assert "| windows | " + format(res["train-1:windows"]["samples"], ",") in proc.stdout and "| dense |" in proc.stdout


def test_epoch_smoke(tmp_path):
    out = tmp_path / "epoch.json"
    proc = _run("benchmarks/epoch.py", "--smoke", "--out", str(out))
    report = json.loads(out.read_text())
    _common_fields(report)
    runs = ("echomamba4rec", "sasrec", "echomamba4rec-unoptimised")
    for run in runs:
        epochs = report["results"][run]
        assert [e["epoch"] for e in epochs] == [0, 1] and all(e["steps"] > 0 for e in epochs)
        assert all(e["train_wall_s"] > 0 and e["train_cpu_s"] > 0 and e["valid_wall_s"] > 0 for e in epochs)
        assert all(len(e["load_average_before"]) == 3 for e in epochs)
    summary = report["summary"]
    assert summary["echomamba_vs_sasrec_train_wall"] > 0 and summary["unoptimised_vs_echomamba_train_wall"] > 0
    # the optimised and unoptimised paths train alike: same batches and dropout draws
    assert summary["loss_max_abs_diff"] <= 1e-4 and summary["valid_metric_max_abs_diff"] <= 1e-4
    assert "| echomamba4rec-unoptimised |" in proc.stdout
