"""The broker goes away for 30 s and comes back: queries keep working, readiness says so, nothing is lost.

The broker keeps its log in S3 (a local moto server), so it survives its own
restart (DESIGN.md, "Local broker"); producers run without idempotence, which
lost acknowledged messages across restarts of this broker.
"""

import asyncio
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from indexer.config import Settings
from indexer.events import Event
from indexer.kafka.broker import LocalBroker, wait_for_port
from indexer.kafka.topics import ensure_topics
from indexer.node import build_node
from indexer.web.app import create_app
from producers.publisher import make_producer, publish
from tests.integration.conftest import eventually
from tests.support.imagegen import encoded, product_image
from tests.support.processes import free_port

pytestmark = pytest.mark.integration
JPEG = {"Content-Type": "image/jpeg"}
OUTAGE_S = 30


@pytest.fixture
def s3(tmp_path):
    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"
    with open(tmp_path / "moto.log", "wb") as log:
        process = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    try:
        wait_for_port("127.0.0.1", port, 30)
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/tansu", method="PUT"), timeout=10)
        yield {
            "AWS_ENDPOINT": f"http://127.0.0.1:{port}",
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        process.terminate()
        process.wait(10)


def product(i: int) -> Event:
    return Event(
        "product.upsert", f"p{i}", int(time.time() * 1000), image=encoded(product_image(i)), attrs={"category": "top"}
    )


async def test_broker_outage_keeps_queries_up_and_loses_nothing(aiohttp_client, s3, tmp_path, unique):
    port = free_port()
    broker = LocalBroker(port, storage="s3://tansu/", env=s3, log_path=tmp_path / "broker.log")
    broker.start()
    try:
        settings = Settings.model_validate(
            {
                "data_dir": str(tmp_path / "data"),
                "kafka": {
                    "bootstrap_servers": broker.bootstrap_servers,
                    "group_id": f"outage-{unique}",
                    "partitions": 1,
                    "topics": {
                        "products": f"products-{unique}",
                        "posts": f"posts-{unique}",
                        "dead_letter": f"dl-{unique}",
                    },
                },
                "shards": {"checkpoint_interval_s": 1},
            }
        )
        ensure_topics(settings.kafka)
        loop = asyncio.get_running_loop()
        node = await loop.run_in_executor(None, build_node, settings)
        client = await aiohttp_client(create_app(node))
        producer = make_producer(settings.kafka)
        await loop.run_in_executor(
            None, publish, [product(i) for i in range(5)], settings.kafka.topics.products, producer, False
        )
        producer.close()

        async def records(n: int) -> bool:
            return (await (await client.get("/stats")).json())["records"]["products"] == n

        await eventually(lambda: records(5), timeout=60)
        assert (await client.get("/readyz")).status == 200

        await loop.run_in_executor(None, broker.stop)
        down_since = time.monotonic()
        statuses, readiness = [], []
        while time.monotonic() - down_since < OUTAGE_S:
            i = len(statuses) % 5
            response = await client.post("/search?k=1", data=encoded(product_image(i)), headers=JPEG)
            statuses.append(response.status)
            if response.status == 200:
                assert (await response.json())["hits"][0]["id"] == f"p{i}"
            readiness.append((await client.get("/readyz")).status)
            await asyncio.sleep(0.5)
        assert set(statuses) == {200}, "queries must not fail while the broker is away"
        assert readiness[-1] == 503, "readiness must report the outage"

        await loop.run_in_executor(None, broker.start)
        producer = await loop.run_in_executor(None, make_producer, settings.kafka)
        await loop.run_in_executor(
            None, publish, [product(i) for i in range(5, 10)], settings.kafka.topics.products, producer, False
        )
        producer.close()
        await eventually(lambda: records(10), timeout=90)

        async def ready() -> bool:
            return (await client.get("/readyz")).status == 200

        await eventually(ready, timeout=60)
        for i in range(10):
            response = await client.post("/search?k=1", data=encoded(product_image(i)), headers=JPEG)
            assert (await response.json())["hits"][0]["id"] == f"p{i}"
        await client.close()  # stop the node (its last checkpoint and commit) before the broker
    finally:
        broker.stop()
