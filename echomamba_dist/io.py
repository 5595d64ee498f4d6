"""Atomic output: a file or directory appears whole or not at all, and never replaces what the
project did not write.

Every writer here makes a temporary sibling of its target (same directory, so that the rename is
atomic on one filesystem), fsyncs it, and renames it into place. On any failure the temporary is
removed, and so are the parent directories this call created. Problems a user can fix raise
`OutputError` (a `DataError`: the CLI prints one line and exits 2), naming the path and what was
expected: an existing path without `overwrite`; with `overwrite`, an existing path that `owned`
does not recognise as this project's output; a directory where a file is expected or the
reverse; a directory that cannot be created or written.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from echomamba_dist.errors import OutputError

Owned = Callable[[Path], bool]  # does this existing path hold this project's output?


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _make_parents(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; return those created, deepest first.

    Raises:
        OutputError: a part of the path is a file, or a directory cannot be created.
    """
    missing = []
    d = directory
    while not d.exists() and not d.is_symlink():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    if d.exists() and not d.is_dir():
        raise OutputError(f"{d}: is a file, not a directory (in the output path {directory})")
    created: list[Path] = []
    try:
        for m in reversed(missing):
            try:
                m.mkdir()
            except FileExistsError:
                if m.is_dir():  # another process made it between the check and here
                    continue
                raise
            created.insert(0, m)
    except OSError as exc:
        _remove_dirs(created)
        raise OutputError(f"{directory}: cannot create the output directory ({_reason(exc)})") from None
    return created


def _remove_dirs(created: list[Path]) -> None:
    for d in created:  # deepest first; only if still empty
        with contextlib.suppress(OSError):
            d.rmdir()


def _temp_sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.{kind}"


def _fsync(path: Path, *, directory: bool = False) -> None:
    """Flush `path` to disk; a directory only where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _check_existing_parent(p: Path) -> None:
    """The nearest existing ancestor of `p` must be a directory (a path under a file cannot be made)."""
    d = p.parent
    while not d.exists() and d.parent != d:
        d = d.parent
    if not d.is_dir():
        raise OutputError(f"{d}: is a file, not a directory (in the output path {p})")


def check_output_file(path: str | os.PathLike, *, overwrite: bool, owned: Owned | None = None,
                      what: str = "output file") -> Path:
    """Refuse an output file path early, before any work is done.

    Args:
        path: where the file will be written.
        overwrite: an existing file may be replaced (if `owned` accepts it).
        owned: recognises a file this project wrote; None: any file.
        what: names the output in messages.
    Returns:
        `path` as a Path.
    Raises:
        OutputError: `path` is a directory; it exists and not `overwrite`; it exists and `owned`
            rejects it; a parent on the way is a file.
    """
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{p}: is a directory; expected a file path for the {what}")
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise OutputError(f"{p}: exists (use --overwrite to replace it)")
        if owned is not None and not owned(p):
            raise OutputError(f"{p}: exists and is not a {what} this project wrote; --overwrite replaces only those "
                              f"(choose another path)")
    _check_existing_parent(p)
    return p


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, overwrite: bool = True, owned: Owned | None = None,
                what: str = "output file") -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on leaving the block normally it is fsynced
    and renamed onto `path`; on any error it is removed (with the parents this call created).

    Raises:
        OutputError: as `check_output_file`, or the directory cannot be created or written
            (also an OSError of the writer inside the block).
    """
    p = check_output_file(path, overwrite=overwrite, owned=owned, what=what)
    created = _make_parents(p.parent)
    tmp = _temp_sibling(p, "tmp")
    try:
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode as any new file
        except OSError as exc:
            raise OutputError(f"{p.parent}: cannot write the {what} here ({_reason(exc)})") from None
        try:
            yield tmp
            _fsync(tmp)
            _commit_file(tmp, p, overwrite=overwrite, owned=owned, what=what)
        except OSError as exc:
            raise OutputError(f"{p}: cannot write the {what} ({_reason(exc)})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _remove_dirs(created)
        raise
    _fsync(p.parent, directory=True)


def _commit_file(tmp: Path, path: Path, *, overwrite: bool, owned: Owned | None, what: str) -> None:
    if overwrite:
        check_output_file(path, overwrite=True, owned=owned, what=what)  # it may have changed meanwhile
        os.replace(tmp, path)
        return
    try:  # link: fails if `path` appeared meanwhile, where a rename would replace it
        os.link(tmp, path)
    except FileExistsError:
        raise OutputError(f"{path}: exists (use --overwrite to replace it)") from None
    except OSError:  # a filesystem without hard links
        check_output_file(path, overwrite=False, what=what)
        os.replace(tmp, path)
        return
    tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = True,
                       owned: Owned | None = None, what: str = "output file") -> None:
    """Write `data` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path, overwrite=overwrite, owned=owned, what=what) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str, *, overwrite: bool = True,
                      owned: Owned | None = None, what: str = "output file") -> None:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_file`)."""
    write_bytes_atomic(path, text.encode("utf-8"), overwrite=overwrite, owned=owned, what=what)


def write_json_atomic(path: str | os.PathLike, data: Any, *, sort_keys: bool = True, overwrite: bool = True,
                      owned: Owned | None = None, what: str = "output file") -> None:
    """Write `data` as indented JSON (and a final newline) to `path` atomically."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys, default=float) + "\n"
    write_text_atomic(path, text, overwrite=overwrite, owned=owned, what=what)


def check_output_dir(path: str | os.PathLike, *, overwrite: bool, owned: Owned | None = None,
                     what: str = "output directory") -> Path:
    """Refuse an output directory path early, before any work is done.

    An empty existing directory is always accepted (it is replaced). A non-empty one needs
    `overwrite`, and `owned` (when given) must recognise it as this project's output.

    Raises:
        OutputError: `path` is a file; it is a non-empty directory and not `overwrite`; `owned`
            rejects it; a parent on the way is a file.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p}: is a file; expected a directory for the {what}")
    try:
        non_empty = p.is_dir() and any(p.iterdir())
    except OSError as exc:
        raise OutputError(f"{p}: cannot read the output directory ({_reason(exc)})") from None
    if non_empty:
        if not overwrite:
            raise OutputError(f"{p}: output directory exists and is not empty (use --overwrite to replace it)")
        if owned is not None and not owned(p):
            raise OutputError(f"{p}: not a {what} this project wrote (it holds other files); "
                              f"--overwrite replaces only those (choose another path)")
    _check_existing_parent(p)
    return p


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False, owned: Owned | None = None,
               what: str = "output directory") -> Iterator[Path]:
    """Yield an empty staging directory beside `path` to fill; on leaving the block normally it
    replaces `path` by renames (the old directory is removed only after the new one is in place);
    on any error it is removed, with the parents this call created, and `path` is untouched.

    Raises:
        OutputError: as `check_output_dir`, or the directory cannot be created or written.
    """
    p = check_output_dir(path, overwrite=overwrite, owned=owned, what=what)
    created = _make_parents(p.parent)
    staging = _temp_sibling(p, "tmp")
    old = _temp_sibling(p, "old")
    try:
        try:
            staging.mkdir()
        except OSError as exc:
            raise OutputError(f"{p.parent}: cannot write the {what} here ({_reason(exc)})") from None
        try:
            yield staging
            for f in staging.rglob("*"):
                if f.is_file():
                    _fsync(f)
            check_output_dir(p, overwrite=overwrite, owned=owned, what=what)  # it may have changed meanwhile
            if p.exists():
                os.replace(p, old)
            try:
                os.replace(staging, p)
            except OSError:
                if old.exists():
                    os.replace(old, p)
                raise
        except OSError as exc:
            raise OutputError(f"{p}: cannot write the {what} ({_reason(exc)})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_dirs(created)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _fsync(p.parent, directory=True)


__all__ = [
    "atomic_dir", "atomic_file", "check_output_dir", "check_output_file", "write_bytes_atomic",
    "write_json_atomic", "write_text_atomic",
]
