import os
import threading
import time

import faiss
import numpy as np
import pytest

from indexer.config import ShardSettings
from indexer.store import backends
from indexer.store.backends import FaissBackend
from indexer.store.columns import Codes, Columns, FilterSpec, compile_filter, record_hash
from indexer.store.records import Delete, Item
from indexer.store.segments import NEVER, RowSource, growing_from
from indexer.store.shards import Shard, ShardSet, size_tier
from tests.support.shards import DIM, fill, unit_vectors, upsert

ITEM = Item("top", np.zeros(DIM, np.float32), (0, 0, 1, 1), None, 1.0)


def columns(keys) -> Columns:
    """Metadata of one single-item record ``r<key>`` per key."""
    return Columns.of_items(Codes(FilterSpec()), [("products", f"r{k}", 0, ITEM, 0, {}) for k in keys])


def remove(shard: Shard, keys, seq: int) -> None:
    ids = [f"r{k}" for k in keys]
    shard.remove(np.array([record_hash("products", i) for i in ids], np.uint64), ids, seq)


def found_ids(segment, queries, k, seq=NEVER - 1):
    return [[int(segment.columns.blob(r)[0][1:]) for _, r in row] for row in segment.search(queries, k, seq)]


def test_shard_matches_brute_force_after_appends_and_removes():
    shard = Shard(DIM)
    data = unit_vectors(3000)
    keys = list(range(3000))
    for start in range(0, 3000, 700):  # grows past its initial capacity several times
        shard.append(keys[start : start + 700], data[start : start + 700], columns(keys[start : start + 700]))
    removed = list(range(0, 3000, 3))  # enough dead rows to trigger a compaction
    remove(shard, removed, seq=1)
    live = np.setdiff1d(keys, removed)
    assert shard.state.live == len(live)

    queries = unit_vectors(5, seed=1)
    expected = live[np.argsort(-(queries @ data[live].T), axis=1)[:, :10]]
    assert found_ids(shard.growing, queries, 10) == expected.tolist()


def test_dead_rows_below_compaction_are_skipped_but_k_live_rows_come_back():
    shard = Shard(DIM)
    data = unit_vectors(50)
    shard.append(list(range(50)), data, columns(range(50)))
    remove(shard, range(10), seq=1)
    found = found_ids(shard.growing, data[:1], 5)[0]
    assert len(set(found)) == 5 and not set(found) & set(range(10))


def test_a_reader_at_an_older_sequence_still_sees_rows_deleted_later():
    shard = Shard(DIM)
    data = unit_vectors(5)
    shard.append(list(range(5)), data, columns(range(5)))
    remove(shard, [0], seq=2)
    assert found_ids(shard.growing, data[:1], 1, seq=1) == [[0]]
    assert found_ids(shard.growing, data[:1], 1, seq=2) != [[0]]


def test_empty_and_short_shards_return_what_they_have():
    shard = Shard(DIM)
    assert found_ids(shard.growing, unit_vectors(1), 3) == [[]]
    shard.append([7], unit_vectors(1), columns([7]))
    assert found_ids(shard.growing, unit_vectors(1), 3) == [[7]]


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


SMALL = ShardSettings(seal_min_rows=200, growing_max_rows=150, hnsw_max_rows=1_000, hnsw_m=16, rebuild_min_dead=50)
IVF = ShardSettings(seal_min_rows=500, growing_max_rows=10_000, hnsw_max_rows=300)


@pytest.mark.parametrize(("policy", "kind"), [(SMALL, "hnsw"), (IVF, "ivf")])
def test_a_growing_shard_is_sealed_into_an_index_and_still_finds_every_item(policy, kind):
    shards = ShardSet(DIM, policy.model_copy(update={"merge_when_idle_s": 0.05}))
    data = unit_vectors(600)
    fill(shards, data)
    shards.wait_for_rebuilds(timeout=60)
    time.sleep(0.1)
    shards.maintain()  # idle now: its segments are merged into one index
    shards.wait_for_rebuilds(timeout=60)
    (size,) = shards.sizes()
    assert size["sealed"] == kind and size["sealed_segments"] == 1 and size["vectors"] == 600
    assert size["sealed_rows"] + size["growing_rows"] == 600
    found = sum(shards.search(data[i], 1, "products")[0].id == f"p{i}" for i in range(600))
    assert found >= 0.95 * 600


def assert_deleted_rewritten_and_kept(shards: ShardSet, data, rewritten_at: int, kept_until: int) -> None:
    """p0-p49 deleted, p50-p59 rewritten to data[rewritten_at + i], p60 up to kept_until found as written."""
    for i in range(0, 50):
        assert all(h.id != f"p{i}" for h in shards.search(data[i], 3, "products"))
    for i in range(50, 60):
        hit = shards.search(data[rewritten_at + i], 1, "products")[0]
        assert hit.id == f"p{i}" and hit.score == pytest.approx(1.0, abs=1e-4)
    for i in range(60, kept_until):
        assert shards.search(data[i], 1, "products")[0].id == f"p{i}"


def test_writes_made_while_a_rebuild_runs_stay_correct_after_the_swap(monkeypatch):
    import indexer.store.shards as shards_module

    gate = threading.Event()
    real_build = shards_module.build_from_segments

    def gated_build(*args, **kwargs):
        gate.wait(30)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(shards_module, "build_from_segments", gated_build)
    shards = ShardSet(DIM, SMALL)
    data = unit_vectors(400)
    fill(shards, data[:250])  # crosses seal_min_rows: a build starts and waits at the gate
    assert any(s.builds for s in shards._shards.values())
    shards.apply([Delete("products", f"p{i}", 0) for i in range(0, 50)])  # deletes of rows being sealed
    shards.apply([upsert(f"p{i}", [data[300 + i]]) for i in range(50, 60)])  # rewrites of rows being sealed
    fill(shards, data[250:300], start=250)  # new rows
    gate.set()
    shards.wait_for_rebuilds(timeout=60)
    (size,) = shards.sizes()
    assert shards.rebuilds >= 1 and size["sealed_rows"] == 140  # the 200 rows sealed, less 60 removed meanwhile

    assert shards.records("products") == 250 and shards.sizes()[0]["vectors"] == 250
    assert_deleted_rewritten_and_kept(shards, data, rewritten_at=300, kept_until=300)


def test_rebuild_drops_deleted_rows():
    shards = ShardSet(DIM, SMALL)
    data = unit_vectors(400)
    fill(shards, data)
    shards.wait_for_rebuilds(timeout=60)
    shards.apply([Delete("products", f"p{i}", 0) for i in range(0, 400, 2)])  # half: triggers a rebuild
    shards.apply([])
    shards.wait_for_rebuilds(timeout=60)
    state = shards.view.shards[("products", "top")]
    assert state.live == 200 and sum(s.count for s in state.segments) <= 200 + 150


def test_readers_never_miss_a_record_while_shards_are_rebuilt_under_them():
    shards = ShardSet(DIM, SMALL)
    data = unit_vectors(300)
    fill(shards, data)
    stop = threading.Event()
    problems: list[str] = []

    def reader():
        rng = np.random.default_rng()
        while not stop.is_set():
            i = int(rng.integers(300))
            hits = shards.search(data[i], 1, "products")
            if not hits or hits[0].id != f"p{i}":
                problems.append(f"p{i}: {[h.id for h in hits]}")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(15):
        fill(shards, data, batch=100)  # every record rewritten: rebuilds keep starting and swapping
        shards.wait_for_rebuilds(timeout=60)
    stop.set()
    for t in threads:
        t.join()
    assert shards.rebuilds >= 2 and problems == []


def test_torch_backend_finds_the_same_as_faiss_through_growth_seal_and_deletes(torch_backend):
    data = unit_vectors(700)
    results = {}
    for backend in (backends.by_name("cpu"), torch_backend):
        shards = ShardSet(DIM, SMALL, backend)
        fill(shards, data[:600])
        shards.wait_for_rebuilds(timeout=60)
        shards.apply([Delete("products", f"p{i}", 0) for i in range(0, 600, 3)])
        fill(shards, data[600:], start=600)
        shards.wait_for_rebuilds(timeout=60)
        assert shards.backend is backend and shards.records("products") == 500
        results[backend.name] = [[h.id for h in shards.search(v, 5, "products")] for v in data[::7]]
        state = shards.view.shards[("products", "top")]
        if backend is torch_backend:
            assert all(s.mirror is not None for s in state.segments)
        assert {s.backend for s in state.segments} == {backend}
    assert results["cpu"] == results["torch-cuda"]


def test_backends_are_chosen_by_name_and_auto_takes_the_gpu_only_where_torch_sees_one(monkeypatch):
    import torch

    assert isinstance(backends.by_name("cpu"), FaissBackend)
    assert backends.by_name("torch-cuda").name == "torch-cuda"
    with pytest.raises(ValueError, match=r"'faiss-gpu'.*cpu, torch-cuda"):
        backends.by_name("faiss-gpu")
    assert backends.choose("cpu").name == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backends.choose("auto").name == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backends.choose("auto").name == "torch-cuda"


def test_search_uses_one_openmp_thread_and_gives_the_setting_back(monkeypatch):
    import faiss

    shards = ShardSet(DIM)
    shards.apply([upsert(f"r{i}", [v]) for i, v in enumerate(unit_vectors(50))])
    threads_seen = []
    real_knn = backends.faiss.knn

    def knn(*args, **kwargs):
        threads_seen.append(faiss.omp_get_max_threads())
        return real_knn(*args, **kwargs)

    monkeypatch.setattr(backends.faiss, "knn", knn)
    faiss.omp_set_num_threads(2)
    try:
        assert shards.search(unit_vectors(1, seed=1)[0], 5, "products")
        assert threads_seen == [1]
        assert faiss.omp_get_max_threads() == 2  # the thread's own setting again
    finally:
        faiss.omp_set_num_threads(os.cpu_count() or 1)


def test_an_ivf_rebuild_keeps_its_centroids_until_the_shard_doubles():
    settings = ShardSettings(seal_min_rows=100, hnsw_max_rows=100)
    data = unit_vectors(4000)

    def build(n, previous=None):
        return FaissBackend().build_sealed(data[:n], np.arange(n), columns(range(n)), settings, previous=previous)

    first = build(2000)
    kept = build(3900, previous=first)  # under twice the rows: the same centroids, every row added
    assert kept.index.ntotal == 3900
    np.testing.assert_array_equal(
        kept.index.quantizer.reconstruct_n(0, kept.index.nlist),
        first.index.quantizer.reconstruct_n(0, first.index.nlist),
    )
    retrained = build(4000, previous=first)  # twice: trained again, with more lists
    assert retrained.index.nlist > first.index.nlist
    for segment in (kept, retrained):
        hits = segment.search(data[:200], 1, NEVER - 1)
        assert sum(segment.columns.blob(row[0][1])[0] == f"r{i}" for i, row in enumerate(hits)) >= 0.95 * 200


def test_a_row_source_reads_the_chosen_rows_of_several_segments_in_order():
    data = unit_vectors(1000)
    faiss_backend = FaissBackend()
    sealed = faiss_backend.build_sealed(
        data[:600], np.arange(600), columns(range(600)), ShardSettings(seal_min_rows=100)
    )
    growing = growing_from(data[600:], np.arange(600, 1000), columns(range(600, 1000)), 512, faiss_backend)
    chosen = [np.arange(0, 600, 3), np.arange(0, 400, 2)]
    expected = np.concatenate([data[:600][chosen[0]], data[600:][chosen[1]]])
    rows = RowSource.of_segments(list(zip((sealed, growing), chosen)), DIM)
    assert len(rows) == 400
    np.testing.assert_allclose(np.concatenate(list(rows.blocks(size=64))), expected, atol=1e-6)
    positions = np.array([0, 199, 200, 399])  # both ends of both parts
    np.testing.assert_allclose(rows.take(positions), expected[positions], atol=1e-6)


def test_rows_that_arrive_during_a_build_are_sealed_without_another_event(monkeypatch):
    """A bulk load outpaces the first build; the idle consumer's maintain() must start the next one."""
    from indexer.store import shards as shards_module

    release = threading.Event()
    real_build = shards_module.build_from_segments

    def slow_build(*args, **kwargs):
        release.wait(10)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(shards_module, "build_from_segments", slow_build)
    settings = ShardSettings(seal_min_rows=100, growing_max_rows=150, hnsw_max_rows=10_000, hnsw_m=8)
    shards = ShardSet(DIM, settings)
    data = unit_vectors(520)
    fill(shards, data[:120], batch=120)  # sealing starts, and waits
    fill(shards, data[120:], start=120, batch=400)  # 400 more rows arrive meanwhile
    release.set()
    shards.wait_for_rebuilds(timeout=30)  # the seal of 120 rows, then the build maintain() started on its own
    (size,) = shards.sizes()
    assert size["sealed_rows"] == 520 and size["growing_rows"] == 0
    shards.close()


@pytest.mark.parametrize(
    ("rows", "sealed"), [(60, None), (300, "hnsw"), (1_500, "ivf")], ids=["growing", "hnsw", "ivf"]
)
def test_a_records_stored_vector_comes_back_from_any_kind_of_segment(rows, sealed):
    settings = ShardSettings(seal_min_rows=200, growing_max_rows=150, hnsw_max_rows=1_000, hnsw_m=16)
    shards = ShardSet(DIM, settings)
    data = unit_vectors(rows)
    fill(shards, data, batch=100)
    shards.wait_for_rebuilds(timeout=60)
    if sealed is not None:
        shards.rebuild_all()  # the sealed segments merged into one
        shards.wait_for_rebuilds(timeout=60)
    assert shards.sizes()[0]["sealed"] == sealed
    ((meta, vector),) = shards.record_vectors("products", "p7")
    assert meta.record_id == "p7" and np.allclose(vector, data[7], atol=1e-6)
    shards.apply([Delete("products", "p7", 0)])
    assert shards.record_vectors("products", "p7") is None
    shards.close()


def test_a_selective_filter_still_returns_k_hits_when_k_records_match():
    """10 of 1,200 records match, none near the query: the approximate pass misses them, the exact one does not."""
    shards = ShardSet(DIM, SMALL)
    data = unit_vectors(1_200)
    fill(shards, data[:1_190], batch=200)
    rare = [upsert(f"rare{i}", [data[1_190 + i]], attrs={"brand": "rare"}) for i in range(10)]
    shards.apply(rare)
    shards.wait_for_rebuilds(timeout=60)
    assert shards.sizes()[0]["sealed"] in ("hnsw", "ivf")
    query = data[0]
    rare_brand = compile_filter(shards.codes, {"brand": ["Rare"]}, {})  # any case
    hits = shards.search(query, 5, "products", where=rare_brand)
    expected = sorted(range(10), key=lambda i: -float(data[1_190 + i] @ query))[:5]
    assert [h.id for h in hits] == [f"rare{i}" for i in expected]
    assert len(shards.search(query, 50, "products", where=rare_brand)) == 10  # all that match, no more
    shards.close()


TIERED = ShardSettings(seal_min_rows=100, growing_max_rows=100, merge_factor=3, hnsw_max_rows=10_000, hnsw_m=8)


def test_a_shard_that_keeps_growing_is_sealed_in_segments_merged_by_size_tier():
    """Each flush seals only the growing rows; merge_factor segments of one tier become one."""
    shards = ShardSet(DIM, TIERED)
    data = unit_vectors(2_000)
    for start in range(0, 2_000, 100):
        fill(shards, data[start : start + 100], start=start, batch=100)
        shards.wait_for_rebuilds(timeout=60)
    state = shards.view.shards[("products", "top")]
    # below 300 rows: tier 0, below 900: tier 1, below 2,700: tier 2; fewer than 3 of each are left
    tiers = [size_tier(s.live, TIERED) for s in state.sealed]
    assert all(tiers.count(t) < 3 for t in tiers), tiers
    assert 1 < len(state.sealed) <= 6 and state.live == 2_000
    assert shards.rebuilds > 2_000 // 100  # every flush, and merges besides
    found = sum(shards.search(data[i], 1, "products")[0].id == f"p{i}" for i in range(2_000))
    assert found >= 0.98 * 2_000
    shards.close()


def test_an_idle_shard_merges_its_segments_into_one():
    settings = TIERED.model_copy(update={"merge_when_idle_s": 0.2})
    shards = ShardSet(DIM, settings)
    data = unit_vectors(700)
    for start in range(0, 700, 100):
        fill(shards, data[start : start + 100], start=start, batch=100)
        shards.wait_for_rebuilds(timeout=60)
    assert len(shards.view.shards[("products", "top")].sealed) > 1
    time.sleep(0.3)
    shards.maintain()  # the consumer calls this while no events arrive
    shards.wait_for_rebuilds(timeout=60)
    (size,) = shards.sizes()
    assert size["sealed_segments"] == 1 and size["sealed_rows"] == 700 and size["sealed"] == "hnsw"
    shards.close()


def test_writes_made_while_segments_merge_stay_correct_after_the_swap(monkeypatch):
    """A merge runs beside flushes: rows deleted or rewritten meanwhile are dead in the merged segment."""
    import indexer.store.shards as shards_module

    gate = threading.Event()
    real_build = shards_module.build_from_segments

    def gated_merge(segments, *args, **kwargs):
        if segments[0].by_record:  # sealed segments: a merge, not a flush of the growing one
            gate.wait(30)
        return real_build(segments, *args, **kwargs)

    monkeypatch.setattr(shards_module, "build_from_segments", gated_merge)
    shards = ShardSet(DIM, TIERED.model_copy(update={"max_sealed_segments": 3}))
    data = unit_vectors(700)
    for start in range(0, 300, 100):
        fill(shards, data[start : start + 100], start=start, batch=100)
        if start < 200:
            shards.wait_for_rebuilds(timeout=60)
    shard = shards._shards[("products", "top")]
    deadline = time.monotonic() + 30
    while shard.merge is None and time.monotonic() < deadline:  # the third flush in: three of tier 0 merge, held
        shards.maintain()
        time.sleep(0.02)
    assert shard.merge is not None and len(shard.merge.merges) == 3
    assert shards.backlogged()  # max_sealed_segments while they merge: the consumer holds back
    shards.apply([Delete("products", f"p{i}", 0) for i in range(0, 50)])  # deletes of rows being merged
    shards.apply([upsert(f"p{i}", [data[600 + i]]) for i in range(50, 60)])  # rewrites of rows being merged
    fill(shards, data[300:400], start=300, batch=100)  # a flush runs while the merge waits
    gate.set()
    shards.wait_for_rebuilds(timeout=60)
    assert not shards.backlogged()

    assert shards.records("products") == 350
    assert_deleted_rewritten_and_kept(shards, data, rewritten_at=600, kept_until=400)
    shards.close()


def low_dimensional(n: int, dim: int, seed: int) -> np.ndarray:
    """Rows of low intrinsic dimension, as embeddings are: a random nonlinear map of an 8-d Gaussian."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99)
    hidden = np.tanh(rng.standard_normal((n, 8)) @ mix.standard_normal((8, 64)))
    x = (hidden @ mix.standard_normal((64, dim))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("target", [0.9, 0.98])
def test_an_ivf_build_probes_the_fewest_lists_that_reach_the_target_recall(target):
    """Measured on the segment's own rows; checked here on queries it never saw."""
    settings = ShardSettings(ivf_target_recall=target)
    rows = low_dimensional(40_000, 32, seed=0)
    nlist = backends.ivf_nlist(len(rows))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(32), 32, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(rows)
    index.add(rows)
    ceiling = backends.ivf_nprobe(nlist, settings)
    rng = np.random.default_rng(0)
    own = backends.OwnNeighbours.of(RowSource.of(rows), rng)
    nprobe = backends.tuned_nprobe(index, own, ceiling, target)
    queries = low_dimensional(300, 32, seed=1)
    _, exact = faiss.knn(queries, rows, 10, metric=faiss.METRIC_INNER_PRODUCT)

    def recall(probes: int) -> float:
        _, found = index.search(queries, 10, params=faiss.SearchParametersIVF(nprobe=probes))
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])

    assert backends.MIN_NPROBE <= nprobe < ceiling
    assert recall(nprobe) >= target - 0.02
    assert nprobe == backends.MIN_NPROBE or recall(nprobe // 2) < target + 0.02
    assert backends.tuned_nprobe(index, own, ceiling, 1.0) == ceiling


@pytest.mark.parametrize("codec", list(backends.CODECS))
def test_every_vector_codec_seals_filters_rebuilds_and_restores(tmp_path, codec):
    """IVF segments of each ``shards.vectors`` codec: found, filtered inside the index, rebuilt, checkpointed."""
    from indexer.store.checkpoint import load_latest, write_checkpoint

    dim = 32
    settings = ShardSettings(
        seal_min_rows=100,
        growing_max_rows=10_000,
        hnsw_max_rows=100,
        rebuild_min_dead=100,
        vectors={"products": codec},
        filter_exact_max_rows=0,  # filters go through the index's selector
        filter_exact_row_cost=0,
    )
    data = low_dimensional(2_000, dim, seed=3)
    shards = ShardSet(dim, settings)
    shards.apply([upsert(f"p{i}", [data[i]], attrs={"brand": "ab"[i % 2]}) for i in range(2_000)])
    shards.wait_for_rebuilds(timeout=120)
    (sealed,) = shards.view.shards[("products", "top")].sealed
    assert sealed.count == 2_000 and sealed.kind == "ivf" and backends.ivf_codec(sealed.index) == codec
    assert isinstance(sealed.index, faiss.IndexRefine) == backends.CODECS[codec].pq
    assert sum(shards.search(data[i], 1, "products")[0].id == f"p{i}" for i in range(0, 2_000, 10)) >= 190

    b = compile_filter(shards.codes, {"brand": ["b"]}, {})
    for i in range(1, 400, 20):
        hits = shards.search(data[i], 5, "products", where=b)
        assert len(hits) == 5 and hits[0].id == f"p{i}" and all(int(h.id[1:]) % 2 for h in hits)

    shards.apply([Delete("products", f"p{i}", 0) for i in range(0, 2_000, 4)])  # 500 dead: a rebuild
    shards.apply([])
    shards.wait_for_rebuilds(timeout=120)
    (rebuilt,) = shards.view.shards[("products", "top")].sealed
    assert rebuilt is not sealed and rebuilt.count == 1_500 and backends.ivf_codec(rebuilt.index) == codec
    kept = [i for i in range(1, 2_000, 7) if i % 4]
    assert sum(shards.search(data[i], 1, "products")[0].id == f"p{i}" for i in kept) >= 0.95 * len(kept)
    assert all(h.id != "p0" for h in shards.search(data[0], 3, "products"))

    write_checkpoint(tmp_path, shards.view, {}, {}, {"encoder": "test", "version": "1", "dim": dim})
    _, restored = load_latest(tmp_path, {"encoder": "test", "version": "1", "dim": dim}, settings)
    (loaded,) = restored.view.shards[("products", "top")].sealed
    assert backends.probed_lists(loaded.index, settings) == backends.probed_lists(rebuilt.index, settings)
    for i in kept[:20]:
        assert [h.id for h in restored.search(data[i], 5, "products", where=b)] == [
            h.id for h in shards.search(data[i], 5, "products", where=b)
        ]
    shards.close()
    restored.close()
