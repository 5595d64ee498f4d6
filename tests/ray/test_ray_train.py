"""Ray Train pieces on one local Ray for the module: the training data on Ray Data, DDP
equivalence of one step, exact sharded evaluation, the "ray" sharding mode, and error messages."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from echomamba_dist.config import experiment_from_dict, to_dict
from echomamba_dist.data.splits import build_windows
from echomamba_dist.distributed.trainer import count_train_samples, read_csr, users_table, worker_error_message
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
# CSR shards (pure, no Ray)


class _Blocks:
    """Stands in for a dataset shard: `iter_batches` yields the given tables."""

    def __init__(self, tables):
        self.tables = tables

    def iter_batches(self, **_):
        return iter(self.tables)


def _training_parts(seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 9, size=40)
    lengths[[3, 4]] = [0, 1]  # users without samples
    offsets = np.r_[0, np.cumsum(lengths)]
    return offsets, rng.integers(1, 30, size=offsets[-1])


def test_csr_shards_read_back_in_user_order_from_any_block_cut_and_order():
    import pyarrow as pa

    offsets, items = _training_parts()
    table = users_table(offsets, items)
    # one block is used as it is: the items are the table's buffer, not a copy
    got_offsets, got_items = read_csr(_Blocks([table]), complete=True)
    assert np.shares_memory(got_items, table.column("items").chunk(0).values.to_numpy())
    cuts = [table.slice(a, b - a) for a, b in [(0, 7), (7, 8), (8, 23), (23, 40)]]
    shuffled = table.take(np.random.default_rng(1).permutation(40))  # rows out of order: sorted
    two_chunks = pa.concat_tables([cuts[1], cuts[0]])  # record batches out of order in one table
    for blocks in ([table], cuts, cuts[::-1], [cuts[2], cuts[0], cuts[3], cuts[1]], [shuffled], [two_chunks, *cuts[2:]]):
        got_offsets, got_items = read_csr(_Blocks(blocks), complete=True)
        assert got_offsets.dtype == got_items.dtype == np.int64
        np.testing.assert_array_equal(got_offsets, offsets)
        np.testing.assert_array_equal(got_items, items)
    with pytest.raises(RuntimeError, match="users were lost or repeated"):
        read_csr(_Blocks([*cuts, cuts[1]]), complete=True)  # a user twice
    # a worker's share in "ray" mode: some users, in user order
    part_offsets, part_items = read_csr(_Blocks([cuts[3], cuts[1]]), complete=False)
    np.testing.assert_array_equal(np.diff(part_offsets), np.r_[np.diff(offsets)[7:8], np.diff(offsets)[23:]])
    np.testing.assert_array_equal(part_items, np.r_[items[offsets[7] : offsets[8]], items[offsets[23] :]])
    part_offsets, part_items = read_csr(_Blocks([cuts[2]]), complete=False)  # one block, a slice
    np.testing.assert_array_equal(part_offsets, offsets[8:24] - offsets[8])
    np.testing.assert_array_equal(part_items, items[offsets[8] : offsets[23]])
    with pytest.raises(RuntimeError, match="users were lost or repeated"):
        read_csr(_Blocks([cuts[0], cuts[2]]), complete=True)
    with pytest.raises(RuntimeError, match="is empty"):
        read_csr(_Blocks([]), complete=True)


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
    from echomamba_dist.distributed.trainer import build_train_dataset
    from echomamba_dist.train.batches import build_training_data

    cfg_dict = tiny_config(tmp_path)
    cfg_dict["model"] = {"name": model, "hidden_size": 16, "max_len": 12}
    cfg = experiment_from_dict(cfg_dict)
    mode = build_model(cfg.model, n_items=1).sample_mode
    assert mode == {"echomamba4rec": "prefix", "sasrec": "all_positions"}[model]
    expected = build_training_data(cfg, mode).samples
    ds = build_train_dataset(cfg)
    assert ds.count() == 200  # one row a user, not a sample
    got = build_windows(*read_csr(ds.iterator(), complete=True), mode)
    assert len(got) == count_train_samples(cfg, mode) == len(expected) > 0
    for key in ("offsets", "items", "end"):
        np.testing.assert_array_equal(getattr(got, key), getattr(expected, key))
    assert got.mode == expected.mode == mode


def ddp_probe(config: dict) -> None:
    """On each Ray worker: one SGD step on this rank's slice of the first global batch, through
    RaySession (data shard, prepare_model/DDP) and BatchSource; then the sharded evaluation of
    the initial weights. Rank 0 saves the results to config["out"]."""
    import ray.train

    from echomamba_dist.distributed.trainer import RaySession

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
    from echomamba_dist.train.loop import LossModule, seed_everything
    from echomamba_dist.train.batches import build_training_data

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
    source = session.batch_source(
        data.samples, max_len=cfg.data.max_len, global_batch=cfg.train.batch_size, seed=cfg.train.seed, bucketing=True
    )
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

    from echomamba_dist.distributed.trainer import TRAIN_DATASET, build_train_dataset
    from echomamba_dist.train.session import LocalSession

    cfg_dict, root = probe_config
    cfg = experiment_from_dict(cfg_dict)
    out = root / "probe.pt"
    TorchTrainer(
        ddp_probe,
        train_loop_config={"experiment": to_dict(cfg), "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="probe", storage_path=str(root / "runs")),
        datasets={TRAIN_DATASET: build_train_dataset(cfg)},
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
    from echomamba_dist.distributed.trainer import fit

    cfg = experiment_from_dict(tiny_config(tmp_path, train={"data_sharding": "ray"}))
    result = fit(cfg)
    # each rank batches its half of the users; all take the fewest batches of any rank, which is
    # at most those of an even split of the samples (equal user counts, unequal sample counts)
    per_rank_batches = math.ceil((count_train_samples(cfg, "prefix") // 2) / (128 // 2))
    assert 2 * (per_rank_batches - 2) <= result["steps"] <= 2 * per_rank_batches and result["epochs_run"] == 2
    assert result["test_users"] == 200 and 0 < result["test"]["ndcg@10"] <= 1


def test_an_exception_that_pickle_cannot_rebuild_is_sent_as_a_worker_error(monkeypatch, tmp_path):
    """Ray ships a worker's exception pickled; one that does not come back (MLflow's registry
    exception needs an argument its pickled form lacks) is replaced by a WorkerError that keeps
    its type, message and the worker's traceback."""
    import pickle

    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

    from echomamba_dist.distributed import trainer
    from echomamba_dist.errors import WorkerError

    def fails(config, session):
        raise UnsupportedModelRegistryStoreURIException("nosuchscheme://nowhere", ["sqlite"])

    monkeypatch.setattr(trainer, "train_per_worker", fails)
    monkeypatch.setattr(trainer, "RaySession", lambda cfg, train_samples=None: None)
    config = {"run": {"name": "r", "storage_path": str(tmp_path)}, "tracking": {"enabled": False}}
    with pytest.raises(WorkerError) as info:
        trainer.ray_train_entry(config)
    text = str(info.value)
    assert text.startswith("mlflow.tracking.registry.UnsupportedModelRegistryStoreURIException:")
    assert "nosuchscheme://nowhere" in text and "in fails" in text  # the message and the worker's frame
    assert str(pickle.loads(pickle.dumps(info.value))) == text  # and it reaches the driver whole

    def raises_plainly(config, session):
        raise ValueError("an ordinary error")  # pickles: passed on as it is

    monkeypatch.setattr(trainer, "train_per_worker", raises_plainly)
    with pytest.raises(ValueError, match="an ordinary error"):
        trainer.ray_train_entry(config)
