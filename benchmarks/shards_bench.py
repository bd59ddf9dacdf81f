"""Shard benchmarks: ANN recall@10 against exact search, and memory after churn.

    python -m benchmarks.shards_bench --output benchmarks/results/shards.json

Recall: vectors from a mixture of Gaussians (normalised, like real embeddings,
which cluster), inserted through ShardSet.apply, sealed by the background
builder with the default ShardSettings (HNSW up to 200k rows, IVF above); 1,000
held-out queries from the same distribution; recall@10 = share of the exact
top-10 (faiss.knn over all live vectors) that the shard returns.

Churn: resident memory (RSS) of the shards after rewriting 50% of the records
with new vectors, against the RSS of the live data alone (the same number of
records inserted once), in the same process, after the rebuilds settle.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path

import faiss
import numpy as np

from indexer.config import ShardSettings
from indexer.store.records import Item, Upsert
from indexer.store.shards import ShardSet


def clustered(
    n: int, dim: int, seed: int, centres: int = 1000, spread: float = 0.6, out: np.ndarray | None = None
) -> np.ndarray:
    """Normalised points around random centres; the noise is ``spread`` times as large as a centre.

    Made in blocks of float32 rows, so 1M x 1280 (5 GB) needs little more than its own size;
    ``out`` (a memory-mapped file, say) receives them instead of a new array.
    """
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, dim), dtype=np.float32)
    x = np.empty((n, dim), np.float32) if out is None else out
    for i in range(0, n, 100_000):
        block = x[i : i + 100_000]
        block[:] = middle[rng.integers(centres, size=len(block))]
        block += spread * rng.standard_normal(block.shape, dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return x


def insert(shards: ShardSet, vectors: np.ndarray, start: int = 0, batch: int = 2000, tag: int = 0) -> None:
    for i in range(0, len(vectors), batch):
        ops = [
            Upsert("products", f"p{start + i + j}", 0, {"v": tag}, (Item("top", v, (0, 0, 1, 1), None, 1.0),))
            for j, v in enumerate(vectors[i : i + batch])
        ]
        shards.apply(ops)


def settle(shards: ShardSet) -> None:
    """Until no build runs or is due, including the merge of an idle shard's segments into one."""
    for _ in range(10):
        shards.wait_for_rebuilds()
        shards.apply([])  # lets the writer schedule the next rebuild if one is due
    shards.wait_for_rebuilds()
    while shards.settings.merge_when_idle_s and any(len(s.sealed) > 1 for s in shards.view.shards.values()):
        time.sleep(0.5)
        shards.maintain()
    shards.wait_for_rebuilds()


def percentiles(samples: list[float]) -> dict:
    """p50 and p99 in milliseconds of durations in seconds."""
    a = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def recall(n: int, dim: int, policy: ShardSettings, spread: float = 0.6) -> dict:
    """``spread`` 0.6: clustered like embeddings; a large spread approaches uniform on the sphere (hardest)."""
    data = clustered(n + 1000, dim, seed=1, spread=spread)
    base, queries = data[:n], data[n:]
    shards = ShardSet(dim, policy)
    started = time.perf_counter()
    insert(shards, base)
    settle(shards)
    build_s = time.perf_counter() - started
    (size,) = shards.sizes()
    _, exact = faiss.knn(queries, base, 10, metric=faiss.METRIC_INNER_PRODUCT)
    started = time.perf_counter()
    found = [[int(h.id[1:]) for h in shards.search(q, 10, "products")] for q in queries]
    query_s = time.perf_counter() - started
    hits = sum(len(set(f) & set(e.tolist())) for f, e in zip(found, exact))
    shards.close()
    return {
        "n": n,
        "dim": dim,
        "spread": spread,
        "index": size["sealed"],
        "sealed_rows": size["sealed_rows"],
        "growing_rows": size["growing_rows"],
        "recall_at_10": round(hits / (10 * len(queries)), 4),
        "insert_and_build_s": round(build_s, 1),
        "query_ms_mean": round(1000 * query_s / len(queries), 3),
    }


def _resident_after(n: int, dim: int, churned: bool, queue) -> None:
    """In a fresh process: RSS growth from holding n records (optionally after rewriting half)."""
    from indexer.store.shards import release_freed_memory

    warm = ShardSet(dim, ShardSettings(seal_min_rows=100))  # load faiss, OpenMP, numpy first
    insert(warm, clustered(500, dim, seed=9))
    settle(warm)
    warm.close()
    del warm
    gc.collect()
    release_freed_memory()
    before = rss_mb()
    shards = ShardSet(dim, ShardSettings())
    insert(shards, clustered(n, dim, seed=2))
    settle(shards)
    if churned:
        insert(shards, clustered(n // 2, dim, seed=3), tag=1)  # upserts of p0 .. p(n/2 - 1)
        settle(shards)
    gc.collect()
    release_freed_memory()
    (size,) = shards.sizes()
    queue.put({"mb": rss_mb() - before, "rows": size["vectors"], "sealed": size["sealed"], "rebuilds": shards.rebuilds})


def churn(n: int, dim: int) -> dict:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    measured = {}
    for churned in (False, True):
        queue = context.Queue()
        process = context.Process(target=_resident_after, args=(n, dim, churned, queue))
        process.start()
        measured[churned] = queue.get()
        process.join()
    live, after = measured[False], measured[True]
    return {
        "n": n,
        "dim": dim,
        "live_mb": round(live["mb"], 1),
        "after_50pct_churn_mb": round(after["mb"], 1),
        "ratio": round(after["mb"] / live["mb"], 3),
        "raw_vectors_mb": round(n * dim * 4 / 2**20, 1),
        "live_rows": after["rows"],
        "sealed": after["sealed"],
        "rebuilds": after["rebuilds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("quick", "full"), default="quick")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    policy = ShardSettings()
    sizes = [(50_000, 128), (50_000, 1280)] if args.profile == "quick" else [(200_000, 128), (100_000, 1280)]
    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "faiss": faiss.__version__,
        },
        "recall": [],
        "churn": [],
    }
    for n, dim in sizes:
        results["recall"].append(recall(n, dim, policy))
        print(results["recall"][-1], flush=True)
    ivf = ShardSettings(hnsw_max_rows=10_000)  # force IVF at these sizes to measure it too
    results["recall"].append({**recall(sizes[0][0], 128, ivf), "policy": "ivf forced"})
    print(results["recall"][-1], flush=True)
    for policy_name, p in (("default", policy), ("ivf forced", ivf)):  # the hard case: no cluster structure
        results["recall"].append({**recall(sizes[0][0], 128, p, spread=10.0), "policy": policy_name})
        print(results["recall"][-1], flush=True)
    for n, dim in sizes:
        results["churn"].append(churn(n, dim))
        print(results["churn"][-1], flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
