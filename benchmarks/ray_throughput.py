"""Training throughput (samples/second) through Ray Train with 1 and 2 CPU workers.

    python benchmarks/ray_throughput.py [--epochs 4] [--workers 1 2] [--gpu] [--out docs/results/ray_throughput.json]

Trains the default model (EchoMamba4Rec, paper settings) on the default synthetic dataset with
`echomamba_dist.distributed.trainer.fit` on a local Ray, once per worker count, plus one run of the same
loop in this process without Ray (the baseline). The figure is the median over epochs 1.. of the
global training samples per second (epoch 0 is left out: it includes the kernels' JIT warm-up);
validation time is not included. Prints a Markdown table and writes the figures, the machine, the
load average and the command to --out (atomically).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, command_line, cpu_model, memory_gib  # noqa: E402

from echomamba_dist.config import ExperimentConfig, experiment_from_dict, to_dict  # noqa: E402
from echomamba_dist.io import write_json_atomic  # noqa: E402


def bench_config(root: Path, *, name: str, epochs: int, workers: int, gpu: bool, ray: bool) -> ExperimentConfig:
    """The default experiment, cut to `epochs`, without tracking, early stopping or final test."""
    return experiment_from_dict({
        "train": {
            "epochs": epochs, "patience": 0, "num_workers": workers, "use_gpu": gpu, "ray": ray,
            "device": "cuda" if gpu else "cpu", "progress": False, "final_test": False,
        },
        "run": {"name": name, "storage_path": str(root), "resume": False},
        "tracking": {"enabled": False},
    })


def epoch_history(run_dir: Path) -> list[dict]:
    """The per-epoch records of a finished run (from its latest checkpoint)."""
    from echomamba_dist.train.checkpoint import latest_checkpoint, read_meta

    return read_meta(latest_checkpoint(run_dir))["history"]


def measure(cfg: ExperimentConfig, *, label: str) -> dict:
    from echomamba_dist.distributed.trainer import fit, resolve_for_workers
    from echomamba_dist.train.loop import train_per_worker

    start = time.perf_counter()
    result = fit(cfg) if cfg.train.ray else train_per_worker(to_dict(cfg))
    wall = time.perf_counter() - start
    history = epoch_history(cfg.run.run_dir)
    rates = [h["samples_per_second"] for h in history[1:]] or [history[0]["samples_per_second"]]
    row = {
        "setup": label,
        "workers": cfg.train.num_workers if cfg.train.ray else 1,
        "ray": cfg.train.ray,
        "device": "cuda" if cfg.train.use_gpu else "cpu",
        "threads_per_worker": resolve_for_workers(cfg, local=True).train.cpus_per_worker if cfg.train.ray else None,
        "epochs": len(history),
        "samples_per_second": statistics.median(rates),
        "samples_per_second_by_epoch": [h["samples_per_second"] for h in history],
        "epoch_seconds": [h["epoch_seconds"] for h in history],
        "steps": result["steps"],
        "wall_seconds": wall,
    }
    print(f"{label}: {row['samples_per_second']:,.0f} samples/s (median of epochs 1..), wall {wall:.0f} s", flush=True)
    return row


def machine() -> dict:
    import ray
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpus": os.cpu_count(), "cpu_model": cpu_model(fallback="unknown"), "memory_gib": memory_gib(), "gpu": gpu,
        "machine": platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "ray": ray.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (epoch 0 is warm-up)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts to run")
    parser.add_argument("--gpu", action="store_true", help="one GPU worker instead of CPU workers")
    parser.add_argument("--no-baseline", action="store_true", help="skip the in-process run without Ray")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "ray_throughput.json")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="echomamba-ray-bench-") as tmp:
        root = Path(tmp)
        if not args.no_baseline:
            cfg = bench_config(root, name="local", epochs=args.epochs, workers=1, gpu=args.gpu, ray=False)
            rows.append(measure(cfg, label="in-process, no Ray"))
        for workers in ([1] if args.gpu else args.workers):
            cfg = bench_config(root, name=f"ray-{workers}", epochs=args.epochs, workers=workers, gpu=args.gpu, ray=True)
            kind = "GPU" if args.gpu else "CPU"
            rows.append(measure(cfg, label=f"Ray Train, {workers} {kind} worker{'s' if workers > 1 else ''}"))
    load_after = os.getloadavg()

    default = bench_config(Path("."), name="x", epochs=1, workers=1, gpu=False, ray=True)
    report = {
        "benchmark": "training samples/second through Ray Train (median of epochs 1..)",
        "command": command_line(__file__, argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "model": to_dict(default.model),
        "data": to_dict(default.data),
        "batch_size": default.train.batch_size,
        "results": rows,
    }
    write_json_atomic(args.out, report, sort_keys=False)
    print(f"\nload average before {load_before[0]:.1f}, after {load_after[0]:.1f} ({os.cpu_count()} CPUs)")
    print("| setup | threads per worker | samples/s (median, epochs 1..) |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['setup']} | {row['threads_per_worker'] or 'all'} | {row['samples_per_second']:,.0f} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
