"""Readers: every format to the same canonical table; formats detected or forced."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from echomamba_dist.data.readers import INTERACTION_SCHEMA, detect_format, iter_interactions, read_interactions

EXPECTED = {
    "user": ["u1", "u1", "u2"],
    "item": ["a", "b", "a"],
    "timestamp": [10.0, 20.0, 15.0],
    "rating": [4.0, 2.0, 5.0],
}


def _check(table: pa.Table, expected: dict) -> None:
    assert table.schema == INTERACTION_SCHEMA
    assert table.to_pydict() == expected


@pytest.mark.parametrize(
    "name, content, fmt",
    [
        ("log.csv", "user,item,rating,timestamp\nu1,a,4,10\nu1,b,2,20\nu2,a,5,15\n", "csv"),
        ("log.csv", "userId,movieId,rating,timestamp\nu1,a,4.0,10\nu1,b,2,20\nu2,a,5,1.5e1\n", "csv"),
        ("log.csv", "u1,a,4,10\nu1,b,2,20\nu2,a,5,15\n", "csv"),  # headerless Amazon ratings
        ("log.tsv", "timestamp\trating\titem\tuser\n10\t4\ta\tu1\n20\t2\tb\tu1\n15\t5\ta\tu2\n", "tsv"),
        ("ratings.dat", "u1::a::4::10\nu1::b::2::20\nu2::a::5::15\n", "dat"),
        (
            "log.inter",
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\ta\t4\t10\nu1\tb\t2\t20\nu2\ta\t5\t15\n",
            "atomic",
        ),
        ("log.csv", "user,item,rating,timestamp\r\nu1,a,4,10\r\nu1,b,2,20\r\nu2,a,5,15\r\n", "csv"),
    ],
)
def test_delimited_formats(write, name, content, fmt):
    path = write(name, content)
    assert detect_format(path) == fmt
    _check(read_interactions(path), EXPECTED)


def test_three_columns_without_rating(write):
    path = write("log.csv", "u1,a,10\nu2,b,11\n")
    table = read_interactions(path)
    assert table.column("rating").null_count == 2
    assert table.column("timestamp").to_pylist() == [10.0, 11.0]


def test_sequence_text_keeps_order_and_numbers_positions(write):
    path = write("seq.txt", "1 5 3\n\n2 3 007\n")
    assert detect_format(path) == "sequence"
    _check(
        read_interactions(path),
        {"user": ["1", "1", "2", "2"], "item": ["5", "3", "3", "7"], "timestamp": [0.0, 1.0, 2.0, 3.0],
         "rating": [None] * 4},
    )


def test_sequence_text_streams_in_batches(write):
    path = write("seq.txt", "".join(f"{u} {u + 1} {u + 2}\n" for u in range(1, 11)))
    batches = list(iter_interactions(path, batch_rows=4))
    assert len(batches) > 1
    assert pa.concat_tables(batches).column("timestamp").to_pylist() == [float(i) for i in range(20)]


def test_parquet_with_integer_ids_and_aliases(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"userId": [1, 1, 2], "asin": ["a", "b", "a"], "time": [10, 20, 15],
                             "overall": [4.0, 2.0, 5.0], "extra": [0, 0, 0]}), path)
    assert detect_format(path) == "parquet"
    _check(read_interactions(path), {**EXPECTED, "user": ["1", "1", "2"]})


def test_format_override(write):
    path = write("log.txt", "u1,a,4,10\nu1,b,2,20\nu2,a,5,15\n")
    assert detect_format(path) == "csv"
    _check(read_interactions(path, "csv"), EXPECTED)
    tsv = write("weird.data", "u1\ta\t4\t10\nu1\tb\t2\t20\nu2\ta\t5\t15\n")
    _check(read_interactions(tsv, "tsv"), EXPECTED)


def test_csv_streams_with_exact_line_numbers(write):
    rows = "".join(f"u{i},i{i},{i}\n" for i in range(5000))
    path = write("big.csv", "user,item,timestamp\n" + rows + "u,i,oops\n")
    from echomamba_dist.errors import DataError

    with pytest.raises(DataError, match=r"line 5002: column 'timestamp': expected a number, got 'oops'"):
        read_interactions(path)


def test_missing_ratings_are_null_not_errors(write, tmp_path):
    table = read_interactions(write("log.csv", "user,item,rating,timestamp\nu,a,,1\nu,b,3,2\n"))
    assert table.column("rating").to_pylist() == [None, 3.0]
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user": ["u", "v"], "item": ["a", "b"], "timestamp": [1, 2], "rating": pa.nulls(2)}), path)
    assert read_interactions(path).column("rating").null_count == 2


def test_parquet_time_column_becomes_seconds(tmp_path):
    import datetime as dt

    path = tmp_path / "log.parquet"
    times = [dt.datetime(1970, 1, 1, 0, 0, 10), dt.datetime(1970, 1, 1, 0, 1, 0)]
    pq.write_table(pa.table({"user": ["u", "u"], "item": ["a", "b"], "timestamp": pa.array(times, pa.timestamp("s"))}), path)
    assert read_interactions(path).column("timestamp").to_pylist() == [10.0, 60.0]


# ----------------------------------------------------------------------------------------------
# A byte-order mark; nested Parquet columns (issue 14)

from echomamba_dist.errors import DataError  # noqa: E402

BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize(
    "name, content",
    [
        ("log.csv", "user,item,rating,timestamp\nu1,a,4,10\nu1,b,2,20\nu2,a,5,15\n"),  # a spreadsheet's export
        ("log.csv", "u1,a,4,10\nu1,b,2,20\nu2,a,5,15\n"),
        ("log.tsv", "user\titem\trating\ttimestamp\nu1\ta\t4\t10\nu1\tb\t2\t20\nu2\ta\t5\t15\n"),
        ("ratings.dat", "u1::a::4::10\nu1::b::2::20\nu2::a::5::15\n"),
    ],
)
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_column(write, name, content):
    _check(read_interactions(write(name, BOM + content.encode("utf-8"))), EXPECTED)


def test_a_byte_order_mark_before_sequence_text(write):
    table = read_interactions(write("seq.txt", BOM + b"1 5 6\n2 5\n"))
    assert table.column("user").to_pylist() == ["1", "1", "2"]
    assert table.column("item").to_pylist() == ["5", "6", "5"]


@pytest.mark.parametrize(
    "column, values, needle",
    [
        ("item", pa.array([[1, 2], [3]]), r"column 'item': expected an id \(integer or string\) in every row, "
                                          r"got the nested type list<element: int64>"),
        ("user", pa.array([{"id": 1}, {"id": 2}]), r"column 'user': expected an id .* got the nested type struct<id: int64>"),
        ("timestamp", pa.array([[1.0], [2.0]]), r"column 'timestamp': expected a number or a time .* nested type list"),
        ("rating", pa.array([{"stars": 4}, {"stars": 5}]), r"column 'rating': expected a number .* nested type struct"),
    ],
)
def test_nested_parquet_columns_are_refused_naming_the_column(tmp_path, column, values, needle):
    data = {"user": pa.array([1, 2]), "item": pa.array([1, 2]), "timestamp": pa.array([1.0, 2.0])}
    data[column] = values  # rating: an optional column, still checked when present
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table(data), path)
    with pytest.raises(DataError, match=rf"log\.parquet: {needle}"):
        read_interactions(path)
