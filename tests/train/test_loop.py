"""The per-worker training loop called directly (no Ray): training, early stopping, checkpoints,
resumption after a kill, tracking, and the CLI around it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from echomamba_dist.cli import main
from echomamba_dist.config import experiment_from_dict, to_dict
from echomamba_dist.train.checkpoint import checkpoint_dirs, read_meta
from echomamba_dist.train.loop import BatchSource, train_per_worker

REPO = Path(__file__).resolve().parents[2]


def tiny_config(tmp_path: Path, **sections) -> dict:
    cfg = {
        "data": {"synthetic": {"n_users": 200, "n_items": 60, "n_topics": 4, "mean_length": 9.0}, "max_len": 12},
        "model": {"name": "echomamba4rec", "hidden_size": 16, "d_state": 8, "max_len": 12},
        "train": {"epochs": 2, "batch_size": 128, "eval_batch_size": 256, "ray": False, "progress": False},
        "run": {"name": "t", "storage_path": str(tmp_path / "runs")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def test_batch_source_is_deterministic_and_splits_exactly():
    samples = {
        "item_seq": np.arange(50 * 4).reshape(50, 4),
        "seq_len": np.full(50, 4),
        "target": np.arange(50),
    }
    one = BatchSource(samples, global_batch=8, seed=3)
    halves = [BatchSource(samples, global_batch=8, seed=3, rank=r, world_size=2) for r in range(2)]
    cpu = torch.device("cpu")
    for epoch in (0, 1):
        whole = [b["target"] for b in one.epoch(epoch, device=cpu)]
        parts = [[b["target"] for b in h.epoch(epoch, device=cpu)] for h in halves]
        assert len(whole) == len(parts[0]) == len(parts[1]) == 7
        for w, a, b in zip(whole, *parts):
            assert torch.equal(w, torch.cat([a, b]))
    e0 = np.concatenate([b["target"].numpy() for b in one.epoch(0, device=cpu)])
    e1 = np.concatenate([b["target"].numpy() for b in one.epoch(1, device=cpu)])
    assert sorted(e0) == list(range(50)) and not np.array_equal(e0, e1)  # a new shuffle each epoch


def test_bucketing_trims_padding_and_keeps_every_sample():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 11, size=300)
    seq = np.zeros((300, 10), dtype=np.int64)
    for i, n in enumerate(lengths):
        seq[i, :n] = rng.integers(1, 50, size=n)
    samples = {"item_seq": seq, "seq_len": lengths, "target": np.arange(300)}
    src = BatchSource(samples, global_batch=16, seed=0, bucketing=True, bucket_window=4)
    seen, widths = [], []
    for b in src.epoch(0, device=torch.device("cpu")):
        widths.append(b["item_seq"].shape[1])
        assert b["item_seq"].shape[1] == int(b["seq_len"].max())
        seen.extend(b["target"].tolist())
    assert sorted(seen) == list(range(300))
    assert np.mean(widths) < 10  # padding was trimmed


def test_train_evaluate_checkpoint_and_track(tmp_path):
    cfg = tiny_config(tmp_path)
    result = train_per_worker(cfg)
    run_dir = tmp_path / "runs" / "t"
    assert result["epochs_run"] == 2 and result["best_epoch"] in (0, 1)
    assert set(result["test"]) == {f"{m}@10" for m in ("hr", "ndcg", "mrr", "recall")}
    assert result["test_users"] == 200
    assert result["test"]["hr@10"] >= result["test"]["ndcg@10"] >= result["test"]["mrr@10"]
    assert json.loads((run_dir / "metrics.json").read_text())["test"] == result["test"]
    ckpts = checkpoint_dirs(run_dir)
    assert [p.name for p in ckpts] == ["epoch_000000", "epoch_000001"]
    assert read_meta(ckpts[-1])["epoch"] == 2  # the next epoch to run

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tests"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "echomamba4rec"
    assert run.data.params["train.batch_size"] == "128"
    assert "dataset.fingerprint" in run.data.tags and "git.commit" in run.data.tags
    assert run.data.metrics["test_ndcg_at_10"] == pytest.approx(result["test"]["ndcg@10"])
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "val_ndcg_at_10")
    assert [m.step for m in history] == [0, 1]
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "best_checkpoint"} <= artifacts


def test_same_seed_same_result_and_resume_is_a_no_op(tmp_path):
    a = train_per_worker(tiny_config(tmp_path / "a", tracking={"enabled": False}))
    b = train_per_worker(tiny_config(tmp_path / "b", tracking={"enabled": False}))
    assert a["test"] == b["test"] and a["valid"] == b["valid"]
    again = train_per_worker(tiny_config(tmp_path / "a", tracking={"enabled": False}))
    assert again["epochs_run"] == 2 and again["steps"] == a["steps"] and again["test"] == a["test"]


def test_early_stopping_stops_after_patience(tmp_path):
    cfg = tiny_config(tmp_path, train={"epochs": 30, "patience": 1, "lr": 0.5}, tracking={"enabled": False})
    result = train_per_worker(cfg)
    # a huge learning rate makes validation stop improving quickly
    assert result["epochs_run"] == result["best_epoch"] + 2
    assert result["epochs_run"] < 30


def _run_cli(args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "echomamba_dist.cli", *args], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=600,
    )


def test_killed_run_resumes_from_its_checkpoint_with_the_same_result(tmp_path):
    cfg_path = tmp_path / "c.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(tiny_config(tmp_path, train={"epochs": 3}, tracking={"enabled": False})))
    # an uninterrupted run
    ref = _run_cli(["train", "--config", str(cfg_path), "--set", "run.name=ref"], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    # the same run killed (SIGKILL) in its second epoch, then started again with the same name
    ref_metrics = json.loads((tmp_path / "runs" / "ref" / "metrics.json").read_text())
    steps_per_epoch = ref_metrics["steps"] // 3
    killed = _run_cli(["train", "--config", str(cfg_path), "--set", "run.name=kill",
                       "--set", f"train.fail_at_step={steps_per_epoch + 1}"], cwd=tmp_path)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert [p.name for p in checkpoint_dirs(tmp_path / "runs" / "kill")] == ["epoch_000000"]
    resumed = _run_cli(["train", "--config", str(cfg_path), "--set", "run.name=kill",
                        "--set", f"train.fail_at_step={steps_per_epoch + 1}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    res_metrics = json.loads((tmp_path / "runs" / "kill" / "metrics.json").read_text())
    assert res_metrics["test"] == ref_metrics["test"]
    assert res_metrics["steps"] == ref_metrics["steps"]


def test_cli_train_evaluate_recommend(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path)
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", "c.yaml"]) == 0
    out = capsys.readouterr().out
    assert "popularity" in out and "ndcg@10" in out
    result = json.loads((tmp_path / "runs" / "t" / "metrics.json").read_text())

    assert main(["evaluate", "--checkpoint", "runs/t"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["ndcg@10"] == pytest.approx(result["test"]["ndcg@10"], abs=1e-6)
    assert scored["count"] == 200

    assert main(["recommend", "--checkpoint", "runs/t", "--output", "recs.parquet", "-k", "5"]) == 0
    assert "for 200 users" in capsys.readouterr().out
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "recs.parquet").to_pydict()
    assert len(table["user_id"]) == 200 * 5
    assert table["rank"][:5] == [1, 2, 3, 4, 5]
    assert all(s1 >= s2 for s1, s2 in zip(table["score"][:4], table["score"][1:5]))

    item = table["item_id"][0]
    assert main(["recommend", "--checkpoint", "runs/t", "--history", item, "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and item not in [ln.split()[1] for ln in lines]  # history excluded

    # the job configs: jobs/configs/evaluate-smoke.yaml writes a JSON report; flags and --set win
    repo = Path(__file__).resolve().parents[2]
    assert main(["evaluate", "--config", str(repo / "jobs/configs/evaluate-smoke.yaml"), "--checkpoint", "runs/t",
                 "--set", "split=valid", "--output", "reports/valid.json"]) == 0  # fmt: skip
    capsys.readouterr()
    report = json.loads((tmp_path / "reports" / "valid.json").read_text())
    assert report["split"] == "valid" and report["ndcg@10"] == pytest.approx(result["valid"]["ndcg@10"], abs=1e-6)
    assert not list((tmp_path / "reports").glob(".*.tmp"))  # written atomically
    two = table["user_id"][0], table["user_id"][5]
    assert main(["recommend", "--config", str(repo / "jobs/configs/recommend-smoke.yaml"), "--checkpoint", "runs/t",
                 "--set", "ray=false", "--output", "two.parquet", "--users", ",".join(two)]) == 0  # fmt: skip
    assert "for 2 users" in capsys.readouterr().out
    some = pq.read_table(tmp_path / "two.parquet").to_pydict()
    assert some["user_id"] == [two[0]] * 5 + [two[1]] * 5  # top_k: 5 from the config
    assert some["item_id"][:5] == table["item_id"][:5]


def test_cli_errors_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--set", "train.lr=fast"]) == 2
    assert "train.lr: expected a number" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", "nowhere"]) == 2
    assert "nowhere: no such checkpoint" in capsys.readouterr().err
    assert main(["train", "--config", "missing.yaml"]) == 2
    assert main(["recommend", "--checkpoint", "runs/x"]) == 2
    assert "output / history: give exactly one" in capsys.readouterr().err
    (tmp_path / "e.yaml").write_text("checkpoint: runs/x\nsplitt: test\n")
    assert main(["evaluate", "--config", "e.yaml"]) == 2
    assert "e.yaml: unknown config key splitt" in capsys.readouterr().err


def test_cli_models_lists_every_model(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("echomamba4rec", "sasrec", "gru4rec", "mamba4rec"):
        assert name in out


def test_print_config(capsys):
    assert main(["train", "--print-config", "--set", "model.name=sasrec"]) == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["name"] == "sasrec" and printed["train"]["lr"] == 0.001
    assert to_dict(experiment_from_dict(printed)) == printed


@pytest.mark.slow
def test_main_job_model_beats_popularity_on_the_builtin_data(tmp_path):
    """The main job (its packaged config), three epochs in-process: far above popularity."""
    import yaml

    from echomamba_dist.cli import MAIN_JOB_CONFIG

    cfg = yaml.safe_load(MAIN_JOB_CONFIG.read_text())
    cfg["train"].update({"epochs": 3, "ray": False, "progress": False})
    cfg["run"] = {"name": "main", "storage_path": str(tmp_path / "runs")}
    cfg["tracking"] = {"enabled": False}
    result = train_per_worker(cfg)
    assert result["model"] == "echomamba4rec" and result["test_users"] == 2000
    assert result["test"]["ndcg@10"] > 2 * result["popularity"]["ndcg@10"]
    assert result["test"]["hr@10"] > 1.5 * result["popularity"]["hr@10"]


def test_a_causal_model_trains_on_prefix_samples(tmp_path):
    """`train.samples: prefix` (RecBole's augmentation): every prefix is a row, the batch counts
    prefixes, so an epoch takes as many steps as prefixes / batch, not users / batch."""
    from echomamba_dist.data.dataset import load_dataset
    from echomamba_dist.data.splits import leave_one_out

    model = {"name": "gru4rec", "hidden_size": 16, "gru_size": 16}
    runs = {}
    for samples in ("auto", "prefix"):
        cfg = tiny_config(tmp_path, train={"samples": samples, "epochs": 1, "patience": 0},
                          run={"name": f"gru-{samples}"}, tracking={"enabled": False})  # fmt: skip
        cfg["model"] = model
        runs[samples] = train_per_worker(cfg)
    cfg = experiment_from_dict(tiny_config(tmp_path))
    loo = leave_one_out(*(lambda d: (d.offsets, d.items))(load_dataset(cfg.data)))
    users = int((np.diff(loo.train_offsets) >= 2).sum())  # users with a target
    prefixes = int(np.clip(np.diff(loo.train_offsets) - 1, 0, None).sum())  # one per target
    assert runs["auto"]["steps"] == -(-users // 128)  # all positions: one row a user
    assert runs["prefix"]["steps"] == -(-prefixes // 128) > runs["auto"]["steps"]
    assert 0 < runs["prefix"]["test"]["ndcg@10"] <= 1


def test_prefix_and_all_position_losses_agree_for_a_causal_model():
    """The same targets give the same loss either way: a causal model's state at position t is
    the state of the prefix ending at t."""
    from echomamba_dist.data.splits import all_position_samples, prefix_samples
    from echomamba_dist.models.registry import build_model, model_config_class

    offsets = np.array([0, 5, 9, 16])
    items = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3])
    for name in ("sasrec", "gru4rec", "mamba4rec"):
        torch.manual_seed(0)
        kwargs = {"hidden_size": 16, "dropout": 0.0} | ({"max_len": 8} if name == "sasrec" else {})
        model = build_model(model_config_class(name)(**kwargs), n_items=10).eval()
        losses = []
        for make in (all_position_samples, prefix_samples):
            seq, seq_len, target = (torch.as_tensor(a) for a in make(offsets, items, 8))
            losses.append(model.loss({"item_seq": seq, "seq_len": seq_len, "target": target}))
        assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5), name


def test_the_metrics_table_has_the_same_columns_whatever_the_key_order():
    from echomamba_dist.cli import format_result

    metrics = {"recall@10": 0.4, "mrr@10": 0.1, "ndcg@10": 0.2, "hr@10": 0.4, "hr@5": 0.3}
    result = {"model": "m", "run": "r", "best_epoch": 1, "epochs_run": 2, "test_users": 3,
              "test": metrics, "valid": dict(reversed(list(metrics.items()))), "popularity": {}}  # fmt: skip
    header = format_result(result).splitlines()[2].split()
    assert header == ["hr@5", "hr@10", "ndcg@10", "mrr@10", "recall@10"]
    test_row = format_result(result).splitlines()[4].split()
    assert test_row == ["test", "0.3000", "0.4000", "0.2000", "0.1000", "0.4000"]
