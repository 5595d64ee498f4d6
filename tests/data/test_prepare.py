"""`prepare` end to end: the paper's exact statistics, atomic output, and Ray == in-process."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from echomamba_dist.data.dataset import load_prepared
from echomamba_dist.data.prepare import PrepareOptions, file_sha256, format_stats, prepare

from .conftest import shared_file

FILES = ("sequences.parquet", "items.parquet", "users.parquet", "meta.json")


def test_amazon_beauty_statistics_are_exact(tmp_path):
    src = shared_file("amazon-beauty.txt")
    meta = prepare(src, tmp_path / "beauty")
    assert (meta["n_users"], meta["n_items"], meta["n_interactions"]) == (22363, 12101, 198502)
    text = format_stats(meta)
    assert "22,363" in text and "12,101" in text and "198,502" in text
    ds = load_prepared(tmp_path / "beauty")
    # The file is already 5-core with ids 1..n in order of appearance: prepare is the identity.
    lines = src.read_text().splitlines()
    assert ds.user_ids[:3].tolist() == ["1", "2", "3"] and ds.item_ids[:3].tolist() == [None, "1", "2"]
    for u in (0, 1, 5000, len(lines) - 1):
        assert ds.items[ds.offsets[u] : ds.offsets[u + 1]].tolist() == [int(t) for t in lines[u].split()[1:]]


def test_ml100k_five_core_statistics_are_exact(tmp_path):
    src = shared_file("ml-100k.inter")
    meta = prepare(src, tmp_path / "ml")
    assert (meta["n_users"], meta["n_items"], meta["n_interactions"]) == (943, 1349, 99287)
    assert meta["avg_length"] == round(99287 / 943, 4)
    assert meta["options"] == {"fmt": "atomic", "min_rating": None, "dedup": True, "k_core": 5}
    assert meta["source"]["sha256"] == file_sha256(src) and meta["format_version"] == 1
    unfiltered = prepare(src, tmp_path / "ml0", k_core=0)
    assert (unfiltered["n_users"], unfiltered["n_items"], unfiltered["n_interactions"]) == (943, 1682, 100000)
    rated = prepare(src, tmp_path / "ml4", PrepareOptions(min_rating=4, k_core=0))
    assert rated["n_interactions"] == 55375  # ratings 4 and 5 in MovieLens-100K


def test_output_layout_and_round_trip(tmp_path, write):
    src = write("log.csv", "user,item,timestamp,rating\n"
                "bob,x,5,1\nann,y,1,5\nbob,y,5,2\nann,x,2,4\nbob,x,9,3\nann,z,2,5\n")
    out = tmp_path / "out"
    meta = prepare(src, out, k_core=0)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert json.loads((out / "meta.json").read_text()) == meta
    seq = pq.read_table(out / "sequences.parquet")
    assert seq.schema.field("user_idx").type == "int64" and str(seq.schema.field("items").type) == "list<element: int64>"
    ds = load_prepared(out)
    # bob first (line 2): [x@5 (line 2), y@5 (line 4)], duplicate x@9 dropped; ann: [y@1, x@2, z@2]
    assert ds.user_ids.tolist() == ["bob", "ann"] and ds.item_ids.tolist() == [None, "x", "y", "z"]
    assert ds.offsets.tolist() == [0, 2, 5] and ds.items.tolist() == [1, 2, 2, 1, 3]
    assert ds.n_users == 2 and ds.n_items == 3 and ds.n_interactions == 5 and ds.meta == meta


def test_load_prepared_rejects_other_versions_and_missing_files(tmp_path, write):
    from echomamba_dist.errors import DataError

    src = write("s.txt", "1 1 2 3\n2 2 3 4\n")
    out = tmp_path / "out"
    prepare(src, out, k_core=0)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DataError, match=r"meta.json: format_version: expected 1, got 99"):
        load_prepared(out)
    (out / "meta.json").write_text(json.dumps({**meta, "n_interactions": 7}))
    with pytest.raises(DataError, match=r"meta.json: n_interactions: expected 6"):
        load_prepared(out)
    (out / "meta.json").write_text(json.dumps(meta))
    (out / "items.parquet").unlink()
    with pytest.raises(DataError, match=r"items.parquet: missing"):
        load_prepared(out)
    with pytest.raises(DataError, match=r"nowhere: expected a prepared dataset directory"):
        load_prepared(tmp_path / "nowhere")


def _messy_log(path) -> None:
    """A few thousand interactions with duplicates, timestamp ties, ratings and sparse items."""
    rng = np.random.default_rng(7)
    n = 6000
    users = rng.integers(0, 400, n)
    items = (rng.zipf(1.6, n) % 700).astype(int)
    ts = rng.integers(0, 50, n)  # many ties
    ratings = rng.integers(1, 6, n)
    lines = ["user_id,item_id,rating,timestamp"] + [
        f"user{u},{i},{r},{t}" for u, i, r, t in zip(users, items, ratings, ts)
    ]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow  # starts and stops a local Ray (20-35 s on 2 cores)
def test_ray_and_in_process_paths_write_identical_output(tmp_path):
    src = tmp_path / "messy.csv"
    _messy_log(src)
    options = PrepareOptions(min_rating=2, dedup=True, k_core=3)
    local = prepare(src, tmp_path / "local", options)
    from echomamba_dist.distributed.prepare import prepare_on_ray

    distributed = prepare_on_ray(src, tmp_path / "ray", options)
    assert local == distributed
    assert local["n_users"] > 50 and local["n_interactions"] < 6000
    for name in FILES[:3]:
        assert pq.read_table(tmp_path / "local" / name).equals(pq.read_table(tmp_path / "ray" / name)), name
