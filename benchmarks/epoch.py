"""Whole training epochs of EchoMamba4Rec and SASRec on Amazon-Beauty, in one process (issue 15).

    python benchmarks/epoch.py --data ../shared/data/amazon-beauty.txt --threads 2 --profile-steps 8
    python benchmarks/epoch.py --data ../shared/data/amazon-beauty.txt --epochs 0 --profile-steps 8 \
        --threads 1 --out /tmp/epoch-profile.json                          # the profile only
    python benchmarks/epoch.py --smoke --out /tmp/epoch-smoke.json          # CI

Three runs share one process and take turns, one epoch each per round: EchoMamba4Rec (its
default, `fast_path=true`), SASRec, and EchoMamba4Rec with `fast_path=false` (the unoptimised
path: full readout, FFT filter, channel-first Mamba with `nn.Conv1d`), so that before and after
and the baseline are measured under the same load. Each run is set up as `train_per_worker` sets
it up (`_common.build_run`: paper settings, hidden 64, dropout 0.2, Adam 1e-3, batch 2048, max
length 50, seed 42, length bucketing; EchoMamba4Rec on prefix samples, SASRec on all positions).

Before the first round: a tiny model of each kind takes a step (Numba kernels, oneDNN), then each
run takes one untimed step on a copy of its model. With `--profile-steps N`, each EchoMamba4Rec
run then trains a copy of itself on N batches that stand for the epoch (`_common.sample_batches`:
the epoch's batches sorted by width, the median batch of each of N strata), once timed (process
CPU time a step, and their sum weighted by stratum size: an EXTRAPOLATED epoch) and once under
`torch.profiler` (the ops with the most self CPU time). Then, per epoch of a run:

* training: every batch of the epoch, as the loop runs it (its per-epoch dropout seed, the
  batch built from the samples, forward, backward, the optimizer step), wall time
  (`time.perf_counter`) and process CPU time (`time.process_time`, all threads), the mean loss;
* validation: `evaluate_model` over the validation users (full ranking, the loop's batch size),
  wall and CPU time, and its metrics;
* the load averages before and after: other jobs on the machine inflate wall times.

The summary: each run's mean over its epochs; EchoMamba4Rec / SASRec training time; the
unoptimised / optimised EchoMamba4Rec training and validation time; and the largest difference
of the per-epoch losses and validation metrics between the two EchoMamba4Rec paths (the same
seed draws the same batches and dropout masks, so they agree to float32 rounding).

Writes `--out` (JSON, atomically after every epoch) with the command, hardware and load averages,
and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO,
    build_run,
    experiment,
    load_average,
    report_header,
    resolve_data,
    sample_batches,
    save_report,
    train_step,
    warm_up,
)

from echomamba_dist.io import write_json_atomic  # noqa: E402

DEFAULT_DATA = REPO / "prepared" / "amazon-beauty"
DEFAULT_OUT = REPO / "docs" / "results" / "epoch.json"
FAST, SASREC, SLOW = "echomamba4rec", "sasrec", "echomamba4rec-unoptimised"
RUNS = {  # run name -> (model, model config overrides)
    FAST: ("echomamba4rec", {"fast_path": True}),
    SASREC: ("sasrec", {}),
    SLOW: ("echomamba4rec", {"fast_path": False}),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="prepared dir, raw log, or 'synthetic'")
    p.add_argument("--prepared-root", type=Path, default=REPO / "prepared",
                   help="where a raw log is prepared (once; reused while its sha256 matches)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per run (0: only --profile-steps)")
    p.add_argument("--threads", type=int, default=2, help="torch (and kernel) threads")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--profile-steps", type=int, default=0,
                   help="profile this many steps of each EchoMamba4Rec run first (0: none)")
    p.add_argument("--smoke", action="store_true", help="tiny synthetic data, 2 epochs (CI)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON report (default {DEFAULT_OUT.relative_to(REPO)}; with --smoke a temporary file)")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.batch_size, args.max_len = 2, 64, 20
        args.profile_steps = args.profile_steps and 2
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "epoch-smoke.json" if args.smoke else DEFAULT_OUT
    return args


def train_epoch(cfg, session, model, optimizer, source, *, epoch: int) -> dict:
    """One epoch as `train_per_worker` runs it (world size 1, the loop's own epoch function over
    the source's batches), timed; returns its figures."""

    from echomamba_dist.train.loop import LossModule, TrainState, seed_epoch, train_epoch

    # the loop's per-epoch dropout seed (rank 0), so that the losses are the loop's
    seed_epoch(cfg.train.seed, epoch, 0)
    load_before = load_average()
    state = TrainState()
    t0, c0 = time.perf_counter(), time.process_time()
    loss, samples, _ = train_epoch(cfg, session, LossModule(model), model, optimizer,
                                    source.epoch(epoch, device=session.device), state, epoch=epoch,
                                    autocast=None)  # fmt: skip
    return {
        "epoch": epoch,
        "train_wall_s": time.perf_counter() - t0,
        "train_cpu_s": time.process_time() - c0,
        "loss": loss,
        "steps": state.step,
        "samples": samples,
        "load_average_before": load_before,
    }


def validate(cfg, model, data, *, device) -> dict:
    """`evaluate_model` on the validation split, with the loop's settings, timed."""
    from echomamba_dist.train.evaluate import evaluate_model

    t0, c0 = time.perf_counter(), time.process_time()
    metrics = evaluate_model(model, data.valid, ks=cfg.train.ks, batch_size=cfg.train.eval_batch_size, device=device,
                             exclude_history=cfg.train.exclude_history)  # fmt: skip
    return {"valid_wall_s": time.perf_counter() - t0, "valid_cpu_s": time.process_time() - c0, "valid": metrics}


def untimed_step(model, optimizer, source, *, device) -> None:
    """One training step on copies of the model and optimizer (first-call costs at real sizes)."""
    model, optimizer = copy.deepcopy((model, optimizer))  # one copy: the optimizer holds the copy's weights
    train_step(model, optimizer, source.to_batch(source.batch_indices(0)[0], device=device))


def profile_steps(model, optimizer, source, *, steps: int, device, top: int = 15) -> dict:
    """Train copies of `model` and `optimizer` on `steps` batches standing for epoch 0: their CPU
    time (process), the weighted sum as an extrapolated epoch, and a torch.profiler table."""
    from torch.profiler import ProfilerActivity, profile

    model, optimizer_copy = copy.deepcopy((model, optimizer))  # one copy: the optimizer holds the copy's weights
    picked = sample_batches(source, 0, steps)
    batches = [source.to_batch(idx, device=device) for idx, _ in picked]
    train_step(model, optimizer_copy, batches[0])  # untimed
    step_cpu = []
    for batch in batches:
        c0 = time.process_time()
        train_step(model, optimizer_copy, batch)
        step_cpu.append(time.process_time() - c0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            train_step(model, optimizer_copy, batch)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return {
        "widths": [int(b["item_seq"].shape[1]) for b in batches],
        "weights": [int(w) for _, w in picked],
        "step_cpu_s": step_cpu,
        "extrapolated_epoch_cpu_s": sum(w * t for (_, w), t in zip(picked, step_cpu)),
        "profiled_self_cpu_s": total / 1e6,
        "top_ops": [
            {"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
             "calls": e.count}
            for e in events[:top]
        ],  # fmt: skip
    }


def summarise(results: dict) -> dict:
    """Means per run, the ratios of the issue's targets, and fast vs unoptimised agreement."""

    def mean(run, key):
        values = [e[key] for e in results.get(run, [])]
        return sum(values) / len(values) if values else None

    summary = {
        run: {key: mean(run, key) for key in ("train_wall_s", "train_cpu_s", "valid_wall_s", "valid_cpu_s")}
        for run in results
    }

    def ratio(a, b, key):
        x, y = summary.get(a, {}).get(key), summary.get(b, {}).get(key)
        return x / y if x and y else None

    summary["echomamba_vs_sasrec_train_wall"] = ratio(FAST, SASREC, "train_wall_s")
    summary["echomamba_vs_sasrec_train_cpu"] = ratio(FAST, SASREC, "train_cpu_s")
    summary["unoptimised_vs_echomamba_train_wall"] = ratio(SLOW, FAST, "train_wall_s")
    summary["unoptimised_vs_echomamba_train_cpu"] = ratio(SLOW, FAST, "train_cpu_s")
    summary["unoptimised_vs_echomamba_valid_wall"] = ratio(SLOW, FAST, "valid_wall_s")
    if results.get(FAST) and results.get(SLOW):
        pairs = list(zip(results[FAST], results[SLOW]))
        summary["loss_fast_vs_unoptimised"] = [
            {"epoch": a["epoch"], "fast": a["loss"], "unoptimised": b["loss"], "abs_diff": abs(a["loss"] - b["loss"])}
            for a, b in pairs
        ]
        summary["loss_max_abs_diff"] = max(abs(a["loss"] - b["loss"]) for a, b in pairs)
        summary["valid_metric_max_abs_diff"] = max(
            abs(a["valid"][k] - b["valid"][k]) for a, b in pairs for k in a["valid"] if k != "count"
        )
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    data_section, dataset = resolve_data(args.data, smoke=args.smoke, cache_root=args.prepared_root)
    started = time.perf_counter()
    report = {
        **report_header("EchoMamba4Rec and SASRec: whole training epochs, alternating (issue 15)", __file__, argv, "cpu"),
        "dataset": dataset,
        "settings": {"epochs": args.epochs, "threads": args.threads, "batch_size": args.batch_size,
                     "max_len": args.max_len, "seed": args.seed, "bucketing": True, "runs": args.runs},  # fmt: skip
        "method": __doc__.split("\n\n", 3)[3].strip(),
        "load_average_start": load_average(),
        "results": {run: [] for run in args.runs},
    }
    print(f"{dataset['name']}; {args.threads} threads; load average {report['load_average_start']}", flush=True)

    from echomamba_dist.train.session import LocalSession

    device = torch.device("cpu")
    runs, shared = {}, {}
    for run in args.runs:
        model_name, overrides = RUNS[run]
        config = experiment(model_name, data_section, max_len=args.max_len, batch_size=args.batch_size,
                            seed=args.seed, model_overrides=overrides)  # fmt: skip
        # the two EchoMamba4Rec runs share their training data (the same samples and batches)
        cfg, data, model, optimizer, source = build_run(config, data=shared.get(model_name))
        shared[model_name] = data
        runs[run] = (cfg, data, model, optimizer, source)
    sessions = {run: LocalSession(cfg) for run, (cfg, *_) in runs.items()}  # in this process, as the loop
    for model_name, overrides in {RUNS[r][0]: RUNS[r][1] for r in args.runs}.items():
        warm_up(model_name, device, model_overrides=overrides)
    for run, (_, _, model, optimizer, source) in runs.items():
        untimed_step(model, optimizer, source, device=device)
    if args.profile_steps:
        report["profile"] = {}
        for run in (r for r in args.runs if RUNS[r][0] == "echomamba4rec"):
            _, _, model, optimizer, source = runs[run]
            prof = report["profile"][run] = profile_steps(model, optimizer, source, steps=args.profile_steps, device=device)
            save_report(report, args.out, started)
            print(f"\n{run}: {len(prof['widths'])} steps of widths {prof['widths']}, CPU s "
                  f"{[round(t, 3) for t in prof['step_cpu_s']]}; extrapolated epoch {prof['extrapolated_epoch_cpu_s']:.1f} CPU s")
            print("| op | self CPU s | share | calls |\n|---|---|---|---|")
            for op in prof["top_ops"]:
                print(f"| {op['op']} | {op['self_cpu_s']:.3f} | {op['share']:.1%} | {op['calls']} |")
        print(flush=True)

    print(f"{'run':<27} {'epoch':>5} {'steps':>5} {'train s':>8} {'cpu s':>8} {'valid s':>8} {'loss':>8}  load")
    for epoch in range(args.epochs):
        for run, (cfg, data, model, optimizer, source) in runs.items():
            record = train_epoch(cfg, sessions[run], model, optimizer, source, epoch=epoch)
            record.update(validate(cfg, model, data, device=device))
            record["load_average_after"] = load_average()
            report["results"][run].append(record)
            report["summary"] = summarise(report["results"])
            save_report(report, args.out, started)
            print(f"{run:<27} {epoch:5d} {record['steps']:5d} {record['train_wall_s']:8.1f} {record['train_cpu_s']:8.1f} "
                  f"{record['valid_wall_s']:8.1f} {record['loss']:8.4f}  {record['load_average_after']}", flush=True)  # fmt: skip

    summary = report.get("summary", {})
    write_json_atomic(args.out, {**report, "load_average_end": load_average(), "wall_seconds": time.perf_counter() - started},
                      sort_keys=False)
    print("\n| run | train s / epoch | CPU s / epoch | validation s |")
    print("|---|---|---|---|")
    for run in (r for r in args.runs if r in summary):
        s = summary[run]
        print(f"| {run} | {s['train_wall_s']:.1f} | {s['train_cpu_s']:.1f} | {s['valid_wall_s']:.1f} |")

    def show(key, what):
        value = summary.get(key)
        if value is not None:
            print(f"{what}: {value:.2f}x")

    show("echomamba_vs_sasrec_train_wall", "EchoMamba4Rec / SASRec epoch (wall)")
    show("unoptimised_vs_echomamba_train_wall", "unoptimised / optimised EchoMamba4Rec epoch (wall)")
    show("unoptimised_vs_echomamba_valid_wall", "unoptimised / optimised EchoMamba4Rec validation (wall)")
    if "loss_max_abs_diff" in summary:
        print(f"loss, optimised vs unoptimised, largest difference over {args.epochs} epochs: "
              f"{summary['loss_max_abs_diff']:.2e}; validation metrics: {summary['valid_metric_max_abs_diff']:.2e}")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
