"""Helpers shared by the benchmark scripts: hardware and load, the report's common fields, peak
memory, workers, the dataset behind `--data`, a run set up by the library's own pieces, and the
timed training step that every script measures the same way.

Import it from a script in this directory as `from _common import ...` after putting the
directory on `sys.path` (scripts run as `python benchmarks/x.py` have it there already; tests
that load a script with importlib do not). At the top it imports only the standard library and
`echomamba_dist.io` (atomic writes, no torch); torch and the rest of the package are imported
inside the functions that need them, so a driver process can describe the machine without
paying for torch.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from echomamba_dist.io import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
PAPER_TABLE3 = {  # Table 3 of the paper: RTX 4090, Video-Games; seconds, GB, seconds
    "echomamba4rec": {"train_s_per_epoch": 70.2, "memory_gb": 1.61, "inference_s": 0.0252},
    "sasrec": {"train_s_per_epoch": 163.5, "memory_gb": 6.58, "inference_s": 0.3015},
    "bert4rec": {"train_s_per_epoch": 215.8, "memory_gb": 6.68, "inference_s": 0.3218},
    "mamba4rec": {"train_s_per_epoch": 98.8, "memory_gb": 1.41, "inference_s": 0.0305},
}
# The tiny synthetic dataset of the smoke runs (`--smoke`, `--cpu-smoke`).
SMOKE_SYNTHETIC = {"n_users": 120, "n_items": 60, "n_topics": 4, "mean_length": 8.0, "min_length": 5}


# --- the machine ---------------------------------------------------------------------------------


def cpu_model(fallback: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo; where it names none, `fallback` (by default what
    `platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return fallback if fallback is not None else platform.processor() or platform.machine()


def memory_gib() -> float:
    """The machine's physical memory in GiB, to one decimal."""
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages, rounded (other jobs share this machine)."""
    return [round(v, 2) for v in os.getloadavg()]


def hardware(device: str = "cpu", *, fields: tuple[str, ...] | None = None) -> dict[str, Any]:
    """CPU, cores, memory, GPU (when `device` is cuda; "auto": when there is one) and software
    versions, for a report; `fields` keeps only those keys (in that order)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": memory_gib(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import numba

        info["numba"] = numba.__version__
    except ImportError:
        info["numba"] = None
    return info if fields is None else {k: info[k] for k in fields}


def git_commit() -> dict[str, Any]:
    """{"commit": HEAD (the library's `tracking.git_commit`) or None, "dirty": whether the tree
    has uncommitted changes, or None where git cannot say}."""
    from echomamba_dist.train.tracking import git_commit as head

    commit = head()
    try:
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=30)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        dirty = None
    return {"commit": None if commit == "unknown" else commit, "dirty": dirty}


def command_line(script: str | Path, argv: list[str]) -> str:
    """`python benchmarks/<script> <args>` as the user typed it (relative to the repo)."""
    script = Path(script).resolve()
    try:
        shown = script.relative_to(REPO)
    except ValueError:
        shown = script
    return " ".join(["python", str(shown), *argv])


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --- the report every script writes --------------------------------------------------------------


def report_header(benchmark: str, script: str | Path, argv: list[str] | None, device: str) -> dict[str, Any]:
    """The fields a report starts with: `benchmark` (what it measures), the command (`argv` as
    given to `main`, or the process's own arguments when None), the date, the commit and the
    hardware (`device`: "cpu" or "cuda"). A script adds its own fields after these."""
    return {
        "benchmark": benchmark,
        "command": command_line(script, sys.argv[1:] if argv is None else list(argv)),
        "date": utc_now(),
        "git": git_commit(),
        "hardware": hardware(device),
    }


def save_report(report: dict[str, Any], path: Path, started: float) -> None:
    """Stamp `report` with the load average now and the wall time since `started`
    (`time.perf_counter()`), then write it to `path` atomically; called after every measurement,
    so that an interrupted run keeps what it measured."""
    report["load_average_end"] = load_average()
    report["wall_seconds"] = time.perf_counter() - started
    write_json_atomic(path, report, sort_keys=False)  # in the order the script built it


# --- peak memory ---------------------------------------------------------------------------------


def rss_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: the peak), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory added while the block runs, in MiB (`.mib`), and how it was measured.

    CUDA: `torch.cuda.max_memory_allocated` after resetting the peak, minus what was allocated
    before. CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
    minus its resident set before: what the block added at its peak, allocator caching included.
    Where clear_refs is unavailable, `ru_maxrss` (the peak since the process started) is used.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.mib: float | None = None
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._reset = reset_peak_rss()
            self._base = rss_kib("VmRSS") or 0
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self._base) / 2**20
            self.method = "torch.cuda.max_memory_allocated minus memory_allocated before"
        elif self._reset and rss_kib("VmHWM") is not None:
            self.mib = (rss_kib("VmHWM") - self._base) / 1024
            self.method = "VmHWM after clear_refs=5, minus VmRSS before"
        else:
            self.mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._base) / 1024
            self.method = "ru_maxrss minus VmRSS before"


# --- worker subprocesses -------------------------------------------------------------------------


def repo_env(**extra: str) -> dict[str, str]:
    """os.environ with the repository first on PYTHONPATH (plus `extra`)."""
    paths = [str(REPO), os.environ.get("PYTHONPATH")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), **extra)


def serve_worker(args: Any, worker) -> bool:
    """The worker side of `run_worker`: when `args.worker` is set (the script was started as a
    worker), print `worker(args)` as the JSON line that `run_worker` reads and return True;
    otherwise do nothing and return False (the script is the driver)."""
    if not args.worker:
        return False
    print(json.dumps(worker(args)))
    return True


def run_worker(cmd: list[str], *, timeout: float | None = None) -> dict[str, Any]:
    """Run a worker command whose last stdout line is a JSON object; return that object.

    On timeout the worker is killed and {"skipped": "..."} is returned; a failing worker raises.

    Raises:
        RuntimeError: the worker exited non-zero (the tail of its stderr is in the message).
    """
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=repo_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"over the time budget of {timeout:g} s (worker killed)"}
    if out.returncode != 0:
        raise RuntimeError(f"worker {' '.join(cmd[1:])} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- what every script measures: training steps of the real loop, and batch inference ------------


def sync(device) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def train_step(model, optimizer, batch: dict, *, autocast_dtype=None, loss_module=None) -> float:
    """One optimizer step as `train_per_worker` takes it (`echomamba_dist.train.loop.train_step`).

    `loss_module` is what computes the loss (`LossModule(model)`, maybe compiled); returns the loss.
    """
    from echomamba_dist.train.loop import LossModule
    from echomamba_dist.train.loop import train_step as loop_step

    module = loss_module if loss_module is not None else LossModule(model)
    return loop_step(module, model, optimizer, batch, autocast=autocast_dtype)


def sample_batches(source, epoch: int, n: int) -> list[tuple[Any, int]]:
    """Up to `n` batches of an epoch that stand for all of it: [(indices, weight)], weights summing
    to the epoch's step count.

    With n >= the epoch's steps, every batch with weight 1 (the whole epoch). Otherwise the
    batches are sorted by width (their longest sequence: what a bucketed step costs) and cut
    into n strata of near-equal size; the median-width batch of each stratum stands for its
    stratum (weight = its size). Without bucketing every batch is max_len wide, so this is a
    plain extrapolation from n steps.
    """
    import numpy as np

    batches = source.batch_indices(epoch)
    if n >= len(batches):
        return [(b, 1) for b in batches]
    lengths = source.lengths()
    widths = np.array([lengths[b].max() * 1_000_000 + len(b) for b in batches])  # width, then size
    order = np.argsort(widths, kind="stable")
    strata = np.array_split(order, n)
    return [(batches[s[len(s) // 2]], len(s)) for s in strata]


def padding_stats(source, epoch: int) -> dict[str, float]:
    """Over a whole epoch: real tokens, padded tokens, their fraction, the mean batch width."""
    import numpy as np

    lengths = source.lengths()
    max_len = source.max_len
    real = padded = 0
    widths = []
    for b in source.batch_indices(epoch):
        width = int(lengths[b].max()) if source.bucketing else max_len
        widths.append(width)
        real += int(lengths[b].sum())
        padded += width * len(b)
    return {
        "real_tokens": real,
        "batch_tokens": padded,
        "padding_fraction": 1.0 - real / padded if padded else 0.0,
        "mean_width": float(np.mean(widths)) if widths else 0.0,
    }


def time_epoch(
    model,
    optimizer,
    source,
    *,
    steps: int,
    device,
    epoch: int = 0,
    autocast_dtype=None,
    loss_module=None,
    warmup: int = 1,
) -> dict[str, Any]:
    """Training time of one epoch of `source`: measured (steps >= the epoch's) or estimated.

    Runs `warmup` untimed steps on the epoch's first batch, then the batches of
    `sample_batches(source, epoch, steps)`, each timed from building the batch to the end of its
    optimizer step (as the loop's epoch time). Returns the estimate (sum of weight * time), the
    step count, whether it is extrapolated, and the raw per-step figures.
    """
    model.train()
    picked = sample_batches(source, epoch, steps)
    first = source.to_batch(source.batch_indices(epoch)[0], device=device)
    for _ in range(warmup):
        train_step(model, optimizer, first, autocast_dtype=autocast_dtype, loss_module=loss_module)
    sync(device)
    times, widths, weights = [], [], []
    lengths = source.lengths()
    for idx, weight in picked:
        t0 = time.perf_counter()
        batch = source.to_batch(idx, device=device)
        train_step(model, optimizer, batch, autocast_dtype=autocast_dtype, loss_module=loss_module)
        sync(device)
        times.append(time.perf_counter() - t0)
        widths.append(int(lengths[idx].max()) if source.bucketing else int(source.max_len))
        weights.append(int(weight))
    total_steps = len(source.batch_indices(epoch))
    return {
        "epoch_seconds": float(sum(w * t for w, t in zip(weights, times))),
        "steps_per_epoch": total_steps,
        "steps_timed": len(times),
        "extrapolated": len(times) < total_steps,
        "step_seconds": times,
        "step_widths": widths,
        "step_weights": weights,
    }


def time_inference(model, item_seq, seq_len, *, reps: int, autocast_dtype=None) -> dict[str, Any]:
    """`score_all` over all items for one batch of users, in eval mode without gradients:
    one warm-up call, then the median of `reps` timed calls (seconds)."""
    import statistics

    import torch

    model.eval()
    device = item_seq.device
    times = []
    with torch.no_grad(), torch.autocast(
        device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    ):
        for i in range(reps + 1):
            sync(device)
            t0 = time.perf_counter()
            scores = model.score_all(item_seq, seq_len)
            sync(device)
            if i:
                times.append(time.perf_counter() - t0)
    del scores
    return {"seconds": statistics.median(times), "all_seconds": times}


def inference_batch(eval_set, n_users: int, *, device, seed: int = 0):
    """`n_users` users drawn from an EvalSet (seeded; all of them when fewer), trimmed to their
    longest history as `evaluate_model` trims each batch: (item_seq, seq_len) tensors."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    n = len(eval_set.seq_len)
    pick = rng.choice(n, size=min(n_users, n), replace=False) if n_users < n else np.arange(n)
    seq_len = eval_set.seq_len[pick]
    width = int(seq_len.max())
    item_seq = np.ascontiguousarray(eval_set.item_seq[pick, :width])
    return torch.from_numpy(item_seq).to(device), torch.from_numpy(seq_len).to(device)


def scan_inputs(batch: int, d_inner: int, length: int, d_state: int, device, *, seed: int = 0,
                delta_scale: float = 1.0, a_scale: float = 1.0, random_d: bool = False) -> dict[str, Any]:
    """Inputs of `selective_scan`, shaped and scaled as the Mamba block feeds it (seeded):
    u, delta, B, C, z ~ N(0, 1) (delta times `delta_scale`); A = -(1..N) per channel times
    `a_scale`; D ~ N(0, 1) with `random_d`, else 1; delta_bias = softplus^-1(U(0.001, 0.1)).
    Plain tensors on `device` (the caller makes them leaves that require grad)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dt = torch.empty(d_inner).uniform_(0.001, 0.1, generator=g)
    raw = {
        "u": torch.randn(batch, d_inner, length, generator=g),
        "delta": torch.randn(batch, d_inner, length, generator=g) * delta_scale,
        "A": -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1) * a_scale,
        "B": torch.randn(batch, d_state, length, generator=g),
        "C": torch.randn(batch, d_state, length, generator=g),
    }
    raw["D"] = torch.randn(d_inner, generator=g) if random_d else torch.ones(d_inner)
    raw["z"] = torch.randn(batch, d_inner, length, generator=g)
    raw["delta_bias"] = dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt)
    return {k: raw[k].to(device) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")}


# --- the dataset behind `--data` -----------------------------------------------------------------


def resolve_data(
    spec: str, *, smoke: bool, cache_root: Path = REPO / "prepared"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`--data` -> (the config's `data` section without max_len, a description of the dataset).

    `spec` is a prepared directory, a raw log or "synthetic" (`smoke`: the tiny SMOKE_SYNTHETIC,
    whatever `spec` says). A raw file is prepared (in this process, default options: dedup,
    5-core) into `cache_root/<stem>`, and reused while its recorded source sha256 matches the file.
    """
    if smoke or spec == "synthetic":
        from echomamba_dist.config import DataSettings, from_dict
        from echomamba_dist.data.dataset import load_dataset

        data = {"synthetic": dict(SMOKE_SYNTHETIC)} if smoke else {}
        meta = load_dataset(from_dict(DataSettings, data)).meta
        return data, _describe("synthetic-smoke" if smoke else "synthetic", None, meta)
    path = Path(spec).expanduser().resolve()
    if path.is_dir():
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        return {"path": str(path)}, _describe(path.name, path, meta)
    if not path.is_file():
        raise SystemExit(f"--data {spec}: not a prepared directory, a file, or 'synthetic'")
    from echomamba_dist.data.prepare import file_sha256, prepare

    sha = file_sha256(path)
    out = cache_root / path.stem
    meta_file = out / "meta.json"
    if meta_file.is_file() and json.loads(meta_file.read_text())["source"].get("sha256") == sha:
        meta = json.loads(meta_file.read_text())
    else:
        print(f"preparing {path} into {out}", flush=True)
        meta = prepare(path, out, overwrite=True)
    return {"path": str(out)}, _describe(path.stem, out, meta)


def shown_path(path: str | Path) -> str:
    """A path as the reports record it, never an absolute path of this machine: relative to the
    repository, else to the working directory, else its last two parts (a run's storage
    directory and its name, as `echomamba train` lays them out: `runs/beauty-sasrec`)."""
    p = Path(path).expanduser().resolve()
    for root in (REPO, Path.cwd().resolve()):
        if p.is_relative_to(root):
            return str(p.relative_to(root))
    if p.is_relative_to(REPO.parent):  # beside the checkout, as ../shared/data is
        return os.path.relpath(p, REPO)
    return str(Path(*p.parts[-2:]))


def shown_arg(word: str) -> str:
    """A command-line word as a report records it: an absolute path, or the absolute path after
    `KEY=` (`data.path=/x/y`, `LABEL=/x/best.yaml`), as a `shown_path`; anything else as it is."""
    key, sep, value = word.rpartition("=")
    if sep and Path(value).is_absolute():
        return f"{key}={shown_path(value)}"
    return shown_path(word) if Path(word).is_absolute() else word


def _describe(name: str, prepared: Path | None, meta: dict[str, Any]) -> dict[str, Any]:
    """The report's `dataset` entry: name, prepared directory, source and the dataset's counts
    (paths as `shown_path`s)."""
    source = dict(meta.get("source") or {})
    if source.get("path"):
        source["path"] = shown_path(source["path"])
    return {
        "name": name,
        "prepared": shown_path(prepared) if prepared else None,
        "source": source,
        **{k: meta.get(k) for k in ("n_users", "n_items", "n_interactions", "avg_length", "options")},
    }


# --- one model on one dataset, as the training loop sets it up ------------------------------------


def experiment(
    model_name: str,
    data_section: dict[str, Any],
    *,
    max_len: int = 50,
    batch_size: int = 2048,
    eval_batch_size: int = 4096,
    bucketing: bool = True,
    device: str = "cpu",
    precision: str = "fp32",
    seed: int = 42,
    model_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The experiment dict of a benchmark run: the paper's settings (hidden 64, dropout 0.2,
    Adam 1e-3, batch 2048, max length 50), Ray and tracking off. `max_len` is the data's, which
    the model takes."""
    model = {"name": model_name, "hidden_size": 64, "dropout": 0.2, **(model_overrides or {})}
    return {
        "data": {**data_section, "max_len": max_len, "bucketing": bucketing},
        "model": model,
        "train": {
            "batch_size": batch_size, "eval_batch_size": eval_batch_size, "lr": 1e-3, "seed": seed,
            "device": device, "precision": precision, "ray": False, "progress": False,
        },  # fmt: skip
        "tracking": {"enabled": False},
    }


def training_data(cfg):
    """The TrainingData of an ExperimentConfig, loaded as `train_per_worker` loads it (seeded,
    on the run's own samples, `cfg.sample_mode`)."""
    from echomamba_dist.train.batches import build_training_data
    from echomamba_dist.train.loop import seed_everything

    seed_everything(cfg.train.seed)
    return build_training_data(cfg, cfg.sample_mode)


def model_and_optimizer(cfg, n_items: int, device):
    """(model on `device`, Adam over its parameter groups) for an ExperimentConfig, with the
    initial weights `train_per_worker` draws (seeded with `train.seed` just before)."""
    import torch

    from echomamba_dist.models.registry import build_model
    from echomamba_dist.train.loop import seed_everything

    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, n_items=n_items).to(device)
    optimizer = torch.optim.Adam(model.param_groups(cfg.train.weight_decay), lr=cfg.train.lr)
    return model, optimizer


def build_run(config, *, data=None):
    """(cfg, training data, model on its device, Adam, BatchSource) for an experiment dict (or
    an ExperimentConfig), set up as `train_per_worker` sets them up (same seeds, same samples,
    same batches). Pass `data` (a TrainingData of the same dataset, max_len and sample mode) to
    skip loading it again."""
    from echomamba_dist.config import ExperimentConfig, experiment_from_dict
    from echomamba_dist.train.batches import BatchSource, batch_source_options
    from echomamba_dist.train.session import resolve_device

    cfg = config if isinstance(config, ExperimentConfig) else experiment_from_dict(config)
    if data is None:
        data = training_data(cfg)
    model, optimizer = model_and_optimizer(cfg, data.n_items, resolve_device(cfg.train.device))
    source = BatchSource(data.samples, **batch_source_options(cfg))
    return cfg, data, model, optimizer, source


def warm_up(model_name: str, device, *, autocast_dtype=None, model_overrides: dict[str, Any] | None = None) -> None:
    """One training step and one scoring call of a tiny model of the same kind, so that one-off
    costs (Numba cache load or compile, oneDNN / cuBLAS initialisation, the CUDA context) land
    before any figure is taken."""
    import torch

    from echomamba_dist.models.registry import build_model, model_class, model_config_class

    cls = model_config_class(model_name)
    kwargs = {k: v for k, v in (model_overrides or {}).items() if k in cls.__dataclass_fields__}
    if "max_len" in cls.__dataclass_fields__:
        kwargs["max_len"] = 8
    model = build_model(cls(**kwargs), 10).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seq = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]], device=device)
    seq_len = torch.tensor([3, 2], device=device)
    if model_class(model_name).sample_mode == "prefix":
        target = torch.tensor([4, 6], device=device)
    else:
        target = torch.tensor([[2, 3, 7, 0], [5, 8, 0, 0]], device=device)
    train_step(model, optimizer, {"item_seq": seq, "seq_len": seq_len, "target": target}, autocast_dtype=autocast_dtype)
    time_inference(model, seq, seq_len, reps=1, autocast_dtype=autocast_dtype)
    sync(device)
