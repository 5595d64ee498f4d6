"""Length bucketing on and off: training time per epoch and padded tokens, on Amazon-Beauty.

    python benchmarks/bucketing.py                          # EchoMamba4Rec and SASRec, 16 steps
    python benchmarks/bucketing.py --steps 0                # whole epochs (slow on a CPU)
    python benchmarks/bucketing.py --device cuda --steps 0
    python benchmarks/bucketing.py --smoke --out /tmp/bucketing-smoke.json   # CI

With bucketing (`data.bucketing`, the loop's default) `BatchSource` forms each batch from a
length-sorted window of 16 batches and trims it to its longest sequence; without it every batch
is `max_len` (50) wide. Outputs, loss and gradients are the same either way
(tests/test_bucketing.py); only the work on padding changes.

For each model and setting, in a fresh subprocess, with the same seed (42) and epoch (0): the
training samples and batches of `train_per_worker` (paper settings: batch 2048, max length 50,
hidden 64), a tiny warm-up model, one untimed warm-up step, then

* the epoch's training time: with `--steps 0`, or N at least the epoch's step count, every batch
  timed (a measured epoch); else N batches standing for the epoch (its batches sorted by width,
  cut into N strata, the median batch of each weighted by its stratum's size), summed: an
  EXTRAPOLATED epoch time. Each step is timed from building the batch to the end of the
  optimizer step; validation is not included;
* exact counts over the whole epoch: real tokens, tokens in the batches (real + padding), the
  padded fraction and the mean batch width.

Writes `--out` (JSON, atomic) with hardware, command and load averages, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO,
    build_run,
    experiment,
    load_average,
    padding_stats,
    report_header,
    resolve_data,
    run_worker,
    save_report,
    serve_worker,
    time_epoch,
    warm_up,
)

from echomamba_dist.io import write_json_atomic  # noqa: E402

MODELS = ["echomamba4rec", "sasrec"]
DEFAULT_DATA = REPO / "prepared" / "amazon-beauty"
DEFAULT_OUT = REPO / "docs" / "results" / "bucketing.json"


def _worker(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = experiment(
        args.worker, json.loads(args.data_section), max_len=args.max_len, batch_size=args.batch_size,
        bucketing=args.bucketing == "on", device=args.device,
    )  # fmt: skip
    _, _, model, optimizer, source = build_run(config)
    warm_up(args.worker, device)
    load_before = load_average()
    c0 = time.process_time()
    train = time_epoch(model, optimizer, source, steps=args.steps, device=device)
    return {
        "model": args.worker,
        "bucketing": args.bucketing == "on",
        "samples_per_epoch": int(source.n),
        "train": train,
        "train_cpu_seconds": time.process_time() - c0,
        "padding": padding_stats(source, 0),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="prepared dir, raw log, or 'synthetic'")
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--steps", type=int, default=16, help="timed steps per setting; 0: the whole epoch")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per setting before it is recorded as skipped")
    p.add_argument("--smoke", action="store_true", help="tiny synthetic data, 2 steps (CI)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--bucketing", choices=("on", "off"), help=argparse.SUPPRESS)
    p.add_argument("--data-section", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.max_len = 2, 64, 20
    args.steps = args.steps if args.steps > 0 else 1 << 30
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if serve_worker(args, _worker):
        return 0

    data_section, dataset = resolve_data(args.data, smoke=args.smoke)
    started = time.perf_counter()
    report = {
        **report_header("length bucketing on vs off: training time per epoch and padding", __file__, argv, args.device),
        "dataset": dataset,
        "settings": {"batch_size": args.batch_size, "max_len": args.max_len, "seed": 42, "bucket_window": 16,
                     "steps_timed": "whole epoch" if args.steps >= 1 << 30 else args.steps},  # fmt: skip
        "method": __doc__.split("\n\n", 3)[3].strip(),
        "results": {},
        "load_average_start": load_average(),
    }
    print(f"{dataset['name']}; device {args.device}; load average {report['load_average_start']}", flush=True)
    rows = []
    for name in args.models:
        report["results"][name] = {}
        for setting in ("off", "on"):
            cmd = [
                sys.executable, str(Path(__file__).resolve()), "--worker", name, "--bucketing", setting,
                "--data-section", json.dumps(data_section), "--steps", str(args.steps),
                "--batch-size", str(args.batch_size), "--max-len", str(args.max_len),
                "--device", args.device, "--threads", str(args.threads),
            ]  # fmt: skip
            result = run_worker(cmd, timeout=args.timeout)
            report["results"][name][setting] = result
            save_report(report, args.out, started)
            if "skipped" in result:
                print(f"{name} bucketing {setting}: skipped ({result['skipped']})", flush=True)
                continue
            t, pad = result["train"], result["padding"]
            print(f"{name} bucketing {setting}: {'~' if t['extrapolated'] else ''}{t['epoch_seconds']:.1f} s/epoch "
                  f"({t['steps_timed']}/{t['steps_per_epoch']} steps), padding {pad['padding_fraction']:.1%}, "
                  f"mean width {pad['mean_width']:.1f}; load {result['load_average_after']}", flush=True)  # fmt: skip
        off, on = report["results"][name]["off"], report["results"][name]["on"]
        if "skipped" not in off and "skipped" not in on:
            saving = 1 - on["train"]["epoch_seconds"] / off["train"]["epoch_seconds"]
            report["results"][name]["time_saved_fraction"] = saving
            rows.append((name, off, on, saving))
    write_json_atomic(args.out, report, sort_keys=False)

    print("\n| model | samples / epoch | steps timed | s / epoch, off | s / epoch, on | saved | padded tokens, off | on | mean width, off | on |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, off, on, saving in rows:
        est = "≈" if off["train"]["extrapolated"] or on["train"]["extrapolated"] else ""
        print(f"| {name} | {off['samples_per_epoch']:,} | {on['train']['steps_timed']} / {on['train']['steps_per_epoch']} | "
              f"{est}{off['train']['epoch_seconds']:.1f} | {est}{on['train']['epoch_seconds']:.1f} | {saving:.0%} | "
              f"{off['padding']['padding_fraction']:.1%} | {on['padding']['padding_fraction']:.1%} | "
              f"{off['padding']['mean_width']:.1f} | {on['padding']['mean_width']:.1f} |")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
