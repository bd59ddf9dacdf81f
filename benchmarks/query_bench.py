"""/search/vector latency through the real HTTP server, against raw FAISS on the same index, same run.

    python -m benchmarks.query_bench --sizes 100000x128 --output benchmarks/results/query.json

The node's shards are filled through ShardSet.apply (sealed into HNSW by the
background builder), then 1,000 vector queries go one at a time through a real
aiohttp server (JSON encode, HTTP, executor hop, lock-free search, merge) and
the same queries through ``index.search`` on the sealed FAISS index directly.
The HTTP client runs in another process, one request at a time.
Reported: p50/p99 of both and their ratio (goal: HTTP <= 1.5x raw at p50),
and the same while a writer thread keeps upserting (concurrent ingest).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from aiohttp import web

from benchmarks.shards_bench import clustered, insert, percentiles, settle
from indexer import generations
from indexer.api import create_app
from indexer.config import Settings
from indexer.node import Node
from indexer.segments import IndexPolicy
from indexer.shards import ShardSet

CLIENT = """
import asyncio, json, sys, time
import aiohttp

async def main(port, path):
    queries = json.load(open(path))
    times = []
    async with aiohttp.ClientSession() as session:
        for q in queries:
            started = time.perf_counter()
            async with session.post(f"http://127.0.0.1:{port}/search/vector", json={"vector": q, "k": 10}) as r:
                assert r.status == 200, await r.text()
                await r.read()
            times.append(time.perf_counter() - started)
    print(json.dumps(times))

asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"""


async def http_latencies(port: int, queries: np.ndarray, tmp: str) -> list[float]:
    """Latencies seen by a client in another process, so that it does not share the server's event loop."""
    path = Path(tmp) / "queries.json"
    path.write_text(json.dumps(queries.tolist()))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, str(port), str(path), stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await process.communicate()
    assert process.returncode == 0
    return json.loads(stdout)


def raw_latencies(index, params, queries: np.ndarray) -> list[float]:
    times = []
    for q in queries:
        started = time.perf_counter()
        index.search(q.reshape(1, -1), 10, params=params)
        times.append(time.perf_counter() - started)
    return times


async def run(n: int, dim: int, queries: int) -> dict:
    data = clustered(n + queries, dim, seed=5)
    base, qs = data[:n], data[n:]
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.model_validate({"data_dir": tmp})
        shards = ShardSet(dim, IndexPolicy(), "cpu")
        insert(shards, base)
        settle(shards)
        node = Node.create(settings, generations.load(settings, settings.models))
        node.active.shards = shards  # vectors of this benchmark's dimension; /search/vector uses no model
        runner = web.AppRunner(create_app(node, consume=False))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        sealed = shards.view.shards[("products", "top")].sealed
        await http_latencies(port, qs[:50], tmp)  # warm-up
        raw_latencies(sealed.index, sealed.search_params, qs[:50])
        steady_http = await http_latencies(port, qs, tmp)
        steady_raw = raw_latencies(sealed.index, sealed.search_params, qs)

        stop = threading.Event()

        def writer() -> None:  # concurrent ingest: rewrite records in batches of 200
            rng = np.random.default_rng(1)
            while not stop.is_set():
                start = int(rng.integers(0, n - 200))
                insert(shards, base[start : start + 200], start=start, batch=200)
                time.sleep(0.05)

        thread = threading.Thread(target=writer)
        thread.start()
        ingest_http = await http_latencies(port, qs, tmp)
        stop.set()
        thread.join()
        await runner.cleanup()
    result = {
        "n": n,
        "dim": dim,
        "index": sealed.kind,
        "http": percentiles(steady_http),
        "raw_faiss": percentiles(steady_raw),
        "http_during_ingest": percentiles(ingest_http),
    }
    result["ratio_p50"] = round(result["http"]["p50_ms"] / result["raw_faiss"]["p50_ms"], 2)
    result["qps_http_sequential"] = round(len(qs) / sum(steady_http), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["100000x128"])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    results = []
    for size in args.sizes:
        n, dim = (int(v) for v in size.split("x"))
        results.append(asyncio.run(run(n, dim, args.queries)))
        print(results[-1], flush=True)
    if args.output:
        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
        args.output.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
