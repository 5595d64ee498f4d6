"""One owner per run directory: a second holder is refused with the first one named, a killed
holder blocks nobody, and a released lock leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from echomamba_dist.train.runlock import LOCK_FILE, RunLock, RunLockedError


def test_second_holder_is_refused_with_the_first_named(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    with RunLock(run_dir):
        assert (run_dir / LOCK_FILE).is_file()
        with pytest.raises(RunLockedError, match=rf"runs/r: run is in use by pid {os.getpid()} on "):
            RunLock(run_dir).acquire()
    # released: the file and the directory the lock created are gone, and the run is free again
    assert not run_dir.exists()
    with RunLock(run_dir):
        pass


def test_release_keeps_a_directory_that_holds_files(tmp_path):
    run_dir = tmp_path / "r"
    with RunLock(run_dir):
        (run_dir / "epoch_000000").mkdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["epoch_000000"]


def test_a_killed_holder_does_not_block_the_next_run(tmp_path):
    run_dir = tmp_path / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from echomamba_dist.train.runlock import RunLock; "
         f"RunLock({str(run_dir)!r}).acquire(); print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"in use by pid {holder.pid} "):
            RunLock(run_dir).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert (run_dir / LOCK_FILE).is_file()  # left by the killed holder, but no longer locked
    with RunLock(run_dir) as lock:  # taken at once, and its holder is now this process
        assert lock.path.read_text().startswith(f'{{"pid": {os.getpid()}')
    assert not (run_dir / LOCK_FILE).exists()
