"""One crash-recovery run: a node SIGKILLed in a 2,000-event stream, restarted, checked for exactly-once.

tests/integration/test_crash_recovery.py runs it once; benchmarks/crash_recovery.py
runs it at 20 random points.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from indexer.config import KafkaSettings
from indexer.events import Event, encode_event
from indexer.kafka.topics import ensure_topics
from producers.publisher import make_producer
from tests.support.imagegen import encoded, product_image
from tests.support.processes import ROOT, free_port, get_json, kafka_toml, node_stats, wait_until


def image(seed: int) -> bytes:
    return encoded(product_image(seed, (48, 48)), "PNG")


def stream() -> list[Event]:
    """2,000 events: 1,500 products, 400 updates of the first 400, then 100 deletes of the last 100."""
    events = [
        Event("product.upsert", f"p{i}", i, image=image(i), attrs={"category": "top", "v": 1}) for i in range(1500)
    ]
    events += [
        Event("product.upsert", f"p{i}", 2000 + i, image=image(10_000 + i), attrs={"category": "top", "v": 2})
        for i in range(400)
    ]
    events += [Event("product.delete", f"p{i}", 3000 + i) for i in range(1400, 1500)]
    return events


@dataclass
class Outcome:
    kill_after: int
    consumed_at_kill: int
    checkpoints_before_kill: int
    recovery_s: float


def run_scenario(kafka: KafkaSettings, workdir: Path, plugin_site: Path, kill_after: int) -> Outcome:
    """One kill and restart; raises AssertionError if any event is lost or applied twice."""
    ensure_topics(kafka)
    port = free_port()
    config = workdir / "lookstream.toml"
    config.write_text(
        kafka_toml(kafka, max_poll_records=50)
        + """
[models]
encoder = "colour-histogram"
[shards]
checkpoint_interval_s = 0.3
seal_min_rows = 500
growing_max_rows = 400
"""
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), str(ROOT)])}
    command = [
        sys.executable,
        "-m",
        "indexer",
        "up",
        "--config",
        str(config),
        "--port",
        str(port),
        "--data-dir",
        str(workdir / "data"),
        "--bootstrap-servers",
        kafka.bootstrap_servers,
    ]

    def start(log_name: str) -> subprocess.Popen:
        with open(workdir / log_name, "wb") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    node = start("first.log")
    try:
        wait_until(lambda: (node_stats(port) or {}).get("consumer", {}).get("assigned"), 60, "assignment")
        producer = make_producer(kafka)
        for event in stream():
            producer.send(kafka.topics.products, key=event.id.encode(), value=encode_event(event))
        producer.flush()
        producer.close()
        consumed = wait_until(
            lambda: (s := node_stats(port)) and s["ingest"]["consumed"] >= kill_after and s["ingest"]["consumed"],
            120,
            f"{kill_after} events consumed",
        )
    finally:
        node.send_signal(signal.SIGKILL)
        node.wait(10)
    checkpoints = len(list((workdir / "data" / "checkpoints").glob("*/ckpt-*")))

    restarted = time.monotonic()
    node = start("second.log")
    try:
        wait_until(
            lambda: (s := node_stats(port)) and s["ingest"]["consumed"] >= 2000, 180, "all events after the restart"
        )
        recovery_s = time.monotonic() - restarted
        time.sleep(1.5)  # anything replayed twice would show up now
        body = node_stats(port)
        ingest = body["ingest"]
        counts = (ingest["consumed"], ingest["indexed"], ingest["deleted"], ingest["rejected"])
        assert counts == (2000, 1900, 100, 0), f"counts {counts}"
        assert body["records"]["products"] == 1400, body["records"]
        assert sum(s["vectors"] for s in body["shards"]) == 1400
        for i in (0, 399):
            hit = get_json(port, "/search?k=3", image(10_000 + i))["hits"][0]
            assert hit["id"] == f"p{i}" and hit["attrs"]["v"] == 2, hit
        for i in (400, 1399):
            assert get_json(port, "/search?k=3", image(i))["hits"][0]["id"] == f"p{i}"
        for i in (1400, 1499):
            assert all(h["id"] != f"p{i}" for h in get_json(port, "/search?k=3", image(i))["hits"])
    finally:
        node.send_signal(signal.SIGTERM)
        code = node.wait(30)
    assert code == 0, (workdir / "second.log").read_text()[-3000:]
    return Outcome(kill_after, consumed, checkpoints, round(recovery_s, 2))
