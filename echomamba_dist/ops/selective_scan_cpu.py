"""Fused selective scan for CPU: Numba kernels behind a `torch.autograd.Function`.

Same signature, shapes and math as `selective_scan_ref` (see `echomamba_dist.ops.selective_scan`).
The reference materialises several (B, D, N) tensors per step and autograd keeps them all, so its
memory grows as B*D*L*N. Here each (batch, channel) pair runs its whole recurrence with the
N-vector state in a small array; the forward keeps only its inputs and the step sizes dt
(B, D, L), and the backward recomputes the states of one (b, d) pair at a time into an (L+1, N)
scratch before running the adjoint recurrence backwards in time. Per-step tensors live as
(B, L, D) memory (channel-last, as the Mamba block produces them). Peak memory is the inputs, the
output, dt and the gradients: O(B*D*L + B*L*N), never B*D*L*N.

Work is split over (b, d) pairs and run on as many threads as `torch.get_num_threads()`.
Compute is fp32 for fp32/bf16/fp16 inputs (as the reference) and fp64 for fp64 inputs, so that
`torch.autograd.gradcheck` can check the backward exactly; Numba compiles one specialisation per
dtype on first use (~10 s) and caches it on disk when the package directory is writable.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import types
from numba.extending import overload

from echomamba_dist.ops.selective_scan import selective_scan_ref

# Work items per thread: enough to balance uneven chunks, few enough that the per-item scratch
# and the per-item gradient partials stay negligible.
_ITEMS_PER_THREAD = 4
# torch.nn.functional.softplus's default threshold: above it softplus(x) is x and its slope 1.
_SOFTPLUS_THRESHOLD = 20.0
# Fast-math licences, the two that cannot change inf/nan behaviour: "contract" fuses a * b + c
# into one FMA (one rounding instead of two), "reassoc" lets the sums over N (y = <h, C> and the
# two in the backward) be vectorised; their order is free anyway, the reference's einsum sums in
# its own order. The exp below is compiled apart with "contract" only, since reassociation could
# undo its range reduction.
_CONTRACT = {"contract"}
_KERNEL_FASTMATH = {"contract", "reassoc"}


def _jit(fn=None, **options):
    """`numba.njit` with an on-disk cache, or without one where no cache dir is usable.

    Numba raises at decoration time when neither `__pycache__` next to this file nor its
    user-wide fallback is writable (a read-only install); compiling on each start is fine then.
    """
    if fn is None:
        return lambda f: _jit(f, **options)
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:
        warnings.warn("selective_scan_cpu: no writable Numba cache dir; compiling without cache")
        return numba.njit(cache=False, **options)(fn)


# --- exp -----------------------------------------------------------------------------------------
# Without Intel SVML (not in this environment) LLVM turns math.exp into a scalar libm call, which
# alone took most of the kernels' time. _exp_f32 is exp written in plain arithmetic that LLVM
# vectorises over the N lanes of the state: Cody-Waite reduction x = k*ln2 + r, |r| <= ln2/2, a
# degree-7 Taylor polynomial for exp(r) (truncation < 1e-8 relative) and 2^k built in the
# exponent bits. Measured max error ~1.3 ulp over the normal range. Below -86.9 it returns 0 (the
# true value is < 2e-38, so a decay that small zeroes the state either way); above 89 it returns
# inf; nan stays nan.
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln2 with its low mantissa bits zero, so k * _LN2_HI is exact
_LN2_LO = np.float32(-2.12194440e-4)  # ln2 - _LN2_HI
_EXP_LO = np.float32(-86.9)  # the smallest x whose 2^(k-1) is still a normal float32
_EXP_HI = np.float32(89.0)  # above ~88.72 exp overflows; up to here it does so by itself
_EXP_COEF = tuple(np.float32(1.0 / math.factorial(i)) for i in range(8))
_F32_HALF = np.float32(0.5)
_F32_ZERO = np.float32(0.0)
_F32_INF = np.float32(np.inf)


def _exp_f32(x):
    xc = x
    if xc < _EXP_LO:
        xc = _EXP_LO
    if xc > _EXP_HI:
        xc = _EXP_HI
    k = np.floor(xc * _LOG2E + _F32_HALF)
    r = xc - k * _LN2_HI
    r = r - k * _LN2_LO
    p = _EXP_COEF[7]
    p = p * r + _EXP_COEF[6]
    p = p * r + _EXP_COEF[5]
    p = p * r + _EXP_COEF[4]
    p = p * r + _EXP_COEF[3]
    p = p * r + _EXP_COEF[2]
    p = p * r + _EXP_COEF[1]
    p = p * r + _EXP_COEF[0]
    # 2^(k-1) then times 2: k reaches 128 just below overflow, whose 2^k has no float32 encoding.
    scale = np.int32((np.int32(k) + 126) << 23).view(np.float32)
    y = (p + p) * scale
    if x < _EXP_LO:
        y = _F32_ZERO
    if x > _EXP_HI:
        y = _F32_INF
    if x != x:
        y = x
    return y


def _exp(x):
    """exp(x) inside the kernels: vectorisable `_exp_f32` for float32, libm's exp otherwise."""
    return math.exp(x)


@overload(_exp, jit_options={"fastmath": _CONTRACT})
def _exp_overload(x):
    if x == types.float32:
        return _exp_f32
    return lambda x: math.exp(x)


# --- kernels -------------------------------------------------------------------------------------
# Everything is fused per (b, d) pair except the elementwise functions of whole (B, D, L) tensors
# (softplus, SiLU(z), sigmoid(z), softplus's slope), which torch vectorises: the forward's skip
# and gate and the backward's gate run inside the kernels' loops over t, so a backward is one
# kernel launch plus a few small sums, not two dozen elementwise torch passes.
#
# Parallelism: each kernel is a serial, GIL-free function over one work item (a range of (b, d)
# pairs), and `_run_items` spreads the items over a thread pool sized like torch's. Numba's own
# `parallel=True` was slower on both counts we measured: compiled inside a parfor the backward's
# loop nest ran 2.5x slower than as a plain function, and Numba's OpenMP layer (a second OpenMP
# runtime next to torch's) left its threads spinning, so small calls took ~5x longer.
# The kernels take their scratch arrays as arguments: the data pointer of an array allocated
# inside the function is reloaded after every store (LLVM cannot tell that a float store does not
# overwrite it), which kept the loops over N from vectorising.


# The per-step tensors (u, dt, the gate, dout and the (B, D, L) results) come channel-last:
# (B, L, D) C-contiguous arrays, indexed [b, t, d]. The Mamba block's channel-last path hands
# them over without a copy, and one layout means one compiled specialisation per dtype (strided
# views would compile one per combination of layouts, seconds each).
@_jit(fastmath=_KERNEL_FASTMATH, nogil=True, error_model="numpy")
def _scan_fwd_pairs(u, dt, A, Bt, Ct, Dv, gate, has_D, has_z, start, stop, out, h):
    """out[b, :, d] for the flattened (b, d) pairs start..stop-1; gate: SiLU(z); h: (N,) scratch."""
    length, d_inner = u.shape[1], u.shape[2]
    n_state = A.shape[1]
    one = np.ones(1, dtype=A.dtype)[0]  # a bare 1 or 0 would promote fp32 arithmetic to fp64
    zero = one - one
    for bd in range(start, stop):
        b = bd // d_inner
        d = bd - b * d_inner
        A_d = A[d]
        D_d = Dv[d]
        h[:] = 0
        for t in range(length):
            dt_t = dt[b, t, d]
            u_t = u[b, t, d]
            dtu = dt_t * u_t
            B_t = Bt[b, t]
            C_t = Ct[b, t]
            y_t = zero
            for n in range(n_state):
                h_n = _exp(dt_t * A_d[n]) * h[n] + dtu * B_t[n]
                h[n] = h_n
                y_t += h_n * C_t[n]
            if has_D:
                y_t += D_d * u_t
            if has_z:
                y_t *= gate[b, t, d]
            out[b, t, d] = y_t


@_jit(fastmath=_KERNEL_FASTMATH, nogil=True, error_model="numpy")
def _scan_bwd_block(
    u, dt, A, Bt, Ct, Dv, gate, dgate, slope, dout, has_z, softplus, b0, b1, d0, d1,
    du, ddelta, dz, dA_acc, dBt_acc, dCt_acc, dD_acc, dbias_acc,
    hs, decays, h, lam_next, ys,
):  # fmt: skip
    """Gradients from the pairs b0 <= b < b1, d0 <= d < d1, recomputing their forward states.

    Computed by torch, vectorised: gate = SiLU(z) and dgate = SiLU'(z); slope, softplus's slope
    at delta + bias (torch's: 1 above its threshold). Dv is zeros when the scan had none.
    du, ddelta and dz are written for these pairs; dA_acc (D, N), dBt_acc and dCt_acc (B, L, N),
    dD_acc and dbias_acc (D,) are added to. Scratch: hs (L+1, N): hs[t + 1] is the state after
    step t, hs[0] = 0; decays (L, N): exp(dt_t * A[d]); h (N,): the running state; lam_next
    (N,): dL/dh_{t+1} * decay_{t+1}, the share of dL/dh_t that comes from later steps; ys (L,):
    <h_t, C_t>.

    Steps after a pair's last nonzero dout get no gradient from anywhere (the adjoint is zero
    there), so each pair runs only up to it: a model that reads one position per row (the
    gathered readout) pays for the steps up to that position, not for the padding after it.
    """
    full_length = u.shape[1]
    n_state = A.shape[1]
    one = np.ones(1, dtype=A.dtype)[0]  # a bare 1 or 0 would promote fp32 arithmetic to fp64
    zero = one - one
    hs[0] = 0
    for b in range(b0, b1):
        for d in range(d0, d1):
            A_d = A[d]
            D_d = Dv[d]
            dA_d = dA_acc[d]
            length = full_length
            while length > 0 and dout[b, length - 1, d] == 0:
                length -= 1
            for t in range(length, full_length):
                du[b, t, d] = zero
                ddelta[b, t, d] = zero
                if has_z:
                    dz[b, t, d] = zero
            # Recompute the forward pass of this pair.
            h[:] = 0
            for t in range(length):
                dt_t = dt[b, t, d]
                dtu = dt_t * u[b, t, d]
                B_t = Bt[b, t]
                h_t = hs[t + 1]
                decay_t = decays[t]
                # The recurrence runs in h, copied to hs: reading hs[t] while writing hs[t + 1]
                # (an unknown N apart) kept LLVM from vectorising this loop (~6x slower).
                C_t = Ct[b, t]
                y_t = zero
                for n in range(n_state):
                    a = _exp(dt_t * A_d[n])
                    decay_t[n] = a
                    h_n = a * h[n] + dtu * B_t[n]
                    h[n] = h_n
                    h_t[n] = h_n
                    y_t += h_n * C_t[n]
                ys[t] = y_t
            # Adjoint recurrence, backwards in time.
            lam_next[:] = 0
            dD_d = zero
            dbias_d = zero
            for t in range(length - 1, -1, -1):
                g = dout[b, t, d]
                if has_z:
                    dz[b, t, d] = g * (ys[t] + D_d * u[b, t, d]) * dgate[b, t, d]
                    g *= gate[b, t, d]  # dL/dy before the gate
                ut = u[b, t, d]
                dt_t = dt[b, t, d]
                dtu = dt_t * ut
                B_t = Bt[b, t]
                C_t = Ct[b, t]
                h_prev = hs[t]
                h_t = hs[t + 1]
                decay_t = decays[t]
                dB_t = dBt_acc[b, t]
                dC_t = dCt_acc[b, t]
                # h_t = decay * h_{t-1} + dt * u * B  =>  dL/d dt = sum_n lam_n (h_{t-1} A decay
                # + u B), dL/du = dt * sum_n lam_n B (+ D from the skip connection).
                lam_h_a_A = zero
                lam_b = zero
                for n in range(n_state):
                    lam_n = lam_next[n] + g * C_t[n]  # dL/dh_t
                    dC_t[n] += g * h_t[n]
                    dB_t[n] += lam_n * dtu
                    lha = lam_n * h_prev[n] * decay_t[n]
                    dA_d[n] += lha * dt_t
                    lam_h_a_A += lha * A_d[n]
                    lam_b += lam_n * B_t[n]
                    lam_next[n] = lam_n * decay_t[n]
                ddt = lam_h_a_A + lam_b * ut
                du[b, t, d] = lam_b * dt_t + g * D_d
                dD_d += g * ut
                if softplus:
                    ddt *= slope[b, t, d]
                ddelta[b, t, d] = ddt
                dbias_d += ddt
            dD_acc[d] += dD_d
            dbias_acc[d] += dbias_d


# --- autograd ------------------------------------------------------------------------------------


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _forget_pools_after_fork() -> None:
    # A forked child inherits the executors but not their threads; it starts its own.
    _POOLS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)


def _run_items(fn, items, threads: int) -> None:
    """fn(*args) for every args tuple in items, on `threads` threads (inline when 1)."""
    if threads <= 1 or len(items) <= 1:
        for args in items:
            fn(*args)
        return
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(threads, "selective_scan_cpu")
    for future in [pool.submit(fn, *args) for args in items]:
        future.result()  # re-raises a kernel's exception here


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _steps(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (B, D, L) tensor as (B, L, D) C-contiguous memory in `dtype`: free for the channel-last
    views of the Mamba block, a copy otherwise."""
    return t.detach().to(dtype).transpose(1, 2).contiguous()


class _SelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        compute = torch.float64 if u.dtype == torch.float64 else torch.float32
        batch, d_inner, length = u.shape

        def prep(t):
            return None if t is None else t.detach().to(compute).contiguous()

        u_c = _steps(u, compute)  # (B, L, D), as the other per-step tensors below
        delta_c = _steps(delta, compute)
        z_c = None if z is None else _steps(z, compute)
        A_c = prep(A)
        Bt = prep(B.transpose(1, 2))  # (B, L, N); free when B is already laid out this way
        Ct = prep(C.transpose(1, 2))
        zeros = torch.zeros(d_inner, dtype=compute)
        D_c = zeros if D is None else prep(D)
        bias_c = zeros if delta_bias is None else prep(delta_bias)
        dt = delta_c if delta_bias is None else delta_c + bias_c
        if delta_softplus:
            dt = F.softplus(dt)

        out = torch.empty_like(u_c)
        threads = torch.get_num_threads()
        pairs = batch * d_inner
        n_items = 1 if threads == 1 else max(1, min(pairs, threads * _ITEMS_PER_THREAD))
        gate = u_c if z_c is None else F.silu(z_c)
        arrays = (
            _np(u_c), _np(dt), _np(A_c), _np(Bt), _np(Ct), _np(D_c),
            _np(gate), D is not None, z is not None,
        )  # fmt: skip
        n_state = A.shape[1]
        items = [
            (*arrays, i * pairs // n_items, (i + 1) * pairs // n_items, _np(out),
             np.empty(n_state, dtype=arrays[0].dtype))  # scratch: h
            for i in range(n_items)
        ]  # fmt: skip
        _run_items(_scan_fwd_pairs, items, threads)

        # dt is kept (one (B, L, D) tensor) rather than recomputed: the elementwise functions
        # are left to torch.
        ctx.save_for_backward(u_c, dt, A_c, Bt, Ct, D_c, z_c, delta_c, bias_c)
        ctx.softplus = bool(delta_softplus)
        inputs = (u, delta, A, B, C, D, z, delta_bias)
        ctx.dtypes = [None if t is None else t.dtype for t in inputs]
        return out.to(u.dtype).transpose(1, 2)  # (B, D, L), channel-last memory

    @staticmethod
    def backward(ctx, dout):
        u_c, dt, A_c, Bt, Ct, D_c, z_c, delta_c, bias_c = ctx.saved_tensors
        batch, length, d_inner = u_c.shape
        n_state = A_c.shape[1]
        dout = _steps(dout, u_c.dtype)

        threads = torch.get_num_threads()
        items = threads * _ITEMS_PER_THREAD
        if threads == 1:
            n_bchunks, n_dchunks = 1, 1
        elif batch >= items:
            n_bchunks, n_dchunks = items, 1
        else:  # few sequences: split the channels too, so that every thread has work
            n_bchunks, n_dchunks = max(batch, 1), max(1, min(d_inner, -(-items // max(batch, 1))))
        du = torch.empty_like(u_c)
        ddelta = torch.empty_like(u_c)
        dz = torch.empty_like(u_c) if z_c is not None else torch.empty(1, 1, 1, dtype=u_c.dtype)

        def partial(*shape):
            return torch.zeros(*shape, dtype=u_c.dtype)

        dA_part = partial(n_bchunks, d_inner, n_state)
        dBt_part = partial(n_dchunks, batch, length, n_state)
        dCt_part = partial(n_dchunks, batch, length, n_state)
        dD_part = partial(n_bchunks, d_inner)
        dbias_part = partial(n_bchunks, d_inner)

        # The elementwise functions, vectorised by torch (in the kernels' loops over t their
        # exps ran one scalar at a time): the gate SiLU(z), its slope, and softplus's slope.
        gate = dgate = slope = u_c  # placeholders where unused
        if z_c is not None:
            sig = torch.sigmoid(z_c)
            gate = z_c * sig
            dgate = sig * (1 + z_c * (1 - sig))
        if ctx.softplus:
            x = delta_c + bias_c
            slope = torch.where(x > _SOFTPLUS_THRESHOLD, torch.ones_like(x), torch.sigmoid(x))
        inputs = (
            _np(u_c), _np(dt), _np(A_c), _np(Bt), _np(Ct), _np(D_c),
            _np(gate), _np(dgate), _np(slope), _np(dout), z_c is not None, ctx.softplus,
        )  # fmt: skip
        outputs = (_np(du), _np(ddelta), _np(dz))
        parts = [_np(p) for p in (dA_part, dBt_part, dCt_part, dD_part, dbias_part)]
        dtype = inputs[0].dtype

        def item(bc, dc):
            dA, dBt, dCt, dD, dbias = parts
            scratch = (
                np.zeros((length + 1, n_state), dtype),  # hs
                np.empty((length, n_state), dtype),  # decays
                np.empty(n_state, dtype),  # h
                np.empty(n_state, dtype),  # lam_next
                np.empty(length, dtype),  # ys
            )
            return (
                *inputs,
                bc * batch // n_bchunks, (bc + 1) * batch // n_bchunks,
                dc * d_inner // n_dchunks, (dc + 1) * d_inner // n_dchunks,
                *outputs, dA[bc], dBt[dc], dCt[dc], dD[bc], dbias[bc], *scratch,
            )  # fmt: skip

        items = [item(bc, dc) for bc in range(n_bchunks) for dc in range(n_dchunks)]
        _run_items(_scan_bwd_block, items, threads)

        def total(part):
            return part[0] if part.shape[0] == 1 else part.sum(0)

        grads = (
            du.transpose(1, 2),  # (B, D, L) views of (B, L, D) memory
            ddelta.transpose(1, 2),
            total(dA_part),
            total(dBt_part).transpose(1, 2),  # back to (B, N, L)
            total(dCt_part).transpose(1, 2),
            total(dD_part),
            dz.transpose(1, 2) if z_c is not None else None,
            total(dbias_part),
        )
        return (
            *(
                grad.to(dtype) if needed and grad is not None else None
                for grad, dtype, needed in zip(grads, ctx.dtypes, ctx.needs_input_grad)
            ),
            None,
        )


class _OneStepScan(torch.autograd.Function):
    """The scan of length-1 sequences in closed form, all (B, D) tensors: from the zero state,
    h = dt * u * B, so y = u * (dt * <B, C> + D), gated. A decays a zero state: its gradient is 0.

    EchoMamba4Rec's backward direction, read at the last item, is such a scan (B * D pairs of
    one step each), where the kernels' per-pair overhead cost more than the arithmetic.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        compute = torch.float64 if u.dtype == torch.float64 else torch.float32
        u0 = u[..., 0].detach().to(compute)  # (B, D)
        x = delta[..., 0].detach().to(compute)
        if delta_bias is not None:
            x = x + delta_bias.detach().to(compute)
        dt = F.softplus(x) if delta_softplus else x
        B0, C0 = B[..., 0].detach().to(compute), C[..., 0].detach().to(compute)  # (B, N)
        bc = (B0 * C0).sum(-1, keepdim=True)  # (B, 1)
        scale = dt * bc if D is None else dt * bc + D.detach().to(compute)  # (B, D)
        y = u0 * scale
        z0 = sig = None
        out = y
        if z is not None:
            z0 = z[..., 0].detach().to(compute)
            sig = torch.sigmoid(z0)
            out = y * (z0 * sig)  # SiLU gate
        ctx.save_for_backward(u0, x, dt, B0, C0, bc, scale, y, z0, sig)
        ctx.softplus = bool(delta_softplus)
        ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias)]
        ctx.A_shape = A.shape
        return out[..., None].to(u.dtype)  # (B, D, 1)

    @staticmethod
    def backward(ctx, dout):
        u0, x, dt, B0, C0, bc, scale, y, z0, sig = ctx.saved_tensors
        g = dout[..., 0].to(u0.dtype)  # (B, D)
        dz = None
        if z0 is not None:
            dz = g * y * sig * (1 + z0 * (1 - sig))
            g = g * (z0 * sig)  # dL/dy before the gate
        du = g * scale
        dD = (g * u0).sum(0)
        gu = g * u0
        ddelta = gu * bc  # dL/d dt
        dbc = (gu * dt).sum(-1, keepdim=True)  # (B, 1)
        if ctx.softplus:  # torch's softplus slope: 1 above its threshold, sigmoid below
            ddelta = ddelta * torch.where(x > _SOFTPLUS_THRESHOLD, torch.ones_like(x), torch.sigmoid(x))
        grads = (
            du[..., None],
            ddelta[..., None],
            u0.new_zeros(ctx.A_shape),
            (dbc * C0)[..., None],  # (B, N, 1)
            (dbc * B0)[..., None],
            dD,
            None if dz is None else dz[..., None],
            ddelta.sum(0),
        )
        return (
            *(
                grad.to(dtype) if needed and dtype is not None else None
                for grad, dtype, needed in zip(grads, ctx.dtypes, ctx.needs_input_grad)
            ),
            None,
        )


def selective_scan_cpu(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Fused selective scan on CPU tensors; same contract as `selective_scan_ref`.

    Takes u, delta, z (B, D, L); A (D, N); B, C (B, N, L); D, delta_bias (D,), any strides and
    float dtypes. Returns (B, D, L) in u's dtype, differentiable in every tensor argument.

    Raises:
        ValueError: a tensor is not on the CPU, or the shapes do not fit together (the kernels
            index without bounds checks, so they are checked here).
    """
    if u.dim() != 3 or A.dim() != 2:
        raise ValueError(f"selective_scan_cpu: u must be (B, D, L) and A (D, N); got "
                         f"{tuple(u.shape)} and {tuple(A.shape)}")  # fmt: skip
    batch, d_inner, length = u.shape
    n_state = A.shape[1]
    expected = {
        "u": (batch, d_inner, length), "delta": (batch, d_inner, length), "A": (d_inner, n_state),
        "B": (batch, n_state, length), "C": (batch, n_state, length), "D": (d_inner,),
        "z": (batch, d_inner, length), "delta_bias": (d_inner,),
    }  # fmt: skip
    given = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z,
             "delta_bias": delta_bias}  # fmt: skip
    for name, t in given.items():
        if t is None:
            continue
        if t.device.type != "cpu":
            raise ValueError(f"selective_scan_cpu needs CPU tensors; {name} is on {t.device}")
        if tuple(t.shape) != expected[name]:
            raise ValueError(
                f"selective_scan_cpu: {name} has shape {tuple(t.shape)}, expected "
                f"{expected[name]} from u {tuple(u.shape)} and A {tuple(A.shape)}"
            )
    if n_state == 0:  # no state, y = D * u; the kernels assume N >= 1
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if length == 1 and batch * d_inner > 0:
        return _OneStepScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return _SelectiveScanCPU.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
