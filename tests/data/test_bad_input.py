"""Every row of the issue's bad-input list: a one-line DataError naming the file, the line or
column, and what was expected; no output directory (nor temporary directory) is left behind."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from echomamba_dist.data.prepare import prepare
from echomamba_dist.errors import DataError

GOOD_SEQ = "".join(f"{u} 1 2 3\n" for u in range(1, 4))

# (id, file name, content or None, prepare kwargs, regex the message must match after the file name)
CASES = [
    ("missing-file", "absent.csv", None, {}, r"no such file"),
    ("directory", "adir", "DIR", {}, r"is a directory, expected an interaction file"),
    ("empty-file", "empty.csv", "", {}, r"file is empty"),
    ("blank-file", "blank.txt", "\n\n  \n", {}, r"file is empty"),
    ("header-only-csv", "h.csv", "user,item,timestamp\n", {}, r"line 2: expected at least one interaction after the header"),
    ("header-only-inter", "h.inter", "user_id:token\titem_id:token\ttimestamp:float\n", {},
     r"line 2: expected at least one interaction after the header"),
    ("wrong-delimiter-csv", "w.csv", "user;item;timestamp\nu;i;1\n", {},
     r"line 1: expected at least 3 comma-separated columns .*found 1; wrong delimiter"),
    ("wrong-delimiter-inter", "w.inter", "user_id:token,item_id:token,timestamp:float\nu,i,1\n", {},
     r"line 1: expected at least 3 tab-separated columns .*found 1; wrong delimiter"),
    ("wrong-delimiter-seq", "w.txt", "1,2,3\n", {"fmt": "sequence"},
     r"line 1: token 1: expected a positive integer user id \(space-separated\), got '1,2,3'"),
    ("ragged-row", "r.csv", "user,item,timestamp\nu,i,1\nu,j\n", {}, r"line 3: expected 3 comma-separated columns, found 2"),
    ("missing-column", "m.csv", "user,item,rating\nu,i,4\n", {}, r"line 1: missing required column 'timestamp'"),
    ("missing-column-inter", "m.inter", "user_id:token\titem_id:token\trating:float\nu\ti\t4\n", {},
     r"line 1: missing required column 'timestamp'"),
    ("missing-column-parquet", "m.parquet", "PARQUET_NO_TS", {}, r"column 'timestamp': missing required column"),
    ("non-numeric-timestamp", "t.csv", "user,item,timestamp\nu,i,1\nu,j,abc\n", {},
     r"line 3: column 'timestamp': expected a number, got 'abc'"),
    ("empty-timestamp", "t.csv", "user,item,timestamp\nu,i,1\nu,j,\n", {},
     r"line 3: column 'timestamp': expected a number, got an empty value"),
    ("null-timestamp-parquet", "t.parquet", "PARQUET_NULL_TS", {}, r"row 2: column 'timestamp': expected a finite number"),
    ("non-integer-id-seq", "s.txt", "1 2 3\n2 4 x5\n", {}, r"line 2: token 3: expected a positive integer item id"),
    ("decimal-id-seq", "s.txt", "1 2 3\n2 4 5.0\n", {}, r"line 2: token 3: expected a positive integer item id"),
    ("zero-id-seq", "s.txt", "1 2 3\n2 0 5\n", {}, r"line 2: token 2: expected a positive integer item id, got '0'|"
     r"line 2: token 2: expected a positive integer item id \(space-separated\), got '0'"),
    ("negative-user-seq", "s.txt", "1 2 3\n-2 4 5\n", {}, r"line 2: token 1: expected a positive integer user id"),
    ("user-without-items-seq", "s.txt", "1 2 3\n2\n", {}, r"line 2: expected a user id followed by item ids"),
    ("not-utf8-csv", "u.csv", b"user,item,timestamp\nu,i,1\nu,\xffj,2\n", {}, r"line 3: column 3: expected UTF-8 text, got byte 0xff"),
    ("not-utf8-seq", "u.txt", b"1 2 3\n2 3 \xfe4\n", {}, r"line 2: column 5: expected UTF-8 text, got byte 0xfe"),
    ("not-utf8-header", "u.csv", b"us\xe9r,item,timestamp\nu,i,1\n", {}, r"line 1: column 3: expected UTF-8 text"),
    ("not-parquet", "x.parquet", "user,item,timestamp\n", {}, r"expected a Parquet file"),
    ("filter-removes-all-kcore", "k.txt", GOOD_SEQ, {"k_core": 5}, r"no interactions left after filtering \(.*k_core=5\)"),
    ("filter-removes-all-rating", "k.csv", "u,i,1,10\nv,i,2,11\n", {"min_rating": 4, "k_core": 0},
     r"no interactions left after filtering \(min_rating=4(\.0)?,"),
    ("min-rating-without-ratings", "k.txt", GOOD_SEQ, {"min_rating": 4}, r"column 'rating': --min-rating 4(\.0)? needs ratings"),
]


@pytest.mark.parametrize("name, content, kwargs, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, capsys, name, content, kwargs, pattern):
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    path = src_dir / name
    if content == "DIR":
        path.mkdir()
    elif content == "PARQUET_NO_TS":
        pq.write_table(pa.table({"user": ["u"], "item": ["i"], "rating": [1.0]}), path)
    elif content == "PARQUET_NULL_TS":
        pq.write_table(pa.table({"user": ["u", "v"], "item": ["i", "j"], "timestamp": pa.array([1.0, None])}), path)
    elif content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    out = tmp_path / "out" / "prepared"

    with pytest.raises(DataError) as info:
        prepare(path, out, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message  # names the file first
    assert re.search(pattern, message[len(str(path)) + 2 :]), message
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no temporary directory either

    # The same through the CLI: exit status 2, the message on one stderr line, no output.
    cli = pytest.importorskip("echomamba_dist.cli")
    flags = {"fmt": "--format", "k_core": "--k-core", "min_rating": "--min-rating"}
    argv = ["prepare", "--input", str(path), "--output", str(out), "--no-ray"]
    for key, value in kwargs.items():
        argv += [flags[key], str(value)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {path}: " in err and re.search(pattern, err), err
    assert not out.exists()


def test_existing_output_directory_is_kept(tmp_path, write):
    src = write("ok.txt", "".join(f"{u} 1 2 3 4 5\n" for u in range(1, 6)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=r"out: output directory exists and is not empty"):
        prepare(src, out)
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only a prepared dataset, never a directory with other files (issue 14)
    with pytest.raises(DataError, match=r"out: not a prepared dataset this project wrote"):
        prepare(src, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    prepare(src, out)  # an empty directory is filled
    first = (out / "meta.json").read_bytes()
    prepare(src, out, overwrite=True, k_core=0)  # a prepared dataset is replaced
    assert sorted(p.name for p in out.iterdir()) == ["items.parquet", "meta.json", "sequences.parquet", "users.parquet"]
    assert (out / "meta.json").read_bytes() != first  # k_core=0 recorded
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_options():
    with pytest.raises(DataError, match="--format: expected one of"):
        prepare("x.csv", "out", fmt="xlsx")
    with pytest.raises(DataError, match="--k-core: expected a non-negative integer"):
        prepare("x.csv", "out", k_core=-1)
