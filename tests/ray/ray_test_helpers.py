"""Helpers of the Ray Train tests: tiny configs, `echomamba` subprocesses, process checks.

There is deliberately no `__init__.py` in tests/ray: with pytest's default (prepend) import mode
a package named `ray` there would shadow the real Ray. The modules here are imported by their
bare names, so every name is unique in the test suite (`test_ray_*.py`, `ray_test_helpers.py`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def tiny_config(root: Path, **sections) -> dict:
    """A seconds-long training config (2 Ray workers) with its runs under `root`."""
    cfg = {
        "data": {"synthetic": {"n_users": 200, "n_items": 60, "n_topics": 4, "mean_length": 9.0}, "max_len": 12},
        "model": {"name": "echomamba4rec", "hidden_size": 16, "d_state": 8, "max_len": 12},
        "train": {"epochs": 2, "batch_size": 128, "eval_batch_size": 256, "num_workers": 2, "progress": False},
        "run": {"name": "t", "storage_path": str(root / "runs")},
        "tracking": {"enabled": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_tmpdir(prefix: str) -> Path:
    """A short directory for Ray's temp files (its socket paths must stay under 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains `text` (how we find our own Ray)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def wait_until_gone(text: str, *, timeout: float) -> list[int]:
    """Wait until no process mentions `text`; return those still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        left = processes_mentioning(text)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class CliRunner:
    """Runs `echomamba` in a subprocess with its own local Ray under a private temp dir."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.ray_tmp = short_tmpdir("rt")

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        env["RAY_TMPDIR"] = str(self.ray_tmp)  # our local Ray's files and processes are findable
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def command(self, args: list[str]) -> list[str]:
        return [sys.executable, "-m", "echomamba_dist.cli", *args]

    def run(self, args: list[str], *, env: dict[str, str] | None = None, timeout: float = 480) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(args), cwd=self.cwd, capture_output=True, text=True, env=self.env(env), timeout=timeout,
        )

    def popen(self, args: list[str], *, env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(args), cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=self.env(env), start_new_session=True,
        )

    def leftover(self, *, timeout: float = 60) -> list[int]:
        """Processes of our local Ray still alive after `timeout` seconds."""
        return wait_until_gone(str(self.ray_tmp), timeout=timeout)

    def close(self) -> None:
        kill_all(processes_mentioning(str(self.ray_tmp)))
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
