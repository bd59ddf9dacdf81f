"""Shard search latency on the torch-cuda backend against exact FAISS search on the CPU, same data.

    python -m benchmarks.gpu_search --sizes 1000000x128 --output benchmarks/results/gpu.json

Rows go in through ShardSet.apply (so per-row metadata and the sealing swap
are included) and are searched one query at a time through ShardSet.search,
as /search does. The CPU baseline is faiss.knn (exact, all cores) on the same
vectors and queries.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from benchmarks.shards_bench import clustered, insert, percentiles, settle
from indexer.config import ShardSettings
from indexer.store import backends
from indexer.store.shards import ShardSet


def run(n: int, dim: int, queries: int) -> dict:
    data = clustered(n + queries, dim, seed=4)
    base, qs = data[:n], data[n:]
    shards = ShardSet(dim, ShardSettings(), backends.by_name("torch-cuda"))
    started = time.perf_counter()
    insert(shards, base, batch=10_000)
    settle(shards)
    load_s = time.perf_counter() - started
    for q in qs[:20]:
        shards.search(q, 10, "products")  # warm-up
    times = []
    found = []
    for q in qs:
        t = time.perf_counter()
        found.append([int(h.id[1:]) for h in shards.search(q, 10, "products")])
        times.append(time.perf_counter() - t)
    cpu_times = []
    exact = []
    for q in qs[:100]:
        t = time.perf_counter()
        _, rows = faiss.knn(q.reshape(1, -1), base, 10, metric=faiss.METRIC_INNER_PRODUCT)
        cpu_times.append(time.perf_counter() - t)
        exact.append(rows[0].tolist())
    agree = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found[:100], exact)])
    state = shards.view.shards[("products", "top")]
    shards.close()
    return {
        "n": n,
        "dim": dim,
        "load_s": round(load_s, 1),
        "gpu_shard": percentiles(times),
        "gpu_qps_sequential": round(len(times) / sum(times), 1),
        "cpu_qps_sequential": round(len(cpu_times) / sum(cpu_times), 1),
        "cpu_faiss_knn": percentiles(cpu_times),
        "top10_agreement_with_cpu": round(float(agree), 4),
        "sealed_rows": sum(s.count for s in state.sealed),
        "growing_rows": state.growing.count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1000000x128"])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    machine = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "cpu_cores": os.cpu_count(),
    }
    results = []
    for size in args.sizes:
        n, dim = (int(v) for v in size.split("x"))
        results.append(run(n, dim, args.queries))
        print(results[-1], flush=True)
    if args.output:
        args.output.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
