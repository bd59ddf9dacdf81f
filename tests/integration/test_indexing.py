"""Events published with kafka-python to the real broker, searched over a real aiohttp server."""

import time

import msgpack
import pytest
from kafka import KafkaConsumer

from consumers.indexing import REASON_HEADER, SOURCE_HEADER
from indexer.api import create_app
from indexer.events import Event, encode_event
from indexer.node import Node
from producers.publisher import make_producer, publish
from tests.imagegen import encoded, product_image
from tests.integration.conftest import eventually

pytestmark = pytest.mark.integration
JPEG = {"Content-Type": "image/jpeg"}


@pytest.fixture
async def client(aiohttp_client, topics, default_models):
    return await aiohttp_client(create_app(Node.create(topics, default_models)))


@pytest.fixture
def producer(topics):
    producer = make_producer(topics.kafka)
    yield producer
    producer.close()


def product(i: int, seed: int | None = None, **attrs) -> Event:
    image = encoded(product_image(i if seed is None else seed))
    return Event("product.upsert", f"p{i}", int(time.time() * 1000), image=image, attrs={"category": "top", **attrs})


async def top_hit(client, seed: int, **params):
    response = await client.post("/search", params={"k": 5, **params}, data=encoded(product_image(seed)), headers=JPEG)
    assert response.status == 200
    hits = (await response.json())["hits"]
    return hits[0] if hits else None


async def stats(client):
    return await (await client.get("/stats")).json()


async def test_products_are_searchable_then_updated_then_deleted(client, topics, producer):
    products_topic = topics.kafka.topics.products
    summary = publish([product(i) for i in range(12)], products_topic, producer, progress=False)
    assert summary.sent == 12
    await eventually(lambda: _records(client, 12))
    for i in range(12):
        hit = await top_hit(client, i)
        assert hit["id"] == f"p{i}" and hit["score"] == pytest.approx(1.0, abs=1e-4)

    # An update replaces the vector and the attrs of the same id.
    publish([product(3, seed=100, title="new")], products_topic, producer, progress=False)

    async def updated():
        hit = await top_hit(client, 100)
        return hit if hit["id"] == "p3" and hit["score"] > 0.9999 else None

    hit = await eventually(updated)
    assert hit["attrs"] == {"category": "top", "title": "new"}
    assert (await top_hit(client, 3))["id"] != "p3"  # the old image no longer finds it exactly
    assert (await stats(client))["records"]["products"] == 12

    # A delete removes it.
    producer.send(products_topic, key=b"p5", value=encode_event(Event("product.delete", "p5", 0))).get(10)

    async def deleted():
        return (await top_hit(client, 5))["id"] != "p5"

    await eventually(deleted)
    body = await stats(client)
    assert body["records"]["products"] == 11 and body["ingest"]["deleted"] == 1
    assert sum(s["vectors"] for s in body["shards"]) == 11


async def _records(client, n):
    return (await stats(client))["records"]["products"] == n


async def test_bad_events_go_to_the_dead_letter_topic_and_the_good_ones_around_them_are_indexed(
    client, topics, producer
):
    names = topics.kafka.topics
    good = lambda i: encode_event(product(i))  # noqa: E731
    bad = {
        b"bad-msgpack": b"\xc1\xc1",
        b"bad-map": msgpack.packb([1, 2, 3]),
        b"bad-version": msgpack.packb({"v": 9, "type": "product.upsert", "id": "x", "ts": 1, "image": b""}),
        b"bad-image": encode_event(Event("product.upsert", "x", 1, image=b"GIF89a nonsense")),
        b"bad-topic": encode_event(Event("post.upsert", "x", 1, image=encoded(product_image(1)))),
    }
    for i in range(3):
        producer.send(names.products, key=f"p{i}".encode(), value=good(i))
    for key, value in bad.items():
        producer.send(names.products, key=key, value=value, headers=[("trace", b"t-1")])
    for i in range(3, 6):
        producer.send(names.products, key=f"p{i}".encode(), value=good(i))
    producer.flush()

    await eventually(lambda: _records(client, 6))
    body = await stats(client)
    assert body["ingest"]["rejected"] == 5 and body["ingest"]["consumed"] == 11

    consumer = KafkaConsumer(
        names.dead_letter,
        bootstrap_servers=topics.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
    )
    letters = {}
    for message in consumer:
        letters[message.key] = (message.value, dict(message.headers))
        if len(letters) == len(bad):
            break
    consumer.close()
    assert set(letters) == set(bad)
    for key, (value, headers) in letters.items():
        assert value == bad[key] and headers["trace"] == b"t-1"
        assert headers[SOURCE_HEADER].startswith(names.products.encode())
    reasons = {key: headers[REASON_HEADER].decode() for key, (_, headers) in letters.items()}
    assert "not msgpack" in reasons[b"bad-msgpack"]
    assert "must be a msgpack map" in reasons[b"bad-map"]
    assert "unknown envelope version" in reasons[b"bad-version"]
    assert "not a JPEG, PNG or WebP" in reasons[b"bad-image"]
    assert "does not belong on topic" in reasons[b"bad-topic"]


async def test_posts_are_indexed_in_their_own_collection(client, topics, producer):
    post = Event("post.upsert", "look-1", 1, image=encoded(product_image(42)))
    publish([post], topics.kafka.topics.posts, producer, progress=False)

    async def found():
        return await top_hit(client, 42, collection="posts")

    assert (await eventually(found))["id"] == "look-1"
    assert await top_hit(client, 42) is None  # not in products
