"""Switching encoders on a live node: a new generation replays the log, then takes over; no query fails."""

import asyncio

import pytest

from indexer.config import Settings
from indexer.events import Event
from indexer.node import build_node
from indexer.web.app import create_app
from producers.publisher import make_producer, publish
from tests.integration.conftest import eventually
from tests.support.imagegen import JPEG, encoded, product_image

pytestmark = pytest.mark.integration


def product(i: int) -> Event:
    return Event("product.upsert", f"p{i}", i, image=encoded(product_image(i)), attrs={"category": "top"})


async def test_encoder_switch_under_query_load_has_no_failed_query(aiohttp_client, topics, tmp_path, tiny_clip):
    settings = Settings.model_validate(
        {
            **topics.model_dump(),
            "data_dir": tmp_path / "data",
            "shards": {"checkpoint_interval_s": 0.3},
        }
    )
    loop = asyncio.get_running_loop()
    node = await loop.run_in_executor(None, build_node, settings)
    client = await aiohttp_client(create_app(node))
    producer = make_producer(settings.kafka)
    publish([product(i) for i in range(20)], settings.kafka.topics.products, producer, progress=False)

    async def searchable(i: int) -> bool:
        response = await client.post("/search?k=1", data=encoded(product_image(i)), headers=JPEG)
        hits = (await response.json())["hits"]
        return bool(hits) and hits[0]["id"] == f"p{i}"

    async def all_searchable() -> bool:
        return all([await searchable(i) for i in range(20)])

    await eventually(all_searchable)
    first = node.active.id

    failures: list[str] = []
    queries = 0
    stop = asyncio.Event()

    async def client_loop():
        nonlocal queries
        i = 0
        while not stop.is_set():
            response = await client.post("/search?k=1", data=encoded(product_image(i % 20)), headers=JPEG)
            queries += 1
            if response.status != 200:
                failures.append(f"{response.status}: {await response.text()}")
            else:
                first_hit = [h["id"] for h in (await response.json())["hits"][:1]]
                if first_hit != [f"p{i % 20}"]:
                    failures.append(f"p{i % 20} not first: {first_hit}")
            i += 1

    querying = asyncio.create_task(client_loop())
    clip = settings.models.model_copy(
        update={"encoder": "clip-vision", "options": {"clip-vision": {"name_or_path": str(tiny_clip)}}}
    )
    new = await loop.run_in_executor(None, node.switch, clip)
    assert new is not None and new.id != first

    stats = await (await client.get("/stats")).json()
    assert [(g["encoder"], g["state"]) for g in stats["generations"]] == [
        ("efficientnet-lite0", "active"),
        ("clip-vision", "catching-up"),
    ]

    async def flipped() -> bool:
        return node.active.id == new.id

    await eventually(flipped, timeout=60)
    await asyncio.sleep(1.0)  # keep querying the new generation for a moment
    stop.set()
    await querying
    assert failures == [] and queries > 20

    async def counted():  # the counters are written just after the shards change
        body = await (await client.get("/stats")).json()
        return body if body["ingest"]["consumed"] == 20 else None

    stats = await eventually(counted)
    assert [(g["encoder"], g["state"]) for g in stats["generations"]] == [("clip-vision", "active")]
    assert stats["records"]["products"] == 20

    # The new generation keeps indexing.
    publish([product(20)], settings.kafka.topics.products, producer, progress=False)
    await eventually(lambda: searchable(20))
    producer.close()

    # A restart with the old encoder in the config answers from the generation that was active,
    # and starts the configured one again beside it.
    await client.close()
    restarted = await loop.run_in_executor(None, build_node, settings)
    try:
        assert restarted.active.models.encoder.name == "clip-vision"
        assert restarted.active.shards.records("products") == 21
        assert restarted.building is not None and restarted.building.models.encoder.name == "efficientnet-lite0"
    finally:
        restarted.close()


async def test_switching_straight_back_to_the_retired_models_flips_back(aiohttp_client, topics, tmp_path):
    """The retired generation's consumer group is the one the switch back joins: it must have left first.

    With the old consumer still leaving while the new one joined, the local
    broker failed every SyncGroup with "rebalance in progress" for minutes.
    """
    settings = Settings.model_validate({**topics.model_dump(), "data_dir": tmp_path / "data"})
    loop = asyncio.get_running_loop()
    node = await loop.run_in_executor(None, build_node, settings)
    await aiohttp_client(create_app(node))  # the app starts ingest and flips generations
    producer = make_producer(settings.kafka)
    publish([product(i) for i in range(10)], settings.kafka.topics.products, producer, progress=False)
    producer.close()

    async def indexed() -> bool:
        return node.active.shards.records("products") == 10

    await eventually(indexed)
    original = settings.models
    for selection in (original.model_copy(update={"classifier": "detector-label"}), original):
        new = await loop.run_in_executor(None, node.switch, selection)
        assert new is not None

        async def flipped(new=new) -> bool:
            return node.active is new

        await eventually(flipped, timeout=60, interval=0.05)  # switch back at once: the old consumer is leaving
    assert node.active.selection.classifier == original.classifier
    assert node.active.shards.records("products") == 10
