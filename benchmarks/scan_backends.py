"""Selective-scan backends, forward + backward: time and peak memory at one shape.

    python benchmarks/scan_backends.py                 # B=1024, L=50, D_inner=128, N=32
    python benchmarks/scan_backends.py --reps 5 --no-block --out /tmp/scan.json
    python benchmarks/scan_backends.py --threads 1 --out docs/results/scan_backends_1thread.json

Each backend runs in a fresh subprocess, so one backend's allocations and compiled code do not
colour another's figures. In that subprocess: build the inputs (leaf tensors that require grad,
as in the Mamba block), warm up once at a tiny shape (loads or compiles the Numba kernels), then

* peak memory: reset the kernel's peak-RSS mark (`/proc/self/clear_refs`, "5"), run one forward
  + backward at full size and report VmHWM - VmRSS before it: the process's resident memory
  added by the op at its peak, output and input gradients included. (`ru_maxrss` minus the RSS
  before the op where clear_refs is unavailable; `torch.cuda.max_memory_allocated` for cuda.)
* time: `--reps` forward + backward runs after that first one; the median is reported, with the
  process CPU time, which shows when other work shared the machine (CPU time / wall < cores).

Writes the table to stdout and everything to --out (JSON, replaced atomically), with hardware,
software versions, load average, the command and the date.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO,
    PeakMemory,
    command_line,
    cpu_model,
    load_average,
    memory_gib,
    run_worker,
    scan_inputs,
    serve_worker,
    utc_now,
)

from echomamba_dist.io import write_json_atomic  # noqa: E402

DEFAULT_OUT = REPO / "docs" / "results" / "scan_backends.json"


# --- measurement (runs inside a worker subprocess) ----------------------------------------------


def _leaves(batch, length, d_inner, d_state, device):
    """`scan_inputs` (D = 1, unscaled) as leaf tensors that require grad, as in the Mamba block."""
    return {k: v.requires_grad_() for k, v in scan_inputs(batch, d_inner, length, d_state, device).items()}


def _measure(step, reps, cuda):
    """Peak memory of one step, then the median time of `reps` more; step() returns fwd seconds."""
    import torch

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with PeakMemory(cuda) as peak:
        step()
    fwd, total, cpu = [], [], []
    for _ in range(reps):
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        fwd.append(step())
        sync()
        total.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "fwd_bwd_s": statistics.median(total),
        "fwd_s": statistics.median(fwd),
        "bwd_s": statistics.median(t - f for t, f in zip(total, fwd)),
        "fwd_bwd_all_s": total,
        "cpu_time_s": statistics.median(cpu),
        "peak_mib": peak.mib,
        "memory_method": peak.method,
    }


def _worker_scan(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # the cpu kernels follow torch's thread count

    from echomamba_dist.ops.selective_scan import selective_scan

    cuda = args.backend == "cuda"
    device = "cuda" if cuda else "cpu"
    order = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def run(x):
        t0 = time.perf_counter()
        y = selective_scan(*(x[k] for k in order), delta_softplus=True, backend=args.backend)
        if cuda:
            torch.cuda.synchronize()
        fwd = time.perf_counter() - t0
        y.backward(torch.ones_like(y))
        return fwd

    run(_leaves(2, 5, 3, 4, device))  # warm-up: Numba cache load / compile, CUDA context
    x = _leaves(args.batch, args.length, args.d_inner, args.d_state, device)
    return _measure(lambda: run(x), args.reps, cuda)


def _worker_block(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from echomamba_dist.models.mamba import Mamba

    cuda = args.backend == "cuda"
    device = "cuda" if cuda else "cpu"
    d_model = args.d_inner // 2  # expand=2
    torch.manual_seed(0)
    block = Mamba(d_model, d_state=args.d_state, scan_backend=args.backend).to(device)

    def run(h):
        t0 = time.perf_counter()
        y = block(h)
        if cuda:
            torch.cuda.synchronize()
        fwd = time.perf_counter() - t0
        y.sum().backward()
        return fwd

    run(torch.randn(2, 5, d_model, device=device))
    h = torch.randn(args.batch, args.length, d_model, device=device)
    return _measure(lambda: run(h), args.reps, cuda)


# --- driver -------------------------------------------------------------------------------------


def _cuda_backend_available() -> tuple[bool, str]:
    code = (
        "import torch; from echomamba_dist.ops.selective_scan import cuda_available; "
        "print(torch.cuda.get_device_name() if cuda_available() else '')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    name = out.stdout.strip()
    return bool(name), name


def _spawn(kind: str, backend: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--backend", backend,
           "--reps", str(args.reps), "--batch", str(args.batch), "--length", str(args.length),
           "--d-inner", str(args.d_inner), "--d-state", str(args.d_state),
           "--threads", str(args.threads or 0)]  # fmt: skip
    load_before = load_average()
    result = run_worker(cmd)
    result["load_average_1m_before"] = load_before[0]
    return result


def _ratio(a: float, b: float, empty: float | None = math.nan) -> float | None:
    """a / b, or `empty` when b is 0 (a peak too small for the RSS mark to see)."""
    return a / b if b else empty


# Peaks below this are page-granular noise of the RSS mark (one page is 0.004 MiB, and the
# allocator may reuse pages freed just before): a ratio of two such peaks means nothing.
_MIN_PEAK_MIB = 1.0


def _peak_ratio(peak: float, reference: float) -> float | None:
    """peak / reference, or None when either is below _MIN_PEAK_MIB (nothing to compare)."""
    return peak / reference if min(peak, reference) >= _MIN_PEAK_MIB else None


def _table(title: str, results: dict) -> str:
    ref = results.get("reference")
    rows = [title, f"{'backend':<10} {'fwd s':>8} {'bwd s':>8} {'fwd+bwd s':>10} {'cpu s':>8} "
                   f"{'peak MiB':>9} {'speedup':>8} {'mem ratio':>9}"]  # fmt: skip
    for name, r in results.items():
        if r is None:
            rows.append(f"{name:<10} not available")
            continue
        speed = ref["fwd_bwd_s"] / r["fwd_bwd_s"] if ref else math.nan
        mem = _ratio(r["peak_mib"], ref["peak_mib"]) if ref and name != "cuda" else math.nan
        rows.append(
            f"{name:<10} {r['fwd_s']:8.3f} {r['bwd_s']:8.3f} {r['fwd_bwd_s']:10.3f} "
            f"{r['cpu_time_s']:8.2f} {r['peak_mib']:9.1f} {speed:8.2f} {mem:9.3f}"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--length", type=int, default=50)
    p.add_argument("--d-inner", type=int, default=128)
    p.add_argument("--d-state", type=int, default=32)
    p.add_argument("--reps", type=int, default=3, help="timed runs after the memory run")
    p.add_argument("--threads", type=int, default=0, help="torch (and kernel) threads; 0: default")
    p.add_argument("--no-block", action="store_true", help="skip the whole-Mamba-block timing")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", choices=("scan", "block"), help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if serve_worker(args, _worker_scan if args.worker == "scan" else _worker_block):
        return 0

    import numba
    import numpy
    import torch

    cuda_ok, gpu = _cuda_backend_available()
    backends = ["reference", "cpu"] + (["cuda"] if cuda_ok else [])
    shape = {"batch": args.batch, "length": args.length, "d_inner": args.d_inner,
             "d_state": args.d_state}  # fmt: skip
    threads = args.threads or torch.get_num_threads()
    print(f"selective scan fwd+bwd at B={args.batch} L={args.length} D_inner={args.d_inner} "
          f"N={args.d_state}, {threads} threads; median of {args.reps} after one memory run; "
          "each backend in a fresh subprocess")  # fmt: skip
    scan = {b: _spawn("scan", b, args) for b in backends}
    if not cuda_ok:
        scan["cuda"] = None
    print(_table("scan", scan))
    if not cuda_ok:
        print("cuda: not available (needs a CUDA GPU and mamba-ssm)")

    block = None
    if not args.no_block:
        try:
            import echomamba_dist.models.mamba  # noqa: F401
        except ImportError:
            print("block: echomamba_dist.models.mamba not available, skipped")
        else:
            block = {b: _spawn("block", b, args) for b in backends}
            print(_table(f"Mamba block (d_model={args.d_inner // 2}, expand=2), "
                         "fwd+bwd of block(x).sum()", block))  # fmt: skip

    ratios = {}
    if scan["reference"] and scan["cpu"]:
        ratios = {
            "cpu_speedup_vs_reference": scan["reference"]["fwd_bwd_s"] / scan["cpu"]["fwd_bwd_s"],
            # None when either peak is below what the RSS mark resolves (tiny shapes: nothing to
            # compare); a 0 there is noise, not a ratio of 0
            "cpu_peak_memory_vs_reference": _peak_ratio(scan["cpu"]["peak_mib"], scan["reference"]["peak_mib"]),
        }
        mem = ratios["cpu_peak_memory_vs_reference"]
        print(f"cpu vs reference: {ratios['cpu_speedup_vs_reference']:.2f}x faster, "
              + (f"{mem:.4f}x the peak memory" if mem is not None else "peak memory too small to compare"))

    payload = {
        "benchmark": "selective scan, forward + backward",
        "command": command_line(__file__, sys.argv[1:]),
        "date": utc_now(),
        "hardware": {
            "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "memory_gib": memory_gib(), "gpu": gpu or None,
        },  # fmt: skip
        "software": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads or torch.get_num_threads(),
            "numba": numba.__version__,
            "numpy": numpy.__version__,
        },
        "shape": shape,
        "inputs": "u, delta, B, C, z ~ N(0, 1); A = -(1..N) per channel; D = 1; "
        "delta_bias = softplus^-1(U(0.001, 0.1)); delta_softplus=True; all require grad; "
        "upstream gradient ones",
        "method": __doc__.split("\n\n", 2)[2].strip(),
        "load_average_at_end": load_average(),  # 1, 5, 15 min
        "scan": scan,
        "ratios": ratios,
        "mamba_block": block,
    }
    write_json_atomic(args.out, payload, sort_keys=False)
    print(f"wrote {os.path.relpath(args.out, REPO) if args.out.is_absolute() else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
