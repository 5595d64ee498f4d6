"""One owner per run directory: an advisory lock that dies with its process.

A trainer takes `RunLock(run_dir)` for its whole run (in one process: `train_per_worker` with a
`LocalSession`; on Ray: the driver in `ray_train.fit`, never the workers). The lock is
`fcntl.flock` on `run_dir/.run.lock`, so the kernel releases it when the holder exits, however it
exits: a SIGKILL'd trainer never blocks the next one. The file holds who has it (pid, host, start
time), which a refused second trainer names. On release the file is removed, and so is the run
directory if the lock created it and nothing else was written there.

flock works between processes of one machine, and on NFS (Linux maps it to a POSIX lock there).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from echomamba_dist.errors import CheckpointError

LOCK_FILE = ".run.lock"


class RunLockedError(CheckpointError):
    """The run directory is owned by another trainer that is still running."""


class RunLock:
    """An exclusive, non-blocking lock on a run directory; a context manager.

    Args:
        run_dir: the run directory (created if missing, and removed again on release when the
            lock created it and it is still empty).
    Raises (on acquire):
        RunLockedError: another live process holds the run, named in the message.
        CheckpointError: the run directory cannot be created or the lock file not written.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        try:
            self._created_dir = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    os.close(fd)
                    if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    self._cleanup_dir()
                    raise RunLockedError(
                        f"{self.run_dir}: run is in use by {describe_holder(self.path)}; wait for it to end, "
                        "or train under another run.name"
                    ) from None
                # the holder may have released and removed the file between our open and flock:
                # then we locked a dead inode, and try again on the path's current file
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:200]}
            os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
        except OSError as exc:
            self._cleanup_dir()
            raise CheckpointError(f"{self.path}: cannot lock the run directory: {exc.strerror or exc}") from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file (while still holding it), then unlock. Safe to call twice."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self._created_dir:
            try:
                self.run_dir.rmdir()  # only when empty: a run that wrote nothing leaves nothing
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def describe_holder(path: str | os.PathLike) -> str:
    """'pid 123 on host h (since 2024-...)' from a lock file, or a placeholder when unreadable."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']} (since {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (just starting)"  # it holds the lock but has not written yet
