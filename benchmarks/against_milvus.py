"""The query benchmark's workload on Milvus Lite (PyPI ``milvus-lite`` through ``pymilvus``), for a side-by-side table.

Milvus Lite 3 is a Python engine over faiss-cpu; its gRPC server runs in a
thread of the calling process (it is meant to be embedded), reached through
pymilvus as lookstream is over HTTP. The index mirrors lookstream's default policy at the
same size: HNSW (M 32, efConstruction 64, ef 128) up to 200,000 rows, IVF_FLAT
(4·sqrt(n) lists, nprobe = lists/16) above. Measured: insert rows/s (batches
of 2,000, until ``insert`` returns), index build time, insert → searchable
delay of single new rows, one-at-a-time query latency, QPS over 4 threads and
recall@10 against exact search. Its queries are far slower than lookstream's at
1M rows (hundreds of ms to seconds), so the one-at-a-time queries stop after
``QUERY_BUDGET_S`` (at least ``MIN_QUERIES`` of them); the table gives the count.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.shards_bench import percentiles
from indexer.config import ShardSettings
from indexer.store.backends import ivf_nlist, ivf_nprobe

COLLECTION = "bench"
QUERY_BUDGET_S = 300
MIN_QUERIES = 100


def _index(n: int, policy: ShardSettings) -> tuple[str, dict, dict]:
    if n <= policy.hnsw_max_rows:
        build = {"M": policy.hnsw_m, "efConstruction": policy.hnsw_ef_construction}
        return "HNSW", build, {"ef": policy.hnsw_ef_search}
    nlist = ivf_nlist(n)
    return "IVF_FLAT", {"nlist": nlist}, {"nprobe": ivf_nprobe(nlist, policy)}


def run(
    base: np.ndarray, queries: np.ndarray, exact: np.ndarray, fresh: np.ndarray, directory: Path, qps_seconds: float
) -> dict:
    """``exact``: the true top-10 rows of ``queries[:len(exact)]``; ``fresh``: vectors inserted one at a time."""
    from pymilvus import DataType, MilvusClient

    n, dim = base.shape
    policy = ShardSettings()
    index_type, build, search = _index(n, policy)
    client = MilvusClient(str(directory / "milvus.db"))
    schema = client.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    index_params = client.prepare_index_params()
    index_params.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=build)
    client.create_collection(COLLECTION, schema=schema, index_params=index_params)

    started = time.perf_counter()
    for i in range(0, n, 2000):
        client.insert(COLLECTION, [{"id": i + j, "vector": v} for j, v in enumerate(base[i : i + 2000])])
    insert_s = time.perf_counter() - started
    client.flush(COLLECTION)
    while client.describe_index(COLLECTION, "vector").get("pending_index_rows", 0):
        time.sleep(0.1)
    build_s = time.perf_counter() - started - insert_s

    def top(q: np.ndarray) -> list[int]:
        found = client.search(COLLECTION, data=[q], limit=10, search_params={"params": search})
        return [hit["id"] for hit in found[0]]

    for q in queries[:50]:
        top(q)  # warm-up
    times, found = [], []
    deadline = time.perf_counter() + QUERY_BUDGET_S
    for q in queries:
        if len(times) >= MIN_QUERIES and time.perf_counter() > deadline:
            break
        t = time.perf_counter()
        found.append(top(q))
        times.append(time.perf_counter() - t)
    recall = np.mean([len(set(f) & set(e.tolist())) / 10 for f, e in zip(found, exact)])

    stop = time.perf_counter() + qps_seconds

    def worker(offset: int) -> int:
        done = 0
        while time.perf_counter() < stop:
            top(queries[(offset + done * 4) % len(queries)])
            done += 1
        return done

    with ThreadPoolExecutor(4) as pool:
        qps = sum(pool.map(worker, range(4))) / qps_seconds

    delays = []
    for j, v in enumerate(fresh):  # one new row at a time, then search until it is its own top hit
        new_id = n + j
        t = time.perf_counter()
        client.insert(COLLECTION, [{"id": new_id, "vector": v}])
        while new_id not in top(v):
            if time.perf_counter() - t > 30:
                raise TimeoutError("Milvus Lite did not return a new row within 30 s")
        delays.append(time.perf_counter() - t)
    client.drop_collection(COLLECTION)
    client.close()
    return {
        "index": index_type.lower(),
        "insert_rows_per_s": round(n / insert_s),
        "index_build_s": round(build_s, 1),
        "insert_to_searchable": percentiles(delays),
        "query": percentiles(times),
        "queries": len(times),
        "recall_queries": min(len(found), len(exact)),
        "qps_4_connections": round(qps, 1),
        "recall_at_10": round(float(recall), 4),
        "samples_ms": [round(t * 1000, 3) for t in times],
    }
