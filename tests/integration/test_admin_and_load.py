"""A durable node on the real broker: an admin snapshot, and concurrent queries while it ingests."""

import asyncio

import pytest
from pydantic import SecretStr

from indexer.config import Settings
from indexer.events import Event
from indexer.node import build_node
from indexer.web.app import create_app
from producers.publisher import make_producer, publish
from tests.integration.conftest import eventually
from tests.support.imagegen import encoded, product_image

pytestmark = pytest.mark.integration
JPEG = {"Content-Type": "image/jpeg"}


def product(i: int) -> Event:
    return Event("product.upsert", f"p{i}", i, image=encoded(product_image(i)), attrs={"category": "top"})


async def test_snapshot_and_no_5xx_under_concurrent_queries_while_ingesting(aiohttp_client, topics, tmp_path):
    settings = Settings.model_validate(
        {
            **topics.model_dump(),
            "data_dir": tmp_path,
            "api": {"admin_token": "t0ken"},
        }
    )
    assert isinstance(settings.api.admin_token, SecretStr)
    node = await asyncio.get_running_loop().run_in_executor(None, build_node, settings)
    client = await aiohttp_client(create_app(node))
    producer = make_producer(settings.kafka)
    publish([product(i) for i in range(10)], settings.kafka.topics.products, producer, progress=False)

    async def ten_records():
        return (await (await client.get("/stats")).json())["records"]["products"] == 10

    await eventually(ten_records)

    response = await client.post("/admin/snapshot", headers={"Authorization": "Bearer t0ken"})
    body = await response.json()
    assert response.status == 200 and sum(body["offsets"].values()) == 10
    assert list((tmp_path / "checkpoints").rglob(body["checkpoint"]))

    # 200 queries, 16 at a time, while 60 more products stream in.
    statuses: list[int] = []
    images = [encoded(product_image(i)) for i in range(10)]

    async def query(n: int) -> None:
        response = await client.post("/search?k=5", data=images[n % 10], headers=JPEG)
        statuses.append(response.status)
        if response.status == 200:
            assert (await response.json())["hits"][0]["id"] == f"p{n % 10}"

    ingest = asyncio.get_running_loop().run_in_executor(
        None, publish, [product(i) for i in range(10, 70)], settings.kafka.topics.products, producer, False
    )
    for start in range(0, 200, 16):
        await asyncio.gather(*(query(n) for n in range(start, min(start + 16, 200))))
    await ingest
    producer.close()
    assert statuses == [200] * 200

    async def seventy_records():
        return (await (await client.get("/stats")).json())["records"]["products"] == 70

    await eventually(seventy_records)
    ready = await client.get("/readyz")
    assert ready.status == 200, await ready.text()
