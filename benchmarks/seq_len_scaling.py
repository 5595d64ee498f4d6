"""Time and peak memory of one training step against the sequence length, EchoMamba4Rec and
SASRec, in one run, with a log-log plot.

    python benchmarks/seq_len_scaling.py                          # L = 50 ... 1600, CPU
    python benchmarks/seq_len_scaling.py --device cuda            # the same on a GPU
    python benchmarks/seq_len_scaling.py --smoke --out /tmp/s.json --plot /tmp/s.png   # CI

A step is one optimizer step of the model's own objective on `--batch` rows of synthetic
full-length sequences (every row exactly L items, uniform over `--n-items` items, so no
padding): EchoMamba4Rec trains on prefix rows, one target per row; SASRec on all positions, L
targets per row (its cross-entropy over all items then grows with L as well as its attention).
Both models have max_len = L (EchoMamba4Rec's FFT filter spans max_len; SASRec's position table
has max_len rows), hidden 64, dropout 0.2, the paper's defaults otherwise, Adam 1e-3.

Every (model, L) point runs in a fresh subprocess: a tiny warm-up model first (Numba kernels,
oneDNN), then the model is built and

* peak memory: over the first step (untimed; it creates Adam's state), the resident memory the
  process added (VmHWM after /proc/self/clear_refs, minus VmRSS before), or
  `torch.cuda.max_memory_allocated` on a GPU: activations, gradients, optimizer state;
* time: the median of `--reps` further steps.

A watchdog stops a point whose step runs past `--time-budget` seconds or whose resident memory
passes `--memory-budget` GiB; the point is recorded as skipped with the reason (and so are the
model's longer lengths), instead of hanging the run or the machine.

Writes `--out` (JSON, atomic, after every point) with hardware, command and load averages, and
`--plot` (PNG, time and memory against L, log-log).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from echomamba_dist.io import atomic_file  # noqa: E402
from _common import (  # noqa: E402
    REPO,
    PeakMemory,
    experiment,
    load_average,
    model_and_optimizer,
    report_header,
    rss_kib,
    run_worker,
    save_report,
    serve_worker,
    sync,
    train_step,
    warm_up,
)

MODELS = ["echomamba4rec", "sasrec"]
DISPLAY = {"echomamba4rec": "EchoMamba4Rec", "sasrec": "SASRec"}
LENGTHS = [50, 100, 200, 400, 800, 1600]
DEFAULT_OUT = REPO / "docs" / "results" / "seq_len_scaling.json"
DEFAULT_PLOT = REPO / "docs" / "seq_len_scaling.png"


class Watchdog:
    """Ends the worker with a 'skipped' JSON line when a step runs too long or RSS grows too big."""

    def __init__(self, *, time_budget: float, memory_budget_gib: float, cuda: bool) -> None:
        self.time_budget = time_budget
        self.memory_kib = memory_budget_gib * 2**20
        self.cuda = cuda
        self.step_started: float | None = None
        threading.Thread(target=self._watch, daemon=True).start()

    def over_time(self, seconds: float) -> None:
        """Skips the point when a step that already finished took longer than the budget.

        The watchdog thread polls every 50 ms, so a step shorter than that can end before the thread
        looks; this check after each step makes the budget hold for any step length.
        """
        if seconds > self.time_budget:
            self.skip(f"a step ran past the time budget of {self.time_budget:g} s ({seconds:.3g} s)")

    def skip(self, reason: str) -> None:
        print(json.dumps({"skipped": reason, "load_average": load_average()}), flush=True)
        os._exit(0)

    def _watch(self) -> None:
        while True:
            time.sleep(0.05)
            reason = None
            started = self.step_started
            if started is not None and time.perf_counter() - started > self.time_budget:
                reason = f"a step ran past the time budget of {self.time_budget:g} s"
            rss = rss_kib("VmRSS") or 0
            if rss > self.memory_kib:
                reason = f"resident memory passed the budget of {self.memory_kib / 2**20:g} GiB"
            if self.cuda:
                import torch

                if torch.cuda.memory_allocated() > self.memory_kib * 1024:
                    reason = f"GPU memory passed the budget of {self.memory_kib / 2**20:g} GiB"
            if reason:
                self.skip(reason)


def _worker(args: argparse.Namespace) -> dict:
    import torch

    from echomamba_dist.config import experiment_from_dict

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    dog = Watchdog(time_budget=args.time_budget, memory_budget_gib=args.memory_budget, cuda=cuda)
    warm_up(args.worker, device, autocast_dtype=autocast)

    length, batch_size = args.length, args.batch
    # the paper's settings with max_len = L; seed 0; no dataset is read (the batch is synthetic)
    cfg = experiment_from_dict(experiment(args.worker, {}, max_len=length, device=args.device, seed=0))
    g = torch.Generator().manual_seed(0)
    item_seq = torch.randint(1, args.n_items + 1, (batch_size, length), generator=g)
    seq_len = torch.full((batch_size,), length)
    if cfg.sample_mode == "prefix":
        target = torch.randint(1, args.n_items + 1, (batch_size,), generator=g)  # (B,)
    else:
        target = torch.randint(1, args.n_items + 1, (batch_size, length), generator=g)  # (B, L)
    batch = {k: v.to(device) for k, v in {"item_seq": item_seq, "seq_len": seq_len, "target": target}.items()}

    model, optimizer = model_and_optimizer(cfg, args.n_items, device)
    model.train()
    load_before = load_average()

    dog.step_started = time.perf_counter()
    with PeakMemory(cuda) as peak:
        train_step(model, optimizer, batch, autocast_dtype=autocast)
    first = time.perf_counter() - dog.step_started
    dog.over_time(first)
    times, cpu = [], []
    for _ in range(args.reps):
        sync(device)
        c0 = time.process_time()
        dog.step_started = t0 = time.perf_counter()
        train_step(model, optimizer, batch, autocast_dtype=autocast)
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        dog.over_time(times[-1])
    dog.step_started = None
    return {
        "model": args.worker,
        "length": length,
        "step_seconds": statistics.median(times),
        "all_step_seconds": times,
        "cpu_seconds": statistics.median(cpu),
        "first_step_seconds": first,
        "peak_mib": peak.mib,
        "memory_method": peak.method,
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def plot(report: dict, path: Path) -> None:
    """Time and peak memory per step against L, log-log, one line per model; skips marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    hw = report["hardware"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in report["models"]:
        points = report["results"].get(name, {})
        done = [(int(L), r) for L, r in points.items() if "skipped" not in r]
        skipped = [int(L) for L, r in points.items() if "skipped" in r]
        for ax, key in zip(axes, ("step_seconds", "peak_mib")):
            if done:
                xs, ys = zip(*sorted((L, r[key]) for L, r in done))
                (line,) = ax.plot(xs, ys, marker="o", label=DISPLAY[name])
                color = line.get_color()
            else:
                color = None
            for L in skipped:
                ax.axvline(L, color=color or "grey", linestyle=":", alpha=0.6)
                ax.annotate(f"{DISPLAY[name]}\nskipped", (L, 1), xycoords=("data", "axes fraction"),
                            xytext=(2, -4), textcoords="offset points", va="top", fontsize=7, color=color)
    for ax, ylabel in zip(axes, ("seconds per training step", "peak memory added, MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(report["lengths"], [str(L) for L in report["lengths"]])
        ax.xaxis.set_minor_locator(NullLocator())  # only the measured lengths on the x axis
        ax.set_xlabel("sequence length L (= max_len)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend()
    where = hw["device"] if hw["device"] != "cpu" else f"{hw['cpu_cores']}-core CPU (shared, load {report['load_average_start'][0]:.0f})"
    fig.suptitle(f"One training step, batch {report['settings']['batch']}, {report['settings']['n_items']:,} items, "
                 f"{report['precision']}, {where}", fontsize=10)  # fmt: skip
    fig.tight_layout()
    with atomic_file(path, what="figure") as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--lengths", nargs="+", type=int, default=LENGTHS)
    p.add_argument("--batch", type=int, default=64, help="rows per training step")
    p.add_argument("--n-items", type=int, default=12101, help="catalogue size (Amazon-Beauty's)")
    p.add_argument("--reps", type=int, default=2, help="timed steps after the memory step (median)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=120.0, help="seconds one step may take")
    p.add_argument("--memory-budget", type=float, default=8.0, help="GiB of resident (or GPU) memory a point may use")
    p.add_argument("--smoke", action="store_true", help="L = 8, 16; batch 4; 200 items; 1 rep (CI)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    p.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.lengths, args.batch, args.n_items, args.reps = [8, 16], 4, 200, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if serve_worker(args, _worker):
        return 0

    started = time.perf_counter()
    report = {
        **report_header("one training step against the sequence length", __file__, argv, args.device),
        "precision": args.precision,
        "settings": {
            "batch": args.batch, "n_items": args.n_items, "reps": args.reps, "hidden_size": 64,
            "time_budget_s": args.time_budget, "memory_budget_gib": args.memory_budget,
        },  # fmt: skip
        "method": __doc__.split("\n\n", 2)[2].strip(),
        "models": args.models,
        "lengths": args.lengths,
        "results": {name: {} for name in args.models},
        "load_average_start": load_average(),
    }
    print(f"batch {args.batch}, {args.n_items} items, device {args.device}; load average {report['load_average_start']}", flush=True)
    for name in args.models:
        skipped_at = None
        for length in args.lengths:
            if skipped_at is not None:
                result = {"skipped": f"not run: L={skipped_at} was already over budget"}
            else:
                cmd = [
                    sys.executable, str(Path(__file__).resolve()), "--worker", name, "--length", str(length),
                    "--batch", str(args.batch), "--n-items", str(args.n_items), "--reps", str(args.reps),
                    "--device", args.device, "--precision", args.precision, "--threads", str(args.threads),
                    "--time-budget", str(args.time_budget), "--memory-budget", str(args.memory_budget),
                ]  # fmt: skip
                # the watchdog ends a slow step; this outer limit only catches a stuck worker
                result = run_worker(cmd, timeout=120 + args.time_budget * (args.reps + 2))
                if "skipped" in result:
                    skipped_at = length
            report["results"][name][str(length)] = result
            save_report(report, args.out, started)
            if "skipped" in result:
                print(f"{name} L={length}: skipped ({result['skipped']})", flush=True)
            else:
                print(f"{name} L={length}: {result['step_seconds']:.3f} s/step, peak {result['peak_mib']:.0f} MiB, "
                      f"load {result['load_average_after']}", flush=True)  # fmt: skip
    plot(report, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
