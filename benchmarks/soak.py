"""Soak: constant ingest and queries against one node for a long time; memory must stay flat, no errors.

    python -m benchmarks.soak --minutes 30 --output benchmarks/results/soak.json

A local broker and a `lookstream up` subprocess with the default models. A
producer upserts a rotating set of product ids (so records are rewritten and
shards churn) at --events-per-s; a client sends --queries-per-s image queries.
Every 30 s the node's resident memory and counters are sampled. Memory is
"flat" when the last third of the samples averages within 10% of the middle
third (the first third is warm-up: models, first seals).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from indexer.config import KafkaSettings
from indexer.events import Event, encode_event
from indexer.kafka.broker import LocalBroker
from producers.publisher import make_producer
from tests.support.imagegen import encoded, product_image
from tests.support.processes import ROOT, free_port, node_stats, wait_until


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--events-per-s", type=float, default=5)
    parser.add_argument("--queries-per-s", type=float, default=2)
    parser.add_argument("--ids", type=int, default=2000, help="size of the rotating id set")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    images = [encoded(product_image(i, (160, 200))) for i in range(200)]
    errors: list[str] = []
    counts = {"sent": 0, "queries": 0}
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="lookstream-soak-") as tmp, LocalBroker(free_port()) as broker:
        port = free_port()
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(Path(tmp) / "node.log", "wb") as log:
            node = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "indexer",
                    "up",
                    "--port",
                    str(port),
                    "--data-dir",
                    str(Path(tmp) / "data"),
                    "--bootstrap-servers",
                    broker.bootstrap_servers,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        from indexer.kafka.topics import ensure_topics

        ensure_topics(kafka)
        wait_until(lambda: (node_stats(port) or {}).get("consumer", {}).get("assigned"), 120, "assignment")

        def produce() -> None:
            producer = make_producer(kafka)
            i = 0
            while not stop.is_set():
                event = Event(
                    "product.upsert",
                    f"p{i % args.ids}",
                    int(time.time() * 1000),
                    image=images[i % len(images)],
                    attrs={"category": "top", "round": i // args.ids},
                )
                producer.send(kafka.topics.products, key=event.id.encode(), value=encode_event(event))
                counts["sent"] += 1
                i += 1
                stop.wait(1 / args.events_per_s)
            producer.close()

        def query() -> None:
            i = 0
            while not stop.is_set():
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/search?k=10", data=images[i % 200], headers={"Content-Type": "image/jpeg"}
                )
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        response.read()
                except Exception as e:
                    errors.append(f"{time.strftime('%H:%M:%S')} {e}")
                counts["queries"] += 1
                i += 1
                stop.wait(1 / args.queries_per_s)

        threads = [threading.Thread(target=produce), threading.Thread(target=query)]
        for t in threads:
            t.start()
        samples = []
        started = time.monotonic()
        try:
            while time.monotonic() - started < args.minutes * 60:
                time.sleep(30)
                stats = node_stats(port) or {}
                ingest = stats.get("ingest", {})
                samples.append(
                    {
                        "t_s": round(time.monotonic() - started),
                        "rss_mb": round(rss_mb(node.pid), 1),
                        "consumed": ingest.get("consumed"),
                        "rejected": ingest.get("rejected"),
                        "records": stats.get("records", {}).get("products"),
                        "sent": counts["sent"],
                        "queries": counts["queries"],
                        "errors": len(errors),
                    }
                )
                print(samples[-1], flush=True)
        finally:
            stop.set()
            for t in threads:
                t.join()
            node.send_signal(signal.SIGTERM)
            exit_code = node.wait(60)

    third = max(1, len(samples) // 3)
    middle = sum(s["rss_mb"] for s in samples[third : 2 * third]) / max(1, len(samples[third : 2 * third]))
    last = sum(s["rss_mb"] for s in samples[2 * third :]) / max(1, len(samples[2 * third :]))
    summary = {
        "minutes": args.minutes,
        "events_per_s": args.events_per_s,
        "queries_per_s": args.queries_per_s,
        "sent": counts["sent"],
        "queries": counts["queries"],
        "query_errors": len(errors),
        "rss_middle_third_mb": round(middle, 1),
        "rss_last_third_mb": round(last, 1),
        "memory_flat": last <= 1.1 * middle,
        "node_exit_code": exit_code,
        "errors": errors[:20],
    }
    print(summary)
    if args.output:
        args.output.write_text(json.dumps({"summary": summary, "samples": samples}, indent=2) + "\n")


if __name__ == "__main__":
    main()
