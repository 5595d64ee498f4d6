"""The fused depthwise causal conv1d + SiLU against its reference twin (`nn.Conv1d`'s math)."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("numba")

from echomamba_dist.ops.causal_conv1d import causal_conv1d_silu, causal_conv1d_silu_ref  # noqa: E402
from echomamba_dist.ops.causal_conv1d_cpu import causal_conv1d_silu_cpu  # noqa: E402


def _inputs(batch, length, d_inner, kernel, *, dtype=torch.float64, bias=True, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # x as the Mamba block passes it: the first half of in_proj's (B, L, 2D) output
        x = torch.randn(batch, length, 2 * d_inner, generator=g, dtype=dtype)[..., :d_inner]
    else:
        x = torch.randn(batch, length, d_inner, generator=g, dtype=dtype)
    weight = torch.randn(d_inner, kernel, generator=g, dtype=dtype) * 0.5
    b = torch.randn(d_inner, generator=g, dtype=dtype) if bias else None
    grad_out = torch.randn(batch, length, d_inner, generator=g, dtype=dtype)
    return x, weight, b, grad_out


def _run(fn, x, weight, bias, grad_out):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    out = fn(*leaves)
    (out * grad_out).sum().backward()
    return out.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize(
    "batch,length,d_inner,kernel,bias,strided",
    [(b, l, d, k, bias, s) for (b, l, d, k), bias, s in itertools.product(
        [(1, 1, 1, 4), (3, 2, 5, 4), (2, 7, 16, 4), (4, 50, 33, 4), (2, 9, 8, 2), (2, 3, 8, 6)],
        (True, False), (False, True))],
)  # fmt: skip
def test_matches_reference_float64(batch, length, d_inner, kernel, bias, strided):
    x, w, b, grad_out = _inputs(batch, length, d_inner, kernel, bias=bias, strided=strided)
    out_ref, grads_ref = _run(causal_conv1d_silu_ref, x, w, b, grad_out)
    out, grads = _run(causal_conv1d_silu_cpu, x, w, b, grad_out)
    assert out.shape == (batch, length, d_inner) and out.dtype == torch.float64
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for name, got, want in zip(("x", "weight", "bias"), grads, grads_ref):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


def test_reference_is_the_mamba_blocks_nn_conv1d():
    x, w, b, _ = _inputs(2, 9, 6, 4)
    conv = torch.nn.Conv1d(6, 6, kernel_size=4, groups=6, padding=3).double()
    with torch.no_grad():
        conv.weight.copy_(w[:, None, :])
        conv.bias.copy_(b)
        expected = torch.nn.functional.silu(conv(x.transpose(1, 2))[..., :9]).transpose(1, 2)
    torch.testing.assert_close(causal_conv1d_silu_ref(x, w, b), expected, rtol=0, atol=0)


def test_gradcheck_float64():
    x, w, b, _ = _inputs(2, 5, 3, 4, strided=True, seed=1)
    args = tuple(t.detach().clone().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(causal_conv1d_silu_cpu, args, eps=1e-6, atol=1e-7)


def test_float32_and_bfloat16():
    x, w, b, grad_out = _inputs(3, 20, 32, 4, dtype=torch.float32, strided=True, seed=2)
    out_ref, grads_ref = _run(causal_conv1d_silu_ref, x, w, b, grad_out)
    out, grads = _run(causal_conv1d_silu_cpu, x, w, b, grad_out)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    out16 = causal_conv1d_silu_cpu(x.bfloat16(), w, b)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out_ref, rtol=2e-2, atol=2e-2)


def test_thread_counts_agree():
    x, w, b, grad_out = _inputs(9, 6, 8, 4, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(causal_conv1d_silu_cpu, x, w, b, grad_out)
        torch.set_num_threads(2)
        two = _run(causal_conv1d_silu_cpu, x, w, b, grad_out)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one[0], two[0], rtol=0, atol=0)
    for got, want in zip(one[1], two[1]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_dispatcher_and_checks():
    x, w, b, _ = _inputs(2, 4, 3, 4)
    out = causal_conv1d_silu(x.requires_grad_(), w, b)
    assert type(out.grad_fn).__name__ == "_CausalConv1dSiluCPUBackward"
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_silu_cpu(x, w[:2], b)
    empty = causal_conv1d_silu_cpu(torch.zeros(0, 4, 3, dtype=torch.float64), w, b)
    assert empty.shape == (0, 4, 3)
