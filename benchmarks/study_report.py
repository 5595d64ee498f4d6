"""A hyperparameter study's trials as tables and a plot, finished or still running.

    python benchmarks/study_report.py --study-config jobs/configs/tune-beauty-cpu.yaml \
        --study runs/tune/beauty-echomamba4rec-cpu --out docs/results/tune-beauty-cpu

Reads the study directory that `echomamba tune` writes (`tune.storage_path/tune.name`): every
trial's run directory under `trials/` (its newest readable checkpoint, read by the study's own
`trial_history`: the epochs it ran, its validation history, the best validation metric and epoch,
and its config, from which the searched parameters are read back), and, once the study has ended, its `results.parquet` (trial statuses) and
`best.yaml`. Trains and measures nothing.

Writes into `--out` (each file atomically):
- `trials.json`: the command, date, commit, the study's search space, one record per trial (its
  parameters, epochs, best epoch, best validation metric, validation history, status), and whether
  the study has ended;
- `trials.md`: the same as a table, best trial first;
- `search.png`: the best validation metric of every trial against each searched parameter (one
  panel a parameter; log axes for log-uniform ones), and every trial's validation curve;
- `results.parquet` and `best.yaml`: the study's own, once it has ended, with the paths of the machine
  they were made on shown relative to the repository (`run_dir`; `data.path`, `run.storage_path`).

Selection is on validation only, as in the study: the test split is not read here.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from _common import command_line, git_commit, shown_arg, shown_path, utc_now  # noqa: E402

from echomamba_dist.config import flatten  # noqa: E402
from echomamba_dist.distributed.tune.study import (  # noqa: E402
    BEST_FILE,
    RESULTS_FILE,
    TRIALS_DIR,
    TUNER_DIR,
    trial_history,
)
from echomamba_dist.io import atomic_file, write_json_atomic, write_text_atomic  # noqa: E402
from echomamba_dist.train.checkpoint import read_config  # noqa: E402


def search_space(study_config: Path) -> tuple[dict[str, Any], str]:
    """The study file's `search` section and the metric it selects on (`train.metric`)."""
    try:
        raw = yaml.safe_load(study_config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"{study_config}: cannot read the study file: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("search"), dict) or not raw["search"]:
        raise SystemExit(f"{study_config}: no `search` section: not a study file")
    metric = (raw.get("train") or {}).get("metric", "ndcg@10")
    return raw["search"], metric


def trial_records(study_dir: Path, search: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """One record per trial directory that has a checkpoint, best validation metric first."""
    trials = study_dir / TRIALS_DIR
    if not trials.is_dir():
        raise SystemExit(f"{study_dir}: no {TRIALS_DIR}/ directory: not a study directory of `echomamba tune`")
    statuses = final_statuses(study_dir)
    records = []
    for run_dir in sorted(p for p in trials.iterdir() if p.is_dir()):
        hist = trial_history(run_dir)  # the newest readable checkpoint
        if hist is None:
            continue  # a trial that has not finished its first epoch yet
        config = flatten(read_config(hist["checkpoint"]))
        trial_id = run_dir.name.removeprefix("trial-")
        history = [h.get(f"val_{metric}") for h in hist["history"]]
        finished = (run_dir / "metrics.json").is_file()  # the loop ran to its end (or its patience)
        status = statuses.get(trial_id, "UNKNOWN")
        if status == "TERMINATED":  # Tune's word for both; the checkpoints tell them apart
            status = "COMPLETED" if finished else "STOPPED_EARLY"
        records.append({
            "trial_id": trial_id,
            "status": status,
            "epochs": hist["epochs"],
            "best_epoch": hist["best_epoch"],
            f"val_{metric}": hist["best"],
            "finished": finished,
            "params": {key: config.get(key) for key in search},
            "valid_history": history,
            "epoch_seconds": [h.get("epoch_seconds") for h in hist["history"]],
        })
    if not records:
        raise SystemExit(f"{trials}: no trial has a checkpoint yet")
    records.sort(key=lambda r: (-r[f"val_{metric}"], r["trial_id"]))
    return records


def final_statuses(study_dir: Path) -> dict[str, str]:
    """trial id -> status: from the study's results.parquet once it has ended (COMPLETED,
    STOPPED_EARLY, ERROR, NO_RESULT), else from Tune's newest experiment state in `tuner/` (RUNNING,
    PENDING, TERMINATED, ERROR, as of its last save; {} when there is none to read)."""
    path = study_dir / RESULTS_FILE
    if path.is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["trial_id", "status"]).to_pydict()
        return dict(zip(table["trial_id"], table["status"]))
    # one file per (re)start of the study, named by its start time: the newest name is the current
    # state (their modification times tell nothing: Tune's sync rewrites them all at once)
    states = sorted((study_dir / TUNER_DIR).glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        trial_data = json.loads(states[-1].read_text(encoding="utf-8"))["trial_data"]
        trials = [json.loads(entry[0]) for entry in trial_data]
        return {t["trial_id"]: str(t["status"]) for t in trials}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return {}  # a state file of another Ray version: statuses unknown


def copy_results(source: Path, target: Path) -> None:
    """The study's results.parquet, its `run_dir` column shown as `shown_path`s (no path of the
    machine it ran on goes into the repository)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    if "run_dir" in table.column_names:
        shown = pa.array([shown_path(p) if p else p for p in table.column("run_dir").to_pylist()], pa.string())
        table = table.set_column(table.column_names.index("run_dir"), "run_dir", shown)
    with atomic_file(target, what="study results") as tmp:
        pq.write_table(table, tmp)


def copy_best(source: Path, target: Path, *, study_dir: Path) -> None:
    """The study's best.yaml with `data.path` and `run.storage_path` as `shown_path`s, and its
    header naming the study directory the same way; otherwise as the study wrote it."""
    text = source.read_text(encoding="utf-8")
    header = [line for line in text.splitlines() if line.startswith("#")]
    config = yaml.safe_load(text)
    for section, key in (("data", "path"), ("run", "storage_path")):
        value = (config.get(section) or {}).get(key)
        if isinstance(value, str) and Path(value).is_absolute():
            config[section][key] = shown_path(value)
    header = [line.replace(str(study_dir.resolve()), shown_path(study_dir)) for line in header]
    write_text_atomic(target, "\n".join(header + [yaml.safe_dump(config, sort_keys=False)]), what="best config")


def render_markdown(report: dict[str, Any]) -> str:
    metric = report["metric"]
    keys = list(report["search"])
    state = "ended" if report["ended"] else f"still running ({len(report['trials'])} trials with a checkpoint so far)"
    lines = [
        f"# Study {report['study']}: validation {metric.upper()} per trial",
        "",
        f"Study {state}. Command: `{report['command']}` ({report['date']}, commit {report['git'].get('commit', '?')[:7]}).",
        f"Selection is on validation {metric.upper()} only (the best epoch of each trial).",
        "",
        "| trial | status | epochs | best epoch | val " + metric.upper() + " | "
        + " | ".join(k.split(".", 1)[-1] for k in keys) + " |",
        "|" + "---|" * (5 + len(keys)),
    ]
    for r in report["trials"]:
        cells = [r["trial_id"], r["status"], str(r["epochs"]), str(r["best_epoch"] + 1), f"{r[f'val_{metric}']:.4f}"]
        cells += [_cell(r["params"][k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Best epoch counts from 1. STOPPED_EARLY: stopped by ASHA; COMPLETED: ran to its patience "
              "or its epoch limit; RUNNING: running when the study last saved its state."]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "none" if value is None else str(value)


def plot(report: dict[str, Any], path: Path) -> None:
    """The best validation metric against each searched parameter, and every trial's curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    metric = report["metric"]
    trials, search = report["trials"], report["search"]
    panels = len(search) + 1
    cols = 4
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    best = [r[f"val_{metric}"] for r in trials]
    colour_of = {"COMPLETED": "tab:green", "STOPPED_EARLY": "tab:gray", "ERROR": "tab:red"}
    colours = [colour_of.get(r["status"], "tab:blue") for r in trials]
    jitter = random.Random(0)
    for ax, (key, dist) in zip(axes.flat, search.items()):
        values = [r["params"][key] for r in trials]
        kind = next(iter(dist)) if isinstance(dist, dict) and dist else "choice"
        if kind == "choice":
            categories = [str(v) for v in dist["choice"]]
            xs = [categories.index(str(v)) + jitter.uniform(-0.15, 0.15) if str(v) in categories else float("nan")
                  for v in values]
            ax.set_xticks(range(len(categories)), ["none" if c == "None" else c for c in categories])
            ax.set_xlim(-0.5, len(categories) - 0.5)
        else:
            xs = [float(v) if v is not None else float("nan") for v in values]
            if kind == "loguniform":
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
        ax.scatter(xs, best, c=colours, s=18)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
    curves = axes.flat[len(search)]
    for r in trials:
        points = [(e + 1, v) for e, v in enumerate(r["valid_history"]) if v is not None]
        if points:
            curves.plot(*zip(*points), linewidth=0.9)
    curves.set_title(f"val {metric.upper()} per epoch, every trial", fontsize=9)
    curves.set_xlabel("epoch", fontsize=8)
    curves.tick_params(labelsize=7)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"best val {metric.upper()}", fontsize=8)
    state = "ended" if report["ended"] else "running"
    fig.suptitle(f"study {report['study']} ({len(trials)} trials, {state}); green: ran to its patience or "
                 "epoch limit, gray: stopped by ASHA, blue: running, red: failed", fontsize=9)
    fig.tight_layout()
    with atomic_file(path, what="study plot") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--study-config", type=Path, required=True, help="the study file `echomamba tune` ran")
    parser.add_argument("--study", type=Path, required=True, help="the study directory (tune.storage_path/tune.name)")
    parser.add_argument("--out", type=Path, required=True, help="directory for trials.json, trials.md, search.png")
    parser.add_argument("--no-plot", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    search, metric = search_space(args.study_config)
    trials = trial_records(args.study, search, metric)
    ended = (args.study / RESULTS_FILE).is_file()
    report = {
        "study": args.study.name,
        "command": command_line(__file__, [shown_arg(w) for w in (sys.argv[1:] if argv is None else argv)]),
        "date": utc_now(),
        "git": git_commit(),
        "study_config": shown_path(args.study_config),
        "metric": metric,
        "search": search,
        "ended": ended,
        "trials": trials,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if ended:
        copy_results(args.study / RESULTS_FILE, args.out / RESULTS_FILE)
        if (args.study / BEST_FILE).is_file():
            copy_best(args.study / BEST_FILE, args.out / BEST_FILE, study_dir=args.study)
    if not args.no_plot:
        plot(report, args.out / "search.png")
    report["seconds"] = time.perf_counter() - started
    write_json_atomic(args.out / "trials.json", report, sort_keys=False)
    markdown = render_markdown(report)
    write_text_atomic(args.out / "trials.md", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
