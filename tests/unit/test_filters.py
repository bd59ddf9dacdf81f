"""Filters inside the search: the same top k as an exact search over the records that match.

Random records, attributes and filters against a brute-force reference, on
every path a filtered search can take: the growing segment, a sealed one scored
exactly over its matching rows, and a sealed HNSW or IVF index searched with a
selector of them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexer.config import ShardSettings
from indexer.store.columns import Codes, Columns, FilterSpec, compile_filter, keyword_value
from indexer.store.records import Delete, Item, Upsert
from indexer.store.shards import ShardSet
from tests.support.shards import DIM, unit_vectors

BRANDS = ["Acme", "acme", "Zeta", "Other", None, 3, True]
PATHS = {
    "growing": ShardSettings(seal_min_rows=10_000),
    "sealed-exact": ShardSettings(seal_min_rows=20, growing_max_rows=10, hnsw_max_rows=1_000, hnsw_m=8),
    "hnsw-selector": ShardSettings(
        seal_min_rows=20, growing_max_rows=10, hnsw_max_rows=1_000, hnsw_m=8, filter_exact_max_rows=0
    ),
    "ivf-selector": ShardSettings(
        seal_min_rows=20, growing_max_rows=10, hnsw_max_rows=20, ivf_nprobe_fraction=1.0, filter_exact_max_rows=0
    ),
}


def attrs_of(rng: np.random.Generator) -> dict:
    attrs = {}
    brand = BRANDS[rng.integers(len(BRANDS))]
    if brand is not None:
        attrs["brand"] = brand
    if rng.random() < 0.8:
        attrs["price"] = float(rng.integers(0, 100)) if rng.random() < 0.9 else "n/a"
    if rng.random() < 0.7:
        attrs["in_stock"] = bool(rng.random() < 0.5)
    return attrs


def records(n: int, seed: int) -> list[Upsert]:
    """n records of one or two items (in two categories), with random attributes."""
    rng = np.random.default_rng(seed)
    vectors = unit_vectors(2 * n + 1, seed=seed)
    out = []
    for i in range(n):
        items = [Item("top", vectors[2 * i], (0, 0, 1, 1), None, 1.0)]
        if rng.random() < 0.3:
            items.append(Item("shoe", vectors[2 * i + 1], (0, 0, 1, 1), "shoe", 0.5))
        out.append(Upsert("products", f"r{i}", i, attrs_of(rng), tuple(items)))
    return out


def matches(attrs: dict, keyword: dict, ranges: dict) -> bool:
    for name, values in keyword.items():
        if keyword_value(attrs.get(name)) not in {keyword_value(v) for v in values}:
            return False
    for name, (low, high) in ranges.items():
        value = attrs.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            return False
    return True


def expected_ids(ups: list[Upsert], query: np.ndarray, k: int, keyword: dict, ranges: dict) -> list[str]:
    scored = [
        (max(float(item.vector @ query) for item in up.items), up.record_id)
        for up in ups
        if matches(up.attrs, keyword, ranges)
    ]
    return [record_id for _, record_id in sorted(scored, reverse=True)[:k]]


def built(path: str, ups: list[Upsert]) -> ShardSet:
    shards = ShardSet(DIM, PATHS[path])
    for start in range(0, len(ups), 16):
        shards.apply(ups[start : start + 16])
    shards.wait_for_rebuilds(timeout=60)
    return shards


filters = st.fixed_dictionaries(
    {},
    optional={
        "brand": st.lists(st.sampled_from(["acme", "ZETA", "other", "3", "true", "none-such"]), min_size=1, max_size=3),
        "in_stock": st.lists(st.sampled_from([True, False, "true"]), min_size=1, max_size=2),
    },
)
price_ranges = st.one_of(
    st.just({}),
    st.tuples(st.integers(-10, 110), st.integers(-10, 110)).map(lambda t: {"price": (min(t), max(t))}),
    st.integers(0, 100).map(lambda low: {"price": (low, math.inf)}),
)


@pytest.mark.parametrize("path", list(PATHS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 80), seed=st.integers(0, 2**16), k=st.integers(1, 12), keyword=filters, ranges=price_ranges)
def test_a_filtered_search_is_the_exact_filtered_top_k(path, n, seed, k, keyword, ranges):
    ups = records(n, seed)
    shards = built(path, ups)
    try:
        query = unit_vectors(1, seed=seed + 1)[0]
        where = compile_filter(shards.codes, keyword, ranges) if keyword or ranges else None
        hits = shards.search(query, k, "products", where=where)
        assert [h.id for h in hits] == expected_ids(ups, query, k, keyword, ranges)
    finally:
        shards.close()


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("matching", [0, 1, 4, 5, 6])
def test_k_hits_whenever_k_records_match(path, matching):
    """k = 5: filters that match 0, 1, k-1, k and k+1 of 300 records, far from the query."""
    k, vectors = 5, unit_vectors(300, seed=7)
    query = vectors[0]
    far = np.argsort(vectors @ query)[:matching]  # the least similar records carry the rare brand
    ups = [
        Upsert(
            "products",
            f"r{i}",
            0,
            {"brand": "rare" if i in far else "common"},
            (Item("top", v, (0, 0, 1, 1), None, 1.0),),
        )
        for i, v in enumerate(vectors)
    ]
    shards = built(path, ups)
    try:
        hits = shards.search(query, k, "products", where=compile_filter(shards.codes, {"brand": ["Rare"]}, {}))
        assert [h.id for h in hits] == expected_ids(ups, query, k, {"brand": ["rare"]}, {})
        assert len(hits) == min(k, matching)
    finally:
        shards.close()


def test_deleted_and_rewritten_records_are_filtered_as_they_are_now():
    vectors = unit_vectors(40)
    shards = ShardSet(DIM, PATHS["sealed-exact"])
    try:
        shards.apply(
            [
                Upsert("products", f"r{i}", 0, {"brand": "a"}, (Item("top", vectors[i], (0, 0, 1, 1), None, 1.0),))
                for i in range(40)
            ]
        )
        shards.wait_for_rebuilds(timeout=60)
        shards.apply(
            [
                Delete("products", "r0", 0),
                Upsert("products", "r1", 0, {"brand": "b"}, (Item("top", vectors[1], (0, 0, 1, 1), None, 1.0),)),
            ]
        )
        brand_a = compile_filter(shards.codes, {"brand": ["a"]}, {})
        ids = {h.id for h in shards.search(vectors[0], 40, "products", where=brand_a)}
        assert ids == {f"r{i}" for i in range(2, 40)}
        assert [
            h.id
            for h in shards.search(vectors[1], 1, "products", where=compile_filter(shards.codes, {"brand": ["b"]}, {}))
        ] == ["r1"]
    finally:
        shards.close()


def test_columns_take_and_concat_keep_each_rows_blob():
    codes = Codes(FilterSpec(("brand",), ("price",)))
    item = Item("top", np.zeros(DIM, np.float32), (1, 2, 3, 4), "tee", 0.5)
    rows = [
        ("products", f"id-{i}", i, item, i % 3, {"brand": f"B{i % 4}", "price": i, "t": "x" * i}) for i in range(50)
    ]
    columns = Columns.of_items(codes, rows)
    picked = columns.take(np.array([49, 3, 3, 0]))
    assert [picked.blob(r)[0] for r in range(4)] == ["id-49", "id-3", "id-3", "id-0"]
    assert picked.blob(0)[1]["t"] == "x" * 49
    joined = Columns.concat([picked, columns], [2, 50])
    assert [joined.blob(r)[0] for r in (0, 1, 2, 51)] == ["id-49", "id-3", "id-0", "id-49"]
    assert codes.keywords["brand"].words == ["b0", "b1", "b2", "b3"]
    brand_b1 = compile_filter(codes, {"brand": ["b1"]}, {"price": (0, 20)})
    assert np.flatnonzero(columns.match(brand_b1, 50)).tolist() == [1, 5, 9, 13, 17]
