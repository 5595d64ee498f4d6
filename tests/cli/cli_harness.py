"""Drive the `echomamba` CLI with one careless or bad input per case, and check that nothing was harmed.

A case is a row of a table: the command line, the exit status, and a phrase (regex) of the one
line it prints on stderr. `run_case` copies a ready workspace (a CSV log, a prepared dataset, a
trained run), lets the case's `setup` change it, snapshots every file, runs the command in
process, and then checks that every file that existed before is byte-identical and that no new
file (partial output, temporary file) is left behind.
"""

from __future__ import annotations

import re
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from echomamba_dist import cli

WS = "{ws}"  # replaced by the workspace directory in argv

# a tiny EchoMamba4Rec that trains in seconds, in this process, without MLflow
TINY_TRAIN = (
    "--set", "train.ray=false", "--set", "train.progress=false", "--set", "tracking.enabled=false",
    "--set", "model.hidden_size=8", "--set", "model.d_state=4", "--set", "data.max_len=10",
    "--set", "train.batch_size=64", "--set", "train.eval_batch_size=64",
    "--set", "run.storage_path={ws}/runs",
)


@dataclass(frozen=True)
class Case:
    """One row: `argv` (with `{ws}` for the workspace), the exit `status`, a regex `phrase` of
    stderr, an optional `setup(ws)` run before the snapshot, and `changes`: workspace-relative
    paths the command may create or change (e.g. the output of a successful overwrite); a
    directory covers everything under it."""

    id: str
    argv: tuple[str, ...]
    status: int
    phrase: str
    setup: Callable[[Path], None] | None = None
    changes: tuple[str, ...] = field(default=())


def write_log(path: Path, n_users: int = 30, n_items: int = 12, length: int = 8) -> Path:
    """A small user,item,timestamp CSV in which every user and item has >= 5 interactions."""
    rows = ["user,item,timestamp"]
    for u in range(n_users):
        for t in range(length):
            rows.append(f"u{u},i{(u * 5 + t) % n_items},{1000 + 10 * u + t}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def build_workspace(root: Path) -> Path:
    """log.csv, prepared/ (from it) and runs/good/ (a finished tiny run on prepared/)."""
    root.mkdir(parents=True, exist_ok=True)
    write_log(root / "log.csv")
    assert cli.main(["prepare", "--input", str(root / "log.csv"), "--output", str(root / "prepared"), "--no-ray"]) == 0
    argv = ["train", *[a.replace(WS, str(root)) for a in TINY_TRAIN],
            "--set", f"data.path={root / 'prepared'}", "--set", "run.name=good", "--set", "train.epochs=2"]
    assert cli.main(argv) == 0
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes); directories as entries ending in '/'."""
    out: dict[str, bytes] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel + "/" if p.is_dir() else rel] = b"" if p.is_dir() else p.read_bytes()
    return out


def run_case(case: Case, base: Path, tmp_path: Path, capsys) -> str:
    """Run `case` on a copy of workspace `base`; assert status, message and untouched files.

    Returns the stderr text (for extra assertions by the caller)."""
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    if case.setup is not None:
        case.setup(ws)
    before = snapshot(ws)
    argv = [a.replace(WS, str(ws)) for a in case.argv]
    capsys.readouterr()
    try:
        status = cli.main(argv)
    except SystemExit as exc:  # argparse
        status = exc.code
    except BaseException:  # a traceback is a failure of the case, whatever it was
        raise AssertionError(f"{case.id}: traceback instead of exit {case.status}:\n{traceback.format_exc()}") from None
    err = capsys.readouterr().err
    assert status == case.status, f"{case.id}: exit {status}, expected {case.status}; stderr: {err}"
    assert re.search(case.phrase, err), f"{case.id}: stderr {err!r} does not match {case.phrase!r}"
    if case.status == 2:
        assert err.strip() and "\n" not in err.strip(), f"{case.id}: expected one line, got {err!r}"
        assert "Traceback" not in err
    after = snapshot(ws)
    changed = [p for p, data in before.items() if not _allowed(p, case.changes) and after.get(p) != data]
    assert not changed, f"{case.id}: files changed or removed: {changed}"
    new = [p for p in after if p not in before and not _allowed(p, case.changes)]
    assert not new, f"{case.id}: files left behind: {new}"
    return err


def _allowed(path: str, allowed: tuple[str, ...]) -> bool:
    """Whether snapshot entry `path` is one of `allowed` or lies under one of them."""
    return any(path.rstrip("/") == a.rstrip("/") or path.startswith(a.rstrip("/") + "/") for a in allowed)
