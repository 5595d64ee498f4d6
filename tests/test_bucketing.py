"""Length bucketing is exact, bf16 autocast keeps the scan in fp32, and `train.compile` trains.

Bucketing (`BatchSource(bucketing=True)`, on by default) trims every batch to its longest
sequence. That must change speed only: per-sample outputs, the loss and every gradient of a
trimmed batch equal those of the same batch padded to `max_len` (EchoMamba4Rec's FFT filter still
transforms over `max_len` points, which the zeroed padding makes exact).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from echomamba_dist.models.registry import build_model, model_class, model_config_class
from echomamba_dist.train.batches import BatchSource
from echomamba_dist.train.loop import train_per_worker

N_ITEMS = 30
MAX_LEN = 12
LENGTHS = [1, 4, 7, 2, 7, 5]  # longest 7 < MAX_LEN: a bucketed batch is 7 wide
EXACT = ["echomamba4rec", "sasrec", "mamba4rec", "bert4rec"]


def _model(name: str, *, dtype=torch.float64, **overrides):
    cls = model_config_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {"hidden_size": 16, **overrides}
    if "max_len" in fields:  # Mamba4Rec takes any length
        kwargs["max_len"] = MAX_LEN
    if "d_state" in fields:
        kwargs["d_state"] = 8
    torch.manual_seed(0)
    return build_model(cls(**kwargs), N_ITEMS).to(dtype)


def _padded_batch(name: str, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch padded to MAX_LEN, with the targets of the model's sample mode."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.zeros(len(LENGTHS), MAX_LEN, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        seq[i, :n] = torch.randint(1, N_ITEMS + 1, (n,), generator=g)
    seq_len = torch.tensor(LENGTHS)
    if model_class(name).sample_mode == "prefix":
        target = torch.randint(1, N_ITEMS + 1, (len(LENGTHS),), generator=g)  # prefix: (B,)
    else:  # all positions: the next item at every real position, 0 elsewhere
        target = torch.zeros_like(seq)
        for i, n in enumerate(LENGTHS):
            target[i, :n] = torch.randint(1, N_ITEMS + 1, (n,), generator=g)
    return {"item_seq": seq, "seq_len": seq_len, "target": target}


def _trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `BatchSource.to_batch` does with bucketing: cut to the longest sequence."""
    width = int(batch["seq_len"].max())
    out = dict(batch, item_seq=batch["item_seq"][:, :width])
    if batch["target"].dim() == 2:
        out["target"] = batch["target"][:, :width]
    return out


def _loss_and_grads(model, batch, seed=1):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # BERT4Rec draws its masks (at max_len + 1 width) from torch's RNG
    loss = model.loss(batch)
    loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    return loss.detach(), grads


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-10), (torch.float32, 1e-6)], ids=["f64", "f32"])
@pytest.mark.parametrize("name", EXACT)
def test_trimmed_batch_equals_max_len_padding(name, dtype, atol):
    model = _model(name, dtype=dtype).eval()  # eval: no dropout, so both runs see the same net
    padded = _padded_batch(name)
    trimmed = _trim(padded)
    assert trimmed["item_seq"].shape[1] == max(LENGTHS) < MAX_LEN

    with torch.no_grad():
        torch.testing.assert_close(
            model.score_all(trimmed["item_seq"], trimmed["seq_len"]),
            model.score_all(padded["item_seq"], padded["seq_len"]),
            rtol=0, atol=atol,
        )
        torch.testing.assert_close(
            model(trimmed["item_seq"], trimmed["seq_len"]), model(padded["item_seq"], padded["seq_len"]),
            rtol=0, atol=atol,
        )

    loss_p, grads_p = _loss_and_grads(model, padded)
    loss_t, grads_t = _loss_and_grads(model, trimmed)
    torch.testing.assert_close(loss_t, loss_p, rtol=0, atol=atol)
    assert set(grads_t) == set(grads_p)
    for key in grads_p:
        torch.testing.assert_close(grads_t[key], grads_p[key], rtol=0, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
    assert any(float(g.abs().max()) > 0 for g in grads_p.values())


def test_echomamba_filter_spans_max_len_not_the_batch_width():
    """The filter's FFT length is max_len for every batch width: trimming keeps the result
    exact only because of that (a filter over the batch width would mix positions differently)."""
    model = _model("echomamba4rec").eval()
    layer = model.layers[0].filter
    assert layer is not None and layer.max_len == MAX_LEN
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    wide = torch.cat([x, torch.zeros(3, MAX_LEN - 7, 16, dtype=torch.float64)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer(wide)[:, :7], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# BatchSource with bucketing


def _windows(n_users: int = 40, seed: int = 0):
    """Prefix windows over training parts of 1..MAX_LEN + 3 items whose items are their positions
    + 1, so that a sample is known by its target and its input must be the items just before it."""
    from echomamba_dist.data.splits import prefix_windows

    rng = np.random.default_rng(seed)
    offsets = np.r_[0, np.cumsum(rng.integers(1, MAX_LEN + 4, size=n_users))]
    return prefix_windows(offsets, np.arange(1, offsets[-1] + 1))


@pytest.mark.parametrize("world_size", [1, 2])
def test_bucketed_epochs_visit_every_sample_once(world_size):
    windows = _windows()
    cpu = torch.device("cpu")
    sources = [
        BatchSource(windows, max_len=MAX_LEN, global_batch=32, seed=5, rank=r, world_size=world_size,
                    bucketing=True, bucket_window=3)  # fmt: skip
        for r in range(world_size)
    ]
    orders = []
    for epoch in range(3):
        seen = []
        for source in sources:
            for batch in source.epoch(epoch, device=cpu):
                width = batch["item_seq"].shape[1]
                assert width <= MAX_LEN
                assert width == int(batch["seq_len"].max())  # padded only to its longest
                for row, n, t in zip(batch["item_seq"].tolist(), batch["seq_len"].tolist(), batch["target"].tolist()):
                    assert row == list(range(t - n, t)) + [0] * (width - n)  # the n items before t
                seen.extend((batch["target"].numpy() - 1).tolist())  # the target's position
        assert sorted(seen) == windows.end.tolist()  # each sample exactly once
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled every epoch


def test_bucketing_groups_lengths_and_the_seed_only_reorders():
    windows = _windows(n_users=260)
    on = BatchSource(windows, max_len=MAX_LEN, global_batch=64, seed=1, bucketing=True, bucket_window=8)
    off = BatchSource(windows, max_len=MAX_LEN, global_batch=64, seed=1, bucketing=False)
    lengths = np.minimum(windows.lengths(), MAX_LEN)

    def spread(source):  # mean range of lengths inside a batch
        return np.mean([np.ptp(lengths[b]) for b in source.batch_indices(0)])

    assert spread(on) < 0.5 * spread(off)
    assert on.steps_per_epoch() == off.steps_per_epoch() == len(on.batch_indices(0))
    other_seed = BatchSource(windows, max_len=MAX_LEN, global_batch=64, seed=2, bucketing=True, bucket_window=8)
    for source in (on, off, other_seed):  # every sample exactly once an epoch, full batches but the last
        batches = source.batch_indices(0)
        assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(len(windows)))
        assert sorted(len(b) for b in batches)[1:] == [64] * (len(batches) - 1)
    assert not np.array_equal(np.concatenate(other_seed.batch_indices(0)), np.concatenate(on.batch_indices(0)))


def test_a_restarted_run_and_two_ranks_see_the_batches_of_one_uninterrupted_worker():
    """The order depends on (seed, epoch) alone: a fresh source at epoch 2 (a resumed run) gives
    the batches of one that went through epochs 0 and 1, and two ranks together give each step's
    whole batch, split in halves (the documented exact split)."""
    windows = _windows(n_users=100)
    options = {"max_len": MAX_LEN, "global_batch": 32, "seed": 3, "bucketing": True, "bucket_window": 4}
    cpu = torch.device("cpu")
    single = BatchSource(windows, **options)
    for epoch in (0, 1):
        for _ in single.epoch(epoch, device=cpu):
            pass
    whole = list(single.epoch(2, device=cpu))
    resumed = list(BatchSource(windows, **options).epoch(2, device=cpu))
    ranks = [list(BatchSource(windows, rank=r, world_size=2, **options).epoch(2, device=cpu)) for r in (0, 1)]
    assert len(whole) == len(resumed) == len(ranks[0]) == len(ranks[1]) == single.steps_per_epoch()
    for step, batch in enumerate(whole):
        assert torch.equal(resumed[step]["target"], batch["target"])
        halves = torch.cat([ranks[0][step]["target"], ranks[1][step]["target"]])
        assert torch.equal(halves, batch["target"])  # targets identify samples (see _windows)
        assert abs(len(ranks[0][step]["target"]) - len(ranks[1][step]["target"])) <= 1


# ----------------------------------------------------------------------------------------------
# bf16 autocast: the scan state stays fp32


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_scan_computes_in_fp32_for_bf16_inputs(backend):
    """bf16 in, bf16 out, but the recurrence runs in fp32: the result is the fp32 scan of the same
    (bf16-representable) inputs, rounded once to bf16. A bf16 recurrence would drift far more."""
    from echomamba_dist.ops.selective_scan import selective_scan

    g = torch.Generator().manual_seed(0)
    batch, d_inner, length, n_state = 2, 8, 64, 4

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    u, delta, z = rnd(batch, d_inner, length), rnd(batch, d_inner, length), rnd(batch, d_inner, length)
    B, C = rnd(batch, n_state, length), rnd(batch, n_state, length)
    A = -torch.arange(1, n_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # fp32, as Mamba keeps it
    D = torch.ones(d_inner)
    bias = torch.full((d_inner,), -3.0)
    args = {"D": D, "delta_bias": bias, "delta_softplus": True, "backend": backend}

    out_bf16 = selective_scan(u, delta, A, B, C, z=z, **args)
    out_fp32 = selective_scan(u.float(), delta.float(), A, B.float(), C.float(), z=z.float(), **args)
    assert out_bf16.dtype == torch.bfloat16 and out_fp32.dtype == torch.float32
    torch.testing.assert_close(out_bf16, out_fp32.to(torch.bfloat16), rtol=0, atol=0)


def test_bf16_autocast_forward_of_echomamba_feeds_the_scan_and_stays_close_to_fp32(monkeypatch):
    import echomamba_dist.models.mamba as mamba_module

    seen = []
    real_scan = mamba_module.selective_scan

    def spy(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *, backend="auto"):
        out = real_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend=backend)
        seen.append({"u": u.dtype, "A": A.dtype, "D": D.dtype, "bias": delta_bias.dtype, "out": out.dtype})
        return out

    monkeypatch.setattr(mamba_module, "selective_scan", spy)
    model = _model("echomamba4rec", dtype=torch.float32).eval()
    batch = _padded_batch("echomamba4rec")
    with torch.no_grad():
        ref = model.score_all(batch["item_seq"], batch["seq_len"])
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.score_all(batch["item_seq"], batch["seq_len"])
    assert len(seen) == 2  # forward and backward direction
    for call in seen:  # bf16 activations in; the state parameters A, D and the dt bias in fp32
        assert call["u"] == torch.bfloat16 and call["out"] == torch.bfloat16
        assert call["A"] == call["D"] == call["bias"] == torch.float32
    assert torch.isfinite(low.float()).all()
    err = (low.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, f"bf16 scores deviate by {err:.3g} of the largest fp32 score"

    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(batch)
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# train.compile


@pytest.mark.slow
def test_compiled_training_runs_through_train_per_worker(tmp_path):
    """`train.compile=true` wraps the loss module in torch.compile; one tiny epoch with bucketed
    batches of different widths trains and evaluates. Inductor builds C++ with the system gcc;
    the fused CPU scan is a Numba autograd.Function, at which Dynamo breaks the graph and runs it
    eagerly (the result is the eager one). About 1-3 minutes on the loaded 2-core machine."""
    pytest.importorskip("torch._inductor")
    cfg = {
        "data": {"synthetic": {"n_users": 120, "n_items": 40, "n_topics": 4, "mean_length": 8.0}, "max_len": 10},
        "model": {"name": "echomamba4rec", "hidden_size": 16, "d_state": 8},
        "train": {
            "epochs": 1, "batch_size": 64, "eval_batch_size": 256, "ray": False, "progress": False,
            "device": "cpu", "compile": True, "max_steps_per_epoch": 2,
        },
        "run": {"name": "compiled", "storage_path": str(tmp_path / "runs")},
        "tracking": {"enabled": False},
    }
    result = train_per_worker(cfg)
    assert result["epochs_run"] == 1 and result["steps"] == 2
    assert np.isfinite(result["valid"]["ndcg@10"])
