from __future__ import annotations

import pytest

from cli_harness import build_workspace


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A workspace built once: log.csv, prepared/, runs/good/ (copied for each case)."""
    return build_workspace(tmp_path_factory.mktemp("cli-ws") / "ws")
