"""Table 3 of the EchoMamba4Rec paper, our analog: peak memory, training time per epoch and the
inference time for a batch of 4,096 users, for SASRec, BERT4Rec, Mamba4Rec and EchoMamba4Rec in
one run.

    python benchmarks/table3.py                           # Amazon-Beauty, CPU, 3 steps/model
    python benchmarks/table3.py --device cuda             # a GPU: full epochs, no Ray
    python benchmarks/table3.py --data ../shared/data/amazon-video-games.txt   # the paper's set
    python benchmarks/table3.py --smoke --out /tmp/table3-smoke.json            # CI

Settings are the paper's (§4.1): hidden 64, dropout 0.2, Adam 1e-3, batch 2048, max length 50,
each model on its own training samples (SASRec, BERT4Rec, Mamba4Rec: one row per user, a target
at every position; EchoMamba4Rec: one row per prefix), with length bucketing (the loop's default).

Each model runs in a fresh subprocess (no Ray), which

* loads the dataset and builds the samples as `train_per_worker` does, and warms up a tiny model
  of the same kind (Numba kernels, oneDNN, the CUDA context);
* memory: from before the model is built to the end of the timed steps, the peak resident memory
  the process added (CPU: VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS
  before: model, Adam state, activations, allocator caching) or `torch.cuda.max_memory_allocated`
  (GPU). The paper's column is GPU memory; a CPU figure is an analog, not the same quantity;
* training time per epoch: with `--steps 0` (the default on a GPU) a whole epoch, every batch
  timed from building it to the end of its optimizer step; with `--steps N` (default 3 on a CPU,
  where a full epoch takes many minutes) N batches that stand for the epoch (its batches sorted
  by width and cut into N strata, the median batch of each weighted by its stratum's size), the
  sum reported as an EXTRAPOLATED epoch time. One untimed warm-up step comes first. Validation
  is not included;
* inference: `score_all` (scores against every item) for 4,096 test users drawn with a fixed
  seed, trimmed to their longest history, eval mode without gradients; one warm-up call, then
  the median of `--reps` calls.

Writes `--out` (JSON, replaced atomically after every model) with the hardware, command, load
average and the paper's numbers, and prints a markdown table beside the paper's Table 3 (RTX
4090, Video-Games). On a shared CPU the times are upper bounds: see the load averages recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    PAPER_TABLE3,
    REPO,
    PeakMemory,
    build_run,
    experiment,
    inference_batch,
    load_average,
    report_header,
    resolve_data,
    run_worker,
    save_report,
    serve_worker,
    time_epoch,
    time_inference,
    training_data,
    warm_up,
)

MODELS = ["sasrec", "bert4rec", "mamba4rec", "echomamba4rec"]
DISPLAY = {"sasrec": "SASRec", "bert4rec": "BERT4Rec", "mamba4rec": "Mamba4Rec", "echomamba4rec": "EchoMamba4Rec"}
DEFAULT_DATA = REPO / "prepared" / "amazon-beauty"
DEFAULT_OUT = REPO / "docs" / "results" / "table3.json"
SMOKE = {"max_len": 20, "batch_size": 64, "users": 100}


def _worker(args: argparse.Namespace) -> dict:
    import torch

    from echomamba_dist.config import experiment_from_dict
    from echomamba_dist.models.registry import count_parameters

    if args.threads:
        torch.set_num_threads(args.threads)
    data_section = json.loads(args.data_section)
    device = torch.device(args.device)
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    cuda = device.type == "cuda"
    cfg = experiment_from_dict(experiment(
        args.model, data_section, max_len=args.max_len, batch_size=args.batch_size,
        device=args.device, precision=args.precision,
    ))  # fmt: skip
    data = training_data(cfg)  # loaded before the memory is measured
    warm_up(args.model, device, autocast_dtype=autocast)
    load_before = load_average()
    c0 = time.process_time()

    with PeakMemory(cuda) as train_peak:
        _, _, model, optimizer, source = build_run(cfg, data=data)
        train = time_epoch(model, optimizer, source, steps=args.steps, device=device, autocast_dtype=autocast)
    train_cpu = time.process_time() - c0

    item_seq, seq_len = inference_batch(data.test, args.users, device=device)
    optimizer.zero_grad(set_to_none=True)
    with PeakMemory(cuda) as infer_peak:
        infer = time_inference(model, item_seq, seq_len, reps=args.reps, autocast_dtype=autocast)
    return {
        "model": args.model,
        "parameters": count_parameters(model),
        "samples_per_epoch": int(source.n),
        "train": train,
        "train_cpu_seconds": train_cpu,
        "train_peak_mib": train_peak.mib,
        "inference": {**infer, "users": int(seq_len.shape[0]), "width": int(item_seq.shape[1])},
        "inference_peak_mib": infer_peak.mib,
        "memory_method": train_peak.method,
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def _spawn(model: str, data_section: dict, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", model,
        "--data-section", json.dumps(data_section), "--device", args.device, "--precision", args.precision,
        "--steps", str(args.steps), "--users", str(args.users), "--reps", str(args.reps),
        "--batch-size", str(args.batch_size), "--max-len", str(args.max_len), "--threads", str(args.threads),
    ]  # fmt: skip
    return run_worker(cmd, timeout=args.timeout)


def render(report: dict) -> str:
    """The markdown table: ours next to the paper's Table 3."""
    hw = report["hardware"]
    device = hw["device"] if hw["device"] != "cpu" else f"CPU ({hw['cpu_cores']} cores, {hw['cpu']})"
    mem_col = "peak GPU MiB" if hw["device"] != "cpu" else "peak RSS growth MiB"
    lines = [
        f"Ours: {report['dataset']['name']} on {device}, {report['precision']}; paper: RTX 4090, Video-Games.",
        "",
        f"| model | s / epoch | steps timed / epoch | {mem_col} | inference s (4,096 users) "
        "| paper s / epoch | paper GB | paper inference s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in report["models"]:
        r = report["results"].get(name)
        paper = PAPER_TABLE3.get(name, {})
        tail = (
            f"{paper.get('train_s_per_epoch', '—')} | {paper.get('memory_gb', '—')} | {paper.get('inference_s', '—')}"
        )
        if r is None or "skipped" in r:
            lines.append(f"| {DISPLAY[name]} | {(r or {}).get('skipped', 'not run')} | | | | {tail} |")
            continue
        t = r["train"]
        est = "≈" if t["extrapolated"] else ""
        lines.append(
            f"| {DISPLAY[name]} | {est}{t['epoch_seconds']:.1f} | {t['steps_timed']} / {t['steps_per_epoch']} | "
            f"{r['train_peak_mib']:,.0f} | {r['inference']['seconds']:.4f} | {tail} |"
        )
    if any(r and r.get("train", {}).get("extrapolated") for r in report["results"].values()):
        lines.append("")
        lines.append("≈: extrapolated from the steps timed (width-stratified sample of the epoch's batches).")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="prepared dir, raw log (prepared once into prepared/<stem>), or 'synthetic'")
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--steps", type=int, default=None, help="timed steps per model; 0: a whole epoch (default: 3 on cpu, 0 on cuda)")
    p.add_argument("--users", type=int, default=4096, help="users in the inference batch")
    p.add_argument("--reps", type=int, default=3, help="timed inference calls (median)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch threads in the workers; 0: torch's default")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per model before it is recorded as skipped")
    p.add_argument("--smoke", action="store_true", help="tiny synthetic data, 1 step, 100 users (CI)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data-section", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 0 if args.device == "cuda" else 3
    if args.smoke:
        args.steps, args.users, args.reps = 1, SMOKE["users"], 1
        args.max_len, args.batch_size = SMOKE["max_len"], SMOKE["batch_size"]
    args.steps = args.steps if args.steps > 0 else 1 << 30  # 0: every batch of the epoch
    if args.worker:
        args.model = args.worker
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if serve_worker(args, _worker):
        return 0

    data_section, dataset = resolve_data(args.data, smoke=args.smoke)
    started = time.perf_counter()
    report = {
        **report_header("Table 3 analog: peak memory, training time per epoch, inference for 4,096 users",
                        __file__, argv, args.device),  # fmt: skip
        "dataset": dataset,
        "precision": args.precision,
        "settings": {
            "batch_size": args.batch_size, "max_len": args.max_len, "hidden_size": 64, "dropout": 0.2,
            "bucketing": True, "steps_timed": "whole epoch" if args.steps >= 1 << 30 else args.steps,
            "inference_users": args.users, "inference_reps": args.reps,
        },  # fmt: skip
        "method": __doc__.split("\n\n", 3)[3].strip(),
        "paper_table3": {"hardware": "RTX 4090", "dataset": "Video-Games", **PAPER_TABLE3},
        "models": args.models,
        "results": {},
        "load_average_start": load_average(),
    }
    print(f"{dataset['name']}: {dataset.get('n_users')} users, {dataset.get('n_items')} items; device {args.device}; "
          f"load average {report['load_average_start']}", flush=True)  # fmt: skip
    for name in args.models:
        t0 = time.perf_counter()
        try:
            result = _spawn(name, data_section, args)
        except RuntimeError as exc:
            result = {"skipped": f"failed: {str(exc).splitlines()[-1]}"}
            print(exc, file=sys.stderr)
        report["results"][name] = result
        save_report(report, args.out, started)
        if "skipped" in result:
            print(f"{name}: skipped ({result['skipped']})", flush=True)
        else:
            t = result["train"]
            print(f"{name}: {'~' if t['extrapolated'] else ''}{t['epoch_seconds']:.1f} s/epoch "
                  f"({t['steps_timed']}/{t['steps_per_epoch']} steps), train peak {result['train_peak_mib']:.0f} MiB, "
                  f"inference {result['inference']['seconds']:.4f} s; {time.perf_counter() - t0:.0f} s; "
                  f"load {result['load_average_after']}", flush=True)  # fmt: skip
    print()
    print(render(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
