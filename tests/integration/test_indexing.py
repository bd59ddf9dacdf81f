"""Events published with kafka-python to the real broker, searched over a real aiohttp server."""

import time

import msgpack
import pytest

from consumers.indexing import DETAIL_HEADER, DROPPED_HEADER, REASON_HEADER, SOURCE_HEADER
from indexer.events import Event, encode_event
from indexer.failures import Reason
from indexer.node import Node
from indexer.web.app import create_app
from producers.publisher import make_producer, publish
from tests.integration.conftest import eventually, read_dead_letters
from tests.support.imagegen import JPEG, encoded, product_image

pytestmark = pytest.mark.integration


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
    # the counters are written just after the shards change: wait for them, not only for the search
    body = await eventually(lambda: _ingested(client, "deleted", 1))
    assert body["records"]["products"] == 11 and body["ingest"]["deleted"] == 1
    assert sum(s["vectors"] for s in body["shards"]) == 11


async def _records(client, n):
    return (await stats(client))["records"]["products"] == n


async def _ingested(client, counter: str, n: int):
    """The /stats body once the ingest counter reaches n (it is written just after the shards change)."""
    body = await stats(client)
    return body if body["ingest"][counter] == n else None


def _saved(image, fmt: str, **kwargs) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _upsert(record_id: str, **fields) -> bytes:
    body = {"v": 1, "type": "product.upsert", "id": record_id, "ts": 1, "attrs": {"category": "top"}, **fields}
    return msgpack.packb({k: v for k, v in body.items() if v is not ...}, use_bin_type=True)


def bad_inputs(tmp_path) -> dict[str, tuple[bytes, str]]:
    """What docs/reliability.md lists: key -> (message value, expected reason)."""
    from PIL import Image

    (tmp_path / "images").mkdir(exist_ok=True)
    return {
        "not-msgpack": (b"\xc1\xc1", "not msgpack"),
        "not-a-map": (msgpack.packb([1, 2, 3]), "must be a msgpack map"),
        "missing-id": (_upsert("x", id=...), "missing field 'id'"),
        "wrong-type-ts": (_upsert("x", ts="yesterday"), "field 'ts' must be int"),
        "unknown-v": (_upsert("x", v=9), "unknown envelope version"),
        "unknown-type": (_upsert("x", type="product.move"), "unknown type"),
        "no-image": (_upsert("x"), "needs 'image' or 'image_uri'"),
        "empty-image": (_upsert("x", image=b""), "empty image"),
        "truncated-image": (_upsert("x", image=encoded(product_image(1))[:400]), "corrupt image"),
        "corrupt-image": (_upsert("x", image=b"\xff\xd8\xff" + b"\x00" * 500), "not a JPEG, PNG or WebP"),
        "gif-image": (_upsert("x", image=_saved(Image.new("RGB", (8, 8)), "GIF")), "not a JPEG, PNG or WebP"),
        "bomb": (_upsert("x", image=_saved(Image.new("L", (9000, 9000)), "PNG")), "over the limit"),
        "etc-passwd": (_upsert("x", image_uri="file:///etc/passwd"), "outside the configured file roots"),
        "traversal": (
            _upsert("x", image_uri=f"{(tmp_path / 'images').as_uri()}/../../../etc/passwd"),
            "outside the configured file roots",
        ),
        "ssrf": (_upsert("x", image_uri="http://169.254.169.254/latest/meta-data"), "not in images.http_hosts"),
        "absurd-id": (_upsert("x" * 5000), "id must be 1-256 printable characters"),
        "control-id": (_upsert("a\x00b"), "id must be 1-256 printable characters"),
        "absurd-attrs": (_upsert("x", attrs={"a": [[[[[[["deep"]]]]]]]}), "nested deeper"),
        "binary-attrs": (_upsert("x", attrs={"blob": b"\x00"}), "must be a JSON value"),
        "wrong-topic": (
            encode_event(Event("post.upsert", "x", 1, image=encoded(product_image(1)))),
            "does not belong on topic",
        ),
        "oversized": (_upsert("x", image=b"\x00" * 300_000), "over the 200000 byte limit"),
    }


def odd_but_valid_images() -> dict[str, bytes]:
    import numpy as np
    from PIL import Image

    return {
        "cmyk": _saved(Image.new("CMYK", (40, 30), (0, 255, 0, 0)), "JPEG"),
        "16-bit": _saved(Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)), "PNG"),
        "alpha": _saved(Image.new("RGBA", (40, 30), (255, 0, 0, 128)), "PNG"),
        "palette": _saved(product_image(7, (40, 30)).convert("P"), "PNG"),
        "animated": _saved(
            product_image(8, (40, 30)), "PNG", save_all=True, append_images=[product_image(9, (40, 30))]
        ),
        "webp": _saved(product_image(10, (40, 30)), "WEBP"),
    }


async def test_bad_events_go_to_the_dead_letter_topic_and_the_good_ones_around_them_are_indexed(
    aiohttp_client, kafka_settings, default_models, tmp_path
):
    from kafka import KafkaProducer

    from indexer.kafka.topics import ensure_topics

    settings = kafka_settings.model_copy(
        update={
            "kafka": kafka_settings.kafka.model_copy(update={"max_message_bytes": 200_000}),
            "images": kafka_settings.images.model_copy(
                update={"file_roots": (tmp_path / "images",), "max_pixels": 40_000_000}
            ),
        }
    )
    ensure_topics(settings.kafka)
    client = await aiohttp_client(create_app(Node.create(settings, default_models)))
    names = settings.kafka.topics
    bad = bad_inputs(tmp_path)
    odd = odd_but_valid_images()
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, max_request_size=1_000_000)
    for i in range(3):
        producer.send(names.products, key=f"p{i}".encode(), value=encode_event(product(i)))
    for key, (value, _) in bad.items():
        producer.send(names.products, key=key.encode(), value=value, headers=[("trace", b"t-1")])
    for name, image in odd.items():
        producer.send(names.products, key=name.encode(), value=_upsert(name, image=image))
    for i in range(3, 6):
        producer.send(names.products, key=f"p{i}".encode(), value=encode_event(product(i)))
    producer.flush()
    producer.close()

    body = await eventually(lambda: _ingested(client, "consumed", 6 + len(bad) + len(odd)), timeout=60)
    assert body["ingest"]["rejected"] == len(bad) and body["records"]["products"] == 6 + len(odd)

    letters = read_dead_letters(settings.kafka, len(bad))
    assert set(letters) == set(bad)
    for key, (value, headers) in letters.items():
        assert headers["trace"] == b"t-1" and headers[SOURCE_HEADER].startswith(names.products.encode())
        assert bad[key][1] in headers[DETAIL_HEADER].decode(), (key, headers[DETAIL_HEADER])
        assert headers[REASON_HEADER].decode() in set(Reason), (key, headers[REASON_HEADER])
        if key == "oversized":
            assert value is None and int(headers[DROPPED_HEADER]) > 200_000
        else:
            assert value == bad[key][0]


async def test_posts_are_indexed_in_their_own_collection(client, topics, producer):
    post = Event("post.upsert", "look-1", 1, image=encoded(product_image(42)))
    publish([post], topics.kafka.topics.posts, producer, progress=False)

    async def found():
        return await top_hit(client, 42, collection="posts")

    assert (await eventually(found))["id"] == "look-1"
    assert await top_hit(client, 42) is None  # not in products
