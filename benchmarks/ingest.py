"""Ingest efficiency and freshness of one node on this machine.

    python -m benchmarks.ingest --output benchmarks/results/ingest.json

* bare: the configured models alone (detect, encode in batches of
  ``models.batch_size``) on the same images, decoded beforehand, images/s;
  measured before and after the end-to-end run and averaged (a shared VM's
  speed drifts by 10% within minutes). "Bare with decode" decodes each batch
  first, in the same loop (issue 19's reference: the work every event needs).
* end to end: N events published up front through the local broker; events/s
  in steady state, from the first batch searchable to the last event (the
  bare rate also leaves out its first, warm-up batch). The rate from the first
  event sent is kept too. Efficiency = end to end / bare.
* freshness: events published at 50% and 90% of the measured end-to-end rate
  for --seconds each; per event, producer timestamp -> searchable (the node's
  own freshness measure, the /metrics histogram), p50 and p99.
* image query: ``POST /search`` with one 256x256 JPEG of a product not indexed,
  one at a time from a client in another process, over the indexed records
  once their index builds are done (decode, the same models, search): p50 and p99.

The process is set up as ``lookstream up`` sets a node's (indexer/interpreter.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.httpload import run_client
from benchmarks.query_bench import latencies, serve
from benchmarks.shards_bench import percentiles, settle
from indexer.config import Settings
from indexer.events import Event, encode_event, now_ms
from indexer.images import decode_image
from indexer.interpreter import serve_from_this_process
from indexer.kafka.broker import LocalBroker
from indexer.kafka.topics import ensure_topics
from indexer.node import build_node
from indexer.web.app import create_app
from plugins.manager import resolve_device, resolve_runtime
from producers.publisher import make_producer
from tests.support.imagegen import encoded, product_image
from tests.support.processes import free_port

PROFILES = {"quick": {"events": 512, "seconds": 30}, "full": {"events": 1024, "seconds": 120}}


def images(n: int) -> list[bytes]:
    return [encoded(product_image(i, (320, 400))) for i in range(n)]


def bare_rate(node, data: list[bytes], *, decode: bool = False) -> float:
    """Images/s of the models alone, analysing in batches: the images decoded beforehand, or (``decode``) each
    batch decoded just before it is analysed, in the same thread."""
    pipeline = node.active.pipeline
    batch = node.settings.models.batch_size
    decoded = [decode_image(d, 10**8) for d in data]
    pipeline.analyse(decoded[:batch], [{}] * batch)  # warm-up
    started = time.perf_counter()
    for i in range(0, len(data), batch):
        chunk = [decode_image(d, 10**8) for d in data[i : i + batch]] if decode else decoded[i : i + batch]
        pipeline.analyse(chunk, [{}] * len(chunk))
    return len(data) / (time.perf_counter() - started)


def wait_consumed(node, total: int, timeout: float = 600) -> int:
    """Wait until at least ``total`` events are consumed; returns how many are."""
    deadline = time.monotonic() + timeout
    while (consumed := node.active.stats.counters()["consumed"]) < total:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {consumed} of {total} consumed")
        time.sleep(0.02)
    return consumed


async def image_queries(node, jpegs: list[bytes]) -> dict:
    """p50/p99 of ``POST /search`` with each JPEG once (after a warm-up), served by the node's app, which then
    closes the node."""
    runner, port = await serve(create_app(node, consume=False))
    try:
        await run_client(port, "/search?k=10", jpegs[:20])  # warm-up
        return percentiles(latencies(await run_client(port, "/search?k=10", jpegs)))
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=PROFILES, default="quick")
    parser.add_argument("--events", type=int, help="published up front for the end-to-end rate")
    parser.add_argument("--seconds", type=float, help="of steady load at each share of capacity")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    args.events = args.events or PROFILES[args.profile]["events"]
    args.seconds = args.seconds or PROFILES[args.profile]["seconds"]
    data = images(256)
    freshness: list[tuple[float, float]] = []  # (wall-clock time searchable, seconds since the event)
    with tempfile.TemporaryDirectory(prefix="lookstream-ingest-") as tmp, LocalBroker(free_port()) as broker:
        settings = Settings.model_validate(
            {"data_dir": tmp, "kafka": {"bootstrap_servers": broker.bootstrap_servers, "partitions": 1}}
        )
        ensure_topics(settings.kafka)
        node = build_node(settings, durable=True)
        serve_from_this_process(settings.api.switch_interval_ms)
        bare_before = bare_rate(node, data)
        decoding_before = bare_rate(node, data, decode=True)
        print(f"bare models: {bare_before:.1f} images/s ({decoding_before:.1f} with decode)", flush=True)
        node.observe_freshness(lambda seconds, phase: freshness.append((time.time(), seconds)))
        node.start_ingest()
        while not node.active.consumer.assigned.is_set():
            time.sleep(0.05)
        producer = make_producer(settings.kafka)
        topic = settings.kafka.topics.products

        def send(i: int) -> None:
            event = Event("product.upsert", f"p{i}", now_ms(), image=data[i % len(data)], attrs={"category": "top"})
            producer.send(topic, key=event.id.encode(), value=encode_event(event))

        started = time.perf_counter()
        for i in range(args.events):
            send(i)
        producer.flush()
        first_batch = wait_consumed(node, settings.models.batch_size)
        first_batch_at = time.perf_counter()
        wait_consumed(node, args.events)
        finished = time.perf_counter()
        end_to_end = (args.events - first_batch) / (finished - first_batch_at)
        from_first_sent = args.events / (finished - started)
        bare_after = bare_rate(node, data)
        decoding_after = bare_rate(node, data, decode=True)
        bare = (bare_before + bare_after) / 2
        decoding = (decoding_before + decoding_after) / 2
        print(
            f"end to end: {end_to_end:.1f} events/s ({from_first_sent:.1f} from the first sent); "
            f"bare after: {bare_after:.1f} images/s ({decoding_after:.1f} with decode); "
            f"efficiency {end_to_end / bare:.2f} ({end_to_end / decoding:.2f} against bare with decode)",
            flush=True,
        )

        sent = args.events
        loads = []
        for share in (0.5, 0.9):
            rate = share * end_to_end
            freshness.clear()
            begin_wall = time.time()
            before = node.active.stats.counters()["consumed"]
            count = int(rate * args.seconds)
            begin = time.perf_counter()
            for j in range(count):
                target = begin + j / rate
                delay = target - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                send(sent + j)
            producer.flush()
            sent += count
            wait_consumed(node, before + count)
            ms = np.asarray([seconds for _, seconds in freshness]) * 1000
            loads.append(
                {
                    "share_of_capacity": share,
                    "events_per_s": round(rate, 1),
                    "events": count,
                    "freshness_p50_ms": round(float(np.percentile(ms, 50)), 1),
                    "freshness_p99_ms": round(float(np.percentile(ms, 99)), 1),
                    "timeline": [[round(t - begin_wall, 3), round(seconds * 1000, 1)] for t, seconds in freshness],
                }
            )
            print({k: v for k, v in loads[-1].items() if k != "timeline"}, flush=True)
        producer.close()
        node.stop_ingest()
        settle(node.active.shards)  # a build of the records just indexed would share the cores with the queries
        query = asyncio.run(image_queries(node, [encoded(product_image(10**6 + i, (256, 256))) for i in range(200)]))
        print(f"POST /search, one 256x256 JPEG: {query}", flush=True)
    result = {
        "profile": args.profile,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "models": {
            "encoder": settings.models.encoder,
            "detector": settings.models.detector,
            "batch_size": settings.models.batch_size,
            "runtime": resolve_runtime(settings.models.runtime, resolve_device(settings.models.device)),
        },
        "switch_interval_ms": settings.api.switch_interval_ms,
        "bare_images_per_s": round(bare, 1),
        "bare_before_and_after": [round(bare_before, 1), round(bare_after, 1)],
        "bare_with_decode_images_per_s": round(decoding, 1),
        "bare_with_decode_before_and_after": [round(decoding_before, 1), round(decoding_after, 1)],
        "end_to_end_events_per_s": round(end_to_end, 1),
        "end_to_end_from_first_sent": round(from_first_sent, 1),
        "events": args.events,
        "efficiency": round(end_to_end / bare, 3),
        "efficiency_with_decode": round(end_to_end / decoding, 3),
        "freshness": loads,
        "image_query": query,
    }
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
