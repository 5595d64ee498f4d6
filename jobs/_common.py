"""Shared by the job entrypoints: run an `echomamba` subcommand and exit with its status.

The entrypoints hold no logic of their own: each is `python jobs/X.py ARGS` ==
`echomamba X ARGS`, runnable by `ray job submit --working-dir . -- python jobs/X.py ...`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Inside `ray job submit --working-dir .` the package may not be installed on the cluster's
# Python: the working directory holds it, so make it importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(command: str) -> None:
    from echomamba_dist.cli import main

    sys.exit(main([command, *sys.argv[1:]]))
