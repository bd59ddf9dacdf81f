"""Filters inside the search: the same top k as an exact search over the records that match.

Random records, attributes and filters against a brute-force reference, on
every path a filtered search can take: the growing segment, a sealed one scored
exactly over its matching rows, and a sealed HNSW or IVF index searched with a
selector of them. Keyword attributes are single values or lists (empty, with
duplicates, in mixed case, holding a null, a list or a map).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexer.config import ShardSettings
from indexer.search import facets
from indexer.store import columns as columns_module
from indexer.store.checkpoint import load_latest, write_checkpoint
from indexer.store.columns import (
    MAX_KEYWORD_ELEMENTS,
    MISSING,
    Codes,
    Columns,
    FilterSpec,
    RangeIndex,
    compile_filter,
    keyword_value,
)
from indexer.store.records import Delete, Item, Upsert
from indexer.store.shards import ShardSet
from tests.support.shards import DIM, unit_vectors

ITEM = Item("top", np.zeros(DIM, np.float32), (0, 0, 1, 1), None, 1.0)
BRANDS = ["Acme", "acme", "Zeta", "Other", None, 3, True]
#: elements of the generated ``size`` and ``colour`` lists: mixed case, repeats, and some that are not values
SIZES = ["S", "s", "M", "m", "L", "XL", 3, True, None, ["M"], {"size": "M"}]
COLOURS = ["red", "Red", "white", "blue", None]
#: sealed into IVF segments from 20 rows on, every list probed (the two IVF paths below)
IVF_PATH = ShardSettings(
    seal_min_rows=20,
    growing_max_rows=10,
    hnsw_max_rows=20,
    ivf_nprobe_fraction=1.0,
    ivf_target_recall=1.0,
    filter_exact_max_rows=0,
)
PATHS = {
    "growing": ShardSettings(seal_min_rows=10_000),
    # interim IVF segments probed exhaustively too: at 1/16 of 19 lists an unfiltered query missed a row
    "sealed-exact": ShardSettings(
        seal_min_rows=20,
        growing_max_rows=10,
        hnsw_max_rows=1_000,
        hnsw_m=8,
        ivf_nprobe_fraction=1.0,
        ivf_target_recall=1.0,
    ),
    # the first segment HNSW, later flushes interim IVF segments (searched exhaustively here)
    "hnsw-selector": ShardSettings(
        seal_min_rows=20,
        growing_max_rows=10,
        hnsw_max_rows=1_000,
        hnsw_m=8,
        filter_exact_max_rows=0,
        ivf_nprobe_fraction=1.0,
        ivf_target_recall=1.0,
        filter_exact_row_cost=0,
    ),
    "ivf-selector": IVF_PATH.model_copy(update={"filter_exact_row_cost": 0}),
    # every list probed: reading the matching rows back is cheaper, so the planner scores them exactly
    "ivf-planned-exact": IVF_PATH,
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
    for name, pool in (("size", SIZES), ("colour", COLOURS)):
        value = value_of(rng, pool)
        if value is not None:
            attrs[name] = value
    return attrs


def value_of(rng: np.random.Generator, pool: list):
    """A single value of the pool, or a list (sometimes a tuple) of 0-5 of them, repeats allowed."""
    if rng.random() < 0.3:
        return pool[rng.integers(len(pool))]
    elements = [pool[i] for i in rng.integers(len(pool), size=rng.integers(0, 6))]
    return tuple(elements) if rng.random() < 0.2 else elements


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


def reference_values(value) -> set[str]:
    """The values a keyword filter matches an attribute by, written out here rather than taken from columns.py.

    A single value is itself as ``keyword_value`` folds it; a list is its
    elements that are single values, the first MAX_KEYWORD_ELEMENTS distinct ones.
    """
    if not isinstance(value, list | tuple):
        return {keyword_value(value)} - {None}
    distinct = []
    for element in value:
        word = keyword_value(element)  # None for a null, a list or a map: skipped
        if word is not None and word not in distinct:
            distinct.append(word)
    return set(distinct[:MAX_KEYWORD_ELEMENTS])


def matches(attrs: dict, keyword: dict, ranges: dict) -> bool:
    for name, values in keyword.items():
        if not reference_values(attrs.get(name)) & {keyword_value(v) for v in values}:
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
        "size": st.lists(st.sampled_from(["s", "M", "l", "XL", "3", "true", "none-such"]), min_size=1, max_size=3),
        "colour": st.lists(st.sampled_from(["RED", "white", "blue", "none-such"]), min_size=1, max_size=2),
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
        counted = facets([h.attrs for h in hits], ("size", "colour"))
        for name in ("size", "colour"):
            expected = {}
            for h in hits:
                for value in reference_values(h.attrs.get(name)):
                    expected[value] = expected.get(value, 0) + 1
            assert counted[name] == expected
    finally:
        shards.close()


bounds = st.one_of(st.floats(-2, 12, allow_nan=False), st.sampled_from([-math.inf, math.inf, 0.0, 5.0]))


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.one_of(st.integers(0, 10).map(float), st.just(math.nan)), max_size=60),
    low=bounds,
    high=bounds,
)
def test_a_range_index_marks_exactly_the_rows_a_comparison_does(values, low, high):
    column = np.array(values, np.float64)
    mask = RangeIndex.of(column).rows_within(column, low, high)
    assert mask.tolist() == ((column >= low) & (column <= high)).tolist()


def test_sealed_segments_find_narrow_ranges_through_their_range_index(monkeypatch, tmp_path):
    """Built and restored: narrow, wide and one-sided price ranges find the same rows through the index."""
    monkeypatch.setattr(columns_module, "RANGE_INDEX_MIN_ROWS", 50)
    ups = records(300, seed=5)
    shards = built("sealed-exact", ups)
    write_checkpoint(tmp_path, shards.view, {}, {}, {"encoder": "test", "dim": DIM})
    shards.close()
    _, restored = load_latest(tmp_path, {"encoder": "test", "dim": DIM}, PATHS["sealed-exact"])
    try:
        indexed = [s for state in restored.view.shards.values() for s in state.sealed if s.columns.ranges]
        assert indexed and all(s.columns.ranges["num.price"].count == s.count for s in indexed)
        query = unit_vectors(1, seed=9)[0]
        for ranges in ({"price": (10, 12)}, {"price": (99, math.inf)}, {"price": (-1, 80)}, {"price": (1, 98)}):
            where = compile_filter(restored.codes, {}, ranges)
            hits = restored.search(query, 5, "products", where=where)
            assert [h.id for h in hits] == expected_ids(ups, query, 5, {}, ranges)
    finally:
        restored.close()


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


def test_a_list_is_coded_as_the_set_of_its_values():
    codes = Codes(FilterSpec(("size",), ()))
    sizes = [["M", "s", "m"], ["S", "M"], ("m", "S"), ["M"], "m", [], [None, ["L"]], {"size": "M"}, ["L", {"x": 1}]]
    columns = Columns.of_items(codes, [("products", f"r{i}", 0, ITEM, 0, {"size": s}) for i, s in enumerate(sizes)])
    coded = columns.arrays["kw.size"][: len(sizes)].tolist()
    assert codes.keywords["size"].words == [("m", "s"), "m", "l"]
    assert coded == [0, 0, 0, 1, 1, MISSING, MISSING, MISSING, 2]
    for value, rows in [("M", [0, 1, 2, 3, 4]), ("s", [0, 1, 2]), ("L", [8]), ("XL", [])]:
        assert np.flatnonzero(columns.match(compile_filter(codes, {"size": [value]}, {}), len(sizes))).tolist() == rows
    either = compile_filter(codes, {"size": ["l", "S"]}, {})
    assert np.flatnonzero(columns.match(either, len(sizes))).tolist() == [0, 1, 2, 8]
    assert codes.keywords["size"].containing("m") == (0, 1)


def test_only_the_first_distinct_values_of_a_long_list_are_indexed_and_counted():
    codes = Codes(FilterSpec(("size",), ()))
    sizes = [f"s{i}" for i in range(MAX_KEYWORD_ELEMENTS + 10)]
    columns = Columns.of_items(codes, [("products", "r0", 0, ITEM, 0, {"size": ["s0", *sizes]})])
    last = f"s{MAX_KEYWORD_ELEMENTS - 1}"
    assert columns.match(compile_filter(codes, {"size": [last]}, {}), 1).tolist() == [True]
    assert columns.match(compile_filter(codes, {"size": [f"s{MAX_KEYWORD_ELEMENTS}"]}, {}), 1).tolist() == [False]
    counted = facets([{"size": ["s0", *sizes]}], ("size",))["size"]
    assert len(counted) == MAX_KEYWORD_ELEMENTS and counted[last] == 1 and set(counted.values()) == {1}


def test_a_filter_compiled_before_a_new_combination_was_coded_still_matches_its_rows():
    """A query compiles ``size=M``; the writer rewrites a record to a combination no row had and publishes
    it; then the query takes its view. The record matched before and matches after: it is in the result."""
    vector = unit_vectors(1)[0]
    item = Item("top", vector, (0, 0, 1, 1), None, 1.0)
    shards = ShardSet(DIM, PATHS["growing"])
    try:
        shards.apply([Upsert("products", "r0", 0, {"size": ["S", "M"]}, (item,))])
        size_m = compile_filter(shards.codes, {"size": ["m"]}, {})
        shards.apply([Upsert("products", "r0", 1, {"size": ["S", "M", "XL"]}, (item,))])
        assert [h.id for h in shards.search(vector, 5, "products", where=size_m)] == ["r0"]
        fresh = compile_filter(shards.codes, {"size": ["m"]}, {"price": (0, 10)})
        assert fresh.current(shards.codes) is fresh and size_m.current(shards.codes).conditions == fresh.conditions[:1]
    finally:
        shards.close()


def test_the_planner_reads_matching_rows_back_when_that_costs_less_than_the_probed_lists():
    """An IVF segment: 3 matching rows are scored exactly; with the cost at 0, through the index."""
    vectors = unit_vectors(300, seed=11)
    item = lambda v: (Item("top", v, (0, 0, 1, 1), None, 1.0),)  # noqa: E731
    shards = built("ivf-planned-exact", [Upsert("products", f"r{i}", 0, {}, item(v)) for i, v in enumerate(vectors)])
    try:
        segment = max(shards.view.shards[("products", "top")].sealed, key=lambda s: s.count)
        assert segment.kind == "ivf"
        chosen = {0, segment.count // 2, segment.count - 1}  # of 140-300 rows, as the merges went
        mask = np.zeros(segment.count, bool)
        mask[list(chosen)] = True
        for cost, planned_exact in ((1.0, True), (0.0, False)):
            update = {"ivf_nprobe_fraction": 1 / 16, "filter_exact_row_cost": cost}
            settings = shards.settings.model_copy(update=update)
            got = shards.backend.knn_selected(segment, vectors[:1], 3, mask, len(chosen), settings)
            assert (got is None) == planned_exact
            if got is not None:
                assert set(got[1][0].tolist()) == chosen
    finally:
        shards.close()


def test_a_flat_segment_scores_all_rows_or_gathers_the_few_alike(monkeypatch):
    """Many matching rows of a flat segment are scored by one pass over all rows; the top k is the same."""
    from indexer.store import segments

    shards = built("growing", records(60, seed=8))
    try:
        segment = shards.view.shards[("products", "top")].growing
        query = unit_vectors(1, seed=9)[0]
        for rows in (np.arange(segment.count), np.arange(0, segment.count, 3)):
            monkeypatch.setattr(segments, "DENSE_SHARE", 10**9)  # every share: one pass over all rows
            dense = segment.search_rows(query, rows, 5)
            monkeypatch.setattr(segments, "DENSE_SHARE", 0)  # none: the rows gathered
            assert segment.search_rows(query, rows, 5) == dense
            scores = segment.vectors[rows] @ query
            assert [r for _, r in dense] == rows[np.argsort(-scores, kind="stable")[:5]].tolist()
    finally:
        shards.close()


def test_the_planner_knows_each_codec_s_read_back_cost():
    """Each codec has its cost; a longer row costs more to read back: fewer matching rows are scored exactly."""
    import faiss

    from indexer.store.backends import CODECS, READ_BACK_COST, ivf_codec, ivf_pq_index, read_back_cost

    for codec, spec in CODECS.items():
        quantizer = faiss.IndexFlatIP(DIM)
        if spec.pq:  # PQ codes re-ranked on the stored vectors, which an exact pass reads back
            index = ivf_pq_index(DIM, 4, spec)
        elif spec.qtype is None:
            index = faiss.IndexIVFFlat(quantizer, DIM, 4, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFScalarQuantizer(quantizer, DIM, 4, spec.qtype, faiss.METRIC_INNER_PRODUCT)
        assert ivf_codec(index) == codec
        assert READ_BACK_COST[codec] > 0 and READ_BACK_COST["float32"] == 1.0
        assert read_back_cost(codec, 128) == READ_BACK_COST[codec] < read_back_cost(codec, 1280)


def test_an_exact_pass_over_many_rows_reads_them_a_block_at_a_time(monkeypatch):
    """The top k across block boundaries is the top k over all the rows at once."""
    from indexer.store import segments

    shards = built("sealed-exact", records(200, seed=5))
    try:
        segment = max(shards.view.shards[("products", "top")].sealed, key=lambda s: s.count)
        query = unit_vectors(1, seed=6)[0]
        rows = np.arange(segment.count)[::-1].copy()
        everything = segment.search_rows(query, rows, 7)
        monkeypatch.setattr(segments, "EXACT_BLOCK_BYTES", 4 * DIM * 9)  # blocks of 9 rows (at least k)
        assert segment.search_rows(query, rows, 7) == everything
        scores = segment.row_vectors(rows) @ query
        assert [r for _, r in everything] == rows[np.argsort(-scores, kind="stable")[:7]].tolist()
    finally:
        shards.close()
