"""Shared helpers for the data tests: the shared datasets and small files written on the fly."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def shared_file(name: str) -> Path:
    """A dataset from ../shared/data, or skip the test (with the reason) when it is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not found (the shared datasets live beside the project)")
    return path


@pytest.fixture
def write(tmp_path):
    """write(name, content) -> Path: a file in tmp_path from str (UTF-8) or bytes."""

    def _write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        return path

    return _write
