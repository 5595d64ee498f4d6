"""Validation and test scores of every checkpoint a run kept, each with its own epoch's weights.

A run keeps its best epoch's checkpoint and the last few. Training scores the test split once,
with the best weights; this script scores both splits at each kept epoch, so that a run whose test
score is a small share of its validation score can be told apart:

- a share that holds at every kept epoch is the model's (its validation item is easier than its
  test item, for reasons of the model);
- a share at the best epoch below the others' is selection: the maximum of a noisy validation
  curve overstates what that epoch's weights do on unseen targets.

    python benchmarks/checkpoint_scores.py ../runs/seeds/beauty/bert4rec-prefix-seed1 \\
        ../runs/seeds/beauty/sasrec-seed1 --out docs/results/checkpoint-scores-beauty.json

Each epoch's fresh validation score is checked against the one its checkpoint's history records
(the script stops if they disagree: the data or the code changed under the run). Writes `--out`
(JSON) and the markdown beside it; metrics under the paper's protocol (full ranking over all
items). Runs on the CPU; needs no Ray.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_average, report_header, save_report, shown_path  # noqa: E402

from echomamba_dist.io import write_text_atomic  # noqa: E402

METRICS = ("hr@10", "ndcg@10", "mrr@10")
HISTORY_TOLERANCE = 1e-5  # fresh validation against the history's (the same weights and data)


def score_run(run_dir: Path) -> dict[str, Any]:
    """Both splits at each checkpoint of `run_dir` (oldest first), with that epoch's own weights."""
    import torch

    from echomamba_dist.errors import NonFiniteScores
    from echomamba_dist.serve.load import load_model
    from echomamba_dist.train.batches import build_training_data
    from echomamba_dist.train.checkpoint import run_checkpoints
    from echomamba_dist.train.evaluate import evaluate_model

    checkpoints = run_checkpoints(run_dir)[::-1]  # oldest first
    if not checkpoints:
        raise SystemExit(f"{run_dir}: no checkpoints (expected a run directory with epoch_* checkpoints)")
    data = None
    rows = []
    best_epoch = None
    for ckpt in checkpoints:
        loaded = load_model(ckpt, best=False)
        cfg, meta = loaded.config, loaded.meta
        if data is None:
            data = build_training_data(cfg, cfg.sample_mode, with_samples=False)
        if data.fingerprint != meta.get("dataset_fingerprint"):
            raise SystemExit(f"{ckpt}: trained on dataset fingerprint {meta.get('dataset_fingerprint')}, "
                             f"but {cfg.data.path or 'the synthetic dataset'} now has {data.fingerprint}")
        epoch = int(meta["epoch"]) - 1  # meta's epoch is the next one to run
        best_epoch = int(meta["best_epoch"])
        scores = {}
        for split in ("valid", "test"):
            try:
                metrics = evaluate_model(loaded.model, getattr(data, split), ks=[10],
                                         batch_size=cfg.train.eval_batch_size, device=torch.device("cpu"))
            except NonFiniteScores as exc:  # no metric is made from NaN or infinite scores
                raise SystemExit(f"{ckpt}: {exc}") from None
            scores[split] = {k: metrics[k] for k in METRICS}
        recorded = next((h for h in meta.get("history", []) if h.get("epoch") == epoch), None)
        if recorded is not None and abs(recorded["val_ndcg@10"] - scores["valid"]["ndcg@10"]) > HISTORY_TOLERANCE:
            raise SystemExit(f"{ckpt}: validation NDCG@10 {scores['valid']['ndcg@10']:.6f} now, "
                             f"{recorded['val_ndcg@10']:.6f} in its history: the data or the code changed")
        rows.append({"checkpoint": ckpt.name, "epoch": epoch, **scores,
                     "test_over_valid_hr": scores["test"]["hr@10"] / scores["valid"]["hr@10"]
                     if scores["valid"]["hr@10"] > 0 else None})
    for row in rows:
        row["best"] = row["epoch"] == best_epoch
    return {"run": shown_path(run_dir), "model": cfg.model_name, "best_epoch": best_epoch, "checkpoints": rows}


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Validation and test at each kept checkpoint",
        "",
        f"Measured by `benchmarks/checkpoint_scores.py`, {report['date']}, commit `{report['git'].get('commit', '?')[:12]}`. "
        "Each checkpoint scored with its own epoch's weights, full ranking over all items (the paper's "
        "protocol). Epochs count from 1; * marks the best epoch (highest validation NDCG@10, the one training tested).",
        "",
        f"Command: `{report['command']}`",
        "",
        "| run | model | epoch | valid HR@10 | valid NDCG@10 | test HR@10 | test NDCG@10 | test / valid HR@10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        for row in run["checkpoints"]:
            ratio = "–" if row["test_over_valid_hr"] is None else f"{row['test_over_valid_hr']:.2f}"
            lines.append(
                f"| {run['run']} | {run['model']} | {row['epoch'] + 1}{' *' if row['best'] else ''} "
                f"| {row['valid']['hr@10']:.4f} | {row['valid']['ndcg@10']:.4f} "
                f"| {row['test']['hr@10']:.4f} | {row['test']['ndcg@10']:.4f} | {ratio} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (their epoch_* checkpoints)")
    parser.add_argument("--out", type=Path, required=True, help="JSON output; the markdown goes beside it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for run_dir in args.runs:
        if not run_dir.is_dir():
            raise SystemExit(f"{run_dir}: no such run directory")
    started = time.perf_counter()
    report = report_header("validation and test at each kept checkpoint, its own weights",
                           __file__, argv, "cpu")
    report |= {"load_average_start": load_average(), "runs": []}
    for run_dir in args.runs:
        result = score_run(run_dir)
        report["runs"].append(result)
        for row in result["checkpoints"]:
            print(f"{result['run']} epoch {row['epoch'] + 1:3d}{'*' if row['best'] else ' '} "
                  f"valid hr@10 {row['valid']['hr@10']:.4f} test hr@10 {row['test']['hr@10']:.4f}", flush=True)
        save_report(report, args.out, started)
    write_text_atomic(args.out.with_suffix(".md"), render_markdown(report))
    print(f"wrote {shown_path(args.out)} and {shown_path(args.out.with_suffix('.md'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
