"""Every use of Ray that is not Ray's public API, in one place, with the Ray version it targets.

Each item below reaches past Ray's public API because the public one does not do the job (the
reason is beside it). `tests/ray/test_ray_compat.py` checks each against the installed Ray and
fails when that Ray changes any of them, so that an upgrade is a known list of things to re-check,
not silent breakage.

Targets Ray 2.60 (Train V2).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

TARGET_RAY_VERSION = "2.60.0"

# ray.init's root temporary directory argument (documented in ray.init's docstring, but
# underscored): a local Ray of ours keeps its sockets, logs and session files apart from any other
# Ray on the machine, without setting RAY_TMPDIR for the whole process.
INIT_TEMP_DIR_ARG = "_temp_dir"

# Ray Train restores a run from the checkpoints listed in this file of the run directory; a run
# started with run.resume=false removes it so that Ray starts afresh (the public API has no
# "do not restore" switch). ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME.
CHECKPOINT_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"

# Ray 2.60's TuneReportCallback passes Train's reports to Tune through this one-slot queue, which
# Tune reads only while the trial's function runs: a report still queued when the function returns
# is lost (the trial would end without its last epoch).
REPORT_QUEUE_ATTR = "_training_actor_item_queue"

# Where Ray's State API client looks first for the dashboard's API server (before RAY_ADDRESS and
# the cluster files); Train's placement-group cleaner asks that API whether a run's controller is
# alive. ray._private.ray_constants.RAY_API_SERVER_ADDRESS_ENVIRONMENT_VARIABLE.
API_SERVER_ENV_VAR = "RAY_API_SERVER_ADDRESS"

# What WorkerGroupError's message starts with, before the failing workers' tracebacks.
WORKER_GROUP_ERROR_PREFIX = "Training failed due to worker errors:\n"


def temp_dir_kwargs(path: str | os.PathLike) -> dict[str, Any]:
    """`ray.init` keyword arguments that give a local Ray its own temporary directory."""
    return {INIT_TEMP_DIR_ARG: str(Path(path).resolve())}


def worker_env_vars(*, api_server: str | None = None) -> dict[str, str]:
    """Environment variables for every Ray process of our jobs (a value the user set wins).

    Args:
        api_server: the dashboard's API server URL of a local Ray (e.g. http://127.0.0.1:8265).
    """
    if api_server is None:
        return {}
    return {API_SERVER_ENV_VAR: os.environ.get(API_SERVER_ENV_VAR, api_server)}


def worker_tracebacks(exc: BaseException) -> str:
    """The failing workers' tracebacks of a WorkerGroupError, without its leading line."""
    return str(exc).removeprefix(WORKER_GROUP_ERROR_PREFIX)


def forget_checkpoints(run_dir: Path) -> None:
    """Make Ray Train start the run in `run_dir` afresh instead of restoring its checkpoints."""
    (Path(run_dir) / CHECKPOINT_SNAPSHOT_FILE).unlink(missing_ok=True)


def wait_until_reports_forwarded(callback: Any, *, timeout: float = 120.0) -> None:
    """Return once Tune has taken the last report from a TuneReportCallback's queue.

    Without the queue (another Ray version) this returns at once: the last report may be lost,
    which the compat test catches first.
    """
    queue = getattr(callback, REPORT_QUEUE_ATTR, None)
    if queue is None:
        return
    deadline = time.monotonic() + timeout
    while not queue.empty() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # Tune files the report it just took before it sees the function end
