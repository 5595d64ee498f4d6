"""Training configs x seeds, each to early stopping: mean ± std under two evaluation protocols.

    python benchmarks/seeds.py --seeds 1 2 3 \
        --config echomamba4rec-tuned=docs/results/tune-beauty-cpu/best.yaml \
        --config sasrec=jobs/configs/beauty-sasrec.yaml \
        --config bimamba4rec=jobs/configs/beauty-bimamba4rec.yaml \
        --set data.path=prepared/amazon-beauty --runs ../runs/seeds/beauty \
        --out docs/results/seeds-beauty.json
    python benchmarks/seeds.py ... --report-only        # tabulate what has finished, train nothing

Every `--config [LABEL=]PATH` is a training config (a job config, a study's best.yaml) loaded as
`echomamba train` loads it (`config.load`, then the `--set` overrides, which apply to every config);
LABEL (default: the config's `run.name`) names its rows and its runs, `<LABEL>-seed<N>` under
`--runs`. Each (config, seed) trains in this process through `train_per_worker`, the Ray-free
per-worker loop (`train.seed` = the seed; `train.ray`, tracking and `train.exclude_history` off: the
best epoch is chosen on validation under the paper's protocol). A run interrupted resumes from its
checkpoints when the command runs again; a finished one is reused (`table2-run.json` in its run
directory, kept while its config is unchanged). A run that another process is training (it holds
the run directory's lock, `train.runlock`) is skipped and listed as not finished, so two processes
given the same command share its runs between them, each taking the next run nobody holds, and a
later `--report-only` tabulates them all.

`--archive DIR` keeps every finished run's record (its config without `run.storage_path`, its
validation history, both protocols' test metrics; a few kilobytes, no weights) as `DIR/<run name>.json`,
for the repository: run directories live outside it, on one machine. A run whose archived record
has the same config is finished wherever the command runs next: it is not trained again (nor
scored again) and stands in the table as it was recorded. Training, the run directory's record
goes first (and refreshes the archive); an archived record of another config is a run not finished.

The test split is scored with each run's best weights under two protocols, reported separately
and never mixed:
- paper: full ranking over all items (the paper's protocol; what training reports in metrics.json,
  checked here to agree with a fresh evaluation);
- exclude_history: the same ranking with each user's history items removed (`exclude_history` of
  `evaluate_model`, as `echomamba evaluate --exclude-history`).
Both are evaluated once per run and kept in its directory (`protocols.json`).

`--deadline TIME` (ISO 8601, UTC unless it names a zone, or HH:MM for today in UTC) starts no run
expected to end after TIME, for machines lent for a fixed time: a run cut off by the machine's end
is lost there. A run's expected time is the longest training time (`train_seconds`: its epochs,
validation included) of the same config's finished runs (other seeds, here or in the archive);
the time its test scoring takes is not in it, so leave a margin. A run with no such estimate (the
config's first) starts whenever it is reached before TIME; a run that would not end in time is
listed as not started, and the next run is considered. A finished run is always reused.

Writes `--out` (JSON: the command, commit, hardware, each config's settings, every run, mean and
sample standard deviation over seeds per protocol, comparisons) and a markdown table beside it
(same stem, `.md`), both replaced atomically: after every run while training, once at the end with
`--report-only` (a run that cannot be scored, e.g. one whose weights give NaN scores, is an error
naming its checkpoint, and the report before stays as it was).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import command_line, git_commit, hardware, shown_arg, shown_path, utc_now  # noqa: E402
from table2 import DATASET_NOTES, DISPLAY, METRICS, PAPER, _fmt, _targets, mean_std, paper_key, train_one  # noqa: E402
from table2 import summarize as table2_summary  # noqa: E402

from echomamba_dist.config import ExperimentConfig, load, to_dict  # noqa: E402
from echomamba_dist.errors import ConfigError, NonFiniteScores  # noqa: E402
from echomamba_dist.io import write_json_atomic, write_text_atomic  # noqa: E402
from echomamba_dist.train.runlock import RunLockedError  # noqa: E402

PROTOCOLS = ("paper", "exclude_history")
# The settings a table shows for each config (dotted keys of the training config).
SHOWN_SETTINGS = ("model.name", "model.dropout", "train.lr", "train.weight_decay", "train.batch_size",
                  "train.samples", "train.patience", "train.epochs", "data.max_len")


# Sections whose keys name a run or where it is tracked, not how it trains.
UNSHOWN_SECTIONS = ("run", "tracking")


def shown_settings(bases: list[dict[str, Any]]) -> list[str]:
    """The dotted keys a table shows: SHOWN_SETTINGS, then every other training key whose value
    differs between two configs that both have it (so that two rows differing only in, say,
    `model.mask_prob` say so; a key only some models have is not a difference)."""
    flat = [{f"{section}.{name}": value for section, values in base.items() if isinstance(values, dict)
             and section not in UNSHOWN_SECTIONS for name, value in values.items()} for base in bases]
    keys = sorted({k for f in flat for k in f})
    differing = [k for k in keys if k not in SHOWN_SETTINGS
                 and len({json.dumps(f[k], sort_keys=True) for f in flat if k in f}) > 1]
    return [*SHOWN_SETTINGS, *differing]


def parse_config_arg(text: str) -> tuple[str | None, Path]:
    """`LABEL=PATH` or `PATH` -> (label or None, path)."""
    label, sep, path = text.partition("=")
    if sep and label and "/" not in label and not label.endswith((".yaml", ".yml")):
        return label, Path(path)
    return None, Path(text)


def run_configs(args: argparse.Namespace) -> list[tuple[str, Path, dict[str, Any]]]:
    """(label, path, the loaded config as a dict) per `--config`, in the order given."""
    out = []
    for text in args.config:
        label, path = parse_config_arg(text)
        try:
            cfg = load(ExperimentConfig, path, args.overrides)
        except ConfigError as exc:
            raise SystemExit(f"{path}: {exc}") from None
        label = label or cfg.run.name
        if any(label == other for other, _, _ in out):
            raise SystemExit(f"--config {text}: the label {label!r} is taken by an earlier config; give LABEL=PATH")
        out.append((label, path, to_dict(cfg)))
    return out


def seed_config(base: dict[str, Any], label: str, seed: int, runs_dir: Path) -> dict[str, Any]:
    """The experiment dict of one (config, seed) run."""
    cfg = json.loads(json.dumps(base))  # a deep copy of plain data
    cfg["train"].update(seed=seed, ray=False, progress=False, exclude_history=False, final_test=True)
    cfg["run"].update(name=f"{label}-seed{seed}", storage_path=str(runs_dir), resume=True)
    cfg["tracking"]["enabled"] = False
    return cfg


PROTOCOLS_FILE = "protocols.json"  # in a run directory: both protocols' test metrics, and of which checkpoint


def portable_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run's config without where its run directory was (`run.storage_path`): what two machines'
    runs of one (config, seed) share."""
    return cfg | {"run": {k: v for k, v in cfg["run"].items() if k != "storage_path"}}


def archive_path(archive: Path, cfg: dict[str, Any]) -> Path:
    """Where the archive keeps this run's record."""
    return archive / f"{cfg['run']['name']}.json"


def archived_record(archive: Path | None, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The archived record of this run (None when there is none, or it is of another config)."""
    if archive is None:
        return None
    path = archive_path(archive, cfg)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}: not a run record (invalid JSON: {exc})") from None
    missing = {"config", "protocols", "test", "valid", "dataset_fingerprint"} - set(record)
    if missing:
        raise SystemExit(f"{path}: not a run record (no {', '.join(sorted(missing))})")
    return record if record["config"] == portable_config(cfg) else None


def archive_record(archive: Path, cfg: dict[str, Any], record: dict[str, Any]) -> None:
    """Keep a finished run's record (as reported, with its portable config) in the archive."""
    keep = {k: v for k, v in record.items() if k not in ("reused", "archived", "wall_seconds_this_session")}
    write_json_atomic(archive_path(archive, cfg), keep | {"config": portable_config(cfg)})


def parse_deadline(text: str, now: datetime | None = None) -> datetime:
    """`--deadline`: ISO 8601 (UTC unless it names a zone) or HH:MM (today, UTC) -> an aware datetime."""
    now = now or datetime.now(timezone.utc)
    try:
        if len(text) <= 5 and ":" in text:
            hour, minute = (int(part) for part in text.split(":"))
            return now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time (e.g. 2026-12-02T17:00) or HH:MM in UTC, got {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def expected_seconds(finished_runs: list[dict[str, Any]]) -> float | None:
    """The longest training time among a config's finished runs (None: no run has finished)."""
    seconds = [r["train_seconds"] for r in finished_runs if r.get("train_seconds") is not None]
    return max(seconds) if seconds else None


def too_late(deadline: datetime | None, expected: float | None, now: datetime) -> str | None:
    """Why a run expected to take `expected` seconds must not start at `now` (None: it may)."""
    if deadline is None:
        return None
    left = (deadline - now).total_seconds()
    if left <= 0:
        return f"the deadline {deadline:%Y-%m-%dT%H:%MZ} has passed"
    if expected is not None and expected > left:
        return (f"expected to take {expected / 60:.0f} min, {left / 60:.0f} min left before the deadline "
                f"{deadline:%Y-%m-%dT%H:%MZ}")
    return None


def protocol_metrics(run_dir: Path, paper_test: dict[str, float]) -> dict[str, dict[str, float]]:
    """Both protocols' test metrics of a finished run's best weights, evaluated once and kept in the
    run directory (`protocols.json`, reused while the run's newest checkpoint is the same). Raises
    SystemExit when a fresh evaluation under the paper's protocol disagrees with what training
    reported."""
    import torch

    from echomamba_dist.serve.load import load_model
    from echomamba_dist.train.batches import build_training_data
    from echomamba_dist.train.evaluate import evaluate_model

    loaded = load_model(run_dir)  # the best weights
    saved_file = run_dir / PROTOCOLS_FILE
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text(encoding="utf-8"))
        if saved.get("checkpoint") == loaded.checkpoint_dir.name and saved.get("paper_test") == paper_test:
            return saved["protocols"]
    cfg = loaded.config
    data = build_training_data(cfg, cfg.sample_mode, with_samples=False)
    out = {}
    for protocol in PROTOCOLS:
        try:
            metrics = evaluate_model(loaded.model, data.test, ks=cfg.train.ks, batch_size=cfg.train.eval_batch_size,
                                     device=torch.device("cpu"), exclude_history=protocol == "exclude_history")
        except NonFiniteScores as exc:  # no metric is made from NaN or infinite scores
            raise SystemExit(f"{loaded.checkpoint_dir}: {exc}") from None
        out[protocol] = {k: v for k, v in metrics.items() if k != "count"}
    for metric, value in paper_test.items():
        fresh = out["paper"].get(metric)
        if fresh is None or not math.isclose(fresh, value, rel_tol=1e-4, abs_tol=1e-6):
            raise SystemExit(f"{run_dir}: test {metric} evaluated again is {fresh}, but training reported {value}")
    write_json_atomic(saved_file, {"checkpoint": loaded.checkpoint_dir.name, "paper_test": paper_test, "protocols": out})
    return out


def summarize(label: str, records: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """Over the seeds of one config: table2's summary (validation, epochs, time), with the test
    metrics of both protocols in place of its one."""
    test = {p: {m: mean_std([r["protocols"][p].get(m) for r in records]) for m in METRICS} for p in PROTOCOLS}
    return {"label": label, "settings": settings, **table2_summary(records), "test": test}


def comparisons(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each EchoMamba4Rec entry against every other entry, per protocol, on mean HR@10 and NDCG@10."""
    out = []
    for label, s in summary.items():
        if s["model"] != "echomamba4rec":
            continue
        for other, o in summary.items():
            if other == label:
                continue
            for protocol in PROTOCOLS:
                ahead = {m: s["test"][protocol][m]["mean"] - o["test"][protocol][m]["mean"] for m in ("hr@10", "ndcg@10")}
                out.append({"entry": label, "against": other, "protocol": protocol, "difference": ahead,
                            "ahead_on_both": all(v > 0 for v in ahead.values())})
    return out


def relative(value: float, reference: float) -> float:
    """value / reference - 1 (the fraction by which value is above reference; negative below)."""
    return value / reference - 1.0


def targets(summary: dict[str, dict[str, Any]], paper_dataset: str | None) -> list[dict[str, Any]]:
    """The issue's targets (table2's `TARGETS`) against the means under the paper's protocol, each
    with its difference: absolute and relative to the target."""
    out = []
    for t in _targets({label: {"model": s["model"], "test": s["test"]["paper"]} for label, s in summary.items()}, paper_dataset):
        ok = t["measured"] is not None and math.isfinite(t["measured"])
        out.append(t | {"difference": t["measured"] - t["target"] if ok else None,
                        "relative": relative(t["measured"], t["target"]) if ok else None})
    return out


def render_markdown(report: dict[str, Any]) -> str:
    hw = report["hardware"]
    commit = f"commit `{(report['git']['commit'] or 'unknown')[:12]}`" + (" (uncommitted changes)" if report["git"]["dirty"] else "")
    state = "complete" if report["complete"] else "in progress"
    lines = [
        f"# Seeded runs: {report['dataset']}",
        "",
        f"Measured by `benchmarks/seeds.py` ({state}), {report['date']}, {commit}, on {hw['device']} ({hw['cpu']}, "
        f"{hw['cpu_cores']} cores, torch {hw['torch']}). Each run trained to early stopping on validation "
        f"NDCG@10; the test split scored once with its best weights; mean ± sample std over seeds "
        f"{' '.join(map(str, report['seeds']))}.",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    note = DATASET_NOTES.get(report.get("paper_dataset") or "")
    if note:
        lines += [f"**Note:** {note}", ""]
    # The paper's numbers stand beside ours only on the paper's version of a dataset.
    paper = {} if note else PAPER.get(report.get("paper_dataset") or "", {})
    titles = {
        "paper": "Protocol 1, the paper's: full ranking over all items",
        "exclude_history": "Protocol 2: full ranking without each user's history items (not comparable with protocol 1 or the paper)",
    }
    for protocol in PROTOCOLS:
        with_paper = protocol == "paper" and paper
        head = ["config", "model", "HR@10", "NDCG@10", "MRR@10"]
        head += ["paper HR@10", "paper NDCG@10", "vs paper (HR, NDCG)"] if with_paper else []
        lines += [f"## {titles[protocol]}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, s in report["summary"].items():
            cells = [label + ("" if s["all_stopped_early"] else " †"), DISPLAY.get(s["model"], s["model"])]
            cells += [_fmt(s["test"][protocol][m]) for m in METRICS]
            if with_paper:
                ref = paper.get(s["model"])
                test = s["test"][protocol]
                if not ref:
                    cells += ["–", "–", "–"]
                else:
                    gap = [relative(test[m]["mean"], r) for m, r in zip(("hr@10", "ndcg@10"), ref)]
                    cells += [f"{ref[0]:.4f}", f"{ref[1]:.4f}", f"{gap[0]:+.1%}, {gap[1]:+.1%}" if test["hr@10"]["n"] else "–"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Runs", "", "| config | seed | epochs run | best epoch | valid NDCG@10 | s / epoch |", "|---|---|---|---|---|---|"]
    for r in report["runs"]:
        spe = f"{r['seconds_per_epoch']:.0f}" if r["seconds_per_epoch"] else "–"
        valid = r["valid"].get("ndcg@10", float("nan"))
        lines.append(f"| {r['label']} | {r['seed']} | {r['epochs_run']} | {r['best_epoch'] + 1} | {valid:.4f} | {spe} |")
    if report.get("archive"):
        lines += ["", f"Finished runs' records (config, validation history, test metrics): `{report['archive']}/<run>.json`."]
    if report["pending"]:
        lines += ["", "Not finished yet: " + ", ".join(report["pending"]) + "."]
    lines += ["", "## Settings", ""]
    for label, s in report["summary"].items():
        shown = ", ".join(f"{k} {v}" for k, v in s["settings"].items())
        lines.append(f"- {label} ({s['config_path']}): {shown}")
    if report["comparisons"]:
        lines += ["", "## EchoMamba4Rec against the others (mean test HR@10 and NDCG@10)", ""]
        for c in report["comparisons"]:
            d = c["difference"]
            verdict = "ahead on both" if c["ahead_on_both"] else "not ahead on both"
            lines.append(f"- {c['entry']} vs {c['against']}, {c['protocol']}: HR@10 {d['hr@10']:+.4f}, "
                         f"NDCG@10 {d['ndcg@10']:+.4f} ({verdict})")
    if report.get("targets"):
        lines += ["", "## Targets (the paper's numbers that the issues set; the paper's protocol, mean over the seeds)", "",
                  "| model | metric | target | measured | difference | met |", "|---|---|---|---|---|---|"]
        for t in report["targets"]:
            measured = "–" if t["measured"] is None else f"{t['measured']:.4f}"
            diff = "–" if t["difference"] is None else f"{t['difference']:+.4f} ({t['relative']:+.1%})"
            met = "–" if t["met"] is None else ("yes" if t["met"] else "no")
            lines.append(f"| {DISPLAY[t['model']]} | {t['metric']} | ≥ {t['target']:.4f} | {measured} | {diff} | {met} |")
    if not all(s["all_stopped_early"] for s in report["summary"].values()):
        lines += ["", "† a run of this config reached its epoch limit before early stopping."]
    lines += ["", "Best epoch counts from 1."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", action="append", required=True, metavar="[LABEL=]PATH",
                        help="a training config (repeatable); LABEL names its rows and runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key in every config (repeatable), as `echomamba train --set`")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--runs", type=Path, required=True, help="parent directory of the runs (keep it outside the repository)")
    parser.add_argument("--out", type=Path, required=True, help="JSON output; the markdown goes beside it")
    parser.add_argument("--report-only", action="store_true", help="train nothing: tabulate the finished runs")
    parser.add_argument("--dataset-name", default=None, help="names the dataset (default: from data.path)")
    parser.add_argument("--archive", type=Path, default=None, metavar="DIR",
                        help="keep each finished run's record in DIR (in the repository); a run archived "
                             "with the same config is not trained again")
    parser.add_argument("--deadline", type=parse_deadline, default=None, metavar="TIME",
                        help="start no run expected to end after TIME (ISO 8601 or HH:MM, UTC)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    configs = run_configs(args)
    runs_dir = args.runs.expanduser().resolve()
    data_path = configs[0][2]["data"].get("path")
    dataset = args.dataset_name or (Path(data_path).name if data_path else "synthetic")
    words = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {
        "benchmark": "training configs x seeds to early stopping, two evaluation protocols",
        "command": command_line(__file__, [shown_arg(w) for w in words]),
        "date": utc_now(),
        "git": git_commit(),
        "hardware": hardware("cpu"),
        "dataset": dataset,
        "paper_dataset": paper_key(dataset),
        "seeds": args.seeds,
        "runs_dir": shown_path(runs_dir),
        "archive": shown_path(args.archive) if args.archive else None,
        "runs": [],
        "pending": [],
        "summary": {},
        "comparisons": [],
        "targets": [],
        "complete": False,
    }
    records: dict[str, list[dict[str, Any]]] = {}
    fingerprints: set[str] = set()

    def same_dataset(where: Path, record: dict[str, Any]) -> None:
        fingerprints.add(record["dataset_fingerprint"])
        if len(fingerprints) > 1:
            raise SystemExit(f"{where}: trained on another dataset than the runs before it; one dataset a table")

    def finished(run_dir: Path, label: str, record: dict[str, Any]) -> dict[str, Any]:
        """A finished run's record for the report, with both protocols' test metrics."""
        same_dataset(run_dir, record)
        return {k: v for k, v in record.items() if k != "config"} | {
            "label": label, "run_name": run_dir.name, "protocols": protocol_metrics(run_dir, record["test"])}

    def too_late_to_start(label: str, seed: int, base: dict[str, Any]) -> str | None:
        """Why this run must not start before `--deadline` (None: it may, or there is no deadline),
        by the longest training time of its config's finished runs: here, or other seeds' in the archive."""
        if args.deadline is None:
            return None
        others = records.get(label, []) + [
            r for s in args.seeds if s != seed
            if (r := archived_record(args.archive, seed_config(base, label, s, runs_dir))) is not None]
        return too_late(args.deadline, expected_seconds(others), datetime.now(timezone.utc))

    def publish() -> None:
        report["summary"] = {}
        for label, path, base in configs:
            if records.get(label):
                settings = {}
                for key in shown_settings([b for _, _, b in configs]):
                    section, name = key.split(".")
                    if key in SHOWN_SETTINGS or name in base[section]:  # a model's own keys: its rows only
                        settings[key] = base[section].get(name)
                report["summary"][label] = summarize(label, records[label], settings) | {"config_path": shown_path(path)}
        report["comparisons"] = comparisons(report["summary"])
        report["targets"] = targets(report["summary"], report["paper_dataset"])
        report["wall_seconds"] = time.perf_counter() - started
        write_json_atomic(args.out, report, sort_keys=False)
        write_text_atomic(args.out.with_suffix(".md"), render_markdown(report))

    for label, _path, base in configs:
        for seed in args.seeds:
            cfg = seed_config(base, label, seed, runs_dir)
            run_dir = runs_dir / cfg["run"]["name"]
            record_file = run_dir / "table2-run.json"
            # the run directory's record: a run that finished on this machine (of this config or another)
            here = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else None
            archived = archived_record(args.archive, cfg)
            if archived is not None and here is None:  # finished on another machine
                same_dataset(archive_path(args.archive, cfg), archived)
                record = {k: v for k, v in archived.items() if k != "config"} | {"label": label, "archived": True}
            elif args.report_only:
                if here is None:
                    report["pending"].append(cfg["run"]["name"])
                    continue
                if here.get("config") != cfg:
                    report["pending"].append(cfg["run"]["name"] + " (config changed)")
                    continue
                record = finished(run_dir, label, here)
            else:
                # a run finished here is reused whatever the time
                why = too_late_to_start(label, seed, base) if (here or {}).get("config") != cfg else None
                if why:
                    print(f"not started: {label} seed {seed} ({why})", flush=True)
                    report["pending"].append(f"{cfg['run']['name']} (not started: {why})")
                    continue
                print(f"=== {label} seed {seed} ({run_dir.name})", flush=True)
                try:
                    trained = train_one(cfg, fresh=False)
                except RunLockedError as exc:  # another process trains it: the next run
                    print(f"skipped: {exc}", flush=True)
                    report["pending"].append(cfg["run"]["name"] + " (training in another process)")
                    continue
                record = finished(run_dir, label, trained)
            if args.archive is not None and not record.get("archived"):
                archive_record(args.archive, cfg, record)
            records.setdefault(label, []).append(record)
            report["runs"].append(record)
            if not args.report_only:  # training: show progress after every run; a report: at its end only
                publish()
    report["complete"] = not report["pending"]
    publish()
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
