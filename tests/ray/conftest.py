"""Fixtures of the Ray Train tests (helpers live in ray_test_helpers.py; see its docstring for
why this directory has no __init__.py)."""

from __future__ import annotations

import pytest

from ray_test_helpers import CliRunner


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """A `CliRunner` for the module; kills whatever of its Ray is left at the end."""
    runner = CliRunner(tmp_path_factory.mktemp("cli"))
    yield runner
    runner.close()
