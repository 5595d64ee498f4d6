"""GPU check, Ray-free, in one command and under 8 minutes on one H100: the CUDA kernels, their
agreement with the reference, and the epoch and inference times on Amazon-Beauty.

    scripts/gpu_check.sh                                    # kernels already installed
    scripts/gpu_check.sh --sdist-dir .sdist --wheels .wheels   # build mamba-ssm first if missing
    scripts/gpu_check.sh --cpu-smoke                        # CI: every step, tiny, on the CPU

Steps (each recorded in the JSON, with the reason where one is skipped):

1. kernels: import mamba-ssm's selective scan; when it does not import and `--sdist-dir` holds
   the mamba-ssm source package, build it for this GPU's architecture with
   scripts/build_mamba_ssm.sh (a few minutes with 16 cores), then import again;
2. scan: the `cuda` backend against `reference` on the GPU at a few shapes, fp32, outputs and the
   gradients of all eight inputs. The CUDA backward accumulates some gradients with atomic adds
   (not bit-deterministic), so the check is a tolerance on the error relative to the largest
   reference value (output 1e-3, gradients 5e-3), and the run-to-run spread of two CUDA
   backwards is recorded beside it;
3. block: our `Mamba` block's state_dict loaded into `mamba_ssm.Mamba` with strict=True, and the
   two blocks' outputs on the same input compared (and our block on `reference` too);
4. timing: SASRec, Mamba4Rec and EchoMamba4Rec on Amazon-Beauty with the paper's settings
   (batch 2048, max length 50, hidden 64; length bucketing on), fp32 and bf16 autocast: a whole
   training epoch (every step timed, validation excluded, after one warm-up step), inference
   (`score_all`) for 4,096 test users (median of 5), and the peak GPU memory
   (`torch.cuda.max_memory_allocated` from before the model is built).

It imports torch, numpy, pyarrow and yaml and this package only (no Ray, no MLflow: the check
at the end records which modules were loaded), and stops starting new timings once `--budget`
seconds have passed. `--cpu-smoke` runs every step at a tiny size on the CPU: the scan check
compares the fused `cpu` kernel with `reference` instead of `cuda`, the build runs the build
script's `--dry-run` when `--sdist-dir` is given, and the CUDA-only parts say that they are
skipped. Writes `--out` (JSON, atomic).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO,
    SMOKE_SYNTHETIC,
    PeakMemory,
    build_run,
    experiment,
    inference_batch,
    load_average,
    report_header,
    scan_inputs,
    time_epoch,
    time_inference,
    warm_up,
)

from echomamba_dist.io import write_json_atomic  # noqa: E402

DEFAULT_DATA = REPO / "prepared" / "amazon-beauty"
DEFAULT_OUT = REPO / "docs" / "results" / "gpu_check.json"
MODELS = ["sasrec", "mamba4rec", "echomamba4rec"]
SCAN_SHAPES = [(2, 64, 50, 16), (256, 128, 50, 32), (64, 128, 400, 32)]  # (B, D_inner, L, N)
SMOKE_SCAN_SHAPES = [(2, 8, 12, 4)]
OUT_TOL, GRAD_TOL = 1e-3, 5e-3  # max |x - ref| / max |ref|
FORBIDDEN = ("ray", "mlflow")


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


# --- 1. kernels ----------------------------------------------------------------------------------


def find_or_build_kernels(args: argparse.Namespace, *, cuda: bool) -> dict[str, Any]:
    """Import mamba-ssm's scan; build it from `--sdist-dir` when it is missing."""
    from echomamba_dist.ops import selective_scan as ss

    if ss._cuda_scan_fn() is not None:
        import mamba_ssm

        return {"status": "found", "mamba_ssm": getattr(mamba_ssm, "__version__", "?"), "path": mamba_ssm.__file__}
    if not args.sdist_dir:
        reason = "mamba-ssm does not import and no --sdist-dir was given"
        return {"status": "missing", "reason": reason}
    script = REPO / "scripts" / "build_mamba_ssm.sh"
    cmd = ["bash", str(script), "--src", str(args.sdist_dir)]
    if args.wheels:
        cmd += ["--wheels", str(args.wheels)]
    if cuda:
        import torch

        major, minor = torch.cuda.get_device_capability()
        cmd += ["--arch", f"{major}{minor}"]
    else:
        cmd.append("--dry-run")  # no nvcc here: unpack and edit setup.py only
    log(("building: " if cuda else "cpu smoke, build script dry run: ") + " ".join(cmd))
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHON=sys.executable, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 1)))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.build_timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "build timed out", "seconds": args.build_timeout, "command": cmd}
    record = {"command": cmd, "seconds": time.perf_counter() - t0, "returncode": proc.returncode,
              "log_tail": (proc.stdout + proc.stderr)[-2000:]}  # fmt: skip
    if proc.returncode != 0:
        return {"status": "build failed", **record}
    if not cuda:
        return {"status": "dry run only (cpu smoke)", **record}
    importlib.invalidate_caches()
    ss._cuda_scan_fn.cache_clear()
    if ss._cuda_scan_fn() is None:
        return {"status": "built, but mamba-ssm does not import", **record}
    return {"status": "built", **record}


# --- 2. scan: cuda (or cpu in the smoke) against reference ----------------------------------------


def _run_scan(inputs, upstream, backend):
    import torch

    from echomamba_dist.ops.selective_scan import selective_scan

    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = selective_scan(**leaves, delta_softplus=True, backend=backend)
    out.backward(upstream)
    if out.is_cuda:
        torch.cuda.synchronize()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def _rel_err(x, ref) -> float:
    return float((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def check_scan(backend: str, device, shapes) -> dict[str, Any]:
    """`backend` against `reference` at `shapes`: relative errors of the output and gradients."""
    import torch

    results = []
    for shape in shapes:
        inputs = scan_inputs(*shape, device, delta_scale=0.5, a_scale=0.5, random_d=True)
        upstream = torch.randn(shape[0], shape[1], shape[2], generator=torch.Generator().manual_seed(1)).to(device)
        out_ref, grads_ref = _run_scan(inputs, upstream, "reference")
        out, grads = _run_scan(inputs, upstream, backend)
        _, grads_again = _run_scan(inputs, upstream, backend)
        row = {
            "shape": dict(zip(("batch", "d_inner", "length", "d_state"), shape)),
            "out_rel_err": _rel_err(out, out_ref),
            "grad_rel_err": {k: _rel_err(grads[k], grads_ref[k]) for k in grads_ref},
            "grad_run_to_run_rel": {k: _rel_err(grads_again[k], grads[k]) for k in grads},
        }
        row["ok"] = row["out_rel_err"] <= OUT_TOL and max(row["grad_rel_err"].values()) <= GRAD_TOL
        results.append(row)
        log(f"scan {backend} vs reference {shape}: out {row['out_rel_err']:.2e}, worst grad "
            f"{max(row['grad_rel_err'].values()):.2e} -> {'ok' if row['ok'] else 'MISMATCH'}")  # fmt: skip
    return {"backend": backend, "tolerance": {"out": OUT_TOL, "grad": GRAD_TOL}, "shapes": results,
            "ok": all(r["ok"] for r in results)}  # fmt: skip


# --- 3. our Mamba block in mamba_ssm.Mamba ------------------------------------------------------


def check_block(device) -> dict[str, Any]:
    """Our block's state_dict into `mamba_ssm.Mamba` (strict) and the outputs compared."""
    import torch

    from echomamba_dist.models.mamba import Mamba, load_cuda_mamba

    cuda_mamba = load_cuda_mamba()
    if cuda_mamba is None:
        return {"skipped": "mamba_ssm.Mamba does not import (no mamba-ssm here)"}
    torch.manual_seed(0)
    ours = Mamba(64, d_state=32, d_conv=4, expand=2, scan_backend="cuda").to(device)
    theirs = cuda_mamba(d_model=64, d_state=32, d_conv=4, expand=2).to(device)
    keys = theirs.load_state_dict(ours.state_dict(), strict=True)  # raises on any mismatch
    x = torch.randn(16, 50, 64, device=device)
    with torch.no_grad():
        y_theirs = theirs(x)
        y_ours = ours(x)
        ours.scan_backend = "reference"
        y_ref = ours(x)
    row = {
        "load_state_dict_strict": str(keys),
        "ours_cuda_vs_mamba_ssm_rel": _rel_err(y_ours, y_theirs),
        "ours_reference_vs_mamba_ssm_rel": _rel_err(y_ref, y_theirs),
    }
    row["ok"] = max(row["ours_cuda_vs_mamba_ssm_rel"], row["ours_reference_vs_mamba_ssm_rel"]) <= OUT_TOL
    log(f"block: strict load ok; ours(cuda) vs mamba_ssm {row['ours_cuda_vs_mamba_ssm_rel']:.2e}, "
        f"ours(reference) vs mamba_ssm {row['ours_reference_vs_mamba_ssm_rel']:.2e}")  # fmt: skip
    return row


# --- 4. epoch and inference times ----------------------------------------------------------------


def time_models(args: argparse.Namespace, device, *, deadline: float) -> dict[str, Any]:
    import torch

    from echomamba_dist.models.mamba import Mamba
    from echomamba_dist.ops.selective_scan import resolve_backend

    data_section = {"synthetic": SMOKE_SYNTHETIC} if args.cpu_smoke else {"path": str(args.data)}
    max_len, batch = (20, 64) if args.cpu_smoke else (50, 2048)
    steps = 1 if args.cpu_smoke else 1 << 30
    users, reps = (100, 1) if args.cpu_smoke else (args.users, 5)
    cuda = device.type == "cuda"
    results: dict[str, Any] = {}
    for precision in args.precisions:
        autocast = torch.bfloat16 if precision == "bf16" else None
        for name in args.models:
            key = f"{name}/{precision}"
            if time.perf_counter() > deadline:
                results[key] = {"skipped": f"the --budget of {args.budget:g} s was spent"}
                log(f"{key}: skipped (budget spent)")
                continue
            config = experiment(name, data_section, max_len=max_len, batch_size=batch, device=device.type,
                                precision=precision)  # fmt: skip
            warm_up(name, device, autocast_dtype=autocast)
            with PeakMemory(cuda) as peak:
                _, data, model, optimizer, source = build_run(config)
                train = time_epoch(model, optimizer, source, steps=steps, device=device, autocast_dtype=autocast)
            item_seq, seq_len = inference_batch(data.test, users, device=device)
            infer = time_inference(model, item_seq, seq_len, reps=reps, autocast_dtype=autocast)
            blocks = [m for m in model.modules() if isinstance(m, Mamba)]
            results[key] = {
                "model": name,
                "precision": precision,
                "scan_backend": resolve_backend(blocks[0].scan_backend, device) if blocks else None,
                "epoch_seconds": train["epoch_seconds"],
                "steps": train["steps_timed"],
                "steps_per_epoch": train["steps_per_epoch"],
                "extrapolated": train["extrapolated"],
                "samples_per_epoch": int(source.n),
                "peak_memory_mib": peak.mib,
                "memory_method": peak.method,
                "inference_seconds": infer["seconds"],
                "inference_users": int(seq_len.shape[0]),
                "load_average": load_average(),
            }
            log(f"{key}: epoch {train['epoch_seconds']:.2f} s ({train['steps_timed']} steps), peak "
                f"{peak.mib:,.0f} MiB, inference {infer['seconds']:.4f} s for {int(seq_len.shape[0])} users")  # fmt: skip
            del model, optimizer, data, source
            if cuda:
                torch.cuda.empty_cache()
    return results


# --- driver --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sdist-dir", type=Path, help="directory with mamba_ssm-<ver>.tar.gz: build it if mamba-ssm is missing")
    p.add_argument("--wheels", type=Path, help="wheel directory for the build's ninja and einops (no index)")
    p.add_argument("--build-timeout", type=float, default=360)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="prepared Amazon-Beauty directory")
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    p.add_argument("--users", type=int, default=4096)
    p.add_argument("--budget", type=float, default=450, help="seconds after which no new timing starts")
    p.add_argument("--cpu-smoke", "--dry-run", dest="cpu_smoke", action="store_true",
                   help="every step at a tiny size on the CPU; CUDA-only parts skipped (CI)")  # fmt: skip
    p.add_argument("--out", type=Path, help=f"JSON report (default {DEFAULT_OUT.relative_to(REPO)}; "
                   "with --cpu-smoke, gpu_check-smoke.json in the temp dir)")  # fmt: skip
    args = p.parse_args(argv)
    if args.out is None:
        import tempfile

        args.out = Path(tempfile.gettempdir()) / "gpu_check-smoke.json" if args.cpu_smoke else DEFAULT_OUT
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.budget
    import torch

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        log("no CUDA device: nothing to check here (use --cpu-smoke to exercise the script on a CPU)")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    report: dict[str, Any] = {
        **report_header("GPU check: kernels, cuda vs reference, epoch and inference times",
                        REPO / "benchmarks" / "gpu_check.py", argv, device.type),  # fmt: skip
        "mode": "gpu" if cuda else "cpu smoke (tiny sizes; CUDA-only parts skipped)",
        "load_average_start": load_average(),
    }

    def save() -> None:
        report["wall_seconds"] = time.perf_counter() - started
        report["load_average_end"] = load_average()
        write_json_atomic(args.out, report, sort_keys=False)

    report["kernels"] = find_or_build_kernels(args, cuda=cuda)
    log(f"kernels: {report['kernels']['status']}" + (f" ({report['kernels'].get('reason')})" if report["kernels"].get("reason") else ""))
    save()

    from echomamba_dist.ops.selective_scan import cuda_available

    if cuda and cuda_available():
        report["scan"] = check_scan("cuda", device, SCAN_SHAPES)
        report["block"] = check_block(device)
    elif cuda:
        report["scan"] = report["block"] = {"skipped": "no cuda backend: mamba-ssm is not available"}
        log("scan and block checks skipped: mamba-ssm is not available (the models below use the reference scan)")
    else:
        log("cpu smoke: comparing the fused cpu kernel with reference in place of cuda")
        report["scan"] = check_scan("cpu", device, SMOKE_SCAN_SHAPES)
        report["block"] = {"skipped": "cpu smoke: mamba_ssm.Mamba needs CUDA"}
        log("block check skipped: needs CUDA and mamba-ssm")
    save()

    report["timing"] = time_models(args, device, deadline=deadline)
    report["modules_loaded"] = {name: name in sys.modules for name in FORBIDDEN}
    save()
    loaded = [n for n, v in report["modules_loaded"].items() if v]
    if loaded:
        log(f"WARNING: {', '.join(loaded)} got imported; the GPU machine has neither")
    ok = report["scan"].get("ok", True) and report["block"].get("ok", True) and not loaded
    log(f"{'ok' if ok else 'FAILED'} in {time.perf_counter() - started:.0f} s; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
