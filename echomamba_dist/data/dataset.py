"""The in-memory prepared dataset and the ways to get one (see docs/architecture.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from echomamba_dist.config import DataSettings, SyntheticConfig
from echomamba_dist.data.prepare import FORMAT_VERSION, PrepareOptions, prepare_table
from echomamba_dist.data.synthetic import generate_synthetic
from echomamba_dist.errors import DataError

# build_synthetic keeps every generated interaction: repeats are part of the signal.
SYNTHETIC_PREPARE = {"min_rating": None, "dedup": False, "k_core": 0}


@dataclass(frozen=True, eq=False)
class PreparedDataset:
    """Chronological item sequences of U users over items 1..n_items (0 is padding)."""

    offsets: np.ndarray  # int64 (U + 1,): user u's items are items[offsets[u]:offsets[u + 1]]
    items: np.ndarray  # int64 (total,): item indices 1..n_items, chronological per user
    n_items: int
    item_ids: np.ndarray  # object (n_items + 1,): original ids, item_ids[0] = None
    user_ids: np.ndarray  # object (U,): original id of user_idx u + 1 at u
    meta: dict

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_interactions(self) -> int:
        return int(self.offsets[-1])


def load_prepared(path: str | os.PathLike) -> PreparedDataset:
    """Load a directory written by `prepare` and check it against its meta.json.

    Raises:
        DataError: naming the file that is missing, unreadable, of another format version, or
            inconsistent with meta.json.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: expected a prepared dataset directory (run `echomamba prepare`)")
    meta_path = root / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{meta_path}: missing; expected a directory written by `echomamba prepare`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{meta_path}: expected JSON: {exc}") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(f"{meta_path}: format_version: expected {FORMAT_VERSION}, got {version!r}; prepare again")

    seq = _read(root / "sequences.parquet", {"user_idx", "items"}).sort_by("user_idx")
    items_t = _read(root / "items.parquet", {"item_idx", "item_id"}).sort_by("item_idx")
    users_t = _read(root / "users.parquet", {"user_idx", "user_id"}).sort_by("user_idx")
    n_users, n_items = seq.num_rows, items_t.num_rows
    offsets, items = _csr(seq.column("items"))
    user_idx = seq.column("user_idx").to_numpy()
    problems = [
        (root / "sequences.parquet", "user_idx", not np.array_equal(user_idx, np.arange(1, n_users + 1))),
        (root / "sequences.parquet", "items", len(items) and (items.min() < 1 or items.max() > n_items)),
        (root / "items.parquet", "item_idx", not np.array_equal(items_t.column("item_idx").to_numpy(), np.arange(1, n_items + 1))),
        (root / "users.parquet", "user_idx", users_t.num_rows != n_users),
    ]
    for file, column, bad in problems:
        if bad:
            raise DataError(f"{file}: column {column!r}: expected contiguous indices consistent with the dataset")
    for key, value in (("n_users", n_users), ("n_items", n_items), ("n_interactions", len(items))):
        if meta.get(key) != value:
            raise DataError(f"{meta_path}: {key}: expected {value} (from the Parquet files), got {meta.get(key)!r}")
    return PreparedDataset(
        offsets=offsets,
        items=items,
        n_items=n_items,
        item_ids=np.array([None] + items_t.column("item_id").to_pylist(), dtype=object),
        user_ids=np.array(users_t.column("user_id").to_pylist(), dtype=object),
        meta=meta,
    )


def build_synthetic(cfg: SyntheticConfig) -> PreparedDataset:
    """Generate the synthetic log and prepare it in memory with the same transforms as `prepare`
    (chronological grouping, remap by first appearance; no dedup and no k-core, see
    `SYNTHETIC_PREPARE`).

    Returns:
        `PreparedDataset` whose meta has source.format = "synthetic" and the config under
        source.config.
    """
    options = PrepareOptions(**SYNTHETIC_PREPARE)
    tables = prepare_table(generate_synthetic(cfg), options, source="<synthetic>")
    offsets, items = _csr(tables.sequences.column("items"))
    n_users, n_items = len(tables.user_ids), len(tables.item_ids)
    meta = {
        "format_version": FORMAT_VERSION,
        "n_users": n_users,
        "n_items": n_items,
        "n_interactions": len(items),
        "avg_length": round(len(items) / n_users, 4),
        "options": {**dataclasses.asdict(options), "fmt": None},
        "source": {"path": None, "sha256": None, "format": "synthetic", "config": dataclasses.asdict(cfg)},
    }
    return PreparedDataset(
        offsets=offsets,
        items=items,
        n_items=n_items,
        item_ids=np.array([None] + tables.item_ids.to_pylist(), dtype=object),
        user_ids=np.array(tables.user_ids.to_pylist(), dtype=object),
        meta=meta,
    )


def load_dataset(data_cfg: DataSettings) -> PreparedDataset:
    """`load_prepared(data_cfg.path)` when a path is set, else `build_synthetic(data_cfg.synthetic)`."""
    if data_cfg.path:
        return load_prepared(Path(data_cfg.path).expanduser())
    return build_synthetic(data_cfg.synthetic)


def dataset_fingerprint(ds: PreparedDataset) -> str:
    """A stable 16-hex-character id of the sequences: sha256 over offsets and items (int64 LE)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ds.offsets, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(ds.items, dtype="<i8").tobytes())
    return h.hexdigest()[:16]


def _read(file: Path, columns: set[str]) -> pa.Table:
    try:
        table = pq.read_table(file)
    except FileNotFoundError:
        raise DataError(f"{file}: missing; expected a directory written by `echomamba prepare`") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{file}: expected a Parquet file: {str(exc).splitlines()[0]}") from None
    missing = sorted(columns - set(table.column_names))
    if missing:
        raise DataError(f"{file}: column {missing[0]!r}: missing; found {', '.join(table.column_names)}")
    return table


def _csr(lists: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 (U + 1,), values int64) of a list<int64> column."""
    arr = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.r_[0, np.cumsum(lengths)].astype(np.int64), values


__all__ = ["PreparedDataset", "build_synthetic", "dataset_fingerprint", "load_dataset", "load_prepared"]
