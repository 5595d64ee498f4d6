"""The Mamba block and the selective scan: math, gradients, parameter layout, initialisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from echomamba_dist.models.mamba import Mamba, load_cuda_mamba, set_scan_backend
from echomamba_dist.ops.selective_scan import selective_scan, selective_scan_ref


def _scan_inputs(batch=2, d_inner=3, length=5, d_state=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        u=rand(batch, d_inner, length),
        delta=rand(batch, d_inner, length) * 0.5,
        A=-torch.rand(d_inner, d_state, generator=g, dtype=dtype) - 0.1,
        B=rand(batch, d_state, length),
        C=rand(batch, d_state, length),
        D=rand(d_inner),
        z=rand(batch, d_inner, length),
        delta_bias=rand(d_inner) * 0.1,
    )


def naive_selective_scan(u, delta, A, B, C, D, z, delta_bias):
    """Textbook recurrence with every discretised tensor materialised as (B, D, L, N)."""
    dt = F.softplus(delta + delta_bias[None, :, None])  # (B, D, L)
    dA = torch.exp(dt[..., None] * A[None, :, None, :])  # (B, D, L, N): zero-order hold
    dBu = dt[..., None] * B.transpose(1, 2)[:, None] * u[..., None]  # (B, D, L, N): Euler
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[2]):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))  # (B, D)
    y = torch.stack(ys, -1) + D[None, :, None] * u  # (B, D, L)
    return y * F.silu(z)


def test_reference_scan_matches_textbook_recurrence():
    inputs = _scan_inputs()
    expected = naive_selective_scan(**inputs)
    got = selective_scan_ref(**inputs, delta_softplus=True)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_reference_scan_fp32_and_dispatcher():
    inputs = {k: v.float() for k, v in _scan_inputs(seed=1).items()}
    expected = naive_selective_scan(**{k: v.double() for k, v in inputs.items()}).float()
    got = selective_scan(**inputs, delta_softplus=True, backend="reference")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_reference_scan_gradcheck_float64():
    small = _scan_inputs(batch=1, d_inner=2, length=4, d_state=3)
    inputs = {k: v.requires_grad_() for k, v in small.items()}
    names = list(inputs)

    def fn(*args):
        return selective_scan_ref(**dict(zip(names, args)), delta_softplus=True)

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()), eps=1e-6, atol=1e-6)


def test_state_dict_keys_and_shapes_are_mamba_ssm_v1():
    d_model, d_state, d_conv, expand = 64, 32, 4, 2
    block = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
    d_inner, dt_rank = expand * d_model, math.ceil(d_model / 16)
    expected = {
        "in_proj.weight": (2 * d_inner, d_model),
        "conv1d.weight": (d_inner, 1, d_conv),
        "conv1d.bias": (d_inner,),
        "x_proj.weight": (dt_rank + 2 * d_state, d_inner),
        "dt_proj.weight": (d_inner, dt_rank),
        "dt_proj.bias": (d_inner,),
        "A_log": (d_inner, d_state),
        "D": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }
    state = block.state_dict()
    assert sorted(state) == sorted(expected)  # exactly these keys, no buffers
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert (block.d_inner, block.dt_rank) == (d_inner, dt_rank)


def test_constructor_defaults_and_options():
    block = Mamba(32)
    assert (block.d_state, block.d_conv, block.expand, block.dt_rank) == (16, 4, 2, 2)
    with_bias = Mamba(16, bias=True, conv_bias=False, dt_rank=3)
    keys = set(with_bias.state_dict())
    assert {"in_proj.bias", "out_proj.bias"} <= keys and "conv1d.bias" not in keys
    assert with_bias.dt_proj.weight.shape == (32, 3)
    with pytest.raises(NotImplementedError):
        Mamba(16, dt_init="bogus")


def test_initialisation_dt_A_D_and_no_weight_decay_tags():
    torch.manual_seed(0)
    dt_min, dt_max = 0.002, 0.05
    block = Mamba(48, d_state=8, dt_min=dt_min, dt_max=dt_max)
    dt = F.softplus(block.dt_proj.bias.detach())
    assert dt.min() >= dt_min * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5)
    assert dt.std() > 0  # random, log-uniform
    expected_A_log = torch.log(torch.arange(1, 9, dtype=torch.float32)).expand(block.d_inner, 8)
    torch.testing.assert_close(block.A_log.detach(), expected_A_log)
    torch.testing.assert_close(block.D.detach(), torch.ones(block.d_inner))
    bound = block.dt_rank**-0.5
    assert block.dt_proj.weight.abs().max() <= bound
    assert block.A_log._no_weight_decay and block.D._no_weight_decay
    assert Mamba(16, dt_init="constant").dt_proj.weight.unique().numel() == 1


def test_block_forward_shape_causality_and_gradients():
    torch.manual_seed(0)
    block = Mamba(8, d_state=4, scan_backend="reference").double()
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    y = block(x)
    assert y.shape == (2, 7, 8)
    x2 = x.detach().clone()
    x2[:, 4:] = torch.randn(2, 3, 8, dtype=torch.float64)  # change the future only
    torch.testing.assert_close(block(x2)[:, :4], y[:, :4].detach(), rtol=0, atol=1e-12)
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())


def test_block_gradcheck_float64_small():
    torch.manual_seed(0)
    block = Mamba(4, d_state=2, d_conv=2, expand=1, scan_backend="reference").double()
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fast_path_is_the_same_block(backend):
    """use_fast_path (channel-last, fused conv) and the channel-first nn.Conv1d path: the same
    outputs and parameter gradients, in float64, also read at one position per row."""
    torch.manual_seed(0)
    fast = Mamba(8, d_state=4, scan_backend=backend).double()
    slow = Mamba(8, d_state=4, scan_backend=backend, use_fast_path=False).double()
    slow.load_state_dict(fast.state_dict(), strict=True)
    x = torch.randn(3, 9, 8, dtype=torch.float64)
    positions = torch.tensor([0, 8, 4])
    for kwargs in ({}, {"positions": positions}):
        outs, grads = [], []
        for block in (fast, slow):
            block.zero_grad()
            out = block(x, **kwargs)
            (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
            outs.append(out.detach())
            grads.append({n: p.grad.clone() for n, p in block.named_parameters()})
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
        for name in grads[1]:
            torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-10, msg=name)
    rows = torch.arange(3)
    torch.testing.assert_close(fast(x, positions=positions), fast(x)[rows, positions], rtol=1e-12, atol=1e-12)


def test_set_scan_backend_and_bad_backend():
    block = torch.nn.Sequential(Mamba(8), Mamba(8))
    set_scan_backend(block, "reference")
    assert all(m.scan_backend == "reference" for m in block)
    block[0].scan_backend = "bogus"
    with pytest.raises(ValueError):
        block[0](torch.randn(1, 3, 8))
    if not torch.cuda.is_available():
        block[1].scan_backend = "cuda"
        with pytest.raises(RuntimeError):
            block[1](torch.randn(1, 3, 8))


def _cuda_mamba_available() -> bool:
    return torch.cuda.is_available() and load_cuda_mamba() is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_mamba_available(), reason="needs a CUDA GPU and mamba-ssm")
class TestCuda:
    def test_reference_vs_cuda_scan(self):
        inputs = _scan_inputs(batch=3, d_inner=16, length=33, d_state=8)
        inputs = {k: v.float().cuda() for k, v in inputs.items()}
        ref = selective_scan(**inputs, delta_softplus=True, backend="reference")
        fast = selective_scan(**inputs, delta_softplus=True, backend="cuda")
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)

    def test_block_reference_vs_cuda_backend(self):
        torch.manual_seed(0)
        block = Mamba(64, d_state=32, scan_backend="reference").cuda()
        x = torch.randn(4, 50, 64, device="cuda")
        ref = block(x)
        block.scan_backend = "cuda"
        torch.testing.assert_close(block(x), ref, rtol=1e-4, atol=1e-4)

    def test_state_dict_loads_into_mamba_ssm_strict(self):
        torch.manual_seed(0)
        ours = Mamba(64, d_state=32, scan_backend="reference").cuda()
        theirs = load_cuda_mamba()(64, d_state=32).cuda()
        theirs.load_state_dict(ours.state_dict(), strict=True)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(4, 50, 64, device="cuda")
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-3, atol=1e-3)
