import threading

import numpy as np
import pytest

from indexer.pipeline import Delete, Item, Upsert
from indexer.shards import NEVER, ItemMeta, Shard, ShardSet

DIM = 16


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def upsert(record_id: str, vectors, category="top", collection="products", attrs=None) -> Upsert:
    items = tuple(Item(category, v, (0, 0, 1, 1), None, 1.0) for v in vectors)
    return Upsert(collection, record_id, 0, attrs or {"n": record_id}, items)


def metas(keys) -> list[ItemMeta]:
    return [ItemMeta("products", "top", f"r{k}", 0, (0, 0, 1, 1), None, 1.0, 0, {}) for k in keys]


def found_ids(state, queries, k, seq=NEVER - 1):
    return [[int(meta.record_id[1:]) for _, meta in row] for row in state.search(queries, k, seq)]


def test_shard_matches_brute_force_after_appends_and_removes():
    shard = Shard(DIM)
    data = unit_vectors(3000)
    keys = list(range(3000))
    for start in range(0, 3000, 700):  # grows past its initial capacity several times
        shard.append(keys[start : start + 700], data[start : start + 700], metas(keys[start : start + 700]))
    removed = list(range(0, 3000, 3))  # enough dead rows to trigger a compaction
    shard.remove(removed, seq=1)
    live = np.setdiff1d(keys, removed)
    assert shard.state.count - shard.state.dead == len(live)

    queries = unit_vectors(5, seed=1)
    expected = live[np.argsort(-(queries @ data[live].T), axis=1)[:, :10]]
    assert found_ids(shard.state, queries, 10) == expected.tolist()


def test_dead_rows_below_compaction_are_skipped_but_k_live_rows_come_back():
    shard = Shard(DIM)
    data = unit_vectors(50)
    shard.append(list(range(50)), data, metas(range(50)))
    shard.remove(list(range(10)), seq=1)
    found = found_ids(shard.state, data[:1], 5)[0]
    assert len(set(found)) == 5 and not set(found) & set(range(10))


def test_a_reader_at_an_older_sequence_still_sees_rows_deleted_later():
    shard = Shard(DIM)
    data = unit_vectors(5)
    shard.append(list(range(5)), data, metas(range(5)))
    shard.remove([0], seq=2)
    assert found_ids(shard.state, data[:1], 1, seq=1) == [[0]]
    assert found_ids(shard.state, data[:1], 1, seq=2) != [[0]]


def test_empty_and_short_shards_return_what_they_have():
    shard = Shard(DIM)
    assert found_ids(shard.state, unit_vectors(1), 3) == [[]]
    shard.append([7], unit_vectors(1), metas([7]))
    assert found_ids(shard.state, unit_vectors(1), 3) == [[7]]


def test_own_vector_is_first_hit_and_attrs_come_back():
    shards = ShardSet(DIM)
    data = unit_vectors(20)
    shards.apply([upsert(f"p{i}", [data[i]], category=("top", "shoe")[i % 2]) for i in range(20)])
    hits = shards.search(data[7], 3, "products")
    assert hits[0].id == "p7" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].attrs == {"n": "p7"} and hits[0].category == "shoe"
    assert {h.category for h in shards.search(data[7], 5, "products", category="top")} == {"top"}
    assert shards.search(data[7], 3, "posts") == []


def test_upsert_replaces_across_categories_and_delete_removes():
    shards = ShardSet(DIM)
    a, b = unit_vectors(2)
    shards.apply([upsert("p1", [a], category="top")])
    shards.apply([upsert("p1", [b], category="dress")])
    assert shards.records("products") == 1
    assert [(h.id, h.category) for h in shards.search(a, 5, "products")] == [("p1", "dress")]
    assert shards.search(b, 1, "products")[0].score == pytest.approx(1.0, abs=1e-5)
    shards.apply([Delete("products", "p1", 0)])
    assert shards.search(b, 5, "products") == [] and shards.records("products") == 0
    assert sum(s["vectors"] for s in shards.sizes()) == 0


def test_record_with_several_items_is_one_hit():
    shards = ShardSet(DIM)
    data = unit_vectors(3)
    shards.apply([upsert("post1", data, collection="posts")])
    hits = shards.search(data[1], 5, "posts")
    assert [h.id for h in hits] == ["post1"] and hits[0].item == 1


def test_last_operation_in_a_batch_wins():
    shards = ShardSet(DIM)
    a, b = unit_vectors(2)
    shards.apply([upsert("p1", [a]), Delete("products", "p1", 0), upsert("p2", [b]), upsert("p2", [a])])
    assert [h.id for h in shards.search(a, 5, "products")] == ["p2"]
    assert sum(s["vectors"] for s in shards.sizes()) == 1


def test_readers_never_fail_or_miss_a_record_while_it_is_rewritten():
    """Lock-free readers against one writer that keeps upserting the same records."""
    shards = ShardSet(DIM)
    data = unit_vectors(200)
    shards.apply([upsert(f"p{i}", [data[i]]) for i in range(200)])
    stop = threading.Event()
    problems: list[str] = []

    def reader():
        rng = np.random.default_rng()
        while not stop.is_set():
            i = int(rng.integers(200))
            try:
                hits = shards.search(data[i], 3, "products")
            except Exception as e:
                problems.append(repr(e))
                return
            if not hits or hits[0].id != f"p{i}":
                problems.append(f"p{i} missing: {[h.id for h in hits]}")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for round_ in range(60):  # thousands of tombstones: several compactions and regrowths
        shards.apply([upsert(f"p{i}", [data[i]], attrs={"round": round_}) for i in range(200)])
    stop.set()
    for t in threads:
        t.join()
    assert problems == []
    assert shards.records("products") == 200 and sum(s["vectors"] for s in shards.sizes()) == 200
