"""The fused CPU selective scan against its reference twin: outputs, gradients, dispatch, edges."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from echomamba_dist.ops.selective_scan import resolve_backend, selective_scan, selective_scan_ref
from echomamba_dist.ops.selective_scan_cpu import selective_scan_cpu

ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

# The bound. In float64 both sides compute in float64 and agree to ~1e-15, so 1e-5 holds
# with a wide margin. In float32 each side rounds on its own, and errors grow with the number of
# terms summed (N for y, B*L for dA, D for dB and dC), so float32 is checked relative to each
# tensor's largest magnitude, at 1e-5 as well: the worst case in these float32 tests is 1.6e-6,
# and each side is within ~1.5e-6 of a float64 evaluation over the float64 grid's shapes.
TOL = 1e-5


def _inputs(batch, d_inner, length, d_state, *, dtype=torch.float64, seed=0,
            with_D=True, with_z=True, with_bias=True):  # fmt: skip
    """Realistic scan inputs (negative A, moderate steps) as leaf tensors that require grad."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = dict(
        u=rand(batch, d_inner, length),
        delta=rand(batch, d_inner, length) * 0.5,
        A=-torch.rand(d_inner, d_state, generator=g, dtype=torch.float64) * 3 - 0.1,
        B=rand(batch, d_state, length),
        C=rand(batch, d_state, length),
        D=rand(d_inner) if with_D else None,
        z=rand(batch, d_inner, length) if with_z else None,
        delta_bias=rand(d_inner) * 0.3 if with_bias else None,
    )
    return {k: None if v is None else v.to(dtype).requires_grad_() for k, v in x.items()}


def _grad_out(batch, d_inner, length, *, dtype=torch.float64, seed=100):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, d_inner, length, generator=g, dtype=torch.float64).to(dtype)


def _run(fn, x, softplus, grad_out):
    """Output and the gradients of every given input for a fixed upstream gradient."""
    out = fn(*(x[k] for k in ARGS), delta_softplus=softplus)
    given = [k for k in ARGS if x[k] is not None]
    grads = torch.autograd.grad(out, [x[k] for k in given], grad_out)
    return out, dict(zip(given, grads))


def _assert_scaled_close(actual, expected, tol, what):
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


SHAPES = list(itertools.product((1, 3), (1, 4), (1, 7, 33), (1, 5, 16)))  # (B, D, L, N)
OPTIONS = list(itertools.product((False, True), repeat=4))  # (D, z, delta_bias, softplus)


@pytest.mark.parametrize("with_D,with_z,with_bias,softplus", OPTIONS)
@pytest.mark.parametrize("batch,d_inner,length,d_state", SHAPES)
def test_matches_reference_float64(batch, d_inner, length, d_state, with_D, with_z, with_bias,
                                   softplus):  # fmt: skip
    x = _inputs(batch, d_inner, length, d_state, with_D=with_D, with_z=with_z, with_bias=with_bias)
    grad_out = _grad_out(batch, d_inner, length)
    out_ref, grads_ref = _run(selective_scan_ref, x, softplus, grad_out)
    out, grads = _run(selective_scan_cpu, x, softplus, grad_out)
    assert out.dtype == torch.float64 and out.shape == (batch, d_inner, length)
    torch.testing.assert_close(out, out_ref, rtol=TOL, atol=TOL)
    assert grads.keys() == grads_ref.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=TOL, atol=TOL, msg=k)


@pytest.mark.parametrize("softplus", (False, True))
@pytest.mark.parametrize(
    "batch,d_inner,length,d_state", [(1, 4, 33, 16), (3, 4, 33, 5), (9, 3, 7, 16)]
)
def test_matches_reference_float32(batch, d_inner, length, d_state, softplus):
    x = _inputs(batch, d_inner, length, d_state, dtype=torch.float32, seed=1)
    grad_out = _grad_out(batch, d_inner, length, dtype=torch.float32)
    out_ref, grads_ref = _run(selective_scan_ref, x, softplus, grad_out)
    out, grads = _run(selective_scan_cpu, x, softplus, grad_out)
    assert out.dtype == torch.float32
    _assert_scaled_close(out, out_ref, TOL, "out")
    for k in grads:
        assert grads[k].dtype == torch.float32, k
        _assert_scaled_close(grads[k], grads_ref[k], TOL, k)


def test_gradcheck_float64():
    x = _inputs(2, 3, 4, 3, seed=2)
    fn = lambda *args: selective_scan_cpu(*args, delta_softplus=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(x[k] for k in ARGS), eps=1e-6, atol=1e-7)


def test_bfloat16_inputs_compute_in_float32():
    x32 = _inputs(2, 4, 9, 5, dtype=torch.float32, seed=3)
    x16 = {k: v.detach().bfloat16().requires_grad_() for k, v in x32.items()}
    grad_out = _grad_out(2, 4, 9, dtype=torch.bfloat16)
    out, grads = _run(selective_scan_cpu, x16, True, grad_out)
    out_ref, grads_ref = _run(selective_scan_ref, x16, True, grad_out)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads.values())
    # Same fp32 compute on the same bf16 inputs: differences are the final bf16 rounding.
    _assert_scaled_close(out, out_ref, 2**-7, "out")
    for k in grads:
        _assert_scaled_close(grads[k], grads_ref[k], 2**-7, k)


def test_non_contiguous_inputs():
    x = _inputs(3, 4, 7, 5, seed=4)
    # B and C laid out as (B, L, N) and viewed as (B, N, L), as the Mamba block produces them;
    # u and z as views of a wider tensor.
    strided = dict(x)
    strided["B"] = x["B"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    strided["C"] = x["C"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    wide = torch.cat([x["u"].detach(), x["z"].detach()], dim=1)
    strided["u"], strided["z"] = (t.requires_grad_() for t in (wide[:, :4], wide[:, 4:]))
    assert not strided["B"].is_contiguous() and not strided["u"].is_contiguous()
    grad_out = _grad_out(3, 4, 7)
    out, grads = _run(selective_scan_cpu, strided, True, grad_out)
    out_ref, grads_ref = _run(selective_scan_ref, x, True, grad_out)
    torch.testing.assert_close(out, out_ref, rtol=TOL, atol=TOL)
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=TOL, atol=TOL, msg=k)


def test_only_requested_gradients():
    x = _inputs(2, 3, 5, 4, seed=5)
    args = {k: v.detach() for k, v in x.items()}
    args["u"].requires_grad_()
    args["A"].requires_grad_()
    selective_scan_cpu(*(args[k] for k in ARGS), delta_softplus=True).sum().backward()
    assert args["u"].grad is not None and args["A"].grad is not None
    assert all(args[k].grad is None for k in ARGS if k not in ("u", "A"))
    with torch.no_grad():
        out = selective_scan_cpu(*(x[k] for k in ARGS), delta_softplus=True)
    assert out.grad_fn is None


def test_thread_counts_agree():
    x = _inputs(9, 4, 7, 5, seed=6)
    grad_out = _grad_out(9, 4, 7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, grads1 = _run(selective_scan_cpu, x, True, grad_out)
        torch.set_num_threads(2)
        out2, grads2 = _run(selective_scan_cpu, x, True, grad_out)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)  # the forward has no reductions
    for k in grads1:
        torch.testing.assert_close(grads1[k], grads2[k], rtol=1e-12, atol=1e-12, msg=k)


def test_concurrent_calls_from_threads():
    x = _inputs(9, 4, 7, 5, seed=8)
    grad_out = _grad_out(9, 4, 7)
    expected = _run(selective_scan_cpu, x, True, grad_out)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: _run(selective_scan_cpu, x, True, grad_out), range(6)))
    for out, grads in results:
        torch.testing.assert_close(out, expected[0], rtol=0, atol=0)
        for k in grads:
            torch.testing.assert_close(grads[k], expected[1][k], rtol=0, atol=0, msg=k)


def test_float32_exp_is_accurate_in_the_kernels_fastmath_mode():
    import numba
    import numpy as np

    from echomamba_dist.ops import selective_scan_cpu as mod

    @numba.njit(fastmath=mod._KERNEL_FASTMATH)  # as the kernels that inline it
    def exp_all(x, out):
        for i in range(x.size):
            out[i] = mod._exp(x[i])

    x = np.concatenate([np.linspace(-100, 100, 400_001, dtype=np.float32),
                        np.array([np.nan, np.inf, -np.inf], dtype=np.float32)])  # fmt: skip
    out = np.empty_like(x)
    exp_all(x, out)
    with np.errstate(over="ignore", under="ignore"):
        true = np.exp(x.astype(np.float64))
    normal = (x > -86.9) & (true < np.finfo(np.float32).max)
    rel = np.abs(out[normal] - true[normal]) / true[normal]
    assert rel.max() < 2 * 2.0**-24  # 2 ulp
    assert np.all(out[x <= -87.0] < 1.2e-38) and np.all(out[x >= 88.8] == np.inf)
    assert np.isnan(out[-3]) and out[-2] == np.inf and out[-1] == 0


def test_dispatcher_uses_the_cpu_kernel():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    x = _inputs(2, 3, 5, 4, seed=7)
    expected = selective_scan_cpu(*(x[k] for k in ARGS), delta_softplus=True)
    for backend in ("cpu", "auto"):
        out = selective_scan(*(x[k] for k in ARGS), delta_softplus=True, backend=backend)
        assert type(out.grad_fn).__name__ == "_SelectiveScanCPUBackward", backend
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_shape_mismatch_raises():
    x = _inputs(2, 3, 5, 4)
    x["C"] = x["C"][:, :, :4]
    with pytest.raises(ValueError, match="C has shape"):
        selective_scan_cpu(*(x[k] for k in ARGS))


@pytest.mark.parametrize(
    "batch,d_inner,length,d_state", [(0, 3, 5, 4), (2, 0, 5, 4), (2, 3, 0, 4), (2, 3, 5, 0)]
)
def test_empty_dimensions(batch, d_inner, length, d_state):
    x = _inputs(batch, d_inner, length, d_state)
    out = selective_scan_cpu(*(x[k] for k in ARGS), delta_softplus=True)
    assert out.shape == (batch, d_inner, length)
    out.sum().backward()
    assert all(x[k].grad.shape == x[k].shape for k in ARGS)
    if d_state == 0:  # y = D * u, gated
        expected = selective_scan_ref(*(x[k] for k in ARGS), delta_softplus=True)
        torch.testing.assert_close(out, expected)


def _channel_last(t: torch.Tensor) -> torch.Tensor:
    """The same values as a (B, D, L)-shaped view of (B, L, D) memory, a leaf that requires grad."""
    return t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()


@pytest.mark.parametrize("batch,d_inner,length,d_state", [(3, 4, 7, 5), (2, 16, 33, 8), (1, 3, 2, 4)])
def test_channel_last_views_are_read_in_place(batch, d_inner, length, d_state):
    """As the Mamba block's channel-last path passes them: u, delta, z (and B, C) as transposed
    views of (B, L, .) memory; the output comes back in that layout, with the reference's values."""
    x = _inputs(batch, d_inner, length, d_state, seed=11)
    views = {k: _channel_last(v) if k in ("u", "delta", "z", "B", "C") else v for k, v in x.items()}
    grad_out = _grad_out(batch, d_inner, length)
    out, grads = _run(selective_scan_cpu, views, True, grad_out)
    out_ref, grads_ref = _run(selective_scan_ref, x, True, grad_out)
    assert out.stride(1) == 1  # (B, L, D) memory: no copy before out_proj
    torch.testing.assert_close(out, out_ref, rtol=TOL, atol=TOL)
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=TOL, atol=TOL, msg=k)


def test_upstream_gradient_at_one_position_per_row():
    """The gathered readout: dout is zero after one position per row, where the backward stops
    early; the gradients are still the reference's (and exactly 0 after that position)."""
    batch, d_inner, length, d_state = 4, 5, 9, 6
    x = _inputs(batch, d_inner, length, d_state, seed=12)
    grad_out = torch.zeros(batch, d_inner, length, dtype=torch.float64)
    last = torch.tensor([0, 3, 8, 5])
    grad_out[torch.arange(batch), :, last] = _grad_out(batch, d_inner, 1)[..., 0]
    out, grads = _run(selective_scan_cpu, x, True, grad_out)
    _, grads_ref = _run(selective_scan_ref, x, True, grad_out)
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=1e-12, atol=1e-12, msg=k)
    after = torch.arange(length)[None, :] > last[:, None]  # (B, L)
    assert torch.equal(grads["u"].transpose(1, 2)[after], torch.zeros_like(grads["u"].transpose(1, 2)[after]))


@pytest.mark.parametrize("with_D,with_z,with_bias,softplus", [(True, True, True, True), (False, False, False, False)])
def test_length_one_closed_form_gradcheck(with_D, with_z, with_bias, softplus):
    """Length 1 (EchoMamba4Rec's backward direction at the last item) takes the closed form; A
    gets a zero gradient, not none, as from the reference."""
    x = _inputs(3, 4, 1, 5, seed=13, with_D=with_D, with_z=with_z, with_bias=with_bias)
    given = [k for k in ARGS if x[k] is not None]

    def fn(*args):
        kwargs = dict(zip(given, args))
        return selective_scan_cpu(*(kwargs.get(k) for k in ARGS), delta_softplus=softplus)

    out = fn(*(x[k] for k in given))
    assert type(out.grad_fn).__name__ == "_OneStepScanBackward"
    assert torch.autograd.gradcheck(fn, tuple(x[k] for k in given), eps=1e-6, atol=1e-7)
    out.sum().backward()
    assert torch.equal(x["A"].grad, torch.zeros_like(x["A"]))


@pytest.mark.parametrize("threads", (1, 2))
def test_channel_tiles_with_ragged_upstream_gradients(monkeypatch, threads):
    """The kernels run the channels in tiles: tiles of 3 over 8 channels (the last one short, and
    with 2 threads cut again by the work items' channel ranges), a dout that ends at a different
    step in each (row, channel), so a tile runs to its channels' latest one; the outputs and
    gradients are the reference's and exactly 0 after each channel's last step."""
    import echomamba_dist.ops.selective_scan_cpu as scan_cpu

    monkeypatch.setattr(scan_cpu, "_D_TILE", 3)
    batch, d_inner, length, d_state = 2, 8, 9, 5
    x = _inputs(batch, d_inner, length, d_state, seed=14)
    last = torch.tensor([[0, 3, 8, 5, 2, 2, 7, 1], [4, 0, 1, 6, 8, 3, 0, 5]])  # (B, D)
    grad_out = _grad_out(batch, d_inner, length) * (torch.arange(length) <= last[..., None])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out, grads = _run(selective_scan_cpu, x, True, grad_out)
    finally:
        torch.set_num_threads(before)
    out_ref, grads_ref = _run(selective_scan_ref, x, True, grad_out)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=1e-12, atol=1e-12, msg=k)
    after = torch.arange(length) > last[..., None]  # (B, D, L)
    for k in ("u", "delta", "z"):
        assert torch.equal(grads[k][after], torch.zeros_like(grads[k][after])), k
