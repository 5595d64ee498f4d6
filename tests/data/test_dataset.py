"""PreparedDataset helpers: the synthetic set, load_dataset and the fingerprint."""

from __future__ import annotations

import numpy as np

from echomamba_dist.config import DataSettings, SyntheticConfig
from echomamba_dist.data.dataset import build_synthetic, dataset_fingerprint, load_dataset
from echomamba_dist.data.prepare import prepare
from echomamba_dist.data.synthetic import generate_synthetic

SMALL = SyntheticConfig(n_users=200, n_items=60, n_topics=3, seed=1)


def test_build_synthetic_is_a_valid_prepared_dataset():
    ds = build_synthetic(SMALL)
    assert ds.offsets[0] == 0 and len(ds.offsets) == ds.n_users + 1 == 201
    assert (np.diff(ds.offsets) >= SMALL.min_length).all()
    assert ds.items.min() == 1 and ds.items.max() == ds.n_items <= 60
    assert len(ds.item_ids) == ds.n_items + 1 and ds.item_ids[0] is None
    assert ds.meta["n_interactions"] == ds.n_interactions == generate_synthetic(SMALL).num_rows
    assert ds.meta["source"]["format"] == "synthetic"


def test_fingerprint_follows_the_sequences_only():
    """Equal sequences give the same id (what resume and evaluate compare); one item changed,
    two items of a user swapped, or the same items cut into other users give another."""
    import dataclasses

    import numpy as np

    a = build_synthetic(SMALL)
    assert dataset_fingerprint(a) == dataset_fingerprint(build_synthetic(SMALL))
    same_sequences = dataclasses.replace(a, user_ids=np.array([f"other-{u}" for u in a.user_ids], dtype=object))
    assert dataset_fingerprint(same_sequences) == dataset_fingerprint(a)
    changed = a.items.copy()
    changed[5] = changed[5] % a.n_items + 1
    swapped = a.items.copy()
    first = int(np.flatnonzero(swapped[1:] != swapped[:-1])[0])  # two neighbours that differ
    swapped[[first, first + 1]] = swapped[[first + 1, first]]
    recut = a.offsets.copy()
    recut[1] += 1  # user 0 takes user 1's first item
    variants = [dataclasses.replace(a, items=changed), dataclasses.replace(a, items=swapped),
                dataclasses.replace(a, offsets=recut)]
    ids = {dataset_fingerprint(a), *map(dataset_fingerprint, variants)}
    assert len(ids) == 4


def test_load_dataset_path_or_synthetic(tmp_path):
    synth = load_dataset(DataSettings(synthetic=SMALL))
    assert dataset_fingerprint(synth) == dataset_fingerprint(build_synthetic(SMALL))
    table = generate_synthetic(SMALL)
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "synth.parquet")
    prepare(tmp_path / "synth.parquet", tmp_path / "prepared", dedup=False, k_core=0)
    loaded = load_dataset(DataSettings(path=str(tmp_path / "prepared")))
    # the file path and the in-memory path run the same transforms
    assert dataset_fingerprint(loaded) == dataset_fingerprint(synth)
    assert loaded.item_ids.tolist() == synth.item_ids.tolist()
