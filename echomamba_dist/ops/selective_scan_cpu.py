"""Fused selective scan for CPU: Numba kernels behind a `torch.autograd.Function`.

Same signature, shapes and math as `selective_scan_ref` (see `echomamba_dist.ops.selective_scan`).
The reference materialises several (B, D, N) tensors per step and autograd keeps them all, so its
memory grows as B*D*L*N. Here each sequence runs its whole recurrence for a tile of up to 128
channels at once, the (N, tile) state in a small array, with the channels innermost so that the
loops vectorise over them; the forward keeps only its inputs and the step sizes dt (B, D, L), and
the backward recomputes the states of one (sequence, tile) at a time into an (L+1, N, tile)
scratch before running the adjoint recurrence backwards in time. Per-step tensors live as
(B, L, D) memory (channel-last, as the Mamba block produces them). Peak memory is the inputs, the
output, dt and the gradients: O(B*D*L + B*L*N), never B*D*L*N.

Work is split over ranges of sequences (and of channels when there are few) and run on as many
threads as `torch.get_num_threads()`.
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

from echomamba_dist.ops.reference import selective_scan_ref

# Work items per thread: enough to balance uneven chunks, few enough that the per-item scratch
# and the per-item gradient partials stay negligible.
_ITEMS_PER_THREAD = 4
# Channels per tile, the kernels' innermost loop. Long tiles amortise each inner loop's start
# (LLVM's runtime alias checks, the remainder): at B=2048, D=128, N=32, float32, 1 thread, tiles
# of 128 ran the backward 18-28% faster than a loop over N per (b, d) pair at L=5..50 (the
# forward about even), although at L=50 its scratch, 2 * (L+1) * N * tile values (1.6 MiB),
# outgrows L2; tiles of 16 or 32 were slower than the pairs.
_D_TILE = 128
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
# Everything is fused per (sequence, channel tile) except the elementwise functions of whole
# (B, D, L) tensors (softplus, SiLU(z), sigmoid(z), softplus's slope), which torch vectorises:
# the forward's skip and gate and the backward's gate run inside the kernels' loops over t, so a
# backward is one kernel launch plus a few small sums, not two dozen elementwise torch passes.
#
# Parallelism: each kernel is a serial, GIL-free function over one work item (a range of
# sequences and of channels), and `_run_items` spreads the items over a thread pool sized like
# torch's. Numba's own `parallel=True` was slower on both counts we measured: compiled inside a
# parfor the backward's loop nest ran 2.5x slower than as a plain function, and Numba's OpenMP
# layer (a second OpenMP runtime next to torch's) left its threads spinning, so small calls took
# ~5x longer.
# The kernels take their scratch arrays as arguments: the data pointer of an array allocated
# inside the function is reloaded after every store (LLVM cannot tell that a float store does not
# overwrite it), which kept the inner loops from vectorising.


# The per-step tensors (u, dt, the gate, dout and the (B, D, L) results) come channel-last:
# (B, L, D) C-contiguous arrays, indexed [b, t, d]. The Mamba block's channel-last path hands
# them over without a copy, and one layout means one compiled specialisation per dtype (strided
# views would compile one per combination of layouts, seconds each).
@_jit(fastmath=_KERNEL_FASTMATH, nogil=True, error_model="numpy")
def _scan_fwd_block(u, dt, AT, Bt, Ct, Dv, gate, has_D, has_z, b0, b1, d0, d1, out, h, y, dtu):
    """out[b, :, d] for b0 <= b < b1, d0 <= d < d1; AT: A transposed, (N, D); gate: SiLU(z).

    Channels run in tiles of W = h.shape[1], innermost (see `_scan_bwd_block`). Scratch: h (N, W)
    the running states, y (W,) and dtu (W,) per-step values of the tile's channels.
    """
    length = u.shape[1]
    n_state = AT.shape[0]
    tile = h.shape[1]
    one = np.ones(1, dtype=AT.dtype)[0]  # a bare 1 or 0 would promote fp32 arithmetic to fp64
    zero = one - one
    for b in range(b0, b1):
        for t0 in range(d0, d1, tile):
            w = min(tile, d1 - t0)
            h[:, :w] = 0
            for t in range(length):
                dt_r = dt[b, t, t0:t0 + w]
                u_r = u[b, t, t0:t0 + w]
                for j in range(w):
                    dtu[j] = dt_r[j] * u_r[j]
                    y[j] = zero
                for n in range(n_state):
                    B_n = Bt[b, t, n]
                    C_n = Ct[b, t, n]
                    A_n = AT[n, t0:t0 + w]
                    h_n = h[n]
                    for j in range(w):
                        x = _exp(dt_r[j] * A_n[j]) * h_n[j] + dtu[j] * B_n
                        h_n[j] = x
                        y[j] += x * C_n
                for j in range(w):
                    d = t0 + j
                    y_t = y[j]
                    if has_D:
                        y_t += Dv[d] * u_r[j]
                    if has_z:
                        y_t *= gate[b, t, d]
                    out[b, t, d] = y_t


@_jit(fastmath=_KERNEL_FASTMATH, nogil=True, error_model="numpy")
def _scan_bwd_block(
    u, dt, AT, Bt, Ct, Dv, gate, dgate, slope, dout, has_z, softplus, b0, b1, d0, d1,
    du, ddelta, dz, dAT_acc, dBt_acc, dCt_acc, dD_acc, dbias_acc,
    hs, decays, h, lam, ys, g_v, dt_v, u_v, dtu_v, acc_ha, acc_lb, dD_v, dbias_v,
):  # fmt: skip
    """Gradients from the pairs b0 <= b < b1, d0 <= d < d1, recomputing their forward states.

    Computed by torch, vectorised: gate = SiLU(z) and dgate = SiLU'(z); slope, softplus's slope
    at delta + bias (torch's: 1 above its threshold). AT is A transposed, (N, D). Dv is zeros
    when the scan had none. du, ddelta and dz are written for these pairs; dAT_acc (N, D),
    dBt_acc and dCt_acc (B, L, N), dD_acc and dbias_acc (D,) are added to.

    The channels run in tiles of W = hs.shape[2] side by side, innermost: every loop over the
    state lanes n does the same work for W channels at once, contiguous in the channel-last
    tensors, so LLVM vectorises over channels with no horizontal sums per step (only the sums
    over channels into dB and dC, one per (t, n)). Scratch, per tile: hs (L+1, N, W): hs[t + 1]
    the state after step t, hs[0] = 0; decays (L, N, W): exp(dt_t * A); h (N, W) the running
    state; lam (N, W): dL/dh_{t+1} * decay_{t+1}, the share of dL/dh_t that comes from later
    steps; ys (L, W): <h_t, C_t>; g_v .. acc_lb (W,): per-step values of the tile's channels
    (separate arrays: slices of one array would alias as far as LLVM can tell); dD_v and dbias_v
    (W,): the sequence's sums over t, added to dD_acc and dbias_acc at its end (two levels of
    sums, not B*L terms into one float32 accumulator).

    Steps after a row's last nonzero dout (over the tile's channels) get no gradient from
    anywhere (the adjoint is zero there), so each tile runs only up to it: a model that reads
    one position per row pays for the steps up to that position, not for the padding after it.
    """
    full_length = u.shape[1]
    n_state = AT.shape[0]
    tile = hs.shape[2]
    one = np.ones(1, dtype=AT.dtype)[0]  # a bare 1 or 0 would promote fp32 arithmetic to fp64
    zero = one - one
    hs[0] = 0
    for b in range(b0, b1):
        for t0 in range(d0, d1, tile):
            w = min(tile, d1 - t0)
            length = full_length
            while length > 0:
                nonzero = False
                for j in range(w):
                    if dout[b, length - 1, t0 + j] != 0:
                        nonzero = True
                if nonzero:
                    break
                length -= 1
            for t in range(length, full_length):
                for j in range(w):
                    du[b, t, t0 + j] = zero
                    ddelta[b, t, t0 + j] = zero
                    if has_z:
                        dz[b, t, t0 + j] = zero
            # Recompute the forward pass of this tile.
            h[:, :w] = 0
            for t in range(length):
                dt_r = dt[b, t, t0:t0 + w]
                u_r = u[b, t, t0:t0 + w]
                for j in range(w):
                    dtu_v[j] = dt_r[j] * u_r[j]
                    ys[t, j] = zero
                y_t = ys[t]
                for n in range(n_state):
                    B_n = Bt[b, t, n]
                    C_n = Ct[b, t, n]
                    A_n = AT[n, t0:t0 + w]
                    h_n = h[n]
                    hs_n = hs[t + 1, n]
                    dec_n = decays[t, n]
                    for j in range(w):
                        a = _exp(dt_r[j] * A_n[j])
                        dec_n[j] = a
                        x = a * h_n[j] + dtu_v[j] * B_n
                        h_n[j] = x
                        hs_n[j] = x
                        y_t[j] += x * C_n
            # Adjoint recurrence, backwards in time.
            lam[:, :w] = 0
            dD_v[:w] = 0
            dbias_v[:w] = 0
            for t in range(length - 1, -1, -1):
                for j in range(w):
                    d = t0 + j
                    g = dout[b, t, d]
                    ut = u[b, t, d]
                    if has_z:
                        dz[b, t, d] = g * (ys[t, j] + Dv[d] * ut) * dgate[b, t, d]
                        g *= gate[b, t, d]  # dL/dy before the gate
                    g_v[j] = g
                    dt_v[j] = dt[b, t, d]
                    u_v[j] = ut
                    dtu_v[j] = dt_v[j] * ut
                    acc_ha[j] = zero
                    acc_lb[j] = zero
                # h_t = decay * h_{t-1} + dt * u * B  =>  dL/d dt = sum_n lam_n (h_{t-1} A decay
                # + u B), dL/du = dt * sum_n lam_n B (+ D from the skip connection).
                for n in range(n_state):
                    B_n = Bt[b, t, n]
                    C_n = Ct[b, t, n]
                    A_n = AT[n, t0:t0 + w]
                    dA_n = dAT_acc[n, t0:t0 + w]
                    lam_r = lam[n]
                    h_prev = hs[t, n]
                    h_t = hs[t + 1, n]
                    dec_n = decays[t, n]
                    dC_s = zero
                    dB_s = zero
                    for j in range(w):
                        lam_j = lam_r[j] + g_v[j] * C_n  # dL/dh_t
                        dC_s += g_v[j] * h_t[j]
                        dB_s += lam_j * dtu_v[j]
                        lha = lam_j * h_prev[j] * dec_n[j]
                        dA_n[j] += lha * dt_v[j]
                        acc_ha[j] += lha * A_n[j]
                        acc_lb[j] += lam_j * B_n
                        lam_r[j] = lam_j * dec_n[j]
                    dCt_acc[b, t, n] += dC_s
                    dBt_acc[b, t, n] += dB_s
                for j in range(w):
                    d = t0 + j
                    ddt = acc_ha[j] + acc_lb[j] * u_v[j]
                    du[b, t, d] = acc_lb[j] * dt_v[j] + g_v[j] * Dv[d]
                    dD_v[j] += g_v[j] * u_v[j]
                    if softplus:
                        ddt *= slope[b, t, d]
                    ddelta[b, t, d] = ddt
                    dbias_v[j] += ddt
            for j in range(w):
                dD_acc[t0 + j] += dD_v[j]
                dbias_acc[t0 + j] += dbias_v[j]


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


def _chunks(batch: int, d_inner: int, threads: int) -> tuple[int, int]:
    """How many slices of the batch and of the channels the kernels' work items take."""
    items = threads * _ITEMS_PER_THREAD
    if threads == 1:
        return 1, 1
    if batch >= items:
        return items, 1
    # Few sequences: split the channels too, so that every thread has work.
    return max(batch, 1), max(1, min(d_inner, -(-items // max(batch, 1))))


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
        n_bchunks, n_dchunks = _chunks(batch, d_inner, threads)
        gate = u_c if z_c is None else F.silu(z_c)
        arrays = (
            _np(u_c), _np(dt), _np(A_c.t().contiguous()), _np(Bt), _np(Ct), _np(D_c),
            _np(gate), D is not None, z is not None,
        )  # fmt: skip
        n_state = A.shape[1]
        dtype = arrays[0].dtype
        tile = max(1, min(_D_TILE, d_inner))
        items = [
            (*arrays,
             bc * batch // n_bchunks, (bc + 1) * batch // n_bchunks,
             dc * d_inner // n_dchunks, (dc + 1) * d_inner // n_dchunks, _np(out),
             np.empty((n_state, tile), dtype), np.empty(tile, dtype), np.empty(tile, dtype))
            for bc in range(n_bchunks) for dc in range(n_dchunks)
        ]  # fmt: skip
        _run_items(_scan_fwd_block, items, threads)

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
        n_bchunks, n_dchunks = _chunks(batch, d_inner, threads)
        du = torch.empty_like(u_c)
        ddelta = torch.empty_like(u_c)
        dz = torch.empty_like(u_c) if z_c is not None else torch.empty(1, 1, 1, dtype=u_c.dtype)

        def partial(*shape):
            return torch.zeros(*shape, dtype=u_c.dtype)

        dA_part = partial(n_bchunks, n_state, d_inner)  # transposed, as A is handed over
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
            _np(u_c), _np(dt), _np(A_c.t().contiguous()), _np(Bt), _np(Ct), _np(D_c),
            _np(gate), _np(dgate), _np(slope), _np(dout), z_c is not None, ctx.softplus,
        )  # fmt: skip
        outputs = (_np(du), _np(ddelta), _np(dz))
        parts = [_np(p) for p in (dA_part, dBt_part, dCt_part, dD_part, dbias_part)]
        dtype = inputs[0].dtype

        def item(bc, dc):
            dA, dBt, dCt, dD, dbias = parts
            tile = max(1, min(_D_TILE, d_inner))
            scratch = (
                np.zeros((length + 1, n_state, tile), dtype),  # hs
                np.empty((length, n_state, tile), dtype),  # decays
                np.empty((n_state, tile), dtype),  # h
                np.empty((n_state, tile), dtype),  # lam
                np.empty((length, tile), dtype),  # ys
                *(np.empty(tile, dtype) for _ in range(8)),  # g_v, dt_v, ..., dD_v, dbias_v
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
            total(dA_part).t(),
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
