"""Benchmark `prepare` on a large synthetic log (default 10 million interactions).

    python benchmarks/prepare_synthetic.py [--interactions 10000000] [--no-ray] [--k-core 5]

Generates the log with `generate_synthetic` into a Parquet file in a temporary directory, runs
`prepare` on it (Ray Data path unless --no-ray), and prints the statistics, the wall time of
`prepare` alone (generation excluded) and a Markdown table row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402

from echomamba_dist.config import SyntheticConfig  # noqa: E402
from echomamba_dist.data.prepare import PrepareOptions, format_stats, prepare  # noqa: E402
from echomamba_dist.data.synthetic import generate_synthetic  # noqa: E402
from echomamba_dist.distributed.prepare import prepare_on_ray  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactions", type=int, default=10_000_000, help="approximate log size")
    parser.add_argument("--mean-length", type=float, default=20.0, help="mean interactions per user")
    parser.add_argument("--items", type=int, default=100_000, help="catalogue size")
    parser.add_argument("--k-core", type=int, default=5)
    parser.add_argument("--no-ray", action="store_true", help="run the transforms in this process")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = SyntheticConfig(
        n_users=max(1, round(args.interactions / args.mean_length)),
        n_items=args.items,
        n_topics=min(200, args.items),
        mean_length=args.mean_length,
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="echomamba-bench-") as tmp:
        src = Path(tmp) / "synthetic.parquet"
        start = time.perf_counter()
        table = generate_synthetic(cfg)
        pq.write_table(table, src)
        n_rows = table.num_rows
        del table
        generated = time.perf_counter() - start
        print(f"generated {n_rows:,} interactions ({src.stat().st_size / 2**20:.0f} MiB Parquet) in {generated:.1f} s")

        start = time.perf_counter()
        run = prepare if args.no_ray else prepare_on_ray
        meta = run(src, Path(tmp) / "prepared", PrepareOptions(k_core=args.k_core))
        elapsed = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(format_stats(meta))
    path = "in-process" if args.no_ray else "Ray Data (local)"
    print(f"prepare wall time: {elapsed:.1f} s ({path}, {os.cpu_count()} CPUs, driver peak RSS {peak_mib:,.0f} MiB)")
    print(
        f"| {n_rows:,} | {meta['n_users']:,} / {meta['n_items']:,} / {meta['n_interactions']:,} | {path} | "
        f"{os.cpu_count()} CPUs, {platform.machine()} | {elapsed:.1f} s | {peak_mib:,.0f} MiB |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
