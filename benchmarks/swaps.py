"""Query latency while shards are rebuilt and swapped, and while a new model generation takes over.

    python -m benchmarks.swaps --profile quick --output benchmarks/results/swaps.json

A client in another process (benchmarks/httpload.py) sends ``/search/vector``
requests back to back through the real aiohttp app, and every request's start,
duration and status is kept. The node's swap moments are recorded by a thread
that watches it every 10 ms.

* Rebuild swaps: clustered vectors sealed into HNSW; then a writer rewrites a
  quarter of the records at a time, at up to 10,000 records a second (the
  deleted share crosses ``rebuild_dead_fraction``), waits for the background
  rebuild to be swapped in, and starts again; every other round the rebuild is
  asked for through ``POST /admin/rebuild`` instead.
* Generation flips: the real local broker and the default models; products
  are indexed, then ``POST /admin/swap`` selects another classifier, a new
  generation replays the topic beside the active one and the node flips to it
  once it has caught up; then back again.

Reported for each: p50/p99 in a steady phase before, over the whole phase
(the writes and the rebuild or replay compete for the same cores), of the
requests running within ±100 ms of a swap (goal: p99 ≤ 2× steady), and of
the rest of the phase, which has the same load but no swap; failed requests
(goal: 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np

from benchmarks.crash_recovery import free_port
from benchmarks.httpload import run_client
from benchmarks.ingest import images, wait_consumed
from benchmarks.query_bench import serve
from benchmarks.shards_bench import clustered, insert, percentiles, settle
from indexer import generations
from indexer.config import Settings, ShardSettings
from indexer.events import Event, encode_event, now_ms
from indexer.images import decode_image
from indexer.kafka.broker import LocalBroker
from indexer.kafka.topics import ensure_topics
from indexer.node import Node, build_node
from indexer.store import backends
from indexer.store.shards import ShardSet
from indexer.web.app import create_app
from producers.publisher import make_producer

PROFILES = {
    "quick": {"rows": 50_000, "dim": 128, "steady_s": 15, "rebuild_s": 45, "events": 150, "flip_s": 90},
    "full": {"rows": 200_000, "dim": 128, "steady_s": 30, "rebuild_s": 120, "events": 500, "flip_s": 240},
}
WINDOW_S = 0.1
TOKEN = "benchmark"


class Watcher(threading.Thread):
    """Records the wall-clock time whenever ``value()`` changes.

    It looks every 10 ms, fine enough for the ±100 ms window: polling each
    millisecond took the GIL from the server 1,000 times a second.
    """

    def __init__(self, value: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.value, self.times, self.stopped = value, [], threading.Event()

    def run(self) -> None:
        last = self.value()
        while not self.stopped.wait(0.01):
            now = self.value()
            if now is not last and now != last:
                self.times.append(time.time())
                last = now


def summary(rows: list[tuple]) -> dict:
    ok = [seconds for _, seconds, status in rows if status == 200]
    failed = len(rows) - len(ok)
    return {"requests": len(rows), "failed": failed, **(percentiles(ok) if ok else {"p50_ms": None, "p99_ms": None})}


def phase(steady: list[tuple], during: list[tuple], swaps: list[float]) -> dict:
    """Requests near a swap against the steady phase, and against the rest of the same phase (same load)."""
    is_near = [any(r[0] - WINDOW_S <= t <= r[0] + r[1] + WINDOW_S for t in swaps) for r in during]
    near = [r for r, n in zip(during, is_near) if n]
    away = [r for r, n in zip(during, is_near) if not n]
    result = {"swaps": len(swaps), "steady": summary(steady), "whole_phase": summary(during)}
    result["away_from_swaps"], result["near_swaps"] = summary(away), summary(near)
    if result["near_swaps"]["p99_ms"] is not None:
        near_p99 = result["near_swaps"]["p99_ms"]
        result["near_swaps_p99_over_steady"] = round(near_p99 / result["steady"]["p99_ms"], 2)
        result["near_swaps_p99_over_away"] = round(near_p99 / result["away_from_swaps"]["p99_ms"], 2)
    result["timeline"] = [[round(s, 3), round(d * 1000, 3), status] for s, d, status in during]
    result["swap_times"] = [round(t, 3) for t in swaps]
    return result


def paced_upserts(shards: ShardSet, base: np.ndarray, start: int, count: int) -> None:
    """Rewrite records as a busy consumer would: batches of 500, 10,000 records a second at most."""
    for i in range(start, start + count, 500):
        insert(shards, base[i : min(i + 500, start + count)], start=i, batch=500)
        time.sleep(0.05)


async def rebuild_swaps(profile: dict) -> dict:
    n, dim = profile["rows"], profile["dim"]
    data = clustered(n + 1000, dim, seed=7)
    base, qs = data[:n], data[n:]
    shards = ShardSet(dim, ShardSettings(), backends.by_name("cpu"))
    insert(shards, base)
    settle(shards)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.model_validate({"data_dir": tmp, "api": {"admin_token": TOKEN}})
        node = Node.create(settings, generations.load(settings, settings.models))
        node.active.shards = shards
        runner, port = await serve(create_app(node, consume=False))
        steady = await run_client(port, "/search/vector", qs, seconds=profile["steady_s"])
        watcher = Watcher(lambda: shards.rebuilds)
        watcher.start()
        stop = threading.Event()
        loop = asyncio.get_running_loop()

        def writer() -> None:
            rng = np.random.default_rng(3)
            round_ = 0
            while not stop.is_set():
                before = shards.rebuilds
                start = int(rng.integers(0, n - n // 4))
                if round_ % 2:  # the admin route, as an operator would
                    paced_upserts(shards, base, start, n // 20)
                    asyncio.run_coroutine_threadsafe(admin(port, "/admin/rebuild", None), loop).result()
                else:  # a quarter rewritten: the deleted share crosses rebuild_dead_fraction
                    paced_upserts(shards, base, start, n // 4)
                while shards.rebuilds == before and not stop.is_set():
                    shards.maintain()
                    time.sleep(0.01)
                round_ += 1
                stop.wait(1.0)

        thread = threading.Thread(target=writer)
        thread.start()
        during = await run_client(port, "/search/vector", qs, seconds=profile["rebuild_s"])
        stop.set()
        await loop.run_in_executor(None, thread.join)
        watcher.stopped.set()
        await runner.cleanup()
    return {"rows": n, "dim": dim, **phase(steady, during, watcher.times)}


async def admin(port: int, path: str, body: dict | None) -> dict:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    url = f"http://127.0.0.1:{port}{path}"
    async with aiohttp.ClientSession() as session, session.post(url, json=body, headers=headers) as response:
        assert response.status in (200, 202), await response.text()
        return await response.json()


async def generation_flips(profile: dict) -> dict:
    data = images(64)
    with tempfile.TemporaryDirectory(prefix="lookstream-swaps-") as tmp, LocalBroker(free_port()) as broker:
        settings = Settings.model_validate(
            {
                "data_dir": tmp,
                "kafka": {"bootstrap_servers": broker.bootstrap_servers, "partitions": 1},
                "api": {"admin_token": TOKEN},
            }
        )
        ensure_topics(settings.kafka)
        node = build_node(settings, durable=False)
        queries = node.active.pipeline.encode([decode_image(d, 10**8) for d in data[:32]])
        runner, port = await serve(create_app(node, consume=True))
        producer = make_producer(settings.kafka)
        for i in range(profile["events"]):
            event = Event("product.upsert", f"p{i}", now_ms(), image=data[i % len(data)], attrs={"category": "top"})
            producer.send(settings.kafka.topics.products, key=event.id.encode(), value=encode_event(event))
        producer.flush()
        producer.close()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, wait_consumed, node, profile["events"])
        steady = await run_client(port, "/search/vector", queries, seconds=profile["steady_s"])
        watcher = Watcher(lambda: node.active)
        watcher.start()
        client = asyncio.create_task(run_client(port, "/search/vector", queries, seconds=profile["flip_s"]))
        deadline = time.monotonic() + profile["flip_s"] - 5
        flips = []
        for classifier in ("detector-label", settings.models.classifier):
            started = time.monotonic()
            await admin(port, "/admin/swap", {"classifier": classifier})
            while node.active.selection.classifier != classifier and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if node.active.selection.classifier == classifier:
                flips.append(round(time.monotonic() - started, 1))
        during = await client
        watcher.stopped.set()
        await runner.cleanup()
    return {"events": profile["events"], "flip_after_s": flips, **phase(steady, during, watcher.times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=PROFILES, default="quick")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    profile = PROFILES[args.profile]
    results = {"rebuild_swaps": asyncio.run(rebuild_swaps(profile))}
    print({k: v for k, v in results["rebuild_swaps"].items() if k not in ("timeline", "swap_times")}, flush=True)
    results["generation_flips"] = asyncio.run(generation_flips(profile))
    print({k: v for k, v in results["generation_flips"].items() if k not in ("timeline", "swap_times")}, flush=True)
    if args.output:
        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
        args.output.write_text(json.dumps({"profile": args.profile, "machine": machine, **results}) + "\n")


if __name__ == "__main__":
    main()
