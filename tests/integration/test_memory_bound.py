"""Huge-pixel images in small files, under a memory limit: no out-of-memory, and a restart does not crash-loop.

Each of the 64 events is a PNG or JPEG of 20-38 million pixels that takes a few
KB on the wire (a solid colour with a mark): decoded at full size together they
would need about 5 GB. The node runs as a real ``lookstream up`` process whose
data segment (``RLIMIT_DATA``: heap and anonymous mappings) is capped at what
it uses when idle plus 1 GiB. It is SIGKILLed after its first batch and
restarted under the same cap; it must then index every event without a single
failed batch.
"""

from __future__ import annotations

import io
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from indexer.events import Event, encode_event
from indexer.kafka.topics import ensure_topics
from producers.publisher import make_producer
from tests.support.processes import free_port, kafka_toml, node_stats, wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
HEADROOM = 1024**3
EVENTS = 64


def huge_image(i: int) -> bytes:
    """A 20-38 Mpx image of a few KB: PNG (decoded at full size) or JPEG (draft-decoded)."""
    size = (5000, 4000) if i % 4 else (6200, 6200)
    image = Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
    ImageDraw.Draw(image).rectangle((i * 50, i * 40, i * 50 + 900, i * 40 + 700), fill=(255 - i, i, 128))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if i % 2 else "JPEG", quality=60)
    return buffer.getvalue()


def vm_data(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmData")


def test_a_batch_of_huge_images_fits_a_memory_limit_and_survives_a_restart(tmp_path, kafka_settings):
    kafka = kafka_settings.kafka
    ensure_topics(kafka)
    port = free_port()
    config = tmp_path / "lookstream.toml"
    config.write_text(
        kafka_toml(kafka, max_poll_records=16)
        + """
[shards]
checkpoint_interval_s = 0.3
"""
    )
    command = [sys.executable, "-m", "indexer", "up", "--config", str(config), "--port", str(port)]
    command += ["--data-dir", str(tmp_path / "data"), "--bootstrap-servers", kafka.bootstrap_servers]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start(log_name: str, limit: int | None = None) -> subprocess.Popen:
        with open(tmp_path / log_name, "wb") as log:
            node = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        if limit is not None:
            resource.prlimit(node.pid, resource.RLIMIT_DATA, (limit, limit))
        return node

    node = start("first.log")
    try:
        wait_until(lambda: (node_stats(port) or {}).get("consumer", {}).get("assigned"), 90, "assignment")
        limit = vm_data(node.pid) + HEADROOM
        resource.prlimit(node.pid, resource.RLIMIT_DATA, (limit, limit))
        producer = make_producer(kafka)
        for i in range(EVENTS):
            event = Event("product.upsert", f"huge-{i}", 1, image=huge_image(i), attrs={"category": "top"})
            producer.send(kafka.topics.products, key=event.id.encode(), value=encode_event(event))
        producer.flush()
        producer.close()
        wait_until(lambda: (s := node_stats(port)) and s["ingest"]["consumed"] >= 16, 180, "the first batch")
    finally:
        node.send_signal(signal.SIGKILL)
        node.wait(10)

    node = start("second.log", limit)
    try:
        body = wait_until(
            lambda: (s := node_stats(port)) and s["ingest"]["consumed"] >= EVENTS and s, 300, "every event"
        )
        assert body["records"]["products"] == EVENTS and body["ingest"]["rejected"] == 0, body["ingest"]
        assert body["consumer"]["failures"] == {}, body["consumer"]  # no batch ran out of memory and was retried
        assert node.poll() is None
    finally:
        node.send_signal(signal.SIGTERM)
        code = node.wait(30)
    log = (tmp_path / "second.log").read_text()
    assert code == 0 and "MemoryError" not in log, log[-3000:]
