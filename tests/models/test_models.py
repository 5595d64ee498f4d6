"""Every registered model: the interface, padding independence, causality, variants, training."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from echomamba_dist.config import model_config_from_dict, to_dict
from echomamba_dist.data.splits import build_windows, window_batch
from echomamba_dist.errors import ConfigError
from echomamba_dist.models.base import SequentialRecommender, reverse_by_length
from echomamba_dist.models.echomamba4rec import EchoMamba4Rec, EchoMamba4RecConfig
from echomamba_dist.models.registry import (
    MODELS,
    build_model,
    list_models,
    model_class,
    model_config_class,
)

N_ITEMS = 40

ECHO_VARIANTS = {
    "default": {},
    "concat": {"combine": "concat"},
    "ends": {"readout": "ends"},
    "concat_ends": {"combine": "concat", "readout": "ends"},
    "no_filter": {"filter": False},
    "lowpass": {"filter_lowpass": 0.3},
    "unidirectional": {"bidirectional": False},
    "ffn": {"ffn": True},
    "no_glu": {"glu": False},
    "released_glu": {"glu_form": "released"},
    "normal_mamba_init": {"mamba_init": "normal"},
    "two_layers": {"num_layers": 2},
    "two_layers_concat_ends_ffn": {
        "num_layers": 2,
        "combine": "concat",
        "readout": "ends",
        "ffn": True,
    },
}


def _config(name: str, **overrides):
    cls = model_config_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    if "scan_backend" in fields:
        overrides.setdefault("scan_backend", "reference")
    return cls(**overrides)


# Every registered model at its defaults, plus every EchoMamba4Rec variant.
CASES = [(name, {}) for name in MODELS] + [
    ("echomamba4rec", v) for k, v in ECHO_VARIANTS.items() if k != "default"
]
CASE_IDS = list(MODELS) + [f"echomamba4rec-{k}" for k in ECHO_VARIANTS if k != "default"]


def _build(name: str, seed: int = 0, **overrides) -> SequentialRecommender:
    torch.manual_seed(seed)
    return build_model(_config(name, **overrides), N_ITEMS)


def _batch(lengths, pad_to, *, seed=0, fill=None):
    """Right-padded (B, pad_to) items; the same items whatever pad_to. `fill`: padding value."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.zeros(len(lengths), pad_to, dtype=torch.long)
    for i, n in enumerate(lengths):
        seq[i, :n] = torch.randint(1, N_ITEMS + 1, (n,), generator=g)
        if fill is not None:
            seq[i, n:] = torch.randint(1, N_ITEMS + 1, (pad_to - n,), generator=g)
    return seq, torch.tensor(lengths)


LENGTHS = [1, 3, 10, 7, 10, 2]


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=CASE_IDS)
def test_output_does_not_depend_on_batch_padding(name, overrides):
    model = _build(name, **overrides).double().eval()
    short, seq_len = _batch(LENGTHS, 10)
    long, _ = _batch(LENGTHS, 50)
    with torch.no_grad():
        torch.testing.assert_close(model(short, seq_len), model(long, seq_len), rtol=0, atol=1e-6)
        if name in ALL_POSITIONS:
            real = short > 0
            all_short, all_long = model.forward_all(short, seq_len), model.forward_all(long, seq_len)
            torch.testing.assert_close(all_short[real], all_long[:, :10][real], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=CASE_IDS)
def test_padding_independence_float32(name, overrides):
    """The same in float32, up to summation-order noise of batched matmuls (measured <= 8e-7)."""
    model = _build(name, **overrides).eval()
    short, seq_len = _batch(LENGTHS, 10)
    long, _ = _batch(LENGTHS, 50)
    with torch.no_grad():
        torch.testing.assert_close(model(short, seq_len), model(long, seq_len), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=CASE_IDS)
def test_items_after_seq_len_are_never_seen(name, overrides):
    """Whatever sits after seq_len (padding, or a target in a careless pipeline) is invisible."""
    model = _build(name, **overrides).eval()
    clean, seq_len = _batch(LENGTHS, 12)
    junk = clean.clone()
    junk[clean == 0] = torch.randint(1, N_ITEMS + 1, (int((clean == 0).sum()),))
    with torch.no_grad():
        torch.testing.assert_close(model(clean, seq_len), model(junk, seq_len), rtol=0, atol=1e-6)


# Causal models with `forward_all`. BERT4Rec also takes all-positions rows, but only to rebuild
# whole sequences for its masked objective; it is bidirectional and has no `forward_all`.
ALL_POSITIONS = [
    n for n, (cls, _) in MODELS.items()
    if cls.sample_mode == "all_positions" and cls.forward_all is not SequentialRecommender.forward_all
]


@pytest.mark.parametrize("name", ALL_POSITIONS)
def test_all_positions_models_are_causal(name):
    model = _build(name).double().eval()
    seq, seq_len = _batch([9, 9], 9)
    changed = seq.clone()
    changed[:, 5:] = torch.randint(1, N_ITEMS + 1, (2, 4))
    with torch.no_grad():
        before, after = model.forward_all(seq, seq_len), model.forward_all(changed, seq_len)
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=1e-10)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


# A training log as the loop sees it: four users' training parts (6, 2, 9 and 4 items).
LOG_OFFSETS = np.array([0, 6, 8, 17, 21])


def _log_batches(rows_of_prefix=None):
    """The log's samples in both modes, as `window_batch` cuts them: (prefix batch, all-positions
    batch). `rows_of_prefix`: keep only these prefix samples."""
    items = np.random.default_rng(7).integers(1, N_ITEMS + 1, size=LOG_OFFSETS[-1])
    batches = []
    for mode in ("prefix", "all_positions"):
        windows = build_windows(LOG_OFFSETS, items, mode)
        idx = np.arange(len(windows)) if mode == "all_positions" or rows_of_prefix is None else rows_of_prefix(windows)
        seq, seq_len, target = window_batch(windows, idx, max_len=10)
        batches.append({"item_seq": torch.from_numpy(seq), "seq_len": torch.from_numpy(seq_len),
                        "target": torch.from_numpy(target)})  # fmt: skip
    return batches


def _seeded_loss(model, batch):
    torch.manual_seed(3)  # BERT4Rec draws its masks from torch's generator
    return model.loss(batch)


@pytest.mark.parametrize("name", list(MODELS))
def test_declared_sample_mode_is_what_the_loss_consumes(name):
    """The loop builds the samples of `sample_mode`. A prefix model takes (B,) targets and cannot
    take (B, L) ones; a causal all-positions model's loss on one row per user equals the mean over
    every prefix of those users (the same targets, no look-ahead); BERT4Rec rebuilds each user's
    whole sequence from its all-positions row, the same as from the user's longest prefix."""
    model = _build(name).double().eval()  # eval: no dropout, so the two losses are comparable
    mode = model_class(name).sample_mode
    prefix, all_positions = _log_batches()
    assert prefix["target"].dim() == 1 and all_positions["target"].dim() == 2
    if mode == "prefix":
        assert torch.isfinite(model.loss(prefix))
        with pytest.raises(NotImplementedError):
            model.loss(all_positions)
        return
    assert mode == "all_positions"
    if name in ALL_POSITIONS:
        torch.testing.assert_close(model.loss(all_positions), model.loss(prefix), rtol=1e-10, atol=1e-10)
    else:
        longest, _ = _log_batches(lambda w: np.flatnonzero(np.isin(w.end, LOG_OFFSETS[1:] - 1)))
        torch.testing.assert_close(_seeded_loss(model, all_positions), _seeded_loss(model, longest), rtol=1e-10, atol=1e-10)
        assert not torch.allclose(_seeded_loss(model, all_positions), _seeded_loss(model, prefix))


def test_backward_direction_scans_each_sequence_reversed_then_padding():
    model = _build("echomamba4rec", fast_path=False).eval()  # the full computation
    layer = model.layers[0]
    seen = {}
    layer.forward_mamba.register_forward_hook(lambda m, args, out: seen.__setitem__("fwd", args[0]))
    layer.backward_mamba.register_forward_hook(lambda m, args, out: seen.__setitem__("bwd", args[0]))
    seq, seq_len = _batch(LENGTHS, 12)
    with torch.no_grad():
        model(seq, seq_len)
    assert torch.equal(seen["bwd"], reverse_by_length(seen["fwd"], seq_len))
    padding = seq == 0
    assert torch.equal(seen["bwd"][padding], torch.zeros_like(seen["bwd"][padding]))
    # The first step of the backward scan is each sequence's newest item.
    rows = torch.arange(len(LENGTHS))
    assert torch.equal(seen["bwd"][:, 0], seen["fwd"][rows, seq_len - 1])


def test_fast_path_backward_direction_sees_only_the_newest_item():
    """With readout=last the fast path runs the backward Mamba on each row's last item alone."""
    model = _build("echomamba4rec").eval()
    layer = model.layers[0]
    seen = {}
    layer.forward_mamba.register_forward_hook(lambda m, args, out: seen.__setitem__("fwd", args[0]))
    layer.backward_mamba.register_forward_hook(lambda m, args, out: seen.__setitem__("bwd", args[0]))
    seq, seq_len = _batch(LENGTHS, 12)
    with torch.no_grad():
        model(seq, seq_len)
    rows = torch.arange(len(LENGTHS))
    assert seen["bwd"].shape == (len(LENGTHS), 1, 64)
    assert torch.equal(seen["bwd"][:, 0], seen["fwd"][rows, seq_len - 1])


def _train_and_score(model, batch):
    """Loss and parameter gradients of one training-mode step (dropout on, seed 5), then the
    eval-mode scores of the batch."""
    model.train()
    model.zero_grad()
    torch.manual_seed(5)
    loss = model.loss(batch)
    loss.backward()
    model.eval()
    with torch.no_grad():
        scores = model.score_all(batch["item_seq"], batch["seq_len"])
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, scores


FAST_PATH_CASES = [("reference", k) for k in ECHO_VARIANTS] + [("cpu", "default"), ("cpu", "two_layers_concat_ends_ffn")]


@pytest.mark.parametrize(("backend", "variant"), FAST_PATH_CASES, ids=[f"{b}-{v}" for b, v in FAST_PATH_CASES])
def test_fast_path_is_exact(backend, variant):
    """fast_path (compute only what the readout reads, circulant filter, channel-last Mamba with
    the fused conv) against the unoptimised path, float64: the same loss with dropout on (the
    same random draws), the same gradients of every parameter, the same scores."""
    overrides = dict(ECHO_VARIANTS[variant], scan_backend=backend)
    fast = _build("echomamba4rec", **overrides).double()
    slow = _build("echomamba4rec", fast_path=False, **overrides).double()
    slow.load_state_dict(fast.state_dict(), strict=True)
    seq, seq_len = _batch([1, 3, 10, 7, 10, 2, 5], 10, seed=4)
    batch = {"item_seq": seq, "seq_len": seq_len, "target": torch.tensor([3, 7, 11, 1, 40, 2, 9])}
    loss, grads, scores = _train_and_score(fast, batch)
    loss_ref, grads_ref, scores_ref = _train_and_score(slow, batch)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scores, scores_ref, rtol=1e-10, atol=1e-10)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("lowpass", [None, 0.3])
def test_circulant_filter_is_the_fft_filter(lowpass):
    """Every length up to max_len (the circulant product up to CIRCULANT_MAX_LEN, the FFT above):
    the same output and gradients as the FFT path, with the same dropout draws."""
    from echomamba_dist.models.layers import CIRCULANT_MAX_LEN, FrequencyFilter

    max_len = CIRCULANT_MAX_LEN + 4
    torch.manual_seed(0)
    fast = FrequencyFilter(8, max_len, dropout=0.2, lowpass=lowpass).double()
    slow = FrequencyFilter(8, max_len, dropout=0.2, lowpass=lowpass, fast_path=False).double()
    slow.load_state_dict(fast.state_dict())
    for length in (1, 2, 5, CIRCULANT_MAX_LEN, max_len):
        x = torch.randn(3, length, 8, dtype=torch.float64)
        results = []
        for f in (fast, slow):
            f.zero_grad()
            torch.manual_seed(1)
            out = f(x)
            (out * torch.arange(out.numel(), dtype=torch.float64).view_as(out).cos()).sum().backward()
            results.append((out.detach(), f.weight.grad.clone()))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-10)


def test_fast_path_trains_as_the_unoptimised_path(tmp_path):
    """Three epochs of the training loop, seed 42, float32: the per-epoch losses and validation
    metrics of fast_path and the unoptimised path agree to 1e-4."""
    from echomamba_dist.train.checkpoint import latest_checkpoint, read_meta
    from echomamba_dist.train.loop import train_per_worker

    histories = {}
    for fast_path in (True, False):
        run_dir = tmp_path / f"fast-{fast_path}"
        config = {
            "data": {"synthetic": {"n_users": 150, "n_items": 50, "n_topics": 4, "mean_length": 9.0}, "max_len": 12},
            "model": {"name": "echomamba4rec", "hidden_size": 16, "d_state": 8, "fast_path": fast_path},
            "train": {"epochs": 3, "batch_size": 128, "eval_batch_size": 256, "seed": 42, "ray": False,
                      "progress": False, "final_test": False},
            "run": {"name": "r", "storage_path": str(run_dir)},
            "tracking": {"enabled": False},
        }  # fmt: skip
        train_per_worker(config)
        histories[fast_path] = read_meta(latest_checkpoint(run_dir / "r"))["history"]
    fast, slow = histories[True], histories[False]
    assert len(fast) == len(slow) == 3
    for a, b in zip(fast, slow):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a["loss"], b["loss"])
        assert abs(a["val_ndcg@10"] - b["val_ndcg@10"]) <= 1e-4


def test_backward_output_matches_an_unpadded_run():
    model = _build("echomamba4rec", readout="ends").double().eval()
    seq, seq_len = _batch(LENGTHS, 20)
    with torch.no_grad():
        batched = model(seq, seq_len)
        for i, n in enumerate(LENGTHS):
            alone = model(seq[i : i + 1, :n], seq_len[i : i + 1])
            torch.testing.assert_close(alone[0], batched[i], rtol=0, atol=1e-6)


def test_ends_readout_differs_from_last():
    last = _build("echomamba4rec", readout="last").eval()
    ends = _build("echomamba4rec", readout="ends").eval()
    ends.load_state_dict(last.state_dict(), strict=True)
    seq, seq_len = _batch([5, 8, 3], 8)
    with torch.no_grad():
        out_last, out_ends = last(seq, seq_len), ends(seq, seq_len)
    assert not torch.allclose(out_last, out_ends, atol=1e-4)
    # A single-item sequence has one position: both readouts coincide.
    one, one_len = _batch([1], 4)
    with torch.no_grad():
        torch.testing.assert_close(last(one, one_len), ends(one, one_len))


def test_variant_structure():
    concat = _build("echomamba4rec", combine="concat")
    assert concat.layers[0].concat.weight.shape == (64, 128)
    plain = _build("echomamba4rec", filter=False, bidirectional=False, glu=False)
    layer = plain.layers[0]
    assert layer.filter is None and layer.backward_mamba is None and layer.glu is None
    assert layer.ffn is None and layer.concat is None
    assert len(_build("echomamba4rec", num_layers=2).layers) == 2
    assert _build("echomamba4rec", ffn=True).layers[0].ffn is not None


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=CASE_IDS)
def test_interface_forward_score_loss_backward(name, overrides):
    model = _build(name, **overrides).train()
    seq, seq_len = _batch([4, 6, 1], 6)
    state = model(seq, seq_len)
    assert state.shape == (3, model.hidden_size)
    assert model.score_all(seq, seq_len).shape == (3, N_ITEMS + 1)
    if model.sample_mode == "prefix":
        target = torch.tensor([3, 7, 11])
    else:
        target = torch.zeros_like(seq)
        target[seq > 0] = torch.randint(1, N_ITEMS + 1, (int((seq > 0).sum()),))
    loss = model.loss({"item_seq": seq, "seq_len": seq_len, "target": target})
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname


def test_echomamba_defaults_are_the_papers():
    cfg = EchoMamba4RecConfig()
    assert (cfg.hidden_size, cfg.num_layers, cfg.d_state, cfg.d_conv, cfg.expand) == (64, 1, 32, 4, 2)
    assert (cfg.dropout, cfg.max_len, cfg.combine, cfg.readout) == (0.2, 50, "sum", "last")
    assert cfg.filter and cfg.bidirectional and cfg.glu and not cfg.ffn
    model = EchoMamba4Rec(N_ITEMS)
    mamba = model.layers[0].forward_mamba
    assert (mamba.d_model, mamba.d_state, mamba.d_conv, mamba.d_inner) == (64, 32, 4, 128)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("echomamba4rec", {"combine": "mean"}),
        ("echomamba4rec", {"readout": "first"}),
        ("echomamba4rec", {"dropout": 1.0}),
        ("echomamba4rec", {"filter_lowpass": 0.0}),
        ("echomamba4rec", {"bidirectional": False, "readout": "ends"}),
        ("echomamba4rec", {"bidirectional": False, "combine": "concat"}),
        ("echomamba4rec", {"num_layers": 0}),
        ("sasrec", {"num_heads": 3}),
        ("gru4rec", {"num_layers": 0}),
        ("mamba4rec", {"scan_backend": "gpu"}),
    ],
)
def test_config_checks(name, bad):
    with pytest.raises(ConfigError):
        model_config_class(name)(**bad)


def test_model_configs_parse_from_dicts():
    cfg = model_config_from_dict(
        {"name": "echomamba4rec", "combine": "concat", "filter_lowpass": 0.5}
    )
    assert isinstance(cfg, EchoMamba4RecConfig) and cfg.combine == "concat"
    for name in MODELS:
        assert model_config_from_dict({"name": name}).name == name
    with pytest.raises(ConfigError, match="unknown config key"):
        model_config_from_dict({"name": "sasrec", "hiden_size": 3})
    with pytest.raises(ConfigError, match="echomamba4rec"):
        model_config_from_dict({"name": "nope"})


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("mamba4rec", ["d_state", "d_conv", "expand", "dropout", "ffn_inner_size", "scan_backend"]),
        ("bimamba4rec", ["d_state", "d_conv", "expand", "dropout", "ffn_inner_size", "scan_backend"]),
        ("sasrec", ["num_heads", "inner_size", "dropout", "attn_dropout", "max_len"]),
        (
            "bert4rec",
            ["num_heads", "inner_size", "dropout", "attn_dropout", "max_len", "mask_prob",
             "mask_last_prob", "masking"],
        ),
    ],
)
def test_configs_with_shared_fields_keep_their_keys_order_and_name(name, keys):
    """Configs that inherit their fields (base.MambaStackConfig, base.TransformerConfig) list
    them in the original order, `name` first, and report bad values under their own prefix."""
    cls = model_config_class(name)
    assert [f.name for f in dataclasses.fields(cls)] == ["name", "hidden_size", "num_layers", *keys]
    assert cls().name == name
    assert list(to_dict(cls())) == ["name", "hidden_size", "num_layers", *keys]
    with pytest.raises(ConfigError, match=r"^model\.num_layers: must be >= 1, got 0$"):
        model_config_from_dict({"name": name, "num_layers": 0})
    with pytest.raises(ConfigError, match=r"^model\.dropout: must be in \[0, 1\), got 1\.0$"):
        model_config_from_dict({"name": name, "dropout": 1.0})


def test_registry_build_and_list():
    with pytest.raises(KeyError, match="unknown model 'nope'; known: echomamba4rec, sasrec"):
        model_config_class("nope")
    assert isinstance(build_model("gru4rec", 10), MODELS["gru4rec"][0])
    with pytest.raises(TypeError):
        build_model(dataclasses.replace(_config("sasrec"), name="gru4rec"), 10)



def test_listed_parameter_counts_follow_the_catalogue_and_the_documented_shapes():
    """Each extra item adds one H = 64 embedding row (BERT4Rec also an output bias), and GRU4Rec,
    counted by hand, has what its docstring draws. `echomamba models` counts at Amazon-Beauty's
    12,101 items (paper, Table 1; docs/benchmarks.md quotes these counts)."""
    small = {name: n for name, _, n in list_models(n_items=100)}
    large = {name: n for name, _, n in list_models(n_items=300)}
    assert list(small) == list(MODELS)
    for name in MODELS:
        assert large[name] - small[name] == 200 * (64 + (name == "bert4rec")), name
    hidden = gru = 64

    def gru4rec(n_items):  # embedding, GRU without biases (3 gates), Linear gru -> H
        return (n_items + 1) * hidden + 3 * gru * (hidden + gru) + (gru * hidden + hidden)

    assert small["gru4rec"] == gru4rec(100)
    assert {name: n for name, _, n in list_models()}["gru4rec"] == gru4rec(12101)


def test_filter_rejects_sequences_longer_than_max_len():
    model = _build("echomamba4rec", max_len=8)
    seq, seq_len = _batch([9], 9)
    with pytest.raises(ValueError, match="max_len"):
        model(seq, seq_len)
    assert model.max_len == 8 and _build("gru4rec").max_len is None


@pytest.mark.parametrize(("name", "overrides"), [(n, {}) for n in MODELS] + [
    ("echomamba4rec", {"combine": "concat", "readout": "ends"})
], ids=list(MODELS) + ["echomamba4rec-concat-ends"])
def test_overfits_a_small_batch(name, overrides):
    """30 Adam steps on one fixed batch cut the loss substantially."""
    overrides = dict(overrides, hidden_size=32, dropout=0.0)
    if name == "sasrec":
        overrides["inner_size"] = 64
    if name == "gru4rec":
        overrides["gru_size"] = 32
    if name == "bert4rec":  # the next-item task; its masked objective: tests/models/test_baselines.py
        overrides["mask_last_prob"] = 1.0
    model = _build(name, seed=1, **overrides).train()
    lengths = [8, 5, 7, 3, 8, 6, 2, 8]
    seq, seq_len = _batch(lengths, 8, seed=3)
    if model.sample_mode == "prefix":
        target = (seq[torch.arange(8), seq_len - 1] * 7) % N_ITEMS + 1
    else:
        target = torch.where(seq > 0, (seq * 7) % N_ITEMS + 1, torch.zeros_like(seq))
    batch = {"item_seq": seq, "seq_len": seq_len, "target": target}
    optimizer = torch.optim.Adam(model.param_groups(0.0), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_autocast_runs(name):
    model = _build(name).train()
    seq, seq_len = _batch([4, 6], 6)
    target = torch.tensor([1, 2]) if model.sample_mode == "prefix" else seq.clamp(max=N_ITEMS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss({"item_seq": seq, "seq_len": seq_len, "target": target})
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


def test_importing_the_models_imports_no_optional_kernels():
    code = (
        "import sys, echomamba_dist, echomamba_dist.models.registry; "
        "bad = [m for m in sys.modules "
        "if m.split('.')[0] in ('mamba_ssm', 'causal_conv1d', 'triton', 'ray')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_released_glu_is_a_normalised_residual_block():
    """glu_form=released: LayerNorm(h + Dropout(W3 GLU(h))); with W3 = 0 it is LayerNorm(h), and
    the user vector is normalised (eq. 19's GLU alone is not)."""
    from echomamba_dist.models.layers import ResidualGLU

    torch.manual_seed(0)
    block = ResidualGLU(16, dropout=0.2).eval()
    h = torch.randn(5, 16) * 3 + 1
    with torch.no_grad():
        block.out.weight.zero_()
        block.out.bias.zero_()
        expected = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-12)
        torch.testing.assert_close(block(h), expected, rtol=1e-5, atol=1e-5)
    seq, seq_len = _batch(LENGTHS, 12)
    released = _build("echomamba4rec", glu_form="released").eval()
    paper = _build("echomamba4rec").eval()
    with torch.no_grad():
        out_released, out_paper = released(seq, seq_len), paper(seq, seq_len)
    torch.testing.assert_close(out_released.std(-1, unbiased=False), torch.ones(len(LENGTHS)), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(out_paper.std(-1, unbiased=False), torch.ones(len(LENGTHS)), atol=0.1)
    assert {n for n, _ in released.named_parameters()} - {n for n, _ in paper.named_parameters()} == {
        "layers.0.glu.out.weight", "layers.0.glu.out.bias", "layers.0.glu.norm.weight", "layers.0.glu.norm.bias",
        "layers.0.glu.glu.proj.weight", "layers.0.glu.glu.proj.bias",
    }


def test_normal_mamba_init_is_the_released_codes_init():
    """mamba_init=normal: every Linear inside the Mamba blocks ~ N(0, 0.02) with zero biases, so
    dt starts at softplus(0) = ln 2; mamba_ssm's init (the default) keeps dt in [0.001, 0.1]."""
    normal = _build("echomamba4rec", mamba_init="normal", hidden_size=64)
    default = _build("echomamba4rec", hidden_size=64)
    for block in (normal.layers[0].forward_mamba, normal.layers[0].backward_mamba):
        dt = torch.nn.functional.softplus(block.dt_proj.bias)
        torch.testing.assert_close(dt, torch.full_like(dt, math.log(2.0)))
        for linear in (block.in_proj, block.x_proj, block.dt_proj, block.out_proj):
            assert abs(float(linear.weight.detach().std()) - 0.02) < 0.003, linear
    dt = torch.nn.functional.softplus(default.layers[0].forward_mamba.dt_proj.bias)
    assert float(dt.min()) >= 0.001 - 1e-6 and float(dt.max()) <= 0.1 + 1e-6
    # A_log (and D) keep their S4D-real init: they are parameters, not Linears
    torch.testing.assert_close(normal.layers[0].forward_mamba.A_log, default.layers[0].forward_mamba.A_log)
