"""benchmarks/table2.py: its aggregation, and the whole harness at smoke size (CI)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "table2.py"
EIGHT = ["narm", "gru4rec", "sasrec", "bert4rec", "mamba4rec", "bimamba4rec", "bimambaformer4rec", "echomamba4rec"]


def _load_table2():
    spec = importlib.util.spec_from_file_location("table2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def absolute_paths(report) -> list[str]:
    """Every string of a report (and word of its command) that is an absolute path."""
    if isinstance(report, dict):
        return [p for v in report.values() for p in absolute_paths(v)]
    if isinstance(report, list):
        return [p for v in report for p in absolute_paths(v)]
    if isinstance(report, str):
        words = (w.lstrip("`'\"(") for w in report.split())
        return [w for w in words if w.startswith("/") and "/" in w[1:]]  # not a lone "/" of a table
    return []


def _record(seed, hr, ndcg, *, stopped=True):
    metrics = {"hr@10": hr, "ndcg@10": ndcg, "mrr@10": ndcg / 2}
    return {"model": "echomamba4rec", "samples": "prefix", "seed": seed, "test": metrics, "valid": metrics,
            "epochs_run": 12, "best_epoch": 1, "stopped_early": stopped, "seconds_per_epoch": 2.0}


def test_mean_std_and_best_variant():
    t2 = _load_table2()
    assert t2.mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert t2.mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    assert t2.mean_std([])["n"] == 0
    variants = {
        "sum-last": t2.summarize([_record(1, 0.08, 0.040), _record(2, 0.08, 0.042)]),
        "concat-last": t2.summarize([_record(1, 0.09, 0.043), _record(2, 0.07, 0.041, stopped=False)]),
    }
    assert variants["concat-last"]["valid"]["ndcg@10"]["mean"] == pytest.approx(0.042)
    assert not variants["concat-last"]["all_stopped_early"]
    assert t2.best_variant(variants) == "concat-last"
    assert t2.paper_key("amazon-beauty") == "beauty" and t2.paper_key("amazon-video-games") == "video-games"
    assert t2.paper_key("ml-100k") is None
    # early stopping is the loop's patience rule, whatever the epoch cap
    assert t2.stopped_early(epochs_run=29, best_epoch=18, patience=10)
    assert not t2.stopped_early(epochs_run=28, best_epoch=18, patience=10)  # stopped by a cap of 28
    assert not t2.stopped_early(epochs_run=300, best_epoch=200, patience=0)  # no early stopping
    assert t2.stopped_early(epochs_run=300, best_epoch=289, patience=10)  # patience ran out at the cap
    assert set(t2.PAPER["beauty"]) == set(EIGHT) == set(t2.MODEL_ORDER)


@pytest.mark.slow
def test_table2_smoke_runs_all_eight_models(tmp_path):
    out = tmp_path / "results" / "table2-smoke.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] and report["settings"]["smoke"]
    assert list(report["summary"]) == EIGHT
    assert [r["model"] for r in report["runs"]] == EIGHT
    for run in report["runs"]:
        assert run["epochs_run"] == 1
        assert all(math.isfinite(run["test"][m]) for m in ("hr@10", "ndcg@10", "mrr@10"))
    for name, summary in report["summary"].items():
        assert all(math.isfinite(summary["test"][m]["mean"]) for m in ("hr@10", "ndcg@10", "mrr@10")), name
    assert report["hardware"]["torch"] and "commit" in report["git"] and report["wall_seconds"] > 0
    assert not absolute_paths(report) and not absolute_paths(out.with_suffix(".md").read_text())
    markdown = out.with_suffix(".md").read_text()
    for label in ("NARM", "GRU4Rec", "SASRec", "BERT4Rec", "Mamba4Rec", "Bi-Mamba4Rec",
                  "Bi-Mambaformer4Rec", "EchoMamba4Rec"):
        assert f"| {label} " in markdown
    assert not list(tmp_path.glob("runs")) and not (REPO / "runs" / "table2" / "synthetic-smoke").exists()


@pytest.mark.slow
def test_table2_prefix_samples_for_the_causal_baselines(tmp_path):
    """`--samples prefix`: GRU4Rec and BERT4Rec train on prefix rows (RecBole's way), in runs of
    their own; BERT4Rec with RecBole's masking (the target masked at the end + random masking)."""
    out = tmp_path / "t2.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--samples", "prefix", "--models", "gru4rec", "bert4rec", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["settings"]["samples"] == "prefix"
    assert [r["run_name"] for r in report["runs"]] == ["gru4rec-prefix-seed1", "bert4rec-prefix-seed1"]
    gru, bert = report["runs"]
    assert (gru["samples"], bert["samples"]) == ("prefix", "prefix")
    assert gru["steps"] == bert["steps"]  # the same prefix rows, the same batches an epoch


@pytest.mark.slow
def test_collect_tabulates_finished_runs_as_the_harness_did(tmp_path):
    """`--collect` reads run directories (metrics.json + checkpoint config) and gives the numbers the
    harness recorded for the same runs; bad run directories are refused by name."""
    out, runs = tmp_path / "t2.json", tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--samples", "prefix", "--models", "gru4rec", "sasrec",
         "--seeds", "1", "2", "--runs", str(runs), "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    harness = json.loads(out.read_text())
    dirs = sorted(runs.iterdir())
    assert [d.name for d in dirs] == ["gru4rec-prefix-seed1", "gru4rec-prefix-seed2", "sasrec-prefix-seed1", "sasrec-prefix-seed2"]

    t2 = _load_table2()
    collected = tmp_path / "collected.json"
    assert t2.main(["--collect", *map(str, dirs), "--note", "trained by the harness", "--out", str(collected)]) == 0
    report = json.loads(collected.read_text())
    assert report["collected"] and list(report["summary"]) == ["gru4rec", "sasrec"]
    for model in ("gru4rec", "sasrec"):
        ours, theirs = report["summary"][model], harness["summary"][model]
        assert ours["seeds"] == [1, 2] and ours["samples"] == ["prefix"]
        for metric in ("hr@10", "ndcg@10", "mrr@10"):
            assert ours["test"][metric] == pytest.approx(theirs["test"][metric])
    assert report["settings"]["batch_size"] == 64 and report["settings"]["epochs"] == 1
    markdown = collected.with_suffix(".md").read_text()
    assert "| `sasrec-prefix-seed2` | SASRec | prefix | 2 |" in markdown
    assert "- trained by the harness" in markdown

    # One model on both kinds of rows: two entries, named by their rows.
    allpos = tmp_path / "allpos"
    t2.main(["--smoke", "--models", "sasrec", "--seeds", "1", "--runs", str(allpos), "--out", str(tmp_path / "a.json")])
    both = tmp_path / "both.json"
    t2.main(["--collect", str(dirs[2]), str(allpos / "sasrec-seed1"), "--out", str(both)])
    summary = json.loads(both.read_text())["summary"]
    assert list(summary) == ["sasrec/all_positions", "sasrec/prefix"]

    # Refused, by name: an unfinished run, different settings, the same run twice.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(dirs[0], unfinished)
    (unfinished / "metrics.json").unlink()
    with pytest.raises(SystemExit, match="unfinished: no metrics.json"):
        t2.main(["--collect", str(dirs[0]), str(unfinished), "--out", str(tmp_path / "x.json")])
    other = tmp_path / "other" / "gru4rec-prefix-seed9"
    shutil.copytree(dirs[0], other)
    for config in other.glob("epoch_*/config.yaml"):
        config.write_text(config.read_text().replace("batch_size: 64", "batch_size: 128"))
    with pytest.raises(SystemExit, match=r"gru4rec-prefix-seed9: train.batch_size is 128, but .* 64"):
        t2.main(["--collect", str(dirs[0]), str(other), "--out", str(tmp_path / "x.json")])
    for config in other.glob("epoch_*/config.yaml"):  # another epoch cap alone is allowed
        config.write_text(config.read_text().replace("batch_size: 128", "batch_size: 64").replace("epochs: 1", "epochs: 3"))
    assert t2.main(["--collect", str(dirs[0]), str(other), "--out", str(tmp_path / "caps.json")]) == 0
    caps = json.loads((tmp_path / "caps.json").read_text())
    assert caps["settings"]["epochs"] == 3 and [r["stopped_early"] for r in caps["runs"]] == [False, False]
    with pytest.raises(SystemExit, match="a run of the same name"):
        t2.main(["--collect", str(dirs[0]), str(dirs[0]), "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def _fake_run(root, name, *, model_overrides, history, best_epoch, epochs_cap, patience=1, test_hr=0.05):
    """A finished run directory as `echomamba train` leaves it: metrics.json and one checkpoint
    (config.yaml, meta.json with the per-epoch history); no weights, which --collect never reads."""
    import yaml

    run_dir = root / name
    ckpt = run_dir / f"epoch_{len(history) - 1:06d}"
    ckpt.mkdir(parents=True)
    cfg = {
        "data": {"path": "/data/prepared/amazon-beauty", "max_len": 50},
        "model": {"name": "echomamba4rec", "hidden_size": 64, "dropout": 0.2, "combine": "sum", "readout": "last",
                  "filter": True, "bidirectional": True, **model_overrides},
        "train": {"epochs": epochs_cap, "patience": patience, "batch_size": 2048, "lr": 0.001, "metric": "ndcg@10",
                  "seed": 42, "samples": "auto"},
        "run": {"name": name},
    }
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
    hist = [{"epoch": e, "epoch_seconds": 10.0, "val_ndcg@10": v} for e, v in enumerate(history)]
    (ckpt / "meta.json").write_text(json.dumps({"history": hist}))
    best = history[best_epoch]
    metrics = lambda hr, ndcg: {"hr@10": hr, "ndcg@10": ndcg, "mrr@10": ndcg / 2}  # noqa: E731
    (run_dir / "metrics.json").write_text(json.dumps({
        "best_epoch": best_epoch, "epochs_run": len(history), "steps": 10 * len(history),
        "valid": metrics(2 * best, best), "test": metrics(test_hr, test_hr / 2), "test_users": 100,
        "popularity": metrics(0.01, 0.005), "dataset_fingerprint": "f00d",
    }))  # fmt: skip
    return run_dir


def test_collect_variant_study_compares_variants_at_an_epoch_budget(tmp_path):
    """Variant runs are their own entries; the study picks on full validation NDCG@10, or with
    --variant-epochs on the first N epochs of each run, and its pick stands in the main row."""
    t2 = _load_table2()
    assert t2.echo_variant({"name": "echomamba4rec", "combine": "sum", "readout": "last"}) == "sum-last"
    assert t2.echo_variant({"combine": "concat", "readout": "last", "filter": True}) == "concat-last"
    assert t2.echo_variant({"filter": False}) == "no-filter"
    assert t2.echo_variant({"filter": False, "bidirectional": False}) is None  # not a variant of the study

    # The default trained to early stopping (best epoch 4, patience 1); two variants capped at 2 epochs.
    default = _fake_run(tmp_path, "beauty-echo", model_overrides={}, history=[0.010, 0.020, 0.030, 0.050, 0.040],
                        best_epoch=3, epochs_cap=300, test_hr=0.07)
    concat = _fake_run(tmp_path, "beauty-echo-concat", model_overrides={"combine": "concat"},
                       history=[0.020, 0.035], best_epoch=1, epochs_cap=2, test_hr=0.06)
    ends = _fake_run(tmp_path, "beauty-echo-ends", model_overrides={"readout": "ends"},
                     history=[0.015, 0.025], best_epoch=1, epochs_cap=2, test_hr=0.05)
    dirs = [str(default), str(concat), str(ends)]

    # On each run's own best validation NDCG@10 the default wins (0.050 against 0.035 and 0.025) ...
    full = tmp_path / "full.json"
    assert t2.main(["--collect", *dirs, "--dataset-name", "amazon-beauty", "--out", str(full)]) == 0
    report = json.loads(full.read_text())
    assert list(report["variants"]["summary"]) == ["sum-last", "concat-last", "sum-ends"]
    assert report["variants"]["best"] == "sum-last" and report["variants"]["budget_epochs"] is None
    # paths relative to the repository (or, outside it, the run's storage directory and name)
    assert [r["run_dir"] for r in report["runs"]] == [f"{tmp_path.name}/{Path(d).name}" for d in dirs]
    assert not absolute_paths(report) and not absolute_paths(full.with_suffix(".md").read_text())
    assert t2.shown_path(REPO / "runs" / "beauty-sasrec") == "runs/beauty-sasrec"
    assert report["summary"]["echomamba4rec"]["test"]["hr@10"]["mean"] == pytest.approx(0.07)
    assert not any(name.startswith("echomamba4rec/") for name in report["summary"])

    # ... but within the first 2 epochs concat leads (0.035 against 0.020 and 0.025), and its run
    # (capped, so marked †) stands in the main table.
    budget = tmp_path / "budget.json"
    assert t2.main(["--collect", *dirs, "--variant-epochs", "2", "--dataset-name", "amazon-beauty", "--out", str(budget)]) == 0
    report = json.loads(budget.read_text())
    study = report["variants"]
    assert study["best"] == "concat-last" and study["budget_epochs"] == 2
    within = {v: s["valid_within_budget"]["mean"] for v, s in study["summary"].items()}
    assert within == pytest.approx({"sum-last": 0.020, "concat-last": 0.035, "sum-ends": 0.025})
    assert report["summary"]["echomamba4rec"]["test"]["hr@10"]["mean"] == pytest.approx(0.06)
    targets = {(t["model"], t["metric"]): t["measured"] for t in report["targets"]}
    assert targets[("echomamba4rec", "hr@10")] == pytest.approx(0.06)
    markdown = budget.with_suffix(".md").read_text()
    assert "| EchoMamba4Rec (concat-last) † | " in markdown
    assert "| concat-last † **(best)** | combine=concat | 2 (2) | 0.0350 |" in markdown
    assert "| `beauty-echo-ends` | EchoMamba4Rec (sum-ends) |" in markdown

    # A budget beyond what a capped variant trained is refused by the run's name; so is a budget
    # with no variants to compare.
    with pytest.raises(SystemExit, match="beauty-echo-concat: 2 epochs .* fewer than the variant budget of 3"):
        t2.main(["--collect", *dirs, "--variant-epochs", "3", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="--variant-epochs: no EchoMamba4Rec variant runs"):
        t2.main(["--collect", str(default), "--variant-epochs", "2", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
