"""Table 2 of the EchoMamba4Rec paper, reproduced: eight models x several seeds on one dataset.

    python benchmarks/table2.py --data ../shared/data/amazon-beauty.txt --seeds 1 2 3 \
        --out docs/results/table2-beauty.json
    python benchmarks/table2.py --data ../shared/data/amazon-beauty.txt --models echomamba4rec \
        --variants --seeds 1 2 3 --out docs/results/table2-beauty-variants.json
    python benchmarks/table2.py --data ../shared/data/amazon-video-games.txt --seeds 1 2 3 \
        --out docs/results/table2-video-games.json
    python benchmarks/table2.py --smoke --out /tmp/table2-smoke.json   # CI: tiny data, 1 epoch
    python benchmarks/table2.py --collect runs/beauty-sasrec runs/beauty-echomamba4rec \
        --out docs/results/table2-beauty-cli.json   # tabulate runs trained elsewhere

`--data` is a prepared directory, a raw log (prepared once, in this process, into
`prepared/<file stem>`, reused while the source's sha256 matches), or `synthetic`.

Every (model, seed) runs through `train_per_worker`, the Ray-free per-worker training function
(world size 1, `train.ray` off), so one GPU or one CPU runs the whole table without Ray. The
settings are the paper's (§4.1): hidden 64, dropout 0.2, Adam lr 1e-3, batch 2048, evaluation
batch 4096, max length 50, at most 300 epochs with early stopping on validation NDCG@10
(patience 10), leave-one-out, full ranking over all items. `--epochs` caps the epochs (a capped
run that did not stop early is marked as such in the tables).

Runs live in `--runs` (default `runs/table2/<dataset>`), one directory per (model, variant, seed)
with a stable name, so an interrupted harness resumes: a finished run's result is reused
(`table2-run.json`, when its config is unchanged), an unfinished one continues from its last
checkpoint. `--fresh` deletes them first.

`--variants` adds the EchoMamba4Rec variant study: combine sum/concat, readout last/ends,
filter off, bidirectional off, chosen on validation NDCG@10 (mean over seeds); the chosen
variant's test metrics then stand in the EchoMamba4Rec row of the table.

Writes `--out` (JSON: every run, mean and standard deviation over seeds, the paper's numbers, the
commit, hardware, command and wall time) and a markdown table beside it (same stem, `.md`),
both replaced atomically after every run, so a long harness shows its progress.

`--collect RUN_DIR ...` trains nothing: it reads finished runs made elsewhere (`echomamba train
--config jobs/configs/beauty-<model>.yaml`, a Ray job, another machine) from their `metrics.json`
and checkpoint configs, checks that they share the dataset and the paper's settings, groups the
seeds of each model, and writes the same JSON and markdown, with one line per run. EchoMamba4Rec
runs with the settings of a study variant (`--set model.combine=concat`, ...) form the variant
study, as `--variants` does; `--variant-epochs N` compares the variants on the first N epochs of
each run, for variants capped at N epochs for time beside a default trained to early stopping.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, git_commit, hardware, resolve_data, shown_path, utc_now  # noqa: E402

from echomamba_dist.io import write_json_atomic, write_text_atomic  # noqa: E402

MODEL_ORDER = [
    "narm",
    "gru4rec",
    "sasrec",
    "bert4rec",
    "mamba4rec",
    "bimamba4rec",
    "bimambaformer4rec",
    "echomamba4rec",
]
DISPLAY = {
    "narm": "NARM",
    "gru4rec": "GRU4Rec",
    "sasrec": "SASRec",
    "bert4rec": "BERT4Rec",
    "mamba4rec": "Mamba4Rec",
    "bimamba4rec": "Bi-Mamba4Rec",
    "bimambaformer4rec": "Bi-Mambaformer4Rec",
    "echomamba4rec": "EchoMamba4Rec",
}
METRICS = ["hr@10", "ndcg@10", "mrr@10"]
ROWS = {"prefix": "prefix", "all_positions": "all positions"}  # `train.samples`, as the tables say it

# EchoMamba4Rec variants of the study; "sum-last" is the default model (the table's own run).
ECHO_VARIANTS: dict[str, dict[str, Any]] = {
    "sum-last": {},
    "concat-last": {"combine": "concat"},
    "sum-ends": {"readout": "ends"},
    "concat-ends": {"combine": "concat", "readout": "ends"},
    "no-filter": {"filter": False},
    "unidirectional": {"bidirectional": False},
}
DEFAULT_VARIANT = "sum-last"


def echo_variant(model_section: dict[str, Any]) -> str | None:
    """Which variant of the study an EchoMamba4Rec model section is (None: none of them).

    Only the settings the study varies count; the section may leave defaults out."""
    from echomamba_dist.models.echomamba4rec import EchoMamba4RecConfig

    varied = {k for overrides in ECHO_VARIANTS.values() for k in overrides}
    defaults = EchoMamba4RecConfig()
    differs = {k: model_section[k] for k in varied if k in model_section and model_section[k] != getattr(defaults, k)}
    return next((name for name, overrides in ECHO_VARIANTS.items() if overrides == differs), None)

PAPER_CITATION = (
    "EchoMamba4Rec paper, Table 2 (HR@10, NDCG@10, MRR@10; Amazon-Beauty and Amazon-Video-Games)"
)
PAPER: dict[str, dict[str, tuple[float, float, float]]] = {
    "beauty": {
        "narm": (0.0627, 0.0347, 0.0262),
        "gru4rec": (0.0606, 0.0332, 0.0249),
        "sasrec": (0.0739, 0.0404, 0.0302),
        "bert4rec": (0.0711, 0.0426, 0.0309),
        "mamba4rec": (0.0621, 0.0369, 0.0292),
        "bimamba4rec": (0.0781, 0.0423, 0.0313),
        "bimambaformer4rec": (0.0773, 0.0304, 0.0412),
        "echomamba4rec": (0.0833, 0.0438, 0.0318),
    },
    "video-games": {
        "narm": (0.1032, 0.0530, 0.0379),
        "gru4rec": (0.1030, 0.0536, 0.0380),
        "sasrec": (0.1203, 0.0561, 0.0366),
        "bert4rec": (0.1106, 0.0508, 0.0324),
        "mamba4rec": (0.1057, 0.0587, 0.0441),
        "bimamba4rec": (0.1200, 0.0580, 0.0392),
        "bimambaformer4rec": (0.1205, 0.0451, 0.0626),
        "echomamba4rec": (0.1254, 0.0633, 0.0445),
    },
}
DATASET_NOTES = {
    "video-games": (
        "Our `amazon-video-games.txt` is a different version of the dataset than the paper's: "
        "24,303 users / 10,672 items / 231,780 interactions here, 14,494 / 6,950 / 132,209 in the "
        "paper's Table 1. The paper's numbers are shown for reference only; they are not directly "
        "comparable."
    ),
}
# The targets on Amazon-Beauty: (model, metric, at least).
TARGETS = {
    "beauty": [
        ("sasrec", "hr@10", 0.0739),
        ("echomamba4rec", "hr@10", 0.0833),
        ("echomamba4rec", "ndcg@10", 0.0438),
    ],
}

SMOKE_MAX_LEN = 20


# ----------------------------------------------------------------------------------------------
# Data (`--data` is resolved by `_common.resolve_data`, shared with table3.py and bucketing.py)


def paper_key(name: str) -> str | None:
    """Which Table 2 column a dataset name belongs to ('beauty', 'video-games'), if any."""
    lowered = name.lower()
    if "beauty" in lowered:
        return "beauty"
    if "video" in lowered:
        return "video-games"
    return None


# ----------------------------------------------------------------------------------------------
# Runs


def run_config(
    model: str,
    overrides: dict[str, Any],
    seed: int,
    *,
    data: dict[str, Any],
    args: argparse.Namespace,
    runs_dir: Path,
    run_name: str,
) -> dict[str, Any]:
    """The experiment dict of one run: the paper's settings, or the smoke sizes."""
    from echomamba_dist.models.registry import model_config_class

    max_len = SMOKE_MAX_LEN if args.smoke else 50
    fields = model_config_class(model).__dataclass_fields__
    model_section = {"name": model, "hidden_size": 64, "dropout": 0.2, **overrides}
    if "max_len" in fields:
        model_section["max_len"] = max_len
    train = {
        "epochs": args.epochs,
        "patience": args.patience,
        "batch_size": 64 if args.smoke else 2048,
        "eval_batch_size": 256 if args.smoke else 4096,
        "lr": 1e-3,
        "metric": "ndcg@10",
        "ks": [10],
        "seed": seed,
        "device": args.device,
        "ray": False,
        "progress": False,
    }
    if cfg_samples(model, args) == "prefix":
        train["samples"] = "prefix"  # RecBole's augmentation, as the paper's baselines were trained
        if model == "bert4rec":
            model_section.setdefault("masking", "append")  # RecBole's BERT4Rec: mask at the end + random
    return {
        "data": {**data, "max_len": max_len},
        "model": model_section,
        "train": train,
        "run": {"name": run_name, "storage_path": str(runs_dir), "resume": True},
        "tracking": {"enabled": args.tracking, "experiment": f"table2-{runs_dir.name}"},
    }


def cfg_samples(model: str, args: argparse.Namespace) -> str:
    """The `train.samples` a harness run of `model` uses under `--samples`."""
    from echomamba_dist.models.registry import model_class

    cls = model_class(model)
    return "prefix" if args.samples == "prefix" and cls.sample_mode != "prefix" and "prefix" in cls.supported_samples else "auto"


def train_one(cfg: dict[str, Any], *, fresh: bool) -> dict[str, Any]:
    """Train one run (or reuse its finished result) and return the harness's record of it."""
    from echomamba_dist.train.loop import train_per_worker

    run_dir = Path(cfg["run"]["storage_path"]) / cfg["run"]["name"]
    record_file = run_dir / "table2-run.json"
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    if record_file.is_file():
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if record.get("config") == cfg:
            return {**record, "reused": True}

    start = time.perf_counter()
    result = train_per_worker(cfg)
    record = run_record(run_dir, cfg, result) | {"wall_seconds_this_session": time.perf_counter() - start}
    write_json_atomic(record_file, record)
    return {**record, "reused": False}


def run_record(run_dir: Path, cfg: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The harness's record of a finished run: its config, its result (metrics.json) and the
    per-epoch times of its newest checkpoint."""
    from echomamba_dist.models.registry import model_class
    from echomamba_dist.train.checkpoint import latest_checkpoint, read_meta

    latest = latest_checkpoint(run_dir)
    history = read_meta(latest)["history"] if latest else []
    epoch_seconds = [h["epoch_seconds"] for h in history]
    metric = cfg["train"].get("metric", "ndcg@10")
    model = cfg["model"]["name"]
    samples = cfg["train"].get("samples", "auto")
    return {
        "config": cfg,
        "model": model,
        "seed": cfg["train"]["seed"],
        "best_epoch": result["best_epoch"],
        "epochs_run": result["epochs_run"],
        "steps": result["steps"],
        "samples": model_class(model).sample_mode if samples == "auto" else samples,
        "stopped_early": stopped_early(result["epochs_run"], result["best_epoch"], cfg["train"]["patience"]),
        "valid": result["valid"],
        "test": result["test"],
        "test_users": result["test_users"],
        "popularity": result["popularity"],
        "seconds_per_epoch": statistics.mean(epoch_seconds) if epoch_seconds else None,
        "train_seconds": sum(epoch_seconds),
        # validation `metric` after each epoch (for comparing runs at the same epoch budget)
        "valid_history": [h.get(f"val_{metric}") for h in history],
        "dataset_fingerprint": result["dataset_fingerprint"],
    }


def stopped_early(epochs_run: int, best_epoch: int, patience: int) -> bool:
    """Whether a run ended on its patience (`patience` epochs after its best, the loop's rule),
    not on an epoch cap: a run resumed with a lower `train.epochs` ends on the cap."""
    return patience > 0 and epochs_run - 1 - best_epoch >= patience


# ----------------------------------------------------------------------------------------------
# Collecting runs made elsewhere (`echomamba train`, Ray jobs, a GPU machine)

# The settings every collected run must share to stand in one table. The epoch cap may differ: a
# run that reached its cap before early stopping is marked † in the table.
SHARED_SETTINGS = {
    "batch_size": ("train", "batch_size"),
    "max_len": ("data", "max_len"),
    "patience": ("train", "patience"),
    "lr": ("train", "lr"),
    "metric": ("train", "metric"),
    "hidden_size": ("model", "hidden_size"),
    "dropout": ("model", "dropout"),
}


def collect_runs(run_dirs: list[Path]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Records of finished training runs, grouped into table entries, and their shared settings.

    A run directory is one `echomamba train` (or harness) run: `metrics.json` from its end and
    the config of its newest checkpoint. Runs of one model with the same samples and model
    settings are seeds of one entry (named after the model, or `model/samples` where one model
    has runs on both kinds of rows). Raises SystemExit naming the directory and what is wrong:
    no metrics.json (not finished), no checkpoint, another dataset, other shared settings.
    """
    from echomamba_dist.train.checkpoint import latest_checkpoint, read_config

    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    settings: dict[str, Any] | None = None
    fingerprint: tuple[Path, str] | None = None
    names: set[str] = set()
    for run_dir in run_dirs:
        metrics_file = run_dir / "metrics.json"
        if not metrics_file.is_file():
            raise SystemExit(f"{run_dir}: no metrics.json: not a finished training run")
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise SystemExit(f"{run_dir}: no checkpoint, so no config to read the run's settings from")
        cfg = read_config(latest)
        try:
            result = json.loads(metrics_file.read_text(encoding="utf-8"))
            record = run_record(run_dir, cfg, result)
            shared = {name: cfg[section][key] for name, (section, key) in SHARED_SETTINGS.items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise SystemExit(f"{run_dir}: metrics.json or {latest.name}/config.yaml lacks {exc}") from None
        if fingerprint is None:
            fingerprint = (run_dir, record["dataset_fingerprint"])
        elif record["dataset_fingerprint"] != fingerprint[1]:
            raise SystemExit(
                f"{run_dir}: trained on another dataset (fingerprint {record['dataset_fingerprint']}) "
                f"than {fingerprint[0]} ({fingerprint[1]}); collect one dataset at a time"
            )
        if settings is None:
            settings = shared
        for name, value in shared.items():
            if value != settings[name]:
                section, key = SHARED_SETTINGS[name]
                raise SystemExit(
                    f"{run_dir}: {section}.{key} is {value!r}, but the runs before it have {settings[name]!r}; "
                    "a table compares runs with the same settings"
                )
        if run_dir.name in names:
            raise SystemExit(f"{run_dir}: a run of the same name was given before it; run names must differ")
        names.add(run_dir.name)
        record.update(run_name=run_dir.name, run_dir=shown_path(run_dir))
        if record["model"] == "echomamba4rec":
            record["variant"] = echo_variant(cfg["model"])
        key = (record["model"], record["samples"], json.dumps(cfg["model"], sort_keys=True))
        groups.setdefault(key, []).append(record)
    if settings is None:
        raise SystemExit("--collect: no run directories given")
    settings["epochs"] = max(r["config"]["train"]["epochs"] for rs in groups.values() for r in rs)

    # Entries: a model's name, `model/samples` where one model has runs on both kinds of rows, or
    # `echomamba4rec/<variant>` for a variant of the study other than the default (as the harness).
    entries: dict[str, list[dict[str, Any]]] = {}

    def study_variant(records: list[dict[str, Any]]) -> str | None:
        return other_variant(records[0])

    by_model = [k[0] for k, rs in groups.items() if study_variant(rs) is None]
    variant_order = list(ECHO_VARIANTS)
    for (model, samples, model_section), records in sorted(
        groups.items(), key=lambda kv: (_order(kv[0][0]), variant_order.index(study_variant(kv[1]) or DEFAULT_VARIANT), kv[0][1])
    ):
        if study_variant(records):
            name = f"{model}/{study_variant(records)}"
        else:
            name = model if by_model.count(model) == 1 else f"{model}/{samples}"
        if name in entries:
            others = ", ".join(r["run_name"] for r in entries[name])
            raise SystemExit(
                f"{records[0]['run_name']}: {model} with {samples} rows but other model settings than "
                f"{others}; collect them separately"
            )
        entries[name] = records
    return entries, settings


def _order(model: str) -> int:
    return MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER)


# ----------------------------------------------------------------------------------------------
# Aggregation


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value) of finite values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the seeds of one model (or variant): test and validation metrics, epochs, time."""
    return {
        "model": records[0]["model"],
        "samples": sorted({r["samples"] for r in records}),
        "seeds": [r["seed"] for r in records],
        "test": {m: mean_std([r["test"].get(m) for r in records]) for m in METRICS},
        "valid": {m: mean_std([r["valid"].get(m) for r in records]) for m in METRICS},
        "epochs_run": [r["epochs_run"] for r in records],
        "best_epoch": [r["best_epoch"] for r in records],
        "all_stopped_early": all(r["stopped_early"] for r in records),
        "seconds_per_epoch": mean_std([r["seconds_per_epoch"] for r in records]),
    }


def best_variant(variants: dict[str, dict[str, Any]], *, budget: int | None = None) -> str | None:
    """The variant with the highest mean validation NDCG@10 (ties: the study's order); with a
    `budget`, the highest mean of each run's best validation NDCG@10 within its first `budget` epochs."""

    def score(s: dict[str, Any]) -> dict[str, float]:
        return s["valid_within_budget"] if budget else s["valid"]["ndcg@10"]

    scored = [(score(s)["mean"], -i, name) for i, (name, s) in enumerate(variants.items()) if score(s)["n"]]
    return max(scored)[2] if scored else None


def variant_runs(entries: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]] | None]:
    """The runs of each study variant among table entries: `echomamba4rec` is the default's,
    `echomamba4rec/<variant>` another variant's (the entry names of the harness and --collect)."""
    return {v: entries.get("echomamba4rec" if v == DEFAULT_VARIANT else f"echomamba4rec/{v}") for v in ECHO_VARIANTS}


def variant_study(runs: dict[str, list[dict[str, Any]] | None], *, budget: int | None = None) -> dict[str, Any]:
    """The variant study's summary over each variant's runs (seeds), and the variant it chooses.

    With a `budget` (epochs), variants are compared on the best validation NDCG@10 of each run's
    first `budget` epochs, so runs capped at `budget` for time and runs trained to early stopping
    stand on equal terms; a run with fewer epochs that did not stop early is refused by name."""
    summary: dict[str, dict[str, Any]] = {}
    for variant, records in runs.items():
        if not records:
            continue
        summary[variant] = summarize(records)
        if budget:
            within = []
            for r in records:
                history = [v for v in r.get("valid_history") or [] if v is not None]
                if len(history) < budget and not r["stopped_early"]:
                    raise SystemExit(
                        f"{r.get('run_name', variant)}: {len(history)} epochs with validation metrics, fewer than "
                        f"the variant budget of {budget}, and not stopped early; train it for {budget} epochs"
                    )
                within.append(max(history[:budget]))
            summary[variant]["valid_within_budget"] = mean_std(within)
    best = best_variant(summary, budget=budget)
    chosen_on = (
        f"the best validation NDCG@10 of each run's first {budget} epochs, mean over seeds"
        if budget else "validation NDCG@10, mean over seeds"
    )
    return {"summary": summary, "best": best, "chosen_on": chosen_on, "budget_epochs": budget}


# ----------------------------------------------------------------------------------------------
# Output


def _fmt(stat: dict[str, float]) -> str:
    if not stat["n"]:
        return "–"
    if stat["n"] == 1:
        return f"{stat['mean']:.4f}"
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The markdown table: our mean ± std beside the paper's numbers, then variants and notes."""
    ds = report["dataset"]
    key = report["paper_dataset"]
    paper = PAPER.get(key or "", {})
    hw = report["hardware"]
    commit = f"commit `{(report['git']['commit'] or 'unknown')[:12]}`" + (
        " (uncommitted changes)" if report["git"]["dirty"] else ""
    )
    if report.get("collected"):
        train_minutes = sum(r["train_seconds"] for r in report["runs"]) / 60
        origin = (
            f"Collected by `benchmarks/table2.py --collect` on {report['date']} ({commit}) from "
            f"{len(report['runs'])} finished training runs: the run directories' `metrics.json` and "
            f"checkpoint configs (table below the main one); {train_minutes:.1f} training minutes in all. "
            f"Collected on {hw['device']} ({hw['cpu']}); where and how each run trained is in its notes."
        )
    else:
        origin = (
            f"Measured by `benchmarks/table2.py` ({'complete' if report['complete'] else 'in progress'}), "
            f"{report['date']}, {commit}, on {hw['device']} ({hw['cpu']}, {hw['cpu_cores']} cores, torch "
            f"{hw['torch']}); harness wall time {report['wall_seconds'] / 60:.1f} min."
        )
    lines = [f"# Table 2 reproduction: {ds['name']}", "", origin, "", f"Command: `{report['command']}`", ""]
    if ds.get("n_users"):
        lines += [
            f"Data: {ds['n_users']:,} users, {ds['n_items']:,} items, {ds['n_interactions']:,} "
            f"interactions ({_source_name(ds)}).",
            "",
        ]
    if key in DATASET_NOTES:
        lines += [f"**Note:** {DATASET_NOTES[key]}", ""]
    s = report["settings"]
    lines += [
        f"Protocol: leave-one-out, full ranking over all items, test metrics of the epoch with the best "
        f"validation NDCG@10; hidden {s['hidden_size']}, dropout {s['dropout']}, Adam lr {s['lr']:g}, batch {s['batch_size']}, max length "
        f"{s['max_len']}, at most {s['epochs']} epochs, patience {s['patience']}; seeds "
        f"{' '.join(map(str, s['seeds']))} (mean ± sample std over seeds).",
        "",
        "| Model | training rows | HR@10 | paper | NDCG@10 | paper | MRR@10 | paper | epochs run (best), per seed | s / epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, summary in _table_rows(report["summary"], paper):
        model = summary["model"] if summary else name
        ref = paper.get(model)
        if summary is None:
            lines.append(f"| {DISPLAY.get(model, model)} | not run | – | " + " | – | ".join(f"{v:.4f}" for v in ref) + " | – | – |")
            continue
        label = DISPLAY.get(model, model)
        if name == "echomamba4rec" and report.get("variants", {}).get("best"):
            label += f" ({report['variants']['best']})"
        if not summary["all_stopped_early"]:
            label += " †"
        cells = [label, ", ".join(ROWS.get(s, s) for s in summary["samples"])]
        for i, metric in enumerate(METRICS):
            cells += [_fmt(summary["test"][metric]), f"{ref[i]:.4f}" if ref else "–"]
        epochs = ", ".join(f"{e} ({b + 1})" for e, b in zip(summary["epochs_run"], summary["best_epoch"]))
        spe = summary["seconds_per_epoch"]
        cells += [epochs, f"{spe['mean']:.1f}" if spe["n"] else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    pop = report.get("popularity")
    if pop:
        lines.append(
            "| Popularity (reference) | – | " + " | ".join(f"{pop.get(m, float('nan')):.4f} | –" for m in METRICS) + " | – | – |"
        )
    lines += [
        "",
        "† at least one seed reached the epoch cap before early stopping: not a converged number.",
        "Training rows: one row a user with a target at every position (all positions), or every "
        "prefix of a user's training items a row (prefix, RecBole's augmentation).",
        "",
    ]
    if report.get("collected"):
        lines += ["## Runs", "", "| run | model | rows | seed | best epoch (from 1) / epochs | valid NDCG@10 | training min |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["runs"]:
            lines.append(
                f"| `{r['run_name']}` | {DISPLAY.get(r['model'], r['model'])}{_variant_label(r)} | {ROWS.get(r['samples'], r['samples'])} | "
                f"{r['seed']} | {r['best_epoch'] + 1} / {r['epochs_run']} | {r['valid'].get('ndcg@10', float('nan')):.4f} | "
                f"{r['train_seconds'] / 60:.1f} |"
            )
        lines.append("")
        lines += [f"- {note}" for note in report.get("notes", [])]
        if report.get("notes"):
            lines.append("")
    variants = report.get("variants")
    if variants:
        budget = variants.get("budget_epochs")
        budget_head = [f"valid NDCG@10, best of epochs 1-{budget}"] if budget else []
        head = ["Variant", "settings", "epochs run (best)", *budget_head, "valid HR@10", "valid NDCG@10",
                "test HR@10", "test NDCG@10", "test MRR@10"]
        lines += [
            f"## EchoMamba4Rec variants (chosen on {variants['chosen_on']})",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for name, summary in variants["summary"].items():
            mark = (" †" if not summary["all_stopped_early"] else "") + (" **(best)**" if name == variants["best"] else "")
            settings = ", ".join(f"{k}={v}" for k, v in ECHO_VARIANTS[name].items()) or "defaults"
            epochs = ", ".join(f"{e} ({b + 1})" for e, b in zip(summary["epochs_run"], summary["best_epoch"]))
            cells = [f"{name}{mark}", settings, epochs]
            cells += [_fmt(summary["valid_within_budget"])] if budget else []
            cells += [_fmt(summary["valid"]["hr@10"]), _fmt(summary["valid"]["ndcg@10"])]
            cells += [_fmt(summary["test"][m]) for m in METRICS]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Only the best variant's test numbers enter the table above; all are shown for completeness."]
        if budget:
            lines.append(
                f"Variants are compared on the first {budget} epochs of every run (those marked † were capped "
                f"there for time); the other columns are each run's own best epoch."
            )
        lines.append("")
    targets = report.get("targets")
    if targets:
        lines += ["## Targets (the issue's, on Amazon-Beauty)", "", "| Model | metric | target | measured | met |",
                  "|---|---|---|---|---|"]
        for t in targets:
            measured = "–" if t["measured"] is None else f"{t['measured']:.4f}"
            met = "–" if t["met"] is None else ("yes" if t["met"] else "no")
            lines.append(f"| {DISPLAY[t['model']]} | {t['metric']} | ≥ {t['target']:.4f} | {measured} | {met} |")
        lines.append("")
    if paper:
        lines += [f"Paper numbers: {PAPER_CITATION}.", ""]
    return "\n".join(lines)


def other_variant(record: dict[str, Any]) -> str | None:
    """The study variant of a run record when it is not the default (None: the default, or no
    variant of the study)."""
    variant = record.get("variant")
    return variant if variant not in (None, DEFAULT_VARIANT) else None


def _variant_label(record: dict[str, Any]) -> str:
    """` (concat-last)` for a run of a variant other than the default; empty otherwise."""
    variant = other_variant(record)
    return f" ({variant})" if variant else ""


def _table_rows(summary: dict[str, Any], paper: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None]]:
    """The main table's rows in the paper's model order: each entry, and (name, None) for a model
    of the paper's table that has none ("not run"); entries of other models come last."""
    rows: list[tuple[str, dict[str, Any] | None]] = []
    for model in MODEL_ORDER:
        mine = [(n, s) for n, s in summary.items() if s["model"] == model]
        rows += mine or ([(model, None)] if model in paper else [])
    return rows + [(n, s) for n, s in summary.items() if s["model"] not in MODEL_ORDER]


def _source_name(ds: dict[str, Any]) -> str:
    source = ds.get("source") or {}
    if source.get("path"):
        return f"`{Path(source['path']).name}`, sha256 {str(source.get('sha256', ''))[:12]}"
    return str(source.get("format", "synthetic"))


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic", help="prepared dir, raw log file, or 'synthetic'")
    parser.add_argument("--models", nargs="*", default=["all"], help="model names, or 'all' (default)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--out", type=Path, required=True, help="JSON output; the markdown goes beside it")
    parser.add_argument("--variants", action="store_true", help="add the EchoMamba4Rec variant study")
    parser.add_argument("--epochs", type=int, default=None, help="epoch cap (paper: 300; smoke: 1)")
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument(
        "--samples", default="auto", choices=["auto", "prefix"],
        help="prefix: the all-positions models (SASRec, GRU4Rec, Mamba4Rec, BERT4Rec) train on every "
        "prefix as a row, as RecBole trained the paper's baselines (BERT4Rec with masking=append: the "
        "target masked at the end plus random masking); the prefix models are unchanged",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--runs", type=Path, default=None, help="run directories (default runs/table2/<dataset>)")
    parser.add_argument("--fresh", action="store_true", help="delete earlier runs instead of resuming them")
    parser.add_argument("--tracking", action="store_true", help="log every run to MLflow")
    parser.add_argument("--dataset-name", default=None, help="names the dataset (default: from --data)")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic data, 1 epoch, 1 seed (CI)")
    parser.add_argument(
        "--collect", nargs="+", type=Path, default=None, metavar="RUN_DIR",
        help="train nothing: tabulate these finished runs (echomamba train, Ray jobs, another machine)",
    )
    parser.add_argument("--note", action="append", default=[], help="with --collect: a note under the table (repeatable)")
    parser.add_argument(
        "--variant-epochs", type=int, default=None, metavar="N",
        help="with --collect: compare the EchoMamba4Rec variants on the best validation NDCG@10 of their "
        "first N epochs (for variants capped at N epochs for time)",
    )
    args = parser.parse_args(argv)
    if args.collect is not None:
        return args
    if args.smoke:
        args.epochs = args.epochs or 1
        if args.seeds == [1, 2, 3]:
            args.seeds = [1]
    args.epochs = args.epochs or 300
    from echomamba_dist.models.registry import MODELS

    models = MODEL_ORDER if args.models == ["all"] else args.models
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    args.models = [m for m in MODEL_ORDER if m in models] + [m for m in models if m not in MODEL_ORDER]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.collect is not None:
        return collect_main(args, argv)
    started = time.perf_counter()
    data, dataset = resolve_data(args.data, smoke=args.smoke, cache_root=REPO / "prepared")
    name = args.dataset_name or dataset["name"]
    dataset["name"] = name
    key = paper_key(name)

    scratch = None
    runs_dir = args.runs
    if runs_dir is None and args.smoke:
        scratch = tempfile.TemporaryDirectory(prefix="table2-smoke-")
        runs_dir = Path(scratch.name)
    runs_dir = (runs_dir or REPO / "runs" / "table2" / name).resolve()

    # (entry, model, variant, overrides): the table's models, then the variants not yet run
    plan = [(m, m, None, {}) for m in args.models]
    if args.variants:
        plan += [
            (f"echomamba4rec/{v}", "echomamba4rec", v, overrides)
            for v, overrides in ECHO_VARIANTS.items()
            if not (v == DEFAULT_VARIANT and "echomamba4rec" in args.models)
        ]

    report: dict[str, Any] = {
        "dataset": dataset,
        "paper_dataset": key,
        "settings": {
            "seeds": args.seeds,
            "epochs": args.epochs,
            "patience": args.patience,
            "batch_size": 64 if args.smoke else 2048,
            "max_len": SMOKE_MAX_LEN if args.smoke else 50,
            "hidden_size": 64,
            "dropout": 0.2,
            "lr": 1e-3,
            "metric": "ndcg@10",
            "samples": args.samples,
            "smoke": args.smoke,
            "runner": "echomamba_dist.train.loop.train_per_worker (in process, no Ray)",
            "runs_dir": shown_path(runs_dir),
        },
        **provenance(argv, key, device=args.device),
        "runs": [],
        "complete": False,
    }
    if key in DATASET_NOTES:
        report["note"] = DATASET_NOTES[key]

    records: dict[str, list[dict[str, Any]]] = {}
    try:
        for entry, model, variant, overrides in plan:
            for seed in args.seeds:
                tags = [variant] if variant and variant != DEFAULT_VARIANT else []
                if cfg_samples(model, args) == "prefix":
                    tags.append("prefix")  # never resumes an all-positions run
                run_name = "-".join([model, *tags, f"seed{seed}"])
                cfg = run_config(model, overrides, seed, data=data, args=args, runs_dir=runs_dir, run_name=run_name)
                print(f"=== {entry} seed {seed} ({run_name})", flush=True)
                record = train_one(cfg, fresh=args.fresh)
                record.update(entry=entry, variant=variant)
                records.setdefault(entry, []).append(record)
                report["runs"].append({k: v for k, v in record.items() if k != "config"} | {"run_name": run_name})
                report["popularity"] = record["popularity"]
                _finish(report, records, args, started)
        report["complete"] = True
        _finish(report, records, args, started)
    finally:
        if scratch is not None:
            scratch.cleanup()
    print(render_markdown(report))
    return 0


def collect_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    """`--collect`: the tables of runs trained elsewhere, in the harness's format."""
    entries, settings = collect_runs(args.collect)
    records = [r for rs in entries.values() for r in rs]
    data_path = records[0]["config"]["data"].get("path")
    name = args.dataset_name or (Path(data_path).name if data_path else "synthetic")
    key = paper_key(name)
    seeds = sorted({r["seed"] for r in records})
    report: dict[str, Any] = {
        "dataset": {"name": name, "fingerprint": records[0]["dataset_fingerprint"]},
        "paper_dataset": key,
        "settings": {**settings, "seeds": seeds, "runner": "collected from run directories"},
        **provenance(argv, key, device="cpu"),
        "runs": [{k: v for k, v in r.items() if k != "config"} for r in records],
        "popularity": records[0]["popularity"],
        "summary": {entry: summarize(rs) for entry, rs in entries.items() if not entry.startswith("echomamba4rec/")},
        "collected": True,
        "complete": True,
        "notes": args.note,
        "wall_seconds": sum(r["train_seconds"] for r in records),
    }
    if key in DATASET_NOTES:
        report["note"] = DATASET_NOTES[key]
    if any(entry.startswith("echomamba4rec/") for entry in entries):
        # the variant study: its chosen variant stands in the EchoMamba4Rec row, as in the harness
        report["variants"] = study = variant_study(variant_runs(entries), budget=args.variant_epochs)
        report["summary"]["echomamba4rec"] = study["summary"][study["best"]]
    elif args.variant_epochs:
        raise SystemExit("--variant-epochs: no EchoMamba4Rec variant runs among the run directories")
    report["targets"] = _targets(report["summary"], key)
    markdown = render_markdown(report)
    write_json_atomic(args.out, report, sort_keys=False)
    write_text_atomic(args.out.with_suffix(".md"), markdown)
    print(markdown)
    return 0


# The hardware fields of a Table 2 report: those of `_common.hardware` less memory, CUDA and
# Numba versions (kept as they were, so that reports stay comparable).
HARDWARE_FIELDS = ("cpu", "cpu_cores", "cpu_cores_usable", "torch_threads", "device", "torch", "python", "platform")


def provenance(argv: list[str] | None, key: str | None, *, device: str) -> dict[str, Any]:
    """The report's command, date, commit, hardware and the paper's numbers for its dataset."""
    words = [Path(sys.executable).name, *sys.argv] if argv is None else ["table2.py", *argv]
    return {
        "command": " ".join(shown_path(w) if Path(w).is_absolute() else w for w in words),
        "date": utc_now(),
        "git": git_commit(),
        "hardware": hardware(device, fields=HARDWARE_FIELDS),
        "paper": {"citation": PAPER_CITATION, "numbers": {k: dict(zip(METRICS, v)) for k, v in PAPER.get(key or "", {}).items()}},
    }


def _targets(summary: dict[str, Any], key: str | None) -> list[dict[str, Any]]:
    """The issue's targets against the summary (None where the model has no entry)."""
    out = []
    for model, metric, target in TARGETS.get(key or "", []):
        found = [s for s in summary.values() if s["model"] == model]
        best = max((s["test"][metric]["mean"] for s in found), default=None)
        out.append({"model": model, "metric": metric, "target": target, "measured": best,
                    "met": None if best is None else best >= target})
    return out


def _finish(report: dict[str, Any], records: dict[str, list[dict[str, Any]]], args: argparse.Namespace, started: float) -> None:
    """Aggregate what has run so far and (re)write the JSON and the markdown."""
    summary = {m: summarize(records[m]) for m in args.models if m in records}
    if args.variants:
        report["variants"] = study = variant_study(variant_runs(records))
        if study["best"] is not None:
            summary["echomamba4rec"] = study["summary"][study["best"]]
    report["summary"] = summary
    key = report["paper_dataset"]
    report["targets"] = _targets(summary, key)
    report["wall_seconds"] = time.perf_counter() - started
    write_json_atomic(args.out, report, sort_keys=False)
    write_text_atomic(args.out.with_suffix(".md"), render_markdown(report))


if __name__ == "__main__":
    sys.exit(main())
