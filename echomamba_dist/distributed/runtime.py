"""The one place a Ray runtime starts (`init_ray`): every command that uses Ray calls it.

- `RAY_ADDRESS` (or `address`) set: connect to that cluster.
- Otherwise a local Ray in this process, with
  - its own temporary directory (a fresh one under `RAY_TMPDIR`, else the system's), so that it
    never meets another Ray on the same machine;
  - the dashboard's API server on 127.0.0.1 at a free port, nowhere else: Ray Train's
    placement-group cleaner asks the State API whether a run's controller is alive (without it,
    it warns about once a second and cannot release the CPUs of a trial that ASHA stopped). Its
    processes find the server through `ray_compat.API_SERVER_ENV_VAR` in the job's runtime_env;
  - one logical CPU more than the training workers take, so that Ray Data always has one.

Output: the workers' output is not forwarded to the driver, and Ray's loggers in this process
report errors only, so a command prints its own lines. The lines a training run shows its user
reach the driver through the run's log file (`train.session.RUN_LOG`, followed by
`distributed.trainer`); everything Ray logs stays in its session's log files under the temp dir.
`ECHOMAMBA_RAY_OUTPUT=1` shows Ray's own output as well. Nothing here changes this process's
environment.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile

import ray

from echomamba_dist.distributed import ray_compat

OUTPUT_ENV_VAR = "ECHOMAMBA_RAY_OUTPUT"  # "1": show Ray's own output (workers' output, Ray's warnings)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_ray(*, address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` or `RAY_ADDRESS` (a cluster), else start a local Ray (see the module).

    Does nothing when Ray is already initialised in this process.

    Args:
        address: a cluster address (`ray://...`, `host:port`); None: `RAY_ADDRESS`, else local.
        num_cpus: logical CPUs of a local Ray (default: cores + 1, one spare for Ray Data).
    """
    if ray.is_initialized():
        return
    verbose = os.environ.get(OUTPUT_ENV_VAR, "") not in ("", "0")
    if not verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)  # Ray's notices in this process (e.g. token auth)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=verbose, runtime_env={"env_vars": ray_compat.worker_env_vars()})
        quiet_data()
        return
    port = _free_port()
    # short: Ray's socket paths are length-limited
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir=os.environ.get("RAY_TMPDIR") or None)
    ray.init(
        num_cpus=num_cpus or (os.cpu_count() or 1) + 1,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        log_to_driver=verbose,
        configure_logging=False,
        runtime_env={"env_vars": ray_compat.worker_env_vars(api_server=f"http://127.0.0.1:{port}")},
        **ray_compat.temp_dir_kwargs(temp_dir),
    )
    quiet_data()


def quiet_data() -> None:
    """Ray Data without progress bars or per-execution banners (in this process and the workers
    started after it: they inherit the DataContext)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
