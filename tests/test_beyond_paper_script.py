"""scripts/beyond_paper_runs.sh --dry-run: the steps of docs/beyond-the-paper.md in their order,
run directories under RUNS, repository paths relative, and the search skipped once it has ended."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "beyond_paper_runs.sh"


def _dry_run(runs: Path, script: Path = SCRIPT, **extra: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "DEADLINE"}  # only the one given
    env.update(RUNS=str(runs), SEEDS="1 2", PYTHON="python", **extra)
    proc = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, timeout=60, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _before_the_search(tmp_path: Path) -> Path:
    """The script in a checkout whose search has not ended (no docs/results/tune-beauty-cpu/best.yaml)."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy2(SCRIPT, checkout / "scripts" / SCRIPT.name)
    return checkout / "scripts" / SCRIPT.name


def _index(lines: list[str], *needles: str) -> int:
    found = [i for i, line in enumerate(lines) if all(n in line for n in needles)]
    assert len(found) == 1, (needles, lines)
    return found[0]


def test_the_steps_in_order_with_runs_outside_the_repository(tmp_path):
    runs = tmp_path / "runs"
    lines = _dry_run(runs, _before_the_search(tmp_path))
    tune = _index(lines, "echomamba_dist.cli tune --config jobs/configs/tune-beauty-cpu.yaml")
    assert f"--set run.storage_path={runs} --set tune.storage_path={runs}/tune" in lines[tune]
    report = _index(lines, "benchmarks/study_report.py")
    assert f"--study {runs}/tune/beauty-echomamba4rec-cpu --out docs/results/tune-beauty-cpu" in lines[report]
    # two workers, each given every training run in the same order (seeds.py's run locks share them out)
    beauty = ("seeds.py --seeds 1 2 --set data.path=prepared/amazon-beauty", "echomamba4rec-tuned=", "sasrec=",
              "bimamba4rec=", "--set train.epochs=300 --set train.patience=10")
    bert = ("seeds.py --seeds 1 --set data.path=prepared/amazon-beauty", "bert4rec-prefix=jobs/configs/beauty-bert4rec-prefix.yaml")
    games = ("seeds.py --seeds 1 2 --set data.path=prepared/amazon-video-games", "echomamba4rec-tuned=", "--config sasrec=")
    workers = [[_index(lines, *needles, f"-worker{n}.json") for needles in (beauty, bert, games)] for n in (1, 2)]
    for steps in workers:
        assert report < steps[0] < steps[1] < steps[2]
    assert [lines[i].replace("worker2", "worker1") for i in workers[1]] == [lines[i] for i in workers[0]]
    tables = [i for i, line in enumerate(lines) if "--report-only" in line]
    assert len(tables) == 3 and min(tables) > max(max(w) for w in workers)
    assert "--out docs/results/seeds-beauty.json" in lines[tables[0]] and all(n in lines[tables[0]] for n in beauty[1:])
    assert "--out docs/results/bert4rec-prefix-beauty.json" in lines[tables[1]] and "--seeds 1 " in lines[tables[1]]
    assert "--out docs/results/seeds-video-games.json" in lines[tables[2]] and "bimamba4rec=" not in lines[tables[2]]
    for line in lines:  # training runs only under RUNS; nothing of this machine's paths in the repo's reports
        if "--runs" in line:
            assert f"--runs {runs}/seeds/" in line
            # and every finished run's record is kept in the repository, by dataset
            sub = "video-games" if "amazon-video-games" in line else "beauty"
            assert f"--archive docs/results/seeded-runs/{sub} " in line
        assert str(REPO) not in line.replace(f"data.path={REPO}/prepared", "")
    assert not (runs / "tune").exists() and not (runs / "seeds").exists()  # a dry run runs nothing


def test_an_ended_search_is_not_run_again(tmp_path):
    runs = tmp_path / "runs"
    study = runs / "tune" / "beauty-echomamba4rec-cpu"
    study.mkdir(parents=True)
    (study / "results.parquet").write_bytes(b"")
    lines = _dry_run(runs)
    steps = [line for line in lines if "cli prepare" not in line]  # preparing: only where data is missing
    assert not any("cli tune" in line for line in steps)
    assert "benchmarks/study_report.py" in steps[0] and len(steps) == 10


def test_an_ended_search_needs_no_study_directory(tmp_path):
    """On a machine without the study's directory (another machine, a fresh one), the search that
    ended (its best.yaml in docs/results) is neither run again nor reported again: training starts."""
    assert (REPO / "docs" / "results" / "tune-beauty-cpu" / "best.yaml").is_file()
    steps = [line for line in _dry_run(tmp_path / "runs") if "cli prepare" not in line]
    assert not any("cli tune" in line or "study_report.py" in line for line in steps)
    assert "seeds.py" in steps[0] and "echomamba4rec-tuned=docs/results/tune-beauty-cpu/best.yaml" in steps[0]
    assert len(steps) == 9


def test_a_deadline_reaches_the_workers_not_the_tables(tmp_path):
    """DEADLINE (a machine lent for a fixed time): every training step starts no run expected to end
    after it (seeds.py --deadline); the tables are written whatever the time."""
    lines = [line for line in _dry_run(tmp_path / "runs", DEADLINE="17:00") if "seeds.py" in line]
    training = [line for line in lines if "--report-only" not in line]
    assert len(training) == 6 and all(line.endswith(" --deadline 17:00") for line in training)
    assert not any("--deadline" in line for line in lines if "--report-only" in line)
    assert not any("--deadline" in line for line in _dry_run(tmp_path / "runs"))


def test_a_failed_step_says_which_and_where_its_output_is(tmp_path):
    """A step that fails is named, with its exit status and its log under RUNS, in the script's
    own output (not only in the step's log), and the script exits non-zero."""
    script = _before_the_search(tmp_path)
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho 'cannot create the output directory' >&2\nexit 3\n")
    fake.chmod(0o755)
    runs = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k != "DEADLINE"}
    env.update(RUNS=str(runs), PYTHON=str(fake))
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60, env=env, cwd="/")
    assert proc.returncode == 3
    assert f"failed (exit 3), its output in {runs}/prepare.log: {fake} -m ..." in proc.stderr
    log = (runs / "prepare.log").read_text()
    assert "cannot create the output directory" in log and "failed (exit 3)" in log
    assert "seeds.py" not in proc.stdout  # nothing after the failed step
