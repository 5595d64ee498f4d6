"""Ray Train pieces on one local Ray for the module: the training samples on Ray Data, DDP
equivalence of one step, exact sharded evaluation, the "ray" sharding mode, and error messages."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from echomamba_dist.config import experiment_from_dict, to_dict
from echomamba_dist.data.splits import all_position_samples, prefix_samples
from echomamba_dist.ray_train import count_train_samples, samples_batch, worker_error_message
from ray_test_helpers import tiny_config


@pytest.fixture(scope="module")
def local_ray():
    import ray
    import ray.cloudpickle

    ray.init(address="local", num_cpus=3, include_dashboard=False, configure_logging=False, log_to_driver=False)
    # the probe below runs on Ray workers, which cannot import this test module by name
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


# ----------------------------------------------------------------------------------------------
# Samples (pure, no Ray)


@pytest.mark.parametrize("mode", ["prefix", "all_positions"])
def test_samples_batch_ids_are_positions_in_the_single_process_order(mode):
    import pyarrow as pa

    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 9, size=40)
    lengths[[3, 4]] = [0, 1]  # users without samples
    offsets = np.r_[0, np.cumsum(lengths)]
    items = rng.integers(1, 30, size=offsets[-1])
    build = prefix_samples if mode == "prefix" else all_position_samples
    seq, seq_len, target = build(offsets, items, 5)
    per_user = np.maximum(lengths - 1, 0) if mode == "prefix" else (lengths >= 2).astype(np.int64)
    table = pa.table({
        "first_sample": pa.array(np.cumsum(per_user) - per_user),
        "items": pa.ListArray.from_arrays(pa.array(offsets), pa.array(items)),
    })
    got = [samples_batch(table.slice(a, b - a), mode=mode, max_len=5) for a, b in [(0, 7), (7, 8), (8, 23), (23, 40)]]
    ids = np.concatenate([g["sample_id"] for g in got])
    np.testing.assert_array_equal(ids, np.arange(len(seq_len)))
    np.testing.assert_array_equal(np.concatenate([g["item_seq"] for g in got]), seq)
    np.testing.assert_array_equal(np.concatenate([g["seq_len"] for g in got]), seq_len)
    np.testing.assert_array_equal(np.concatenate([g["target"] for g in got]), target)


def test_worker_error_message_names_the_worker_exception():
    from ray.train import WorkerGroupError

    exc = WorkerGroupError(
        "[Rank 1 Error Snippet]:\nTraceback (most recent call last):\n  File \"loop.py\"\nValueError: boom",
        {1: ValueError("boom")},
    )
    message = worker_error_message(exc)
    assert message.startswith("training failed on worker rank 1: ValueError: boom")
    assert "Traceback" in message and "loop.py" in message


# ----------------------------------------------------------------------------------------------
# On Ray


@pytest.mark.slow
@pytest.mark.parametrize("model", ["echomamba4rec", "sasrec"])
def test_train_dataset_on_ray_data_holds_the_single_process_samples(local_ray, tmp_path, model):
    from echomamba_dist.models.registry import build_model
    from echomamba_dist.ray_train import build_train_dataset, read_all_samples
    from echomamba_dist.train.loop import build_training_data

    cfg_dict = tiny_config(tmp_path)
    cfg_dict["model"] = {"name": model, "hidden_size": 16, "max_len": 12}
    cfg = experiment_from_dict(cfg_dict)
    mode = build_model(cfg.model, n_items=1).sample_mode
    assert mode == {"echomamba4rec": "prefix", "sasrec": "all_positions"}[model]
    expected = build_training_data(cfg, mode).samples
    ds = build_train_dataset(cfg, mode)
    got = read_all_samples(ds.iterator())
    assert ds.count() == count_train_samples(cfg, mode) == len(expected["seq_len"])
    for key in ("item_seq", "seq_len", "target"):
        np.testing.assert_array_equal(got[key], expected[key])


def ddp_probe(config: dict) -> None:
    """On each Ray worker: one SGD step on this rank's slice of the first global batch, through
    RaySession (data shard, prepare_model/DDP) and BatchSource; then the sharded evaluation of
    the initial weights. Rank 0 saves the results to config["out"]."""
    import ray.train

    from echomamba_dist.ray_train import RaySession

    cfg = experiment_from_dict(config["experiment"])
    session = RaySession(cfg)
    result = one_step_and_evaluate(cfg, session)
    if session.rank == 0:
        torch.save(result, config["out"])
    ray.train.report({"done": 1})


def one_step_and_evaluate(cfg, session) -> dict:
    """The probe's work, shared by the Ray workers and the one-process reference."""
    from echomamba_dist.models.registry import build_model
    from echomamba_dist.train.evaluate import evaluate_model
    from echomamba_dist.train.loop import LossModule, build_training_data, seed_everything

    data = build_training_data(cfg, "prefix", with_samples=session.local_samples)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, n_items=data.n_items)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    evals = {
        name: evaluate_model(
            model, split, ks=[10], batch_size=37, device=session.device, rank=session.rank,
            world_size=session.world_size, all_reduce=session.all_reduce_sums,
        )
        for name, split in (("valid", data.valid), ("test", data.test))
    }
    module = session.prepare_model(LossModule(model))
    source = session.batch_source(data.samples, global_batch=cfg.train.batch_size, seed=cfg.train.seed, bucketing=True)
    batch = next(iter(source.epoch(0, device=session.device)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer.zero_grad()
    module(batch).backward()
    optimizer.step()
    return {
        "initial": initial,
        "after": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "batch_rows": int(batch["seq_len"].shape[0]),
        "evals": evals,
    }


@pytest.fixture(scope="module")
def probe_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    return tiny_config(root, model={"dropout": 0.0}, train={"batch_size": 96}), root


@pytest.mark.slow
def test_ddp_step_on_two_halves_equals_one_step_on_the_whole_batch_and_metrics_match(local_ray, probe_config):
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from echomamba_dist.ray_train import TRAIN_DATASET, build_train_dataset
    from echomamba_dist.train.loop import LocalSession

    cfg_dict, root = probe_config
    cfg = experiment_from_dict(cfg_dict)
    out = root / "probe.pt"
    TorchTrainer(
        ddp_probe,
        train_loop_config={"experiment": to_dict(cfg), "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="probe", storage_path=str(root / "runs")),
        datasets={TRAIN_DATASET: build_train_dataset(cfg, "prefix")},
        dataset_config=DataConfig(datasets_to_split=[]),
    ).fit()
    two = torch.load(out, weights_only=True)

    torch.set_num_threads(1)
    one = one_step_and_evaluate(cfg, LocalSession(cfg))

    assert two["batch_rows"] * 2 == one["batch_rows"] == 96  # each rank took half the global batch
    for name, value in one["initial"].items():
        assert torch.equal(two["initial"][name], value)  # the same starting point
    moved = 0
    for name, value in one["after"].items():
        torch.testing.assert_close(two["after"][name], value, rtol=0, atol=1e-6, msg=name)
        moved += int(not torch.equal(value, one["initial"][name]))
    assert moved > 10  # the step changed the parameters

    # the same weights give the same metrics on 1 and 2 workers: every user scored once
    for split in ("valid", "test"):
        assert two["evals"][split]["count"] == one["evals"][split]["count"] == 200
        assert two["evals"][split] == pytest.approx(one["evals"][split], rel=0, abs=1e-12)


@pytest.mark.slow
def test_ray_sharding_mode_splits_the_dataset_and_trains(local_ray, tmp_path):
    from echomamba_dist.ray_train import fit

    cfg = experiment_from_dict(tiny_config(tmp_path, train={"data_sharding": "ray"}))
    result = fit(cfg)
    per_rank_batches = math.ceil((count_train_samples(cfg, "prefix") // 2) / (128 // 2))
    assert result["steps"] == 2 * per_rank_batches and result["epochs_run"] == 2
    assert result["test_users"] == 200 and 0 < result["test"]["ndcg@10"] <= 1
