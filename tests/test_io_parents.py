"""Output parents made by two processes at once (two benchmarks/seeds.py workers writing into the
same new runs directory): a directory made by the other process between the existence check and
mkdir is taken as it is, never reported as an error, and never removed on a later failure."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from echomamba_dist import io
from echomamba_dist.errors import OutputError


def _race(monkeypatch, target: Path, make) -> None:
    """Before this process's mkdir of `target`, `make(target)` runs, as another process would."""
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == target:
            make(target)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


def test_parent_made_by_another_process_meanwhile_is_used(tmp_path, monkeypatch):
    shared = tmp_path / "runs" / "seeds"
    _race(monkeypatch, shared, lambda d: os.mkdir(d))
    out = shared / "video-games" / "report.json"
    io.write_json_atomic(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1}


def test_only_directories_this_call_made_are_removed_on_failure(tmp_path, monkeypatch):
    shared = tmp_path / "runs"
    _race(monkeypatch, shared, lambda d: os.mkdir(d))
    out = shared / "mine" / "report.json"
    with pytest.raises(RuntimeError, match="writer failed"):
        with io.atomic_file(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert shared.is_dir()  # the other process's directory stays
    assert not (shared / "mine").exists()  # this call's own is removed
    assert list(shared.iterdir()) == []  # no temporary file left


def test_a_file_made_meanwhile_is_still_an_error(tmp_path, monkeypatch):
    shared = tmp_path / "runs"
    _race(monkeypatch, shared, lambda d: d.write_text("not a directory"))
    with pytest.raises(OutputError, match=r"runs.*cannot create the output directory"):
        io.write_json_atomic(shared / "report.json", {"a": 1})
    assert shared.read_text() == "not a directory"  # not the project's: left as it was


def test_threads_writing_into_one_new_directory_all_succeed(tmp_path):
    shared = tmp_path / "a" / "b" / "c"
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def write(i: int) -> None:
        start.wait()
        try:
            io.write_json_atomic(shared / f"w{i}.json", {"i": i})
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in shared.iterdir()) == [f"w{i}.json" for i in range(8)]
