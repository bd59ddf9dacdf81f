"""SIGKILL the indexer in the middle of a stream; after a restart every event is applied exactly once."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from indexer.events import Event, encode_event
from indexer.topics import ensure_topics
from producers.publisher import make_producer
from tests.conftest import free_port
from tests.imagegen import encoded, product_image

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def stats(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


def search(port: int, image: bytes) -> list[dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/search?k=3", data=image, headers={"Content-Type": "image/png"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["hits"]


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout} s")


def stream() -> list[Event]:
    """2,000 events: 1,500 products, 400 updates of the first 400, then 100 deletes of the last 100."""

    def image(seed):
        return encoded(product_image(seed, (48, 48)), "PNG")

    events = [
        Event("product.upsert", f"p{i}", i, image=image(i), attrs={"category": "top", "v": 1}) for i in range(1500)
    ]
    events += [
        Event("product.upsert", f"p{i}", 2000 + i, image=image(10_000 + i), attrs={"category": "top", "v": 2})
        for i in range(400)
    ]
    events += [Event("product.delete", f"p{i}", 3000 + i) for i in range(1400, 1500)]
    return events


def test_sigkill_mid_stream_then_restart_applies_every_event_exactly_once(
    tmp_path, kafka_settings, example_plugin_site
):
    kafka = kafka_settings.kafka
    ensure_topics(kafka)
    port = free_port()
    config = tmp_path / "lookstream.toml"
    config.write_text(f"""
[kafka]
bootstrap_servers = "{kafka.bootstrap_servers}"
group_id = "{kafka.group_id}"
max_poll_records = 50
[kafka.topics]
products = "{kafka.topics.products}"
posts = "{kafka.topics.posts}"
dead_letter = "{kafka.topics.dead_letter}"
[models]
encoder = "colour-histogram"
[shards]
checkpoint_interval_s = 0.3
seal_min_rows = 500
growing_max_rows = 400
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(example_plugin_site), str(ROOT)])}
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
        str(tmp_path / "data"),
        "--bootstrap-servers",
        kafka.bootstrap_servers,
    ]

    def start(log_name: str) -> subprocess.Popen:
        with open(tmp_path / log_name, "wb") as log:  # the child keeps its own descriptor
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    node = start("first.log")
    try:
        wait_for(lambda: (stats(port) or {}).get("consumer", {}).get("assigned"), 60, "assignment")
        events = stream()
        producer = make_producer(kafka)
        for event in events:
            producer.send(kafka.topics.products, key=event.id.encode(), value=encode_event(event))
        producer.flush()
        producer.close()
        consumed = wait_for(
            lambda: (
                (stats(port) or {}).get("ingest", {}).get("consumed", 0) >= 700 and stats(port)["ingest"]["consumed"]
            ),
            60,
            "700 events consumed",
        )
        assert consumed < 2000, "the stream ended before the kill; make it longer"
    finally:
        node.send_signal(signal.SIGKILL)
        node.wait(10)
    checkpoints = list((tmp_path / "data" / "checkpoints").glob("*/ckpt-*"))
    assert checkpoints, "no checkpoint was written before the kill"

    node = start("second.log")
    try:

        def all_consumed():
            body = stats(port)
            return body if body and body["ingest"]["consumed"] >= 2000 else None

        body = wait_for(all_consumed, 120, "all 2,000 events consumed after the restart")
        time.sleep(1.5)  # anything replayed twice would show up now
        body = stats(port)
        ingest = body["ingest"]
        assert (ingest["consumed"], ingest["indexed"], ingest["deleted"], ingest["rejected"]) == (2000, 1900, 100, 0)
        assert body["records"]["products"] == 1400
        assert sum(s["vectors"] for s in body["shards"]) == 1400
        for i in (0, 399):  # updated: found by the new image, with the new attrs
            hit = search(port, encoded(product_image(10_000 + i, (48, 48)), "PNG"))[0]
            assert hit["id"] == f"p{i}" and hit["attrs"]["v"] == 2
        for i in (400, 1399):
            assert search(port, encoded(product_image(i, (48, 48)), "PNG"))[0]["id"] == f"p{i}"
        for i in (1400, 1499):
            assert all(h["id"] != f"p{i}" for h in search(port, encoded(product_image(i, (48, 48)), "PNG")))
    finally:
        node.send_signal(signal.SIGTERM)
        assert node.wait(30) == 0, (tmp_path / "second.log").read_text()[-3000:]
