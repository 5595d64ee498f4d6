"""Fused selective scan for CPU: Numba kernels behind a `torch.autograd.Function`.

Same signature, shapes and math as `selective_scan_ref` (see `echomamba_dist.ops.selective_scan`).
The reference materialises several (B, D, N) tensors per step and autograd keeps them all, so its
memory grows as B*D*L*N. Here each (batch, channel) pair runs its whole recurrence with the
N-vector state in a small local array; the forward saves only its inputs, and the backward
recomputes the states of one (b, d) pair at a time into an (L+1, N) scratch before running the
adjoint recurrence backwards in time. Peak memory is therefore the inputs, the output and the
gradients, O(B*D*L + B*L*N).

Compute is fp32 for fp32/bf16/fp16 inputs (as the reference) and fp64 for fp64 inputs, so that
`torch.autograd.gradcheck` can check the backward exactly; Numba compiles one specialisation per
dtype on first use and caches it on disk when the package directory is writable.
"""

from __future__ import annotations

import math
import warnings

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import prange, types
from numba.extending import overload

# Work items per thread: enough to balance uneven chunks, few enough that the per-item scratch
# and the per-item gradient partials stay negligible.
_ITEMS_PER_THREAD = 4
# torch.nn.functional.softplus's default threshold: above it softplus(x) is x and its slope 1.
_SOFTPLUS_THRESHOLD = 20.0
# The only fast-math licence the kernels take: fusing a * b + c into one FMA (one rounding instead
# of two, so never less accurate). No reassociation outside `_dot`, no finite-math assumptions:
# inf and nan propagate as in the reference.
_CONTRACT = {"contract"}


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


@_jit(fastmath={"reassoc", "contract"})
def _dot(a, b, n):
    """sum(a[:n] * b[:n]); reassociation lets LLVM vectorise the sum (the order is free anyway:
    the reference's einsum sums in its own order)."""
    acc = a[0] * b[0]  # n >= 1; starting from a typed 0 would need an allocation here
    for i in range(1, n):
        acc += a[i] * b[i]
    return acc


# --- kernels -------------------------------------------------------------------------------------
# The kernels do only the O(B*D*L*N) part: the recurrence over the state. What is elementwise in
# (B, D, L) (bias, softplus, skip, gate and their gradients) is left to torch, whose vectorised
# softplus and sigmoid cost far less than one scalar libm call per step inside the kernels.
#
# Each parallel kernel is a thin prange over work items calling a serial function for one item:
# compiled inside a parfor, the backward's loop nest ran 2.5x slower than the same code compiled
# as a plain function. The serial functions take their scratch arrays as arguments: the data
# pointer of an array allocated inside the function is reloaded after every store (LLVM cannot
# tell that a float store does not overwrite it), which kept the loops over N from vectorising.


@_jit(fastmath=_CONTRACT)
def _scan_fwd_pairs(u, dt, A, Bt, Ct, start, stop, y, h):
    """y[b, d, t] = <h_t, C_t> for the flattened (b, d) pairs start..stop-1; h: (N,) scratch."""
    d_inner, length = u.shape[1], u.shape[2]
    n_state = A.shape[1]
    for bd in range(start, stop):
        b = bd // d_inner
        d = bd - b * d_inner
        A_d = A[d]
        h[:] = 0
        for t in range(length):
            dt_t = dt[b, d, t]
            dtu = dt_t * u[b, d, t]
            B_t = Bt[b, t]
            for n in range(n_state):
                h[n] = _exp(dt_t * A_d[n]) * h[n] + dtu * B_t[n]
            y[b, d, t] = _dot(h, Ct[b, t], n_state)


@_jit(parallel=True)
def _scan_fwd_kernel(u, dt, A, Bt, Ct, n_items, y):
    """The scan of every (b, d) pair into y, the pairs split into `n_items` parallel ranges.

    dt is the step size after bias and softplus; Bt, Ct are B, C transposed to (B, L, N), so
    that the N-vector of step t is contiguous.
    """
    total = u.shape[0] * u.shape[1]
    for item in prange(n_items):
        start, stop = item * total // n_items, (item + 1) * total // n_items
        _scan_fwd_pairs(u, dt, A, Bt, Ct, start, stop, y, np.empty(A.shape[1], dtype=A.dtype))


@_jit(fastmath=_CONTRACT)
def _scan_bwd_block(
    u, dt, A, Bt, Ct, gy, b0, b1, d0, d1, du, ddt, y, dA_acc, dBt_acc, dCt_acc,
    hs, decays, h, lam, lam_next, lam_h_a,
):  # fmt: skip
    """Gradients from the pairs b0 <= b < b1, d0 <= d < d1, recomputing their forward states.

    gy is dL/dy for y = <h_t, C_t>. du (the scan's share), ddt (dL/d dt) and y are written for
    these pairs; dA_acc (D, N), dBt_acc and dCt_acc (B, L, N) are added to. Scratch:
    hs (L+1, N), hs[t + 1] the state after step t and hs[0] = 0; decays (L, N), exp(dt_t * A[d]);
    h (N,), the running state; lam (N,), dL/dh_t; lam_next (N,), dL/dh_{t+1} * decay_{t+1}, h_t's share of it;
    lam_h_a (N,), dL/dh_t * h_{t-1} * decay_t.
    """
    length = u.shape[2]
    n_state = A.shape[1]
    hs[0] = 0
    for b in range(b0, b1):
        for d in range(d0, d1):
            A_d = A[d]
            dA_d = dA_acc[d]
            # Recompute the forward pass of this pair.
            h[:] = 0
            for t in range(length):
                dt_t = dt[b, d, t]
                dtu = dt_t * u[b, d, t]
                B_t = Bt[b, t]
                h_t = hs[t + 1]
                decay_t = decays[t]
                # The recurrence runs in h, copied to hs: reading hs[t] while writing hs[t + 1]
                # (an unknown N apart) kept LLVM from vectorising this loop (~6x slower).
                for n in range(n_state):
                    a = _exp(dt_t * A_d[n])
                    decay_t[n] = a
                    h_n = a * h[n] + dtu * B_t[n]
                    h[n] = h_n
                    h_t[n] = h_n
                y[b, d, t] = _dot(h, Ct[b, t], n_state)
            # Adjoint recurrence, backwards in time.
            lam_next[:] = 0
            for t in range(length - 1, -1, -1):
                g = gy[b, d, t]
                ut = u[b, d, t]
                dt_t = dt[b, d, t]
                dtu = dt_t * ut
                B_t = Bt[b, t]
                C_t = Ct[b, t]
                h_prev = hs[t]
                h_t = hs[t + 1]
                decay_t = decays[t]
                dB_t = dBt_acc[b, t]
                dC_t = dCt_acc[b, t]
                # Three loops rather than one: with every array in one loop, LLVM needs more
                # runtime alias checks than it allows and leaves the loop scalar (~3x slower).
                for n in range(n_state):
                    lam[n] = lam_next[n] + g * C_t[n]
                    dC_t[n] += g * h_t[n]
                for n in range(n_state):
                    lha = lam[n] * h_prev[n] * decay_t[n]
                    lam_h_a[n] = lha
                    dA_d[n] += lha * dt_t
                for n in range(n_state):
                    dB_t[n] += lam[n] * dtu
                    lam_next[n] = lam[n] * decay_t[n]
                # h_t = decay * h_{t-1} + dt * u * B  =>  dL/d dt = sum_n lam_n (h_{t-1} A decay
                # + u B), dL/du = dt * sum_n lam_n B.
                lam_b = _dot(lam, B_t, n_state)
                ddt[b, d, t] = _dot(lam_h_a, A_d, n_state) + lam_b * ut
                du[b, d, t] = lam_b * dt_t


@_jit(parallel=True)
def _scan_bwd_kernel(
    u, dt, A, Bt, Ct, gy, n_bchunks, n_dchunks, du, ddt, y, dA_part, dBt_part, dCt_part
):  # fmt: skip
    """Gradients of the scan; work item (bc, dc) is batch chunk bc x channel chunk dc.

    dB and dC (summed over channels) go to partials indexed by dc, dA (summed over the batch) to
    partials indexed by bc: two items that write the same partial element would need the same
    (b, dc) or the same (bc, d), i.e. be the same item, so there are no write races. The caller
    sums the partials.
    """
    batch, d_inner, length = u.shape
    n_state = A.shape[1]
    for item in prange(n_bchunks * n_dchunks):
        bc = item // n_dchunks
        dc = item - bc * n_dchunks
        _scan_bwd_block(
            u, dt, A, Bt, Ct, gy,
            bc * batch // n_bchunks, (bc + 1) * batch // n_bchunks,
            dc * d_inner // n_dchunks, (dc + 1) * d_inner // n_dchunks,
            du, ddt, y, dA_part[bc], dBt_part[dc], dCt_part[dc],
            np.empty((length + 1, n_state), dtype=A.dtype),
            np.empty((length, n_state), dtype=A.dtype),
            np.empty(n_state, dtype=A.dtype),
            np.empty(n_state, dtype=A.dtype),
            np.empty(n_state, dtype=A.dtype),
            np.empty(n_state, dtype=A.dtype),
        )  # fmt: skip


# --- autograd ------------------------------------------------------------------------------------


def _use_torch_threads() -> int:
    """Run the kernels on as many threads as torch uses (capped by Numba's pool); returns it."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _step_sizes(delta, delta_bias, softplus):
    """(dt, d dt / d delta): the step sizes the scan uses and their slope (None when it is 1)."""
    x = delta if delta_bias is None else delta + delta_bias[None, :, None]
    if not softplus:
        return x.contiguous(), None
    slope = torch.where(x > _SOFTPLUS_THRESHOLD, 1.0, torch.sigmoid(x))  # as softplus's backward
    return F.softplus(x).contiguous(), slope


class _SelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        compute = torch.float64 if u.dtype == torch.float64 else torch.float32

        def prep(t):
            return None if t is None else t.detach().to(compute).contiguous()

        u_c, delta_c, A_c, D_c, z_c, bias_c = map(prep, (u, delta, A, D, z, delta_bias))
        Bt = prep(B.transpose(1, 2))  # (B, L, N); free when B is already laid out this way
        Ct = prep(C.transpose(1, 2))
        dt, _ = _step_sizes(delta_c, bias_c, delta_softplus)

        y = torch.empty_like(u_c)
        threads = _use_torch_threads()
        n_items = max(1, min(u.shape[0] * u.shape[1], threads * _ITEMS_PER_THREAD))
        _scan_fwd_kernel(_np(u_c), _np(dt), _np(A_c), _np(Bt), _np(Ct), n_items, _np(y))
        if D_c is not None:
            y += u_c * D_c[:, None]
        if z_c is not None:
            y *= F.silu(z_c)

        ctx.save_for_backward(u_c, delta_c, A_c, Bt, Ct, D_c, z_c, bias_c)
        ctx.softplus = bool(delta_softplus)
        ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias)]
        return y.to(u.dtype)

    @staticmethod
    def backward(ctx, dout):
        u_c, delta_c, A_c, Bt, Ct, D_c, z_c, bias_c = ctx.saved_tensors
        batch, d_inner, length = u_c.shape
        n_state = A_c.shape[1]
        need = dict(zip(("u", "delta", "A", "B", "C", "D", "z", "bias"), ctx.needs_input_grad))
        dout = dout.to(u_c.dtype)
        dt, slope = _step_sizes(delta_c, bias_c, ctx.softplus)
        if z_c is not None:
            sig_z = torch.sigmoid(z_c)
            gy = (dout * z_c * sig_z).contiguous()  # dL/dy before the gate
        else:
            gy = dout.contiguous()

        threads = _use_torch_threads()
        items = threads * _ITEMS_PER_THREAD
        if batch >= items:
            n_bchunks, n_dchunks = items, 1
        else:  # few sequences: split the channels too, so that every thread has work
            n_bchunks, n_dchunks = max(batch, 1), min(d_inner, -(-items // max(batch, 1)))
        du = torch.empty_like(u_c)
        ddt = torch.empty_like(u_c)
        y = torch.empty_like(u_c)  # <h_t, C_t>, recomputed; the gate's gradient needs it
        dA_part = torch.zeros(n_bchunks, d_inner, n_state, dtype=u_c.dtype)
        dBt_part = torch.zeros(n_dchunks, batch, length, n_state, dtype=u_c.dtype)
        dCt_part = torch.zeros(n_dchunks, batch, length, n_state, dtype=u_c.dtype)
        _scan_bwd_kernel(
            _np(u_c), _np(dt), _np(A_c), _np(Bt), _np(Ct), _np(gy), n_bchunks, n_dchunks,
            _np(du), _np(ddt), _np(y), _np(dA_part), _np(dBt_part), _np(dCt_part),
        )  # fmt: skip

        grads = dict.fromkeys(need)
        grads["A"] = dA_part.sum(0)
        grads["B"] = dBt_part.sum(0).transpose(1, 2)  # back to (B, N, L)
        grads["C"] = dCt_part.sum(0).transpose(1, 2)
        ddelta = ddt if slope is None else ddt * slope
        grads["delta"] = ddelta
        if bias_c is not None:
            grads["bias"] = ddelta.sum((0, 2))
        if D_c is not None:
            du += gy * D_c[:, None]
            grads["D"] = (gy * u_c).sum((0, 2))
            if need["z"]:
                y += u_c * D_c[:, None]
        grads["u"] = du
        if z_c is not None and need["z"]:
            grads["z"] = dout * y * sig_z * (1 + z_c * (1 - sig_z))  # d silu(z) / dz
        return (
            *(
                None if not need[k] or grads[k] is None else grads[k].to(dtype)
                for k, dtype in zip(need, ctx.dtypes)
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
        ValueError: a tensor is not on the CPU.
    """
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in named.items():
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"selective_scan_cpu needs CPU tensors; {name} is on {t.device}")
    return _SelectiveScanCPU.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
