"""Query latency: /search/vector over HTTP, raw FAISS on the same index, and Milvus Lite, in one run.

    python -m benchmarks.query_bench --sizes 100000x128 1000000x128 --output benchmarks/results/query.json

Per size: clustered vectors go into a ShardSet through ``apply`` (batches of
2,000; insert rows/s) and are sealed by the background builder (build time).
Then, with the shards behind the real aiohttp app and a client in another
process (benchmarks/httpload.py), one request at a time:

* HTTP floor: an empty aiohttp handler on the same event loop, what any
  request costs before lookstream does anything;
* ``/search/vector`` (k 10), and again while a writer thread upserts 200
  records every 50 ms (concurrent ingest);
* raw FAISS over the same rows, back to back, and paced with a pause as long
  as an HTTP request between queries (a CPU that idles between queries loses
  its caches; HTTP requests arrive that way): ``index.search`` on the sealed
  index plus exact ``faiss.knn`` over the rows still in the growing segment
  (up to ``ShardSettings.growing_max_rows``; lookstream searches both);
* QPS with 4 connections; recall@10 against exact search; insert →
  searchable delay of single new rows (apply, then search until found).

The same data, queries and measures on Milvus Lite follow (benchmarks/against_milvus.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np
from aiohttp import web

from benchmarks import against_milvus
from benchmarks.httpload import run_client
from benchmarks.shards_bench import clustered, insert, percentiles, settle
from indexer import generations
from indexer.config import Settings, ShardSettings
from indexer.node import Node
from indexer.store import backends
from indexer.store.records import Item, Upsert
from indexer.store.segments import Segment
from indexer.store.shards import ShardSet, one_openmp_thread, release_freed_memory
from indexer.web.app import create_app

PROFILES = {
    "quick": {"sizes": ["100000x128", "100000x1280", "1000000x128"], "queries": 500, "qps_seconds": 3},
    "full": {"sizes": ["100000x128", "100000x1280", "1000000x128"], "queries": 2000, "qps_seconds": 10},
}
RECALL_QUERIES = 200
FRESH_ROWS = 20


async def empty(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"hits": []})


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


def latencies(rows: list[tuple]) -> list[float]:
    if any(status != 200 for _, _, status in rows):
        raise RuntimeError(f"failed requests: {sorted({s for _, _, s in rows if s != 200})}")
    return [seconds for _, seconds, _ in rows]


def raw_latencies(segments: tuple[Segment, ...], queries: np.ndarray, pause_s: float = 0.0) -> list[float]:
    """FAISS alone over the rows lookstream searches: the sealed index, and the growing rows exactly."""
    times = []
    with one_openmp_thread():  # as lookstream searches; the faster setting for one query
        for q in queries:
            if pause_s:
                time.sleep(pause_s)
            query = q.reshape(1, -1)
            started = time.perf_counter()
            for segment in segments:
                if segment.index is not None:
                    segment.index.search(query, 10, params=segment.search_params)
                elif segment.count:
                    faiss.knn(query, segment.vectors[: segment.count], 10, metric=faiss.METRIC_INNER_PRODUCT)
            times.append(time.perf_counter() - started)
    return times


def searchable_delays(shards: ShardSet, fresh: np.ndarray, first: int) -> list[float]:
    delays = []
    for j, v in enumerate(fresh):
        record = f"p{first + j}"
        started = time.perf_counter()
        shards.apply([Upsert("products", record, 0, {}, (Item("top", v, (0, 0, 1, 1), None, 1.0),))])
        while record not in [h.id for h in shards.search(v, 10, "products")]:
            pass
        delays.append(time.perf_counter() - started)
    return delays


async def lookstream(base: np.ndarray, qs: np.ndarray, exact: np.ndarray, fresh: np.ndarray, qps_s: float) -> dict:
    n, dim = base.shape
    shards = ShardSet(dim, ShardSettings(), backends.by_name("cpu"))
    started = time.perf_counter()
    insert(shards, base)
    insert_s = time.perf_counter() - started
    settle(shards)
    build_s = time.perf_counter() - started - insert_s
    found = [[int(h.id[1:]) for h in shards.search(q, 10, "products")] for q in qs[: len(exact)]]
    recall = np.mean([len(set(f) & set(e.tolist())) / 10 for f, e in zip(found, exact)])
    delays = searchable_delays(shards, fresh, n)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.model_validate({"data_dir": tmp})
        node = Node.create(settings, generations.load(settings, settings.models))
        node.active.shards = shards  # vectors of this benchmark's dimension; /search/vector uses no model
        bare = web.Application()
        bare.router.add_post("/", empty)
        floor_runner, floor_port = await serve(bare)
        runner, port = await serve(create_app(node, consume=False))
        state = shards.view.shards[("products", "top")]
        await run_client(port, "/search/vector", qs[:50])  # warm-up
        floor = latencies(await run_client(floor_port, "/", qs))
        http = latencies(await run_client(port, "/search/vector", qs))
        raw = raw_latencies(state.segments, qs)
        paced = raw_latencies(state.segments, qs, pause_s=float(np.median(http)))
        index, growing_rows = "+".join(s.kind for s in state.sealed), state.growing.count
        del state  # else its sealed index (5 GB at 1M x 1280) outlives the rebuilds that ingest below starts
        qps = len(latencies(await run_client(port, "/search/vector", qs, seconds=qps_s, connections=4))) / qps_s

        stop = threading.Event()

        def writer() -> None:  # concurrent ingest: rewrite records in batches of 200
            rng = np.random.default_rng(1)
            while not stop.is_set():
                start = int(rng.integers(0, n - 200))
                insert(shards, base[start : start + 200], start=start, batch=200)
                time.sleep(0.05)

        thread = threading.Thread(target=writer)
        thread.start()
        during_ingest = latencies(await run_client(port, "/search/vector", qs))
        stop.set()
        thread.join()
        await runner.cleanup()
        await floor_runner.cleanup()  # the app's cleanup closed the node and with it the shards
    result = {
        "index": index,
        "growing_rows": growing_rows,
        "insert_rows_per_s": round(n / insert_s),
        "index_build_s": round(build_s, 1),
        "insert_to_searchable": percentiles(delays),
        "http_floor": percentiles(floor),
        "http": percentiles(http),
        "raw_faiss": percentiles(raw),
        "raw_faiss_paced": percentiles(paced),
        "http_during_ingest": percentiles(during_ingest),
        "qps_4_connections": round(qps, 1),
        "recall_at_10": round(float(recall), 4),
        "http_samples_ms": [round(s * 1000, 3) for s in http],
        "raw_samples_ms": [round(s * 1000, 3) for s in raw],
    }
    result["ratio_p50"] = round(result["http"]["p50_ms"] / result["raw_faiss"]["p50_ms"], 2)
    result["ratio_p50_paced"] = round(result["http"]["p50_ms"] / result["raw_faiss_paced"]["p50_ms"], 2)
    return result


def run(n: int, dim: int, queries: int, qps_s: float, milvus: bool, directory: Path) -> dict:
    # In a file the kernel can page out: at 1M x 1280 the data alone is 5 GB beside the shards' own copies.
    shape = (n + queries + FRESH_ROWS, dim)
    data = clustered(*shape, seed=5, out=np.lib.format.open_memmap(directory / "data.npy", "w+", np.float32, shape))
    base, qs, fresh = data[:n], np.array(data[n : n + queries]), np.array(data[n + queries :])
    _, exact = faiss.knn(qs[:RECALL_QUERIES], base, 10, metric=faiss.METRIC_INNER_PRODUCT)
    result = {"n": n, "dim": dim, "lookstream": asyncio.run(lookstream(base, qs, exact, fresh, qps_s))}
    gc.collect()
    release_freed_memory()  # the shards are gone before Milvus Lite loads the same vectors
    print({k: v for k, v in result["lookstream"].items() if not k.endswith("samples_ms")}, flush=True)
    if milvus:
        result["milvus_lite"] = against_milvus.run(base, qs, exact, fresh, directory, qps_s)
        print({k: v for k, v in result["milvus_lite"].items() if k != "samples_ms"}, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=PROFILES, default="quick")
    parser.add_argument("--sizes", nargs="+", help="NxDIM, instead of the profile's")
    parser.add_argument("--no-milvus", action="store_true", help="lookstream and raw FAISS only")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    profile = PROFILES[args.profile]
    results = []
    for size in args.sizes or profile["sizes"]:
        n, dim = (int(v) for v in size.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run(n, dim, profile["queries"], profile["qps_seconds"], not args.no_milvus, Path(tmp)))
    if args.output:
        import pymilvus

        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
        versions = {"faiss": faiss.__version__, "pymilvus": pymilvus.__version__}
        document = {"profile": args.profile, "machine": machine, "versions": versions, "results": results}
        args.output.write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
