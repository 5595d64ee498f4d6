"""Training-sample memory: windows into the log's CSR arrays against dense matrices (issue 18).

    python benchmarks/sample_memory.py                              # the 10 M-interaction log
    python benchmarks/sample_memory.py --interactions 2000000       # a smaller log
    python benchmarks/sample_memory.py --interactions 2000000 --cases train-2 --kinds windows   # one case
    python benchmarks/sample_memory.py --smoke --out /tmp/sample-memory-smoke.json   # CI

The log is the one `benchmarks/prepare_synthetic.py` makes: `generate_synthetic` with
interactions / 20 users, mean length 20, 100,000 items, 200 topics, seed 0, prepared in one
process with the default options (dedup, 5-core) into `--work` (default /tmp/issue18/, reused
when already there). The samples are EchoMamba4Rec's (prefix mode; `--samples all_positions`
for the other mode), max length 50, bucketing on, seed 42.

Each measurement runs in a subprocess of its own, so that peaks do not mix:

* source (windows | dense): load the prepared dataset, then `leave_one_out` and the training
  samples. windows: `build_windows` and a `BatchSource`, the library's only source. dense: the
  (samples, max_len) int64 matrices the loop used before, built here from the windows, 65,536
  rows at a time: their size, without the temporaries of the old one-shot construction (which
  peaked higher). Figures: the peak resident memory the step added (VmHWM after
  /proc/self/clear_refs, minus VmRSS before), what it kept, and the peak against the prepared
  dataset's in-memory size (its CSR arrays: offsets + items).
* train-1 (windows | dense): the same, then the model and `--steps` optimizer steps in this
  process (one worker): the process's peak RSS (ru_maxrss), steps per second (batch building
  included) and the mean time to build a batch.
* train-2 (windows | dense): two Ray Train workers on a local Ray (gloo DDP, one thread each),
  global batch `--batch-size`, `--steps` steps: each worker's peak RSS and steps per second.
  windows: the library's Ray path (CSR shards on Ray Data, exact sharding). dense: each worker
  builds the matrices itself, as each worker held them in the old exact mode (the object-store
  copy that mode also kept is not counted). Skipped, and said so, when the two workers' matrices
  would not fit in half of the memory available. A worker's items are the object store's buffer
  (exact sharding: one block, read without a copy), resident in the worker only once read, so
  the source figures of every case include reading the CSR arrays once (`touch`), as training does.

`--smoke` (CI): a 20,000-interaction log, 3 steps, and only train-1 (which measures the source
too) unless `--cases` says otherwise: two Ray workers take longer to start than all the rest, and
tests/ray/test_ray_train.py covers the Ray path.

Writes `--out` (JSON, atomically, after every measurement) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
    train_step,
)

from echomamba_dist.io import write_json_atomic  # noqa: E402

DEFAULT_OUT = REPO / "docs" / "results" / "sample_memory.json"
DEFAULT_WORK = Path("/tmp/issue18")
KINDS = ("windows", "dense")
CASES = ("source", "train-1", "train-2")
CHUNK = 65_536


# --- the log -------------------------------------------------------------------------------------


def prepared_dir(args: argparse.Namespace) -> Path:
    return Path(args.work) / f"prepared-{args.interactions}"


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Generate and prepare the log (in this worker process), unless it is already there."""
    import pyarrow.parquet as pq

    from echomamba_dist.config import SyntheticConfig
    from echomamba_dist.data.prepare import PrepareOptions, prepare
    from echomamba_dist.data.synthetic import generate_synthetic

    out = prepared_dir(args)
    if (out / "meta.json").is_file():
        return json.loads((out / "meta.json").read_text())
    cfg = SyntheticConfig(
        n_users=max(1, round(args.interactions / 20.0)), n_items=min(100_000, max(50, args.interactions // 20)),
        n_topics=min(200, max(50, args.interactions // 20)), mean_length=20.0, seed=0,
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.parent / f"synthetic-{args.interactions}.parquet"
    pq.write_table(generate_synthetic(cfg), src)
    meta = prepare(src, out, PrepareOptions(k_core=5), overwrite=True)
    src.unlink()
    return meta


# --- the two sources -----------------------------------------------------------------------------


def dense_matrices(windows, max_len: int) -> dict:
    """The old training matrices, from the windows: item_seq (S, max_len), seq_len (S,), target
    (S,) or (S, max_len), int64, filled CHUNK rows at a time."""
    import numpy as np

    from echomamba_dist.data.splits import window_batch

    n = len(windows)
    item_seq = np.empty((n, max_len), dtype=np.int64)
    seq_len = np.empty(n, dtype=np.int64)
    target = np.empty((n,) if windows.mode == "prefix" else (n, max_len), dtype=np.int64)
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        item_seq[a:b], seq_len[a:b], target[a:b] = window_batch(windows, np.arange(a, b), max_len=max_len)
    return {"item_seq": item_seq, "seq_len": seq_len, "target": target}


def dense_source(windows, max_len: int, **kwargs):
    """A `BatchSource` whose batches are rows indexed out of the dense matrices, as before."""
    import numpy as np
    import torch

    from echomamba_dist.train.batches import BatchSource

    class DenseSource(BatchSource):
        def to_batch(self, idx, *, device):
            seq_len = self.dense["seq_len"][idx]
            width = int(seq_len.max()) if self.bucketing else self.max_len
            target = self.dense["target"]
            batch = {
                "item_seq": self.dense["item_seq"][idx, :width], "seq_len": seq_len,
                "target": target[idx] if target.ndim == 1 else target[idx, :width],
            }  # fmt: skip
            return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}

    source = DenseSource(windows, max_len=max_len, **kwargs)
    source.dense = dense_matrices(windows, max_len)
    return source


def build_source(cfg, kind: str, dataset, *, rank: int = 0, world_size: int = 1):
    """leave_one_out + the training source of `kind` for `cfg`, as the loop builds it."""
    from echomamba_dist.data.splits import build_windows, leave_one_out
    from echomamba_dist.train.batches import BatchSource, batch_source_options

    loo = leave_one_out(dataset.offsets, dataset.items)
    windows = build_windows(loo.train_offsets, loo.train_items, cfg.sample_mode)
    kwargs = {**batch_source_options(cfg), "rank": rank, "world_size": world_size}
    return BatchSource(windows, **kwargs) if kind == "windows" else dense_source(windows, **kwargs)


def touch(source) -> None:
    """Read every page of the source's CSR arrays. A Ray worker's items are the object store's
    buffer, resident in the worker only once read; training reads them all within an epoch."""
    int(source.windows.items.sum())
    int(source.windows.offsets.sum())


def _config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = experiment(
        args.model, {"path": str(prepared_dir(args))}, max_len=args.max_len, batch_size=args.batch_size,
        model_overrides={"hidden_size": args.hidden},
    )  # fmt: skip
    cfg["train"]["samples"] = args.samples
    cfg["train"]["cpus_per_worker"] = 1.0
    return cfg


def _mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


def run_steps(module, model, optimizer, source, steps: int, device) -> dict[str, Any]:
    """`steps` optimizer steps over the source's epochs (`source.epoch`, this rank's batches; one
    untimed warm-up step first). The batch build time is the time to draw each batch."""
    model.train()
    train_step(model, optimizer, next(source.epoch(0, device=device)), loss_module=module)
    cut = 0.0
    done = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    epoch = 0
    while done < steps:
        batches = source.epoch(epoch, device=device)
        while done < steps:
            t0 = time.perf_counter()
            batch = next(batches, None)
            cut += time.perf_counter() - t0
            if batch is None:
                break
            train_step(model, optimizer, batch, loss_module=module)
            done += 1
        epoch += 1
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"steps": done, "seconds": seconds, "steps_per_second": done / seconds, "batch_build_ms": 1000 * cut / done,
            "cpu_ms_per_step": 1000 * cpu / done}  # fmt: skip


# --- the measurements (worker processes) ---------------------------------------------------------


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    if args.worker == "prepare":
        return _prepare(args)
    case, kind = args.worker.split(":")
    if case == "train-2":
        return _two_workers(args, kind)

    import torch

    from echomamba_dist.config import experiment_from_dict
    from echomamba_dist.data.dataset import load_prepared

    torch.set_num_threads(args.threads)
    cfg = experiment_from_dict(_config(args))
    dataset = load_prepared(prepared_dir(args))
    result: dict[str, Any] = {
        "dataset_mib": (dataset.offsets.nbytes + dataset.items.nbytes) / 2**20,
        "rss_before_mib": _mib(rss_kib("VmRSS")),
    }
    with PeakMemory(cuda=False) as peak:
        source = build_source(cfg, kind, dataset)
        touch(source)
    result |= {
        "samples": source.n,
        "source_peak_added_mib": peak.mib,
        "source_kept_mib": _mib(rss_kib("VmRSS")) - result["rss_before_mib"],
        "peak_method": peak.method,
    }
    result["source_peak_over_dataset"] = peak.mib / result["dataset_mib"]
    if case == "train-1":
        from echomamba_dist.train.loop import LossModule

        device = torch.device("cpu")
        model, optimizer = model_and_optimizer(cfg, dataset.n_items, device)
        result |= run_steps(LossModule(model), model, optimizer, source, args.steps, device)
    result["process_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _ray_train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build the source, take the steps, write this rank's figures."""
    import ray.train

    from echomamba_dist.config import experiment_from_dict
    from echomamba_dist.data.dataset import load_prepared
    from echomamba_dist.distributed.trainer import RaySession
    from echomamba_dist.train.batches import batch_source_options
    from echomamba_dist.train.loop import LossModule

    cfg = experiment_from_dict(config["experiment"])
    session = RaySession(cfg)
    before = _mib(rss_kib("VmRSS"))
    with PeakMemory(cuda=False) as peak:
        if config["kind"] == "windows":  # the library's path: CSR shards from Ray Data
            source = session.batch_source(None, **batch_source_options(cfg))
        else:
            source = build_source(cfg, "dense", load_prepared(cfg.data.path), rank=session.rank, world_size=session.world_size)
        touch(source)
    model, optimizer = model_and_optimizer(cfg, config["n_items"], session.device)
    module = session.prepare_model(LossModule(model))  # DDP, as the loop prepares it
    figures = run_steps(module, model, optimizer, source, config["steps"], session.device)
    figures |= {
        "rank": session.rank, "samples": source.n, "rss_before_mib": before, "source_peak_added_mib": peak.mib,
        "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip
    Path(config["out"], f"rank{session.rank}.json").write_text(json.dumps(figures))
    ray.train.report({"done": 1})


def _two_workers(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    import shutil

    import ray
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from echomamba_dist.config import experiment_from_dict
    from echomamba_dist.distributed.trainer import TRAIN_DATASET, build_train_dataset
    from echomamba_dist.distributed.runtime import init_ray

    # the workers import this script's helpers by name
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])
    cfg = experiment_from_dict(_config(args))
    out = Path(args.work) / f"train-2-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    init_ray(num_cpus=3)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        start = time.perf_counter()
        TorchTrainer(
            _ray_train_worker,
            train_loop_config={"experiment": _config(args), "kind": kind, "steps": args.steps, "out": str(out),
                               "n_items": json.loads((prepared_dir(args) / "meta.json").read_text())["n_items"]},  # fmt: skip
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"sample-memory-{kind}", storage_path=str(out / "runs")),
            datasets={TRAIN_DATASET: build_train_dataset(cfg)} if kind == "windows" else {},
            dataset_config=DataConfig(datasets_to_split=[]),
        ).fit()
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    meta = json.loads((prepared_dir(args) / "meta.json").read_text())
    dataset_mib = ((meta["n_users"] + 1) + meta["n_interactions"]) * 8 / 2**20  # int64 offsets + items
    peak = max(r["source_peak_added_mib"] for r in ranks)
    return {
        "workers": ranks,
        "worker_peak_mib_max": max(r["process_peak_mib"] for r in ranks),
        "dataset_mib": dataset_mib,
        "source_peak_added_mib_max": peak,
        "source_peak_over_dataset": peak / dataset_mib,
        "steps_per_second": min(r["steps_per_second"] for r in ranks),
        "fit_wall_seconds": wall,
    }


# --- the driver ----------------------------------------------------------------------------------


def dense_bytes_per_worker(args: argparse.Namespace) -> int:
    """What the dense matrices of this log take (item_seq, seq_len, target)."""
    import numpy as np

    from echomamba_dist.data.dataset import load_prepared
    from echomamba_dist.data.splits import leave_one_out

    ds = load_prepared(prepared_dir(args))
    lengths = np.diff(leave_one_out(ds.offsets, ds.items).train_offsets)
    if args.samples == "all_positions":
        return int((lengths >= 2).sum()) * (2 * args.max_len + 1) * 8
    return int(np.maximum(lengths - 1, 0).sum()) * (args.max_len + 2) * 8


def memory_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interactions", type=int, default=10_000_000, help="approximate log size")
    p.add_argument("--work", default=str(DEFAULT_WORK), help="where the log is prepared (reused)")
    p.add_argument("--model", default="echomamba4rec")
    p.add_argument("--samples", default="prefix", choices=("prefix", "all_positions"))
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128, help="global batch")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the one-worker runs")
    p.add_argument("--cases", nargs="+", choices=CASES, help="what to measure (default: all; --smoke: train-1)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="which sources (default: both)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    p.add_argument("--smoke", action="store_true", help="a 20,000-interaction log, 3 steps, no Ray case (CI)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.interactions, args.steps, args.batch_size, args.hidden = 20_000, 3, 64, 16
    if args.cases is None:
        args.cases = ["train-1"] if args.smoke else list(CASES)
    return args


def _cmd(args: argparse.Namespace, worker: str) -> list[str]:
    return [
        sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--interactions", str(args.interactions),
        "--work", str(args.work), "--model", args.model, "--samples", args.samples, "--hidden", str(args.hidden),
        "--batch-size", str(args.batch_size), "--max-len", str(args.max_len), "--steps", str(args.steps),
        "--threads", str(args.threads),
    ]  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    if serve_worker(args, _worker):
        return 0
    started = time.perf_counter()
    t0 = time.perf_counter()
    meta = run_worker(_cmd(args, "prepare"), timeout=args.timeout)
    print(f"log: {meta['n_users']:,} users, {meta['n_items']:,} items, {meta['n_interactions']:,} interactions "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    report = {
        **report_header("training-sample memory: windows against dense matrices (issue 18)", __file__, argv, "cpu"),
        "dataset": {"interactions_generated": args.interactions, **{k: meta[k] for k in ("n_users", "n_items", "n_interactions")}},
        "settings": {"model": args.model, "samples": args.samples, "hidden_size": args.hidden, "batch_size": args.batch_size,
                     "max_len": args.max_len, "steps": args.steps, "bucketing": True, "seed": 42,
                     "threads_one_worker": args.threads},  # fmt: skip
        "method": __doc__.split("\n\n", 3)[3].strip(),
        "results": {},
        "load_average_start": load_average(),
    }
    cases = [f"{case}:{kind}" for case in CASES if case in args.cases for kind in KINDS if kind in args.kinds]
    dense_two = 2 * dense_bytes_per_worker(args)
    for case in cases:
        if case == "train-2:dense" and dense_two > memory_available() / 2:
            result = {"skipped": f"two workers' dense matrices ({dense_two / 2**30:.1f} GiB) exceed half the "
                                 f"available memory ({memory_available() / 2**30:.1f} GiB)"}  # fmt: skip
        else:
            t0 = time.perf_counter()
            result = run_worker(_cmd(args, case), timeout=args.timeout)
            result["wall_seconds"] = time.perf_counter() - t0
        result["load_average_after"] = load_average()
        report["results"][case] = result
        save_report(report, args.out, started)
        print(f"{case}: " + ", ".join(f"{k} {v:,.2f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in result.items() if not isinstance(v, (list, dict))), flush=True)  # fmt: skip
    write_json_atomic(args.out, report, sort_keys=False)
    print(table(report))
    return 0


def _fmt(value: Any, spec: str = ",.0f") -> str:
    return "—" if value is None else format(value, spec)


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table (one row a source)."""
    res = report["results"]
    lines = [
        "| source | samples | dataset (CSR) MiB | source peak added MiB | × dataset | kept MiB | 1 worker: peak RSS MiB | steps/s | CPU ms/step | batch build ms | 2 workers: peak RSS MiB (max) | source peak added MiB (max) | × dataset | steps/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        one, two = res.get(f"train-1:{kind}", {}), res.get(f"train-2:{kind}", {})
        src = res.get(f"source:{kind}") or one  # train-1 measures the source too
        lines.append(
            f"| {kind} | {_fmt(src.get('samples'))} | {_fmt(src.get('dataset_mib'))} | {_fmt(src.get('source_peak_added_mib'))} | "
            f"{_fmt(src.get('source_peak_over_dataset'), '.2f')} | {_fmt(src.get('source_kept_mib'))} | "
            f"{_fmt(one.get('process_peak_mib'))} | {_fmt(one.get('steps_per_second'), '.2f')} | {_fmt(one.get('cpu_ms_per_step'), '.1f')} | "
            f"{_fmt(one.get('batch_build_ms'), '.2f')} | "
            f"{'skipped' if 'skipped' in two else _fmt(two.get('worker_peak_mib_max'))} | "
            f"{_fmt(two.get('source_peak_added_mib_max'))} | {_fmt(two.get('source_peak_over_dataset'), '.2f')} | "
            f"{_fmt(two.get('steps_per_second'), '.2f')} |"
        )  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
