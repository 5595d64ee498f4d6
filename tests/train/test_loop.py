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
from echomamba_dist.train.loop import train_per_worker
from echomamba_dist.train.batches import BatchSource

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


def _position_windows(lengths, mode="prefix"):
    """Windows over training parts of `lengths` whose items are their positions + 1 (unique)."""
    from echomamba_dist.data.splits import build_windows

    offsets = np.r_[0, np.cumsum(lengths)]
    return build_windows(offsets, np.arange(1, offsets[-1] + 1), mode)


def test_batch_source_is_deterministic_and_splits_exactly():
    windows = _position_windows([11] * 5)  # 50 prefix samples, targets 2..11, 13..22, ...
    one = BatchSource(windows, max_len=4, global_batch=8, seed=3)
    halves = [BatchSource(windows, max_len=4, global_batch=8, seed=3, rank=r, world_size=2) for r in range(2)]
    cpu = torch.device("cpu")
    for epoch in (0, 1):
        whole = [b["target"] for b in one.epoch(epoch, device=cpu)]
        parts = [[b["target"] for b in h.epoch(epoch, device=cpu)] for h in halves]
        assert len(whole) == len(parts[0]) == len(parts[1]) == 7
        for w, a, b in zip(whole, *parts):
            assert torch.equal(w, torch.cat([a, b]))
    e0 = np.concatenate([b["target"].numpy() for b in one.epoch(0, device=cpu)])
    e1 = np.concatenate([b["target"].numpy() for b in one.epoch(1, device=cpu)])
    assert sorted(e0) == (windows.end + 1).tolist() and not np.array_equal(e0, e1)  # a new shuffle each epoch


def test_bucketing_trims_padding_and_keeps_every_sample():
    rng = np.random.default_rng(0)
    windows = _position_windows(rng.integers(1, 12, size=60))
    src = BatchSource(windows, max_len=10, global_batch=16, seed=0, bucketing=True, bucket_window=4)
    seen, widths = [], []
    for b in src.epoch(0, device=torch.device("cpu")):
        widths.append(b["item_seq"].shape[1])
        assert b["item_seq"].shape[1] == int(b["seq_len"].max())
        seen.extend(b["target"].tolist())
    assert sorted(seen) == (windows.end + 1).tolist()
    assert np.mean(widths) < 10  # padding was trimmed


# The batches of the windows must be exactly those of the dense (samples, max_len) matrices the
# loop trained on before (issue 18). The expected side is built here from the definitions alone.


def _dense_rows(offsets, items, mode, max_len):
    """The dense training matrices, row by row: users in order; prefix mode: every prefix of >= 1
    item predicts the next item; all_positions: one row a user with >= 2 items, its items but the
    last predicting the item after each. Most recent max_len items, right-padded with 0."""
    seqs, lens, targets = [], [], []
    for u in range(len(offsets) - 1):
        part = [int(x) for x in items[offsets[u] : offsets[u + 1]]]
        if mode == "prefix":
            cases = [(part[:k], part[k]) for k in range(1, len(part))]
        else:
            cases = [(part[:-1], part[1:])] if len(part) >= 2 else []
        for inp, tgt in cases:
            inp = inp[-max_len:]
            seqs.append(inp + [0] * (max_len - len(inp)))
            lens.append(len(inp))
            targets.append(tgt if mode == "prefix" else tgt[-max_len:] + [0] * (max_len - len(inp)))
    return np.array(seqs, dtype=np.int64).reshape(-1, max_len), np.array(lens, dtype=np.int64), np.array(targets, dtype=np.int64)


def _dense_batches(rows, *, global_batch, seed, epoch, rank, world_size, bucketing, bucket_window):
    """What the loop gave rank `rank` from the dense rows: a (seed, epoch) permutation; with
    bucketing, length-sorted (stable) windows of bucket_window batches, batches permuted by
    (seed, epoch, 1) and trimmed to their longest row; each batch split into world_size
    contiguous slices (batches smaller than world_size skipped)."""
    seq, lens, target = rows
    order = np.random.default_rng([seed, epoch]).permutation(len(lens))
    if bucketing:
        size = global_batch * bucket_window
        for start in range(0, len(lens), size):
            chunk = order[start : start + size]
            order[start : start + size] = chunk[np.argsort(lens[chunk], kind="stable")]
    batches = [order[i : i + global_batch] for i in range(0, len(lens), global_batch)]
    if bucketing:
        batches = [batches[i] for i in np.random.default_rng([seed, epoch, 1]).permutation(len(batches))]
    out = []
    for b in batches:
        if len(b) < world_size:
            continue
        part = np.array_split(b, world_size)[rank]
        width = int(lens[part].max()) if bucketing else seq.shape[1]
        out.append({"item_seq": seq[part, :width], "seq_len": lens[part],
                    "target": target[part] if target.ndim == 1 else target[part, :width]})  # fmt: skip
    return out


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("bucketing", [False, True])
@pytest.mark.parametrize("mode", ["prefix", "all_positions"])
def test_window_batches_equal_the_dense_matrix_batches(mode, bucketing, world_size):
    from echomamba_dist.data.splits import build_windows, leave_one_out

    rng = np.random.default_rng(7)
    lengths = rng.integers(0, 16, size=90)  # short users (0-2 items) and users longer than max_len
    offsets = np.r_[0, np.cumsum(lengths)]
    items = rng.integers(1, 40, size=offsets[-1])
    loo = leave_one_out(offsets, items)
    max_len = 6
    rows = _dense_rows(loo.train_offsets, loo.train_items, mode, max_len)
    windows = build_windows(loo.train_offsets, loo.train_items, mode)
    assert len(windows) == len(rows[1]) > 70  # several batches and bucket windows either way
    kwargs = {"global_batch": 24, "seed": 11, "bucketing": bucketing, "bucket_window": 3}
    for rank in range(world_size):
        source = BatchSource(windows, max_len=max_len, rank=rank, world_size=world_size, **kwargs)
        assert len(source.batch_indices(0)) == source.steps_per_epoch() == -(-len(windows) // 24)
        for epoch in range(3):
            got = list(source.epoch(epoch, device=torch.device("cpu")))
            expected = _dense_batches(rows, epoch=epoch, rank=rank, world_size=world_size, **kwargs)
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                assert set(g) == set(e)
                for key, value in e.items():
                    assert g[key].dtype == torch.int64
                    np.testing.assert_array_equal(g[key].numpy(), value, err_msg=f"{key}, epoch {epoch}")


def test_every_model_trains_on_a_tested_sample_mode():
    from echomamba_dist.models.registry import MODELS

    for name, (cls, _) in MODELS.items():
        assert {cls.sample_mode, *cls.supported_samples} <= {"prefix", "all_positions"}, name


def test_train_evaluate_checkpoint_and_track(tmp_path):
    cfg = tiny_config(tmp_path)
    result = train_per_worker(cfg)
    run_dir = tmp_path / "runs" / "t"
    assert result["epochs_run"] == 2
    assert set(result["test"]) == {f"{m}@10" for m in ("hr", "ndcg", "mrr", "recall")}
    assert result["test_users"] == 200
    assert result["test"]["hr@10"] >= result["test"]["ndcg@10"] >= result["test"]["mrr@10"]
    assert json.loads((run_dir / "metrics.json").read_text())["test"] == result["test"]
    ckpts = checkpoint_dirs(run_dir)
    assert [p.name for p in ckpts] == ["epoch_000000", "epoch_000001"]
    assert read_meta(ckpts[-1])["epoch"] == 2  # the next epoch to run
    # the best epoch is the first with the highest validation NDCG@10, and its metrics are reported
    scores = [h["val_ndcg@10"] for h in read_meta(ckpts[-1])["history"]]
    assert result["best_epoch"] == scores.index(max(scores))
    assert result["valid"]["ndcg@10"] == max(scores)

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
    assert {"config.yaml", "metrics.json"} <= artifacts
    assert "model" not in artifacts  # the model is published after training (serve.pyfunc.publish_run)


def test_same_seed_same_result_and_resume_is_a_no_op(tmp_path):
    a = train_per_worker(tiny_config(tmp_path / "a", tracking={"enabled": False}))
    b = train_per_worker(tiny_config(tmp_path / "b", tracking={"enabled": False}))
    assert a["test"] == b["test"] and a["valid"] == b["valid"]
    again = train_per_worker(tiny_config(tmp_path / "a", tracking={"enabled": False}))
    assert again["epochs_run"] == 2 and again["steps"] == a["steps"] and again["test"] == a["test"]


def test_early_stopping_stops_after_patience(tmp_path):
    cfg = tiny_config(tmp_path, train={"epochs": 30, "patience": 1, "lr": 0.1}, tracking={"enabled": False})
    result = train_per_worker(cfg)
    # a large learning rate (0.5 diverges: test_a_diverged_run_stops...) makes validation stop improving quickly
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
    assert scored["count"] == 200 and scored["weights"] == "best"

    # --weights: a checkpoint holds its own epoch's weights and the best so far. A copy of the
    # newest whose best weights are swapped for epoch 0's tells the two apart: each flag scores
    # the validation its epoch's history records.
    import shutil

    checkpoints = sorted((tmp_path / "runs" / "t").glob("epoch_*"))
    assert [c.name for c in checkpoints] == ["epoch_000000", "epoch_000001"]
    history = json.loads((checkpoints[-1] / "meta.json").read_text())["history"]
    assert history[0]["val_ndcg@10"] != pytest.approx(history[1]["val_ndcg@10"], abs=1e-6)  # two weights apart
    mixed = shutil.copytree(checkpoints[-1], tmp_path / "mixed")
    state = torch.load(mixed / "state.pt", weights_only=True)
    state["best_model"] = torch.load(checkpoints[0] / "state.pt", weights_only=True)["model"]
    torch.save(state, mixed / "state.pt")
    for weights, epoch in (("checkpoint", 1), ("best", 0)):
        assert main(["evaluate", "--checkpoint", str(mixed), "--split", "valid", "--weights", weights]) == 0
        scored = json.loads(capsys.readouterr().out)
        assert scored["weights"] == weights and scored["ndcg@10"] == pytest.approx(history[epoch]["val_ndcg@10"], abs=1e-6)

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
    from echomamba_dist.data.splits import build_windows, window_batch
    from echomamba_dist.models.registry import build_model, model_config_class

    offsets = np.array([0, 5, 9, 16])
    items = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3])
    for name in ("sasrec", "gru4rec", "mamba4rec"):
        torch.manual_seed(0)
        kwargs = {"hidden_size": 16, "dropout": 0.0} | ({"max_len": 8} if name == "sasrec" else {})
        model = build_model(model_config_class(name)(**kwargs), n_items=10).eval()
        losses = []
        for mode in ("all_positions", "prefix"):
            windows = build_windows(offsets, items, mode)
            seq, seq_len, target = (torch.as_tensor(a) for a in window_batch(windows, np.arange(len(windows)), max_len=8))
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


# ---- divergence (issue 14): a non-finite loss or validation score stops the run, no checkpoint of it


def test_a_diverged_run_stops_with_the_error_and_writes_no_checkpoint(tmp_path):
    from echomamba_dist.errors import TrainingDiverged

    cfg = tiny_config(tmp_path, train={"epochs": 3, "lr": 1e6}, tracking={"enabled": False})
    with pytest.raises(TrainingDiverged, match=r"the training loss is nan at epoch 0, step \d+ \(run t\).*lower train\.lr"):
        train_per_worker(cfg)  # before: loss nan, HR@10 = NDCG@10 = 1.0, kept as best
    run_dir = tmp_path / "runs" / "t"
    assert checkpoint_dirs(run_dir) == [] and not (run_dir / "metrics.json").exists()


def test_divergence_in_a_later_epoch_keeps_the_earlier_best(tmp_path, monkeypatch):
    """The loss turns NaN in epoch 1: epoch 0's checkpoint stays the newest and best."""
    from echomamba_dist.errors import TrainingDiverged
    from echomamba_dist.train import loop

    calls = {"n": 0}
    forward = loop.LossModule.forward

    def nan_from_step_20(self, batch):
        calls["n"] += 1
        loss = forward(self, batch)
        return loss * float("nan") if calls["n"] >= 20 else loss

    monkeypatch.setattr(loop.LossModule, "forward", nan_from_step_20)
    cfg = tiny_config(tmp_path, train={"epochs": 3}, tracking={"enabled": False})  # 10 to 19 steps an epoch
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, step 20 "):
        train_per_worker(cfg)
    run_dir = tmp_path / "runs" / "t"
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["epoch_000000"]
    meta = read_meta(run_dir / "epoch_000000")
    assert meta["best_epoch"] == 0 and 0 < meta["val_metric"] < 1


def test_non_finite_validation_scores_stop_the_run(tmp_path, monkeypatch):
    """A finite last loss can still leave NaN weights: the validation scores tell, and stop it."""
    from echomamba_dist.errors import TrainingDiverged
    from echomamba_dist.train import loop

    evaluate = loop.evaluate_model

    class NanScores(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def score_all(self, item_seq, seq_len):
            return self.model.score_all(item_seq, seq_len) * float("nan")

    monkeypatch.setattr(loop, "evaluate_model", lambda model, data, **kw: evaluate(NanScores(model), data, **kw))
    cfg = tiny_config(tmp_path, tracking={"enabled": False})
    with pytest.raises(TrainingDiverged, match=r"the validation scores of 200 of 200 users are NaN or infinite at epoch 0"):
        train_per_worker(cfg)
    assert checkpoint_dirs(tmp_path / "runs" / "t") == []


def test_ray_driver_finds_the_workers_divergence():
    """`fit` turns a worker's TrainingDiverged (behind Ray's wrappers) into the same one-line error."""
    from echomamba_dist.errors import TrainingDiverged
    from echomamba_dist.distributed.trainer import worker_exception

    diverged = TrainingDiverged("training diverged: the training loss is nan at epoch 2, step 9")

    class WorkerGroupError(RuntimeError):  # the shape of Ray Train's: rank -> the worker's exception
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    group = WorkerGroupError({1: diverged, 0: RuntimeError("gloo: connection closed")})
    assert worker_exception(group, TrainingDiverged) is diverged
    try:
        try:
            raise diverged
        except TrainingDiverged as inner:
            raise RuntimeError("controller failed") from inner
    except RuntimeError as outer:
        assert worker_exception(outer, TrainingDiverged) is diverged
    assert worker_exception(WorkerGroupError({0: ValueError("x")}), TrainingDiverged) is None


def test_cli_exits_2_on_divergence_and_refuses_an_infinite_lr(tmp_path, capsys):
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path, tracking={"enabled": False})))
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--set", "train.lr=1000000.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("echomamba train: error: training diverged:") and "\n" not in err
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--set", "train.lr=.inf"]) == 2
    assert "train.lr: must be a finite number > 0, got inf" in capsys.readouterr().err
