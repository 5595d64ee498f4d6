"""Readers: one interaction log file -> canonical Arrow batches.

Every reader yields tables with the same schema, `INTERACTION_SCHEMA`:

    user: string, item: string, timestamp: float64, rating: float64 (null when the file has none)

Formats (picked from the file name and its first line, or forced with `fmt`):

- ``sequence``: one user a line, ``user item item ...`` separated by whitespace, items already in
  order; ids must be positive integers. Each item's timestamp is its position in the file
  (0, 1, 2, ...), so file order is chronological order.
- ``atomic``: RecBole atomic file (``.inter``): tab-separated, a ``name:type`` header
  (``user_id:token item_id:token rating:float timestamp:float``).
- ``csv`` / ``tsv``: comma / tab separated, with a header naming the columns (aliases such as
  ``userId``, ``movieId``, ``asin`` are accepted) or headerless ``user,item,rating,timestamp``
  (four columns, the Amazon ratings files) or ``user,item,timestamp`` (three columns).
- ``dat``: MovieLens ``ratings.dat`` (``user::item::rating::timestamp``, headerless).
- ``parquet``: the same columns (names as for csv), ids of any type.

Ids are kept as strings: an integer id becomes its decimal text. Bad input raises `DataError`
with a one-line message naming the file, the line (text) or row/column (Parquet), and what was
expected. Text is read in a single streaming pass, so line numbers are exact and memory is one
batch.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from echomamba_dist.errors import DataError

FORMATS = ("sequence", "atomic", "csv", "tsv", "dat", "parquet")

INTERACTION_SCHEMA = pa.schema(
    [
        ("user", pa.string()),
        ("item", pa.string()),
        ("timestamp", pa.float64()),
        ("rating", pa.float64()),
    ]
)

# Column-name aliases (lower case) -> canonical column.
_ALIASES = {
    "user": ("user", "user_id", "userid", "uid", "reviewerid", "customer_id"),
    "item": ("item", "item_id", "itemid", "iid", "movieid", "movie_id", "asin", "product_id", "productid"),
    "timestamp": ("timestamp", "time", "ts", "unix_time", "unixtime", "unixreviewtime", "datetime", "date"),
    "rating": ("rating", "ratings", "score", "overall", "stars"),
}
_CANONICAL = {alias: name for name, aliases in _ALIASES.items() for alias in aliases}
_REQUIRED = ("user", "item", "timestamp")
_DELIMITER_NAMES = {",": "comma", "\t": "tab", "\x1f": "'::'"}
_NUMBER = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"
_DEFAULT_BATCH_ROWS = 1 << 20


def detect_format(path: str | os.PathLike) -> str:
    """Guess the format of an existing file from its suffix, then its first line.

    Args:
        path: an existing regular file.
    Returns:
        One of `FORMATS`.
    Raises:
        DataError: the file is missing, a directory, empty, or not UTF-8 on its first line.
    """
    p = _check_file(path)
    suffix = p.suffix.lower()
    by_suffix = {".inter": "atomic", ".csv": "csv", ".tsv": "tsv", ".dat": "dat", ".parquet": "parquet", ".pq": "parquet"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    with open(p, "rb") as f:
        head = f.read(4)
    if head == b"PAR1":
        return "parquet"
    first = _first_line(p)
    if "::" in first:
        return "dat"
    if "\t" in first:
        return "atomic" if all(":" in tok for tok in first.split("\t")) else "tsv"
    if "," in first:
        return "csv"
    return "sequence"


def iter_interactions(
    path: str | os.PathLike, fmt: str | None = None, *, batch_rows: int = _DEFAULT_BATCH_ROWS
) -> Iterator[pa.Table]:
    """Stream a log as canonical tables of at most about `batch_rows` interactions each.

    Args:
        path: the log file.
        fmt: one of `FORMATS`, or None to detect it (`detect_format`).
        batch_rows: rows per yielded table (approximately, for text formats).
    Yields:
        pyarrow.Table with `INTERACTION_SCHEMA`, in file order; at least one non-empty table.
    Raises:
        DataError: missing file, directory, empty file, header only, wrong delimiter, missing
            required column, non-numeric/empty timestamp, bad id in sequence text, non-UTF-8 bytes.
    """
    p = _check_file(path)
    if fmt is None:
        fmt = detect_format(p)
    if fmt not in FORMATS:
        raise DataError(f"{p}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "sequence":
        gen = _iter_sequence(p, batch_rows)
    elif fmt == "parquet":
        gen = _iter_parquet(p, batch_rows)
    else:
        gen = _iter_delimited(p, fmt, batch_rows)
    any_rows = False
    for table in gen:
        if table.num_rows:
            any_rows = True
            yield table
    if not any_rows:
        raise DataError(f"{p}: no interactions found (expected at least one data row)")


def read_interactions(path: str | os.PathLike, fmt: str | None = None) -> pa.Table:
    """Read a whole log into one canonical table (see `iter_interactions` for formats/errors).

    Returns:
        pyarrow.Table with `INTERACTION_SCHEMA`; sequence text keeps file order.
    """
    return pa.concat_tables(list(iter_interactions(path, fmt)))


# ----------------------------------------------------------------------------------------------
# File checks


def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file")
    if p.is_dir():
        raise DataError(f"{p}: is a directory, expected an interaction file")
    if not p.is_file():
        raise DataError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: file is empty, expected interactions")
    return p


def _decode(raw: bytes, p: Path, lineno: int) -> str:
    """A line as text; line 1 without the UTF-8 byte-order mark that spreadsheet exports write
    (pyarrow's CSV reader skips it as well)."""
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{p}: line {lineno}: column {exc.start + 1}: expected UTF-8 text, got byte 0x{raw[exc.start]:02x}"
        ) from None


def _first_line(p: Path) -> str:
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, p, lineno).strip("\r\n")
            if line.strip():
                return line
    raise DataError(f"{p}: file is empty, expected interactions")


# ----------------------------------------------------------------------------------------------
# Sequence text


def _iter_sequence(p: Path, batch_rows: int) -> Iterator[pa.Table]:
    users: list[str] = []
    items: list[str] = []
    position = 0  # global item position = synthetic timestamp
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, p, lineno)
            tokens = line.split()
            if not tokens:
                continue  # blank lines carry nothing; line numbers stay exact
            for col, tok in enumerate(tokens, 1):
                if not (tok.isascii() and tok.isdigit()) or int(tok) <= 0:  # rejects '-', '.', ',', '+'
                    what = "user id" if col == 1 else "item id"
                    raise DataError(
                        f"{p}: line {lineno}: token {col}: expected a positive integer {what} "
                        f"(space-separated), got {tok!r}"
                    )
            if len(tokens) < 2:
                raise DataError(
                    f"{p}: line {lineno}: expected a user id followed by item ids, got only {tokens[0]!r}"
                )
            user = str(int(tokens[0]))
            users.extend([user] * (len(tokens) - 1))
            items.extend(str(int(t)) for t in tokens[1:])
            if len(items) >= batch_rows:
                yield _sequence_table(users, items, position)
                position += len(items)
                users, items = [], []
    if items:
        yield _sequence_table(users, items, position)


def _sequence_table(users: list[str], items: list[str], start: int) -> pa.Table:
    n = len(items)
    return pa.table(
        {
            "user": pa.array(users, pa.string()),
            "item": pa.array(items, pa.string()),
            "timestamp": pa.array(np.arange(start, start + n, dtype=np.float64)),
            "rating": pa.nulls(n, pa.float64()),
        },
        schema=INTERACTION_SCHEMA,
    )


# ----------------------------------------------------------------------------------------------
# Delimited text: csv, tsv, atomic, dat


def _iter_delimited(p: Path, fmt: str, batch_rows: int) -> Iterator[pa.Table]:
    import pyarrow.csv as pacsv

    if fmt == "dat":
        # pyarrow only splits on one character: map '::' to the unit separator.
        data = p.read_bytes().replace(b"::", b"\x1f")
        delimiter = "\x1f"
    else:
        data = None
        delimiter = "," if fmt == "csv" else "\t"
    source = (lambda: io.BytesIO(data)) if data is not None else (lambda: open(p, "rb"))

    with source() as f:
        first_raw = f.readline()
    first = _decode(first_raw, p, 1).rstrip("\r\n")
    if not first.strip():
        raise DataError(f"{p}: line 1: expected a header or an interaction, got an empty line")
    fields = [tok.strip().strip('"') for tok in first.split(delimiter)]
    sep = _DELIMITER_NAMES[delimiter]
    if len(fields) < 3:
        raise DataError(
            f"{p}: line 1: expected at least 3 {sep}-separated columns (user, item, [rating,] timestamp), "
            f"found {len(fields)}; wrong delimiter or --format?"
        )

    has_header, columns = _columns_from_first_line(p, fmt, fields, sep)
    wanted = {c: i for i, c in enumerate(columns) if c in INTERACTION_SCHEMA.names}
    missing = [c for c in _REQUIRED if c not in wanted]
    if missing:
        raise DataError(
            f"{p}: line 1: missing required column {missing[0]!r}; found columns {', '.join(fields)}; "
            "expected user, item, timestamp and optionally rating"
        )
    names = [f"c{i}" for i in range(len(columns))]
    read_options = pacsv.ReadOptions(
        column_names=names, skip_rows=1 if has_header else 0, block_size=8 << 20, use_threads=True
    )
    parse_options = pacsv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False)
    convert_options = pacsv.ConvertOptions(
        column_types={n: pa.string() for n in names},
        include_columns=[names[i] for i in wanted.values()],
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    first_line = 2 if has_header else 1
    done = 0
    buffered: list[pa.Table] = []
    n_buffered = 0
    try:
        with source() as f:
            reader = pacsv.open_csv(f, read_options=read_options, parse_options=parse_options, convert_options=convert_options)
            for batch in reader:
                raw = pa.Table.from_batches([batch]).rename_columns(
                    [columns[int(n[1:])] for n in batch.schema.names]
                )
                table = normalize_columns(raw, source=str(p), first_line=first_line + done, unit="line")
                done += raw.num_rows
                buffered.append(table)
                n_buffered += table.num_rows
                if n_buffered >= batch_rows:
                    yield pa.concat_tables(buffered)
                    buffered, n_buffered = [], 0
    except pa.ArrowInvalid as exc:
        _locate_parse_error(p, source, delimiter, len(columns), has_header, exc)
    if buffered:
        yield pa.concat_tables(buffered)
    elif done == 0:
        raise DataError(f"{p}: line {first_line}: expected at least one interaction after the header, found none")


def _columns_from_first_line(p: Path, fmt: str, fields: list[str], sep: str) -> tuple[bool, list[str]]:
    """(has_header, canonical column names) for a delimited file's first line."""
    if fmt == "atomic":
        if not all(":" in f for f in fields):
            raise DataError(
                f"{p}: line 1: expected a RecBole header of name:type columns (e.g. user_id:token), got {fields!r}"
            )
        return True, [_CANONICAL.get(f.split(":", 1)[0].lower(), f"?{f}") for f in fields]
    lowered = [f.lower() for f in fields]
    if fmt != "dat" and any(f in _CANONICAL for f in lowered):
        return True, [_CANONICAL.get(f, f"?{f}") for f in lowered]
    if len(fields) == 4:
        return False, ["user", "item", "rating", "timestamp"]
    if len(fields) == 3:
        return False, ["user", "item", "timestamp"]
    raise DataError(
        f"{p}: line 1: expected a header naming user, item, timestamp (and rating) or 3-4 headerless "
        f"{sep}-separated columns (user, item, [rating,] timestamp), found {len(fields)} columns"
    )


def _locate_parse_error(p, source, delimiter, n_columns, has_header, exc) -> None:
    """Find the first line that pyarrow refused and raise a DataError naming it."""
    sep = _DELIMITER_NAMES[delimiter]
    with source() as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, p, lineno).rstrip("\r\n")
            if lineno == 1 and has_header:
                continue
            found = len(line.split(delimiter)) if line else 0
            if found != n_columns:
                raise DataError(
                    f"{p}: line {lineno}: expected {n_columns} {sep}-separated columns, found {found}"
                )
    first_msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise DataError(f"{p}: could not parse: {first_msg}")


# ----------------------------------------------------------------------------------------------
# Parquet


def _iter_parquet(p: Path, batch_rows: int) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{p}: expected a Parquet file: {str(exc).splitlines()[0]}") from None
    fields = pf.schema_arrow.names
    columns = {}
    for f in fields:
        canonical = _CANONICAL.get(f.lower())
        if canonical and canonical not in columns:
            columns[canonical] = f
    missing = [c for c in _REQUIRED if c not in columns]
    if missing:
        raise DataError(
            f"{p}: column {missing[0]!r}: missing required column; found columns {', '.join(fields)}; "
            "expected user, item, timestamp and optionally rating"
        )
    for canonical, f in columns.items():
        kind = pf.schema_arrow.field(f).type
        value = kind.value_type if pa.types.is_dictionary(kind) else kind
        if pa.types.is_nested(value):  # list, struct, map, union: one value a row is expected
            expected = "an id (integer or string)" if canonical in ("user", "item") else "a number or a time"
            raise DataError(
                f"{p}: column {f!r}: expected {expected} in every row, got the nested type {kind}; "
                "flatten it to one value a row (e.g. one interaction a row for a list of items)"
            )
    if pf.metadata.num_rows == 0:
        raise DataError(f"{p}: row 1: expected at least one interaction, the file has none")
    done = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=list(columns.values())):
        raw = pa.Table.from_batches([batch]).rename_columns(
            [next(c for c, f in columns.items() if f == name) for name in batch.schema.names]
        )
        yield normalize_columns(raw, source=str(p), first_line=1 + done, unit="row")
        done += raw.num_rows


# ----------------------------------------------------------------------------------------------
# Validation and casting (pure; shared by all tabular formats)


def normalize_columns(table: pa.Table, *, source: str, first_line: int, unit: str = "line") -> pa.Table:
    """Validate and cast raw columns (user, item, timestamp, optional rating) to `INTERACTION_SCHEMA`.

    Args:
        table: columns named user, item, timestamp and optionally rating, of any Arrow type.
        source: the file name used in error messages.
        first_line: the line (or row) number of the table's first row in the file.
        unit: "line" or "row", the word used in error messages.
    Returns:
        pyarrow.Table with `INTERACTION_SCHEMA` (ids as trimmed strings, numbers as float64).
    Raises:
        DataError: an empty id, or a timestamp/rating that is empty or not a number, naming the
            file, the line/row and the column.
    """
    n = table.num_rows
    out = {}
    for name in ("user", "item"):
        col = table.column(name)
        if pa.types.is_floating(col.type):
            bad = pc.invert(pc.fill_null(pc.equal(pc.floor(col), col), False))
            _raise_first(bad, col, name, "an integer or string id", source, first_line, unit)
            col = pc.cast(col, pa.int64())
        if pa.types.is_dictionary(col.type):
            col = pc.cast(col, col.type.value_type)
        col = pc.utf8_trim_whitespace(pc.cast(col, pa.string()))
        empty = pc.fill_null(pc.equal(pc.utf8_length(col), 0), True)
        _raise_first(empty, col, name, "an id", source, first_line, unit)
        out[name] = col
    out["timestamp"] = _to_float(table.column("timestamp"), "timestamp", source, first_line, unit)
    if "rating" in table.column_names:
        out["rating"] = _to_float(table.column("rating"), "rating", source, first_line, unit, allow_null=True)
    else:
        out["rating"] = pa.nulls(n, pa.float64())
    return pa.table(out, schema=INTERACTION_SCHEMA)


def _to_float(
    col: pa.ChunkedArray, name: str, source: str, first_line: int, unit: str, *, allow_null: bool = False
) -> pa.ChunkedArray:
    """float64 values of a column of numbers, number strings or times; with `allow_null`, nulls
    and empty strings become null instead of an error."""
    if pa.types.is_null(col.type):
        if allow_null:
            return pa.chunked_array([pa.nulls(len(col), pa.float64())])
        col = pc.cast(col, pa.string())  # all null: reported below
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        if not allow_null:
            _raise_first(pc.is_null(col), col, name, "a time", source, first_line, unit)
        seconds = pc.cast(pc.cast(col, pa.timestamp("us")), pa.int64())
        return pc.divide(pc.cast(seconds, pa.float64()), 1e6)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
        col = pc.cast(col, pa.float64())
        bad = pc.fill_null(pc.invert(pc.is_finite(col)), not allow_null)
        _raise_first(bad, col, name, "a finite number", source, first_line, unit)
        return col
    text = pc.utf8_trim_whitespace(pc.cast(col, pa.string()))
    empty = pc.fill_null(pc.equal(pc.utf8_length(text), 0), True)
    ok = pc.fill_null(pc.match_substring_regex(text, _NUMBER), False)
    if allow_null:
        ok = pc.or_(ok, empty)
        text = pc.if_else(empty, pa.scalar(None, pa.string()), text)
    _raise_first(pc.invert(ok), text, name, "a number", source, first_line, unit)
    return pc.cast(text, pa.float64())


def _raise_first(bad, col, name: str, expected: str, source: str, first_line: int, unit: str) -> None:
    if not pc.any(bad).as_py():
        return
    idx = int(np.flatnonzero(np.asarray(pc.fill_null(bad, True).to_numpy(zero_copy_only=False)))[0])
    value = col[idx].as_py()
    got = "an empty value" if value is None or value == "" else repr(value)
    raise DataError(f"{source}: {unit} {first_line + idx}: column {name!r}: expected {expected}, got {got}")


def canonical_column(name: str) -> str | None:
    """The canonical column ("user", "item", "timestamp", "rating") a header name maps to, or None."""
    return _CANONICAL.get(name.strip().lower())


__all__ = [
    "FORMATS",
    "INTERACTION_SCHEMA",
    "canonical_column",
    "detect_format",
    "iter_interactions",
    "normalize_columns",
    "read_interactions",
]
