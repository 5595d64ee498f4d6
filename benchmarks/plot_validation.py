"""Validation NDCG@10 per epoch for the models of a Table 2 run, from the runs' own histories.

    python benchmarks/plot_validation.py                       # docs/results/table2-beauty-cli.json
    python benchmarks/plot_validation.py --report docs/results/table2-beauty.json --out docs/validation_beauty.png

Reads a report of `benchmarks/table2.py` (the harness or `--collect`): every run record keeps
the validation metric after each of its epochs (`valid_history`, the run's checkpoint history).
Draws one line per run, its best epoch (the one whose weights were tested) marked; the
EchoMamba4Rec variant study, when the report has one, goes in a second panel. Trains and
measures nothing; prints each run's best epoch and value, and writes the PNG atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from echomamba_dist.io import atomic_file  # noqa: E402
from table2 import DISPLAY, ROWS, other_variant  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def curves(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One curve per run with a history: label, epochs (1-based), values, best epoch, and
    whether it belongs to the variant study (a non-default EchoMamba4Rec variant, or the default
    when the report has variants)."""
    runs = [r for r in report["runs"] if any(v is not None for v in r.get("valid_history") or [])]
    if not runs:
        raise SystemExit("the report's runs carry no validation history (valid_history)")
    seeds = {r.get("seed") for r in runs}
    samples = {}
    for r in runs:
        samples.setdefault(r["model"], set()).add(r.get("samples"))
    has_study = any(other_variant(r) for r in runs)
    out = []
    for r in runs:
        label = DISPLAY.get(r["model"], r["model"])
        variant = other_variant(r)
        if variant:
            label += f" ({variant})"
        if len(samples[r["model"]]) > 1:  # one model on both kinds of rows: name the rows
            label += f", {ROWS.get(r['samples'], r['samples'])}"
        if len(seeds) > 1:
            label += f", seed {r['seed']}"
        points = [(e + 1, v) for e, v in enumerate(r["valid_history"]) if v is not None]
        out.append({
            "run": r.get("run_name", label), "label": label, "epochs": [e for e, _ in points],
            "values": [v for _, v in points], "best_epoch": int(r["best_epoch"]) + 1,
            "study": has_study and r["model"] == "echomamba4rec" and r.get("variant") is not None,
            "table": not variant,
        })
    return out


def plot(report: dict[str, Any], lines: list[dict[str, Any]], path: Path) -> None:
    """The table's runs (left) and the variant study (right, when there is one) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report.get("settings", {}).get("metric", "ndcg@10").upper()
    panels = [("the table's models", [c for c in lines if c["table"]])]
    if any(c["study"] for c in lines):
        panels.append(("EchoMamba4Rec variant study", [c for c in lines if c["study"]]))
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 4.8), squeeze=False)
    for ax, (title, group) in zip(axes[0], panels):
        for c in group:
            (line,) = ax.plot(c["epochs"], c["values"], linewidth=1.3, label=c["label"])
            best = c["values"][c["epochs"].index(c["best_epoch"])] if c["best_epoch"] in c["epochs"] else None
            if best is not None:
                ax.plot([c["best_epoch"]], [best], marker="o", color=line.get_color(), markersize=5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {metric}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    name = report.get("dataset", {}).get("name", "")
    fig.suptitle(f"Validation {metric} after each epoch, {name} (dot: best epoch, whose weights were tested)",
                 fontsize=10)
    fig.tight_layout()
    with atomic_file(path, what="figure") as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "results" / "table2-beauty-cli.json",
                        help="a benchmarks/table2.py JSON report")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "validation_ndcg.png", help="the PNG to write")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text(encoding="utf-8"))
    lines = curves(report)
    for c in lines:
        best = max(c["values"])
        print(f"{c['run']:<40} {c['label']:<36} {len(c['epochs']):4d} epochs  best {best:.4f} at epoch "
              f"{c['epochs'][c['values'].index(best)]}")
    plot(report, lines, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
